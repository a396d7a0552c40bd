"""GRPO: the LM learns from its own samples, scored by a reward (SimpleAR's third stage, after
pretraining and SFT).

    # the nano recipe's stage 5: the shapes world's judge as the reward
    python grpo.py --ckpt runs/nano/lm/step_0016000 --vq runs/nano/vq --out runs/grpo --steps 200 \\
        --prompts-per-step 16 --group 8 --lr 1e-4 --schedule cosine --min-lr-ratio 0.1 --beta 0 \\
        --val-every 20
    # SimpleAR's own stage: 7 ranks x (1 caption x 4 images) a step, CLIP-H reward, 1024²
    torchrun --standalone --nproc_per_node=7 grpo.py --preset simplear --ckpt SFT_DIR \\
        --vq nvidia/Cosmos-1.0-Tokenizer-DV8x16x16 --prompts captions.json \\
        --reward clip --clip-ckpt laion/CLIP-ViT-H-14-laion2B-s32B-b79K --out runs/rl
    python grpo.py ... --reward clip=1 hps=0.5 --clip-ckpt DIR --hps-ckpt HPS_v2.1_compressed.pt
    python grpo.py ... --resume          # continues from {out}/latest, exactly
    python -m pytest -q tests/test_grpo.py

One step (DeepSeekMath's GRPO, arXiv 2402.03300, as TRL's GRPOTrainer ran it for SimpleAR:
wdrink/SimpleAR, simpar/train/llava_trainer_grpo.py):
  1. take --prompts-per-step captions (from --prompts FILE, shuffled per epoch, or drawn from the
     shapes world); sample --group images of each with sample.py at the checkpoint's sampling
     settings unless flags say otherwise, on a copy of the float32 policy in the dtype --dtype
     picks (bf16 where the hardware computes it natively, as vLLM rollouts are: off-policy by that
     rounding only), with --jacobi if asked (the same distribution, fewer forwards);
  2. score each image with the --reward functions (a weighted sum); advantage = (reward - mean of
     its group) / (std of its group + 1e-4);
  3. one gradient step on  mean over image tokens of  -A * exp(logp - sg(logp))
     + beta * k3(ref, logp). There is one update per rollout (TRL's mu = 1): the ratio is exactly
     1, so PPO's clipping never acts and only its gradient, A * grad logp, remains.
     k3 = exp(ref - logp) - (ref - logp) - 1 pulls towards the starting weights.
A group whose images all score alike has zero advantage; with beta = 0 its sequences are not even
forwarded.

Which distribution logp is (--logprob), with guidance set by --cfg as in sampling:
  * conditional (default): the conditional branch over the image rows. With --cfg 1, temperature
    1, no top-k/top-p and repetition penalty 1 this is the sampler itself, exactly on-policy:
    SimpleAR's recipe (its rollouts ran without guidance or top-k). With guidance it is T2I-R1's
    choice (arXiv 2505.00703): guided rollouts, the conditional policy learns.
  * guided: the guided distribution that drew the sample, log_softmax((lu + s(lc - lu)) / T), both
    branches forwarded with gradient (AR-GRPO, arXiv 2508.06924): exact, at twice the update's
    compute. It needs no top-k/top-p and no repetition penalty, whose per-position state the
    teacher-forced pass does not carry.

Rewards (--reward name[=weight] ...): a reward is one function of (captions [P], images uint8
[P, G, H, W, 3]) -> float [P, G], so a new one is a few lines in REWARDS.
  * geneval-nano: the shapes world's judge, shapes.py's GenEval-nano detector and rule (1 when the
    image shows what the caption asks, else 0): Flow-GRPO's rule-based GenEval reward at laptop
    scale. Captions drawn from the shapes world never include the benchmark's own
    (shapes.prompt_set()) nor the validation set's.
  * geneval-nano-parts: the same judge's partial credit, the fraction of the caption's objects and
    relation the image gets right (shapes.credit): a group whose images all fail still ranks the
    one that drew both objects above the one that drew one. A caption of one part (single objects,
    counting, colours) gets the 0/1 reward.
  * clip: SimpleAR's: the cosine of the L2-normalised CLIP embeddings (open_clip ViT-H-14, LAION-2B)
    of the image, bilinearly resized to 224 (clip.preprocess "simplear"), and of "A photo of
    {caption}". SimpleAR strips its prompt with str.strip("<|t2i|>"), which removes characters, not
    the substring, and so eats trailing letters of some captions; here the caption is used whole.
  * pickscore: PickScore (yuvalkirstain/PickScore, arXiv 2305.01569): exp(logit_scale) x cosine, the
    reference preprocessing, the caption as it is.
  * hps: HPSv2 (tgxs002/HPSv2, img_score.py): the cosine under the HPSv2 open_clip ViT-H-14
    weights, the reference preprocessing, the caption as it is.

Under torchrun the ranks split each step's groups (contiguous slices of the captions), gather the
rewards so that every rank computes the same advantages, and sum their gradients before the step
(DDP's all-reduce, once per step, since ranks may forward different numbers of sequences when
beta = 0 skips the uninformative groups). Rank 0 logs and saves. A 2-process run equals a
1-process one (tested). Checkpoints are train.py's (Hugging Face directories plus trainer.pt,
`latest` names the newest); each carries the starting checkpoint's generation_config.json. Every
step's randomness (captions, image seeds) derives from (--seed, step), so a resumed run repeats
the uninterrupted one. With --val-every N, rank 0 scores the policy every N steps on shapes.py's
validation prompts, which RL never draws, and {out}/best holds the best-scoring policy of steps N,
2N, ... and the last (its validation.json says which): the nano recipe ships that one. A run
resumed with a larger --steps keeps the earlier last step's validation among the candidates.
"""
import copy
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data
import jacobi
import sample
import shapes
import train
from cli import Parser, run_main, warn
from model import Transformer, resolve_dtype

PROG = "grpo.py"

# SimpleAR's RL stage (simpar/configs/config_grpo_clip.yaml and TRL's defaults): 7 trainer GPUs x
# 4 images, AdamW 1e-6, cosine to 0.1 lr after 10% warmup, beta 0.04, rollouts at temperature 1
# without guidance or top-k (a top-k of 64,000 is no filter on its codebook), 1024² (4,096 tokens)
PRESETS = {
    "none": {},  # the flags' own defaults
    "simplear": dict(prompts_per_step=7, group=4, lr=1e-6, schedule="cosine", warmup_ratio=0.1,
                     min_lr_ratio=0.1, beta=0.04, size=1024, guidance_scale=1.0, temperature=1.0,
                     top_k=64000, top_p=1.0, repetition_penalty=1.0, logprob="conditional",
                     reward=["clip"]),
}


def get_parser():
    p = Parser(prog=PROG, description="GRPO of a SimpleAR checkpoint")
    p.add_argument("--preset", choices=list(PRESETS), default="none",
                   help="a recipe's settings (none: the defaults below); flags given on the "
                   "command line override them")
    p.add_argument("--ckpt", default=sample.DEFAULT_CKPT,
                   help="starting LM checkpoint (and the KL reference)")
    p.add_argument("--vq", default=sample.DEFAULT_VQ,
                   help="visual tokenizer that decodes the rollouts for the reward")
    p.add_argument("--out", default="runs/grpo", help="checkpoint and log directory")
    p.add_argument("--steps", type=int, default=400,
                   help="optimizer steps (SimpleAR's README curve: ~400)")
    g = p.add_argument_group("captions and rewards")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="captions: text (one per line), or JSON/JSONL records with 'caption'; "
                   "shuffled per epoch from --seed. Default: drawn from the shapes world")
    g.add_argument("--prompts-per-step", type=int, default=7,
                   help="captions per step (SimpleAR: 7, one per trainer GPU)")
    g.add_argument("--group", type=int, default=4,
                   help="images per caption, the group of the advantage (SimpleAR: 4)")
    g.add_argument("--categories", nargs="+", default=list(shapes.DRAWABLE),
                   help="shapes-world caption kinds, drawn uniformly from the list: repeat one to "
                   "draw it more often (the single-object kinds have no caption outside the "
                   "benchmark and validation sets, which RL never draws)")
    g.add_argument("--reward", nargs="+", default=["geneval-nano"], metavar="NAME[=W]",
                   help=f"rewards, summed with weights W (default 1): {', '.join(REWARDS)}")
    g.add_argument("--clip-ckpt", help="CLIP for --reward clip (Hugging Face or open_clip)")
    g.add_argument("--pickscore-ckpt", help="PickScore's CLIP directory for --reward pickscore")
    g.add_argument("--hps-ckpt", help="HPSv2's checkpoint (.pt) for --reward hps")
    g.add_argument("--hps-tokenizer", help="a CLIP tokenizer directory for the HPSv2 checkpoint, "
                   "which holds none (default: --clip-ckpt's)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-6, help="AdamW peak learning rate")
    g.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="after the warmup (SimpleAR: cosine)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup")
    g.add_argument("--warmup-ratio", type=float, default=0.0,
                   help="warmup as a share of --steps, when --warmup-steps is 0 (SimpleAR: 0.1)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine's floor, x lr")
    g.add_argument("--beta", type=float, default=0.04,
                   help="weight of the k3 KL to the starting model; 0: no reference")
    g.add_argument("--logprob", choices=("conditional", "guided"), default="conditional",
                   help="the distribution the policy gradient differentiates (see the docstring)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm; 0: off")
    g.add_argument("--micro-batch", type=int, default=64,
                   help="sequences per forward/backward pass (memory only)")
    g.add_argument("--loss-chunk", type=int, default=1024,
                   help="tokens per log-prob chunk (memory: chunk x codebook fp32 logits)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute block activations in the backward pass")
    g = p.add_argument_group("rollouts")
    g.add_argument("--size", type=int, default=None,
                   help="image side; default: the visual tokenizer's resolution")
    sample.add_sampling_args(p)  # the rollouts' sampling settings
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the rollouts' dtype (auto: bfloat16 where the hardware computes it "
                   "natively); the policy and AdamW stay float32, the update runs under bf16 "
                   "autocast when the rollouts are bf16")
    jacobi.add_args(p)  # rollouts: the same distribution, fewer forwards
    p.add_argument("--seed", type=int, default=0,
                   help="captions and image seeds of step s derive from (seed, s)")
    p.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N steps and at the end; 0: end only")
    p.add_argument("--keep", type=int, default=1, help="checkpoints to keep; 0: all")
    g = p.add_argument_group("validation: keep the best policy (shapes-world models)")
    g.add_argument("--val-every", type=int, default=0, metavar="N",
                   help="every N steps, score the policy on shapes.py's validation prompts "
                   "(GenEval-nano at the checkpoint's own sampling settings, the same image seeds "
                   "each time) and at the last step, and keep the best so far in {out}/best; "
                   "0: off")
    g.add_argument("--val-n", type=int, default=4, help="images per validation prompt")
    p.add_argument("--resume", nargs="?", const="auto",
                   help="continue from a grpo.py checkpoint directory, or (no value / auto) from "
                   "{out}/latest when there is one")
    p.add_argument("--stop-after", type=int, default=0,
                   help="end this invocation after N steps with a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def parse_args(argv=None):
    """The flags, over the --preset's settings."""
    p = get_parser()
    preset = p.parse_known_args(argv)[0].preset
    p.set_defaults(**PRESETS[preset])
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------- captions
def draw_captions(rng, n, categories, exclude=frozenset()) -> list:
    """n (category, canonical caption) of shapes.sample_scene, categories drawn uniformly, no
    caption in exclude."""
    out = []
    for _ in range(1000 * n):
        if len(out) == n:
            return out
        category = categories[rng.integers(len(categories))]
        _, caption, _ = shapes.sample_scene(rng, category, lattice=0)
        if caption not in exclude:
            out.append((category, caption))
    raise ValueError(f"categories {categories} have almost no captions outside the excluded set")


def read_captions(path) -> list:
    """The captions of a prompts file: .json / .jsonl records with "caption" (a string, or a list
    whose first string is taken; SimpleAR's meta lists), or plain text, one per line. A byte-order
    mark is accepted. ValueError when none is usable."""
    if not os.path.isfile(path):
        hint = " (a count of captions is --prompts-per-step)" if path.isdigit() else ""
        raise FileNotFoundError(f"--prompts {path}: no such file{hint}")
    if path.endswith((".json", ".jsonl")):
        captions = []
        for rec in data.read_meta(path):
            c = rec.get("caption") if isinstance(rec, dict) else rec
            if isinstance(c, list):  # the first non-empty one
                c = next((x for x in c if isinstance(x, str) and x.strip()), None)
            if isinstance(c, str) and c.strip():
                captions.append(c.strip())
    else:
        captions = [line.strip() for line in data.read_text(path).splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"--prompts {path}: no usable caption (text lines, or JSON/JSONL records "
                         "with a non-empty 'caption')")
    return captions


def file_captions(captions, seed, step, k) -> list:
    """The k captions of a step from a prompts file: position step * k of the concatenated epochs,
    each epoch a permutation drawn from (seed, epoch); a function of the step alone, so a resumed
    run takes the same ones."""
    n = len(captions)
    orders = {}  # epoch -> its permutation, drawn once per call
    out = []
    for pos in range(step * k, (step + 1) * k):
        epoch = pos // n
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, 1, epoch]).permutation(n)
        out.append(captions[orders[epoch][pos % n]])
    return out


# ---------------------------------------------------------------------------------------- rewards
def geneval_reward(captions, images, parts=False) -> np.ndarray:
    """float [P, G]: 1.0 where image g of caption p passes GenEval-nano's rules for that caption,
    else 0.0; with parts, the fraction of the caption's parts it meets (shapes.credit)."""
    def one(caption, image):
        requirement, objects = shapes.parse_caption(caption), shapes.detect(image)
        if parts:
            return shapes.credit(requirement, objects)
        return float(shapes.score(requirement, objects)[0])
    return np.array([[one(c, img) for img in imgs]
                     for c, imgs in zip(captions, images, strict=True)])


def clip_reward(model, template="{}", preprocess="reference", scale=False, batch=8):
    """A reward function: the cosine of CLIP's L2-normalised image and text embeddings,
    x exp(logit_scale) if scale; text = template.format(caption); images uint8 [P, G, H, W, 3]
    -> float [P, G]. preprocess: clip.preprocess's mode ("simplear" resizes the decoded [-1, 1]
    image bilinearly, as SimpleAR's reward does; here from the uint8 image, 1/255 apart). Each
    caption is encoded once, images in batches of `batch`."""
    import clip

    device = next(model.parameters()).device

    @torch.no_grad()
    def reward(captions, images):
        P, G = images.shape[:2]
        ids = model.tokenizer([template.format(c) for c in captions]).to(device)
        text = F.normalize(model.encode_text(ids).float(), dim=-1)  # [P, D]
        flat = torch.from_numpy(np.ascontiguousarray(images)).flatten(0, 1)  # [P*G, H, W, 3]
        out = []
        for s in range(0, P * G, batch):
            x = flat[s:s + batch]  # [b, H, W, 3] uint8
            if preprocess == "simplear":  # back to the decoder's [-1, 1] range
                x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
            else:
                x = list(x.numpy())
            pixels = clip.preprocess(x, mode=preprocess, size=model.args.image_size)
            pixels = pixels.to(device, model.logit_scale.dtype)
            out.append(F.normalize(model.encode_image(pixels).float(), dim=-1))
        r = (torch.cat(out).view(P, G, -1) * text[:, None]).sum(-1)  # [P, G]
        return (r * model.logit_scale.exp().float() if scale else r).cpu().double().numpy()

    return reward


def load_clip(path, what, tokenizer=None, device="cpu"):
    """clip.load of --{what}-ckpt: a local path, or a hub id downloaded as sample.py downloads."""
    import clip
    if not path:
        raise ValueError(f"--reward {what} needs --{what}-ckpt")
    if not os.path.exists(path):
        path = sample.resolve_dir(path, f"--{what}-ckpt", clip.HUB_FILES)
    if tokenizer and not os.path.exists(tokenizer):
        tokenizer = sample.resolve_dir(tokenizer, "CLIP tokenizer", clip.HUB_FILES)
    kw = {"tokenizer": tokenizer} if tokenizer else {}
    return clip.load(path, device=device, **kw)


def hps_tokenizer(args):
    """HPSv2's checkpoint is weights alone: its tokenizer is CLIP-H's, from --hps-tokenizer or the
    --clip-ckpt directory."""
    tokenizer = args.hps_tokenizer or args.clip_ckpt
    if not tokenizer and args.hps_ckpt and os.path.isfile(args.hps_ckpt):
        raise ValueError(f"--hps-ckpt {args.hps_ckpt} holds no tokenizer: pass --hps-tokenizer "
                         "DIR (a CLIP-H directory, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K) "
                         "or --clip-ckpt DIR")
    return tokenizer


# name -> f(args, device) -> reward function; each loads what it needs
REWARDS = {
    "geneval-nano": lambda args, device: geneval_reward,
    "geneval-nano-parts": lambda args, device: functools.partial(geneval_reward, parts=True),
    "clip": lambda args, device: clip_reward(load_clip(args.clip_ckpt, "clip", device=device),
                                             template="A photo of {}", preprocess="simplear"),
    "pickscore": lambda args, device: clip_reward(load_clip(args.pickscore_ckpt, "pickscore",
                                                            device=device), scale=True),
    "hps": lambda args, device: clip_reward(load_clip(args.hps_ckpt, "hps", hps_tokenizer(args),
                                                      device=device)),
}


def parse_rewards(specs) -> dict:
    """{name: weight} of --reward's NAME[=W] items (ValueError naming a bad one)."""
    out = {}
    for spec in specs:
        name, _, w = spec.partition("=")
        if name not in REWARDS:
            raise ValueError(f"--reward: unknown {name!r}; expected one of {', '.join(REWARDS)}")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"--reward {spec}: the weight is not a number") from None
        if not math.isfinite(weight) or name in out:
            raise ValueError(f"--reward {spec}: a finite weight, each name once")
        out[name] = weight
    return out


def group_advantages(rewards) -> torch.Tensor:
    """TRL's: (r - group mean) / (group std + 1e-4), std unbiased; rewards [P, G] -> [P, G]."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).float()


# -------------------------------------------------------------------------------------- the loss
def token_logprobs(model, batch, vocab, chunk=1024, guided=None):
    """log p of every target token (labels != -100) over the vocab rows [lo, hi): ([N] fp32,
    [B, T-1] mask). The head runs on target positions only, in chunks of `chunk` tokens whose
    logits are recomputed in the backward pass (memory: one chunk x codebook of fp32 logits).
    guided: None for the conditional branch, or (negative batch, Sampling) for the guided
    distribution: the negative prompt's sequences of the same codes, combined as the sampler does
    (sample.cfg_combine, then the temperature)."""
    def hidden(b):
        y = b["labels"][:, 1:]
        keep = y != -100
        return model.hidden(b["input_ids"])[:, :-1][keep], y[keep] - vocab[0], keep

    h, y, keep = hidden(batch)  # [N, D]: position t predicts token t+1
    hu = hidden(guided[0])[0] if guided else None

    def logp(h, y, hu=None):
        scores = model.logits(h, vocab)  # [n, K] fp32
        if hu is not None:
            s = guided[1]
            scores = sample.cfg_combine(scores, model.logits(hu, vocab), s.guidance_scale)
            scores = scores / s.temperature
        return scores.log_softmax(-1).gather(1, y[:, None])[:, 0]

    out = []
    for s in range(0, len(y), chunk):
        part = (h[s:s + chunk], y[s:s + chunk]) + ((hu[s:s + chunk],) if guided else ())
        recompute = torch.is_grad_enabled() and len(y) > chunk
        out.append(checkpoint(logp, *part, use_reentrant=False) if recompute else logp(*part))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32), keep


def grpo_loss(logp, adv, ref_logp=None, beta=0.0):
    """Summed per-token GRPO objective (mu = 1): -A * exp(logp - sg(logp)) + beta * k3; logp, adv,
    ref_logp [N]."""
    loss = -(adv * torch.exp(logp - logp.detach())).sum()
    if beta and ref_logp is not None:
        d = ref_logp - logp
        loss = loss + beta * (torch.exp(d) - d - 1).sum()
    return loss


def negative_sequence(negative_ids, codes, first_id):
    """(input_ids, labels) of the negative prompt's ids followed by the image tokens, targets the
    image tokens only."""
    image = data.codes_to_tokens(torch.as_tensor(codes).long(), first_id).flatten()
    ids = torch.cat([torch.tensor(negative_ids), image])
    labels = ids.clone()
    labels[:len(negative_ids)] = -100
    return ids, labels


def policy_step(model, ref, opt, tok, captions, codes, adv, first_id, codebook_size, beta,
                micro_batch, grad_clip, jobs=None, world=1, chunk=1024, guided=None,
                autocast=None):
    """Accumulate the loss over micro-batches of (caption, codes [P, G, h, w], adv [P, G]); one
    optimizer step. jobs: the (p, g) this rank forwards (default: all). The loss is normalised by
    every image token of the rollout, TRL's token mean, whether forwarded or not, so under torchrun
    the ranks' summed gradients are the 1-process gradient. guided: (negative prompt ids, Sampling)
    to differentiate the guided distribution. Returns (gradient norm before clipping, mean k3 over
    the forwarded tokens or None, sequences forwarded), the last two over all ranks. (The loss
    itself is no news: with mu = 1 its policy part is -sum(A) / n = 0 whatever the weights.)"""
    P, G = adv.shape
    if jobs is None:
        jobs = [(p, g) for p in range(P) for g in range(G)]
    jobs = [(p, g) for p, g in jobs if beta or adv[p, g] != 0]
    n_targets = P * G * codes[0, 0].numel()
    vocab = (first_id, first_id + codebook_size)
    pad = data.pad_token_id(tok)
    device = next(model.parameters()).device
    autocast = autocast or torch.autocast(device.type, enabled=False)
    stats = torch.zeros(3, dtype=torch.float64)  # k3 sum, its tokens, sequences
    model.train()
    for s in range(0, len(jobs), micro_batch):
        chunk_jobs = jobs[s:s + micro_batch]
        batch = data.collate([data.make_sequence(tok, captions[p], codes[p, g], first_id,
                                                 text_loss=False)
                              for p, g in chunk_jobs], pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        neg = None
        if guided:
            neg = data.collate([negative_sequence(guided[0], codes[p, g], first_id)
                                for p, g in chunk_jobs], pad)
            neg = ({k: v.to(device) for k, v in neg.items()}, guided[1])
        with autocast:
            logp, keep = token_logprobs(model, batch, vocab, chunk, neg)
        # each token its image's A
        a = torch.stack([adv[p, g] for p, g in chunk_jobs]).to(device)[:, None]
        a = a.expand_as(keep)[keep]
        ref_logp = None
        if beta:
            with torch.no_grad(), autocast:
                ref_logp, _ = token_logprobs(ref, batch, vocab, chunk, neg)
            d = (ref_logp - logp).detach()
            stats[0] += (torch.exp(d) - d - 1).sum().item()
            stats[1] += len(d)
        stats[2] += len(chunk_jobs)
        (grpo_loss(logp, a, ref_logp, beta) / n_targets).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    if world > 1:  # DDP's all-reduce: the sum of the ranks' shares is the whole gradient
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        dist.all_reduce(stats)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    kl = stats[0].item() / stats[1].item() if stats[1] else None
    return norm.item(), kl, int(stats[2])


# -------------------------------------------------------------------------------------- the loop
def shares(n, world) -> list:
    """Contiguous [start, end) slices of range(n) for each rank, sizes differing by at most 1."""
    bounds = [round(r * n / world) for r in range(world + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def gather_rewards(local, world, G) -> np.ndarray:
    """[P, G] of every rank's [P_r, G] rewards, in rank order (= caption order)."""
    if world == 1:
        return local
    parts = [None] * world
    dist.all_gather_object(parts, local)
    return np.concatenate([np.asarray(x).reshape(-1, G) for x in parts])


def check_flags(args):
    for name in ("steps", "prompts_per_step", "micro_batch", "loss_chunk", "val_n"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group < 2:
        raise ValueError(f"--group must be >= 2 (an advantage compares images of one caption), "
                         f"got {args.group}")
    for name in ("lr", "beta", "warmup_steps", "grad_clip", "val_every"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.warmup_ratio < 1 or not 0 <= args.min_lr_ratio <= 1:
        raise ValueError("--warmup-ratio must be in [0, 1) and --min-lr-ratio in [0, 1]")
    for c in args.categories:
        if c not in shapes.CATEGORIES:
            raise ValueError(f"--categories: unknown {c!r}; expected some of {shapes.DRAWABLE}")
        if c not in shapes.DRAWABLE and not args.prompts:  # with --prompts, captions are the file's
            raise ValueError(f"--categories: no caption RL may draw in {c!r}; expected some of "
                             f"{shapes.DRAWABLE}")


def update_autocast(dtype, device):
    """The update's autocast: bf16 where the rollouts run in bf16 (a GPU, a CPU computing it
    natively; the weights and AdamW stay float32), none otherwise."""
    bf16 = dtype == torch.bfloat16
    return torch.autocast(device.type, dtype=torch.bfloat16 if bf16 else None, enabled=bf16)


# what a resumed run must share with the checkpoint's to continue it exactly
# (not --steps: a run may be extended, as train.py's; nor the world size: ranks change nothing)
RUN_ARGS = ("prompts", "prompts_per_step", "group", "categories", "reward", "seed", "lr",
            "schedule", "warmup_steps", "warmup_ratio", "min_lr_ratio", "beta", "logprob", "size",
            "grad_clip", "val_every", "val_n")


def check_resume(args, state, resume, captions_file):
    """ValueError naming what differs between this run and the one the checkpoint continues."""
    old = state.get("args", {})
    diff = [f"--{k.replace('_', '-')} {getattr(args, k)!r} here, {old[k]!r} there"
            for k in RUN_ARGS if k in old and old[k] != getattr(args, k)]
    n = state.get("prompts", {}).get("count")
    if captions_file and n is not None and n != len(captions_file):
        diff.append(f"--prompts {args.prompts} holds {len(captions_file)} captions, {n} there")
    if diff:
        raise ValueError(f"--resume {resume}: this run differs from the checkpoint's "
                         f"({'; '.join(diff)}); resume with its settings, or start anew")


def check_guided(settings, K):
    """The guided log-prob is the sampler's distribution only without the per-position filters."""
    filtered = settings.top_k is not None and settings.top_k < K
    if filtered or settings.top_p < 1 or settings.repetition_penalty != 1:
        raise ValueError("--logprob guided differentiates log_softmax(guided scores / T): it needs "
                         "no top-k below the codebook, --top-p 1 and --repetition-penalty 1, got "
                         f"top-k {settings.top_k}, top-p {settings.top_p}, repetition penalty "
                         f"{settings.repetition_penalty}")


# the validation's image seeds: image j of a prompt draws from VAL_SEED + j, apart from eval.py's
# (0 + j by default), so that its reports never score the images a policy was chosen on
VAL_SEED = 1_000_000


def validate(roller, tok, vq, prompts, size, n, settings, batch_size, speculative) -> dict:
    """shapes.evaluate's GenEval-nano report of n images per validation prompt from the policy."""
    samples = sample.text_to_image(roller, tok, vq, [p["caption"] for p in prompts], size, n,
                                   VAL_SEED, settings, batch_size=batch_size, progress=False,
                                   jacobi=speculative)
    return shapes.evaluate(prompts, samples.images)


def run(args):
    """grpo() in this process: one of torchrun's ranks (it sets RANK) or the only one."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        device = train.pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        grpo(args, rank, world, device)
    except (ValueError, FileNotFoundError) as e:
        if world == 1 or isinstance(e, train.AllRanks):
            raise
        raise type(e)(f"rank {rank}: {e}") from None


def grpo(args, rank, world, device):
    """The set-up, where every check runs before step 1 on every rank, then the loop."""
    master = rank == 0

    # set-up: flags, checkpoints, rewards, captions, the rollouts' request; bad input on any rank
    # stops all of them here, reported once, before anything is written
    with train.ranks_agree(rank, world):
        check_flags(args)
        weights = parse_rewards(args.reward)
        flags = sample.sampling_flags(args)
        speculative = jacobi.from_args(args)
        sample.check_default_model(args.ckpt, args.vq)
        resume = train.find_resume(args)  # train.py's --resume: the same checkpoints, same rule
        model, tok, vq, ckpt = sample.load(resume or args.ckpt, args.vq, device=device,
                                           dtype=torch.float32, decoding=False)
        aux = train.read_aux(ckpt)
        settings = sample.Sampling.from_checkpoint(ckpt, **flags)
        size = args.size or vq.config.resolution
        first_id = data.first_image_id(model.args.vocab_size, vq.codebook_size,
                                       tok.get_vocab_size())
        vocab = (first_id, first_id + vq.codebook_size)
        if args.logprob == "guided":
            check_guided(settings, vq.codebook_size)
        captions_file = read_captions(args.prompts) if args.prompts else None
        judged = [n for n in weights if n.startswith("geneval-nano")]
        if captions_file and judged:
            for c in captions_file:
                try:
                    shapes.parse_caption(c)
                except ValueError:
                    raise ValueError(f"--prompts {args.prompts}: {c!r} is not a shapes-world "
                                     f"caption, which --reward {judged[0]} needs") from None
        state = None
        if resume:
            state = torch.load(os.path.join(resume, "trainer.pt"), map_location="cpu",
                               weights_only=False)
            check_resume(args, state, resume, captions_file)
        dtype, warning = resolve_dtype(args.dtype, device)
        if warning:
            warn(PROG, warning)
        # the rollouts' request, checked before anything is written: the size, the positions
        P, G = args.prompts_per_step, args.group
        sample.check_request(["x"], size, G, P * G, 0, vq.spatial_compression)
        exclude = shapes.held_out()
        probe = captions_file or [c for _, c in draw_captions(np.random.default_rng([args.seed, 0]),
                                                              P, args.categories, exclude)]
        # validation: what eval.py would report, at the checkpoint's own settings
        val_prompts = shapes.prompt_set(split="validation") if args.val_every else []
        val_settings = sample.Sampling.from_checkpoint(ckpt)
        if val_prompts:
            sample.check_request(["x"], size, args.val_n, P * G, VAL_SEED, vq.spatial_compression)
        probe = probe + [p["caption"] for p in val_prompts]
        ids = data.encode_prompts(tok, [max(probe, key=len)])  # the longest prompt
        negative = data.encode_negative(tok, settings.negative_prompt)
        side = size // vq.spatial_compression
        sample.check_generation(model, ids, negative, first_id, vq.codebook_size, side * side,
                                range(1), settings)
        rewards_fn = {name: REWARDS[name](args, device) for name in weights}
        ref = None
        if args.beta:
            start = sample.resolve_dir(args.ckpt, "checkpoint", sample.CKPT_FILES)
            ref = Transformer.from_pretrained(start, device=device).eval()
            ref.requires_grad_(False)
        if master:
            train.make_out_dir(args.out)

    # rollouts in the fast dtype run on a copy of the policy, refreshed before every rollout
    roller = copy.deepcopy(model).to(dtype).eval() if dtype != torch.float32 else model
    vq = vq.to(dtype)
    model.gradient_checkpointing = args.grad_checkpointing
    autocast = update_autocast(dtype, device)
    guided = (negative, settings) if args.logprob == "guided" else None
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * args.steps)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: train.lr_factor(s, args.schedule, warmup, args.steps, args.min_lr_ratio))
    step, best = 0, None  # best: the step and report of the best validation so far
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, best = state["step"], state.get("best")
    # {out}/best must be this run's: another run's, or one from steps a resumed run replays, goes
    best_dir = os.path.join(args.out, "best")
    kept = os.path.join(best_dir, "validation.json")
    if master and os.path.isdir(best_dir):
        ours = best is not None and os.path.isfile(kept) and json.loads(
            Path(kept).read_text(encoding="utf-8"))["step"] == best["step"]
        if not ours:
            warn(PROG, f"removing {best_dir}: not this run's best")
            shutil.rmtree(best_dir)
            best = None

    def refresh():  # the rollout copy takes the policy's weights
        model.eval()
        if roller is not model:
            roller.load_state_dict(model.state_dict())
            roller.prepare_decoding(vocab)
    lo, hi = shares(P, world)[rank]
    log = open(os.path.join(args.out, "log.jsonl"), "a", encoding="utf-8") if master else None
    end = min(args.steps, step + args.stop_after) if args.stop_after else args.steps
    bar = tqdm(total=args.steps, initial=step, disable=not master or args.no_progress,
               dynamic_ncols=True)
    while step < end:
        t0 = time.perf_counter()

        # this step's captions (the same on every rank) and image seeds: functions of the step
        rng = np.random.default_rng([args.seed, step])
        if captions_file:
            captions = file_captions(captions_file, args.seed, step, P)
            categories = None
        else:
            categories, captions = map(list, zip(*draw_captions(rng, P, args.categories,
                                                                exclude)))
        base = int(rng.integers(2**31))
        seeds = [base + p * G for p in range(P)]  # image g of caption p: base + p * G + g

        # rollouts of this rank's captions, decoded and scored; every rank gets all rewards
        refresh()
        rollout = sample.text_to_image(roller, tok, vq, captions[lo:hi], size, G, seeds[lo:hi],
                                       settings, batch_size=(hi - lo) * G, progress=False,
                                       jacobi=speculative) if hi > lo else None
        t1 = time.perf_counter()
        parts, rewards = {}, 0.0
        for name, fn in rewards_fn.items():
            local = fn(captions[lo:hi], rollout.images) if rollout else np.zeros((0, G))
            parts[name] = gather_rewards(np.asarray(local, dtype=np.float64), world, G)
            rewards = rewards + weights[name] * parts[name]  # [P, G]
        adv = group_advantages(rewards)
        t2 = time.perf_counter()

        # the update: this rank's sequences, all ranks' gradients
        codes = torch.zeros(P, G, side, side, dtype=torch.long)
        if rollout:
            codes[lo:hi] = rollout.codes
        jobs = [(p, g) for p in range(lo, hi) for g in range(G)]
        lr = opt.param_groups[0]["lr"]
        grad_norm, kl, n_seq = policy_step(model, ref, opt, tok, captions, codes, adv, first_id,
                                           vq.codebook_size, args.beta, args.micro_batch,
                                           args.grad_clip, jobs, world, args.loss_chunk, guided,
                                           autocast)
        sched.step()
        step += 1

        # the log (rank 0): rewards overall, per reward and per caption kind
        record = dict(step=step, reward=round(float(rewards.mean()), 4),
                      grad_norm=round(grad_norm, 4), lr=lr,
                      informative=round(float((rewards.std(1) > 0).mean()), 3), forwarded=n_seq,
                      rollout_s=round(t1 - t0, 2), reward_s=round(t2 - t1, 2),
                      update_s=round(time.perf_counter() - t2, 2))
        if len(parts) > 1:
            record["rewards"] = {k: round(float(v.mean()), 4) for k, v in parts.items()}
        if kl is not None:
            record["kl"] = round(kl, 6)
        if categories:
            record["categories"] = {}
            # which kinds of caption the model gets right, step by step (the mean reward:
            # with geneval-nano-parts, the mean credit)
            for c in dict.fromkeys(args.categories):
                hits = [rewards[i].mean() for i, k in enumerate(categories) if k == c]
                if hits:
                    record["categories"][c] = round(float(np.mean(hits)), 3)

        # validation (rank 0): RL's reward can collapse late in a run (recipes/nano.md), so the
        # best policy so far is kept aside, chosen on prompts RL never draws
        if args.val_every and (step % args.val_every == 0 or step == args.steps) and master:
            refresh()
            report = validate(roller, tok, vq, val_prompts, size, args.val_n, val_settings, P * G,
                              speculative)
            record["validation"] = round(report["overall"], 4)
            if best is None or report["overall"] > best["overall"]:
                best = dict(step=step, overall=report["overall"],
                            categories={k: v["accuracy"] for k, v in report["categories"].items()})
                text = json.dumps(dict(best, val_n=args.val_n, seed=VAL_SEED), indent=1) + "\n"
                train.save_model_dir(best_dir, model, tok, aux,
                                     lambda d: Path(d, "validation.json").write_text(text))
            bar.write(f"step {step}: validation {report['overall']:.3f}, the best "
                      f"{best['overall']:.3f} at step {best['step']}")

        if master:
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{kl or 0:.4f}")
            bar.update(1)

        # checkpoint: rank 0 writes, nobody runs ahead (or exits) meanwhile
        if step == end or (args.save_every and step % args.save_every == 0):
            if master:
                trainer = dict(step=step, optimizer=opt.state_dict(),
                               scheduler=sched.state_dict(), args=vars(args), world_size=world,
                               best=best,
                               prompts=dict(file=args.prompts, position=step * P,
                                            count=len(captions_file) if captions_file else None))
                path = train.save_checkpoint(args.out, step, model, tok, aux, trainer, args.keep)
                bar.write(f"step {step}: saved {path}")
            if world > 1:
                dist.barrier()
    bar.close()
    if log:
        log.close()


def main(argv=None):
    args = parse_args(argv)
    try:
        run_main(PROG, run, args)
    finally:  # after the error is printed: the reason comes before the other ranks' reactions
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

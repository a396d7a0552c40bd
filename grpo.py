"""GRPO: the LM learns from its own samples, scored by a reward (SimpleAR's third stage, after
pretraining and SFT).

    # the nano recipe's stage 5, from an LM checkpoint with its generation_config.json (the
    # rollouts' settings)
    python grpo.py --ckpt runs/nano/lm/step_0006000 --vq runs/nano/vq --out runs/grpo --steps 100 \\
        --prompts 16 --group 8 --lr 1e-4 --beta 0
    python eval.py --ckpt runs/grpo/step_0000100 --vq checkpoints/nano/vq --n 4 \\
        --out out/geneval-grpo
    python grpo.py ... --resume          # continues from {out}/latest, exactly
    python -m pytest -q tests/test_grpo.py

One step (DeepSeekMath's GRPO, arXiv 2402.03300, as TRL's GRPOTrainer ran it for SimpleAR:
wdrink/SimpleAR, simpar/train/llava_trainer_grpo.py):
  1. draw --prompts captions; sample --group images of each with sample.py, at the checkpoint's own
     sampling settings (guidance and top-k included: the sampler people use is the one we improve;
     T2I-R1 does the same), on a copy of the float32 policy in the dtype --dtype picks (bf16 where
     the hardware computes it natively, as vLLM rollouts are: off-policy by that rounding only),
     with --jacobi if asked (the same distribution, fewer forwards);
  2. score each image; advantage = (reward - mean of its group) / (std of its group + 1e-4);
  3. one gradient step on  mean over image tokens of  -A * exp(logp - sg(logp))
     + beta * k3(ref, logp). There is one update per rollout (TRL's mu = 1): the ratio is exactly
     1, so PPO's clipping never acts and only its gradient, A * grad logp, remains.
     k3 = exp(ref - logp) - (ref - logp) - 1 pulls towards the starting weights. logp is the
     conditional branch's log-probability over the image rows (the sampler never leaves them), as
     SimpleAR and T2I-R1 take it; the guided distribution that drew the sample is not
     differentiated.
A group whose images all score alike has zero advantage; with beta = 0 its sequences are not even
forwarded.

The reward: SimpleAR's is CLIP similarity (open_clip ViT-H-14), which is not a run-time dependency
here. What exists is the shapes world's own judge, eval.py's GenEval-nano detector: 1 when the image
shows what the caption asks (objects, colours, counts, relation), else 0. This is Flow-GRPO's
rule-based GenEval reward (0.63 -> 0.95 for SD3.5-M) at laptop scale. It is the judge GenEval-nano
scores with, so the captions drawn here never include the benchmark's own (eval.prompt_set()): the
model is rewarded on the grammar, not on the test prompts.

Checkpoints are train.py's (Hugging Face directories plus trainer.pt, `latest` names the newest);
each carries the starting checkpoint's generation_config.json, so sample.py and eval.py use the same
settings on it. Every step's randomness (captions, image seeds) derives from (--seed, step), so a
resumed run repeats the uninterrupted one.
"""
import argparse
import copy
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import eval as geneval
import jacobi
import sample
from cli import Parser, run_main
import train
from model import Transformer


def get_parser():
    p = Parser(prog="grpo.py",
               description="GRPO of a SimpleAR checkpoint with the GenEval-nano reward",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=sample.DEFAULT_CKPT,
                   help="starting LM checkpoint (and the KL reference)")
    p.add_argument("--vq", default=sample.DEFAULT_VQ,
                   help="visual tokenizer that decodes the rollouts for the reward")
    p.add_argument("--out", default="runs/grpo", help="checkpoint and log directory")
    p.add_argument("--steps", type=int, default=400,
                   help="optimizer steps (SimpleAR's README curve: ~400)")
    p.add_argument("--prompts", type=int, default=7,
                   help="captions per step (SimpleAR: 7, one per trainer GPU)")
    p.add_argument("--group", type=int, default=4,
                   help="images per caption, the group of the advantage (SimpleAR: 4)")
    p.add_argument("--categories", nargs="+", default=list(data.CATEGORIES),
                   help="caption kinds, drawn uniformly from the list: repeat one to draw it more "
                   "often")
    p.add_argument("--lr", type=float, default=1e-6,
                   help="AdamW learning rate, constant after the warmup (SimpleAR: 1e-6, cosine)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup from 0")
    p.add_argument("--beta", type=float, default=0.04,
                   help="weight of the k3 KL to the starting model; 0: no reference")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="max global gradient norm; 0: off")
    p.add_argument("--micro-batch", type=int, default=64,
                   help="sequences per forward/backward pass (memory only)")
    p.add_argument("--size", type=int, default=None,
                   help="image side; default: the visual tokenizer's resolution")
    sample.add_sampling_args(p)  # the rollouts' sampling settings
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the rollouts' dtype (auto: bfloat16 where the hardware computes it "
                   "natively); the policy and its update stay float32")
    jacobi.add_args(p)  # rollouts: the same distribution, fewer forwards
    p.add_argument("--seed", type=int, default=0,
                   help="captions and image seeds of step s derive from (seed, s)")
    p.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N steps and at the end; 0: end only")
    p.add_argument("--keep", type=int, default=1, help="checkpoints to keep; 0: all")
    p.add_argument("--resume", nargs="?", const="auto",
                   help="continue from a grpo.py checkpoint directory, or (no value / auto) from "
                   "{out}/latest when there is one")
    p.add_argument("--stop-after", type=int, default=0,
                   help="end this invocation after N steps with a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


# ---------------------------------------------------------------------------- prompts and reward
def draw_captions(rng, n, categories, exclude=frozenset()) -> list:
    """n (category, canonical caption) of data.sample_scene, categories drawn uniformly, no caption
    in exclude."""
    out = []
    for _ in range(1000 * n):
        if len(out) == n:
            return out
        category = categories[rng.integers(len(categories))]
        _, caption, _ = data.sample_scene(rng, category, lattice=0)
        if caption not in exclude:
            out.append((category, caption))
    raise ValueError(f"categories {categories} have almost no captions outside the excluded set")


def geneval_reward(captions, images) -> np.ndarray:
    """float [P, G]: 1.0 where image g of caption p passes GenEval-nano's rules for that caption,
    else 0.0."""
    return np.array([[float(geneval.score(geneval.parse_caption(c), geneval.detect(img))[0])
                      for img in imgs]
                     for c, imgs in zip(captions, images, strict=True)])


def group_advantages(rewards) -> torch.Tensor:
    """TRL's: (r - group mean) / (group std + 1e-4), std unbiased; rewards [P, G] -> [P, G]."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).float()


# -------------------------------------------------------------------------------------- the loss
def token_logprobs(model, ids, labels, vocab):
    """log p of every target token (labels != -100) under model, over the vocab rows [lo, hi) only:
    ([N], [B, T-1] mask)."""
    h = model.hidden(ids)[:, :-1]  # [B, T-1, D]: position t predicts token t+1
    y = labels[:, 1:]
    keep = y != -100
    logits = model.logits(h[keep], vocab)  # [N, K] fp32
    return logits.log_softmax(-1).gather(1, (y[keep] - vocab[0])[:, None])[:, 0], keep


def grpo_loss(logp, adv, ref_logp=None, beta=0.0):
    """Summed per-token GRPO objective (mu = 1): -A * exp(logp - sg(logp)) + beta * k3; logp, adv,
    ref_logp [N]."""
    loss = -(adv * torch.exp(logp - logp.detach())).sum()
    if beta and ref_logp is not None:
        d = ref_logp - logp
        loss = loss + beta * (torch.exp(d) - d - 1).sum()
    return loss


def policy_step(model, ref, opt, tok, captions, codes, adv, first_id, codebook_size, beta,
                micro_batch, grad_clip):
    """Accumulate the loss over micro-batches of (caption, codes [P, G, h, w], adv [P, G]); one
    optimizer step. The loss is normalised by every image token of the rollout, TRL's token mean,
    whether forwarded or not. Returns (gradient norm before clipping, mean k3 over the forwarded
    tokens or None, sequences forwarded). (The loss itself is no news: with mu = 1 its policy part
    is -sum(A) / n = 0 whatever the weights.)"""
    P, G = adv.shape
    jobs = [(p, g) for p in range(P) for g in range(G) if beta or adv[p, g] != 0]
    n_targets = P * G * codes[0, 0].numel()
    vocab = (first_id, first_id + codebook_size)
    pad = data.pad_token_id(tok)
    kl_sum, kl_n = 0.0, 0
    model.train()
    for s in range(0, len(jobs), micro_batch):
        chunk = jobs[s:s + micro_batch]
        batch = data.collate([data.make_sequence(tok, captions[p], codes[p, g], first_id,
                                                 text_loss=False)
                              for p, g in chunk], pad)
        ids, labels = batch["input_ids"], batch["labels"]
        logp, keep = token_logprobs(model, ids, labels, vocab)
        # each token its image's A
        a = torch.stack([adv[p, g] for p, g in chunk])[:, None].expand_as(keep)[keep]
        ref_logp = None
        if beta:
            with torch.no_grad():
                ref_logp, _ = token_logprobs(ref, ids, labels, vocab)
            d = (ref_logp - logp).detach()
            kl_sum, kl_n = kl_sum + (torch.exp(d) - d - 1).sum().item(), kl_n + len(d)
        (grpo_loss(logp, a, ref_logp, beta) / n_targets).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                          grad_clip if grad_clip > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm.item(), (kl_sum / kl_n if kl_n else None), len(jobs)


# -------------------------------------------------------------------------------------- the loop
def run(args):
    for name in ("steps", "prompts", "micro_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group < 2:
        raise ValueError(f"--group must be >= 2 (an advantage compares images of one caption), "
                         f"got {args.group}")
    for c in args.categories:
        if c not in data.CATEGORIES:
            raise ValueError(f"--categories: unknown {c!r}; expected some of {data.CATEGORIES}")
    flags = sample.sampling_flags(args)
    speculative = jacobi.from_args(args)
    sample.check_default_model(args.ckpt, args.vq)
    resume = train.find_resume(args)  # train.py's --resume: the same checkpoints, the same rule
    model, tok, vq, ckpt = sample.load(resume or args.ckpt, args.vq, dtype=torch.float32,
                                       decoding=False)
    aux = train.read_aux(ckpt)
    ref = (Transformer.from_pretrained(args.ckpt).eval().requires_grad_(False) if args.beta
           else None)
    settings = sample.Sampling.from_checkpoint(ckpt, **flags)
    size = args.size or vq.config.resolution
    first_id = data.first_image_id(model.args.vocab_size, vq.codebook_size, tok.get_vocab_size())
    vocab = (first_id, first_id + vq.codebook_size)
    dtype = sample.runtime_dtype(args, "grpo.py")
    # rollouts in the fast dtype run on a copy of the policy, refreshed before every rollout
    roller = copy.deepcopy(model).to(dtype).eval() if dtype != torch.float32 else model
    vq = vq.to(dtype)
    exclude = frozenset(p["caption"] for p in geneval.prompt_set())
    # the rollouts' request, checked before anything is written: the size, the positions
    sample.check_request(["x"], size, args.group, args.prompts * args.group, 0,
                         vq.spatial_compression)
    first = draw_captions(np.random.default_rng([args.seed, 0]), args.prompts, args.categories,
                          exclude)
    ids = data.encode_prompts(tok, [caption for _, caption in first])
    negative = data.encode_negative(tok, settings.negative_prompt)
    side = size // vq.spatial_compression
    counts = range(len(ids))  # one seed per image, for the checks
    sample.check_generation(model, ids, negative, first_id, vq.codebook_size, side * side, counts,
                            settings)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt,
                                              lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
    step = 0
    if resume:
        state = torch.load(os.path.join(resume, "trainer.pt"), map_location="cpu",
                           weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "log.jsonl"), "a")
    end = min(args.steps, step + args.stop_after) if args.stop_after else args.steps
    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress, dynamic_ncols=True)
    while step < end:
        t0 = time.perf_counter()
        rng = np.random.default_rng([args.seed, step])
        categories, captions = map(list, zip(*draw_captions(rng, args.prompts, args.categories,
                                                            exclude)))
        model.eval()
        if roller is not model:
            roller.load_state_dict(model.state_dict())
            roller.prepare_decoding(vocab)
        rollout = sample.text_to_image(roller, tok, vq, captions, size, args.group,
                                       int(rng.integers(2**31)), settings,
                                       batch_size=args.prompts * args.group, progress=False,
                                       jacobi=speculative)
        rewards = geneval_reward(captions, rollout.images)
        adv = group_advantages(rewards)
        t1 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        grad_norm, kl, n_seq = policy_step(model, ref, opt, tok, captions, rollout.codes, adv,
                                           first_id, vq.codebook_size, args.beta,
                                           args.micro_batch, args.grad_clip)
        sched.step()
        step += 1
        record = dict(step=step, reward=round(float(rewards.mean()), 4),
                      grad_norm=round(grad_norm, 4), lr=lr,
                      informative=round(float((rewards.std(1) > 0).mean()), 3), forwarded=n_seq,
                      rollout_s=round(t1 - t0, 2), update_s=round(time.perf_counter() - t1, 2))
        if kl is not None:
            record["kl"] = round(kl, 6)
        record["categories"] = {}
        # which kinds of caption the model gets right, step by step
        for c in dict.fromkeys(args.categories):
            hits = [rewards[i].mean() for i, k in enumerate(categories) if k == c]
            if hits:
                record["categories"][c] = round(float(np.mean(hits)), 3)
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{kl or 0:.4f}")
        bar.update(1)
        if step == end or (args.save_every and step % args.save_every == 0):
            state = dict(step=step, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                         args=vars(args))
            path = train.save_checkpoint(args.out, step, model, tok, aux, state, args.keep)
            bar.write(f"step {step}: saved {path}")
    bar.close()
    log.close()


def main(argv=None):
    run_main("grpo.py", run, get_parser().parse_args(argv))


if __name__ == "__main__":
    main()

"""Text-to-image sampling with SimpleAR checkpoints: guidance, filtering, the decode loop, the CLI.

    python sample.py --prompt "two red circles"     # the shipped nano model (checkpoints/nano), 64², CPU, offline
    python sample.py --prompt "a cat wearing a hat" --ckpt Daniel0724/SimpleAR-0.5B-RL \\
        --vq nvidia/Cosmos-1.0-Tokenizer-DV8x16x16 --out samples/      # 4 images at 1024², cfg 6
    python sample.py --prompts-file prompts.txt --ckpt DIR --vq DIR --size 512 --n 2 --grid --save-codes
    python -m pytest tests/test_sample.py

One step of SimpleAR's generation (its Hugging Face path, simplear.md section 3.1), per image:
conditional logits → repetition penalty (from generation_config.json) → log-softmax of both
branches → uncond + s·(cond − uncond) → temperature → top-k → top-p → multinomial. Two things
differ, both on purpose:

* Scores are computed for the image rows only (`model(..., vocab=(first_id, first_id + K))`), so
  a text token can never be sampled; SimpleAR samples over the whole vocabulary and clamps a
  sampled text id into a code. Up to the text tokens' share, the distribution is the same
  (see cfg_combine).
  Likewise, SimpleAR's top-k 64,000 over all 215,672 rows keeps a few text ids and drops as
  many codes; here top-k >= the codebook is no filter at all. Its top-p (1.0 by default) counts
  the text tokens' share; here it is over the codes alone. A sampled EOS cannot end an image early.
* Every image draws from its own torch.Generator, seeded from (seed, image index), so an image
  does not depend on which other prompts share its batch.

The conditional rows and the unconditional (negative prompt) rows run as one batch through the
fused KV cache of model.py: rows [cond_1..cond_N, uncond_1..uncond_N]. Each distinct prompt and
the negative prompt are prefilled once and copied into the rows that share them.
"""
import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cosmos_tokenizer import CosmosTokenizer, tensor_to_uint8
from data import (NEGATIVE_PROMPT, encode_negative, encode_prompts, first_image_id, load_text_tokenizer,
                  special_token_ids)
from model import Transformer

# The project's own small model (the nano recipe), used when no --ckpt/--vq is given: it runs on a CPU, offline.
DEFAULT_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "nano")
DEFAULT_VQ = os.path.join(DEFAULT_CKPT, "vq")


# ------------------------------------------------------------------------------------------------
# sampling primitives (jacobi.py and grpo.py reuse these; all act on the last dim, the image rows)

def check_sampling(cfg=6.0, temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0):
    """ValueError naming the first bad setting."""
    if not cfg >= 0:
        raise ValueError(f"guidance scale must be >= 0, got {cfg}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use top_k=1 for greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top-k must be >= 1, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top-p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition penalty must be > 0, got {repetition_penalty}")


def apply_repetition_penalty(logits, seen, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor over the image rows: logits [..., K] of the
    codes with seen [..., K] True are divided by `penalty` when positive, multiplied when negative.

    On the full vocabulary it would also hit the prompt's text ids, but those only change the
    branch's normalising constant, which leaves the distribution over codes as it is (cfg_combine),
    so the generated codes suffice.
    """
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def cfg_combine(cond, uncond, scale):
    """SimpleAR's guidance in log-probability space: lu + s·(lc − lu), lc/lu = log_softmax(cond/uncond).

    Normalising over the image rows instead of the whole vocabulary only shifts each branch's
    log-probs by a constant: the result is (1−s)·u + s·c − [(1−s)·lse(u) + s·lse(c)] and the
    bracket is the same for every token. Softmax, top-k and top-p over the image rows ignore a
    per-row constant (temperature only scales it), so sampling from these scores equals SimpleAR's
    full-vocabulary guidance with the text rows masked out and the rest renormalised.
    scale == 1 returns the conditional log-probs, as SimpleAR does.
    """
    lc = torch.log_softmax(cond, dim=-1)
    if scale == 1.0:
        return lc
    lu = torch.log_softmax(uncond, dim=-1)
    return lu + scale * (lc - lu)


def filter_logits(scores, temperature=1.0, top_k=None, top_p=1.0):
    """Temperature, then top-k, then top-p, as transformers' warpers do; removed entries are -inf.

    top_k None or >= K keeps all; ties with the k-th score are kept. top-p drops the low tail whose
    total probability is <= 1 - top_p, always keeping the best token.
    """
    scores = scores / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        low_first, order = torch.sort(scores, dim=-1)
        drop = low_first.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def guided_scores(cond, uncond, seen, cfg=6.0, temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0):
    """One step of SimpleAR's logits pipeline over the image rows: filtered scores [..., K] whose
    softmax is the sampling distribution. uncond may be None when cfg == 1."""
    cond = apply_repetition_penalty(cond, seen, repetition_penalty)
    return filter_logits(cfg_combine(cond, uncond, cfg), temperature, top_k, top_p)


def sample_from(scores, generators):
    """One draw per row of scores [B, K] with that row's own generator → LongTensor [B]."""
    probs = torch.softmax(scores, dim=-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def make_generators(seeds, device):
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


# ------------------------------------------------------------------------------------------------
# the decode loop

@torch.no_grad()
def generate(model, prompts, negative, first_id, codebook_size, n_tokens, seeds, cfg=6.0, temperature=1.0,
             top_k=None, top_p=1.0, repetition_penalty=1.0, compile=False, progress=True):
    """Sample n_tokens image codes for each of len(prompts) images → LongTensor [N, n_tokens].

    prompts: one token-id list per image, already templated (data.py); repeats share a prefill.
    negative: the negative prompt's ids (the unconditional branch); unused when cfg == 1.
    seeds: one per image; image i draws only from torch.Generator().manual_seed(seeds[i]), so the
    same (prompt, seed) gives the same codes whatever else is in the batch.
    Codes are in [0, codebook_size): token id = first_id + code. top_k None: no top-k; top_k=1: greedy.
    compile: torch.compile the one-token decode step (static shapes: attends over the whole cache).
    """
    check_sampling(cfg, temperature, top_k, top_p, repetition_penalty)
    N = len(prompts)
    if N == 0 or len(seeds) != N:
        raise ValueError(f"need one seed per prompt, got {N} prompts and {len(seeds)} seeds")
    if any(len(p) == 0 for p in prompts) or (cfg != 1.0 and not negative):
        raise ValueError("empty prompt token list")
    if first_id + codebook_size > model.args.vocab_size:
        raise ValueError(f"image rows [{first_id}, {first_id + codebook_size}) exceed the vocabulary "
                         f"({model.args.vocab_size})")
    guided = cfg != 1.0
    device = model.embed_tokens.weight.device
    vocab = (first_id, first_id + codebook_size)

    unique = list(dict.fromkeys(map(tuple, prompts)))
    prefill = [list(p) for p in unique] + ([list(negative)] if guided else [])
    src = [unique.index(tuple(p)) for p in prompts] + [len(unique)] * (N if guided else 0)
    T = max(map(len, prefill))
    S = T + n_tokens - 1
    if compile:  # a cache length that varies with the prompts would recompile the step for every batch
        S = -(-S // 256) * 256
    model.setup_cache(len(src), S)
    logits, _ = model.prefill(prefill, vocab=vocab)  # [len(prefill), K]
    model.cache.copy_rows(src, list(range(len(src))))
    logits = logits[src]
    step = torch.compile(model, dynamic=False) if compile else model

    generators = make_generators(seeds, device)
    seen = torch.zeros(N, codebook_size, dtype=torch.bool, device=device)
    codes = torch.empty(N, n_tokens, dtype=torch.long, device=device)
    for t in tqdm(range(n_tokens), desc="tokens", disable=not progress, leave=False):
        scores = guided_scores(logits[:N], logits[N:] if guided else None, seen, cfg, temperature, top_k, top_p,
                               repetition_penalty)
        codes[:, t] = sample_from(scores, generators)
        if t == n_tokens - 1:
            break
        seen[torch.arange(N, device=device), codes[:, t]] = True
        # the sampled code goes to its conditional row and to its unconditional row
        tok = (first_id + codes[:, t]).repeat(2 if guided else 1)[:, None]
        col = T + t
        logits = step(tok, input_pos=torch.tensor([col], device=device), vocab=vocab,
                      kv_len=None if compile else col + 1)[:, 0]
    model.cache = None  # frees the buffer; the next call sizes its own
    return codes


# ------------------------------------------------------------------------------------------------
# strings in, images out (eval.py and grpo.py call this)

@dataclass
class Samples:
    codes: torch.Tensor  # long [P, n, h, w]
    images: np.ndarray | None  # uint8 [P, n, H, W, 3]; None when decode=False
    lm_seconds: float
    decoder_seconds: float


def text_to_image(model, tokenizer, vq, prompts, size=1024, n=1, seed=0, negative_prompt=NEGATIVE_PROMPT,
                  batch_size=None, decode=True, compile=False, progress=True, **sampling) -> Samples:
    """n images for each prompt string with SimpleAR's template; image j of a prompt uses seed + j.

    vq: a CosmosTokenizer (or anything with codebook_size, spatial_compression and decode(codes [B, h, w]));
    it fixes the codebook, so the LM's vocabulary must end with its codebook_size image rows.
    batch_size: images per generate() call (default n: one prompt's images share its prefill).
    sampling: cfg, temperature, top_k, top_p, repetition_penalty of generate().
    """
    batch_size = batch_size or n
    check_request(prompts, size, n, batch_size, vq.spatial_compression)
    first_id = first_image_id(model.args.vocab_size, vq.codebook_size, tokenizer.get_vocab_size())
    special_token_ids(tokenizer)  # a tokenizer without <|t2i|>/<|soi|> would encode them as plain text
    side = size // vq.spatial_compression
    ids = encode_prompts(tokenizer, prompts)
    jobs = [(ids[p], seed + j) for p in range(len(prompts)) for j in range(n)]
    negative = encode_negative(tokenizer, negative_prompt)
    codes, images, lm_s, dec_s = [], [], 0.0, 0.0
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b:b + batch_size]
        t0 = time.perf_counter()
        c = generate(model, [p for p, _ in chunk], negative, first_id, vq.codebook_size, side * side,
                     [s for _, s in chunk], compile=compile, progress=progress, **sampling).view(-1, side, side)
        t1 = time.perf_counter()
        if decode:
            images.append(tensor_to_uint8(vq.decode(c)))
        lm_s, dec_s = lm_s + t1 - t0, dec_s + time.perf_counter() - t1
        codes.append(c.cpu())
    codes = torch.cat(codes).view(len(prompts), n, side, side)
    images = np.concatenate(images).reshape(len(prompts), n, size, size, 3) if decode else None
    return Samples(codes, images, lm_s, dec_s)


def check_request(prompts, size, n, batch_size, compression=16):
    if not prompts:
        raise ValueError("no prompt given")
    for p in prompts:
        if not p.strip():
            raise ValueError("empty prompt")
    if size <= 0 or size % compression:
        raise ValueError(f"size {size} is not a positive multiple of {compression}")
    if n < 1 or batch_size < 1:
        raise ValueError(f"n ({n}) and batch size ({batch_size}) must be >= 1")


# ------------------------------------------------------------------------------------------------
# loading

def resolve_dir(name, what, patterns):
    """A local directory as is; a Hugging Face repo id ("owner/name") is downloaded when huggingface_hub is
    installed. FileNotFoundError with what to do otherwise."""
    if os.path.isdir(name):
        return name
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(f"{what} directory not found: {name}")
    how = (f"get the files with `huggingface-cli download {name} --local-dir DIR` or "
           f"`git lfs clone https://huggingface.co/{name} DIR`, then pass DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{what} {name} is not a local directory and huggingface_hub is not installed "
                                f"(pip install huggingface_hub); or {how}") from None
    try:
        return snapshot_download(name, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, gated, ...: the hub's errors are many
        raise FileNotFoundError(f"{what} {name} is not a local directory and downloading it failed "
                                f"({type(e).__name__}); {how}") from None


def checkpoint_defaults(ckpt_dir) -> dict:
    """The sampling settings a checkpoint's generation_config.json asks for, else SimpleAR's defaults.

    repetition_penalty: SimpleAR's published numbers used the file's 1.1 (Qwen2.5-Instruct's); 1.0 without it.
    guidance_scale (transformers' name) and negative_prompt (ours): a model trained from scratch may want its
    own, e.g. the nano model, which saw only the dropped caption "<|t2i|><|soi|>" as its unconditional input.
    image_top_k (ours), not top_k: Qwen2.5-Instruct's file has top_k 20 for chat, which SimpleAR never applied.
    """
    path = os.path.join(ckpt_dir, "generation_config.json")
    gen = {}
    if os.path.isfile(path):
        with open(path) as f:
            gen = json.load(f)
    return dict(repetition_penalty=float(gen.get("repetition_penalty") or 1.0),
                cfg=6.0 if gen.get("guidance_scale") is None else float(gen["guidance_scale"]),
                negative_prompt=gen.get("negative_prompt", NEGATIVE_PROMPT),
                top_k=None if gen.get("image_top_k") is None else int(gen["image_top_k"]))


def load(ckpt, vq, device="cpu", dtype=torch.float32):
    """(model, tokenizer, visual tokenizer with its decoder only, checkpoint dir) from directories or hub ids."""
    ckpt = resolve_dir(ckpt, "checkpoint", ["*.json", "*.safetensors", "*.txt"])
    vq = resolve_dir(vq, "visual tokenizer", ["decoder.jit", "*.json", "model.safetensors"])
    tokenizer = load_text_tokenizer(ckpt)
    model = Transformer.from_pretrained(ckpt, dtype=dtype, device=device)
    vq = CosmosTokenizer.from_pretrained(vq, dtype=dtype, device=device, encoder=False, decoder=True)
    return model, tokenizer, vq, ckpt


# ------------------------------------------------------------------------------------------------
# command line

def check_default_model(ckpt, vq):
    """The shipped model's files, or a message naming the folder and the command that rebuilds it."""
    need = [(DEFAULT_CKPT, ("config.json", "model.safetensors", "tokenizer.json")),
            (DEFAULT_VQ, ("config.json", "model.safetensors"))]
    for (folder, files), given in zip(need, (ckpt, vq)):
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if given == folder and missing:
            raise FileNotFoundError(f"the default model in {folder} lacks {', '.join(missing)}: rebuild it with "
                                    "`bash recipes/nano.sh`, or pass --ckpt and --vq")


def slug(text, limit=60):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def write_atomic(path, save):
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"  # keeps the extension: np.save would append one
    save(tmp)
    os.replace(tmp, path)


def save_outputs(samples, prompts, seed, out, grid=False, save_codes=False):
    """PNG per image ({slug}_s{seed}_{j}.png), optional grid.png (a row per prompt) and .npy code grids."""
    os.makedirs(out, exist_ok=True)
    names, written = set(), []
    for p, prompt in enumerate(prompts):
        stem = slug(prompt)
        if stem in names:  # repeated prompts (or equal slugs) keep their own files
            stem = f"{stem}-{p}"
        names.add(stem)
        for j in range(samples.codes.shape[1]):
            path = os.path.join(out, f"{stem}_s{seed}_{j}")
            img = Image.fromarray(samples.images[p, j])
            write_atomic(path + ".png", img.save)
            if save_codes:
                codes = samples.codes[p, j].numpy().astype(np.int32)
                write_atomic(path + ".npy", lambda tmp: np.save(tmp, codes))
            written.append(path + ".png")
    if grid:
        rows = [np.concatenate(list(row), axis=1) for row in samples.images]  # [H, n*W, 3] per prompt
        img = Image.fromarray(np.concatenate(rows, axis=0))
        write_atomic(os.path.join(out, "grid.png"), img.save)
    return written


def read_prompts(args):
    prompts = list(args.prompt or [])
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise FileNotFoundError(f"prompts file not found: {args.prompts_file}")
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    return prompts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SimpleAR text-to-image: PNGs from prompts.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    p.add_argument("--prompts-file", help="a text file, one prompt per line")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="SimpleAR checkpoint: HF-format directory or hub id "
                   "(Daniel0724/SimpleAR-0.5B-RL, -0.5B-SFT, -1.5B-RL, -1.5B-SFT)")
    p.add_argument("--vq", default=DEFAULT_VQ, help="Cosmos tokenizer directory or hub id "
                   "(nvidia/Cosmos-1.0-Tokenizer-DV8x16x16)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels, a multiple of the tokenizer's "
                   "compression (default: the tokenizer's own resolution, 1024 for Cosmos DV8x16x16)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale s: uncond + s*(cond - uncond) in "
                   "log-probs (default: the checkpoint's generation_config.json guidance_scale, else 6.0)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None, help="1 = greedy; >= codebook size = off (default: the "
                   "checkpoint's generation_config.json image_top_k, else off)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="on already generated codes of the conditional logits (default: the checkpoint's "
                   "generation_config.json, 1.1 for SimpleAR's; else 1.0)")
    p.add_argument("--negative-prompt", default=None, help="text of the unconditional branch (default: the "
                   "checkpoint's generation_config.json negative_prompt, else SimpleAR's)")
    p.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed + j")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: --n)")
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--grid", action="store_true", help="also write grid.png (a row per prompt)")
    p.add_argument("--save-codes", action="store_true", help="also write each code grid as .npy [h, w] int32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    return p.parse_args(argv)


def run(args):
    prompts = read_prompts(args)
    check_request(prompts, 1 if args.size is None else args.size, args.n, args.batch_size or args.n,
                  compression=1)  # the size's multiple is checked once the tokenizer is loaded
    check_sampling(6.0 if args.cfg is None else args.cfg, args.temperature, args.top_k, args.top_p,
                   args.repetition_penalty or 1.0)
    check_default_model(args.ckpt, args.vq)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model, tokenizer, vq, ckpt = load(args.ckpt, args.vq, args.device, dtype)
    given = dict(repetition_penalty=args.repetition_penalty, cfg=args.cfg, negative_prompt=args.negative_prompt,
                 top_k=args.top_k)
    settings = {k: v if given[k] is None else given[k] for k, v in checkpoint_defaults(ckpt).items()}
    size = vq.config.resolution if args.size is None else args.size
    samples = text_to_image(model, tokenizer, vq, prompts, size, args.n, args.seed, batch_size=args.batch_size,
                            compile=args.compile, temperature=args.temperature, top_p=args.top_p,
                            **settings)
    written = save_outputs(samples, prompts, args.seed, args.out, args.grid, args.save_codes)
    tokens = samples.codes.numel()
    print(f"wrote {len(written)} images to {args.out}")
    print(f"{len(written)} images, {tokens} tokens in {samples.lm_seconds:.1f} s LM "
          f"({tokens / samples.lm_seconds:.0f} tok/s) + {samples.decoder_seconds:.1f} s decoder")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sample.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()

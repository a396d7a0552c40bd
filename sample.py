"""Text-to-image sampling: the settings, prefill, the decode step, the loop, the CLI.

    python sample.py --prompt "two red circles"     # the shipped nano model: 64², CPU, offline
    python sample.py --prompt "a cat wearing a hat" --ckpt Daniel0724/SimpleAR-0.5B-RL \\
        --vq nvidia/Cosmos-1.0-Tokenizer-DV8x16x16 --out samples/      # 4 images at 1024², cfg 6
    python sample.py --prompts-file prompts.txt --ckpt DIR --vq DIR --size 512 --n 2 --grid \\
        --save-codes --jacobi --quantize int8
    python -m pytest tests/test_sample.py

Generation is split as gpt-fast splits it (pytorch-labs/gpt-fast, generate.py): `prefill` runs the
prompts once, `decode_one_token` is one forward + guidance + filtering + the draw, and
`decode_n_tokens` is the loop that calls it; under `--compile` the step compiles once, and nothing
in the loop waits for the device. One step follows SimpleAR's Hugging Face path (wdrink/SimpleAR,
generate.py with its CFG logits processor), per image: conditional logits → repetition penalty →
log-softmax of both branches → uncond + s·(cond − uncond) → temperature → top-k → top-p → a draw.
Two things differ, both on purpose:

* Scores are computed for the image rows only (`model(..., vocab=(first_id, first_id + K))`), so
  a text token can never be sampled; SimpleAR samples over the whole vocabulary and clamps a
  sampled text id into a code. Up to the text tokens' share, the distribution is the same
  (see cfg_combine). Likewise, SimpleAR's top-k 64,000 over all 215,672 rows keeps a few text ids
  and drops as many codes; here top-k >= the codebook is no filter at all. Its top-p (1.0 by
  default) counts the text tokens' share; here it is over the codes alone.
* Every image's randomness is its own: image i draws its uniforms from
  torch.Generator().manual_seed(seeds[i]) up front, and each step inverts the CDF at the next one.
  So an image does not depend on which other prompts share its batch, and the compiled step needs
  no generator.

The conditional rows and the unconditional (negative prompt) rows run as one batch through the
fused KV cache of model.py: rows [cond_1..cond_N, uncond_1..uncond_N]. Each distinct prompt and
the negative prompt are prefilled once and copied into the rows that share them.
"""
import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cli import Parser, run_main, warn, write_atomic
from cosmos_tokenizer import CosmosTokenizer, tensor_to_uint8
from data import (NEGATIVE_PROMPT, encode_negative, encode_prompts, first_image_id,
                  load_text_tokenizer, special_token_ids)
from model import Transformer, resolve_dtype

# The project's own small model (the nano recipe), the default: it runs on a CPU, offline.
DEFAULT_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "nano")
DEFAULT_VQ = os.path.join(DEFAULT_CKPT, "vq")


# ------------------------------------------------------------------------------------------------
# the settings

@dataclass(frozen=True)
class Sampling:
    """The sampling settings, validated here and nowhere else. Defaults are SimpleAR's evaluation
    settings: guidance 6 against its negative prompt, temperature 1, no top-k or top-p filter;
    the repetition penalty is 1.0 here and 1.1 in SimpleAR's generation_config.json, which
    `from_checkpoint` reads.

    guidance_scale s: uncond + s·(cond − uncond) in log-probabilities; 1 = the conditional branch
    alone (no negative prompt is run), 0 = the unconditional one. In [0, MAX_GUIDANCE].
    negative_prompt: the text of the unconditional branch ("" = the dropped caption
    "<|t2i|><|soi|>" that caption dropout trains).
    temperature: > 0, finite. top_k: None (off) or >= 1; 1 is greedy. top_p: in (0, 1].
    repetition_penalty: in [1/MAX_PENALTY, MAX_PENALTY], on the conditional logits of the codes this
    image already holds (transformers' RepetitionPenaltyLogitsProcessor).
    Raises ValueError naming the first bad setting.
    """

    guidance_scale: float = 6.0
    negative_prompt: str = NEGATIVE_PROMPT
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    # Past these, float32 scores overflow or the setting means nothing more: s·(cond − uncond) is
    # already an argmax of the difference at 1e4, and a penalty of 100 already forbids a repeat.
    MAX_GUIDANCE = 1e4
    MAX_PENALTY = 100.0

    def __post_init__(self):
        def number(name, value):
            real = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not real or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

        number("guidance scale", self.guidance_scale)
        if not 0 <= self.guidance_scale <= self.MAX_GUIDANCE:
            raise ValueError(f"guidance scale must be in [0, {self.MAX_GUIDANCE:g}], "
                             f"got {self.guidance_scale}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative prompt must be text, got {self.negative_prompt!r}")
        number("temperature", self.temperature)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} "
                             "(use top-k 1 for greedy)")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top-k must be an integer >= 1 (or None: off), got {self.top_k!r}")
        number("top-p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        number("repetition penalty", self.repetition_penalty)
        low, high = 1 / self.MAX_PENALTY, self.MAX_PENALTY
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition penalty must be in [{low:g}, {high:g}], "
                             f"got {self.repetition_penalty}")

    @property
    def guided(self) -> bool:
        """Whether the unconditional branch runs (guidance_scale != 1)."""
        return self.guidance_scale != 1.0

    def replace(self, **overrides) -> "Sampling":
        """A copy with the overrides that are not None (unset CLI flags stay as they are)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_checkpoint(cls, ckpt_dir, **overrides) -> "Sampling":
        """The settings a checkpoint's generation_config.json asks for, then the overrides that are
        not None.

        repetition_penalty: SimpleAR's published numbers used the file's 1.1 (Qwen2.5-Instruct's).
        guidance_scale (transformers' name) and negative_prompt (ours): a model trained from scratch
        may want its own, e.g. the nano model, which saw only the dropped caption as its
        unconditional input. image_top_k and image_temperature (ours), not top_k and temperature:
        Qwen2.5-Instruct's file has top_k 20 and temperature 0.7 for chat, which SimpleAR never
        applied. ValueError naming the file for a value it refuses.
        """
        path = os.path.join(ckpt_dir, "generation_config.json")
        gen = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8-sig") as f:
                try:
                    gen = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} is not valid JSON: {e}") from None
        keys = dict(guidance_scale="guidance_scale", negative_prompt="negative_prompt",
                    temperature="image_temperature", top_k="image_top_k",
                    repetition_penalty="repetition_penalty")
        found = {field: gen.get(key) for field, key in keys.items()}
        try:
            settings = cls().replace(**found)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return settings.replace(**overrides)


# ------------------------------------------------------------------------------------------------
# one step of the sampling pipeline, on the image rows (jacobi.py and grpo.py reuse these)

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
    """SimpleAR's guidance in log-probabilities: lu + s·(lc − lu), lc/lu = log_softmax(cond/uncond).

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

    The scores are shifted so that each row's best is 0 before dividing by the temperature: the
    same distribution, and no overflow at any positive temperature. top_k None or >= K keeps all;
    ties with the k-th score are kept. top-p drops the low tail whose total probability is
    <= 1 - top_p, always keeping the best token.
    """
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        low_first, order = torch.sort(scores, dim=-1)
        drop = low_first.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def guided_scores(cond, uncond, seen, sampling: "Sampling"):
    """One step of SimpleAR's logits pipeline over the image rows: float32 scores [..., K] whose
    softmax is the sampling distribution. cond, uncond [..., K] (uncond unused, may be None, when
    the guidance scale is 1); seen [..., K] bool, the codes each image already holds."""
    s = sampling
    cond = apply_repetition_penalty(cond.float(), seen, s.repetition_penalty)
    scores = cfg_combine(cond, None if uncond is None else uncond.float(), s.guidance_scale)
    return filter_logits(scores, s.temperature, s.top_k, s.top_p)


def draw(scores, u):
    """Inverse-CDF draws from softmax(scores): scores [..., K], u [...] uniforms in [0, 1) →
    LongTensor [...]."""
    return invert_cdf(torch.softmax(scores, dim=-1), u)


def invert_cdf(weights, u):
    """The first code whose cumulative weight exceeds u·total: weights [..., K] >= 0
    (unnormalised), u [...] in [0, 1) → LongTensor [...].

    A code of weight 0 is never drawn: where rounding puts u·total at the very top of the CDF, the
    last code of non-zero weight is taken.
    """
    cdf = weights.cumsum(dim=-1)
    x = (u * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    last = weights.shape[-1] - 1 - (weights > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(idx, last)


def uniforms(seeds, n, device) -> torch.Tensor:
    """[len(seeds), n] float32 in [0, 1): row i from torch.Generator().manual_seed(seeds[i]) on the
    CPU, so a seed gives the same draws on every device."""
    rows = [torch.rand(n, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


def sample_codes(logits, seen, u, sampling: Sampling):
    """The draw of one step from the logits of its rows: logits [R, K] float32 (R = 2N with
    guidance: N conditional rows, then their N unconditional ones; R = N without), seen [N, K]
    bool, u [N] → codes [N]."""
    n = u.shape[0]
    uncond = logits[n:] if sampling.guided else None
    return draw(guided_scores(logits[:n], uncond, seen, sampling), u)


# ------------------------------------------------------------------------------------------------
# prefill, the decode step, the loop

def prefill(model, prompts, negative, vocab, n_tokens, sampling: Sampling, compile=False):
    """Sets up the cache and runs the prompts: float32 logits [R, K] of the image rows and each
    row's first free cache column, LongTensor [R]. Rows are [prompts..., negative × N] with
    guidance, [prompts...] without; each distinct prompt (and the negative prompt) is run once and
    copied into its rows. compile: the cache length is rounded up to a multiple of 256, so that
    prompts of other lengths reuse the compiled decode step."""
    n = len(prompts)
    unique = list(dict.fromkeys(map(tuple, prompts)))
    runs = [list(p) for p in unique] + ([list(negative)] if sampling.guided else [])
    rows = [unique.index(tuple(p)) for p in prompts] + [len(unique)] * (n if sampling.guided else 0)
    T = max(map(len, runs))
    S = T + n_tokens - 1
    if compile:
        S = -(-S // 256) * 256
    model.setup_cache(len(rows), S)
    logits, ends = model.prefill(runs, vocab=vocab)
    model.cache.copy_rows(rows, list(range(len(rows))))
    return logits[rows], ends[rows]


def decode_one_token(model, tokens, input_pos, seen, u, sampling: Sampling, vocab, kv_len=None):
    """One decode step: the forward of tokens [R, 1] at cache columns input_pos [R, 1],
    then guidance, filtering and the draw → codes [N]. Compiled once under --compile."""
    logits = model(tokens, input_pos=input_pos, vocab=vocab, kv_len=kv_len)[:, -1]
    return sample_codes(logits, seen, u, sampling)


_compiled_steps = {}


def compiled_step(device):
    """decode_one_token compiled for a device type: once per process, whole-graph (a graph break,
    e.g. a host sync, is an error), static shapes; CUDA graphs on CUDA."""
    kind = torch.device(device).type
    if kind not in _compiled_steps:
        mode = "reduce-overhead" if kind == "cuda" else None
        step = torch.compile(decode_one_token, fullgraph=True, dynamic=False, mode=mode)
        _compiled_steps[kind] = step
    return _compiled_steps[kind]


def decode_n_tokens(model, logits, ends, u, sampling: Sampling, first_id, vocab, compile=False,
                    progress=True):
    """The loop: codes [N, n] from the prefill's logits [R, K] (R rows, as `prefill` lays them
    out), the rows' first free columns ends [R] and the uniforms u [N, n] (n = tokens per
    image)."""
    n_images, n_tokens = u.shape
    device = logits.device
    seen = torch.zeros(n_images, vocab[1] - vocab[0], dtype=torch.bool, device=device)
    rows = torch.arange(n_images, device=device)
    branches = logits.shape[0] // n_images
    step = compiled_step(device) if compile else decode_one_token
    codes = torch.empty(n_images, n_tokens, dtype=torch.long, device=device)
    codes[:, 0] = sample_codes(logits, seen, u[:, 0], sampling)
    input_pos = ends[:, None].clone()  # [R, 1]: each row writes at its own column
    top = int(ends.max())
    for t in tqdm(range(1, n_tokens), desc="tokens", disable=not progress, leave=False):
        seen[rows, codes[:, t - 1]] = True
        # the sampled code goes to its conditional row and to its unconditional row
        tokens = (first_id + codes[:, t - 1]).repeat(branches)[:, None]
        kv_len = None if compile else top + t
        codes[:, t] = step(model, tokens, input_pos, seen, u[:, t], sampling, vocab, kv_len)
        input_pos += 1
    return codes


@torch.no_grad()
def generate(model, prompts, negative, first_id, codebook_size, n_tokens, seeds,
             sampling=Sampling(), compile=False, progress=True):
    """Sample n_tokens image codes for each of len(prompts) images → LongTensor [N, n_tokens].

    prompts: one token-id list per image, already templated (data.py); repeats share a prefill.
    negative: the negative prompt's ids (the unconditional branch); unused when sampling's guidance
    scale is 1. seeds: one per image; image i draws only from its own seeds[i], so the same
    (prompt, seed) gives the same codes whatever else is in the batch.
    Codes are in [0, codebook_size): token id = first_id + code.
    compile: torch.compile the decode step (static shapes: it attends over the whole cache).
    Raises ValueError for a request that cannot run (no prompts, a seed count that differs, empty
    prompts, image rows outside the vocabulary, more positions than the model has).
    """
    check_generation(model, prompts, negative, first_id, codebook_size, n_tokens, seeds, sampling)
    device = model.embed_tokens.weight.device
    vocab = (first_id, first_id + codebook_size)
    logits, ends = prefill(model, prompts, negative, vocab, n_tokens, sampling, compile)
    u = uniforms(seeds, n_tokens, device)
    codes = decode_n_tokens(model, logits, ends, u, sampling, first_id, vocab, compile, progress)
    if not compile:
        model.cache = None  # frees the buffer; a compiled step keeps it, to run on the same one
    return codes


def check_generation(model, prompts, negative, first_id, codebook_size, n_tokens, seeds, sampling):
    """ValueError naming what makes a generation request impossible, before any work."""
    n = len(prompts)
    if n == 0 or len(seeds) != n:
        raise ValueError(f"need one seed per prompt, got {n} prompts and {len(seeds)} seeds")
    if any(len(p) == 0 for p in prompts) or (sampling.guided and not negative):
        raise ValueError("empty prompt token list")
    if n_tokens < 1:
        raise ValueError(f"need at least one image token, got {n_tokens}")
    if first_id < 0 or first_id + codebook_size > model.args.vocab_size:
        raise ValueError(f"image rows [{first_id}, {first_id + codebook_size}) exceed the "
                         f"vocabulary ({model.args.vocab_size})")
    longest = max(map(len, list(prompts) + ([negative] if sampling.guided else [])))
    limit = model.args.max_position_embeddings
    if longest + n_tokens > limit:
        raise ValueError(f"a prompt of {longest} tokens + {n_tokens} image tokens = "
                         f"{longest + n_tokens} positions, more than the model's "
                         f"max_position_embeddings ({limit})")


# ------------------------------------------------------------------------------------------------
# strings in, images out (eval.py and grpo.py call this)

@dataclass
class Samples:
    codes: torch.Tensor  # long [P, n, h, w]
    images: np.ndarray | None  # uint8 [P, n, H, W, 3]; None when decode=False
    lm_seconds: float
    decoder_seconds: float
    forwards: list  # model forwards per image, its prefill included (plain decoding: h * w)


def text_to_image(model, tokenizer, vq, prompts, size=1024, n=1, seed=0, sampling=Sampling(),
                  batch_size=None, decode=True, compile=False, progress=True,
                  jacobi=None) -> Samples:
    """n images for each prompt string with SimpleAR's template; image j of a prompt uses seed + j.
    seed may also be a list of one int per prompt: image j of prompt p then uses seed[p] + j (GRPO
    gives every image of a step its own seed this way, whichever batch or rank draws it).

    vq: a CosmosTokenizer (or anything with codebook_size, spatial_compression and
    decode(codes [B, h, w])); it fixes the codebook, so the LM's vocabulary must end with its
    codebook_size image rows.
    batch_size: images per generate() call (None: n, so that one prompt's images share its
    prefill).
    jacobi: a jacobi.Jacobi to decode with speculative Jacobi decoding (same distribution).
    Images are decoded one at a time, so that an image's pixels do not depend on its batch.
    """
    import jacobi as jacobi_py  # jacobi.py builds on this file
    batch_size = n if batch_size is None else batch_size
    check_request(prompts, size, n, batch_size, seed, vq.spatial_compression)
    first_id = first_image_id(model.args.vocab_size, vq.codebook_size, tokenizer.get_vocab_size())
    special_token_ids(tokenizer)  # without <|t2i|>/<|soi|> they would be encoded as plain text
    side = size // vq.spatial_compression
    ids = encode_prompts(tokenizer, prompts)
    bases = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    jobs = [(ids[p], bases[p] + j) for p in range(len(prompts)) for j in range(n)]
    negative = encode_negative(tokenizer, sampling.negative_prompt)
    n_tokens = side * side
    one_each = range(len(ids))  # the checks count one seed per prompt
    check_generation(model, ids, negative, first_id, vq.codebook_size, n_tokens, one_each, sampling)
    codes, images, lm_s, dec_s = [], [], 0.0, 0.0
    stats = jacobi_py.Stats()
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b:b + batch_size]
        prompt_ids, seeds = [p for p, _ in chunk], [s for _, s in chunk]
        args = (model, prompt_ids, negative, first_id, vq.codebook_size, n_tokens, seeds, sampling)
        t0 = time.perf_counter()
        if jacobi is None:
            c = generate(*args, compile=compile, progress=progress)
            stats.forwards += [n_tokens] * len(chunk)
        else:
            c = jacobi_py.generate(*args, jacobi, width=side, stats=stats, progress=progress)
        c = c.view(-1, side, side)
        t1 = time.perf_counter()
        if decode:
            with torch.no_grad():
                images += [tensor_to_uint8(vq.decode(c[i:i + 1]))[0] for i in range(len(c))]
        lm_s, dec_s = lm_s + t1 - t0, dec_s + time.perf_counter() - t1
        codes.append(c.cpu())
    codes = torch.cat(codes).view(len(prompts), n, side, side)
    images = np.stack(images).reshape(len(prompts), n, size, size, 3) if decode else None
    return Samples(codes, images, lm_s, dec_s, stats.forwards)


def check_request(prompts, size, n, batch_size, seed=0, compression=16):
    """ValueError naming the first thing wrong with a text_to_image request (size None: unknown yet,
    checked once the visual tokenizer is loaded)."""
    if not prompts:
        raise ValueError("no prompt given")
    for p in prompts:
        if not p.strip():
            raise ValueError("empty prompt")
    if size is not None and size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if size is not None and size % compression:
        raise ValueError(f"size {size} is not a multiple of {compression}")
    if n < 1 or batch_size < 1:
        raise ValueError(f"n ({n}) and batch size ({batch_size}) must be >= 1")
    for s in (seed if isinstance(seed, (list, tuple)) else [seed]):
        if not 0 <= s <= 2 ** 63 - n:
            raise ValueError(f"seed must be in [0, 2^63 - n], got {s}")
    if isinstance(seed, (list, tuple)) and len(seed) != len(prompts):
        raise ValueError(f"{len(seed)} seeds for {len(prompts)} prompts")


# ------------------------------------------------------------------------------------------------
# loading

CKPT_FILES = ["*.json", "*.safetensors", "*.txt"]  # what a checkpoint download fetches


def resolve_dir(name, what, patterns):
    """A local directory as is; a Hugging Face repo id ("owner/name") is downloaded when
    huggingface_hub is installed. FileNotFoundError with what to do otherwise."""
    if os.path.isdir(name):
        return name
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(f"{what} directory not found: {name}")
    how = (f"get the files with `huggingface-cli download {name} --local-dir DIR` or "
           f"`git lfs clone https://huggingface.co/{name} DIR`, then pass DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{what} {name} is not a local directory and huggingface_hub is "
                                f"not installed (pip install huggingface_hub); or {how}") from None
    try:
        return snapshot_download(name, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, gated, ...: the hub's errors are many
        raise FileNotFoundError(f"{what} {name} is not a local directory and downloading it failed "
                                f"({type(e).__name__}); {how}") from None


def load(ckpt, vq, device="cpu", dtype="auto", quantize=None, decoding=True):
    """(model, tokenizer, visual tokenizer with its decoder only, checkpoint dir) from directories
    or hub ids. dtype: a torch.dtype or a --dtype name ("auto": see model.resolve_dtype), for the LM
    and the decoder alike (the Cosmos decoder runs 2x faster in bf16 where the LM does).
    decoding: ready the LM's weights for sampling (model.prepare_decoding: packed bf16 on CPU, or
    int8 with quantize="int8"); pass False for a model that will be trained."""
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)[0]
    ckpt = resolve_dir(ckpt, "checkpoint", CKPT_FILES)
    vq = resolve_dir(vq, "visual tokenizer", ["decoder.jit", "*.json", "model.safetensors"])
    tokenizer = load_text_tokenizer(ckpt)
    model = Transformer.from_pretrained(ckpt, dtype=dtype, device=device)
    vq = CosmosTokenizer.from_pretrained(vq, dtype=dtype, device=device, encoder=False,
                                         decoder=True)
    if decoding or quantize:
        first = first_image_id(model.args.vocab_size, vq.codebook_size, tokenizer.get_vocab_size())
        model.prepare_decoding((first, first + vq.codebook_size), quantize)
    return model, tokenizer, vq, ckpt


# ------------------------------------------------------------------------------------------------
# command line

def check_default_model(ckpt, vq):
    """The shipped model's files, or an error naming the folder and the command that rebuilds it."""
    need = [(DEFAULT_CKPT, ("config.json", "model.safetensors", "tokenizer.json")),
            (DEFAULT_VQ, ("config.json", "model.safetensors"))]
    for (folder, files), given in zip(need, (ckpt, vq)):
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if given == folder and missing:
            raise FileNotFoundError(f"the default model in {folder} lacks {', '.join(missing)}: "
                                    "rebuild it with `bash recipes/nano.sh`, "
                                    "or pass --ckpt and --vq")


def slug(text, limit=60):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def save_outputs(samples, prompts, seed, out, grid=False, save_codes=False):
    """PNG per image ({slug}_s{seed}_{j}.png), optional grid.png (a row per prompt) and .npy code
    grids."""
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
        rows = [np.concatenate(list(row), axis=1) for row in samples.images]  # [H, n*W, 3] each
        img = Image.fromarray(np.concatenate(rows, axis=0))
        write_atomic(os.path.join(out, "grid.png"), img.save)
    return written


def read_prompts(args):
    prompts = list(args.prompt or [])
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise FileNotFoundError(f"prompts file not found: {args.prompts_file}")
        with open(args.prompts_file, encoding="utf-8-sig") as f:  # a byte-order mark is no prompt
            prompts += [line.strip() for line in f if line.strip()]
    return prompts


def add_sampling_args(p):
    """The sampling flags every CLI shares (sample.py, eval.py, grpo.py). Unset ones (None) take the
    checkpoint's generation_config.json, then Sampling's defaults."""
    g = p.add_argument_group("sampling (default: the checkpoint's generation_config.json, "
                             "else SimpleAR's)")
    g.add_argument("--cfg", "--guidance-scale", dest="guidance_scale", type=float, default=None,
                   help=f"guidance scale s: uncond + s*(cond - uncond) in log-probs; 1 = off "
                   f"(default: guidance_scale, else {Sampling.guidance_scale})")
    g.add_argument("--negative-prompt", default=None,
                   help="text of the unconditional branch (default: negative_prompt, "
                   "else SimpleAR's)")
    g.add_argument("--temperature", type=float, default=None,
                   help=f"(default: image_temperature, else {Sampling.temperature})")
    g.add_argument("--top-k", type=int, default=None,
                   help="1 = greedy; >= codebook size = off (default: image_top_k, else off)")
    g.add_argument("--top-p", type=float, default=None, help=f"(default: {Sampling.top_p})")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="on the conditional logits of codes already generated "
                   "(default: repetition_penalty, 1.1 in SimpleAR's; else 1.0)")


def sampling_flags(args) -> dict:
    """The sampling flags that add_sampling_args parsed, validated as far as they go (ValueError):
    pass them to Sampling.from_checkpoint once the checkpoint is known."""
    names = [f.name for f in dataclasses.fields(Sampling)]
    flags = {name: getattr(args, name) for name in names}
    Sampling().replace(**flags)  # a bad value fails here, before anything is loaded
    return flags


def add_runtime_args(p):
    """--device, --dtype, --quantize, --compile, as every generating CLI takes them."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 where the hardware computes it natively (CUDA; a CPU with "
                   "AVX512-BF16 or AMX), else float32")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weight-only LM weights (one scale per output row)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")


def check_device(name) -> torch.device:
    """The --device as a torch.device: cpu, or a CUDA device that exists (ValueError otherwise)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be cpu or cuda[:N], got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def runtime_dtype(args, prog) -> torch.dtype:
    """--device checked, --dtype resolved for it. A dtype that is slow here, or int8 weights that
    PyTorch's int8 kernel cannot take (it needs bf16 activations on a CPU), run with one warning
    line."""
    device = check_device(getattr(args, "device", "cpu"))
    dtype, warning = resolve_dtype(args.dtype, device)
    if warning:
        warn(prog, warning)
    if getattr(args, "quantize", None) and (device.type, dtype) != ("cpu", torch.bfloat16):
        warn(prog, f"--quantize int8 with {str(dtype).removeprefix('torch.')} on {device.type} "
             "dequantizes the weights on every call, slower than not quantizing (PyTorch's int8 "
             "kernel takes bfloat16 on a CPU)")
    return dtype


def prepare_out(out):
    """Creates the output directory now, so that a path that cannot be one fails before the work."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out} is not writable")


def parse_args(argv=None):
    p = Parser(prog="sample.py", description="SimpleAR text-to-image: PNGs from prompts.")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    p.add_argument("--prompts-file", help="a text file, one prompt per line")
    p.add_argument("--ckpt", default=DEFAULT_CKPT,
                   help="SimpleAR checkpoint: HF-format directory or hub id "
                   "(Daniel0724/SimpleAR-0.5B-RL, -0.5B-SFT, -1.5B-RL, -1.5B-SFT)")
    p.add_argument("--vq", default=DEFAULT_VQ, help="Cosmos tokenizer directory or hub id "
                   "(nvidia/Cosmos-1.0-Tokenizer-DV8x16x16)")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels, a multiple of the tokenizer's compression "
                   "(default: the tokenizer's own resolution, 1024 for Cosmos DV8x16x16)")
    add_sampling_args(p)
    p.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed + j")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: --n, one prompt's images together)")
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--grid", action="store_true", help="also write grid.png (a row per prompt)")
    p.add_argument("--save-codes", action="store_true",
                   help="also write each code grid as .npy [h, w] int32")
    add_runtime_args(p)
    import jacobi  # jacobi.py builds on this file
    jacobi.add_args(p)
    return p.parse_args(argv)


def run(args):
    import jacobi  # jacobi.py builds on this file
    prompts = read_prompts(args)
    # the size's multiple is checked once the tokenizer is loaded
    batch_size = args.n if args.batch_size is None else args.batch_size
    check_request(prompts, args.size, args.n, batch_size, args.seed, compression=1)
    flags = sampling_flags(args)
    speculative = jacobi.from_args(args)
    check_default_model(args.ckpt, args.vq)
    dtype = runtime_dtype(args, "sample.py")
    prepare_out(args.out)
    ckpt = resolve_dir(args.ckpt, "checkpoint", CKPT_FILES)
    sampling = Sampling.from_checkpoint(ckpt, **flags)  # a bad generation_config.json fails here
    model, tokenizer, vq, ckpt = load(ckpt, args.vq, args.device, dtype, args.quantize)
    size = vq.config.resolution if args.size is None else args.size
    samples = text_to_image(model, tokenizer, vq, prompts, size, args.n, args.seed, sampling,
                            batch_size=args.batch_size, compile=args.compile, jacobi=speculative)
    written = save_outputs(samples, prompts, args.seed, args.out, args.grid, args.save_codes)
    tokens = samples.codes.numel()
    per_image = tokens // len(written)
    images = f"{len(written)} image" + ("s" if len(written) != 1 else "")
    print(f"wrote {images} to {args.out}")
    print(f"{images}, {tokens} tokens in {samples.lm_seconds:.1f} s LM "
          f"({tokens / samples.lm_seconds:.0f} tok/s) + {samples.decoder_seconds:.1f} s decoder; "
          f"{np.mean(samples.forwards):.1f} forwards per image (plain decoding: {per_image})")


def main(argv=None):
    run_main("sample.py", run, parse_args(argv))


if __name__ == "__main__":
    main()

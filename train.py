"""Pretraining and SFT of SimpleAR: next-token cross-entropy over caption text and image codes,
DDP-ready.

    # from scratch, a tiny model on code shards (python shapes.py, then data.py prepare), one CPU
    python train.py --config tiny --tokenizer data/shapes/tokenizer --data data/shapes/codes \
        --out runs/tiny --steps 2000
    # SimpleAR's recipe from Qwen2.5-0.5B-Instruct (vocabulary extended on the way in), 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --init Qwen2.5-0.5B-Instruct \
        --data codes/512 --out runs/pt --batch-size 8 --grad-accum 2 --grad-checkpointing --compile
    # the same command plus --resume continues from the last good checkpoint of --out, exactly
    torchrun --standalone --nproc_per_node=8 train.py ... --resume
    # SFT at 1024 px from the pretraining checkpoint (new optimizer and schedule)
    torchrun --standalone --nproc_per_node=8 train.py --init runs/pt/step_0010000 \
        --data codes/1024 --out runs/sft ...
    # two nodes
    torchrun --nnodes=2 --node_rank={0,1} --master_addr=IP --master_port=29500 \
        --nproc_per_node=8 train.py ...
    python -m pytest -q tests/test_train.py

The loop is nanoGPT's: DDP is on when torchrun sets RANK; every rank holds the whole model; a step
is --grad-accum micro-batches of --batch-size per rank (global batch = batch x grad-accum x ranks)
and gradients are all-reduced on the last micro-batch only. The loss is the mean over every target
token of the global batch, so 2 ranks x b, b with 2 accumulation steps and 1 rank x 2b train the
same weights. SimpleAR's settings are the defaults (its docs/TRAIN.md and simpar/train/train.py,
github.com/wdrink/SimpleAR): AdamW, lr 1e-4 constant, weight decay 0.01 (not on biases), gradient
clipping at 1.0 (the Hugging Face Trainer's max_grad_norm), bf16 autocast on GPU (and here on CPUs
with bf16 instructions); every token (caption text included) is a target, captions drop out with
p = 0.1.

Bad input is found before step 1, on every rank: each flag's range, the data's index.json against
the flags and the model (resolution, codebook = vocabulary - tokenizer), the longest sequence
(image tokens, <|t2i|>, <|soi|> and the longest of the 20 style prefixes; captions are cut to fit),
the global batch against the data, a resumed run's flags against its checkpoint. The ranks then
compare what they found: rank 0 prints it as one line `train.py: error: ...` (naming the ranks
when they differ) and every rank exits with status 2. A sample that breaks the format (codes
outside the codebook or of another grid, captions that are not text) is found by the rank that
reads it, at its step: that rank prints `train.py: error: rank R: ...` and exits 2, and torchrun
stops the others.

Checkpoints are Hugging Face directories that sample.py and transformers load as they are:
    {out}/step_0001000/  config.json  model.safetensors  tokenizer.json  [tokenizer_config.json ...]
                         trainer.pt
    {out}/latest         the name of the newest complete one
trainer.pt holds what an exact resume needs: optimizer, scheduler, step, RNG states, data position,
args. A checkpoint is written under a temporary name and renamed, and `latest` moves only
afterwards, so a run killed mid-save leaves the previous checkpoint as the one --resume finds.
"""
import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data
from cli import Parser, run_main, write_atomic
from model import ModelArgs, Transformer, cpu_bf16_native

PROG = "train.py"
# tokenizer-side files of a Hugging Face checkpoint that travel with every checkpoint we write
AUX_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
SHAPE_FLAGS = dict(dim="width", n_layers="number of blocks", n_heads="query heads",
                   n_kv_heads="key/value heads", intermediate_size="MLP width")
# What a --resume must not change, because the checkpoint fixed it: the model (the checkpoint's
# replaces the one the flags describe, so these count only when given), the data stream, the
# optimizer and its schedule (their saved states override the flags). Paths may differ
# (directories move), and so may --steps, the ranks x batch split of the global batch, and how the
# run is executed, logged and saved.
RESUME_MODEL_FLAGS = ("config", *SHAPE_FLAGS)
RESUME_FLAGS = (*RESUME_MODEL_FLAGS, "seed", "val_frac", "max_len", "p_drop_cond",
                "image_loss_only", "lr", "schedule", "warmup_steps", "min_lr_ratio",
                "weight_decay", "beta1", "beta2", "eps", "grad_clip")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def get_parser():
    p = Parser(prog=PROG, description="SimpleAR pretraining / SFT")
    g = p.add_argument_group("model")
    g.add_argument("--init", help="Hugging Face checkpoint directory to start from: Qwen2 (the "
                                  "vocabulary is extended SimpleAR's way) or SimpleAR. Exactly one "
                                  "of --init / --config")
    g.add_argument("--config", help="model.py preset to train from scratch (e.g. tiny, "
                                    "simplear-0.5b); its vocab size becomes len(tokenizer) + "
                                    "codebook size")
    g.add_argument("--tokenizer", help="directory with the tokenizer.json to use with --config")
    g.add_argument("--codebook-size", type=int, default=0,
                   help="image codes; 0: the data's index.json says")
    for name, what in SHAPE_FLAGS.items():
        g.add_argument(flag(name), type=int, default=0,
                       help=f"with --config: {what}; 0: the preset's")
    g.add_argument("--init-std", type=float, default=0.02,
                   help="init std with --config (Qwen2's initializer_range)")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True,
                   help="code-shard directory written by `python data.py prepare`")
    g.add_argument("--val-data", help="held-out code-shard directory for --val-every")
    g.add_argument("--val-frac", type=float, default=0.0,
                   help="without --val-data: hold out this fraction of --data")
    g.add_argument("--resolution", type=int, default=0,
                   help="image size the data must have, in pixels; 0: any")
    g.add_argument("--max-len", type=int, default=0,
                   help="longest sequence, captions cut to fit; 0: image tokens + 512 (SimpleAR's "
                        "model_max_length: 1536 at 512 px, 4608 at 1024 px)")
    g.add_argument("--p-drop-cond", type=float, default=0.1,
                   help="caption dropout for classifier-free guidance")
    g.add_argument("--image-loss-only", action="store_true",
                   help="only image tokens are targets (SimpleAR: all)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=10000,
                   help="optimizer steps of the whole run (the schedule's length)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per rank")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="after the warmup")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup from 0")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine ends at lr x this")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW decoupled decay (biases excluded)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm; 0: off")
    g.add_argument("--seed", type=int, default=0,
                   help="init, data order, caption dropout and prefix draws")
    g = p.add_argument_group("runtime")
    g.add_argument("--out", default="runs/train", help="checkpoint and log directory")
    g.add_argument("--save-every", type=int, default=1000,
                   help="checkpoint every N steps and at the end; 0: end only")
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep; 0: all")
    g.add_argument("--resume", nargs="?", const="auto",
                   help="continue from a checkpoint directory, or (no value / auto) from "
                        "{out}/latest when there is one")
    g.add_argument("--stop-after", type=int, default=0,
                   help="end this invocation after N steps with a checkpoint, schedule unchanged "
                        "(time-limited jobs); 0: run to --steps")
    g.add_argument("--log-every", type=int, default=10, help="JSONL log line every N steps")
    g.add_argument("--val-every", type=int, default=0,
                   help="validation loss every N steps (and at the end); 0: never")
    g.add_argument("--val-samples", type=int, default=0,
                   help="validate on the first N held-out samples; 0: all")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="autocast dtype; auto: bfloat16 on GPU and on a CPU that computes it "
                        "natively (1.6x the tokens/s of float32 on the nano LM on an AVX512-BF16 "
                        "EPYC), else float32. Weights and optimizer stay float32")
    g.add_argument("--compile", action="store_true", help="torch.compile each decoder block")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute block activations in the backward pass")
    g.add_argument("--loss-chunk", type=int, default=2048,
                   help="tokens per logits chunk (memory: chunk x vocab fp32)")
    g.add_argument("--peak-flops", type=float, default=0.0,
                   help="per-rank peak FLOP/s for MFU; 0: measure a matmul")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


# ------------------------------------------------------------------------------------------- checks
def check_flags(args):
    """Each flag's own range and the combinations that cannot work, before anything loads."""
    for name in ("steps", "batch_size", "grad_accum", "loss_chunk", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    # --seed too: numpy's generators, which draw each sample's dropout and prefix, refuse negatives
    for name in ("codebook_size", *SHAPE_FLAGS, "max_len", "resolution", "save_every", "keep",
                 "stop_after", "val_every", "val_samples", "warmup_steps", "seed"):
        if getattr(args, name) < 0:
            raise ValueError(f"{flag(name)} must be >= 0, got {getattr(args, name)}")
    for name in ("lr", "eps", "init_std"):
        if not getattr(args, name) > 0:  # NaN fails too
            raise ValueError(f"{flag(name)} must be > 0, got {getattr(args, name)}")
    for name in ("weight_decay", "grad_clip", "peak_flops"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"{flag(name)} must be >= 0, got {getattr(args, name)}")
    for name, closed in dict(p_drop_cond=True, min_lr_ratio=True, val_frac=False, beta1=False,
                             beta2=False).items():
        value = getattr(args, name)
        if not (0 <= value <= 1 and (closed or value < 1)):
            raise ValueError(f"{flag(name)} must be in [0, 1{']' if closed else ')'}, got {value}")
    if args.val_every and not (args.val_data or args.val_frac):
        raise ValueError("--val-every needs held-out data: --val-data DIR or --val-frac F")
    if args.val_data and args.val_frac:
        raise ValueError("give --val-data DIR or --val-frac F, not both")
    if args.resolution % 16:
        raise ValueError(f"--resolution {args.resolution} is not divisible by 16 "
                         "(the visual tokenizer's downsampling)")
    shape = [flag(k) for k in SHAPE_FLAGS if getattr(args, k)]
    if args.init and (args.tokenizer or shape):
        extra = " ".join((["--tokenizer"] if args.tokenizer else []) + shape)
        raise ValueError(f"{extra}: only with --config; --init {args.init} brings its tokenizer "
                         "and its shape")


def check_data(args, index, codebook_size):
    """The data's own record (index.json) against the flags."""
    if args.resolution and index["resolution"] != args.resolution:
        raise ValueError(f"--resolution {args.resolution} but {args.data} holds codes of "
                         f"{index['resolution']}px images")
    if index.get("codebook_size", codebook_size) != codebook_size:
        raise ValueError(f"{args.data} holds codes of a {index['codebook_size']}-code visual "
                         f"tokenizer, but --codebook-size is {codebook_size}")


def check_vocab(model, tok, codebook_size) -> int:
    """The first image id: the vocabulary must be the tokenizer's tokens + the codebook, exactly."""
    data.special_token_ids(tok)  # raises unless the tokenizer has SimpleAR's tokens
    n_text = tok.get_vocab_size(with_added_tokens=True)
    return data.first_image_id(model.args.vocab_size, codebook_size, n_text)


def sequence_length(args, grid, tok, max_pos) -> int:
    """The longest sequence: --max-len (0: image tokens + 512) within the model's positions. Every
    sequence must fit: the image tokens, <|t2i|>, <|soi|> and the longest style prefix, the way
    data.make_sequence encodes it; only the caption is cut to fit."""
    n_image = grid[0] * grid[1]
    max_len = min(args.max_len or n_image + 512, max_pos)
    n_prefix = {p: len(tok.encode(p, add_special_tokens=False).ids) for p in data.STYLE_PREFIXES}
    longest = max(n_prefix, key=n_prefix.get)
    if n_image + 2 + n_prefix[longest] > max_len:
        raise ValueError(f"{n_image} image tokens (grid {grid[0]}x{grid[1]}), 2 special tokens "
                         f"and the longest style prefix {longest!r} ({n_prefix[longest]} tokens) "
                         f"do not fit a sequence of {max_len} (--max-len {args.max_len}, "
                         f"max_position_embeddings {max_pos}); captions are cut to fit, "
                         "prefixes are not")
    return max_len


def check_resume(args, state, resume, world):
    """A resume continues the same run: the flags that the checkpoint fixed must be its own, and
    the global batch (ranks x --batch-size x --grad-accum) the same product."""
    saved = state["args"]
    given = [k for k in RESUME_FLAGS if getattr(args, k) or k not in RESUME_MODEL_FLAGS]
    changed = [f"{flag(k)} {getattr(args, k)} (the checkpoint's: {saved[k]})"
               for k in given if k in saved and saved[k] != getattr(args, k)]
    if changed:
        raise ValueError(f"--resume {resume}: this run changes {', '.join(changed)}; a resume "
                         "continues the same run: repeat its flags, or start a new run from its "
                         f"weights with --init {resume}")
    before = state["world_size"] * saved["batch_size"] * saved["grad_accum"]
    if before != world * args.batch_size * args.grad_accum:
        raise ValueError(f"{resume} was trained with a global batch of {before}, this run has "
                         f"{world} ranks x {args.batch_size} x {args.grad_accum} accumulation")


class CheckedSamples:
    """A CodeDataset whose samples are checked as they are read: a broken one is an error naming
    it, raised by the rank that reads it, not a crash inside the model. Codes must have the
    index's grid and lie in the codebook; captions must be text."""

    def __init__(self, dataset, root, codebook_size):
        self.dataset = dataset
        self.root = root
        self.grid = tuple(dataset.index["grid"])
        self.lm_codebook = codebook_size
        self.codebook_size = dataset.codebook_size  # what the data records, for T2IBatches' check

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        captions, codes = self.dataset[i]
        where = f"{self.root}: sample {i}"
        if tuple(codes.shape) != self.grid:
            raise ValueError(f"{where} has codes of shape {tuple(codes.shape)}, "
                             f"index.json says grid {list(self.grid)}")
        low = int(codes.min())
        high = int(codes.max())
        if low < 0 or high >= self.lm_codebook:
            raise ValueError(f"{where} has codes in [{low}, {high}], outside the codebook "
                             f"[0, {self.lm_codebook})")
        texts = [captions] if isinstance(captions, str) else captions
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
            raise ValueError(f"{where} has captions {captions!r:.80}, not text")
        return captions, codes


# -------------------------------------------------------------------------------------- model setup
def init_weights(model: Transformer, std: float):
    """Qwen2's init (transformers' _init_weights): normal(0, std) matrices and embeddings, zero
    biases, unit norms."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def extend_vocab(model: Transformer, tok, codebook_size: int) -> int:
    """SimpleAR's vocabulary extension of a plain Qwen2 checkpoint (wdrink/SimpleAR,
    simpar/train/train.py); returns the old text size.

    The 7 SPECIAL_TOKENS get the ids right after the tokenizer's, then the vocabulary is resized to
    len(tokenizer) + codebook_size. Qwen2.5's matrix has padding rows past len(tokenizer) (its
    config.json says vocab_size 151936; the tokenizer has 151665 tokens): like SimpleAR (resize,
    then overwrite the last 7 + codebook rows) they are not kept. Every new row, in the embedding
    and in an untied head, is the mean of the rows of the old tokenizer's ids.
    """
    n_old = tok.get_vocab_size(with_added_tokens=True)
    if model.args.vocab_size < n_old:
        raise ValueError(f"the checkpoint's vocab_size {model.args.vocab_size} is smaller than "
                         f"its tokenizer ({n_old})")
    tok.add_special_tokens(data.SPECIAL_TOKENS)
    ids = [tok.token_to_id(t) for t in data.SPECIAL_TOKENS]
    if ids != list(range(n_old, n_old + len(ids))):
        raise ValueError(f"SimpleAR's special tokens got ids {ids}, expected "
                         f"{n_old}..{n_old + len(ids) - 1}")
    V = tok.get_vocab_size(with_added_tokens=True) + codebook_size

    def grow(w):  # [V_old, D] -> [V, D]
        new = torch.empty(V, w.shape[1], dtype=w.dtype, device=w.device)
        new[:n_old] = w[:n_old]
        new[n_old:] = w[:n_old].mean(0, dtype=torch.float64).to(w.dtype)
        return nn.Parameter(new)

    with torch.no_grad():
        model.embed_tokens.weight = grow(model.embed_tokens.weight)
        model.embed_tokens.num_embeddings = V
        if model.lm_head is not None:
            model.lm_head.weight = grow(model.lm_head.weight)
            model.lm_head.out_features = V
    model.args.vocab_size = V
    return n_old


def read_aux(path) -> dict:
    return {n: Path(path, n).read_bytes() for n in AUX_FILES if Path(path, n).is_file()}


def build_model(args, codebook_size):
    """(model, tokenizer) for a fresh run, from --init or --config."""
    if args.init:
        tok = data.load_text_tokenizer(args.init)
        model = Transformer.from_pretrained(args.init)
        if tok.token_to_id("<|t2i|>") is None:  # a plain Qwen2: SimpleAR's detection
            extend_vocab(model, tok, codebook_size)
        return model, tok
    if not args.tokenizer:
        raise ValueError("--config needs --tokenizer DIR (a tokenizer.json, e.g. from "
                         "`python shapes.py`)")
    tok = data.load_text_tokenizer(args.tokenizer, add_special_tokens=True)
    shape = {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k)}
    # head_dim 0: dim // n_heads again
    margs = asdict(ModelArgs.from_name(args.config)) | shape | dict(head_dim=0)
    margs["vocab_size"] = tok.get_vocab_size(with_added_tokens=True) + codebook_size
    torch.manual_seed(args.seed)
    model = Transformer(ModelArgs(**margs))
    init_weights(model, args.init_std)
    return model, tok


def load_model(args, resume, codebook_size):
    """(model, tokenizer): a resumed checkpoint's, or build_model's."""
    if resume:  # everything comes from the checkpoint: weights, tokenizer, aux files
        return Transformer.from_pretrained(resume), data.load_text_tokenizer(resume)
    if bool(args.init) == bool(args.config):
        raise ValueError("give exactly one of --init DIR (a Hugging Face checkpoint) or --config "
                         "NAME (from scratch)")
    if args.init and not os.path.isdir(args.init):
        raise FileNotFoundError(f"--init {args.init}: no such checkpoint directory")
    return build_model(args, codebook_size)


# --------------------------------------------------------------------------------------------- loss
class NextTokenLoss(nn.Module):
    """Summed next-token cross-entropy of a batch; DDP wraps this module because it only syncs
    what its forward ran.

    The head runs on target positions only (padding never reaches it) and in chunks of `chunk`
    tokens whose logits are recomputed in the backward pass, so memory holds one chunk x vocab of
    fp32 logits, not B x T x 215k (nanochat #443).
    """

    def __init__(self, model: Transformer, chunk: int):
        super().__init__()
        self.model = model
        self.chunk = chunk

    def chunk_loss(self, h, y):
        # logits() is fp32 even under autocast
        return F.cross_entropy(self.model.logits(h), y, reduction="sum")

    def forward(self, input_ids, labels):
        # right padding and causal attention: real tokens never see the padding, so no attention
        # mask is needed
        h = self.model.hidden(input_ids)[:, :-1]  # [B, T-1, D]: position t predicts token t+1
        y = labels[:, 1:]
        keep = y != -100
        h, y = h[keep], y[keep]  # [N, D], [N]
        loss = h.sum() * 0.0  # keeps the graph even with no targets
        if len(y) <= self.chunk:
            return loss + self.chunk_loss(h, y)
        for s in range(0, len(y), self.chunk):
            chunk = (h[s:s + self.chunk], y[s:s + self.chunk])
            loss = loss + checkpoint(self.chunk_loss, *chunk, use_reentrant=False)
        return loss


def lr_factor(step, schedule, warmup, total, min_ratio):
    """Multiplier of --lr at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(args, model, device):
    """(AdamW, its LambdaLR schedule). The grouping is the Hugging Face Trainer's, which SimpleAR's
    trainer keeps: every weight decays (RMSNorm's too) but the biases."""
    params = dict(model.named_parameters())
    decay = [p for n, p in params.items() if not n.endswith("bias")]
    no_decay = [p for n, p in params.items() if n.endswith("bias")]
    groups = [dict(params=decay, weight_decay=args.weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                            fused=device.type == "cuda")
    schedule = lambda s: lr_factor(s, args.schedule, args.warmup_steps, args.steps,
                                   args.min_lr_ratio)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


# --------------------------------------------------------------------------------------- throughput
def autocast_dtype(name, device) -> torch.dtype | None:
    """The autocast dtype of --dtype name on device (None: float32, no autocast). auto is bf16
    where the hardware computes it natively: a GPU, a CPU with AVX512-BF16 or AMX."""
    native = device.type == "cuda" or (device.type == "cpu" and cpu_bf16_native())
    return dict(auto=torch.bfloat16 if native else None, float32=None,
                bfloat16=torch.bfloat16)[name]


def measure_matmul_flops(device="cpu", dtype=torch.float32, n=None, iters=5) -> float:
    """Best FLOP/s of an n x n matmul on this device: the peak that MFU is measured against."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for i in range(iters + 2):  # the first two warm up
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def flops_per_token(a: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 x matmul weights + 12 x layers x attention
    width x context. The head counts once whether tied or not: it is a matmul either way; the
    embedding lookup is free."""
    q = a.n_heads * a.head_dim
    kv = a.n_kv_heads * a.head_dim
    per_layer = a.dim * (2 * q + 2 * kv) + 3 * a.dim * a.intermediate_size
    return 6 * (a.n_layers * per_layer + a.dim * a.vocab_size) + 12 * a.n_layers * q * seq_len


def peak_flops(args, device, dtype) -> float:
    """MFU's peak: the FLOP/s of all ranks together, each --peak-flops or a matmul it measures.
    Every rank measures at once, so ranks sharing a CPU share its cores as they will in training."""
    if dist.is_initialized():
        dist.barrier()
    peak = args.peak_flops or measure_matmul_flops(device, dtype)
    peak = torch.tensor(peak, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(peak)
    return peak.item()


# -------------------------------------------------------------------------------------- checkpoints
def save_model_dir(path, model, tok, aux, extra=None):
    """A Hugging Face directory at path: the model, tokenizer.json, the aux files {name: bytes} and
    whatever extra(tmp_dir) writes, as .{name}.tmp beside it renamed over any old one (moved to
    .{name}.old first): a reader never sees half of it, and the next save cleans up after a
    killed one, restoring the old directory if the swap was cut between its two renames."""
    out, name = os.path.split(os.path.abspath(path))
    tmp, old = os.path.join(out, f".{name}.tmp"), os.path.join(out, f".{name}.old")
    if os.path.exists(old):  # a save killed mid-swap: the old directory is still the one
        if os.path.exists(path):
            shutil.rmtree(old)
        else:
            os.replace(old, path)
    if os.path.exists(tmp):  # debris of a save that was killed
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    for n, content in aux.items():
        Path(tmp, n).write_bytes(content)
    if extra:
        extra(tmp)
    if os.path.exists(path):  # a rerun reaching this step again; the best one replaced
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out, step, model, tok, aux, trainer_state, keep):
    """{out}/step_N (save_model_dir, with trainer.pt), then {out}/latest names it; older ones
    pruned."""
    name = f"step_{step:07d}"
    final = os.path.join(out, name)
    for d in os.listdir(out):  # debris of a save that was killed
        if d.startswith(".step_"):
            shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    save_model_dir(final, model, tok, aux,
                   lambda tmp: torch.save(trainer_state, os.path.join(tmp, "trainer.pt")))
    # only now is the new one "the" checkpoint
    write_atomic(os.path.join(out, "latest"),
                 lambda path: Path(path).write_text(name + "\n", encoding="utf-8"))
    if keep > 0:
        done = sorted(d for d in os.listdir(out)
                      if d.startswith("step_") and Path(out, d, "trainer.pt").is_file())
        for d in done[:-keep]:
            shutil.rmtree(os.path.join(out, d))
    return final


def find_resume(args):
    """The checkpoint directory --resume asks for, or None to start fresh."""
    if args.resume is None:
        return None
    path = args.resume
    if args.resume == "auto":
        latest = os.path.join(args.out, "latest")
        if not os.path.isfile(latest):
            return None
        path = os.path.join(args.out, Path(latest).read_text(encoding="utf-8-sig").strip())
    if not os.path.isfile(os.path.join(path, "trainer.pt")):
        raise FileNotFoundError(f"--resume {path}: not a train.py checkpoint (no trainer.pt)")
    return path


def load_trainer_state(resume, args, world) -> dict:
    """trainer.pt of the checkpoint to resume, once its run and this one agree."""
    state = torch.load(os.path.join(resume, "trainer.pt"), map_location="cpu", weights_only=False)
    check_resume(args, state, resume, world)
    return state


def restore(state, opt, sched, loader) -> int:
    """Continue exactly: optimizer, schedule, data position and RNG states as saved; the step."""
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    return state["step"]


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# --------------------------------------------------------------------------------------------- data
def load_data(args, train_ds, codebook_size, tok, first_id, rank, world, max_len):
    """(training batch stream, validation pass factory or None)."""
    train_ds = CheckedSamples(train_ds, args.data, codebook_size)
    val = None
    if args.val_data:
        val_ds = data.CodeDataset(args.val_data)
        layout = lambda ds: (ds.index["grid"], ds.index.get("codebook_size"))
        if layout(val_ds) != layout(train_ds.dataset):
            raise ValueError(f"--val-data {args.val_data} holds {layout(val_ds)} (grid, codebook), "
                             f"--data {layout(train_ds.dataset)}")
        val = CheckedSamples(val_ds, args.val_data, codebook_size)
    if args.val_frac > 0:  # a seeded split: every rank and every resume holds out the same samples
        perm = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(args.seed))
        perm = perm.tolist()
        k = max(1, round(args.val_frac * len(train_ds)))
        full = train_ds
        train_ds = torch.utils.data.Subset(full, sorted(perm[k:]))
        val = torch.utils.data.Subset(full, sorted(perm[:k]))
    global_batch = args.batch_size * args.grad_accum * world
    if len(train_ds) < global_batch:
        held = f" ({len(val)} held out by --val-frac)" if args.val_frac else ""
        raise ValueError(f"{len(train_ds)} training samples{held} are fewer than one global batch "
                         f"of {global_batch} (--batch-size {args.batch_size} x --grad-accum "
                         f"{args.grad_accum} x {world} ranks)")
    common = dict(text_loss=not args.image_loss_only, max_len=max_len,
                  prefixes=data.STYLE_PREFIXES, codebook_size=codebook_size)
    # The loader yields a rank's whole share of a step (batch x grad-accum) and the loop splits it
    # into micro-batches: epochs then end on step boundaries, so accumulating k micro-batches is
    # exactly one k times larger batch.
    loader = data.T2IBatches(train_ds, tok, first_id, args.batch_size * args.grad_accum,
                             seed=args.seed, p_drop_cond=args.p_drop_cond, rank=rank,
                             world_size=world, **common)
    if val is None:
        return loader, None
    # one pass without caption dropout, the same samples and sequences whatever the number of
    # ranks: rank r takes samples r, r + world, ...; the caller sums losses and target counts
    val_loader = data.T2IBatches(val, tok, first_id, 1, seed=args.seed, p_drop_cond=0.0,
                                 shuffle=False, **common)
    mine = list(range(rank, min(len(val), args.val_samples or len(val)), world))

    def val_batches():
        for s in range(0, len(mine), args.batch_size):
            seqs = [val_loader.sequence(0, p, p) for p in mine[s:s + args.batch_size]]
            yield data.collate(seqs, val_loader.pad_id)

    return loader, val_batches


def split(batch, b):
    """Micro-batches of b rows, each cut to its own longest sequence (right padding)."""
    out = []
    for i in range(0, len(batch["input_ids"]), b):
        T = int(batch["attention_mask"][i:i + b].sum(1).max())
        out.append({k: v[i:i + b, :T] for k, v in batch.items()})
    return out


def evaluate(loss_model, val_batches, autocast, device) -> float:
    """Validation loss: summed over the held-out samples of every rank, divided by their targets."""
    model = loss_model.model
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, target tokens
    with torch.no_grad(), autocast:
        for batch in val_batches():
            ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            n = (labels[:, 1:] != -100).sum().double()
            total += torch.stack([loss_model(ids, labels).double(), n])
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


# -------------------------------------------------------------------------------------------- ranks
class AllRanks(ValueError):
    """Set-up errors that the ranks compared: the message names the ranks unless all share it."""


@contextmanager
def ranks_agree(rank, world):
    """Run the set-up, then compare every rank's outcome in one collective. When any rank met bad
    input, rank 0 raises it, the ranks named where they differ, and the others exit with status
    2: the reason is printed once, whichever rank found it, and nobody reaches step 1."""
    error = None
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if world == 1:
            raise
        error = " ".join(str(e).split())
    if world == 1:
        return
    errors = [None] * world
    dist.all_gather_object(errors, error)
    ranks = {}  # message -> the ranks that met it
    for r, message in enumerate(errors):
        if message is not None:
            ranks.setdefault(message, []).append(r)
    if not ranks:
        return
    if rank != 0:
        raise SystemExit(2)
    if list(ranks.values()) == [list(range(world))]:
        raise AllRanks(error)
    raise AllRanks("; ".join(f"rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))}: {message}"
                             for message, rs in ranks.items()))


def pick_device(name, local_rank) -> torch.device:
    """--device as this rank's torch.device; a GPU becomes the current one."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no GPU is visible")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} but {torch.cuda.device_count()} GPU(s) are "
                         "visible: --nproc_per_node at most the GPUs")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


# --------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        run_main(PROG, run, args)
    finally:  # after the error is printed: the reason comes before the other ranks' reactions
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args):
    """train() in this process: one of torchrun's ranks (it sets RANK) or the only one. An error
    this rank found alone names the rank: the others are waiting for it and cannot report it."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        train(args, rank, world, device)
    except (ValueError, FileNotFoundError) as e:
        if world == 1 or isinstance(e, AllRanks):
            raise
        raise type(e)(f"rank {rank}: {e}") from None


def make_out_dir(out):
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # a file of that name, no permission, ...
        raise ValueError(f"--out {out}: cannot make the directory: {e.strerror}") from None


def train(args, rank, world, device):
    """The set-up, where every check runs before step 1, then nanoGPT's loop."""
    master = rank == 0

    # set-up, every check before step 1: bad input on any rank stops all of them here, reported once
    with ranks_agree(rank, world):
        check_flags(args)
        train_ds = data.CodeDataset(args.data)  # memory-mapped codes + captions
        codebook_size = args.codebook_size or train_ds.index.get("codebook_size", 64000)
        check_data(args, train_ds.index, codebook_size)
        resume = find_resume(args)
        state = load_trainer_state(resume, args, world) if resume else None
        model, tok = load_model(args, resume, codebook_size)
        source = resume or args.init  # the checkpoint the model comes from; none with --config
        aux = read_aux(source) if source else {}
        first_id = check_vocab(model, tok, codebook_size)
        max_pos = model.args.max_position_embeddings
        max_len = sequence_length(args, train_ds.index["grid"], tok, max_pos)
        loader, val_batches = load_data(args, train_ds, codebook_size, tok, first_id, rank, world,
                                        max_len)
        model.to(device).train()
        opt, sched = make_optimizer(args, model, device)
        step = restore(state, opt, sched, loader) if state else 0
        if master:
            make_out_dir(args.out)

    # the model as it trains: checkpointed and compiled blocks, DDP, autocast
    model.gradient_checkpointing = args.grad_checkpointing
    if args.compile:  # per block: the state dict keeps its names and the chunked loss stays eager
        for layer in model.layers:
            layer.compile()
    loss_model = NextTokenLoss(model, args.loss_chunk)
    ddp_model = loss_model
    if dist.is_initialized():
        ddp_model = DDP(loss_model, device_ids=[device.index] if device.type == "cuda" else None)
    amp_dtype = autocast_dtype(args.dtype, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    peak = peak_flops(args, device, amp_dtype or torch.float32)

    # what runs, the log, the progress bar
    if master:
        print(f"{'resuming from ' + resume if resume else 'starting'}: "
              f"{model.num_params() / 1e6:.2f}M parameters, vocab {model.args.vocab_size} "
              f"(image ids from {first_id}), {len(loader.dataset)} training samples, global batch "
              f"{args.batch_size} x {args.grad_accum} accumulated x {world} ranks, MFU against a "
              f"measured {peak / 1e9:.0f} GFLOP/s")
        if step >= args.steps:
            print(f"nothing to do: the checkpoint is at step {step}, --steps is {args.steps}")
    log = open(os.path.join(args.out, "log.jsonl"), "a", encoding="utf-8") if master else None
    bar = tqdm(total=args.steps, initial=step, disable=not master or args.no_progress,
               dynamic_ncols=True)

    it = iter(loader)
    end = min(args.steps, step + args.stop_after) if args.stop_after else args.steps
    while step < end:
        t0 = time.perf_counter()
        micro = split(next(it), args.batch_size)  # this rank's share of the step

        # The loss is the mean over every target token of the global batch. Normalising each
        # micro-batch's sum by the step's global token count (not by its own count) makes 2 ranks
        # x b or 2 x b accumulated exactly 1 rank x 2b. DDP averages gradients over ranks, hence
        # the factor world. stats: targets, tokens (both summed over ranks), summed loss.
        my_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        my_tokens = sum(b["input_ids"].numel() for b in micro)
        stats = torch.tensor([my_targets, my_tokens, 0.0], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(stats[:2])
        n_targets = stats[0].item()

        # forward and backward; gradients all-reduced on the last micro-batch only (what no_sync
        # toggles)
        for i, b in enumerate(micro):
            if ddp_model is not loss_model:
                ddp_model.require_backward_grad_sync = i == len(micro) - 1
            with autocast:
                loss = ddp_model(b["input_ids"].to(device), b["labels"].to(device))
            (loss * (world / n_targets)).backward()
            stats[2] += loss.detach().double()

        # clip, step the optimizer and the schedule
        grad_norm = None
        if args.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        # the loss over all ranks (a sync point, one float), throughput, MFU, validation
        if dist.is_initialized():
            dist.all_reduce(stats[2:])
        loss_value = stats[2].item() / n_targets
        dt = time.perf_counter() - t0
        tokens_per_s = stats[1].item() / dt  # all ranks, padding included: the work done
        seq_len = max(b["input_ids"].shape[1] for b in micro)
        mfu = flops_per_token(model.args, seq_len) * tokens_per_s / peak
        record = dict(step=step, loss=round(loss_value, 6), lr=lr,
                      tokens_per_s=round(tokens_per_s, 1), mfu=round(mfu, 4))
        if grad_norm is not None:
            record["grad_norm"] = round(grad_norm.item(), 4)
        if val_batches and args.val_every and (step % args.val_every == 0 or step == args.steps):
            record["val_loss"] = round(evaluate(loss_model, val_batches, autocast, device), 6)

        # progress bar and log (rank 0)
        if master:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}",
                            mfu=f"{mfu:.1%}")
            bar.update(1)
            if step % args.log_every == 0 or step == end or "val_loss" in record:
                log.write(json.dumps(record) + "\n")
                log.flush()

        # checkpoint: rank 0 writes, nobody runs ahead (or exits) meanwhile
        if step == end or (args.save_every and step % args.save_every == 0):
            if master:
                trainer = dict(step=step, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                               rng=rng_state(), loader=loader.state_dict(), args=vars(args),
                               world_size=world)
                path = save_checkpoint(args.out, step, model, tok, aux, trainer, args.keep)
                bar.write(f"step {step}: saved {path}")
            if dist.is_initialized():
                dist.barrier()
    bar.close()
    if log:
        log.close()


if __name__ == "__main__":
    main()

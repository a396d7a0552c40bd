"""The SimpleAR language model: a Qwen2 decoder with a fused static KV cache.

    python -m pytest tests/test_model.py          # parity with transformers, cache = no cache
    python bench.py decode --layers 4             # cached CFG decode vs the transformers path

SimpleAR adds no weights to Qwen2.5-Instruct: image codes are ordinary vocabulary rows
(215,672 = 151,665 text + 7 special + 64,000 codes). So this file is a plain Qwen2 decoder
that loads and saves Hugging Face checkpoints, plus two things generation needs:

* one preallocated KV buffer for all layers, written in place at explicit cache columns.
  Every call names the columns its tokens occupy (`input_pos`, [T] or per row [B, T]), so
  prefill, one-token decode, a window of W tokens (Jacobi decoding), rows that advance by
  different amounts, and rolling back (just write at earlier columns; a query never sees a
  column after its own) are the same code path, with static shapes for torch.compile. A window
  may also be a tree of candidate continuations (`tree=`), verified in one forward.
* logits for a slice of vocabulary rows (`vocab=(lo, hi)`), because image sampling only needs
  the 64,000 code rows and the full head is the largest matmul of a decode step.
* inference kernels for the hardware: `resolve_dtype` picks bf16 where it is native, and
  `prepare_decoding` packs bf16 weights for oneDNN on CPU (the projections that read the same
  input fused into one matmul) or quantizes them to int8.

Every row starts at cache column 0 and a token's RoPE position is its column (in a tree, its
root's column plus its depth), so prompts of different lengths share a batch by right padding,
and each row then advances at its own columns.
Attention spans a multiple of KV_GRAIN columns: a row's keys always sit at the same columns, and
the columns past its own are masked, so its results do not depend on its batch in any dtype (the
kernels' reductions group keys by column, not by how many other rows happen to hold).
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cli import write_atomic


@dataclass
class ModelArgs:
    vocab_size: int = 215672
    dim: int = 896
    n_layers: int = 24
    n_heads: int = 14
    n_kv_heads: int = 2
    intermediate_size: int = 4864
    head_dim: int = 0  # 0: dim // n_heads, as in every Qwen2 config
    rope_theta: float = 1e6
    norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model config {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        if cfg.get("model_type") != "qwen2":
            raise ValueError(f"config model_type is {cfg.get('model_type')!r}, expected 'qwen2'")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        # transformers >= 5 moves rope_theta into rope_parameters; only plain RoPE is supported
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope scaling {rope!r} is not supported")
        return cls(
            vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"], head_dim=cfg.get("head_dim") or 0,
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))

    def to_hf_config(self, dtype: torch.dtype = torch.float32) -> dict:
        return {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "vocab_size": self.vocab_size, "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim, "hidden_act": "silu", "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": self.n_layers, "attention_dropout": 0.0,
            "initializer_range": 0.02, "use_cache": True,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


PRESETS = {
    # Qwen2.5-{0.5B,1.5B}-Instruct shapes (their config.json) with SimpleAR's vocabulary
    "simplear-0.5b": dict(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, intermediate_size=4864),
    "simplear-1.5b": dict(dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, intermediate_size=8960),
    # test sizes: 300 text ids + 7 special + 4,096 codes, laid out like SimpleAR's vocabulary
    "tiny": dict(vocab_size=4403, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 intermediate_size=128, max_position_embeddings=2048, bos_token_id=None,
                 eos_token_id=None),
    # the shipped nano model (recipes/nano.sh), trained from scratch; train.py sets its vocab size
    "nano": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=768,
                 max_position_embeddings=512, bos_token_id=None, eos_token_id=None),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in float32 whatever the weights' dtype, as Qwen2 does: bf16 squares lose the mean
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [B, 1, T, head_dim] for integer positions pos [B, T], in Qwen2's half-rotation
    layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    freqs = pos.float()[..., None] * inv_freq  # computed from scratch each call: exact, and cheap
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def cpuinfo() -> str:
    """The text of /proc/cpuinfo, or "" where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_vendor() -> str:
    """The CPU's vendor id ("AuthenticAMD", "GenuineIntel", ...), or "" where it is not known."""
    for line in cpuinfo().splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return ""


# float32 decode rows take W @ x.T on AMD CPUs, where MKL's x @ W.T reads weights at a third of
# the bandwidth (10 GB/s against 31 on an AVX512-BF16 EPYC, 5 against 12 on an AVX2-only one),
# and F.linear elsewhere: on a 2-core AMX Xeon W @ x.T is the slow one (13 GB/s against 27). A
# fixed rule, not a timing, so that every process on a machine computes the same numbers.
ROWS_FIRST = cpu_vendor() == "AuthenticAMD"


def linear(x, w, b=None, packed=None):
    """F.linear [..., K] x [N, K] -> [..., N], with faster CPU kernels for inference.

    * packed: oneDNN's blocked copy of w (`pack_weights`), for bf16 on CPUs oneDNN packs for
      (onednn_bf16_packing). F.linear reorders the weight into that layout on every call; packed
      once, a 2-row decode step reads bf16 weights at 22 GB/s instead of 17 on an AVX512-BF16 EPYC,
      for the same row-wise results at any row count.
    * float32 with 1-8 rows on CPUs where it reads weights faster (`ROWS_FIRST`): W @ x.T. In
      bf16, W @ x.T is the slower one, hence float32 only.
    """
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, b, "none", [], "")
    rows = x.numel() // x.shape[-1]
    if rows > 8 or x.device.type != "cpu" or w.dtype != torch.float32 or not ROWS_FIRST:
        return F.linear(x, w, b)
    y = (w @ x.reshape(rows, -1).contiguous().t()).t()
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], -1)


def packed_allowed() -> bool:
    """Whether a call may use the packed and fused copies (`pack_weights`, `fuse`): they are eager
    kernels for inference, so autograd and compiled graphs use the weights themselves."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


class Linear(nn.Linear):
    """nn.Linear through `linear`; `packed` holds oneDNN's copy of the weight once packed."""

    packed = None

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.packed if packed_allowed() else None)


class Int8Linear(nn.Module):
    """Weight-only int8 with one scale per output row, as gpt-fast quantizes: w ~ q * scale,
    q = round(w / scale) in [-127, 127], scale = max |w_row| / 127. Activations stay in their dtype.

    On CPU with bf16 activations, PyTorch's int8 weight-only kernel (`torch._weight_int8pack_mm`)
    reads the int8 weights directly; elsewhere the weights are dequantized per call.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(weight.dtype))
        self.bias = bias

    def forward(self, x):
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
            y = y.reshape(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias


def fuse(parts: list[nn.Module]) -> tuple[nn.Module, list[int]] | None:
    """One packed module over the output rows of parts, linear layers that read the same input (q,
    k, v; gate, up), and each part's row count, for `project`; None unless the parts are packed
    (`pack_weights`). A decode step then makes one call where it made len(parts), as gpt-fast
    fuses wq, wk and wv: alone, the k and v matrices of the 0.5B shape ([128, 896]) are too small
    for oneDNN to read at the memory's speed with the 2 rows of a CFG pair. Each output is the
    same dot product (bitwise the same on the CPUs we tried). The parts hand their packed copies
    over and keep their weights (for autograd and saving), so memory stays as it was. int8
    weights are not fused: PyTorch's int8 kernel gained nothing from it."""
    if not all(isinstance(m, Linear) and m.packed is not None for m in parts):
        return None
    sizes = [m.weight.shape[0] for m in parts]
    w = torch.cat([m.weight.detach() for m in parts])
    # the fused module is only ever called packed (`project`): its weight stays on the meta device
    fused = Linear(w.shape[1], w.shape[0], bias=parts[0].bias is not None, device="meta")
    fused.packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in parts]), requires_grad=False)
    for m in parts:
        m.packed = None
    return fused, sizes


def project(x, parts, fused):
    """Each of parts' outputs for x [..., K]: one call through fused (`fuse`) in eager inference,
    each part's own under autograd and torch.compile (which never see the packed copies)."""
    if fused is None or not packed_allowed():
        return tuple(m(x) for m in parts)
    return fused[0](x).split(fused[1], dim=-1)


class Attention(nn.Module):
    fused = None  # prepare_decoding: one module over q_proj's, k_proj's and v_proj's rows (`fuse`)

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = Linear(a.dim, a.n_heads * a.head_dim, bias=True)
        self.k_proj = Linear(a.dim, a.n_kv_heads * a.head_dim, bias=True)
        self.v_proj = Linear(a.dim, a.n_kv_heads * a.head_dim, bias=True)
        self.o_proj = Linear(a.n_heads * a.head_dim, a.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, kv_cache=None, cols=None, kv_len=None):
        """x [B, T, dim]. With kv_cache ([2, B', n_kv_heads, S, head_dim], B' >= B): row b's keys
        and values are written at its cache columns cols [B, T], then it attends over the first
        kv_len columns, as mask [B, 1, rep*T, kv_len] allows."""
        B, T, _ = x.shape
        hd, nkv = self.head_dim, self.n_kv_heads
        rep = self.n_heads // nkv
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj), self.fused)
        q = q.reshape(B, T, self.n_heads, hd).transpose(1, 2)
        k = k.reshape(B, T, nkv, hd).transpose(1, 2)
        v = v.reshape(B, T, nkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is None:  # training and references: plain causal attention
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k_cache, v_cache = kv_cache[0][:B], kv_cache[1][:B]
            rows = torch.arange(B, device=x.device)[:, None]
            # row b's T tokens go to its columns cols[b]: an indexed write of [B, T, nkv, hd]
            k_cache[rows, :, cols] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows, :, cols] = v.transpose(1, 2).to(v_cache.dtype)
            k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
            # Grouped-query attention without copying keys: fold the `rep` query heads that share a
            # key head into the query length, so K/V are read once per key head
            q = q.reshape(B, nkv, rep * T, hd)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        y = y.reshape(B, self.n_heads, T, hd).transpose(1, 2).reshape(B, T, self.n_heads * hd)
        return self.o_proj(y)


class MLP(nn.Module):
    fused = None  # prepare_decoding: one module over gate_proj's and up_proj's rows (`fuse`)

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(a.dim, a.intermediate_size, bias=False)
        self.up_proj = Linear(a.dim, a.intermediate_size, bias=False)
        self.down_proj = Linear(a.intermediate_size, a.dim, bias=False)

    def forward(self, x):
        gate, up = project(x, (self.gate_proj, self.up_proj), self.fused)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, cos, sin, mask=None, kv_cache=None, cols=None, kv_len=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cols, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


KV_GRAIN = 64  # attention lengths and cache sizes are multiples of this (see the docstring)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16). Without them
    oneDNN emulates bf16 matmuls, which some CPUs run hundreds of times slower than float32."""
    try:
        caps = torch._C._cpu._get_cpu_capability()  # what PyTorch's own kernels dispatch on
    except AttributeError:  # an older or newer torch: ask the kernel instead
        caps = dict.fromkeys(cpuinfo().split(), True)
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_dtype(name: str, device) -> tuple[torch.dtype, str | None]:
    """(dtype, warning or None) for a --dtype flag: "auto" is bfloat16 where the hardware computes
    it natively (a CUDA device that supports it, a CPU with bf16 instructions), else float32.
    The warning is one line, for a dtype that runs but is very slow on this hardware."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), None
        native = device.type == "cpu" and cpu_bf16_native()
        return (torch.bfloat16 if native else torch.float32), None
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32 and not cpu_bf16_native():
        return dtype, (f"{name} on a CPU without bf16 instructions is emulated and can be far "
                       "slower than float32 (--dtype auto picks float32 here)")
    return dtype, None


def onednn_bf16_packing() -> bool:
    """Whether oneDNN can pack bf16 weights on this CPU: it needs AVX512 (BW, VL, DQ) or
    AVX-NE-CONVERT, and refuses the reorder elsewhere (an AVX2-only CPU), where F.linear runs."""
    ops = torch.ops.mkldnn
    return (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_is_mkldnn_bf16_supported")
            and ops._is_mkldnn_bf16_supported())


def pack_weights(model: nn.Module):
    """Gives every `Linear` of model oneDNN's packed copy of its weight when that pays: bf16 on a
    CPU that oneDNN packs for (see `linear`), and drops the fused copies (`fuse`). The copies are
    for inference: after changing the weights, Transformer.prepare_decoding refreshes them all."""
    packable = onednn_bf16_packing()
    for m in model.modules():
        if getattr(m, "fused", None) is not None:
            m.fused = None  # a stale fused copy goes before its parts are packed anew (`fuse`)
        if isinstance(m, Linear):
            w = m.weight.detach()
            pack = packable and w.device.type == "cpu" and w.dtype == torch.bfloat16
            m.packed = torch.ops.mkldnn._reorder_linear_weight(w, 2) if pack else None


class KVCache(nn.Module):
    """Keys and values of every layer in one buffer [n_layers, 2, B, n_kv_heads, S, head_dim],
    S a multiple of KV_GRAIN. Rows are independent, so a prefilled row can be copied into others
    (a CFG pair, a GRPO group) instead of recomputed.
    """

    def __init__(self, a: ModelArgs, batch_size: int, max_seq_len: int, dtype, device):
        super().__init__()
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        shape = (a.n_layers, 2, batch_size, a.n_kv_heads, max_seq_len, a.head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def copy_rows(self, src, dst):
        """Row dst[i] becomes a copy of row src[i] (all columns, all layers)."""
        src = torch.as_tensor(src, device=self.kv.device)
        dst = torch.as_tensor(dst, device=self.kv.device)
        self.kv[:, :, dst] = self.kv[:, :, src]

    def move(self, src, dst):
        """Row r's keys and values at columns src[r, j] are copied to columns dst[r, j], all layers,
        every source read before any write: src, dst [R, P] long for the first R rows."""
        rows = torch.arange(src.shape[0], device=src.device)[:, None].expand_as(src)
        self.kv[:, :, rows, :, dst] = self.kv[:, :, rows, :, src]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        tied = args.tie_word_embeddings
        self.lm_head = None if tied else Linear(args.dim, args.vocab_size, bias=False)
        self.cache: KVCache | None = None
        self.gradient_checkpointing = False
        # prepare_decoding(): (lo, hi, module), a head over vocabulary rows [lo, hi) only, packed or
        # int8. A tuple, so that it stays out of parameters() and the state dict.
        self.decode_head: tuple[int, int, nn.Module] | None = None

    def head_weight(self):
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # ----------------------------------------------------------------------------------------
    # forward

    def forward(self, tokens, input_pos=None, vocab=None, kv_len=None, last_only=False,
                tree=None):
        """Float32 logits [B, T, V] for tokens [B, T] (V = hi - lo when vocab=(lo, hi); T = 1 when
        last_only).

        Without input_pos: an uncached causal forward over positions 0..T-1 (training, references).
        With input_pos, the cache columns of the tokens: [T] for every row, or [B, T] for row b's
        own columns, so rows can hold different numbers of tokens. Each token is written to
        `self.cache` at its column and sees the columns <= its own, so
        rolling back is writing at earlier columns. kv_len limits attention to the first kv_len
        cache columns, rounded up to a multiple of KV_GRAIN (an eager speed-up; under
        torch.compile leave it None: static shapes).

        tree [T, T] or, one per row, [B, T, T] bool (with input_pos): the tokens are a tree of
        continuations, as speculative decoding verifies (SpecInfer, arXiv 2305.09781): tree[t, s]
        says token s is token t or
        one of its ancestors (token 0, the root, has none). Token t then sees the columns before
        the root's and its ancestors' columns, and its RoPE position is the root's column plus
        its depth. The full lower triangle (a chain) is the plain causal window. Once a path is
        chosen, `cache.move` puts its keys at the columns of their positions. Raises ValueError
        for a tree without input_pos.
        """
        h = self.hidden(tokens, input_pos, kv_len, tree)
        if last_only:
            h = h[:, -1:]
        return self.logits(h, vocab)

    def logits(self, h, vocab=None):
        """Head over vocabulary rows [lo, hi) only: float32 logits [..., hi - lo]. Uses the head
        prepare_decoding built for those rows (inference only), else a view of the weight."""
        lo, hi = vocab or (0, self.args.vocab_size)
        head = self.decode_head
        if head is not None and head[:2] == (lo, hi) and not torch.is_grad_enabled():
            return head[2](h).float()
        return linear(h, self.head_weight()[lo:hi]).float()

    def hidden(self, tokens, input_pos=None, kv_len=None, tree=None):
        """Final-norm hidden states [B, T, dim]."""
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        mask = cols = None
        if input_pos is None:
            if tree is not None:
                raise ValueError("a token tree is verified in the cache: give input_pos")
            pos = torch.arange(T, device=tokens.device).expand(B, T)
        else:
            if self.cache is None:
                raise ValueError("input_pos given but no cache: call setup_cache() first")
            S = self.cache.max_seq_len
            kv_len = S if kv_len is None else min(S, -(-kv_len // KV_GRAIN) * KV_GRAIN)
            cols = input_pos.expand(B, T)  # [T] or [B, T] -> [B, T]
            key = torch.arange(kv_len, device=tokens.device)
            if tree is None:
                mask = key <= cols[:, None, :, None]  # [B, 1, T, kv_len]: causal by column
                pos = cols
            else:  # the root's prefix, then the columns of each token's ancestors
                at = (key == cols[..., None]).float()  # [B, T, kv_len]: token s's column
                sees = (tree.float() @ at > 0) | (key < cols[:, :1, None])
                mask = sees[:, None]
                pos = cols[:, :1] + tree.sum(-1) - 1
            rep = self.args.n_heads // self.args.n_kv_heads
            mask = mask.repeat(1, 1, rep, 1)  # as Attention folds grouped query heads
        cos, sin = rope_cos_sin(pos, self.args.head_dim, self.args.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            kv = None if input_pos is None else self.cache.kv[i]
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv, cols, kv_len)
        return self.norm(x)

    # ----------------------------------------------------------------------------------------
    # cache

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> KVCache:
        """A zeroed cache of batch_size rows and at least max_seq_len columns (rounded up to
        KV_GRAIN); the current one is reused when it has the same size (a compiled decode step then
        sees the same buffers)."""
        max_seq_len = -(-max_seq_len // KV_GRAIN) * KV_GRAIN
        p = self.embed_tokens.weight
        dtype = dtype or p.dtype
        device = device or p.device
        c = self.cache
        size = (batch_size, max_seq_len, dtype)
        if c is None or (c.batch_size, c.max_seq_len, c.kv.dtype) != size:
            self.cache = KVCache(self.args, batch_size, max_seq_len, dtype, device)
        else:
            c.kv.zero_()
        return self.cache

    def prefill(self, prompts: list[list[int]], vocab=None):
        """Runs the prompts in cache rows 0..len-1, each from column 0 (right-padded): returns the
        logits after each prompt's last token [len(prompts), V] and each row's next free column,
        its prompt's length (LongTensor [len(prompts)]). ValueError when they do not fit the cache;
        RuntimeError under autograd (the cache is written in place)."""
        T = max(len(p) for p in prompts)
        if self.cache is None or len(prompts) > self.cache.batch_size or T > self.cache.max_seq_len:
            raise ValueError("prefill does not fit the cache: call setup_cache() with enough rows "
                             "and columns")
        if torch.is_grad_enabled():
            raise RuntimeError("prefill writes the cache in place: call it under torch.no_grad()")
        device = self.cache.kv.device
        tokens = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        ends = torch.tensor([len(p) for p in prompts], device=device)
        h = self.hidden(tokens, input_pos=torch.arange(T, device=device), kv_len=T)
        last = h[torch.arange(len(prompts), device=device), ends - 1]  # [B, dim]
        return self.logits(last, vocab), ends

    # ----------------------------------------------------------------------------------------
    # inference kernels

    @torch.no_grad()
    def prepare_decoding(self, vocab: tuple[int, int], quantize: str | None = None):
        """Readies the weights for fast inference (not training): int8 weights when quantize ==
        "int8" (every linear layer and the head rows; the embedding stays), and oneDNN-packed bf16
        weights on CPUs that allow it (onednn_bf16_packing). The head over rows [lo, hi) becomes
        its own module, so that a tied head is packed or quantized for the rows that are sampled
        only. Where packed, the layers that read the same input (q, k, v; gate, up) run as one call
        each (`fuse`). Memory: packing keeps the weights too (autograd and saving use
        them), so bf16 linear weights take twice their size; int8 replaces them. Returns self."""
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        lo, hi = vocab
        head = self.head_weight()[lo:hi]
        if quantize == "int8":
            for parent in self.modules():
                for name, child in list(parent.named_children()):
                    if isinstance(child, Linear) and child is not self.lm_head:
                        setattr(parent, name, Int8Linear(child.weight, child.bias))
            module = Int8Linear(head)
        else:
            module = Linear(self.args.dim, hi - lo, bias=False, device="meta")
            module.weight = nn.Parameter(head, requires_grad=False)
            pack_weights(self)
            pack_weights(module)
        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            attn.fused = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            mlp.fused = fuse([mlp.gate_proj, mlp.up_proj])
        self.decode_head = (lo, hi, module)
        return self

    # ----------------------------------------------------------------------------------------
    # Hugging Face checkpoints

    @staticmethod
    def hf_key(name: str) -> str:
        return name if name.startswith("lm_head.") else "model." + name

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        """A Hugging Face Qwen2 directory (config.json, model.safetensors or shards), strictly: a
        missing or unexpected key, or a shape that differs, is a ValueError naming the key and both
        shapes. The head is tied to the embedding unless the file holds an lm_head.weight of its
        own that differs from it, as transformers (>= 5) loads it: a tied config with a different
        head in the file uses that head. Older files' rotary_emb.inv_freq buffers are skipped."""
        path = str(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json in {path}")
        try:
            with open(cfg_path, encoding="utf-8-sig") as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        args = ModelArgs.from_hf_config(cfg)
        tensors = read_safetensors(path)
        # a buffer transformers < 4.40 saved and recomputes on load: never a weight
        tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
        head = tensors.get("lm_head.weight")
        embed = tensors.get("model.embed_tokens.weight")
        same = head is not None and embed is not None and torch.equal(head, embed)
        args.tie_word_embeddings = head is None or (args.tie_word_embeddings and same)
        if args.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        with torch.device("meta"):
            model = cls(args)
        expected = {cls.hf_key(k): v.shape for k, v in model.state_dict().items()}
        for k, shape in expected.items():
            if k not in tensors:
                raise ValueError(f"{path}: missing key {k} (expected shape {tuple(shape)})")
            if tensors[k].shape != shape:
                raise ValueError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, "
                                 f"expected {tuple(shape)}")
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            extra = unexpected[0]
            shape = tuple(tensors[extra].shape)
            raise ValueError(f"{path}: unexpected key {extra} (shape {shape})")
        state = {k: tensors[cls.hf_key(k)].to(device=device, dtype=dtype)
                 for k in model.state_dict()}
        model.load_state_dict(state, assign=True)
        return model.eval()

    def save_pretrained(self, path):
        """config.json + model.safetensors in Hugging Face Qwen2 layout, each written under a
        temporary name and renamed (cli.write_atomic)."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        state = {self.hf_key(k): v.detach().contiguous().cpu()
                 for k, v in self.state_dict().items()}
        config = json.dumps(self.args.to_hf_config(self.embed_tokens.weight.dtype), indent=2)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            os.remove(index)  # stale shards would shadow ours
        write_atomic(os.path.join(path, "model.safetensors"),
                     lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        write_atomic(os.path.join(path, "config.json"),
                     lambda tmp: Path(tmp).write_text(config))

    def num_params(self, non_embedding=False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if non_embedding else n


def read_safetensors(path: str) -> dict:
    """All tensors of model.safetensors or of the shards named by model.safetensors.index.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index, encoding="utf-8-sig") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(path, s) for s in shards]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    tensors = {}
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"missing weight shard {file}")
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"cannot read {file} (truncated or corrupt?): {e}") from None
    return tensors

"""
NVIDIA Cosmos-1.0-Tokenizer-DV8x16x16 (the visual tokenizer of SimpleAR) as plain nn.Modules.

    python cosmos_tokenizer.py --ckpt checkpoints/Cosmos-1.0-Tokenizer-DV8x16x16 --image in.png \\
        --out rec.png
    python cosmos_tokenizer.py --ckpt DIR --image in.png --out rec.png --size 512 --device cuda \\
        --dtype bfloat16
    python -m pytest -q tests/test_cosmos_tokenizer.py

An image is a one-frame video: [B, 3, H, W] in [-1, 1] -> a code grid [B, H/16, W/16] in
0..63,999 and back. The network is a causal video autoencoder: a 2-level 3D Haar patcher (4x in t,
h, w), factorized (1x3x3 then 3x1x1) causal convolutions, per-frame GroupNorm(1), hybrid
down/upsamplers, spatial + causal temporal attention in the mid blocks, and FSQ with levels
[8, 8, 8, 5, 5, 5]. Weights load by name from NVIDIA's TorchScript files (encoder.jit /
decoder.jit / autoencoder.jit, bf16) or from our own config.json + model.safetensors.

Sources: the model card of nvidia/Cosmos-1.0-Tokenizer-DV8x16x16 on Hugging Face, and NVIDIA's
code in the NVIDIA/Cosmos-Tokenizer repository: cosmos_tokenizer/networks/configs.py (the
constructor arguments), networks/discrete_video.py (CausalDiscreteVideoTokenizer and the
encoder_jit / decoder_jit Sequentials, which set the key prefixes), modules/layers3d.py (the
encoder, decoder and their blocks), modules/patching.py (the Haar patcher), modules/quantizers.py
(FSQuantizer) and utils.py (tensor2numpy). The same package lives in NVIDIA/Cosmos under
cosmos1/models/tokenizer/. How SimpleAR preprocesses images (ADM center crop, Normalize(0.5, 0.5)):
wdrink/SimpleAR, simpar/data/extract_token.py.
"""

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from cli import Parser, run_main, write_atomic

# -----------------------------------------------------------------------------
# config


@dataclass
class CosmosConfig:
    """NVIDIA's constructor arguments (cosmos_tokenizer/networks/configs.py); the defaults are
    DV8x16x16."""

    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channels_mult: list[int] = field(default_factory=lambda: [2, 4, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [32])
    # only tracks where attn_resolutions apply; does not limit the input size
    resolution: int = 1024
    dropout: float = 0.0
    patch_size: int = 4
    patch_method: str = "haar"
    z_channels: int = 16
    z_factor: int = 1
    embedding_dim: int = 6
    levels: list[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])
    spatial_compression: int = 16
    temporal_compression: int = 8
    legacy_mode: bool = False

    def __post_init__(self):
        if self.patch_method != "haar":
            raise ValueError(f"patch_method {self.patch_method!r}: only 'haar' is implemented")
        for name in ("patch_size", "spatial_compression", "temporal_compression"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two")
        max_downs = len(self.channels_mult) - 1  # the last level never resamples
        for name in ("spatial_compression", "temporal_compression"):
            downs = self.num_downs(name)
            if not 0 <= downs <= max_downs:
                raise ValueError(f"{name}={getattr(self, name)} needs {downs} resamplings after "
                                 f"the patch_size={self.patch_size} patcher; channels_mult allows "
                                 f"0..{max_downs}")
        n_spatial = self.num_downs("spatial_compression")
        n_temporal = self.num_downs("temporal_compression")
        ups = [self.up_flags(i) for i in range(1, len(self.channels_mult))]
        if sum(s for s, _ in ups) != n_spatial or sum(t for _, t in ups) != n_temporal:
            raise ValueError(f"NVIDIA's decoder rule (legacy_mode={self.legacy_mode}) cannot undo "
                             f"{n_spatial} spatial and {n_temporal} temporal downsamplings with "
                             f"channels_mult={self.channels_mult}")
        if self.embedding_dim != len(self.levels):
            raise ValueError(f"embedding_dim={self.embedding_dim} must equal "
                             f"len(levels)={len(self.levels)} (FSQ without projections)")

    def num_downs(self, name: str) -> int:
        return int(math.log2(getattr(self, name))) - int(math.log2(self.patch_size))

    def down_flags(self, i: int) -> tuple[bool, bool]:
        """(spatial, temporal) downsampling after encoder level i < len(channels_mult) - 1: the
        first levels."""
        return i < self.num_downs("spatial_compression"), i < self.num_downs("temporal_compression")

    def up_flags(self, i: int) -> tuple[bool, bool]:
        """(spatial, temporal) upsampling after decoder level i >= 1, NVIDIA's DecoderFactorized
        rule. Non-legacy (the released files): time is upsampled where the encoder downsampled it;
        legacy: at the coarsest levels."""
        n_spatial = self.num_downs("spatial_compression")
        n_temporal = self.num_downs("temporal_compression")
        rev = len(self.channels_mult) - 1 - i
        temporal = rev < n_temporal if self.legacy_mode else 0 < rev < n_temporal + 1
        return temporal or (rev < n_spatial and n_spatial > n_temporal), temporal

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CosmosConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type"})
        if unknown:
            raise ValueError(f"unknown CosmosConfig keys: {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_name(cls, name: str) -> "CosmosConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown Cosmos preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls.from_dict(PRESETS[name])


# Small presets keep DV8x16x16's architecture and compression (same code grid sizes), only
# narrower/shallower.
PRESETS = {
    "dv8x16x16": {},
    "dv-small": {"channels": 32, "num_res_blocks": 1},
    "dv-tiny": {"channels": 8, "num_res_blocks": 1},
    # the shipped nano model (train_vq.py): 64 px -> 8x8 codes of 1,000; one frame (no time
    # resampling)
    "nano": {"channels": 32, "channels_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
             "resolution": 64, "spatial_compression": 8, "temporal_compression": 4,
             "levels": [8, 5, 5, 5], "embedding_dim": 4},
}

# -----------------------------------------------------------------------------
# Haar patcher: each 2x2x2 (t, h, w) block -> 8 bands, band bits (t, h, w), a high band negates
# the odd element.


def _haar_signs(device, dtype) -> torch.Tensor:
    """[8 bands, 8 positions]: (-1)^popcount(band & position), bits ordered (t, h, w); symmetric,
    S @ S = 8 I."""
    i = torch.arange(8)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    odd = (bits & 1) ^ ((bits >> 1) & 1) ^ ((bits >> 2) & 1)
    return (1 - 2 * odd).to(device=device, dtype=dtype)


def haar_patch(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*p^3, (T+p-1)/p, H/p, W/p]; channel = band * C_in + c at every
    level."""
    # The first frame stands alone: it is repeated to a full patch of p frames.
    x = torch.cat([x[:, :, :1].expand(-1, -1, patch_size - 1, -1, -1), x], dim=2)
    signs = _haar_signs(x.device, x.dtype) / 8
    for _ in range(int(math.log2(patch_size))):
        B, C, T, H, W = x.shape
        x = x.reshape(B, C, T // 2, 2, H // 2, 2, W // 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        x = torch.einsum("bcthwp,qp->bqcthw", x.reshape(B, C, T // 2, H // 2, W // 2, 8), signs)
        x = x.reshape(B, 8 * C, T // 2, H // 2, W // 2)
    return x


def haar_unpatch(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Exact inverse of haar_patch: [B, C*p^3, t, h, w] -> [B, C, p*t-p+1, p*h, p*w]."""
    signs = _haar_signs(x.device, x.dtype)
    for _ in range(int(math.log2(patch_size))):
        B, C8, T, H, W = x.shape
        C = C8 // 8
        x = torch.einsum("bqcthw,qp->bcthwp", x.reshape(B, 8, C, T, H, W), signs)
        x = x.reshape(B, C, T, H, W, 2, 2, 2).permute(0, 1, 2, 5, 3, 6, 4, 7)
        x = x.reshape(B, C, 2 * T, 2 * H, 2 * W)
    return x[:, :, patch_size - 1:]


# -----------------------------------------------------------------------------
# building blocks (attribute names follow NVIDIA's so that state_dict keys match the released files)


class CausalConv3d(nn.Module):
    """Conv3d with causal time padding (copies of the first frame, none on the right) and zero
    space padding."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=1, time_stride=1, padding=0):
        super().__init__()
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride=(time_stride, stride, stride))
        self.time_pad = kernel[0] - time_stride
        self.padding = (0, padding, padding)

    def forward(self, x):
        conv = self.conv3d
        if x.shape[2] == 1 and self.time_pad > 0 and conv.stride[0] == 1:
            # A lone frame padded with copies of itself: every time tap reads the same frame, so
            # summing the taps is the same conv at a third of the cost and without the padded copy.
            weight = conv.weight.sum(2, keepdim=True)
            return F.conv3d(x, weight, conv.bias, conv.stride, self.padding)
        if self.time_pad > 0:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        return F.conv3d(x, conv.weight, conv.bias, conv.stride, self.padding)


def factorized_conv(cin, cout):
    """3x3x3 conv factorized as a 1x3x3 spatial conv then a 3x1x1 causal temporal conv."""
    return nn.Sequential(CausalConv3d(cin, cout, (1, 3, 3), padding=1),
                         CausalConv3d(cout, cout, (3, 1, 1)))


class CausalNormalize(nn.Module):
    """GroupNorm(1) per frame: statistics over (C, H, W) of each frame, so no frame sees a later
    one."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels, eps=1e-6)

    def forward(self, x):
        B, C, T, H, W = x.shape
        x = self.norm(x.transpose(1, 2).reshape(B * T, C, H, W))
        return x.reshape(B, T, C, H, W).transpose(1, 2)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, dropout):
        super().__init__()
        self.norm1 = CausalNormalize(cin)
        self.conv1 = factorized_conv(cin, cout)
        self.norm2 = CausalNormalize(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = factorized_conv(cout, cout)
        self.nin_shortcut = CausalConv3d(cin, cout) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class _Attention(nn.Module):
    """Single-head attention with 1x1x1 q/k/v/proj_out convs; subclasses choose what a sequence
    is."""

    def __init__(self, channels):
        super().__init__()
        self.norm = CausalNormalize(channels)
        self.q = CausalConv3d(channels, channels)
        self.k = CausalConv3d(channels, channels)
        self.v = CausalConv3d(channels, channels)
        self.proj_out = CausalConv3d(channels, channels)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (self.to_seq(m(h)) for m in (self.q, self.k, self.v))
        # scale C^-0.5, as NVIDIA's CausalAttnBlock
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return x + self.proj_out(self.from_seq(o, x.shape))


class SpatialAttention(_Attention):
    """Every frame attends over its own H*W positions."""

    causal = False

    @staticmethod
    def to_seq(x):  # [B, C, T, H, W] -> [B*T, 1, H*W, C]
        B, C, T, H, W = x.shape
        return x.permute(0, 2, 3, 4, 1).reshape(B * T, 1, H * W, C)

    @staticmethod
    def from_seq(o, shape):
        B, C, T, H, W = shape
        return o.reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)


class TemporalAttention(_Attention):
    """Every position attends over the current and earlier frames."""

    causal = True

    @staticmethod
    def to_seq(x):  # [B, C, T, H, W] -> [B*H*W, 1, T, C]
        B, C, T, H, W = x.shape
        return x.permute(0, 3, 4, 2, 1).reshape(B * H * W, 1, T, C)

    @staticmethod
    def from_seq(o, shape):
        B, C, T, H, W = shape
        return o.reshape(B, H, W, T, C).permute(0, 4, 3, 1, 2)


def attention_pair(channels):
    return nn.Sequential(SpatialAttention(channels), TemporalAttention(channels))


def _avg_pool(x, kt, ks):
    """avg_pool3d with kernel = stride = (kt, ks, ks), trailing partial windows dropped;
    avg_pool3d itself has no bf16 CPU kernel."""
    B, C, T, H, W = x.shape
    T = T // kt
    H = H // ks
    W = W // ks
    x = x[:, :, :T * kt, :H * ks, :W * ks]
    return x.reshape(B, C, T, kt, H, ks, W, ks).mean((3, 5, 7))


class HybridDownsample(nn.Module):
    """Strided conv + average pool, in space (1+2k frames stay, H/2) and/or time (1+2k -> 1+k
    frames).

    A disabled branch has no conv at all, which is what the released files hold (no keys for it)."""

    def __init__(self, channels, spatial, temporal):
        super().__init__()
        self.spatial, self.temporal = spatial, temporal
        if spatial:
            self.conv1 = CausalConv3d(channels, channels, (1, 3, 3), stride=2)
        if temporal:
            self.conv2 = CausalConv3d(channels, channels, (3, 1, 1), time_stride=2)
        if spatial or temporal:
            self.conv3 = CausalConv3d(channels, channels)

    def forward(self, x):
        if self.spatial:
            # right/bottom only: output pixel i reads input rows 2i..2i+2
            x = F.pad(x, (0, 1, 0, 1))
            x = self.conv1(x) + _avg_pool(x, 1, 2)
        if self.temporal:
            x = torch.cat([x[:, :, :1], x], dim=2)
            x = self.conv2(x) + _avg_pool(x, 2, 1)
        return self.conv3(x) if self.spatial or self.temporal else x


class HybridUpsample(nn.Module):
    """Repeat + residual conv, in time (T -> 2T-1) and/or space (nearest x2)."""

    def __init__(self, channels, spatial, temporal):
        super().__init__()
        self.spatial, self.temporal = spatial, temporal
        if temporal:
            self.conv1 = CausalConv3d(channels, channels, (3, 1, 1))
        if spatial:
            self.conv2 = CausalConv3d(channels, channels, (1, 3, 3), padding=1)
        if spatial or temporal:
            self.conv3 = CausalConv3d(channels, channels)

    def forward(self, x):
        if self.temporal:
            x = x.repeat_interleave(2, dim=2)[:, :, 1:]
            x = self.conv1(x) + x
        if self.spatial:
            x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
            x = self.conv2(x) + x
        return self.conv3(x) if self.spatial or self.temporal else x


def _mid(channels, dropout):
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = attention_pair(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def _run_mid(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """EncoderFactorized: [B, 3, 1+8k, H, W] -> [B, z_factor*z_channels, 1+k, H/16, W/16]."""

    def __init__(self, cfg: CosmosConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        c, mults = cfg.channels, cfg.channels_mult
        self.conv_in = factorized_conv(cfg.in_channels * cfg.patch_size ** 3, c)
        # curr_res halves at every level, resampling or not, exactly as NVIDIA tracks it (it decides
        # where attention goes)
        curr_res = cfg.resolution // cfg.patch_size
        block_in = c
        self.down = nn.ModuleList()
        for i, mult in enumerate(mults):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, c * mult, cfg.dropout))
                block_in = c * mult
                if curr_res in cfg.attn_resolutions:
                    level.attn.append(attention_pair(block_in))
            if i != len(mults) - 1:
                level.downsample = HybridDownsample(block_in, *cfg.down_flags(i))
                curr_res //= 2
            self.down.append(level)
        self.mid = _mid(block_in, cfg.dropout)
        self.norm_out = CausalNormalize(block_in)
        self.conv_out = factorized_conv(block_in, cfg.z_factor * cfg.z_channels)

    def forward(self, x):
        h = self.conv_in(haar_patch(x, self.patch_size))
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """DecoderFactorized: [B, z_channels, 1+k, h, w] -> [B, 3, 1+8k, 16h, 16w]."""

    def __init__(self, cfg: CosmosConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        c, mults = cfg.channels, cfg.channels_mult
        n = len(mults)
        block_in = c * mults[-1]
        curr_res = cfg.resolution // cfg.patch_size // 2 ** (n - 1)
        self.conv_in = factorized_conv(cfg.z_channels, block_in)
        self.mid = _mid(block_in, cfg.dropout)
        # up[i] mirrors down[i]; built (and run) from the coarsest level, stored at index i.
        up = [None] * n
        for i in reversed(range(n)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, c * mults[i], cfg.dropout))
                block_in = c * mults[i]
                if curr_res in cfg.attn_resolutions:
                    level.attn.append(attention_pair(block_in))
            if i != 0:
                level.upsample = HybridUpsample(block_in, *cfg.up_flags(i))
                curr_res *= 2
            up[i] = level
        self.up = nn.ModuleList(up)
        self.norm_out = CausalNormalize(block_in)
        self.conv_out = factorized_conv(block_in, cfg.out_channels * cfg.patch_size ** 3)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return haar_unpatch(h, self.patch_size)


class FSQuantizer(nn.Module):
    """Finite scalar quantization; index = sum_i digit_i * basis_i with channel 0 the least
    significant digit."""

    def __init__(self, levels):
        super().__init__()
        self.levels = list(levels)
        self.basis = [math.prod(self.levels[:i]) for i in range(len(self.levels))]
        self.codebook_size = math.prod(self.levels)

    def _per_channel(self, values, ref: torch.Tensor, ndim: int):
        return torch.tensor(values, device=ref.device).view(1, -1, *([1] * (ndim - 2)))

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """[B, D, ...] -> codes [B, D, ...] in [-1, 1], float32; straight-through gradient."""
        z = z.float()  # NVIDIA's FSQuantizer promotes to fp32 too (its constants are fp32)
        L = self._per_channel(self.levels, z, z.ndim).float()
        half_l = (L - 1) * (1 + 1e-3) / 2
        offset = torch.where(L % 2 == 0, 0.5, 0.0)
        bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
        q = bounded + (bounded.round() - bounded).detach()
        return q / (L // 2)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, D, ...] -> long indices [B, ...]."""
        half = self._per_channel(self.levels, codes, codes.ndim) // 2
        digits = (codes.float() * half + half).round().long()
        return (digits * self._per_channel(self.basis, codes, codes.ndim)).sum(1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """long indices [B, ...] -> float32 codes [B, D, ...]."""
        idx = indices.long().unsqueeze(1)
        L = self._per_channel(self.levels, idx, idx.ndim)
        digits = idx // self._per_channel(self.basis, idx, idx.ndim) % L
        return (digits - L // 2).float() / (L // 2).float()

    def forward(self, z):
        codes = self.quantize(z)
        return codes, self.codes_to_indices(codes)


def as_indices(indices, codebook_size: int) -> torch.Tensor:
    """Code indices of any integer dtype (uint8/16/32/64, int8..int64), numpy or torch, as a long
    tensor (on the input's device); ValueError for another dtype or a value outside
    0..codebook_size-1. Code shards are stored as uint16, which most torch ops do not take."""
    if isinstance(indices, np.ndarray):
        if indices.dtype.kind not in "iu":
            raise ValueError(f"indices must be of an integer dtype, got numpy {indices.dtype}")
        lo, hi = (int(indices.min()), int(indices.max())) if indices.size else (0, 0)
        # checked before the cast, which would wrap uint64 values past 2^63
        _check_index_range(lo, hi, codebook_size)
        return torch.from_numpy(indices.astype(np.int64))
    if not torch.is_tensor(indices):
        raise ValueError(f"indices must be a torch tensor or a numpy array, got "
                         f"{type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be of an integer dtype, got {indices.dtype}")
    if indices.dtype == torch.uint64:  # the one that does not fit int64: range-check in numpy
        return as_indices(indices.cpu().numpy(), codebook_size).to(indices.device)
    indices = indices.long()  # uint16/uint32 have no min/max or comparison kernels
    if indices.numel():
        _check_index_range(int(indices.min()), int(indices.max()), codebook_size)
    return indices


def _check_index_range(lo: int, hi: int, codebook_size: int) -> None:
    if lo < 0 or hi >= codebook_size:
        raise ValueError(f"indices must lie in 0..{codebook_size - 1}, got {lo}..{hi}")


# -----------------------------------------------------------------------------
# the tokenizer

JIT_FILES = ("encoder.jit", "decoder.jit", "autoencoder.jit")
# Constant buffers of NVIDIA's patcher/quantizer that we compute on the fly instead of storing.
JIT_BUFFERS = ("wavelets", "_arange", "patch_size_buffer", "_levels", "_basis", "implicit_codebook")
_ENCODER_PREFIXES = ("encoder.", "quant_conv.")
_DECODER_PREFIXES = ("decoder.", "post_quant_conv.")
# video or not -> (what the input is called, its layout, its ndim)
_PIXEL_LAYOUTS = {True: ("video", "[B, C, T, H, W]", 5), False: ("images", "[B, C, H, W]", 4)}


class CosmosTokenizer(nn.Module):
    """encoder -> quant_conv -> FSQ indices, and indices -> codes -> post_quant_conv -> decoder.

    Either half may be left out (encoder=False / decoder=False) to save memory; its attributes are
    then None."""

    def __init__(self, config: CosmosConfig, encoder: bool = True, decoder: bool = True):
        super().__init__()
        if not (encoder or decoder):
            raise ValueError("a CosmosTokenizer needs an encoder, a decoder, or both")
        self.config = config
        self.quantizer = FSQuantizer(config.levels)
        z_enc = config.z_factor * config.z_channels
        self.encoder = Encoder(config) if encoder else None
        self.quant_conv = CausalConv3d(z_enc, config.embedding_dim) if encoder else None
        self.post_quant_conv = (CausalConv3d(config.embedding_dim, config.z_channels)
                                if decoder else None)
        self.decoder = Decoder(config) if decoder else None

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    @property
    def temporal_compression(self) -> int:
        return self.config.temporal_compression

    def _param(self):
        return next(self.parameters())

    # --- video API: [B, 3, 1+8k, H, W] <-> [B, 1+k, H/16, W/16] ------------------------------

    def _check_pixels(self, x: torch.Tensor, video: bool):
        c = self.config.in_channels
        s = self.spatial_compression
        tc = self.temporal_compression
        what, layout, ndim = _PIXEL_LAYOUTS[video]
        if x.ndim != ndim or x.shape[1] != c:
            raise ValueError(f"{what} must be {layout} with C = {c}, got {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{what} must be a float tensor in [-1, 1], got {x.dtype}")
        H, W = x.shape[-2:]
        if H % s or W % s or H == 0 or W == 0:
            raise ValueError(f"{what}: H and W must be positive multiples of {s}, got {H}x{W}")
        if video and (x.shape[2] - 1) % tc:
            raise ValueError(f"video: T must be 1 + {tc}k frames, got {x.shape[2]}")

    @torch.inference_mode()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """float [B, C, T, H, W] in [-1, 1] (T = 1 + temporal_compression*k) -> long
        [B, t, H/16, W/16]."""
        if self.encoder is None:
            raise ValueError("this CosmosTokenizer has no encoder (load encoder.jit or "
                             "autoencoder.jit to encode)")
        self._check_pixels(video, video=True)
        p = self._param()
        z = self.quant_conv(self.encoder(video.to(device=p.device, dtype=p.dtype)))
        return self.quantizer(z)[1]

    @torch.inference_mode()
    def decode_video(self, indices) -> torch.Tensor:
        """[B, t, h, w] in 0..codebook_size-1, of any integer dtype (numpy or torch) -> float32
        [B, C, 1+8(t-1), 16h, 16w], about [-1, 1]."""
        if self.decoder is None:
            raise ValueError("this CosmosTokenizer has no decoder (load decoder.jit or "
                             "autoencoder.jit to decode)")
        indices = as_indices(indices, self.codebook_size)
        if indices.ndim != 4:
            raise ValueError(f"indices must be [B, t, h, w], got {list(indices.shape)}")
        p = self._param()
        codes = self.quantizer.indices_to_codes(indices.to(p.device)).to(p.dtype)
        return self.decoder(self.post_quant_conv(codes)).float()

    # --- image API: one-frame videos ----------------------------------------------------------

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [-1, 1] (H, W multiples of 16) -> long [B, H/16, W/16] on the
        model's device."""
        self._check_pixels(images, video=False)
        return self.encode_video(images.unsqueeze(2))[:, 0]

    def decode(self, indices) -> torch.Tensor:
        """[B, h, w] of any integer dtype (uint8/16/32/64, int8..int64; numpy or torch) -> float32
        [B, 3, 16h, 16w], about [-1, 1] and not clamped. A value outside 0..codebook_size-1 is a
        ValueError naming the range."""
        indices = as_indices(indices, self.codebook_size)
        if indices.ndim != 3:
            raise ValueError(f"indices must be [B, h, w], got {list(indices.shape)}")
        return self.decode_video(indices.unsqueeze(1))[:, :, 0]

    # --- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", config=None, encoder=None,
                        decoder=None):
        """Load from NVIDIA's .jit files or from our config.json + model.safetensors.

        path: a directory holding encoder.jit and/or decoder.jit (else autoencoder.jit), or
        model.safetensors.
        config: CosmosConfig or preset name; default: the directory's config.json (a UTF-8
        byte-order mark allowed), else dv8x16x16.
        encoder / decoder: True = required, False = skip, None = load if the directory has it.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32, "
                             f"got {dtype!r}")
        config, config_origin = _resolve_config(path, config)
        wants = {"encoder": encoder, "decoder": decoder}
        serves = {}  # file -> the halves taken from it
        if (path / "model.safetensors").is_file():
            file = path / "model.safetensors"
            tensors = {file: _read_safetensors(file)}
            serves[file] = {_half_of(k) for k in tensors[file]} - {None}
        else:
            for half, want in wants.items():
                own = path / f"{half}.jit"
                full = path / "autoencoder.jit"
                # The separate files are smaller; autoencoder.jit also holds both halves.
                file = own if own.is_file() else full if full.is_file() else None
                if want is not False and file is not None:
                    serves.setdefault(file, set()).add(half)
            if not serves and not any((path / f).is_file() for f in JIT_FILES):
                raise FileNotFoundError(f"{path} has none of {', '.join(JIT_FILES)} or "
                                        "model.safetensors")
            tensors = {file: _read_jit(file) for file in serves}
        found = set().union(*serves.values())
        for half, want in wants.items():
            if want and half not in found:
                raise FileNotFoundError(f"{path}: no {half} weights ({half}.jit, autoencoder.jit "
                                        "or model.safetensors)")
        halves = {h for h in found if wants[h] is not False}
        if not halves:
            raise ValueError(f"{path}: nothing to load with encoder={encoder}, decoder={decoder}")
        # Keys outside both halves are kept so that the strict check reports them.
        sd = {k: v for file, part in tensors.items() for k, v in part.items()
              if _half_of(k) is None or _half_of(k) in serves[file] & halves}
        with torch.device("meta"):
            model = cls(config, encoder="encoder" in halves, decoder="decoder" in halves)
        source = f"{', '.join(str(f) for f in tensors)} with {config_origin}"
        _load_exact(model, sd, source, dtype, device)
        return model.eval()

    def save_pretrained(self, path):
        """Write model.safetensors, then config.json, each through cli.write_atomic (a temporary
        name, then renamed)."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        write_atomic(path / "model.safetensors", lambda tmp: save_file(sd, tmp))
        cfg = json.dumps({"model_type": "cosmos_tokenizer", **self.config.to_dict()}, indent=2)
        write_atomic(path / "config.json",
                     lambda tmp: Path(tmp).write_text(cfg + "\n", encoding="utf-8"))


def _resolve_config(path: Path, config) -> tuple[CosmosConfig, str]:
    """The config and where it came from (for error messages)."""
    if isinstance(config, CosmosConfig):
        return config, "the config argument"
    if isinstance(config, str):
        return CosmosConfig.from_name(config), f"preset {config}"
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        try:
            d = json.loads(cfg_file.read_text(encoding="utf-8-sig"))  # a byte-order mark is no JSON
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
        # A config.json of another tool next to NVIDIA's .jit files is not ours; only ours carries
        # this tag.
        if isinstance(d, dict) and d.get("model_type") == "cosmos_tokenizer":
            return CosmosConfig.from_dict(d), str(cfg_file)
        if (path / "model.safetensors").is_file():
            raise ValueError(f"{cfg_file}: not a cosmos_tokenizer config (model_type missing)")
    return (CosmosConfig.from_name("dv8x16x16"),
            "preset dv8x16x16 (no cosmos_tokenizer config.json; pass config=)")


def _half_of(key: str):
    if key.startswith(_ENCODER_PREFIXES):
        return "encoder"
    return "decoder" if key.startswith(_DECODER_PREFIXES) else None


def _read_safetensors(file: Path) -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def _read_jit(file: Path) -> dict:
    try:
        with warnings.catch_warnings():
            # NVIDIA ships TorchScript; there is no other format
            warnings.simplefilter("ignore", DeprecationWarning)
            sd = torch.jit.load(str(file), map_location="cpu").state_dict()
    except Exception as e:  # torch raises RuntimeError/ValueError/... as the archive is broken
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file}: not a readable TorchScript file ({msg})") from e
    return {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in JIT_BUFFERS}


def _load_exact(model: nn.Module, sd: dict, source: str, dtype, device):
    """Strict load by name with readable errors; floating tensors are cast to the compute dtype."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = [f"{len(missing)} missing (first: {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else ""]
        hint = ""
        if all("sample.conv" in k for k in missing + unexpected):
            hint = ("; the hybrid up/downsample layout differs: check legacy_mode and the "
                    "compression settings")
        raise ValueError(f"{source}: weights do not match the tokenizer layout: "
                         f"{', '.join(p for p in parts if p)}{hint}")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: {k} has shape {list(sd[k].shape)}, the config expects "
                             f"{list(v.shape)}")
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
          for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)


# -----------------------------------------------------------------------------
# pixels <-> tensors


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM center crop (SimpleAR's preprocessing, simpar/data/extract_token.py): halve with BOX
    while possible, BICUBIC resize, crop the middle."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])


def pil_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> float32 [3, size, size] in [-1, 1] (ToTensor then Normalize(0.5, 0.5), as
    SimpleAR)."""
    arr = np.asarray(center_crop(img.convert("RGB"), size), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] (or [3, H, W]) about [-1, 1] -> uint8 [B, H, W, 3], rounded like Cosmos'
    tensor2numpy (cosmos_tokenizer/utils.py)."""
    if x.ndim == 3:
        x = x[None]
    x = ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in tensor_to_uint8(x)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images of the same shape."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


# -----------------------------------------------------------------------------
# command line: image -> codes -> image

PROG = "cosmos_tokenizer.py"


def get_parser() -> Parser:
    p = Parser(prog=PROG, description="Round-trip an image through the Cosmos tokenizer.")
    p.add_argument("--ckpt", required=True,
                   help="directory with encoder.jit + decoder.jit, or ours")
    p.add_argument("--image", required=True,
                   help="input image (any size; ADM center crop to --size)")
    p.add_argument("--out", required=True, help="reconstruction PNG to write")
    p.add_argument("--size", type=int, default=1024,
                   help="square input size, a multiple of the spatial compression (16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 for GPUs")
    p.add_argument("--config", default=None,
                   help=f"preset for .jit directories: {', '.join(PRESETS)}")
    return p


def run(args):
    """The round trip of one image; bad input raises ValueError / FileNotFoundError."""
    if args.size <= 0:
        raise ValueError(f"--size {args.size} must be >= 1")
    try:
        img = Image.open(args.image)
        img.load()
    except OSError as e:
        raise ValueError(f"cannot read image {args.image}: {e}") from e
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device {args.device}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device available")
    out_path = Path(args.out)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output directory not found: {out_path.parent}")
    tok = CosmosTokenizer.from_pretrained(args.ckpt, dtype=args.dtype, device=device,
                                          config=args.config, encoder=True, decoder=True)
    if args.size % tok.spatial_compression:
        raise ValueError(f"--size {args.size} must be a multiple of the tokenizer's spatial "
                         f"compression {tok.spatial_compression}")
    x = pil_to_tensor(img, args.size)
    codes = tok.encode(x[None])
    rec = tok.decode(codes)
    out = tensor_to_pil(rec)[0]
    try:
        write_atomic(out_path, lambda tmp: out.save(tmp, format="PNG"))
    except OSError as e:
        raise ValueError(f"cannot write {out_path}: {e}") from e
    h, w = codes.shape[1:]
    print(f"tokens: {h}x{w} = {h * w} codes in 0..{tok.codebook_size - 1}")
    print(f"PSNR: {psnr(tensor_to_uint8(x), tensor_to_uint8(rec)):.2f} dB -> {args.out}")


def main(argv=None):
    run_main(PROG, run, get_parser().parse_args(argv))


if __name__ == "__main__":
    main()

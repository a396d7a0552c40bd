"""CLIP (image tower, text tower, projections, logit scale) in plain PyTorch: the reward model of
SimpleAR's GRPO stage, loaded from Hugging Face and open_clip checkpoints as they are.

    python clip.py --ckpt checkpoints/CLIP-ViT-H-14 --image a.png --text "a cat"   # cosine score
    python clip.py --ckpt HPS_v2_compressed.pt --tokenizer checkpoints/CLIP-ViT-H-14 ...  # HPSv2
    python -m pytest -q tests/test_clip.py     # parity with transformers and open_clip
    python bench.py clip                       # ViT-H-14 forwards against open_clip's

CLIP (Radford et al. 2021, arXiv 2103.00020) embeds an image with a ViT and a caption with a
causal text transformer; each tower's pooled state (the class token; the end-of-text token) goes
through a linear projection into one D-dimensional space, and the cosine of the two embeddings is
the score SimpleAR's GRPO rewards (wdrink/SimpleAR simpar/train/llava_trainer_grpo.py and
simpar/grpo/rewards.py: `clip_reward` with open_clip's ViT-H-14, or HPSv2's fine-tune of it).
Both towers are pre-norm transformers with LayerNorm (eps 1e-5), biased q/k/v projections and a
GELU MLP (OpenAI's original weights use quick_gelu, x * sigmoid(1.702 x)); the image tower adds a
LayerNorm before the first block and after the last. The references are
mlfoundations/open_clip (src/open_clip/model.py, transformer.py, tokenizer.py) and Hugging Face
transformers (src/transformers/models/clip/modeling_clip.py); HPSv2 (tgxs002/HPSv2) and PickScore
(yuvalkirstain/PickScore) are fine-tuned ViT-H-14s in those two formats.

One module layout, two key mappings (`_mapping`): the same table exports our weights in a format
and imports them from it, so the strict load checks the file's own key names and shapes. Our
attention keeps q, k and v fused in one matrix (as open_clip stores them; Hugging Face's three
are concatenated on load) and runs F.scaled_dot_product_attention (in bf16 on a CPU, plain
matmuls and a softmax, which are faster there). Checkpoints are local paths: a hub repository
such as laion/CLIP-ViT-H-14-laion2B-s32B-b79K is fetched first (`huggingface-cli download
laion/CLIP-ViT-H-14-laion2B-s32B-b79K --local-dir checkpoints/CLIP-ViT-H-14`).

The text is pooled at the end-of-text token: open_clip takes the argmax of the ids (the end token
has the largest id of CLIP's vocabulary), transformers the first `eos_token_id`, or the argmax for
the legacy eos_token_id 2 of older configs; `CLIPArgs.eos_id` (None: argmax) says which.

The tokenizer is CLIP's byte-level BPE (the `</w>` end-of-word suffix, 49,408 ids with start 49406
and end 49407) on the `tokenizers` library, after open_clip's cleaning: ftfy.fix_text's character
fixes (ligatures, full-width forms, curly quotes, control characters, NFC; not its mojibake
repair), HTML entities unescaped twice, whitespace collapsed, lower case. Ids are start + at most
75 tokens + end, zero-padded to 77, as open_clip's tokenizer gives them.

`preprocess(..., "reference")` is CLIPImageProcessor's: the short side resized to 224 with PIL's
bicubic filter (open_clip's torchvision Resize does the same on PIL images; its centre crop
rounds the offset where transformers floors it), centre crop, CLIP's mean and std.
`preprocess(..., "simplear")` is what SimpleAR's GRPO feeds the reward model: the decoded
[-1, 1] images resized to 224x224 by F.interpolate(mode="bilinear", align_corners=False, no
antialiasing), mapped to [0, 1] and normalised.
"""
import gzip
import html
import json
import os
import pickle
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import Parser, run_main, warn, write_atomic

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's CLIP image statistics, used by all three
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPArgs:
    embed_dim: int = 1024            # D, the joint embedding
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1280
    vision_layers: int = 32
    vision_heads: int = 16
    vision_mlp: int = 5120
    text_width: int = 1024
    text_layers: int = 24
    text_heads: int = 16
    text_mlp: int = 4096
    context_length: int = 77
    vocab_size: int = 49408
    act: str = "gelu"                # or "quick_gelu" (OpenAI's weights)
    eps: float = 1e-5
    eos_id: int | None = None        # pool the text at the first eos_id; None: at the argmax id

    def __post_init__(self):
        if self.act not in ACTS:
            raise ValueError(f"act must be one of {', '.join(ACTS)}, got {self.act!r}")
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ValueError(f"{tower}_width={width} is not a multiple of "
                                 f"{tower}_heads={heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")

    @classmethod
    def from_name(cls, name: str) -> "CLIPArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown CLIP config {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict, where="config.json") -> "CLIPArgs":
        """From a transformers CLIPConfig dict; the `*_config_dict` entries of older files win
        over `*_config`, as transformers reads them; missing entries take its defaults."""
        if cfg.get("model_type") != "clip":
            raise ValueError(f"{where}: model_type is {cfg.get('model_type')!r}, expected 'clip'")
        text = dict(HF_TEXT_DEFAULTS, **(cfg.get("text_config_dict") or cfg.get("text_config")
                                         or {}))
        vision = dict(HF_VISION_DEFAULTS, **(cfg.get("vision_config_dict")
                                             or cfg.get("vision_config") or {}))
        if text["hidden_act"] != vision["hidden_act"]:
            raise ValueError(f"{where}: text hidden_act {text['hidden_act']!r} differs from "
                             f"vision hidden_act {vision['hidden_act']!r} (one act is supported)")
        if text["layer_norm_eps"] != vision["layer_norm_eps"]:
            raise ValueError(f"{where}: text and vision layer_norm_eps differ")
        if vision.get("num_channels", 3) != 3:
            raise ValueError(f"{where}: num_channels {vision['num_channels']} is not 3")
        eos = text["eos_token_id"]
        return cls(
            embed_dim=cfg.get("projection_dim", 512), image_size=vision["image_size"],
            patch_size=vision["patch_size"], vision_width=vision["hidden_size"],
            vision_layers=vision["num_hidden_layers"], vision_heads=vision["num_attention_heads"],
            vision_mlp=vision["intermediate_size"], text_width=text["hidden_size"],
            text_layers=text["num_hidden_layers"], text_heads=text["num_attention_heads"],
            text_mlp=text["intermediate_size"], context_length=text["max_position_embeddings"],
            vocab_size=text["vocab_size"], act=text["hidden_act"], eps=text["layer_norm_eps"],
            # transformers' legacy rule: eos_token_id 2 (configs before its PR #24773) = argmax
            eos_id=None if eos == 2 else eos)

    def to_hf_config(self, dtype=torch.float32) -> dict:
        eos = 2 if self.eos_id is None else self.eos_id
        common = dict(hidden_act=self.act, layer_norm_eps=self.eps)
        return {
            "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": self.embed_dim,
            "logit_scale_init_value": 2.6592, "torch_dtype": str(dtype).removeprefix("torch."),
            "text_config": dict(
                hidden_size=self.text_width, intermediate_size=self.text_mlp,
                num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
                max_position_embeddings=self.context_length, vocab_size=self.vocab_size,
                projection_dim=self.embed_dim, eos_token_id=eos, **common),
            "vision_config": dict(
                hidden_size=self.vision_width, intermediate_size=self.vision_mlp,
                num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                image_size=self.image_size, patch_size=self.patch_size,
                projection_dim=self.embed_dim, **common),
        }

    @classmethod
    def from_open_clip_config(cls, cfg: dict, where="open_clip_config.json") -> "CLIPArgs":
        """From open_clip's model config ({"model_cfg": {...}} as hub repos store it, or the
        model_cfg itself). Options that change the architecture beyond these fields (timm or
        Hugging Face towers, attentional pooling, layer scale, ...) are a ValueError."""
        m = cfg.get("model_cfg", cfg)
        v, t = m.get("vision_cfg", {}), m.get("text_cfg", {})
        plain = {"timm_model_name": None, "hf_model_name": None, "attentional_pool": False,
                 "ls_init_value": None, "no_ln_pre": False, "final_ln_after_pool": False,
                 "pool_type": None, "proj_bias": False, "act_kwargs": None, "norm_kwargs": None}
        for part, c in (("vision_cfg", v), ("text_cfg", t)):
            for k, ok in plain.items():
                if c.get(k, ok) != ok and not (k == "pool_type" and c[k] in ("tok", "argmax")):
                    raise ValueError(f"{where}: {part}.{k}={c[k]!r} is not supported")
        width, text_width = v.get("width", 768), t.get("width", 512)
        return cls(
            embed_dim=m["embed_dim"], image_size=v.get("image_size", 224),
            patch_size=v.get("patch_size", 16), vision_width=width,
            vision_layers=v.get("layers", 12), vision_heads=width // v.get("head_width", 64),
            vision_mlp=int(width * v.get("mlp_ratio", 4.0)), text_width=text_width,
            text_layers=t.get("layers", 12), text_heads=t.get("heads", 8),
            text_mlp=int(text_width * t.get("mlp_ratio", 4.0)),
            context_length=t.get("context_length", 77), vocab_size=t.get("vocab_size", 49408),
            act="quick_gelu" if m.get("quick_gelu", False) else "gelu")

    @classmethod
    def from_open_clip_state(cls, sd: dict, where: str) -> "CLIPArgs":
        """Infer the architecture of an open_clip state dict without a config. Shapes fix all but
        the head counts and the activation: heads are width / 64 (open_clip's default head width
        and OpenAI's), except vision towers wider than 1024, which in open_clip's configs
        (ViT-H/g/bigG) all have 16 heads; the activation is GELU (open_clip's default; OpenAI's
        quick_gelu weights need an open_clip_config.json saying so)."""
        try:
            conv = sd["visual.conv1.weight"].shape
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            width, text_width = conv[0], sd["ln_final.weight"].shape[0]
            layers = [sum(k.startswith(f"{p}transformer.resblocks.") and k.endswith(".ln_1.weight")
                          for k in sd) for p in ("visual.", "")]
            return cls(
                embed_dim=sd["text_projection"].shape[1], image_size=grid * conv[-1],
                patch_size=conv[-1], vision_width=width, vision_layers=layers[0],
                vision_heads=16 if width > 1024 else width // 64,
                vision_mlp=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                text_width=text_width, text_layers=layers[1], text_heads=text_width // 64,
                text_mlp=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                context_length=sd["positional_embedding"].shape[0],
                vocab_size=sd["token_embedding.weight"].shape[0])
        except KeyError as e:
            raise ValueError(f"{where}: not an open_clip CLIP state dict (no key {e.args[0]}; "
                             f"first keys: {', '.join(list(sd)[:3])})") from None


PRESETS = {
    # open_clip's ViT-H-14 (laion2B; HPSv2 and PickScore fine-tune it): SimpleAR's reward model
    "vit-h-14": dict(),
    # OpenAI's ViT-L/14 (openai/clip-vit-large-patch14)
    "vit-l-14": dict(embed_dim=768, vision_width=1024, vision_layers=24, vision_heads=16,
                     vision_mlp=4096, text_width=768, text_layers=12, text_heads=12,
                     text_mlp=3072, act="quick_gelu"),
    "tiny": dict(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                 vision_heads=2, vision_mlp=128, text_width=64, text_layers=2, text_heads=2,
                 text_mlp=128, vocab_size=1000),
}
HF_TEXT_DEFAULTS = dict(  # transformers' CLIPTextConfig defaults
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, eos_token_id=49407)
HF_VISION_DEFAULTS = dict(  # transformers' CLIPVisionConfig defaults
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


ACTS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


# --------------------------------------------------------------------------------------------
# The model

class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # rows: q, k, v
        self.out = nn.Linear(width, width)

    def forward(self, x, causal: bool):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            # PyTorch's CPU flash kernel takes twice as long as two bf16 matmuls and a softmax
            # at CLIP's lengths (257 and 77, torch 2.13-2.14); in float32 it is the fastest
            s = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # [B, heads, T, T]
            if causal:
                s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            y = s.softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, heads, T, C/h]
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.act = ACTS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.attn, self.mlp = Attention(width, heads), MLP(width, hidden, act)

    def forward(self, x, causal: bool):
        x = x + self.attn(self.norm1(x), causal)
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    def __init__(self, a: CLIPArgs):
        super().__init__()
        w, grid = a.vision_width, a.image_size // a.patch_size
        self.image_size = a.image_size
        self.patch = nn.Conv2d(3, w, a.patch_size, stride=a.patch_size, bias=False)
        self.cls = nn.Parameter(torch.zeros(w))
        self.pos = nn.Parameter(torch.zeros(grid * grid + 1, w))
        self.norm_pre, self.norm_post = nn.LayerNorm(w, eps=a.eps), nn.LayerNorm(w, eps=a.eps)
        self.blocks = nn.ModuleList(Block(w, a.vision_heads, a.vision_mlp, a.act, a.eps)
                                    for _ in range(a.vision_layers))
        self.proj = nn.Linear(w, a.embed_dim, bias=False)

    def forward(self, pixels):
        if pixels.ndim != 4 or pixels.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"pixels must be [B, 3, {self.image_size}, {self.image_size}], got "
                             f"{list(pixels.shape)}")
        x = self.patch(pixels.to(self.pos.dtype)).flatten(2).transpose(1, 2)  # [B, grid², W]
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], 1) + self.pos
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x, causal=False)
        return self.proj(self.norm_post(x[:, 0]))


class TextTower(nn.Module):
    def __init__(self, a: CLIPArgs):
        super().__init__()
        w = a.text_width
        self.eos_id, self.context_length = a.eos_id, a.context_length
        self.tok = nn.Embedding(a.vocab_size, w)
        self.pos = nn.Parameter(torch.zeros(a.context_length, w))
        self.blocks = nn.ModuleList(Block(w, a.text_heads, a.text_mlp, a.act, a.eps)
                                    for _ in range(a.text_layers))
        self.norm = nn.LayerNorm(w, eps=a.eps)
        self.proj = nn.Linear(w, a.embed_dim, bias=False)

    def forward(self, ids):
        if ids.ndim != 2 or ids.shape[1] > self.context_length:
            raise ValueError(f"ids must be [B, T] with T <= {self.context_length}, got "
                             f"{list(ids.shape)}")
        x = self.tok(ids) + self.pos[:ids.shape[1]]
        for block in self.blocks:
            x = block(x, causal=True)
        end = ids.argmax(-1) if self.eos_id is None else (ids == self.eos_id).int().argmax(-1)
        # the causal mask leaves the end token's state untouched by the padding after it
        return self.proj(self.norm(x[torch.arange(x.shape[0], device=x.device), end]))


class CLIP(nn.Module):
    """Both towers, their projections and the learnt temperature. `logit_scale` is its log, as
    both references store it (logits = logit_scale.exp() * cosine). `tokenizer` is set by load."""

    def __init__(self, args: CLIPArgs):
        super().__init__()
        self.args = args
        self.visual, self.text = VisionTower(args), TextTower(args)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.tokenizer: Tokenizer | None = None

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] (S = args.image_size; see preprocess) -> projected,
        not L2-normalised embeddings [B, D] in the model's dtype."""
        return self.visual(pixels)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, 77] long (see Tokenizer) -> projected, not L2-normalised embeddings
        [B, D] in the model's dtype."""
        return self.text(ids)


def similarity(model: CLIP, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cosine of image i and caption i, float32 [B]: pixels [B, 3, S, S] as preprocess gives
    them, ids [B, 77]. The embeddings are L2-normalised in float32, whatever the model's dtype;
    SimpleAR's CLIP reward is this score."""
    if pixels.shape[0] != ids.shape[0]:
        raise ValueError(f"{pixels.shape[0]} images but {ids.shape[0]} captions")
    image = F.normalize(model.encode_image(pixels).float(), dim=-1)
    text = F.normalize(model.encode_text(ids).float(), dim=-1)
    return (image * text).sum(-1)


# --------------------------------------------------------------------------------------------
# Checkpoint formats: one table per format, used both ways

def _mapping(args: CLIPArgs, fmt: str) -> list[tuple[str, tuple[str, ...], str]]:
    """(our key, the format's key(s), how): "same", "t" (transposed: open_clip's projections are
    x @ P, ours nn.Linear) or "qkv" (Hugging Face's q, k, v concatenated into our fused rows)."""
    rows = []
    if fmt == "hf":
        def block(ours, theirs):
            rows.append((f"{ours}.attn.qkv.weight",
                         tuple(f"{theirs}.self_attn.{p}_proj.weight" for p in "qkv"), "qkv"))
            rows.append((f"{ours}.attn.qkv.bias",
                         tuple(f"{theirs}.self_attn.{p}_proj.bias" for p in "qkv"), "qkv"))
            for a, b in (("attn.out", "self_attn.out_proj"), ("norm1", "layer_norm1"),
                         ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                for p in ("weight", "bias"):
                    rows.append((f"{ours}.{a}.{p}", (f"{theirs}.{b}.{p}",), "same"))
        vm, tm = "vision_model", "text_model"
        named = [("visual.patch.weight", f"{vm}.embeddings.patch_embedding.weight"),
                 ("visual.cls", f"{vm}.embeddings.class_embedding"),
                 ("visual.pos", f"{vm}.embeddings.position_embedding.weight"),
                 ("visual.norm_pre", f"{vm}.pre_layrnorm"),  # sic
                 ("visual.norm_post", f"{vm}.post_layernorm"),
                 ("visual.proj.weight", "visual_projection.weight"),
                 ("text.tok.weight", f"{tm}.embeddings.token_embedding.weight"),
                 ("text.pos", f"{tm}.embeddings.position_embedding.weight"),
                 ("text.norm", f"{tm}.final_layer_norm"),
                 ("text.proj.weight", "text_projection.weight"), ("logit_scale", "logit_scale")]
        layers = [(f"visual.blocks.{i}", f"{vm}.encoder.layers.{i}")
                  for i in range(args.vision_layers)]
        layers += [(f"text.blocks.{i}", f"{tm}.encoder.layers.{i}")
                   for i in range(args.text_layers)]
        transposed = ()
    else:  # open_clip
        def block(ours, theirs):
            rows.append((f"{ours}.attn.qkv.weight", (f"{theirs}.attn.in_proj_weight",), "same"))
            rows.append((f"{ours}.attn.qkv.bias", (f"{theirs}.attn.in_proj_bias",), "same"))
            for a, b in (("attn.out", "attn.out_proj"), ("norm1", "ln_1"), ("norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                for p in ("weight", "bias"):
                    rows.append((f"{ours}.{a}.{p}", (f"{theirs}.{b}.{p}",), "same"))
        named = [("visual.patch.weight", "visual.conv1.weight"),
                 ("visual.cls", "visual.class_embedding"),
                 ("visual.pos", "visual.positional_embedding"),
                 ("visual.norm_pre", "visual.ln_pre"), ("visual.norm_post", "visual.ln_post"),
                 ("visual.proj.weight", "visual.proj"),
                 ("text.tok.weight", "token_embedding.weight"),
                 ("text.pos", "positional_embedding"), ("text.norm", "ln_final"),
                 ("text.proj.weight", "text_projection"), ("logit_scale", "logit_scale")]
        layers = [(f"visual.blocks.{i}", f"visual.transformer.resblocks.{i}")
                  for i in range(args.vision_layers)]
        layers += [(f"text.blocks.{i}", f"transformer.resblocks.{i}")
                   for i in range(args.text_layers)]
        transposed = ("visual.proj.weight", "text.proj.weight")
    for ours, theirs in named:
        if ours.startswith(("visual.norm", "text.norm")):
            for p in ("weight", "bias"):
                rows.append((f"{ours}.{p}", (f"{theirs}.{p}",), "same"))
        else:
            rows.append((ours, (theirs,), "t" if ours in transposed else "same"))
    for ours, theirs in layers:
        block(ours, theirs)
    return rows


def export_state(model: CLIP, fmt: str) -> dict:
    """Our weights under the format's key names and layout ("hf" or "open_clip")."""
    state, out = model.state_dict(), {}
    for ours, theirs, how in _mapping(model.args, fmt):
        t = state[ours]
        parts = t.chunk(3) if how == "qkv" else [t.t() if how == "t" else t]
        out.update({k: p.contiguous() for k, p in zip(theirs, parts)})
    return out


# buffers the references recompute on load, never weights: transformers' position_ids (saved
# before 4.31), open_clip's causal attn_mask (persistent in older versions)
_SKIPPED = ("position_ids", "attn_mask")


def _import_state(args: CLIPArgs, fmt: str, tensors: dict, where: str, dtype, device) -> CLIP:
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_SKIPPED)}
    with torch.device("meta"):
        model = CLIP(args)
    expected = {k: v.shape for k, v in export_state(model, fmt).items()}
    for k, shape in expected.items():
        if k not in tensors:
            raise ValueError(f"{where}: missing key {k} (expected shape {tuple(shape)})")
        if tensors[k].shape != shape:
            raise ValueError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, "
                             f"expected {tuple(shape)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        extra = unexpected[0]
        raise ValueError(f"{where}: unexpected key {extra} (shape {tuple(tensors[extra].shape)})")
    state = {}
    for ours, theirs, how in _mapping(args, fmt):
        t = torch.cat([tensors[k] for k in theirs]) if how == "qkv" else tensors[theirs[0]]
        state[ours] = (t.t() if how == "t" else t).to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True)
    return model.eval()


def _read_weights(file: str) -> dict:
    """A state dict from .safetensors, or from .bin/.pt through torch.load(weights_only=True);
    HPSv2's checkpoints hold it under "state_dict", with DataParallel's "module." prefixes."""
    if file.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(file)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"cannot read {file} (truncated or corrupt?): {e}") from None
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile,
            ValueError) as e:
        raise ValueError(f"cannot read {file} (truncated or corrupt?): "
                         f"{' '.join(str(e).split())[:200]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _read_json(file: str) -> dict:
    try:
        with open(file, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None


OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# the files of a hub repository that load() needs, for a caller that downloads one (sample.py's
# resolve_dir): the Hugging Face weights, config and tokenizer, not open_clip's copy of the weights
HUB_FILES = ["*.json", "model.safetensors*", "*.txt"]
WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth")


def load(path, device="cpu", dtype=torch.float32, tokenizer=None) -> CLIP:
    """A CLIP from a Hugging Face CLIPModel directory (config.json + model.safetensors), an
    open_clip checkpoint (a .bin/.pt/.safetensors file, or a directory holding one, with
    open_clip_config.json when there is one; otherwise the architecture is read from the
    shapes, see CLIPArgs.from_open_clip_state) or HPSv2's checkpoint. Strict: a missing or
    unexpected key or a different shape is a ValueError naming the key and both shapes.

    The tokenizer comes from `tokenizer` (a directory or merges file, see Tokenizer.from_dir) or
    else from the checkpoint's directory; a checkpoint without one (HPSv2's .pt) is a ValueError
    saying to pass one. A missing path is a FileNotFoundError; an unreadable file, or a
    config.json of another model, a ValueError."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    hf_config = os.path.join(path, "config.json")
    if os.path.isdir(path) and os.path.isfile(hf_config):
        args = CLIPArgs.from_hf_config(_read_json(hf_config), hf_config)
        bin_file = os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(bin_file) and not any(
                f.startswith("model.safetensors") for f in os.listdir(path)):
            tensors, where = _read_weights(bin_file), bin_file
        else:
            from model import read_safetensors  # the shards, and errors, of the LM's loader
            tensors, where = read_safetensors(path), path
        model = _import_state(args, "hf", tensors, where, dtype, device)
    else:
        file = path
        if os.path.isdir(path):
            found = [f for f in OPEN_CLIP_FILES if os.path.isfile(os.path.join(path, f))]
            found = found or sorted(f for f in os.listdir(path) if f.endswith(WEIGHT_EXTS))
            if not found:
                raise FileNotFoundError(f"no CLIP weights in {path} (config.json + "
                                        "model.safetensors, or an open_clip .bin/.safetensors)")
            file = os.path.join(path, found[0])
        tensors = _read_weights(file)
        oc_config = os.path.join(folder, "open_clip_config.json")
        args = (CLIPArgs.from_open_clip_config(_read_json(oc_config), oc_config)
                if os.path.isfile(oc_config) else CLIPArgs.from_open_clip_state(tensors, file))
        model = _import_state(args, "open_clip", tensors, file, dtype, device)
    model.tokenizer = Tokenizer.from_dir(tokenizer or folder, args.context_length)
    return model


def save_hf(model: CLIP, path) -> None:
    """config.json + model.safetensors that transformers' CLIPModel loads, and the tokenizer's
    vocab.json + merges.txt when the model has one; each file written atomically."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in export_state(model, "hf").items()}
    config = json.dumps(model.args.to_hf_config(model.logit_scale.dtype), indent=2)
    write_atomic(os.path.join(path, "model.safetensors"),
                 lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_atomic(os.path.join(path, "config.json"), lambda tmp: Path(tmp).write_text(config))
    if model.tokenizer is not None:
        model.tokenizer.save(path)


# --------------------------------------------------------------------------------------------
# Tokenizer

def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) printable stand-in for each byte: the alphabet of its vocabulary."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# The character fixes of ftfy.fix_text (ftfy 6, which open_clip's tokenizer runs first), as
# translation tables: Latin ligatures, half/full-width forms, curly quotes, control characters.
_FTFY = {ord(c): unicodedata.normalize("NFKC", c) for c in "ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬆ"}
_FTFY[ord("ﬅ")] = "ſt"
_FTFY[0x3000] = " "
_FTFY.update({i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
              if unicodedata.normalize("NFKC", chr(i)) != chr(i)})
_FTFY.update({i: "'" for i in (0x02BC, *range(0x2018, 0x201C))})
_FTFY.update({i: '"' for i in range(0x201C, 0x2020)})
_FTFY.update({i: None for i in (*range(0, 9), 0x0B, *range(0x0E, 0x20), 0x7F,
                                *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD))})
# CLIP's words: letters, single digits, punctuation runs. Without open_clip's special-token
# alternatives: its tokens are spelled <start_of_text>, OpenAI's <|startoftext|>, and a caption
# that spells either is split like any other text here.
_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
START, END = "<|startoftext|>", "<|endoftext|>"


def clean(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy's character fixes (twice, as ŉ's quote is uncurled
    after its ligature splits), NFC, HTML entities unescaped twice, whitespace, lower case."""
    text = text.translate(_FTFY).translate(_FTFY)
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text)))
    return " ".join(text.split()).lower()


class Tokenizer:
    """CLIP's BPE: texts -> ids [B, context_length] long, start + tokens + end, zero-padded;
    a caption too long keeps its first context_length - 2 tokens."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
                 context_length: int = 77):
        from tokenizers import Regex, pre_tokenizers
        from tokenizers import Tokenizer as Backend
        from tokenizers.models import BPE
        for special in (START, END):
            if special not in vocab:
                raise ValueError(f"the vocabulary has no {special}")
        self.vocab, self.merges, self.context_length = vocab, merges, context_length
        self.start, self.end = vocab[START], vocab[END]
        self.backend = Backend(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>",
                                   continuing_subword_prefix="", unk_token=END))
        self.backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    @classmethod
    def from_dir(cls, path, context_length: int = 77) -> "Tokenizer":
        """From a directory holding tokenizer.json, or vocab.json + merges.txt (Hugging Face), or
        open_clip's bpe_simple_vocab_16e6.txt.gz (or any *.txt.gz merges file); or from such a
        merges file itself. The gzip file's vocabulary is built as open_clip builds it: the 256
        byte symbols, the same with "</w>", the first 48,894 merges, start, end."""
        path = str(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer path not found: {path}")
        if os.path.isfile(path) and not path.endswith(".gz"):
            path = os.path.dirname(path) or "."
        tj, vj, mt = (os.path.join(path, f) for f in ("tokenizer.json", "vocab.json",
                                                       "merges.txt"))
        gz = ([path] if os.path.isfile(path) else
              sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt.gz")))
        if os.path.isfile(tj):
            model = _read_json(tj).get("model", {})
            if model.get("type") != "BPE":
                raise ValueError(f"{tj}: not a BPE tokenizer (model type {model.get('type')!r})")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                      for m in model["merges"]]
            return cls(model["vocab"], merges, context_length)
        if os.path.isfile(vj) and os.path.isfile(mt):
            with open(mt, encoding="utf-8-sig") as f:
                lines = [ln for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
            return cls(_read_json(vj), [tuple(ln.split()) for ln in lines], context_length)
        if gz:
            try:
                with gzip.open(gz[0], "rt", encoding="utf-8") as f:
                    lines = f.read().split("\n")
            except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
                raise ValueError(f"cannot read {gz[0]}: {e}") from None
            merges = [tuple(ln.split()) for ln in lines[1:49152 - 256 - 2 + 1] if ln]
            symbols = list(bytes_to_unicode().values())
            words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
            vocab = {w: i for i, w in enumerate(words + [START, END])}
            return cls(vocab, merges, context_length)
        hint = ("give a tokenizer directory (with tokenizer.json, vocab.json + merges.txt or "
                "bpe_simple_vocab_16e6.txt.gz, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K's)")
        raise ValueError(f"no CLIP tokenizer in {path}: {hint}")

    def save(self, path) -> None:
        """vocab.json + merges.txt, the files transformers' CLIPTokenizer reads."""
        vocab = json.dumps(self.vocab, ensure_ascii=False)
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        write_atomic(os.path.join(path, "vocab.json"),
                     lambda tmp: Path(tmp).write_text(vocab, encoding="utf-8"))
        write_atomic(os.path.join(path, "merges.txt"),
                     lambda tmp: Path(tmp).write_text(merges, encoding="utf-8"))

    def encode(self, text: str) -> list[int]:
        """The BPE ids of one text, without start and end."""
        return self.backend.encode(clean(text), add_special_tokens=False).ids

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Captions -> ids [B, context_length] long."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        encoded = self.backend.encode_batch([clean(t) for t in texts], add_special_tokens=False)
        for row, e in zip(out, encoded):
            ids = [self.start, *e.ids[:self.context_length - 2], self.end]
            row[:len(ids)] = torch.tensor(ids)
        return out


# --------------------------------------------------------------------------------------------
# Images

def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess(images, mode: str = "reference", size: int = 224) -> torch.Tensor:
    """Images -> normalised pixels [B, 3, size, size] float32 (size: the model's
    args.image_size).

    reference: PIL images or uint8 arrays [H, W, 3] (one, or a list): CLIPImageProcessor's
    short side to `size` (PIL bicubic, on the uint8 image), centre crop (offset floored), scale to
    [0, 1], CLIP's mean and std.
    simplear: a float tensor [B, 3, H, W] in [-1, 1] (decoded images): SimpleAR's
    F.interpolate(size, bilinear, align_corners=False), then (255 * (x / 2 + 1/2)).clamp(0, 255)
    / 255 as it writes it, then CLIP's mean and std."""
    if mode == "simplear":
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError("simplear mode takes a float tensor [B, 3, H, W] in [-1, 1], got "
                             f"{type(images).__name__} {list(getattr(images, 'shape', []))}")
        x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        return _normalise((255 * (x * 0.5 + 0.5)).clamp(0, 255) / 255)
    if mode != "reference":
        raise ValueError(f"mode must be 'reference' or 'simplear', got {mode!r}")
    from PIL import Image
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    out = []
    for im in images:
        if not isinstance(im, (Image.Image, np.ndarray)):
            raise ValueError(f"reference mode takes PIL images or uint8 arrays, got "
                             f"{type(im).__name__}")
        if isinstance(im, np.ndarray):
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"arrays must be uint8 [H, W, 3], got {im.dtype} {im.shape}")
            im = Image.fromarray(im)
        im = im.convert("RGB")
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        long = int(size * long / short)  # transformers' get_resize_output_image_size: floored
        im = im.resize((size, long) if w <= h else (long, size), Image.Resampling.BICUBIC)
        x = np.asarray(im)
        top, left = (x.shape[0] - size) // 2, (x.shape[1] - size) // 2
        out.append(torch.from_numpy(x[top:top + size, left:left + size].copy()))
    pixels = torch.stack(out).permute(0, 3, 1, 2).float() / 255
    return _normalise(pixels)


# --------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = Parser(prog="clip.py", description="CLIP cosine score of each image with each caption")
    p.add_argument("--ckpt", required=True, help="Hugging Face CLIPModel directory or open_clip "
                   "checkpoint (file or directory)")
    p.add_argument("--image", nargs="+", required=True)
    p.add_argument("--text", nargs="+", required=True)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory, for checkpoints without one (HPSv2)")
    p.add_argument("--mode", default="reference", choices=["reference", "simplear"],
                   help="simplear: bilinear resize of the whole image, as SimpleAR's reward")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run_main("clip.py", _run, p.parse_args(argv))


def _run(a):
    from PIL import Image

    from model import resolve_dtype
    from sample import check_device

    def read(f):  # the images are checked before the weights load
        try:
            with Image.open(f) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {f}") from None
        except OSError as e:  # not an image, truncated
            raise ValueError(f"{f} is not a readable image ({e})") from None

    device = check_device(a.device)
    dtype, warning = resolve_dtype(a.dtype, device)
    if warning:
        warn("clip.py", warning)
    images = [read(f) for f in a.image]
    model = load(a.ckpt, device, dtype, a.tokenizer)
    size = model.args.image_size
    if a.mode == "simplear":  # the [-1, 1] tensor a decoder would give
        tensors = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1
                   for im in images]
        pixels = torch.cat([preprocess(t[None], "simplear", size) for t in tensors])
    else:
        pixels = preprocess(images, "reference", size)
    n_img, n_txt = len(a.image), len(a.text)
    with torch.inference_mode():
        scores = similarity(model, pixels.repeat_interleave(n_txt, 0).to(device, dtype),
                            model.tokenizer(a.text).repeat(n_img, 1).to(device))
    for (i, t), s in zip([(i, t) for i in a.image for t in a.text], scores.tolist()):
        print(f"{s:.4f}\t{i}\t{t}")


if __name__ == "__main__":
    main()

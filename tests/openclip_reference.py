"""The open_clip side of clip.py's tests and benchmark, run in the reference environment (open_clip
imports torchvision, whose wheels need their own torch; `.ci/run` builds it):

    python3 -m venv .venv-ref
    .venv-ref/bin/python -m pip install torch==2.14.1 torchvision==0.29.1 open-clip-torch
    .venv-ref/bin/python tests/openclip_reference.py fixtures OUT   # what tests/test_clip.py reads
    .venv-ref/bin/python tests/openclip_reference.py bench DIR      # what bench.py clip times

`fixtures OUT` builds two tiny open_clip CLIPs (open_clip.model.CLIP from custom configs, every
weight random), saves them as open_clip and HPSv2 checkpoints, and writes their embeddings of
fixed inputs and open_clip's token ids of OUT/strings.json (with its own BPE file, copied to
OUT/bpe_simple_vocab_16e6.txt.gz, and with OUT/small_bpe.txt.gz when the test wrote one).
`bench DIR` loads DIR/open_clip_config.json + DIR/weights.safetensors and times encode_image and
encode_text on DIR/inputs.pt in each dtype of DIR/bench.json, writing DIR/open_clip.pt.
This file imports nothing of the project: it must run under the reference environment's torch.
"""
import json
import os
import shutil
import statistics
import sys
import time

import torch
from open_clip import __version__ as open_clip_version
from open_clip import tokenizer as oc_tokenizer
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

# the two tiny architectures: gelu with open_clip's default head width (what clip.load infers
# without a config), and quick_gelu with 4 heads of 32 (only a config says so)
CONFIGS = {
    "gelu": dict(embed_dim=64, quick_gelu=False,
                 vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=2, head_width=64),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2,
                               layers=2)),
    "quick_gelu": dict(embed_dim=48, quick_gelu=True,
                       vision_cfg=dict(image_size=48, patch_size=16, width=128, layers=2,
                                       head_width=32, mlp_ratio=3.0),
                       text_cfg=dict(context_length=77, vocab_size=1000, width=96, heads=4,
                                     layers=3)),
}


def build(cfg: dict) -> CLIP:
    return CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]),
                CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=cfg["quick_gelu"]).eval()


def fixtures(out: str):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    strings = json.load(open(os.path.join(out, "strings.json"), encoding="utf-8"))
    shutil.copy(oc_tokenizer.default_bpe(), out)
    tokenizers = {"real": oc_tokenizer.SimpleTokenizer()}
    small = os.path.join(out, "small_bpe.txt.gz")
    if os.path.exists(small):
        tokenizers["small"] = oc_tokenizer.SimpleTokenizer(small)
    result = {"ids": {k: tok(strings).tolist() for k, tok in tokenizers.items()}}
    for name, cfg in CONFIGS.items():
        model = build(cfg)
        with torch.no_grad():  # open_clip starts biases at 0 and norms at 1: make them count
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        size = cfg["vision_cfg"]["image_size"]
        pixels = torch.randn(3, 3, size, size)
        if name == "gelu":  # the real tokenizer's ids: start, words, end at the argmax, zeros
            ids = tokenizers["real"](strings[:3])
        else:  # random ids in the small vocabulary with the end token (the largest id) at its
            ids = torch.randint(1, 998, (3, 77))  # argmax and padding after it
            for row, end in zip(ids, (5, 40, 76)):
                row[end], row[end + 1:] = 999, 0
        with torch.no_grad():
            image, text = model.encode_image(pixels), model.encode_text(ids)
        folder = os.path.join(out, name)
        os.makedirs(folder)
        state = model.state_dict()
        torch.save(state, os.path.join(folder, "open_clip_pytorch_model.bin"))
        torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in state.items()}},
                   os.path.join(out, f"hpsv2_{name}.pt"))
        save_file({k: v.contiguous() for k, v in state.items()},
                  os.path.join(out, f"{name}.safetensors"))
        if name == "quick_gelu":
            with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
                json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f)
        torch.save({"pixels": pixels, "ids": ids, "image": image, "text": text,
                    "logit_scale": model.logit_scale.detach()},
                   os.path.join(out, f"{name}_outputs.pt"))
    with open(os.path.join(out, "ids.json"), "w") as f:
        json.dump(result, f)


def bench(folder: str):
    from safetensors.torch import load_file
    spec = json.load(open(os.path.join(folder, "bench.json")))
    torch.set_num_threads(spec["threads"])
    cfg = json.load(open(os.path.join(folder, "open_clip_config.json")))["model_cfg"]
    model = build(cfg)
    model.load_state_dict(load_file(os.path.join(folder, "weights.safetensors")))
    inputs = torch.load(os.path.join(folder, "inputs.pt"))
    out = {"torch": str(torch.__version__), "threads": torch.get_num_threads(),
           "open_clip": open_clip_version}
    for dtype in spec["dtypes"]:
        dt = getattr(torch, dtype)
        model = model.to(dt)
        for part, fn, x in (("image", model.encode_image, inputs["pixels"].to(dt)),
                            ("text", model.encode_text, inputs["ids"])):
            times = []
            with torch.inference_mode():
                for _ in range(spec["repeat"] + 1):  # the first run warms up
                    t0 = time.perf_counter()
                    y = fn(x)
                    times.append(time.perf_counter() - t0)
            out[f"{part}_{dtype}_s"] = statistics.median(times[1:])
            out[f"{part}_{dtype}"] = y.float()
    torch.save(out, os.path.join(folder, "open_clip.pt"))


if __name__ == "__main__":
    {"fixtures": fixtures, "bench": bench}[sys.argv[1]](sys.argv[2])

"""Training a small Cosmos-architecture visual tokenizer on the synthetic shapes, with a
reconstruction loss.

    python train_vq.py --config nano --out checkpoints/nano/vq     # the shipped one: 64 px -> 8x8
    python train_vq.py --config nano --out runs/vq --steps 50     # a quick look
    # the decoder alone, on from a trained tokenizer: its codes stay the same, so an LM trained on
    # them still fits
    python train_vq.py --init runs/vq --decoder-only --out runs/vq-dec --steps 2000 --lr 5e-4 \\
        --warmup-steps 0
    python -m pytest -q tests/test_nano.py

The network is cosmos_tokenizer.py's, unchanged: encoder -> quant_conv -> FSQ -> post_quant_conv ->
decoder, a one-frame video in and out. FSQ has no codebook to learn and passes gradients straight
through its rounding, so the whole loss is the reconstruction: L1 + MSE on [-1, 1] pixels (MSE is
what PSNR measures; L1 keeps pulling on the small errors at hard edges once MSE is flat). No GAN,
no perceptual loss: the shapes are flat palette colours, where a pixel loss is the right one.
Images are drawn on the fly by shapes.ShapesDataset (seed 0 for training, seed 1 held out), so no
PNGs are needed.

--decoder-only freezes the encoder and quant_conv (so the codes of every image stay what they
were) and trains post_quant_conv + decoder further: sharper pictures from an LM already trained on
those codes.

Writes {out}/config.json + model.safetensors (CosmosTokenizer.save_pretrained, loadable by
from_pretrained), {out}/log.jsonl (a line per --log-every steps: step, loss, lr) and, at the end,
the held-out PSNR in {out}/psnr.json, measured like cosmos_tokenizer.py's CLI: uint8 in, uint8 out
(cosmos_tokenizer.psnr).
"""
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import Parser, run_main, write_atomic
from cosmos_tokenizer import PRESETS, CosmosConfig, CosmosTokenizer, psnr, tensor_to_uint8
from shapes import ShapesDataset

PROG = "train_vq.py"


def get_parser():
    p = Parser(prog=PROG, description="Train a small Cosmos tokenizer on the shapes.")
    p.add_argument("--config", default="nano",
                   help=f"cosmos_tokenizer.py preset: {', '.join(PRESETS)}")
    p.add_argument("--levels", type=int, nargs="+",
                   help="FSQ levels instead of the preset's (codebook: their product)")
    p.add_argument("--init",
                   help="start from this trained tokenizer directory instead (its config, not "
                   "--config)")
    p.add_argument("--decoder-only", action="store_true",
                   help="with --init: train post_quant_conv + decoder only")
    p.add_argument("--out", required=True,
                   help="directory for config.json, model.safetensors, log.jsonl, psnr.json")
    p.add_argument("--size", type=int, default=64,
                   help="image side in pixels, a multiple of the spatial compression")
    p.add_argument("--steps", type=int, default=6000)
    # Small batches learn more per image seen here: 32k images gave 25.3 dB at batch 32, 27.9 at
    # 16, 30.5 at 8
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak Adam lr: linear warmup, then cosine to 1/10")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--train-images", type=int, default=20000,
                   help="scenes drawn once (seed 0), then cycled")
    p.add_argument("--val-images", type=int, default=256,
                   help="held-out scenes (seed 1) for the PSNR")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0, help="init and batch order")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def render(n, size, seed) -> torch.Tensor:
    """uint8 [n, 3, size, size] of ShapesDataset(n, size, seed): rendered once, they are cheap to
    keep (12 KB each)."""
    ds = ShapesDataset(n, size, seed)
    images = np.stack([np.asarray(ds[i]["image"]) for i in range(n)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(127.5).sub(1)  # uint8 -> [-1, 1], as cosmos_tokenizer.pil_to_tensor


def reconstruct(vq: CosmosTokenizer, x: torch.Tensor, encoder_grad=True) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 3, H, W], through the quantizer (straight-through),
    differentiable."""
    with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
        codes = vq.quantizer.quantize(vq.quant_conv(vq.encoder(x.unsqueeze(2))))
    return vq.decoder(vq.post_quant_conv(codes))[:, :, 0]


@torch.no_grad()
def held_out_psnr(vq: CosmosTokenizer, images: torch.Tensor, batch_size=64) -> float:
    """PSNR (dB) of the whole held-out set as one image: encode to indices, decode, round to
    uint8."""
    vq.eval()
    rec = torch.cat([vq.decode(vq.encode(to_pixels(images[i:i + batch_size])))
                     for i in range(0, len(images), batch_size)])
    vq.train()
    return psnr(images.permute(0, 2, 3, 1).numpy(), tensor_to_uint8(rec))


def lr_factor(step, warmup, total, min_ratio=0.1):
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def write_json(path, obj):
    text = json.dumps(obj, indent=1) + "\n"

    def save(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, save)


def check_args(args):
    """The flags that need no file: zero or negative counts are refused, never replaced."""
    if args.decoder_only and not args.init:
        raise ValueError("--decoder-only needs --init DIR (a trained tokenizer whose codes are "
                         "kept)")
    if args.init and args.levels:
        raise ValueError("--levels and --init: the codes of a trained tokenizer are fixed")
    if args.levels and min(args.levels) < 2:
        raise ValueError(f"--levels {' '.join(map(str, args.levels))}: every level must be >= 2")
    for name in ("size", "steps", "batch_size", "train_images", "val_images", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "threads"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")


def train(args) -> dict:
    check_args(args)
    if args.init:
        cfg = CosmosTokenizer.from_pretrained(args.init).config
    else:
        cfg = CosmosConfig.from_name(args.config)
    if args.levels:
        levels = dict(levels=args.levels, embedding_dim=len(args.levels))
        cfg = CosmosConfig.from_dict(dict(cfg.to_dict(), **levels))
    if args.size % cfg.spatial_compression:
        raise ValueError(f"--size {args.size} must be a positive multiple of the spatial "
                         f"compression {cfg.spatial_compression}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    train_images = render(args.train_images, args.size, seed=0)
    val_images = render(args.val_images, args.size, seed=1)
    torch.manual_seed(args.seed)
    vq = CosmosTokenizer.from_pretrained(args.init) if args.init else CosmosTokenizer(cfg)
    vq.train()
    if args.decoder_only:
        for p in [*vq.encoder.parameters(), *vq.quant_conv.parameters()]:
            p.requires_grad_(False)
    params = [p for p in vq.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in vq.parameters())
    n_trained = sum(p.numel() for p in params)
    grid = args.size // cfg.spatial_compression
    print(f"{args.init or args.config}: {n_params / 1e6:.2f}M parameters "
          f"({n_trained / 1e6:.2f}M trained), {args.size} px -> {grid}² codes of "
          f"{cfg.codebook_size}; {args.train_images} training scenes, {args.val_images} held out")
    opt = torch.optim.Adam(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.warmup_steps, args.steps))
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "log.jsonl")
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_images), generator=gen)
    pos = 0
    bar = tqdm(range(args.steps), disable=args.no_progress, dynamic_ncols=True)
    with open(log_path, "w") as log, bar:
        for step in bar:
            # a new epoch: a fresh order, the tail of the last one dropped
            if pos + args.batch_size > len(order):
                order = torch.randperm(len(train_images), generator=gen)
                pos = 0
            x = to_pixels(train_images[order[pos:pos + args.batch_size]])
            pos += args.batch_size
            rec = reconstruct(vq, x, encoder_grad=not args.decoder_only)
            l1 = F.l1_loss(rec, x)
            mse = F.mse_loss(rec, x)
            loss = l1 + mse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            # PSNR of the batch in [-1, 1] units (range 2): a live gauge, the held-out number
            # below is the real one
            batch_psnr = 10 * math.log10(4 / max(mse.item(), 1e-12))
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{batch_psnr:.1f}", lr=f"{lr:.1e}")
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                record = dict(step=step + 1, loss=round(loss.item(), 6), l1=round(l1.item(), 6),
                              mse=round(mse.item(), 7), psnr=round(batch_psnr, 2), lr=lr,
                              seconds=round(time.perf_counter() - t_start, 1))
                log.write(json.dumps(record) + "\n")
                log.flush()
    vq.eval()
    vq.save_pretrained(args.out)
    result = dict(config=args.init or args.config, decoder_only=args.decoder_only,
                  size=args.size, grid=grid, codebook_size=cfg.codebook_size, params=n_params,
                  steps=args.steps, held_out_psnr=round(held_out_psnr(vq, val_images), 2),
                  val_images=args.val_images, seconds=round(time.perf_counter() - t_start, 1))
    write_json(os.path.join(args.out, "psnr.json"), result)
    print(f"held-out PSNR {result['held_out_psnr']:.2f} dB on {args.val_images} scenes; "
          f"{result['seconds']:.0f} s; wrote {args.out}")
    return result


def main(argv=None):
    run_main(PROG, train, get_parser().parse_args(argv))


if __name__ == "__main__":
    main()

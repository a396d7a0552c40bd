"""
Performance measurements, one subcommand per part; each prints a small table with ratios.

    python bench.py cosmos                                   # DV8x16x16 decoder, random weights, 32x32 and 64x64 grids
    python bench.py cosmos --grids 32 64 --preset dv-tiny --repeat 3
    python bench.py cosmos --ckpt checkpoints/Cosmos-1.0-Tokenizer-DV8x16x16 --device cuda --dtype bfloat16

Each grid size runs in its own process so that the peak resident memory (ru_maxrss) belongs to that size alone.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _gib(kib: int) -> float:
    return kib / 2 ** 20  # ru_maxrss is in KiB on Linux


def _cosmos_child(args):
    """Decode one grid size and print one JSON line."""
    import torch

    from cosmos_tokenizer import CosmosConfig, CosmosTokenizer

    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.ckpt:
        tok = CosmosTokenizer.from_pretrained(args.ckpt, dtype=dtype, device=args.device, encoder=False, decoder=True)
    else:
        tok = CosmosTokenizer(CosmosConfig.from_name(args.preset), encoder=False).to(args.device, dtype).eval()
    load_s = time.perf_counter() - t0
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    g = args.child_grid
    indices = torch.randint(0, tok.codebook_size, (args.batch, g, g))
    cuda = args.device.startswith("cuda")
    times = []
    for _ in range(args.repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        images = tok.decode(indices)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "grid": g, "image": list(images.shape[-2:]), "load_s": load_s, "decode_s": min(times),
        "peak_rss_gib": _gib(rss_peak), "rss_over_load_gib": _gib(rss_peak - rss_loaded),
        "cuda_peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        "threads": torch.get_num_threads(), "params": sum(p.numel() for p in tok.parameters()),
    }))


def bench_cosmos(args):
    """Decode time and peak memory of the Cosmos decoder for each grid size."""
    if args.child_grid:
        return _cosmos_child(args)
    passthrough = ["--batch", str(args.batch), "--repeat", str(args.repeat), "--preset", args.preset,
                   "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    passthrough += ["--ckpt", args.ckpt] if args.ckpt else []
    load_before = os.getloadavg()[0]
    rows = []
    for g in args.grids:
        cmd = [sys.executable, __file__, "cosmos", "--child-grid", str(g)] + passthrough
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"error: grid {g}x{g} failed: {tail}", file=sys.stderr)
            raise SystemExit(2)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    source = args.ckpt or f"{args.preset} (random weights)"
    print(f"cosmos decoder {source}: {rows[0]['params'] / 1e6:.1f}M params, {args.device} {args.dtype}, "
          f"batch {args.batch}, {rows[0]['threads']} threads, best of {args.repeat}, "
          f"1-min load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'grid':>7} {'image':>10} {'decode s':>9} {'s/1k tok':>9} {'x first':>8} {'peak RSS GiB':>13} "
          f"{'RSS over weights':>17}" + (f" {'CUDA peak GiB':>14}" if rows[0]["cuda_peak_gib"] is not None else ""))
    base = rows[0]["decode_s"] / rows[0]["grid"] ** 2
    for r in rows:
        per_tok = r["decode_s"] / (r["grid"] ** 2 * args.batch)
        line = (f"{r['grid']:>4}x{r['grid']:<2} {r['image'][0]:>5}x{r['image'][1]:<4} {r['decode_s']:>9.2f} "
                f"{per_tok * 1000:>9.2f} {r['decode_s'] / r['grid'] ** 2 / base:>8.2f} {r['peak_rss_gib']:>13.2f} "
                f"{r['rss_over_load_gib']:>17.2f}")
        if r["cuda_peak_gib"] is not None:
            line += f" {r['cuda_peak_gib']:>14.2f}"
        print(line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cosmos", help="Cosmos decoder: time and peak memory per code grid")
    p.add_argument("--grids", type=int, nargs="+", default=[32, 64], help="grid sides (64 -> a 1024x1024 image)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="decodes per grid; the fastest is reported")
    p.add_argument("--preset", default="dv8x16x16", help="architecture when no --ckpt is given")
    p.add_argument("--ckpt", default=None, help="tokenizer directory (decoder.jit or ours) instead of random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--child-grid", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=bench_cosmos)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()

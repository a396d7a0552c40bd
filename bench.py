"""
Performance measurements, one subcommand per part; each prints a small table with ratios.

    python bench.py decode                                   # SimpleAR-0.5B shape, random weights, 64 tokens
    python bench.py decode --layers 4 --tokens 32            # quick run on a cut model
    python bench.py sample                                   # seconds per image at 256², 512², 1024² (0.5B)
    python bench.py train                                    # train.py tokens/s + MFU, 1 vs 2 processes

    python bench.py cosmos                                   # DV8x16x16 decoder, random weights, 32x32 and 64x64 grids
    python bench.py cosmos --grids 32 64 --preset dv-tiny --repeat 3
    python bench.py cosmos --ckpt checkpoints/Cosmos-1.0-Tokenizer-DV8x16x16 --device cuda --dtype bfloat16

Each grid size runs in its own process so that the peak resident memory (ru_maxrss) belongs to that size alone.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer


def copy_bandwidth(nbytes=1 << 30, reps=5):
    """Bytes per second moved by a large tensor copy (read + write), median of reps."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[1:])


def random_model(args: ModelArgs, dtype, device, seed=0) -> Transformer:
    """Random weights fast: build on meta, allocate, fill with small normals (init schemes don't matter for speed)."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    return model.to(dtype).eval()


def bench_decode(a):
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    margs = ModelArgs.from_name(a.model)
    if a.layers:
        margs.n_layers = a.layers
    model = random_model(margs, dtype, a.device)
    V, C = margs.vocab_size, a.codebook
    first = V - C
    cond = torch.randint(0, first - 7, (1, a.prompt_len)).tolist()[0]
    uncond = torch.randint(0, first - 7, (1, a.prompt_len + 7)).tolist()[0]

    @torch.inference_mode()
    def ours(n):
        model.setup_cache(2, len(uncond) + n)
        logits, col = model.prefill([cond, uncond], vocab=(first, V))
        g = torch.Generator(device=a.device).manual_seed(0)
        t0 = time.perf_counter()
        for t in range(n):
            lp = torch.log_softmax(logits, -1)
            mixed = lp[1] + a.cfg * (lp[0] - lp[1])
            code = torch.multinomial(torch.softmax(mixed, -1), 1, generator=g)
            tok = (code + first).expand(2, 1)
            logits = model(tok, input_pos=torch.tensor([col + t], device=a.device), vocab=(first, V), kv_len=col + t + 1)[:, 0]
        return time.perf_counter() - t0

    import warnings

    import transformers
    from transformers import LogitsProcessor, LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = Qwen2Config(**{k: v for k, v in margs.__class__.to_hf_config(margs).items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(cfg)
    hf.load_state_dict({Transformer.hf_key(k): v for k, v in model.state_dict().items()}, strict=False, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)  # its inv_freq buffer was left on meta
    hf = hf.to(dtype).eval()

    class CFGLogits(LogitsProcessor):
        """SimpleAR's processor: the unconditional prompt as a second forward with its own cache."""
        def __init__(self, scale, uncond_ids, model):
            self.scale, self.uncond, self.model, self.out = scale, uncond_ids, model, None

        def __call__(self, input_ids, scores):
            scores = F.log_softmax(scores, dim=-1)
            if self.out is None:
                self.out = self.model(self.uncond, use_cache=True)
            else:
                self.out = self.model(input_ids[:, -1:], use_cache=True, past_key_values=self.out.past_key_values)
            u = F.log_softmax(self.out.logits[:, -1], dim=-1)
            return u + self.scale * (scores - u)

    @torch.inference_mode()
    def transformers_path(n):
        proc = CFGLogits(a.cfg, torch.tensor([uncond], device=a.device), hf)
        t0 = time.perf_counter()
        hf.generate(torch.tensor([cond], device=a.device), attention_mask=torch.ones(1, len(cond), dtype=torch.long),
                    max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=C, top_p=1.0, temperature=1.0,
                    logits_processor=LogitsProcessorList([proc]), pad_token_id=0, eos_token_id=None)
        return time.perf_counter() - t0

    ours(4)  # warm-up
    transformers_path(4)
    t_ours = statistics.median(ours(a.tokens) for _ in range(a.repeat))
    t_hf = statistics.median(transformers_path(a.tokens) for _ in range(a.repeat))
    bw = copy_bandwidth()
    nbytes = (model.num_params(non_embedding=True) + C * margs.dim) * torch.finfo(dtype).bits // 8
    step = t_ours / a.tokens
    print(f"{a.model} with {margs.n_layers} layers, {a.dtype}, {a.tokens} image tokens, CFG pair (batch 2), prompt {a.prompt_len}")
    print(f"{'path':<42}{'tok/s':>8}{'ms/token':>10}")
    print(f"{'transformers generate + CFG processor':<42}{a.tokens / t_hf:>8.2f}{1e3 * t_hf / a.tokens:>10.1f}")
    print(f"{'ours: fused cache, batched CFG, code rows':<42}{a.tokens / t_ours:>8.2f}{1e3 * step:>10.1f}")
    print(f"speed-up: {t_hf / t_ours:.2f}x")
    print(f"roofline: {nbytes / 1e9:.2f} GB weights per step / {bw / 1e9:.1f} GB/s copy bandwidth = "
          f"{1e3 * nbytes / bw:.1f} ms; reached {nbytes / bw / step:.2f} of it")


def bench_sample(a):
    """Seconds per image of sample.py's loop (CFG pair, repetition penalty, image rows) and of the Cosmos
    decoder, per image size. The LM time is measured on --steps decode steps at the start and at the end of
    the image (attention grows with the cache) and integrated linearly over all (size/16)^2 steps, unless --full."""
    from cosmos_tokenizer import CosmosConfig, CosmosTokenizer
    from sample import guided_scores, make_generators, sample_from

    torch.manual_seed(0)
    margs = ModelArgs.from_name(a.model)
    if a.layers:
        margs.n_layers = a.layers
    model = random_model(margs, torch.float32, "cpu")
    vq = CosmosTokenizer(CosmosConfig.from_name(a.preset), encoder=False).eval()
    K = vq.codebook_size
    first, V = margs.vocab_size - K, margs.vocab_size
    cond, neg = list(range(100, 100 + a.prompt_len)), list(range(200, 235))  # SimpleAR's negative prompt: ~35 tokens
    print(f"{a.model} ({margs.n_layers} layers) + {a.preset} decoder, random weights, fp32, CPU "
          f"{torch.get_num_threads()} threads, one image = CFG pair (2 rows), repetition penalty 1.1")
    print(f"{'size':>6}{'tokens':>8}{'prefill s':>11}{'first step ms':>15}{'last step ms':>14}{'LM s':>9}"
          f"{'decoder s':>11}{'total s':>9}")
    for size in a.sizes:
        n = (size // 16) ** 2

        @torch.inference_mode()
        def steps(start, count):
            """Times `count` decode steps from column start (the cache keeps whatever it holds)."""
            nonlocal logits
            t0 = time.perf_counter()
            for t in range(start, start + count):
                scores = guided_scores(logits[:1], logits[1:], seen, 6.0, 1.0, None, 1.0, 1.1)
                code = sample_from(scores, gens)
                seen[0, code] = True
                tok = (first + code).repeat(2)[:, None]
                logits = model(tok, input_pos=torch.tensor([col + t]), vocab=(first, V), kv_len=col + t + 1)[:, 0]
            return (time.perf_counter() - t0) / count

        model.setup_cache(2, len(neg) + n)
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits, col = model.prefill([cond, neg], vocab=(first, V))
        prefill = time.perf_counter() - t0
        seen, gens = torch.zeros(1, K, dtype=torch.bool), make_generators([0], "cpu")
        if a.full or n <= 2 * a.steps:
            first_ms = last_ms = steps(0, n - 1)
            lm = prefill + first_ms * (n - 1)
        else:
            first_ms, last_ms = steps(0, a.steps), steps(n - 1 - a.steps, a.steps)
            lm = prefill + (first_ms + last_ms) / 2 * (n - 1)
        t0 = time.perf_counter()
        vq.decode(torch.randint(0, K, (1, size // 16, size // 16)))
        dec = time.perf_counter() - t0
        model.cache = None
        print(f"{size:>5}²{n:>8}{prefill:>11.2f}{1e3 * first_ms:>15.1f}{1e3 * last_ms:>14.1f}{lm:>9.1f}"
              f"{dec:>11.1f}{lm + dec:>9.1f}")


def bench_train(a):
    """train.py throughput on a small config: tokens/s and MFU for the same global batch on
    1 process x all cores, 1 process x 1 thread and 2 processes (torchrun, gloo) x cores/2 threads."""
    import tempfile

    import numpy as np
    from PIL import Image

    import data

    class RandomVQ:  # stands in for Cosmos: throughput does not depend on which codes
        spatial_compression, codebook_size = 16, a.codebook

        def encode(self, x):
            return torch.randint(0, a.codebook, (x.shape[0], x.shape[2] // 16, x.shape[3] // 16))

    tmp, n, rng = tempfile.mkdtemp(prefix="bench_train_"), a.batch * (a.steps + 2), np.random.default_rng(0)
    os.makedirs(f"{tmp}/img")
    with open(f"{tmp}/meta.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (a.size, a.size, 3), dtype=np.uint8)).save(f"{tmp}/img/{i}.png")
            f.write(json.dumps(dict(image=f"img/{i}.png", caption=f"a test image number {i}")) + "\n")
    data.train_bpe_tokenizer([f"a test image number {i}" for i in range(n)] + data.STYLE_PREFIXES, 512, f"{tmp}/tok")
    data.prepare_codes(f"{tmp}/meta.jsonl", f"{tmp}/codes", RandomVQ(), a.size)
    cores, rows = len(os.sched_getaffinity(0)), []
    for procs, threads in ((1, cores), (1, 1), (2, max(1, cores // 2))):
        out = f"{tmp}/run{procs}x{threads}"
        args = ["train.py", "--config", "tiny", "--dim", a.dim, "--n-layers", a.layers, "--n-heads", a.heads,
                "--n-kv-heads", a.kv_heads, "--intermediate-size", a.ffn, "--tokenizer", f"{tmp}/tok",
                "--data", f"{tmp}/codes", "--out", out, "--steps", a.steps, "--batch-size", a.batch // procs,
                "--log-every", 1, "--save-every", 0, "--keep", 1, "--loss-chunk", 1024, "--no-progress"]
        launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
                                     if procs > 1 else [])
        subprocess.run(launch + [str(x) for x in args], cwd=os.path.dirname(os.path.abspath(__file__)),
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)), check=True, capture_output=True)
        log = [json.loads(line) for line in open(f"{out}/log.jsonl")][2:]  # the first two steps warm up
        rows.append((procs, threads, statistics.median(r["tokens_per_s"] for r in log),
                     statistics.median(r["mfu"] for r in log)))
    print(f"train.py: dim {a.dim} x {a.layers} blocks, {a.codebook} codes, {a.size} px, global batch {a.batch}, "
          f"fp32, {cores} cores; medians over steps 3..{a.steps}; MFU against the measured fp32 matmul peak")
    print(f"{'processes x threads':<22}{'tokens/s':>10}{'MFU':>8}{'vs first':>10}")
    for procs, threads, tps, mfu in rows:
        print(f"{f'{procs} x {threads}':<22}{tps:>10.0f}{mfu:>8.1%}{tps / rows[0][2]:>9.2f}x")


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

    p = sub.add_parser("decode", help="cached CFG-pair decode vs SimpleAR's transformers path, and the roofline")
    p.add_argument("--model", default="simplear-0.5b", help="model.py preset")
    p.add_argument("--layers", type=int, default=0, help="cut the model to this many layers (0: all)")
    p.add_argument("--tokens", type=int, default=64, help="image tokens generated per run")
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--codebook", type=int, default=64000)
    p.add_argument("--cfg", type=float, default=6.0)
    p.add_argument("--repeat", type=int, default=3, help="runs per path; the median is reported")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=bench_decode)

    p = sub.add_parser("sample", help="seconds per image (LM and decoder) at several sizes")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--model", default="simplear-0.5b", help="model.py preset")
    p.add_argument("--layers", type=int, default=0, help="cut the model to this many layers (0: all)")
    p.add_argument("--preset", default="dv8x16x16", help="cosmos_tokenizer.py preset of the decoder")
    p.add_argument("--prompt-len", type=int, default=30)
    p.add_argument("--steps", type=int, default=16, help="decode steps timed at each end of the image")
    p.add_argument("--full", action="store_true", help="time every step instead")
    p.set_defaults(func=bench_sample)

    p = sub.add_parser("train", help="train.py tokens/s and MFU, 1 vs 2 processes")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences per step)")
    p.add_argument("--size", type=int, default=256, help="image side: (size/16)^2 image tokens per sequence")
    p.add_argument("--codebook", type=int, default=64000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1024)
    p.set_defaults(func=bench_train)

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

"""Performance measurements of the shipped functions, one subcommand per part; each prints a table
with its ratios and the machine it ran on.

    python bench.py decode --int8 --compile  # the decode loop per dtype vs transformers, roofline
    python bench.py sample --steps 32        # seconds per image at 256², 512², 1024² (0.5B shape)
    python bench.py cosmos --grids 32 64     # the Cosmos decoder, fp32 vs auto dtype, PSNR, memory
    python bench.py int8                     # int8 weight-only quality: logits, greedy codes
    python bench.py jacobi                   # speculative Jacobi decoding vs plain decoding
    python bench.py train                    # train.py tokens/s + MFU, 1 vs 2 processes
    python bench.py clip                     # clip.py's ViT-H-14 forwards vs open_clip's
    python bench.py grpo                     # one GRPO step at the 0.5B shape, CLIP-H reward
    python bench.py gpu                      # the GPU tables in one run (decode, 1024² image,
                                             # Cosmos)

Cosmos grid sizes run in their own processes, so that the peak resident memory is that size's
alone.
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

import data as data_py
import model as model_py
import sample
from cli import Parser, run_main
from model import ModelArgs, Transformer


def read_bandwidth(nbytes=1 << 30, reps=5):
    """Bytes per second read by summing a large float32 tensor (median of reps): the rate at which
    a decode step can stream its weights."""
    x = torch.ones(nbytes // 4)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:])


def machine() -> str:
    """One line naming the machine a table was measured on."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    caps = torch._C._cpu._get_cpu_capability()
    bf16 = "with" if model_py.cpu_bf16_native() else "without"
    return (f"{caps.get('cpu_name') or 'CPU'} ({caps.get('num_physical_cores')} cores, "
            f"{bf16} bf16 instructions), {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_model(args: ModelArgs, dtype, device, seed=0) -> Transformer:
    """Random weights fast: build on meta, allocate, fill with small normals (init schemes don't
    matter for speed)."""
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


def bytes_per_step(model, vocab) -> int:
    """Weight bytes one decode step reads: every layer, the final norm, and the head's sampled
    rows."""
    skip = {id(model.embed_tokens.weight)}
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                if id(t) not in skip)
    head = model.decode_head[2] if model.decode_head else None
    if head is not None and not isinstance(head, model_py.Int8Linear):
        total += head.weight.numel() * head.weight.element_size()
    elif head is not None:
        total += sum(t.numel() * t.element_size() for t in head.buffers())
    else:
        w = model.head_weight()[vocab[0]:vocab[1]]
        total += w.numel() * w.element_size()
    return total


def time_decode(model, prompt, negative, vocab, n, sampling, compile, device, seed=0):
    """Seconds of sample.decode_n_tokens (the shipped loop) for n tokens of one CFG pair, after
    sample.prefill."""
    logits, ends = sample.prefill(model, [prompt], negative, vocab, n, sampling, compile)
    u = sample.uniforms([seed], n, device)
    sync(device)
    t0 = time.perf_counter()
    sample.decode_n_tokens(model, logits, ends, u, sampling, vocab[0], vocab, compile,
                           progress=False)
    sync(device)
    return time.perf_counter() - t0


def transformers_decode(model, dtype, prompt, negative, n, scale, device, repeat):
    """Median seconds of SimpleAR's own path for n tokens: transformers' generate with a logits
    processor that runs the negative prompt as a second forward with its own cache."""
    import warnings

    import transformers
    from transformers import LogitsProcessor, LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    margs = model.args
    cfg = Qwen2Config(**{k: v for k, v in margs.to_hf_config().items()
                         if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(cfg)
    state = {Transformer.hf_key(k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    # its inv_freq buffer was left on meta
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    hf = hf.to(device=device, dtype=dtype).eval()

    class CFGLogits(LogitsProcessor):
        """SimpleAR's processor: the unconditional prompt as a second forward with its own cache."""
        def __init__(self, uncond_ids):
            self.uncond, self.out = uncond_ids, None

        def __call__(self, input_ids, scores):
            scores = F.log_softmax(scores, dim=-1)
            if self.out is None:
                self.out = hf(self.uncond, use_cache=True)
            else:
                self.out = hf(input_ids[:, -1:], use_cache=True,
                              past_key_values=self.out.past_key_values)
            u = F.log_softmax(self.out.logits[:, -1], dim=-1)
            return u + scale * (scores - u)

    @torch.inference_mode()
    def run():
        proc = CFGLogits(torch.tensor([negative], device=device))
        sync(device)
        t0 = time.perf_counter()
        hf.generate(torch.tensor([prompt], device=device),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                    max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=0, top_p=1.0,
                    temperature=1.0, logits_processor=LogitsProcessorList([proc]), pad_token_id=0,
                    eos_token_id=None)
        sync(device)
        return time.perf_counter() - t0

    run()  # warm-up
    return statistics.median(run() for _ in range(repeat))


def decode_rows(a, margs, configs):
    """One row per (dtype, quantize, compile) of configs: ms per decode step of the shipped loop
    and, per dtype, of transformers' path; the bytes read per step and the share of the read
    roofline. The configurations take turns, run after run, so that a machine whose speed drifts (a
    shared host) slows them alike; each row is a median over --repeat runs."""
    bw = read_bandwidth() if torch.device(a.device).type == "cpu" else None
    K = a.codebook
    V = margs.vocab_size
    vocab = (V - K, V)
    prompt = list(range(100, 100 + a.prompt_len))
    negative = list(range(200, 200 + a.prompt_len + 11))
    s = sample.Sampling(guidance_scale=a.cfg)
    steps = a.tokens - 1  # the first token is drawn from the prefill's logits
    models = [random_model(margs, dtype, a.device).prepare_decoding(vocab, quantize)
              for dtype, quantize, _ in configs]
    nbytes = [bytes_per_step(m, vocab) for m in models]  # before a cache exists: weights only
    times = [[] for _ in configs]
    with torch.inference_mode():
        for r in range(a.repeat + 1):  # the first round warms up (and compiles)
            for i, (model, (_, _, compile)) in enumerate(zip(models, configs)):
                t = time_decode(model, prompt, negative, vocab, a.tokens, s, compile, a.device, r)
                if r:
                    times[i].append(t)
    for m in models:
        m.cache = None
    del models
    hf_ms = {}
    for dtype in dict.fromkeys(c[0] for c in configs) if a.transformers else ():
        plain = random_model(margs, dtype, a.device)
        t = transformers_decode(plain, dtype, prompt, negative, a.tokens, a.cfg, a.device,
                                a.repeat)
        hf_ms[dtype] = 1e3 * t / a.tokens
        del plain
    rows = []
    for (dtype, quantize, compile), t, nb in zip(configs, times, nbytes):
        ms = 1e3 * statistics.median(t) / steps
        rows.append(dict(dtype=str(dtype).removeprefix("torch."), quantize=quantize or "-",
                         compile=compile, ms=ms, gb=nb / 1e9,
                         roofline=(nb / bw * 1e3 / ms) if bw else None, hf_ms=hf_ms.get(dtype)))
    return rows, bw


def print_decode(rows, bw, title):
    print(title)
    print(f"{'dtype':<10}{'weights':<9}{'compiled':<10}{'ms/step':>9}{'tokens/s':>10}{'GB/step':>9}"
          f"{'of roofline':>13}{'transformers ms':>17}{'speed-up':>10}")
    for r in rows:
        roof = f"{r['roofline']:.2f}" if r["roofline"] is not None else "-"
        hf = f"{r['hf_ms']:.1f}" if r["hf_ms"] else "-"
        up = f"{r['hf_ms'] / r['ms']:.2f}x" if r["hf_ms"] else "-"
        print(f"{r['dtype']:<10}{r['quantize']:<9}{'yes' if r['compile'] else 'no':<10}"
              f"{r['ms']:>9.1f}{1e3 / r['ms']:>10.2f}{r['gb']:>9.2f}{roof:>13}{hf:>17}{up:>10}")
    if bw:
        print(f"roofline: GB/step / {bw / 1e9:.1f} GB/s (this machine's read bandwidth, "
              "a 1 GiB float32 sum); transformers: generate + SimpleAR's CFG processor, "
              "same weights and dtype")
    base = rows[0]["ms"]
    print("vs the first row: "
          + ", ".join(f"{r['dtype']}{'+' + r['quantize'] if r['quantize'] != '-' else ''}"
                      f"{' compiled' if r['compile'] else ''} {base / r['ms']:.2f}x"
                      for r in rows))


def bench_decode(a):
    torch.manual_seed(0)
    margs = ModelArgs.from_name(a.model)
    if a.layers:
        margs.n_layers = a.layers
    auto = model_py.resolve_dtype("auto", a.device)[0]
    configs = [(torch.float32, None, False)]
    if auto != torch.float32:
        configs.append((auto, None, False))
    if a.int8:
        configs.append((auto, "int8", False))
    if a.compile:
        configs.append((auto, None, True))
    rows, bw = decode_rows(a, margs, configs)
    print_decode(rows, bw, f"{a.model} with {margs.n_layers} layers, random weights, "
                 f"{a.tokens} image tokens, CFG pair (2 rows), prompt {a.prompt_len}, "
                 f"medians of {a.repeat}; {machine()}")


def bench_sample(a):
    """Seconds per image of the shipped loop (CFG pair, repetition penalty 1.1, image rows) and of
    the Cosmos decoder, per image size, in the dtype --dtype auto picks. The LM time is prefill +
    the decode steps, timed over --steps steps at the start and at the end of the image (attention
    grows with the cache) and integrated linearly over all (size/16)^2 steps, unless --full."""
    from cosmos_tokenizer import CosmosConfig, CosmosTokenizer

    torch.manual_seed(0)
    dtype = model_py.resolve_dtype(a.dtype, a.device)[0]
    margs = ModelArgs.from_name(a.model)
    if a.layers:
        margs.n_layers = a.layers
    vq = CosmosTokenizer(CosmosConfig.from_name(a.preset),
                         encoder=False).to(a.device, dtype).eval()
    K = vq.codebook_size
    V = margs.vocab_size
    vocab = (V - K, V)
    model = random_model(margs, dtype, a.device).prepare_decoding(vocab, a.quantize)
    s = sample.Sampling(repetition_penalty=1.1)
    # SimpleAR's negative: ~35 tokens
    prompt, neg = list(range(100, 100 + a.prompt_len)), list(range(200, 235))
    print(f"{a.model} ({margs.n_layers} layers) + {a.preset} decoder, random weights, "
          f"{str(dtype).removeprefix('torch.')}{' int8' if a.quantize else ''}"
          f"{', compiled' if a.compile else ''}; "
          f"one image = CFG pair (2 rows), repetition penalty 1.1; {machine()}")
    print(f"{'size':>6}{'tokens':>8}{'prefill s':>11}{'first step ms':>15}{'last step ms':>14}"
          f"{'LM s':>9}{'decoder s':>11}{'total s':>9}")
    for size in a.sizes:
        n = (size // 16) ** 2

        @torch.inference_mode()
        def steps(start, count):
            """ms per step of decode_n_tokens for count steps from cache column `ends + start`."""
            logits, ends = sample.prefill(model, [prompt], neg, vocab, n, s, a.compile)
            u = sample.uniforms([0], count + 1, a.device)
            sample.decode_n_tokens(model, logits, ends + start, u[:, :2], s, vocab[0], vocab,
                                   a.compile, False)
            sync(a.device)
            t0 = time.perf_counter()
            sample.decode_n_tokens(model, logits, ends + start, u, s, vocab[0], vocab, a.compile,
                                   False)
            sync(a.device)
            return (time.perf_counter() - t0) / count

        with torch.inference_mode():
            sync(a.device)
            t0 = time.perf_counter()
            sample.prefill(model, [prompt], neg, vocab, n, s, a.compile)
            sync(a.device)
            prefill = time.perf_counter() - t0
        if a.full or n <= 2 * a.steps:
            first = last = steps(0, n - 1)
        else:
            first, last = steps(0, a.steps), steps(n - 1 - a.steps, a.steps)
        lm = prefill + (first + last) / 2 * (n - 1)
        codes = torch.randint(0, K, (1, size // 16, size // 16))
        with torch.inference_mode():
            vq.decode(codes[:, :2, :2])  # warm-up
            sync(a.device)
            t0 = time.perf_counter()
            vq.decode(codes)
            sync(a.device)
        dec = time.perf_counter() - t0
        model.cache = None
        print(f"{size:>5}²{n:>8}{prefill:>11.2f}{1e3 * first:>15.1f}{1e3 * last:>14.1f}{lm:>9.1f}"
              f"{dec:>11.1f}{lm + dec:>9.1f}")


def bench_gpu(a):
    """The GPU tables in one run: decode (fp32 vs bf16 eager vs bf16 compiled with CUDA graphs, and
    transformers), one 1024² image, the Cosmos decoder. On a CPU it runs too (a smoke test)."""
    t_start = time.perf_counter()
    margs = ModelArgs.from_name(a.model)
    if a.layers:
        margs.n_layers = a.layers
    cuda = torch.device(a.device).type == "cuda"
    low = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
    d = argparse.Namespace(device=a.device, codebook=64000, prompt_len=24, cfg=6.0, tokens=a.tokens,
                           repeat=a.repeat, transformers=True)
    rows, bw = decode_rows(d, margs, [(torch.float32, None, False), (low, None, False),
                                      (low, None, True)])
    print_decode(rows, bw, f"decode: {a.model} with {margs.n_layers} layers, random weights, "
                 f"{a.tokens} tokens, CFG pair; {machine()}")
    s = argparse.Namespace(model=a.model, layers=a.layers, preset=a.preset, prompt_len=30,
                           steps=a.tokens, full=a.full, sizes=[a.size],
                           dtype=str(low).removeprefix("torch."), device=a.device, quantize=None,
                           compile=True)
    print()
    bench_sample(s)
    print()
    from cosmos_tokenizer import CosmosConfig, CosmosTokenizer
    print(f"cosmos {a.preset} decoder, random weights, one {a.size}² image:")
    for dtype in (torch.float32, low):
        vq = CosmosTokenizer(CosmosConfig.from_name(a.preset),
                             encoder=False).to(a.device, dtype).eval()
        codes = torch.randint(0, vq.codebook_size, (1, a.size // 16, a.size // 16))
        with torch.inference_mode():
            vq.decode(codes)
            sync(a.device)
            t0 = time.perf_counter()
            vq.decode(codes)
            sync(a.device)
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
        print(f"  {str(dtype).removeprefix('torch.'):<10}{time.perf_counter() - t0:8.2f} s{peak}")
        del vq
    print(f"bench.py gpu: {time.perf_counter() - t_start:.0f} s in all")


def bench_train(a):
    """train.py throughput on a small config: tokens/s and MFU for the same global batch on
    1 process x all cores, 1 process x 1 thread and 2 processes (torchrun, gloo) x cores/2
    threads."""
    import tempfile

    import numpy as np
    from PIL import Image

    import data

    class RandomVQ:  # stands in for Cosmos: throughput does not depend on which codes
        spatial_compression, codebook_size = 16, a.codebook

        def encode(self, x):
            return torch.randint(0, a.codebook,
                                 (x.shape[0], x.shape[2] // 16, x.shape[3] // 16))

    tmp = tempfile.mkdtemp(prefix="bench_train_")
    n = a.batch * (a.steps + 2)
    rng = np.random.default_rng(0)
    os.makedirs(f"{tmp}/img")
    with open(f"{tmp}/meta.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (a.size, a.size, 3), dtype=np.uint8)).save(
                f"{tmp}/img/{i}.png")
            f.write(json.dumps(dict(image=f"img/{i}.png", caption=f"a test image number {i}"))
                    + "\n")
    data.train_bpe_tokenizer([f"a test image number {i}" for i in range(n)] + data.STYLE_PREFIXES,
                             512, f"{tmp}/tok")
    data.prepare_codes(f"{tmp}/meta.jsonl", f"{tmp}/codes", RandomVQ(), a.size)
    cores, rows = len(os.sched_getaffinity(0)), []
    for procs, threads in ((1, cores), (1, 1), (2, max(1, cores // 2))):
        out = f"{tmp}/run{procs}x{threads}"
        args = ["train.py", "--config", "tiny", "--dim", a.dim, "--n-layers", a.layers,
                "--n-heads", a.heads, "--n-kv-heads", a.kv_heads, "--intermediate-size", a.ffn,
                "--tokenizer", f"{tmp}/tok", "--data", f"{tmp}/codes", "--out", out,
                "--steps", a.steps, "--batch-size", a.batch // procs, "--log-every", 1,
                "--save-every", 0, "--keep", 1, "--loss-chunk", 1024, "--dtype", a.dtype,
                "--no-progress"]
        launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                      f"--nproc_per_node={procs}"] if procs > 1 else [])
        subprocess.run(launch + [str(x) for x in args],
                       cwd=os.path.dirname(os.path.abspath(__file__)),
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)), check=True,
                       capture_output=True)
        # the first two steps warm up
        log = [json.loads(line) for line in open(f"{out}/log.jsonl")][2:]
        rows.append((procs, threads, statistics.median(r["tokens_per_s"] for r in log),
                     statistics.median(r["mfu"] for r in log)))
    print(f"train.py: dim {a.dim} x {a.layers} blocks, {a.codebook} codes, {a.size} px, "
          f"global batch {a.batch}, --dtype {a.dtype}, {cores} cores; medians over steps "
          f"3..{a.steps}; MFU against the matmul peak train.py measures in that dtype")
    print(f"{'processes x threads':<22}{'tokens/s':>10}{'MFU':>8}{'vs first':>10}")
    for procs, threads, tps, mfu in rows:
        print(f"{f'{procs} x {threads}':<22}{tps:>10.0f}{mfu:>8.1%}{tps / rows[0][2]:>9.2f}x")


def wordlevel_tokenizer(n_text):
    """A text tokenizer with n_text ids (whitespace words, <|endoftext|> and SimpleAR's 7 tokens
    last): the vocabulary layout of a real checkpoint without its 150k-merge BPE."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = [data_py.EOS_TOKEN, *data_py.SPECIAL_TOKENS]
    words = {f"w{i}": i for i in range(n_text - len(specials))}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    return tok


def bench_grpo(a):
    """One GRPO step of the shipped functions at the SimpleAR-0.5B shape, random weights: the
    rollout (sample.text_to_image on a bf16/auto copy of the policy, the preset's sampling: no
    guidance, temperature 1), the Cosmos DV8x16x16 decode, a ViT-H-14-shaped CLIP reward
    (grpo.clip_reward, SimpleAR's preprocessing), the update (grpo.policy_step with beta 0.04: a
    float32 reference model is held) and AdamW. Peak resident memory of the process."""
    import copy

    import clip
    import grpo
    from cosmos_tokenizer import CosmosConfig, CosmosTokenizer

    torch.manual_seed(0)
    dtype = model_py.resolve_dtype(a.dtype, "cpu")[0]
    margs = ModelArgs.from_name("simplear-0.5b")
    if a.layers:
        margs.n_layers = a.layers
    vq = CosmosTokenizer(CosmosConfig.from_name("dv8x16x16"), encoder=False).to(dtype).eval()
    K, V = vq.codebook_size, margs.vocab_size
    tok = wordlevel_tokenizer(V - K)
    vocab = (V - K, V)
    policy = random_model(margs, torch.float32, "cpu").requires_grad_(True)
    ref = copy.deepcopy(policy).requires_grad_(False)
    roller = copy.deepcopy(policy).to(dtype).prepare_decoding(vocab)
    cargs = clip.CLIPArgs.from_name("vit-h-14")
    clip_model = clip.CLIP(cargs).eval()
    symbols = list(clip.bytes_to_unicode().values())
    words = symbols + [s + "</w>" for s in symbols] + [clip.START, clip.END]
    clip_model.tokenizer = clip.Tokenizer({w: i for i, w in enumerate(words)}, [])
    reward = grpo.clip_reward(clip_model, "A photo of {}", "simplear")
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)
    settings = sample.Sampling(guidance_scale=1.0)  # --preset simplear's rollouts
    P, G = a.prompts, a.group
    captions = [" ".join(f"w{7 * i + j}" for j in range(12)) for i in range(P)]
    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(f"one GRPO step: SimpleAR-0.5B shape ({margs.n_layers} layers, {params(policy):.0f}M), "
          f"ViT-H-14-shaped CLIP ({params(clip_model):.0f}M, float32), Cosmos DV8x16x16 decoder, "
          f"random weights; {P} captions x {G} images at {a.size}² ({(a.size // 16) ** 2} tokens), "
          f"rollouts in {str(dtype).removeprefix('torch.')}, update float32 with micro-batches of "
          f"{a.micro_batch}, beta 0.04; {machine()}")
    t0 = time.perf_counter()
    rollout = sample.text_to_image(roller, tok, vq, captions, a.size, G, list(range(0, P * G, G)),
                                   settings, batch_size=P * G, progress=True)
    rollout_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    rewards = reward(captions, rollout.images)
    reward_s = time.perf_counter() - t1
    adv = grpo.group_advantages(rewards)
    first_id = vocab[0]
    t2 = time.perf_counter()
    grpo.policy_step(policy, ref, opt, tok, captions, rollout.codes, adv, first_id, K, 0.04,
                     a.micro_batch, 1.0, chunk=1024)
    update_s = time.perf_counter() - t2
    peak = _gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    lm_s, dec_s = rollout.lm_seconds, rollout.decoder_seconds
    print(f"{'rollout LM s':>13}{'decode s':>10}{'reward s':>10}{'update s':>10}{'step s':>9}"
          f"{'peak RSS GiB':>14}")
    print(f"{lm_s:>13.1f}{dec_s:>10.1f}{reward_s:>10.1f}{update_s:>10.1f}"
          f"{rollout_s + reward_s + update_s:>9.1f}{peak:>14.1f}")
    print(f"rewards: mean {rewards.mean():.4f}, std {rewards.std():.4f} (random weights)")


def _gib(kib: int) -> float:
    return kib / 2 ** 20  # ru_maxrss is in KiB on Linux


def _cosmos_child(args):
    """Decode one grid size in one dtype, print one JSON line; --save writes the images (float32
    .npy)."""
    import numpy as np

    from cosmos_tokenizer import CosmosConfig, CosmosTokenizer

    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # random weights: the same ones in every child, rounded to its dtype
    t0 = time.perf_counter()
    if args.ckpt:
        tok = CosmosTokenizer.from_pretrained(args.ckpt, dtype=dtype, device=args.device,
                                              encoder=False, decoder=True)
    else:
        tok = CosmosTokenizer(CosmosConfig.from_name(args.preset),
                              encoder=False).to(args.device, dtype).eval()
    load_s = time.perf_counter() - t0
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    g = args.child_grid
    gen = torch.Generator().manual_seed(1)
    indices = torch.randint(0, tok.codebook_size, (args.batch, g, g), generator=gen)
    times = []
    with torch.inference_mode():
        for _ in range(args.repeat):
            sync(args.device)
            t0 = time.perf_counter()
            images = tok.decode(indices)
            sync(args.device)
            times.append(time.perf_counter() - t0)
    if args.save:
        np.save(args.save, images.float().clamp(-1, 1).cpu().numpy())
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda = args.device.startswith("cuda")
    print(json.dumps({
        "grid": g, "image": list(images.shape[-2:]), "load_s": load_s, "decode_s": min(times),
        "peak_rss_gib": _gib(rss_peak), "rss_over_load_gib": _gib(rss_peak - rss_loaded),
        "cuda_peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        "threads": torch.get_num_threads(), "params": sum(p.numel() for p in tok.parameters()),
    }))


def bench_cosmos(args):
    """Decode time and peak memory of the Cosmos decoder for each grid size, in float32 and in the
    dtype --dtype names (auto: the one sample.py picks), with that dtype's PSNR against float32 on
    the same codes."""
    import tempfile

    import numpy as np

    if args.child_grid:
        return _cosmos_child(args)
    dtype = str(model_py.resolve_dtype(args.dtype, args.device)[0]).removeprefix("torch.")
    dtypes = ["float32"] if dtype == "float32" else ["float32", dtype]
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for g in args.grids:
            for dt in dtypes:
                save = os.path.join(tmp, f"{g}_{dt}.npy")
                cmd = [sys.executable, __file__, "cosmos", "--child-grid", str(g),
                       "--batch", str(args.batch), "--repeat", str(args.repeat),
                       "--preset", args.preset, "--device", args.device, "--dtype", dt,
                       "--threads", str(args.threads), "--save", save]
                cmd += ["--ckpt", args.ckpt] if args.ckpt else []
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    raise ValueError(f"grid {g}x{g} failed: {tail}")
                row = dict(json.loads(proc.stdout.strip().splitlines()[-1]), dtype=dt, psnr=None)
                if dt != "float32":
                    mse = np.mean(((np.load(save) - np.load(os.path.join(tmp, f"{g}_float32.npy")))
                                   / 2) ** 2)
                    row["psnr"] = 10 * np.log10(1 / mse) if mse > 0 else float("inf")
                rows.append(row)
    source = args.ckpt or f"{args.preset} (random weights)"
    print(f"cosmos decoder {source}: {rows[0]['params'] / 1e6:.1f}M params, {args.device}, "
          f"batch {args.batch}, best of {args.repeat}; {machine()}; "
          f"1-min load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    cuda = rows[0]["cuda_peak_gib"] is not None
    print(f"{'grid':>7} {'image':>10} {'dtype':>9} {'decode s':>9} {'s/1k tok':>9} {'vs fp32':>8} "
          f"{'PSNR vs fp32':>13} {'peak RSS GiB':>13} {'RSS over weights':>17}"
          + (f" {'CUDA peak GiB':>14}" if cuda else ""))
    fp32 = {}
    for r in rows:
        fp32.setdefault(r["grid"], r["decode_s"])
        per_tok = r["decode_s"] / (r["grid"] ** 2 * args.batch)
        psnr = "-" if r["psnr"] is None else f"{r['psnr']:.1f} dB"
        line = (f"{r['grid']:>4}x{r['grid']:<2} {r['image'][0]:>5}x{r['image'][1]:<4} "
                f"{r['dtype']:>9} {r['decode_s']:>9.2f} {per_tok * 1000:>9.2f} "
                f"{fp32[r['grid']] / r['decode_s']:>7.2f}x "
                f"{psnr:>13} {r['peak_rss_gib']:>13.2f} {r['rss_over_load_gib']:>17.2f}")
        if cuda:
            line += f" {r['cuda_peak_gib']:>14.2f}"
        print(line)


def bench_int8(a):
    """int8 weight-only quality against bf16 and fp32: max |logit difference| at the SimpleAR-0.5B
    shape (random weights, a prefill), and greedy codes of the shipped model, 256 tokens per
    dtype."""
    torch.manual_seed(0)
    low = model_py.resolve_dtype("auto", "cpu")[0]
    margs = ModelArgs.from_name("simplear-0.5b")
    margs.n_layers = a.layers
    vocab = (margs.vocab_size - 64000, margs.vocab_size)
    tokens = torch.randint(0, vocab[0], (2, 64))
    logits = {}
    for name, dtype, quantize in (("float32", torch.float32, None), ("bf16", low, None),
                                  ("int8", low, "int8")):
        model = random_model(margs, dtype, "cpu").prepare_decoding(vocab, quantize)
        with torch.inference_mode():
            logits[name] = model(tokens, vocab=vocab)
        del model
    scale = logits["float32"].abs().max().item()
    print(f"simplear-0.5b shape cut to {a.layers} layers, random weights, logits of a 2 x 64-token "
          f"prefill over the 64,000 code rows (max |logit| {scale:.2f}); {machine()}")
    for x, y in (("bf16", "float32"), ("int8", "float32"), ("int8", "bf16")):
        d = (logits[x] - logits[y]).abs().max().item()
        agree = (logits[x].argmax(-1) == logits[y].argmax(-1)).float().mean().item()
        print(f"  {x} vs {y}: max |delta logit| {d:.4f} ({d / scale:.2%} of max |logit|), "
              f"argmax agreement {agree:.1%}")

    ckpt, vq = sample.DEFAULT_CKPT, sample.DEFAULT_VQ
    prompts = [p.strip() for p in open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "recipes", "nano_prompts.txt"))
               if p.strip()][:a.images]
    codes = {}
    for name, dtype, quantize in (("float32", torch.float32, None), ("bf16", low, None),
                                  ("int8", low, "int8")):
        model, tok, vqm, ck = sample.load(ckpt, vq, "cpu", dtype, quantize)
        s = sample.Sampling.from_checkpoint(ck, top_k=1)
        out = sample.text_to_image(model, tok, vqm, prompts, n=1, sampling=s, decode=False,
                                   progress=False, size=vqm.config.resolution)
        codes[name] = out.codes.flatten()
    n = codes["float32"].numel()
    print(f"shipped nano model, greedy (top-k 1) at its guidance, {len(prompts)} prompts x "
          f"{n // len(prompts)} tokens = {n} tokens:")
    for x, y in (("bf16", "float32"), ("int8", "bf16"), ("int8", "float32")):
        print(f"  {x} vs {y}: {(codes[x] == codes[y]).float().mean().item():.1%} "
              f"of the greedy codes agree")


def histogram_png(path, series, title):
    """A bar chart of committed-tokens-per-forward histograms, one colour per series {label:
    counts}, drawn with PIL (no plotting library at run time)."""
    from PIL import Image, ImageDraw

    colors = [(40, 90, 220), (220, 90, 40), (40, 170, 70), (150, 60, 180)]
    n = max(len(c) for c in series.values())
    W = 120 + 36 * n
    H = 320
    left = 50
    bottom = 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    shares = {k: [x / max(1, sum(c)) for x in c] for k, c in series.items()}
    top = max(max(s) for s in shares.values())
    d.text((left, 8), title, fill="black")
    d.line((left, H - bottom, W - 10, H - bottom), fill="black")
    bar = 30 // len(series)
    for i, (label, s) in enumerate(shares.items()):
        d.rectangle((W - 190, 24 + 14 * i, W - 180, 34 + 14 * i), fill=colors[i % 4])
        d.text((W - 175, 23 + 14 * i), label, fill="black")
        for c, share in enumerate(s):
            if c == 0:
                continue
            x = left + 36 * (c - 1) + i * bar
            h = (H - bottom - 60) * share / top
            d.rectangle((x, H - bottom - h, x + bar - 1, H - bottom), fill=colors[i % 4])
    for c in range(1, n):
        d.text((left + 36 * (c - 1) + 8, H - bottom + 6), str(c), fill="black")
    d.text((left, H - 18), "tokens committed per forward (share of forwards)", fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path)


def bench_jacobi(a):
    """Speculative Jacobi decoding on the shipped nano model against plain decoding: forwards per
    image and wall time, per window and option, at the model's own sampling settings and at
    SimpleAR's; then, at the SimpleAR-0.5B shape, the cost of a W-token window forward against a
    one-token step, and the speed-up it implies at the compressions measured."""
    import numpy as np

    import jacobi
    from jacobi import Jacobi, Stats

    model, tok, vq, ckpt = sample.load(sample.DEFAULT_CKPT, sample.DEFAULT_VQ, "cpu", a.dtype)
    root = os.path.dirname(os.path.abspath(__file__))
    prompts = [p.strip() for p in open(os.path.join(root, "recipes", "nano_prompts.txt"))
               if p.strip()]
    settings = {"nano defaults": sample.Sampling.from_checkpoint(ckpt),
                "SimpleAR's (cfg 6, its negative prompt, no top-k)":
                    sample.Sampling(repetition_penalty=1.0)}
    chain = dict(branches=())
    options = [("SJD: random init, no coupling", dict(init="random", coupling=False, **chain)),
               ("left init, no coupling", dict(init="left", coupling=False, **chain)),
               ("above init, no coupling", dict(init="above", coupling=False, **chain)),
               ("random init, coupling", dict(init="random", **chain)),
               ("above init, coupling", dict(init="above", **chain)),
               ("left init, coupling", chain),
               ("left, coupling, --branches 5", dict(branches=(5,), guess_left=False,
                                                      row_chain=False)),
               ("  + left guess", dict(branches=(5,), row_chain=False)),
               ("  + void rows chain", dict(branches=(5,), guess_left=False)),
               ("  + both (default from W 16)", dict(branches=(5,)))]
    side = vq.config.resolution // vq.spatial_compression
    tokens = side * side
    print(f"nano model, {len(prompts)} prompts x {a.n} images, {tokens} tokens each, "
          f"batch {a.batch}, {str(model.embed_tokens.weight.dtype).removeprefix('torch.')}; "
          f"wall time per image, median of {a.repeat}; {machine()}")

    def run(s, j):
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = sample.text_to_image(model, tok, vq, prompts, vq.config.resolution, a.n, 0, s,
                                       batch_size=a.batch, decode=False, progress=False, jacobi=j)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / (len(prompts) * a.n), float(np.mean(out.forwards))

    hist, compression = {}, {}
    for name, s in settings.items():
        plain_s, _ = run(s, None)
        print(f"\n{name}: plain decoding {tokens} forwards per image, "
              f"{1e3 * plain_s:.1f} ms per image")
        print(f"{'options':<34}" + "".join(f"{'W ' + str(w):>20}" for w in a.windows))
        for label, opts in options:
            cells = []
            for w in a.windows:
                j = Jacobi(w, **opts)
                per_image, forwards = run(s, j)
                # what Jacobi() runs at this window: its tree or its chain
                default = j.resolve(tokens) == Jacobi(w).resolve(tokens)
                mark = "*" if default else " "
                cells.append(f"{tokens / forwards:5.2f}x{mark}{plain_s / per_image:5.2f}x wall")
                if default:
                    compression.setdefault(name, {})[w] = tokens / forwards
            print(f"{label:<34}" + "".join(f"{c:>20}" for c in cells))
        stats = Stats()
        ids = data_py.encode_prompts(tok, prompts * a.n)
        neg = data_py.encode_negative(tok, s.negative_prompt)
        first = model.args.vocab_size - vq.codebook_size
        jacobi.generate(model, ids, neg, first, vq.codebook_size, tokens, list(range(len(ids))), s,
                        Jacobi(), width=side, stats=stats, progress=False)
        hist[name.split(" (")[0]] = stats.committed
    print("cells: fewer forwards than plain decoding (its forwards / ours), * the default, "
          "then its wall time / ours")
    histogram_png(a.out, hist, f"nano model, window {Jacobi.window}, default options")
    print(f"wrote {a.out}")

    margs = ModelArgs.from_name("simplear-0.5b")
    if a.layers:
        margs.n_layers = a.layers
    dtype = model_py.resolve_dtype(a.dtype, "cpu")[0]
    big = random_model(margs, dtype, "cpu").prepare_decoding((margs.vocab_size - 64000,
                                                              margs.vocab_size))
    cost = {}
    with torch.inference_mode():
        for w in [1, *a.windows]:
            big.setup_cache(2, 64 + max(a.windows))
            big.prefill([list(range(100, 130)), list(range(200, 235))])
            x = torch.randint(151672, margs.vocab_size, (2, w))
            pos = torch.arange(35, 35 + w).expand(2, w)
            big(x, input_pos=pos, vocab=(margs.vocab_size - 64000, margs.vocab_size),
                kv_len=35 + w)
            times = []
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                big(x, input_pos=pos, vocab=(margs.vocab_size - 64000, margs.vocab_size),
                    kv_len=35 + w)
                times.append(time.perf_counter() - t0)
            cost[w] = statistics.median(times)
    print(f"\nsimplear-0.5b shape ({margs.n_layers} layers), random weights, "
          f"{str(dtype).removeprefix('torch.')}, CFG pair: a window forward against a one-token "
          f"step ({1e3 * cost[1]:.1f} ms), and the wall-time speed-up the nano compressions above "
          "would give (compression / cost)")
    print(f"{'window':<8}{'ms':>8}{'x step':>8}"
          + "".join(f"{k.split(' (')[0] + ' speed-up':>24}" for k in compression))
    for w in a.windows:
        rel = cost[w] / cost[1]
        print(f"{w:<8}{1e3 * cost[w]:>8.1f}{rel:>8.2f}"
              + "".join(f"{c[w] / rel:>24.2f}" for c in compression.values()))


def bench_clip(a):
    """clip.py's image and text forwards (batch a.batch) against open_clip's on the same random
    weights and inputs, in float32 and the dtype --dtype auto picks: medians of a.repeat runs
    after one warm-up, and the largest |difference| of the embeddings. open_clip runs in the
    reference environment (.venv-ref, its own torch; tests/openclip_reference.py bench)."""
    import gc
    import tempfile

    from safetensors.torch import save_file

    import clip
    ref_python = os.environ.get("SIMPLEAR_REF_PYTHON", ".venv-ref/bin/python")
    if not os.path.isfile(ref_python):
        raise FileNotFoundError(
            f"no open_clip reference environment at {ref_python}: python3 -m venv .venv-ref && "
            ".venv-ref/bin/python -m pip install torch==2.14.1 torchvision==0.29.1 "
            "open-clip-torch (or set SIMPLEAR_REF_PYTHON)")
    cargs = clip.CLIPArgs.from_name(a.model)
    if a.layers:
        cargs.vision_layers = cargs.text_layers = a.layers
    auto = model_py.resolve_dtype("auto", "cpu")[0]
    dtypes = [torch.float32] + ([auto] if auto != torch.float32 else [])
    torch.manual_seed(0)
    with torch.device("meta"):
        model = clip.CLIP(cargs)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # random weights: small normals, norms near 1 (init doesn't matter)
        for n, p in model.named_parameters():
            p.normal_(1.0 if "norm" in n and n.endswith("weight") else 0.0, 0.02)
    s = cargs.image_size
    pixels = torch.randn(a.batch, 3, s, s)
    ids = torch.zeros(a.batch, cargs.context_length, dtype=torch.long)
    for i, end in enumerate(torch.linspace(6, cargs.context_length - 1, a.batch).long()):
        ids[i, 0], ids[i, end] = 49406, 49407  # start, random words, end, zero padding
        ids[i, 1:end] = torch.randint(1, 49406, (int(end) - 1,))
    ours = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(clip.export_state(model, "open_clip"), os.path.join(tmp, "weights.safetensors"))
        torch.save({"pixels": pixels, "ids": ids}, os.path.join(tmp, "inputs.pt"))
        cfg = {"embed_dim": cargs.embed_dim, "quick_gelu": cargs.act == "quick_gelu",
               "vision_cfg": {"image_size": s, "patch_size": cargs.patch_size,
                              "width": cargs.vision_width, "layers": cargs.vision_layers,
                              "head_width": cargs.vision_width // cargs.vision_heads,
                              "mlp_ratio": cargs.vision_mlp / cargs.vision_width},
               "text_cfg": {"context_length": cargs.context_length,
                            "vocab_size": cargs.vocab_size, "width": cargs.text_width,
                            "heads": cargs.text_heads, "layers": cargs.text_layers,
                            "mlp_ratio": cargs.text_mlp / cargs.text_width}}
        with open(os.path.join(tmp, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": cfg}, f)
        names = [str(d).removeprefix("torch.") for d in dtypes]
        with open(os.path.join(tmp, "bench.json"), "w") as f:
            json.dump({"dtypes": names, "repeat": a.repeat, "threads": torch.get_num_threads()},
                      f)
        for dtype, name in zip(dtypes, names):
            model = model.to(dtype)
            for part, fn, x in (("image", model.encode_image, pixels.to(dtype)),
                                ("text", model.encode_text, ids)):
                times = []
                with torch.inference_mode():
                    for _ in range(a.repeat + 1):  # the first run warms up
                        t0 = time.perf_counter()
                        y = fn(x)
                        times.append(time.perf_counter() - t0)
                ours[f"{part}_{name}_s"] = statistics.median(times[1:])
                ours[f"{part}_{name}"] = y.float()
        del model, fn
        gc.collect()  # the reference process holds its own copy of the weights
        proc = subprocess.run([ref_python, os.path.join(os.path.dirname(__file__), "tests",
                                                        "openclip_reference.py"), "bench", tmp],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"open_clip reference run failed: {tail}")
        ref = torch.load(os.path.join(tmp, "open_clip.pt"), weights_only=True)
    layers = f"{cargs.vision_layers}+{cargs.text_layers} layers"
    print(f"clip {a.model} ({layers}), random weights, batch {a.batch}, medians of {a.repeat}; "
          f"ours: {machine()}; open_clip {ref['open_clip']}: torch {ref['torch']}, "
          f"{ref['threads']} threads")
    print(f"{'forward':<8} {'dtype':>9} {'ours ms':>9} {'open_clip ms':>13} {'speed-up':>9} "
          f"{'max |Δ| emb':>12} {'max |emb|':>10}")
    for name in names:
        for part in ("image", "text"):
            t, r = ours[f"{part}_{name}_s"], ref[f"{part}_{name}_s"]
            delta = (ours[f"{part}_{name}"] - ref[f"{part}_{name}"]).abs().max().item()
            scale = ref[f"{part}_{name}"].abs().max().item()
            print(f"{part:<8} {name:>9} {1e3 * t:>9.1f} {1e3 * r:>13.1f} {r / t:>8.2f}x "
                  f"{delta:>12.2e} {scale:>10.3f}")


def main(argv=None):
    parser = Parser(prog="bench.py", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("decode",
                       help="the shipped decode loop per dtype (and int8, compiled) "
                       "vs transformers")
    p.add_argument("--model", default="simplear-0.5b", help="model.py preset")
    p.add_argument("--layers", type=int, default=0,
                   help="cut the model to this many layers (0: all)")
    p.add_argument("--tokens", type=int, default=33,
                   help="image tokens per run (the first comes from the prefill)")
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--codebook", type=int, default=64000)
    p.add_argument("--cfg", type=float, default=6.0)
    p.add_argument("--repeat", type=int, default=3, help="runs per row; the median is reported")
    p.add_argument("--int8", action="store_true", help="add a row with int8 weights")
    p.add_argument("--compile", action="store_true", help="add a row with the compiled step")
    p.add_argument("--no-transformers", dest="transformers", action="store_false",
                   help="skip the reference path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=bench_decode)

    p = sub.add_parser("sample", help="seconds per image (LM and decoder) at several sizes")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--model", default="simplear-0.5b", help="model.py preset")
    p.add_argument("--layers", type=int, default=0,
                   help="cut the model to this many layers (0: all)")
    p.add_argument("--preset", default="dv8x16x16",
                   help="cosmos_tokenizer.py preset of the decoder")
    p.add_argument("--prompt-len", type=int, default=30)
    p.add_argument("--steps", type=int, default=16,
                   help="decode steps timed at each end of the image")
    p.add_argument("--full", action="store_true", help="time every step instead")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantize", choices=["int8"], default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=bench_sample)

    p = sub.add_parser("gpu", help="decode, 1024² image and Cosmos tables in one run "
                       "(under 5 minutes on a GPU)")
    p.add_argument("--model", default="simplear-0.5b")
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--tokens", type=int, default=129, help="decode tokens per run")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--preset", default="dv8x16x16")
    p.add_argument("--full", action="store_true",
                   help="time every step of the image (default: both ends)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=bench_gpu)

    p = sub.add_parser("train", help="train.py tokens/s and MFU, 1 vs 2 processes")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences per step)")
    p.add_argument("--size", type=int, default=256,
                   help="image side: (size/16)^2 image tokens per sequence")
    p.add_argument("--codebook", type=int, default=64000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="train.py --dtype: auto is bf16 autocast where the hardware computes it")
    p.set_defaults(func=bench_train)

    p = sub.add_parser("cosmos", help="Cosmos decoder: time and peak memory per code grid")
    p.add_argument("--grids", type=int, nargs="+", default=[32, 64],
                   help="grid sides (64 -> a 1024x1024 image)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1,
                   help="decodes per grid; the fastest is reported")
    p.add_argument("--preset", default="dv8x16x16", help="architecture when no --ckpt is given")
    p.add_argument("--ckpt", default=None,
                   help="tokenizer directory (decoder.jit or ours) instead of random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the dtype timed next to float32 (auto: the one sample.py picks here)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--child-grid", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=bench_cosmos)

    p = sub.add_parser("jacobi", help="speculative Jacobi decoding: forwards and wall time "
                       "against plain decoding")
    p.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--n", type=int, default=4, help="images per prompt of recipes/nano_prompts.txt")
    p.add_argument("--batch", type=int, default=1, help="images per generate call")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--layers", type=int, default=0,
                   help="layers of the SimpleAR-0.5B shape (0: all 24)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--out", default="out/jacobi_hist.png", help="the accepted-length histogram")
    p.set_defaults(func=bench_jacobi)

    p = sub.add_parser("int8", help="int8 weight-only quality: logits at the 0.5B shape, "
                       "greedy codes of nano")
    p.add_argument("--layers", type=int, default=4, help="layers of the SimpleAR-0.5B shape")
    p.add_argument("--images", type=int, default=4,
                   help="prompts of recipes/nano_prompts.txt, 64 tokens each")
    p.set_defaults(func=bench_int8)

    p = sub.add_parser("grpo", help="one GRPO step at the SimpleAR-0.5B shape with a CLIP-H "
                       "reward: rollout / decode / reward / update seconds, peak memory")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--prompts", type=int, default=7, help="captions (SimpleAR: 7)")
    p.add_argument("--group", type=int, default=4, help="images per caption (SimpleAR: 4)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per backward pass")
    p.add_argument("--layers", type=int, default=0, help="layers of the 0.5B shape (0: all 24)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the rollouts' dtype")
    p.set_defaults(func=bench_grpo)

    p = sub.add_parser("clip", help="clip.py's image and text forwards vs open_clip's "
                       "(in .venv-ref), fp32 and the auto dtype")
    p.add_argument("--model", default="vit-h-14", help="clip.py preset")
    p.add_argument("--layers", type=int, default=0,
                   help="cut both towers to this many layers (0: all)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3, help="runs per row; the median is reported")
    p.set_defaults(func=bench_clip)

    args = parser.parse_args(argv)
    run_main("bench.py", args.func, args)


if __name__ == "__main__":
    main()

"""Benchmarks: the official GenEval and DPG-Bench prompt runs (images in the layouts their own
evaluators read), CLIP score over such a run, and GenEval-nano, scored here on the shapes world.

    python eval.py geneval --metadata evaluation_metadata.jsonl --ckpt DIR --vq DIR \\
        --outdir out/geneval-simplear       # OUT/00000/metadata.jsonl + samples/0000.png ...
    python eval.py dpg --prompts ELLA/dpg_bench/prompts --ckpt DIR --vq DIR \\
        --outdir out/dpg-simplear           # OUT/{prompt file stem}.png, a 2x2 grid each
    torchrun --nproc_per_node=8 eval.py geneval ...   # or --shard k/n in n processes: same OUT
    python eval.py clipscore out/geneval-simplear --clip DIR    # writes OUT/clipscore.json
    python eval.py clipscore out/dpg-simplear --prompts ELLA/dpg_bench/prompts --clip DIR
    python eval.py --ckpt checkpoints/nano --vq checkpoints/nano/vq --n 4 \\
        --out out/geneval                   # GenEval-nano: results.json + grid.png
    python eval.py nano --ground-truth --out out/geneval-gt
                                            # each prompt's rendered scene, no model: the ceiling
    python eval.py --reconstruct 600 --out out/geneval-vq
                                            # 600 held-out scenes through the tokenizer: its ceiling
    python eval.py --prompts-per-category 2 --categories counting position --n 1 \\
        --out out/quick                     # default model
    python eval.py --prompt-set validation --out out/val    # the prompts settings are chosen on
    python -m pytest -q tests/test_eval.py

The first word picks the command: geneval, dpg, clipscore or nano; anything else (a flag, or
nothing) is GenEval-nano, so `nano` may be left out.

GenEval-nano is GenEval (Ghosh et al. 2023) on the shapes world: shapes.py holds its prompt set
(10 canonical captions per GenEval category), the detector and GenEval's scoring rule; this file
runs a model on it and writes results.json (shapes.evaluate's report plus the settings) and
grid.png. --ground-truth scores each prompt's own rendered scene (the detector's ceiling, 1.000),
--reconstruct N held-out dataset scenes after a round trip through the visual tokenizer (the
tokenizer's ceiling).

The official benchmarks are scored by their own evaluators, which need GPUs and their own models;
what they need from us is the images, in their layouts:

* geneval: prompt i (the i-th non-blank line of GenEval's prompts/evaluation_metadata.jsonl) gets
  OUT/{i:05d}/metadata.jsonl, its line unchanged, and OUT/{i:05d}/samples/{j:04d}.png for j < --n
  (4), with --grid also OUT/{i:05d}/grid.png: the layout djghosh13/geneval's README.md documents,
  which its evaluation/evaluate_images.py reads (folders whose name is digits, json.load of
  metadata.jsonl, files matching \\d+\\.png, so the 5 digits its own
  generation/diffusers_generate.py and SimpleAR's simpar/eval/model_t2i.py write read the same).
* dpg: each prompts/NAME.txt of ELLA's dpg_bench gets OUT/NAME.png, its 4 images in a 2x2 grid
  (row-major, no padding): TencentQQGYLab/ELLA dpg_bench/compute_dpg_bench.py looks the file up by
  the name before its first dot and crops (0, 0, r, r), (r, 0, 2r, r), (0, r, r, 2r), (r, r, 2r, 2r)
  with r its --resolution, our --size. It reads every file in OUT: the evaluator reports our
  eval_settings.json (and clipscore.json) as "Failed filename" and goes on, as with its own results.

Settings are SimpleAR's evaluation settings (scripts/eval/bench_geneval.sh, bench_dpg.sh): 1024²,
4 images per prompt, and sample.Sampling's defaults (cfg 6 against SimpleAR's negative prompt,
temperature 1, top-k 64,000 = no filter, top-p 1) with the checkpoint's generation_config.json on
top (repetition penalty 1.1 in SimpleAR's); every flag of sample.add_sampling_args overrides one.
Image j of every prompt uses seed --seed + j, as sample.text_to_image draws them (and as GenEval's
generator reseeds every prompt alike): an image is the same whatever batch or shard it ran in.

Resuming: a prompt is finished when all its files exist. Every file is written under a temporary
name and renamed (cli.write_atomic), and a geneval folder's metadata.jsonl last, so a killed run
leaves no half-written file under a final name (a temporary one is removed when its prompt is
redone); a rerun skips finished prompts and redoes the rest. OUT/eval_settings.json
records what the images were made with (checkpoint, sampling, size, n, seed, dtype, Jacobi, the
prompts' hash); a run whose settings differ stops and names the difference, unless --overwrite,
which redoes every prompt of this shard (e.g. after the weights changed under the same path; each
shard deletes only its own prompts' files). --shard k/n takes prompts k, k + n, k + 2n, ...
(under torchrun, RANK and WORLD_SIZE stand for k and n when --shard is not given); shards share
OUT.
"""
import dataclasses
import json
import math
import os
import re
import sys
import textwrap
import time
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import jacobi
import sample
import shapes
from cli import Parser, run_main, write_atomic
from cosmos_tokenizer import CosmosTokenizer, pil_to_tensor, tensor_to_uint8
from data import encode_negative, encode_prompts, first_image_id

# ----------------------------------------------------------- GenEval-nano: generation and reports
def reconstructions(vq_dir, n, size=None, seed=1, batch_size=64, device="cpu"):
    """(prompts, images) for the tokenizer's ceiling: n dataset scenes (shapes.ShapesDataset seed 1:
    train_vq.py's held-out set, never trained on), each encoded and decoded by the visual
    tokenizer. An LM that picked every code right would score this; whatever the tokenizer loses (a
    rounded corner, two objects run together) no LM can win back."""
    vq = CosmosTokenizer.from_pretrained(vq_dir, device=device).eval()
    size = size or vq.config.resolution
    ds = shapes.ShapesDataset(n, size, seed)
    items = [ds[i] for i in range(n)]
    x = torch.stack([pil_to_tensor(it["image"], size) for it in items])
    with torch.no_grad():
        rec = torch.cat([vq.decode(vq.encode(x[i:i + batch_size].to(device))).cpu()
                         for i in range(0, n, batch_size)])
    prompts = [dict(category=it["category"], caption=it["caption"], spec=it["spec"])
               for it in items]
    return prompts, [[img] for img in tensor_to_uint8(rec)]


def run_geneval(ckpt, vq, out_dir, n=4, size=None, seed=0, prompts=None, batch_size=64,
                device="cpu", progress=True, dtype="auto", quantize=None, compile=False,
                jacobi=None, split=None, **sampling) -> dict:
    """Generate n images per prompt with sample.py, score them, write results.json and grid.png
    to out_dir. prompts None: shapes.prompt_set(split=split or "benchmark"); split names the set
    in the results (None: the prompts given). size None: the visual tokenizer's own resolution.
    sampling: Sampling's fields; unset (None) ones take the checkpoint's generation_config.json,
    then Sampling's defaults. jacobi: a jacobi.Jacobi to decode with (same distribution, fewer
    forwards)."""
    if prompts is None:
        split = split or "benchmark"
        prompts = shapes.prompt_set(split=split)
    ckpt_dir = sample.resolve_dir(ckpt, "checkpoint", sample.CKPT_FILES)
    settings = sample.Sampling.from_checkpoint(ckpt_dir, **sampling)  # before the weights load
    model, tokenizer, vq_model, ckpt_dir = sample.load(ckpt_dir, vq, device, dtype, quantize)
    size = size or vq_model.config.resolution
    t0 = time.perf_counter()
    # a prompt's wording (shapes.prompt_set "wide") may differ from the caption it is scored on
    asked = [p.get("prompt", p["caption"]) for p in prompts]
    samples = sample.text_to_image(model, tokenizer, vq_model, asked,
                                   size, n, seed, settings, batch_size=batch_size,
                                   compile=compile, progress=progress, jacobi=jacobi)
    result = shapes.evaluate(prompts, samples.images)
    ran = jacobi.resolve(samples.codes[0, 0].numel()) if jacobi else None  # the window's tree
    result["settings"] = dict(ckpt=ckpt, vq=vq, n=n, size=size, seed=seed,
                              **dataclasses.asdict(settings),
                              dtype=str(model.embed_tokens.weight.dtype).removeprefix("torch."),
                              quantize=quantize,
                              jacobi=dataclasses.asdict(ran) if jacobi else None,
                              forwards_per_image=round(float(np.mean(samples.forwards)), 2),
                              prompt_set=split,
                              seconds=round(time.perf_counter() - t0, 1))
    save_results(result, samples.images, out_dir)
    return result


def grid(result, images, label_width=200, border=3) -> Image.Image:
    """A row per prompt: category, caption and accuracy, then its images framed green (correct) or
    red."""
    H, W = np.asarray(images[0][0]).shape[:2]
    n, row_h = max(map(len, images)), max(H + 2 * border, 64)  # 64: room for four lines of label
    canvas = Image.new("RGB", (label_width + n * (W + 2 * border), len(images) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, imgs) in enumerate(zip(result["prompts"], images)):
        y = r * row_h
        label = [row["category"], *textwrap.wrap(row["caption"], 30),
                 f"accuracy {row['accuracy']:.2f}"]
        draw.multiline_text((4, y + 4), "\n".join(label), fill="black")
        for j, (img, verdict) in enumerate(zip(imgs, row["images"])):
            x = label_width + j * (W + 2 * border)
            draw.rectangle((x, y, x + W + 2 * border - 1, y + H + 2 * border - 1),
                           fill=(40, 170, 70) if verdict["correct"] else (220, 40, 40))
            canvas.paste(Image.fromarray(np.asarray(img, dtype=np.uint8)),
                         (x + border, y + border))
    return canvas


def save_results(result, images, out_dir):
    """results.json and grid.png, each written to a temporary name and renamed
    (cli.write_atomic)."""
    os.makedirs(out_dir, exist_ok=True)
    text = json.dumps(result, indent=1)
    write_atomic(os.path.join(out_dir, "results.json"), lambda tmp: Path(tmp).write_text(text))
    write_atomic(os.path.join(out_dir, "grid.png"), grid(result, images).save)


def table(result) -> str:
    """The per-category accuracies and the overall score as a markdown table."""
    lines = ["| category | accuracy | images |", "|---|---:|---:|"]
    lines += [f"| {c} | {r['accuracy']:.3f} | {r['images']} |"
              for c, r in result["categories"].items()]
    total = sum(r["images"] for r in result["categories"].values())
    return "\n".join(lines + [f"| **overall** | **{result['overall']:.3f}** | {total} |"])


# ------------------------------------------------------------------ the official benchmarks' runs
# SimpleAR's scripts/eval/bench_geneval.sh and bench_dpg.sh: --image-size 1024
# --num-images-per-prompt 4; GenEval's diffusers_generate.py: --n_samples 4
EVAL_SIZE = 1024
EVAL_N = 4
DPG_N = 4  # ELLA's compute_dpg_bench.py crops at most 4 images, a 2x2 grid
SETTINGS_FILE = "eval_settings.json"
CLIPSCORE_FILE = "clipscore.json"
CLIP_METRIC = "100 * max(cos, 0) per image, the mean over images (see clip_score)"


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One benchmark prompt. index: its place in the whole list (shards split by it); name: its
    output's name (geneval: the folder, f"{index:05d}"; dpg: the .txt file's stem); line: geneval's
    metadata line as read, without its line end."""
    index: int
    text: str
    name: str
    line: str = ""


def read_geneval_metadata(path) -> list:
    """Prompts of a GenEval metadata file (JSON lines, each an object with a "prompt" string, as
    GenEval's prompts/evaluation_metadata.jsonl). Blank lines are skipped; a byte-order mark is
    read as none. ValueError naming the line number of a line that is not a JSON object or whose
    prompt is missing or empty; FileNotFoundError for a missing file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metadata file not found: {path}")
    prompts = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                meta = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(meta, dict):
                raise ValueError(f"{path} line {number}: not a JSON object")
            text = meta.get("prompt")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path} line {number}: empty or missing \"prompt\"")
            i = len(prompts)
            prompts.append(Prompt(i, text.strip(), f"{i:05d}", line))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def read_dpg_prompts(folder) -> list:
    """Prompts of a DPG-Bench prompt folder (ELLA's dpg_bench/prompts: one NAME.txt per prompt),
    sorted by file name. ValueError for a folder without .txt files or an empty prompt (named);
    FileNotFoundError for a missing folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"prompt directory not found: {folder}")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".txt"))
    if not files:
        raise ValueError(f"prompt directory {folder} holds no .txt files")
    prompts = []
    for i, name in enumerate(files):
        with open(os.path.join(folder, name), encoding="utf-8-sig") as f:
            text = f.read().strip()
        if not text:
            raise ValueError(f"{os.path.join(folder, name)}: empty prompt")
        # the evaluator's key is the name before the first dot
        prompts.append(Prompt(i, text, name[:-len(".txt")].split(".")[0]))
    stems = [p.name for p in prompts]
    if len(set(stems)) < len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise ValueError(f"two prompt files in {folder} share the name {dup!r} before their "
                         "first dot, which the evaluator reads as one")
    return prompts


def parse_shard(spec, env=None) -> tuple:
    """(k, n) from "k/n" with 0 <= k < n; None: torchrun's RANK / WORLD_SIZE, else (0, 1).
    ValueError for anything else."""
    env = os.environ if env is None else env
    if spec is None:
        spec = f"{env['RANK']}/{env.get('WORLD_SIZE', 1)}" if "RANK" in env else "0/1"
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m or not int(m[1]) < int(m[2]):
        raise ValueError(f"--shard {spec}: expected k/n with 0 <= k < n, e.g. 0/4")
    return int(m[1]), int(m[2])


def shard(prompts, k, n) -> list:
    """Prompts k, k + n, k + 2n, ...: interleaved (as SimpleAR's --chunk-idx), so each shard gets
    every category of an ordered list."""
    return prompts[k::n]


def output_files(benchmark, out, prompt, n, grid=False) -> list:
    """The paths a prompt's images and metadata go to, in the order they are written: the last is
    written last, so it exists only once the rest do."""
    if benchmark == "dpg":
        return [os.path.join(out, f"{prompt.name}.png")]
    folder = os.path.join(out, prompt.name)
    return ([os.path.join(folder, "samples", f"{j:04d}.png") for j in range(n)]
            + ([os.path.join(folder, "grid.png")] if grid else [])
            + [os.path.join(folder, "metadata.jsonl")])


def remove_temporaries(benchmark, out, prompt):
    """Delete what a killed run left under cli.write_atomic's temporary names for this unfinished
    prompt: DPG's evaluator would read OUT/NAME.tmpPID.png as prompt NAME. Only this prompt's own
    names, which no other shard writes."""
    if benchmark == "dpg":
        folders, pattern = [out], re.escape(prompt.name) + r"\.tmp\d+\.png"
    else:
        folder = os.path.join(out, prompt.name)
        folders, pattern = [folder, os.path.join(folder, "samples")], r".+\.tmp\d+\.(png|jsonl)"
    for folder in folders:
        if os.path.isdir(folder):
            for f in os.listdir(folder):
                if re.fullmatch(pattern, f):
                    os.remove(os.path.join(folder, f))


def tile(images, cols) -> Image.Image:
    """uint8 [n, H, W, 3] as one image, cols per row, row-major, no padding (what ELLA's
    compute_dpg_bench.py crops); missing cells stay black."""
    n, H, W, _ = images.shape
    rows = -(-n // cols)
    canvas = np.zeros((rows * H, cols * W, 3), np.uint8)
    for j, img in enumerate(images):
        canvas[j // cols * H:(j // cols + 1) * H, j % cols * W:(j % cols + 1) * W] = img
    return Image.fromarray(canvas)


def write_prompt(benchmark, out, prompt, images, grid=False):
    """Write one prompt's files, each atomically, in output_files' order. images: uint8
    [n, H, W, 3]."""
    paths = output_files(benchmark, out, prompt, len(images), grid)
    if benchmark == "dpg":
        write_atomic(paths[0], tile(images, 2).save)
        return
    samples_dir = os.path.dirname(paths[0])
    os.makedirs(samples_dir, exist_ok=True)
    if os.path.exists(paths[-1]):  # redone: unfinished until the new images are all in
        os.remove(paths[-1])
    keep = {os.path.basename(p) for p in paths[:len(images)]}
    for f in os.listdir(samples_dir):  # an earlier run's extra images would be scored too
        if re.fullmatch(r"\d+\.png", f) and f not in keep:
            os.remove(os.path.join(samples_dir, f))
    for path, img in zip(paths, images):
        write_atomic(path, Image.fromarray(img).save)
    if grid:
        write_atomic(paths[-2], tile(images, 2).save)
    # the line as the metadata file holds it; json.load (GenEval's reader) takes the newline
    write_atomic(paths[-1], lambda tmp: Path(tmp).write_bytes((prompt.line + "\n").encode()))


def run_settings(args, sampling, prompts, dtype, speculative) -> dict:
    """What decides the images of a run (not the shard, batch size or device), for
    eval_settings.json: a rerun into the same OUT must match it."""
    def local(d):  # a folder by its absolute path: a rerun from elsewhere is the same run
        return os.path.abspath(d) if os.path.isdir(d) else d  # a hub id as it is

    digest = sha256("\n".join(p.name + "\t" + p.text for p in prompts).encode()).hexdigest()
    return dict(benchmark=args.command, ckpt=local(args.ckpt), vq=local(args.vq), size=args.size,
                n=args.n, seed=args.seed, prompts=len(prompts), prompts_sha256=digest,
                **dataclasses.asdict(sampling), dtype=str(dtype).removeprefix("torch."),
                quantize=args.quantize,
                jacobi=dataclasses.asdict(speculative) if speculative else None)


def check_settings(out, settings, overwrite=False) -> bool:
    """Compare settings with OUT/eval_settings.json. True when the file is absent or differs and
    overwrite is set (every prompt is to be redone), False when it matches; ValueError naming the
    differences otherwise."""
    path = os.path.join(out, SETTINGS_FILE)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8-sig") as f:
            old = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if overwrite:
            return True
        raise ValueError(f"{path} is not valid JSON ({e}); pass --overwrite to replace the run")
    diff = [f"{k} {settings.get(k)!r} here, {old.get(k)!r} there" for k in sorted({*settings, *old})
            if settings.get(k) != old.get(k)]
    if diff and not overwrite:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(diff)}): pass "
                         "--overwrite to redo it, or another --outdir")
    return bool(diff)


def run_benchmark(args) -> dict:
    """geneval / dpg: generate every unfinished prompt of this shard into args.outdir. Bad input
    (ValueError / FileNotFoundError) is found before any image is generated. Returns counts."""
    if args.command == "dpg":
        prompts, n = read_dpg_prompts(args.prompts), DPG_N
    else:
        prompts, n = read_geneval_metadata(args.metadata), args.n
    args.n = n
    k, shards = parse_shard(args.shard)
    sample.check_request([p.text for p in prompts], args.size, n, args.batch_size, args.seed,
                         compression=1)  # the size's multiple: once the tokenizer is loaded
    flags = sample.sampling_flags(args)
    speculative = jacobi.from_args(args)
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    args.device = device
    dtype = sample.runtime_dtype(args, "eval.py")
    ckpt_dir = sample.resolve_dir(args.ckpt, "checkpoint", sample.CKPT_FILES)
    sample.prepare_out(args.outdir)
    sampling = sample.Sampling.from_checkpoint(ckpt_dir, **flags)
    settings = run_settings(args, sampling, prompts, dtype, speculative)
    redo = check_settings(args.outdir, settings, args.overwrite) or args.overwrite
    mine = shard(prompts, k, shards)
    todo = [p for p in mine if redo or not all(
        map(os.path.isfile, output_files(args.command, args.outdir, p, n, args.grid)))]
    print(f"{args.command}: {len(prompts)} prompts, shard {k}/{shards}: {len(mine)}, "
          f"{len(mine) - len(todo)} already finished")
    if not todo:
        return dict(prompts=len(mine), generated=0)
    model, tokenizer, vq, _ = sample.load(ckpt_dir, args.vq, device, dtype, args.quantize)
    # the size's multiple and the positions of the longest prompt, before anything is written
    sample.check_request(["x"], args.size, n, args.batch_size, args.seed,
                         vq.spatial_compression)
    first_id = first_image_id(model.args.vocab_size, vq.codebook_size, tokenizer.get_vocab_size())
    longest = encode_prompts(tokenizer, [max((p.text for p in todo), key=len)])
    side = args.size // vq.spatial_compression
    sample.check_generation(model, longest, encode_negative(tokenizer, sampling.negative_prompt),
                            first_id, vq.codebook_size, side * side, range(1), sampling)
    if redo:  # every prompt's last file goes first: none of the old run counts as finished
        for p in mine:
            last = output_files(args.command, args.outdir, p, n, args.grid)[-1]
            if os.path.exists(last):
                os.remove(last)
    if not os.path.isfile(os.path.join(args.outdir, SETTINGS_FILE)) or redo:
        text = json.dumps(settings, indent=1)
        write_atomic(os.path.join(args.outdir, SETTINGS_FILE),
                     lambda tmp: Path(tmp).write_text(text))
    # Whole prompts per text_to_image call, as many as fill whole batches of --batch-size images:
    # a prompt's files are written as soon as its images exist.
    per_call = math.lcm(args.batch_size, n) // n
    bar = tqdm(total=len(todo) * n, unit="img", desc=args.command, dynamic_ncols=True)
    for b in range(0, len(todo), per_call):
        group = todo[b:b + per_call]
        samples = sample.text_to_image(model, tokenizer, vq, [p.text for p in group], args.size,
                                       n, args.seed, sampling, batch_size=args.batch_size,
                                       compile=args.compile, progress=False, jacobi=speculative)
        for p, images in zip(group, samples.images):
            remove_temporaries(args.command, args.outdir, p)
            write_prompt(args.command, args.outdir, p, images, args.grid)
        bar.update(len(group) * n)
    bar.close()
    return dict(prompts=len(mine), generated=len(todo))


# -------------------------------------------------------------------------------------- CLIP score
def run_images(out, prompts_dir=None) -> list:
    """(name, prompt, [PIL images]) per prompt of a geneval or dpg run in out, sorted by name:
    geneval folders take the prompt from metadata.jsonl's "prompt" and every samples/\\d+.png;
    a dpg grid is split into its 2x2 images (ELLA's crops) and takes the prompt from
    prompts_dir/NAME.txt. ValueError for a folder that is neither, or a dpg run without
    prompts_dir."""
    if not os.path.isdir(out):
        raise FileNotFoundError(f"run directory not found: {out}")
    names = sorted(os.listdir(out))
    folders = [d for d in names if d.isdigit() and os.path.isdir(os.path.join(out, d))]
    grids = [f for f in names if f.endswith(".png") and ".tmp" not in f]
    rows = []
    if folders:
        for d in folders:
            meta_path = os.path.join(out, d, "metadata.jsonl")
            if not os.path.isfile(meta_path):
                continue  # unfinished: written last
            with open(meta_path, encoding="utf-8-sig") as f:
                text = json.load(f).get("prompt")
            if not isinstance(text, str):
                raise ValueError(f"{meta_path}: no \"prompt\" string")
            sdir = os.path.join(out, d, "samples")
            files = sorted(f for f in os.listdir(sdir) if re.fullmatch(r"\d+\.png", f))
            rows.append((d, text, [open_image(os.path.join(sdir, f)) for f in files]))
    elif grids:
        if prompts_dir is None:
            raise ValueError(f"{out} is a DPG-Bench run: pass --prompts, the folder of its .txt "
                             "files")
        texts = {p.name: p.text for p in read_dpg_prompts(prompts_dir)}
        for f in grids:
            stem = f.split(".")[0]
            if stem not in texts:
                raise ValueError(f"{os.path.join(out, f)} has no prompt {stem}.txt in "
                                 f"{prompts_dir}")
            grid = open_image(os.path.join(out, f))
            r = grid.width // 2
            cells = [(0, 0), (r, 0), (0, r), (r, r)]
            rows.append((stem, texts[stem], [grid.crop((x, y, x + r, y + r)) for x, y in cells]))
    if not rows:
        raise ValueError(f"{out} holds no finished geneval folders ({{i:05d}}/metadata.jsonl) or "
                         "dpg grids (NAME.png)")
    return rows


def open_image(path) -> Image.Image:
    """An RGB image, or ValueError naming a file that is not one."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:  # PIL's UnidentifiedImageError, a truncated file
        raise ValueError(f"{path} is not a readable image ({e})") from None


def clip_score(model, rows, batch_size=32, device="cpu") -> dict:
    """CLIP score of each image against its prompt: 100 * max(cos(image, text embedding), 0),
    clamped per image as CLIP-S is (Hessel et al. 2021, arXiv 2104.08718, with w = 2.5 where we
    use 100) and scaled as torchmetrics' CLIPScore is (Lightning-AI/torchmetrics,
    src/torchmetrics/functional/multimodal/clip_score.py: 100 * cos per pair; it clamps only the
    mean at 0, the same number while no cosine is negative). model: clip.load's; rows:
    run_images' (name, prompt, [PIL images]). Returns mean (over images, float), images (count),
    and per_prompt {name: dict(prompt, score: the mean over its images)}."""
    import clip
    pairs = [(name, text, img) for name, text, imgs in rows for img in imgs]
    scores = []
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b:b + batch_size]
        with torch.no_grad():
            pixels = clip.preprocess([img for _, _, img in chunk], mode="reference",
                                     size=model.args.image_size).to(device)
            ids = model.tokenizer([text for _, text, _ in chunk]).to(device)
            cos = clip.similarity(model, pixels, ids).float().cpu()
        scores += (100 * cos.clamp(min=0)).tolist()
    per_prompt = {}
    for (name, text, _), s in zip(pairs, scores):
        per_prompt.setdefault(name, dict(prompt=text, scores=[]))["scores"].append(s)
    per_prompt = {k: dict(prompt=v["prompt"], score=float(np.mean(v["scores"])))
                  for k, v in per_prompt.items()}
    return dict(mean=float(np.mean(scores)), images=len(scores), per_prompt=per_prompt)


def run_clipscore(args) -> dict:
    """clipscore: CLIP score of a geneval or dpg run, written as JSON (atomically)."""
    import clip
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    rows = run_images(args.run, args.prompts)
    device = str(sample.check_device(args.device))
    path = args.clip if os.path.exists(args.clip) else sample.resolve_dir(
        args.clip, "--clip", clip.HUB_FILES)  # a hub id, as sample.py fetches one
    model = clip.load(path, device=device, dtype=torch.float32)
    result = dict(clip=args.clip, metric=CLIP_METRIC,
                  **clip_score(model, rows, args.batch_size, device))
    out = args.out or os.path.join(args.run, CLIPSCORE_FILE)
    text = json.dumps(result, indent=1)
    write_atomic(out, lambda tmp: Path(tmp).write_text(text))
    print(f"CLIP score {result['mean']:.2f} ({CLIP_METRIC}) over {result['images']} images of "
          f"{len(rows)} prompts; wrote {out}")
    return result


# -------------------------------------------------------------------------------------------- CLI
COMMANDS = ("geneval", "dpg", "clipscore", "nano")


def main(argv=None):
    """Dispatch on the first word (COMMANDS); anything else is GenEval-nano's flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "nano"
    if argv and argv[0] == command:
        argv = argv[1:]
    if command in ("geneval", "dpg"):
        args = benchmark_parser(command).parse_args(argv)
        args.command = command
        done = run_main(f"eval.py {command}", run_benchmark, args)
        print(f"{done['generated']} of this shard's {done['prompts']} prompts generated into "
              f"{args.outdir}")
    elif command == "clipscore":
        run_main("eval.py clipscore", run_clipscore, clipscore_parser().parse_args(argv))
    else:
        main_nano(argv)


def benchmark_parser(command) -> Parser:
    """The flags of `eval.py geneval` and `eval.py dpg`."""
    what = dict(geneval="GenEval's images", dpg="DPG-Bench's 2x2 grids")[command]
    p = Parser(prog=f"eval.py {command}", description=f"{what}, in the layout of its evaluator")
    if command == "geneval":
        p.add_argument("--metadata", required=True,
                       help="GenEval's prompts/evaluation_metadata.jsonl (JSON lines)")
    else:
        p.add_argument("--prompts", required=True,
                       help="DPG-Bench's prompt folder (ELLA's dpg_bench/prompts, NAME.txt each)")
    p.add_argument("--ckpt", required=True, help="LM checkpoint directory or hub id")
    p.add_argument("--vq", required=True, help="visual tokenizer directory or hub id")
    p.add_argument("--outdir", required=True, help="where the images go (shared by shards)")
    if command == "geneval":
        p.add_argument("--n", type=int, default=EVAL_N, help=f"images per prompt ({EVAL_N})")
        p.add_argument("--grid", action="store_true", help="also write each prompt's grid.png")
    p.add_argument("--size", type=int, default=EVAL_SIZE,
                   help=f"image side in pixels ({EVAL_SIZE}, SimpleAR's evaluation size)")
    p.add_argument("--seed", type=int, default=0, help="image j of every prompt uses seed + j")
    p.add_argument("--batch-size", type=int, default=16, help="images per generate() call")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="prompts K, K+N, ... (default: torchrun's RANK/WORLD_SIZE, else all)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo this shard's prompts in --outdir, finished or not, whatever its "
                   "eval_settings.json says")
    sample.add_sampling_args(p)
    sample.add_runtime_args(p)
    jacobi.add_args(p)
    if command == "dpg":
        p.set_defaults(grid=False)
    return p


def clipscore_parser() -> Parser:
    p = Parser(prog="eval.py clipscore",
               description="CLIP score (100 * max(cos, 0)) of a geneval or dpg run")
    p.add_argument("run", help="--outdir of `eval.py geneval` or `eval.py dpg`")
    p.add_argument("--clip", required=True,
                   help="CLIP weights: a Hugging Face CLIPModel folder or an open_clip checkpoint")
    p.add_argument("--prompts", default=None, help="a dpg run's prompt folder (NAME.txt)")
    p.add_argument("--out", default=None, help=f"JSON to write (default: RUN/{CLIPSCORE_FILE})")
    p.add_argument("--batch-size", type=int, default=32, help="images per CLIP forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main_nano(argv=None):
    """GenEval-nano's command line (`eval.py [nano] ...`)."""
    p = Parser(prog="eval.py",
               description="GenEval-nano: per-category accuracy of a model on the shapes world.",
               epilog="The real benchmarks are subcommands: eval.py geneval --help, eval.py dpg "
               "--help, eval.py clipscore --help.")
    p.add_argument("--ckpt", default=sample.DEFAULT_CKPT,
                   help="LM checkpoint directory (default: sample.py's)")
    p.add_argument("--vq", default=sample.DEFAULT_VQ,
                   help="visual tokenizer directory (default: sample.py's)")
    p.add_argument("--out", default="out/geneval", help="directory for results.json and grid.png")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the "
                   "tokenizer's resolution; 256 for --ground-truth)")
    p.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed + j")
    p.add_argument("--prompt-set", choices=list(shapes.SPLITS), default="benchmark",
                   help="benchmark: GenEval-nano's prompts; validation: others to choose settings "
                   "on; wide: the grammar at large, in every training wording (see "
                   "shapes.prompt_set)")
    p.add_argument("--prompts-per-category", type=int, default=0,
                   help="0: the set's own size (shapes.SIZES: 10 for the benchmark, 20 for the "
                   "others)")
    p.add_argument("--categories", nargs="+", default=list(shapes.CATEGORIES),
                   choices=shapes.CATEGORIES)
    sample.add_sampling_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per generate() call")
    sample.add_runtime_args(p)
    jacobi.add_args(p)
    p.add_argument("--ground-truth", action="store_true",
                   help="score each prompt's rendered scene, one per prompt (no model)")
    p.add_argument("--reconstruct", type=int, default=0, metavar="N",
                   help="score N held-out dataset scenes after a round trip through --vq (no LM): "
                   "the tokenizer's ceiling")
    args = p.parse_args(argv)
    result = run_main("eval.py", run, args)
    print(table(result))
    print(f"wrote {os.path.join(args.out, 'results.json')} and "
          f"{os.path.join(args.out, 'grid.png')}")


def run(args) -> dict:
    """The CLI's work: ValueError / FileNotFoundError for bad input, before any."""
    if args.reconstruct < 0 or (args.reconstruct and args.ground_truth):
        raise ValueError(f"--reconstruct {args.reconstruct}: a positive number of scenes, "
                         "without --ground-truth")
    if args.prompts_per_category < 0 or min(args.n, args.batch_size,
                                            1 if args.size is None else args.size) < 1:
        raise ValueError(f"--prompts-per-category ({args.prompts_per_category}) must be >= 0, "
                         f"--n ({args.n}), --batch-size ({args.batch_size}) and --size "
                         f"({args.size}) >= 1")
    if not 0 <= args.seed <= 2 ** 63 - args.n:
        raise ValueError(f"seed must be in [0, 2^63 - n], got {args.seed}")
    if args.reconstruct:  # held-out dataset scenes: no prompt set
        prompts, images = reconstructions(args.vq, args.reconstruct, args.size,
                                          batch_size=args.batch_size, device=args.device)
        result = dict(shapes.evaluate(prompts, images),
                      settings=dict(reconstruct=args.reconstruct, vq=args.vq,
                                    size=images[0][0].shape[0]))
        save_results(result, images, args.out)
        return result
    prompts = shapes.prompt_set(args.prompts_per_category or None, args.categories,
                                args.prompt_set)
    if not prompts:  # the single-object categories have no captions left for "wide"
        raise ValueError(f"--prompt-set {args.prompt_set} has no prompts in --categories "
                         f"{' '.join(args.categories)}")
    if args.ground_truth:
        images = shapes.ground_truth(prompts, args.size or 256)
        result = dict(shapes.evaluate(prompts, images),
                      settings=dict(ground_truth=True, size=args.size or 256,
                                    prompt_set=args.prompt_set))
        save_results(result, images, args.out)
    else:
        flags = sample.sampling_flags(args)
        speculative = jacobi.from_args(args)
        dtype = sample.runtime_dtype(args, "eval.py")
        sample.prepare_out(args.out)
        result = run_geneval(args.ckpt, args.vq, args.out, args.n, args.size, args.seed, prompts,
                             args.batch_size, args.device, dtype=dtype, quantize=args.quantize,
                             compile=args.compile, jacobi=speculative, split=args.prompt_set,
                             **flags)
    return result


if __name__ == "__main__":
    main()

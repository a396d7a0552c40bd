"""GenEval-nano: does the model draw what the prompt says? Scored by an analytic detector on the
shapes world.

    python eval.py --ckpt checkpoints/nano --vq checkpoints/nano/vq --n 4 \\
        --out out/geneval                   # results.json + grid.png
    python eval.py --ground-truth --out out/geneval-gt
                                            # each prompt's rendered scene, no model: the ceiling
    python eval.py --reconstruct 600 --out out/geneval-vq
                                            # 600 held-out scenes through the tokenizer: its ceiling
    python eval.py --prompts-per-category 2 --categories counting position --n 1 \\
        --out out/quick                     # default model
    python -m pytest -q tests/test_eval.py

GenEval (Ghosh et al. 2023) asks for objects, counts, colours and positions and checks them with a
detector. Our world is data.py's synthetic shapes (flat palette colours on a near-white background),
so the detector is a few lines of numpy: nearest palette colour per pixel, connected components per
colour, shape by how top-heavy a component is and how much of its bounding box it fills, area
centroids for positions. The rules follow GenEval's evaluate_images.py:

* every object the caption names must be found with its colour; extra objects are ignored (GenEval
  ignores unrequested classes), except in counting: "three blue squares" needs exactly three blue
  squares;
* position: the largest match of each object (GenEval takes its most confident one) must stand in
  the relation: the centroid offset, shrunk by 0.1 x the object sizes, must point within 60 degrees
  of the direction (data.relations, the rule the dataset itself was sampled with);
* a category's accuracy is the mean over its images, the overall score the mean over the categories.

Unlike GenEval, every nano caption names its colours (data.py's canonical captions do), so every
category checks them: single_object and colors hold the same kind of prompt ("a red circle"), the
first taking turns over the shapes, the second over the colours.
"""
import dataclasses
import json
import os
import re
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import jacobi
import sample
from cli import Parser, run_main, write_atomic
from cosmos_tokenizer import CosmosTokenizer, pil_to_tensor, tensor_to_uint8
from data import (BACKGROUND, CATEGORIES, NUMBERS, PALETTE, RELATIONS, SHAPES, ShapesDataset,
                  relations, render_shapes, sample_scene)

# ------------------------------------------------------------------------------------ the detector
# row 0: background, then the palette
REFERENCES = np.array([BACKGROUND, *PALETTE.values()], np.float32)
COLORS = list(PALETTE)
# RGB distance past which a pixel is no one's: edges blended with the background, decoder smudges
MAX_DIST = 60.0
MIN_AREA = 0.01  # of the image: half the smallest object (a triangle of side 0.2 covers 2%),
                 # above decoder specks
# top-half / bottom-half area: 1/3 for an upward triangle, 1 for circles and squares
TOP_HEAVY = 0.6
# Then the fill of the bbox: a circle's is pi/4 (down to 0.6 when a 13 px one loses its edge
# pixels), a square's 1; under 0.56 is nothing we draw (a downward triangle or a diamond fills 1/2).
FILL_SPLITS = (0.56, 0.89)
# every shape has a square box; a longer component is two objects run together, or a streak
MAX_ASPECT = 1.5


def components(cls):
    """Labels [H, W] of the 4-connected regions of equal class >= 0: the smallest flat index in the
    region; -1 outside. Min-label propagation to the neighbours plus pointer jumping (a label is a
    pixel of the same region, so take that pixel's label too): converges in a few dozen vectorised
    steps on images of a few hundred pixels."""
    H, W = cls.shape
    big = H * W
    lab = np.where(cls >= 0, np.arange(big).reshape(H, W), big)
    down = (cls[1:] == cls[:-1]) & (cls[1:] >= 0)  # pixel (y, x) joins (y+1, x)
    right = (cls[:, 1:] == cls[:, :-1]) & (cls[:, 1:] >= 0)
    while True:
        new = lab.copy()
        new[1:] = np.minimum(new[1:], np.where(down, lab[:-1], big))
        new[:-1] = np.minimum(new[:-1], np.where(down, lab[1:], big))
        new[:, 1:] = np.minimum(new[:, 1:], np.where(right, lab[:, :-1], big))
        new[:, :-1] = np.minimum(new[:, :-1], np.where(right, lab[:, 1:], big))
        # pointer jumping; index big (no region) maps to itself
        new = np.append(new.ravel(), big)[new]
        if np.array_equal(new, lab):
            return np.where(lab < big, lab, -1)
        lab = new


def detect(image, max_dist=MAX_DIST, min_area=MIN_AREA) -> list:
    """Objects in a PIL image or uint8 array [H, W, 3], largest first: dicts of shape (circle,
    square, triangle, or other: a streak, a downward triangle), color, centroid (x, y) and bbox (x0,
    y0, x1, y1; ends exclusive) in pixels, area in pixels, fill (of the bbox)."""
    x = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image,
                   dtype=np.float32)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {x.shape}")
    H, W, _ = x.shape
    dist = ((x[:, :, None] - REFERENCES) ** 2).sum(-1)  # [H, W, 7] squared distances
    cls = dist.argmin(-1) - 1  # -1: background, else the palette index
    cls[dist.min(-1) > max_dist ** 2] = -1
    labels = components(cls)
    ids, areas = np.unique(labels[labels >= 0], return_counts=True)
    objects = []
    for i, area in zip(ids, areas):
        if area < min_area * H * W:
            continue
        ys, xs = np.nonzero(labels == i)
        x0 = xs.min()
        y0 = ys.min()
        x1 = xs.max() + 1
        y1 = ys.max() + 1
        # Fill from each row's outline span, not the pixel count: specks of a neighbouring colour
        # inside a generated object make holes that would turn a square into a circle.
        lo, hi = np.full(y1 - y0, W), np.full(y1 - y0, -1)
        np.minimum.at(lo, ys - y0, xs)
        np.maximum.at(hi, ys - y0, xs)
        spans = np.maximum(hi - lo + 1, 0)
        fill = float(spans.sum() / ((x1 - x0) * (y1 - y0)))
        # Triangles by top-heaviness: a wider margin than their fill (1/2 vs pi/4), which edge
        # loss narrows.
        top = spans[:len(spans) // 2].sum() / max(spans[(len(spans) + 1) // 2:].sum(), 1)
        if max(x1 - x0, y1 - y0) > MAX_ASPECT * min(x1 - x0, y1 - y0):
            shape = "other"
        elif top < TOP_HEAVY:
            shape = "triangle"
        else:
            shape = ("square" if fill > FILL_SPLITS[1] else "circle" if fill > FILL_SPLITS[0]
                     else "other")
        objects.append(dict(shape=shape, color=COLORS[cls.flat[i]],
                            centroid=(float(xs.mean()), float(ys.mean())), area=int(area),
                            bbox=(int(x0), int(y0), int(x1), int(y1)), fill=round(fill, 3)))
    return sorted(objects, key=lambda o: -o["area"])


# ---------------------------------------------------------------------------- prompts and scoring
# arXiv 2504.11455: the prompt set is a pure function of it and data.sample_scene
PROMPT_SEED = 2504
_NOUN = rf"(an?|{'|'.join(NUMBERS.values())}) ({'|'.join(PALETTE)}) ({'|'.join(SHAPES)})s?"
_CAPTION = re.compile(rf"{_NOUN}(?: (and|{'|'.join(RELATIONS)}) {_NOUN})?")
_COUNTS = {"a": 1, "an": 1, **{word: n for n, word in NUMBERS.items()}}


# What each category's prompts take turns over, so that e.g. counting asks for two, three and four
# equally often
BALANCE = dict(single_object=(lambda r: r["objects"][0][0], SHAPES),
               colors=(lambda r: r["objects"][0][1], COLORS),
               counting=(lambda r: r["objects"][0][2], sorted(NUMBERS)),
               position=(lambda r: r["relation"], list(RELATIONS)))


def prompt_set(per_category=10, categories=CATEGORIES) -> list:
    """The fixed benchmark: per category, per_category distinct canonical captions drawn by
    data.sample_scene under PROMPT_SEED, taking turns over BALANCE's values; dicts of category,
    caption and spec (the scene that shows it)."""
    prompts = []
    for c in categories:
        if c not in CATEGORIES:
            raise ValueError(f"unknown category {c!r}; expected some of {CATEGORIES}")
        rng, found = np.random.default_rng([PROMPT_SEED, CATEGORIES.index(c)]), {}
        key, values = BALANCE.get(c, (lambda r: None, [None]))
        # single_object has 18 distinct captions: never loop forever
        for _ in range(100 * per_category):
            if len(found) == per_category:
                break
            # off the lattice: the draws of the first prompt set
            spec, caption, _ = sample_scene(rng, c, lattice=0)
            if (caption not in found
                    and key(parse_caption(caption)) == values[len(found) % len(values)]):
                found[caption] = spec
        if len(found) < per_category:
            raise ValueError(f"category {c}: found only {len(found)} distinct captions, "
                             f"not {per_category}")
        prompts += [dict(category=c, caption=caption, spec=spec) for caption, spec in found.items()]
    return prompts


def parse_caption(caption) -> dict:
    """The requirement of a canonical caption: objects [(shape, color, count)] and relation (None or
    RELATIONS key)."""
    m = _CAPTION.fullmatch(caption)
    if m is None:
        raise ValueError(f"not a canonical shapes caption: {caption!r}")
    n1, c1, s1, link, n2, c2, s2 = m.groups()
    objects = [(s1, c1, _COUNTS[n1])] + ([(s2, c2, _COUNTS[n2])] if link else [])
    return dict(objects=objects, relation=link if link in RELATIONS else None)


def _spec(o):
    # data.relations reads a scene object: its centre (shape "other" has no triangle offset)
    # and side
    x0, y0, x1, y1 = o["bbox"]
    return dict(shape="other", center=o["centroid"], size=(x1 - x0 + y1 - y0) / 2)


def score(requirement, objects):
    """(correct, reason) of one image's detected objects against a parse_caption requirement."""
    chosen = []
    for shape, color, count in requirement["objects"]:
        # largest first
        found = [o for o in objects if o["shape"] == shape and o["color"] == color]
        if len(found) < count or (count > 1 and len(found) > count):
            return False, (f"expected {'exactly ' if count > 1 else ''}{count} {color} {shape}, "
                           f"found {len(found)}")
        chosen.append(found[0])
    rel = requirement["relation"]
    if rel:
        seen = relations(*map(_spec, chosen))
        if rel not in seen:
            return False, (f"expected {rel}, "
                           f"found {' and '.join(sorted(seen)) or 'no clear relation'}")
    return True, ""


def evaluate(prompts, images) -> dict:
    """GenEval's report for images[i] (a list of PIL images or uint8 arrays [H, W, 3]) drawn for
    prompts[i]: overall, categories {name: accuracy, images}, and per prompt its accuracy and each
    image's verdict."""
    rows = []
    for p, imgs in zip(prompts, images, strict=True):
        requirement, verdicts = parse_caption(p["caption"]), []
        for img in imgs:
            objects = detect(img)
            ok, reason = score(requirement, objects)
            verdicts.append(dict(correct=ok, reason=reason,
                                 objects=[f"{o['color']} {o['shape']}" for o in objects]))
        rows.append(dict(category=p["category"], caption=p["caption"],
                         accuracy=float(np.mean([v["correct"] for v in verdicts])),
                         images=verdicts))
    categories = {}
    for c in CATEGORIES:
        hits = [v["correct"] for r in rows if r["category"] == c for v in r["images"]]
        if hits:
            categories[c] = dict(accuracy=float(np.mean(hits)), images=len(hits))
    overall = float(np.mean([c["accuracy"] for c in categories.values()])) if categories else 0.0
    return dict(overall=overall, categories=categories, prompts=rows)


def ground_truth(prompts, size=256) -> list:
    """One rendered image per prompt: its own scene, which data.py sampled to fit the caption."""
    return [[render_shapes(p["spec"], size)] for p in prompts]


def reconstructions(vq_dir, n, size=None, seed=1, batch_size=64, device="cpu"):
    """(prompts, images) for the tokenizer's ceiling: n dataset scenes (ShapesDataset seed 1:
    train_vq.py's held-out set, never trained on), each encoded and decoded by the visual
    tokenizer. An LM that picked every code right would score this; whatever the tokenizer loses (a
    rounded corner, two objects run together) no LM can win back."""
    vq = CosmosTokenizer.from_pretrained(vq_dir, device=device).eval()
    size = size or vq.config.resolution
    ds = ShapesDataset(n, size, seed)
    items = [ds[i] for i in range(n)]
    x = torch.stack([pil_to_tensor(it["image"], size) for it in items])
    with torch.no_grad():
        rec = torch.cat([vq.decode(vq.encode(x[i:i + batch_size].to(device))).cpu()
                         for i in range(0, n, batch_size)])
    prompts = [dict(category=it["category"], caption=it["caption"], spec=it["spec"])
               for it in items]
    return prompts, [[img] for img in tensor_to_uint8(rec)]


# ------------------------------------------------------------------------- generation and reports
def run_geneval(ckpt, vq, out_dir, n=4, size=None, seed=0, prompts=None, batch_size=64,
                device="cpu", progress=True, dtype="auto", quantize=None, compile=False,
                jacobi=None, **sampling) -> dict:
    """Generate n images per prompt (default: prompt_set()) with sample.py, score them, write
    results.json and grid.png to out_dir. size None: the visual tokenizer's own resolution.
    sampling: Sampling's fields; unset (None) ones take the checkpoint's generation_config.json,
    then Sampling's defaults. jacobi: a jacobi.Jacobi to decode with (same distribution, fewer
    forwards)."""
    prompts = prompt_set() if prompts is None else prompts
    ckpt_dir = sample.resolve_dir(ckpt, "checkpoint", sample.CKPT_FILES)
    settings = sample.Sampling.from_checkpoint(ckpt_dir, **sampling)  # before the weights load
    model, tokenizer, vq_model, ckpt_dir = sample.load(ckpt_dir, vq, device, dtype, quantize)
    size = size or vq_model.config.resolution
    t0 = time.perf_counter()
    samples = sample.text_to_image(model, tokenizer, vq_model, [p["caption"] for p in prompts],
                                   size, n, seed, settings, batch_size=batch_size,
                                   compile=compile, progress=progress, jacobi=jacobi)
    result = evaluate(prompts, samples.images)
    result["settings"] = dict(ckpt=ckpt, vq=vq, n=n, size=size, seed=seed,
                              **dataclasses.asdict(settings),
                              dtype=str(model.embed_tokens.weight.dtype).removeprefix("torch."),
                              quantize=quantize,
                              jacobi=dataclasses.asdict(jacobi) if jacobi else None,
                              forwards_per_image=round(float(np.mean(samples.forwards)), 2),
                              prompt_seed=PROMPT_SEED, seconds=round(time.perf_counter() - t0, 1))
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


# -------------------------------------------------------------------------------------------- CLI
def main(argv=None):
    p = Parser(prog="eval.py",
               description="GenEval-nano: per-category accuracy of a model on the shapes world.")
    p.add_argument("--ckpt", default=sample.DEFAULT_CKPT,
                   help="LM checkpoint directory (default: sample.py's)")
    p.add_argument("--vq", default=sample.DEFAULT_VQ,
                   help="visual tokenizer directory (default: sample.py's)")
    p.add_argument("--out", default="out/geneval", help="directory for results.json and grid.png")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the "
                   "tokenizer's resolution; 256 for --ground-truth)")
    p.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed + j")
    p.add_argument("--prompts-per-category", type=int, default=10)
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES)
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
    if min(args.prompts_per_category, args.n, args.batch_size,
           1 if args.size is None else args.size) < 1:
        raise ValueError(f"--prompts-per-category ({args.prompts_per_category}), --n ({args.n}), "
                         f"--batch-size ({args.batch_size}) and --size ({args.size}) must be >= 1")
    if not 0 <= args.seed <= 2 ** 63 - args.n:
        raise ValueError(f"seed must be in [0, 2^63 - n], got {args.seed}")
    prompts = prompt_set(args.prompts_per_category, args.categories)
    if args.reconstruct:
        prompts, images = reconstructions(args.vq, args.reconstruct, args.size,
                                          batch_size=args.batch_size, device=args.device)
        result = dict(evaluate(prompts, images),
                      settings=dict(reconstruct=args.reconstruct, vq=args.vq,
                                    size=images[0][0].shape[0]))
        save_results(result, images, args.out)
    elif args.ground_truth:
        images = ground_truth(prompts, args.size or 256)
        result = dict(evaluate(prompts, images),
                      settings=dict(ground_truth=True, size=args.size or 256))
        save_results(result, images, args.out)
    else:
        flags = sample.sampling_flags(args)
        speculative = jacobi.from_args(args)
        dtype = sample.runtime_dtype(args, "eval.py")
        sample.prepare_out(args.out)
        result = run_geneval(args.ckpt, args.vq, args.out, args.n, args.size, args.seed, prompts,
                             args.batch_size, args.device, dtype=dtype, quantize=args.quantize,
                             compile=args.compile, jacobi=speculative, **flags)
    return result


if __name__ == "__main__":
    main()

"""The nano world: flat shapes on a near-white background, captioned in GenEval's categories, the
antialiased renderer, the dataset, and GenEval-nano, the benchmark that judges pictures of it (a
detector of a few lines of numpy, GenEval's scoring rule, a fixed prompt set).

    python shapes.py --out runs/nano/data --n 40000 --size 64 --vocab-size 512
                     # OUT/images/000000.png ..., OUT/meta.jsonl, OUT/tokenizer/tokenizer.json
    python shapes.py --out data/shapes --n 2000 --lattice 0 --categories counting position
    python -m pytest -q tests/test_shapes.py

The world: circles, squares and up-pointing triangles in six palette colours (PALETTE) on
BACKGROUND; a scene holds one to four objects whose sides are 0.2 to 0.4 of the image side, GAP
apart and inside the image, their boxes on a lattice of 1/16 of the side by default (LATTICE).
sample_scene draws a scene of one of GenEval's six categories (djghosh13/geneval,
prompts/evaluation_metadata.jsonl: single_object, two_object, counting, colors, position,
color_attr) together with its captions: the canonical one ("a red circle to the left of a blue
square", "three green triangles"), which names every colour and is what the benchmark asks, then
its variants (the relation inverted, the objects swapped, templates such as "a picture of {}").
A position scene is redrawn until the relation GenEval's rule reads from it (`relations`) is the
captioned one and no other.

Written by the command line, one scene per image:

    OUT/images/{i:06d}.png      render_shapes of scene i, --size px square
    OUT/meta.jsonl              per image {image, caption: [canonical, variants...], canonical,
                                category, spec: [{shape, color, center [x, y], size}]}
    OUT/tokenizer/              data.train_bpe_tokenizer of every caption, SimpleAR's style
                                prefixes and negative prompt: the LM's text tokenizer

Scene i is a pure function of (--seed, i) and of category i mod the number of --categories, so a
category repeated in the list is drawn that much more often. `python data.py prepare --meta
OUT/meta.jsonl ...` turns the images into the LM's code shards.

GenEval-nano. GenEval (Ghosh et al. 2023, arXiv 2310.11513) asks for objects, counts, colours and
positions and checks them with a detector. Here the pictures are flat palette colours on
BACKGROUND, so the detector is a few lines of numpy: nearest palette colour per pixel, connected
components per colour, shape by how top-heavy a component is and how much of its bounding box it
fills, area centroids for positions. The rules follow GenEval's evaluation/evaluate_images.py:

* every object the caption names must be found with its colour; extra objects are ignored (GenEval
  ignores unrequested classes), except in counting: "three blue squares" needs exactly three blue
  squares;
* position: the largest match of each object (GenEval takes its most confident one) must stand in
  the relation: the centroid offset, shrunk by 0.1 x the object sizes, must point within 60 degrees
  of the direction (`relations`, the rule the scenes themselves are sampled with);
* a category's accuracy is the mean over its images, the overall score the mean over the categories.

Unlike GenEval, every nano caption names its colours (the canonical captions do), so every
category checks them: single_object and colors hold the same kind of prompt ("a red circle"), the
first taking turns over the shapes, the second over the colours. The prompt set (`prompt_set`) is
a pure function of PROMPT_SEED and sample_scene; eval.py runs a model on it, grpo.py rewards with
the same rule. Two more prompt sets never ask what the benchmark asks: "validation", to choose
settings on, and "wide", other captions in every training wording; RL never draws a benchmark or
validation caption (`held_out`).

    prompts = prompt_set()                       # 10 per category: category, caption, spec
    result = evaluate(prompts, images)           # images[i]: PIL images or uint8 [H, W, 3]
    result["overall"], result["categories"]      # ground_truth(prompts) scores 1.0
"""
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from cli import Parser, run_main, write_atomic
from data import NEGATIVE_PROMPT, STYLE_PREFIXES, train_bpe_tokenizer

# ------------------------------------------------------------------- palette, shapes, relations
BACKGROUND = (245, 245, 245)
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220),
           "yellow": (240, 200, 40), "purple": (150, 70, 200), "orange": (245, 130, 30)}
SHAPES = ("circle", "square", "triangle")
# GenEval's (djghosh13/geneval)
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# relation -> (axis, sign of a - b)
RELATIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1),
             "below": (1, 1)}
# the relations along x, which raster-lr captions also order
HORIZONTAL = tuple(r for r, (axis, _) in RELATIONS.items() if axis == 0)
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of",
           "above": "below", "below": "above"}


def centroid(o) -> np.ndarray:
    """Area centroid of an object: a triangle's lies size/6 below its box centre."""
    return np.add(o["center"], [0, o["size"] / 6 if o["shape"] == "triangle" else 0])


def relations(a, b) -> set:
    """GenEval's rule (evaluation/evaluate_images.py of djghosh13/geneval): the centroid offset a-b,
    shrunk by 0.1 x (sizes), must point within 60 degrees of a direction."""
    d = centroid(a) - centroid(b)
    shrunk = np.maximum(np.abs(d) - 0.1 * (a["size"] + b["size"]), 0) * np.sign(d)
    r = shrunk / max(np.linalg.norm(d), 1e-9)
    return {rel for rel, (axis, sign) in RELATIONS.items() if sign * r[axis] > 0.5}


# -------------------------------------------------------------------- scenes and their captions
NUMBERS = {2: "two", 3: "three", 4: "four"}
TEMPLATES = ("{}", "a picture of {}", "an image of {}", "{} on a white background",
             "a simple drawing of {}")
# object side and the empty space around objects, as fractions of the image side
MIN_SIZE = 0.2
MAX_SIZE = 0.4
GAP = 0.03
# Object boxes on a lattice of 1/16 of the side (4 px at 64 px, half an 8x8-code cell): with edges
# anywhere, one code of 1,000 must tell a corner's or an arc's colour and its offset among 8x8 in
# its cell, which the nano tokenizer could not (28.5 dB, squares decoded with round corners); with
# two offsets per cell it can. 0: anywhere.
LATTICE = 16


def _noun(shape, color, n=1):
    if n == 1:
        return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"
    return f"{NUMBERS[n]} {color} {shape}s"


def raster_key(o, grid=8) -> tuple:
    """Where a raster scan of a grid x grid code map first meets object o: its top row, then the
    column of its topmost pixels (a square's left edge, a circle's or a triangle's centre)."""
    (x, y), half = o["center"], o["size"] / 2
    return int((y - half) * grid), int((x - half if o["shape"] == "square" else x) * grid)


ORDERS = ("any", "raster", "raster-lr")


def check_order(order) -> None:
    """ValueError unless order is a caption order sample_scene knows (ORDERS)."""
    if order not in ORDERS:
        raise ValueError(f"caption order {order!r}: one of {', '.join(ORDERS)}")


def sample_scene(rng, category, lattice=LATTICE, order="any"):
    """(spec, canonical caption, captions) of one random scene. The canonical (evaluation) form
    names the objects in the order they were drawn; captions are its wordings, the canonical
    first. order "raster" keeps, for two kinds of object joined by "and", only the wordings that
    name first the one a raster scan of the 8 x 8 code map meets first (raster_key; both on a
    tie), so that the first object an LM generates is the first it was told of; "raster-lr"
    orders a left-right relation's wordings too. The canonical caption, the scene and the random
    stream are those of "any". Object sides and box edges are multiples of 1/lattice of the image
    side (lattice 0: any value)."""
    check_order(order)
    pick = lambda seq, k: [seq[i] for i in rng.choice(len(seq), k, replace=False)]  # noqa: E731
    colors = list(PALETTE)
    if category in ("single_object", "colors"):
        objs = [(*pick(SHAPES, 1), *pick(colors, 1))]
    elif category == "counting":
        objs = [(*pick(SHAPES, 1), *pick(colors, 1))] * int(rng.integers(2, 5))
    elif category == "two_object":  # two kinds of object, colours free
        objs = list(zip(pick(SHAPES, 2), [pick(colors, 1)[0] for _ in range(2)]))
    elif category in ("color_attr", "position"):  # two kinds, two colours: the binding is testable
        objs = list(zip(pick(SHAPES, 2), pick(colors, 2)))
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    relation = list(RELATIONS)[rng.integers(4)] if category == "position" else None
    # up to four objects of 0.4 rarely fit: keep rejection sampling quick
    hi = MAX_SIZE if len(objs) <= 2 else 0.3
    if lattice:  # the allowed sides: multiples of 1/lattice from MIN_SIZE up to the one nearest hi
        top = min(np.floor(MAX_SIZE * lattice), round(hi * lattice))
        sides = np.arange(np.ceil(MIN_SIZE * lattice), top + 1) / lattice
    while True:  # rejection sampling: objects inside the image, GAP apart, the relation unambiguous
        spec = []
        for (s, c), z in zip(objs, rng.uniform(MIN_SIZE, hi, len(objs))):
            if lattice:  # the nearest lattice side, then the box's top-left corner on the lattice
                z = sides[np.abs(sides - z).argmin()]
                first = np.ceil(GAP * lattice)
                last = np.floor((1 - GAP - z) * lattice)
                center = rng.integers(first, last + 1, 2) / lattice + z / 2
            else:
                center = rng.uniform(z / 2 + GAP, 1 - z / 2 - GAP, 2)
            spec.append(dict(shape=s, color=c, center=center.tolist(), size=float(z)))
        apart = all(np.abs(np.subtract(a["center"], b["center"])).max()
                    >= (a["size"] + b["size"]) / 2 + GAP
                    for i, a in enumerate(spec) for b in spec[i + 1:])
        if apart and (relation is None or relations(spec[0], spec[1]) == {relation}):
            break
    a = _noun(*objs[0])
    b = _noun(*objs[-1])
    if category == "counting":
        variants = [_noun(*objs[0], n=len(objs)), f"{len(objs)} {objs[0][1]} {objs[0][0]}s"]
    elif relation:
        variants = [f"{a} {relation} {b}", f"{b} {INVERSE[relation]} {a}"]
    elif len(objs) == 2:
        variants = [f"{a} and {b}", f"{b} and {a}"]
    else:
        variants = [a]
    canonical = variants[0]
    # never above / below: "a below b" would go unseen, its raster-first wording being "b above
    # a"; left / right both stay, either object being the higher one
    orderable = not relation or (order == "raster-lr" and relation in HORIZONTAL)
    if order != "any" and len(objs) == 2 and objs[0] != objs[1] and orderable:
        keys = [raster_key(o) for o in spec]
        if keys[0] != keys[1]:
            variants = [variants[int(keys[1] < keys[0])]]
    captions = list(dict.fromkeys(t.format(v) for t in TEMPLATES for v in variants))
    return spec, canonical, captions


# ------------------------------------------------------------------------------------- renderer
# Hard pixel edges are aliasing: at 64 px they were 94% of an 8x8-code tokenizer's reconstruction
# error
SUPERSAMPLE = 4


def render_shapes(spec, size, supersample=SUPERSAMPLE) -> Image.Image:
    """Draw spec (dicts: shape, color, center [x, y] and size as fractions of the image side; y
    points down) at supersample x the size, then average each supersample x supersample block (a box
    filter): edge pixels get the share of each colour that covers them, as any rendered or
    photographed image does. supersample=1 draws hard edges, every pixel exactly the background or
    a palette colour."""
    if supersample > 1:
        big = render_shapes(spec, size * supersample, 1)
        return big.resize((size, size), Image.Resampling.BOX)
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in spec:
        cx, cy = o["center"]
        h = o["size"] / 2
        x0, y0, x1, y1 = (round(v * size) for v in (cx - h, cy - h, cx + h, cy + h))
        box = (x0, y0, x1 - 1, y1 - 1)
        fill = PALETTE[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=fill)
        elif o["shape"] == "triangle":  # pointing up: apex at the top middle, base on the bottom
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o['shape']!r}; expected one of {SHAPES}")
    return img


# -------------------------------------------------------------------------------------- dataset
class ShapesDataset:
    """n scenes; item i is a pure function of (seed, i), and categories take turns: each is equally
    frequent, or as often as it is repeated in categories. lattice, order: as sample_scene's."""

    def __init__(self, n, size=256, seed=0, categories=CATEGORIES, lattice=LATTICE,
                 order="any"):
        unknown = sorted(set(categories) - set(CATEGORIES))
        if unknown or not categories:
            raise ValueError(f"categories {' '.join(unknown) or '(none)'}: expected some of "
                             f"{', '.join(CATEGORIES)}")
        if lattice < 0 or 0 < lattice < 8:
            raise ValueError(f"lattice {lattice}: 0 (anywhere) or at least 8 (a coarser one has no "
                             "room for four objects)")
        if n < 0 or size < 1:
            raise ValueError(f"n {n} must be >= 0 and size {size} >= 1")
        check_order(order)
        self.n = n
        self.size = size
        self.seed = seed
        self.categories = list(categories)
        self.lattice = lattice
        self.order = order

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        category = self.categories[i % len(self.categories)]
        rng = np.random.default_rng([self.seed, i])
        spec, canonical, captions = sample_scene(rng, category, self.lattice, self.order)
        return dict(image=render_shapes(spec, self.size), caption=canonical, captions=captions,
                    category=category, spec=spec)


# ------------------------------------------------------------------------------------- detector
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


# --------------------------------------------------------------------------------- scoring rule
_NOUN = rf"(an?|{'|'.join(NUMBERS.values())}) ({'|'.join(PALETTE)}) ({'|'.join(SHAPES)})s?"
_CAPTION = re.compile(rf"{_NOUN}(?: (and|{'|'.join(RELATIONS)}) {_NOUN})?")
_COUNTS = {"a": 1, "an": 1, **{word: n for n, word in NUMBERS.items()}}


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
    # relations reads a scene object: its centre (shape "other" has no triangle offset) and side
    x0, y0, x1, y1 = o["bbox"]
    return dict(shape="other", center=o["centroid"], size=(x1 - x0 + y1 - y0) / 2)


def judge(requirement, objects) -> list:
    """[(met, reason)] per part of a parse_caption requirement, in order: each object (its shape,
    colour and count), then the relation if there is one (unmet while an object is missing)."""
    parts, chosen = [], []
    for shape, color, count in requirement["objects"]:
        # largest first
        found = [o for o in objects if o["shape"] == shape and o["color"] == color]
        if len(found) < count or (count > 1 and len(found) > count):
            parts.append((False, f"expected {'exactly ' if count > 1 else ''}{count} {color} "
                                 f"{shape}, found {len(found)}"))
        else:
            parts.append((True, ""))
            chosen.append(found[0])
    rel = requirement["relation"]
    if rel and len(chosen) < len(requirement["objects"]):
        parts.append((False, f"expected {rel}, but an object is missing"))
    elif rel:
        seen = relations(*map(_spec, chosen))
        parts.append((rel in seen, "" if rel in seen else
                      f"expected {rel}, found {' and '.join(sorted(seen)) or 'no clear relation'}"))
    return parts


def score(requirement, objects):
    """(correct, reason) of one image's detected objects against a parse_caption requirement:
    GenEval's rule, every part met; the reason is the first unmet part's."""
    for met, reason in judge(requirement, objects):
        if not met:
            return False, reason
    return True, ""


def credit(requirement, objects) -> float:
    """The fraction of the requirement's parts (judge) an image meets: 1.0 exactly where score
    passes, in [0, 1) where it fails, e.g. 1/3 for "a red circle below a blue square"
    drawn as a red circle and a blue circle. A denser RL reward than score's 0/1 (grpo.py)."""
    parts = judge(requirement, objects)
    return sum(met for met, _ in parts) / len(parts)


def evaluate(prompts, images) -> dict:
    """GenEval's report for images[i] (a list of PIL images or uint8 arrays [H, W, 3]) drawn for
    prompts[i]: overall, categories {name: accuracy, images}, and per prompt its accuracy and each
    image's verdict (and the wording asked, where it was not the caption)."""
    rows = []
    for p, imgs in zip(prompts, images, strict=True):
        requirement, verdicts = parse_caption(p["caption"]), []
        for img in imgs:
            objects = detect(img)
            ok, reason = score(requirement, objects)
            verdicts.append(dict(correct=ok, reason=reason,
                                 objects=[f"{o['color']} {o['shape']}" for o in objects]))
        asked = {"prompt": p["prompt"]} if p.get("prompt", p["caption"]) != p["caption"] else {}
        rows.append(dict(category=p["category"], caption=p["caption"], **asked,
                         accuracy=float(np.mean([v["correct"] for v in verdicts])),
                         images=verdicts))
    categories = {}
    for c in CATEGORIES:
        hits = [v["correct"] for r in rows if r["category"] == c for v in r["images"]]
        if hits:
            categories[c] = dict(accuracy=float(np.mean(hits)), images=len(hits))
    overall = float(np.mean([c["accuracy"] for c in categories.values()])) if categories else 0.0
    return dict(overall=overall, categories=categories, prompts=rows)


# ----------------------------------------------------------------------------------- prompt set
# arXiv 2504.11455: the benchmark is a pure function of it and sample_scene
PROMPT_SEED = 2504
# The other prompt sets: a validation set to choose settings on (never the benchmark), and "wide",
# the grammar at large in every wording the training captions use
SPLITS = {"benchmark": PROMPT_SEED, "validation": PROMPT_SEED + 1, "wide": PROMPT_SEED + 2}
# captions per category: what held_out() keeps from RL (the benchmark's and the validation set's)
SIZES = {"benchmark": 10, "validation": 20, "wide": 20}
# What each category's prompts take turns over, so that e.g. counting asks for two, three and four
# equally often
BALANCE = dict(single_object=(lambda r: r["objects"][0][0], SHAPES),
               colors=(lambda r: r["objects"][0][1], COLORS),
               counting=(lambda r: r["objects"][0][2], sorted(NUMBERS)),
               position=(lambda r: r["relation"], list(RELATIONS)))


def prompt_set(per_category=None, categories=CATEGORIES, split="benchmark") -> list:
    """A prompt set: per category, per_category (None: SIZES[split]) distinct canonical captions
    drawn by sample_scene under the split's seed; dicts of category, caption (canonical: what is
    scored), prompt (what the model is asked) and spec (a scene that shows it).

    split "benchmark" (GenEval-nano, the default) takes turns over BALANCE's values and prompts
    with the canonical caption; a category without per_category distinct captions is an error.
    "validation" (settings are chosen on it; at most SIZES["validation"] per category, the
    captions RL never draws) and "wide" draw scenes as the dataset does, never a caption of the
    benchmark nor, for "wide", of the validation set, so single objects (18 captions, 15 of them
    the benchmark's) give validation 3, shared by its single_object and colors, and wide none; a
    category may hold fewer than per_category, and one with none is left out. "wide" asks for
    each caption in one of its training wordings picked at random (templates, inverted relations,
    swapped objects, digits) and scores the canonical one: how the model does beyond the
    benchmark's captions and wordings.
    Raises ValueError for an unknown split or category, or a validation set beyond its size."""
    if split not in SPLITS:
        raise ValueError(f"unknown prompt set {split!r}; expected one of {', '.join(SPLITS)}")
    per_category = SIZES[split] if per_category is None else per_category
    if split == "validation" and per_category > SIZES[split]:
        raise ValueError(f"the validation set has {SIZES[split]} prompts per category (the ones "
                         f"RL never draws), not {per_category}")
    benchmark = split == "benchmark"
    taken = set()
    if not benchmark:  # the other sets never ask what the benchmark asks
        taken |= {p["caption"] for p in prompt_set(split="benchmark")}
    if split == "wide":
        taken |= {p["caption"] for p in prompt_set(split="validation")}
    prompts = []
    for c in categories:
        if c not in CATEGORIES:
            raise ValueError(f"unknown category {c!r}; expected some of {CATEGORIES}")
        rng, found = np.random.default_rng([SPLITS[split], CATEGORIES.index(c)]), {}
        key, values = BALANCE.get(c, (None, [None])) if benchmark else (None, [None])
        # single_object has 18 distinct captions: never loop forever
        for _ in range(100 * per_category):
            if len(found) == per_category:
                break
            # off the lattice: the draws of the first prompt set
            spec, caption, wordings = sample_scene(rng, c, lattice=0)
            if caption in found or caption in taken:
                continue
            if key is None or key(parse_caption(caption)) == values[len(found) % len(values)]:
                wording = wordings[rng.integers(len(wordings))] if split == "wide" else caption
                found[caption] = spec, wording
        if benchmark and len(found) < per_category:
            raise ValueError(f"category {c}: found only {len(found)} distinct captions, "
                             f"not {per_category}")
        prompts += [dict(category=c, caption=caption, prompt=wording, spec=spec)
                    for caption, (spec, wording) in found.items()]
    return prompts


def held_out() -> frozenset:
    """The canonical captions RL must never draw: the benchmark's and the validation set's (at 20
    per category), so that neither measures prompts the model was rewarded on."""
    return frozenset(p["caption"] for split in ("benchmark", "validation")
                     for p in prompt_set(split=split))


# the categories whose captions RL can draw: every single-object caption (18) is held out
DRAWABLE = ("two_object", "counting", "position", "color_attr")


def ground_truth(prompts, size=256) -> list:
    """One rendered image per prompt: its own scene, which sample_scene drew to fit the caption."""
    return [[render_shapes(p["spec"], size)] for p in prompts]


# ------------------------------------------------------------------------------------------ CLI
def get_parser() -> Parser:
    p = Parser(prog="shapes.py", description="Render the synthetic shapes dataset (PNGs and "
               "meta.jsonl) and train its byte-level BPE text tokenizer.")
    p.add_argument("--out", required=True, help="directory for images/, meta.jsonl, tokenizer/")
    p.add_argument("--n", type=int, default=10000, help="number of scenes (images)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="scene i is a function of (seed, i)")
    p.add_argument("--vocab-size", type=int, default=1024,
                   help="the text tokenizer's BPE vocabulary, the 256 bytes included")
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES), metavar="CATEGORY",
                   help="scene i is of category i mod their number; repeat one to weight it "
                   f"(of {', '.join(CATEGORIES)})")
    p.add_argument("--caption-order", choices=ORDERS, default="any",
                   help="raster: the training captions of two kinds of object joined by 'and' "
                   "name first the object the LM generates first (sample_scene); raster-lr: "
                   "left-right relations' too (above / below keep both); the images are the same")
    p.add_argument("--lattice", type=int, default=LATTICE,
                   help="object sides and box edges are multiples of 1/LATTICE of the side; "
                   "0: anywhere")
    return p


def write_dataset(args):
    """The command line's work: every check before anything is written (ValueError)."""
    for name in ("n", "size"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name} {value} must be >= 1")
    if args.vocab_size < 256:
        raise ValueError(f"--vocab-size {args.vocab_size} must be >= 256 (the bytes alone)")
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed} must be >= 0")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} exists and is not a directory")
    ds = ShapesDataset(args.n, args.size, args.seed, args.categories, args.lattice,
                       args.caption_order)
    # the tokenizer must also spell what the LM is prompted with besides captions
    texts = [*STYLE_PREFIXES, NEGATIVE_PROMPT]
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    lines = []
    for i in tqdm(range(len(ds)), desc="shapes"):
        item = ds[i]
        name = f"images/{i:06d}.png"
        write_atomic(os.path.join(args.out, name), item["image"].save)
        record = dict(image=name, caption=item["captions"], canonical=item["caption"],
                      category=item["category"], spec=item["spec"])
        lines.append(json.dumps(record) + "\n")
        texts += item["captions"]
    meta = os.path.join(args.out, "meta.jsonl")
    text = "".join(lines)
    write_atomic(meta, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    train_bpe_tokenizer(texts, args.vocab_size, os.path.join(args.out, "tokenizer"))
    print(f"wrote {args.n} images, {meta} and "
          f"{os.path.join(args.out, 'tokenizer', 'tokenizer.json')}")


def main(argv=None):
    run_main("shapes.py", write_dataset, get_parser().parse_args(argv))


if __name__ == "__main__":
    main()

"""shapes.py: the renderer and the scenes (exact, well placed, on the lattice), the captions, the
command line, the detector against rendered ground truth (clean, noisy, blurred), negative
controls, GenEval's scoring and aggregation, and the prompt set.

    python -m pytest -q tests/test_shapes.py   # CPU, seconds
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import data
import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 128  # objects of 0.2 x 128 px: the detector's test size, like a small generated image


# ------------------------------------------------------------------------ scenes and renderer
def objects(img):
    """Per palette colour: (pixel count, centroid x, y as fractions) of the rendered image."""
    a = np.asarray(img)
    out = {}
    for name, rgb in shapes.PALETTE.items():
        ys, xs = np.nonzero((a == rgb).all(-1))
        if len(xs):
            out[name] = (len(xs), (xs.mean() + 0.5) / a.shape[1], (ys.mean() + 0.5) / a.shape[0])
    return out


def check_position(item, found):
    """The relation of a position caption holds on the rendered pixels, by a margin."""
    a_, b_ = item["spec"]
    rel = next(r for r in shapes.RELATIONS if f" {r} " in item["caption"])
    _, ax, ay = found[a_["color"]]
    _, bx, by = found[b_["color"]]
    dx = ax - bx  # measured on pixels; y grows downwards
    dy = ay - by
    margin = 0.05
    assert {"to the left of": dx < -margin, "to the right of": dx > margin,
            "above": dy < -margin, "below": dy > margin}[rel], (item["caption"], dx, dy)
    assert {"to the left of": abs(dx) > abs(dy), "to the right of": abs(dx) > abs(dy),
            "above": abs(dy) > abs(dx), "below": abs(dy) > abs(dx)}[rel]


def test_shapes_render_exact_and_well_placed():
    ds = shapes.ShapesDataset(120, 128, seed=0)
    fill = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    for i in range(len(ds)):
        item = ds[i]
        hard = shapes.render_shapes(item["spec"], 128, supersample=1)
        a = np.asarray(hard)
        aa = np.asarray(item["image"], dtype=np.float64)
        # antialiased: the same colours away from the edges (2 px), the same amount of each colour
        t = torch.from_numpy(a.sum(-1, dtype=np.float64))[None, None]
        flat = (F.max_pool2d(t, 5, 1, 2) == -F.max_pool2d(-t, 5, 1, 2))[0, 0].numpy()
        assert flat.mean() > 0.5 and np.array_equal(aa[flat], a[flat])
        assert np.abs(aa.mean((0, 1)) - a.mean((0, 1))).max() < 1.0
        item["image"] = hard
        colours = {tuple(c) for c in a.reshape(-1, 3)}
        assert colours <= {shapes.BACKGROUND, *shapes.PALETTE.values()}
        assert shapes.BACKGROUND in colours
        # fully inside the image
        assert (a[0] == shapes.BACKGROUND).all() and (a[-1] == shapes.BACKGROUND).all()
        spec = item["spec"]
        assert 1 <= len(spec) <= 4 and item["captions"][0] == item["caption"]
        for j, o in enumerate(spec):
            assert shapes.MIN_SIZE <= o["size"] <= shapes.MAX_SIZE
            assert all(o["size"] / 2 < c < 1 - o["size"] / 2 for c in o["center"])
            for b in spec[j + 1:]:
                gap = np.abs(np.subtract(o["center"], b["center"])).max()
                assert gap > (o["size"] + b["size"]) / 2
        found = objects(item["image"])
        if len({o["color"] for o in spec}) == len(spec):  # one object per colour: check its pixels
            for o in spec:
                n, x, y = found[o["color"]]
                assert abs(n / (o["size"] * 128) ** 2 - fill[o["shape"]]) < 0.1
                assert np.allclose((x, y), shapes.centroid(o), atol=0.02)
        else:
            assert sum(n for n, _, _ in found.values()) > 0
        if item["category"] == "position":
            check_position(item, found)
        if item["category"] == "counting":
            n = len(spec)
            assert item["caption"].split()[0] == shapes.NUMBERS[n]
            assert len({(o["shape"], o["color"]) for o in spec}) == 1
    assert {ds[i]["category"] for i in range(6)} == set(shapes.CATEGORIES)
    again = shapes.ShapesDataset(120, 128, seed=0)[5]["image"]
    assert np.array_equal(np.asarray(ds[5]["image"]), np.asarray(again))
    weighted = shapes.ShapesDataset(12, 32, categories=["counting", "position", "position"])
    assert [weighted[i]["category"] for i in range(6)] == ["counting", "position", "position"] * 2
    with pytest.raises(ValueError, match="texture"):
        shapes.ShapesDataset(4, 32, categories=["counting", "texture"])
    with pytest.raises(ValueError, match="size 0"):
        shapes.ShapesDataset(4, 0)
    assert ds[5]["spec"] != shapes.ShapesDataset(120, 128, seed=1)[5]["spec"]


def test_shapes_captions():
    spec, canonical, captions = shapes.sample_scene(np.random.default_rng(0), "position")
    assert canonical == captions[0] and len(captions) == len(set(captions)) > 1
    with pytest.raises(ValueError, match="category"):
        shapes.sample_scene(np.random.default_rng(0), "texture")
    hexagon = dict(shape="hexagon", color="red", center=[0.5, 0.5], size=0.3)
    with pytest.raises(ValueError, match="hexagon"):
        shapes.render_shapes([hexagon], 32)
    assert shapes._noun("circle", "orange") == "an orange circle"
    assert shapes._noun("square", "red", 3) == "three red squares"


@pytest.mark.parametrize("order", ["raster", "raster-lr"])
def test_raster_caption_order_names_first_the_object_generated_first(order):
    """order="raster" changes only which training wordings a two-object scene keeps: the scene,
    the canonical caption and the random stream are order="any"'s. "raster-lr" orders left-right
    relations too, and both of their relation words stay in use."""
    words = set()
    kept = 0
    for i in range(200):
        category = ("two_object", "position", "color_attr", "counting", "single_object")[i % 5]
        rng_any, rng_raster = np.random.default_rng([3, i]), np.random.default_rng([3, i])
        spec, canonical, captions = shapes.sample_scene(rng_any, category)
        ordered = shapes.sample_scene(rng_raster, category, order=order)
        assert ordered[:2] == (spec, canonical) and rng_any.random() == rng_raster.random()
        assert set(ordered[2]) <= set(captions)
        relation = shapes.parse_caption(canonical)["relation"]
        if order == "raster-lr" and relation in shapes.HORIZONTAL:
            words |= {word for word in shapes.HORIZONTAL for c in ordered[2] if word in c}
        elif len(spec) != 2 or spec[0]["shape"] == spec[1]["shape"] or relation:
            assert ordered[2] == captions  # nothing to order, or above / below: both wordings
            continue
        keys = [shapes.raster_key(o) for o in spec]
        if keys[0] == keys[1]:
            assert ordered[2] == captions
            continue
        first = spec[int(keys[1] < keys[0])]
        for wording in ordered[2]:  # every kept wording names the raster-first object first
            named = [m.start() for m in (re.search(rf"{o['color']} {o['shape']}", wording)
                                         for o in spec)]
            assert named[spec.index(first)] == min(named), wording
        assert len(ordered[2]) == len(captions) // 2
        kept += 1
    assert kept > 50
    assert words == (set(shapes.HORIZONTAL) if order == "raster-lr" else set())
    with pytest.raises(ValueError, match="caption order"):
        shapes.sample_scene(np.random.default_rng(0), "position", order="size")
    with pytest.raises(ValueError, match="caption order"):
        shapes.ShapesDataset(6, 32, order="size")  # found before any scene is drawn
    a, b = shapes.ShapesDataset(6, 32, order="raster")[1], shapes.ShapesDataset(6, 32)[1]
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_shapes_lattice():
    """Sides and box edges on the 1/LATTICE grid (the default), anywhere with lattice=0; both
    within the spec."""
    L = shapes.LATTICE
    sides = set()
    edges = []
    for lattice in (L, 0):
        for i in range(300):
            rng = np.random.default_rng([7, i])
            category = shapes.CATEGORIES[i % len(shapes.CATEGORIES)]
            spec, _, _ = shapes.sample_scene(rng, category, lattice=lattice)
            for o in spec:
                assert shapes.MIN_SIZE <= o["size"] <= shapes.MAX_SIZE
                corner = np.subtract(o["center"], o["size"] / 2) * L
                on_side = np.isclose(o["size"] * L, round(o["size"] * L))
                on = np.allclose(corner, np.round(corner)) and on_side
                assert on == (lattice == L), (lattice, o)
                if lattice:
                    sides.add(round(o["size"] * L))
                    edges += [*np.round(corner), *np.round(corner) + o["size"] * L]
    assert sides == {4, 5, 6} and min(edges) >= 1 and max(edges) <= L - 1
    off = shapes.ShapesDataset(6, 64, seed=3, lattice=0)[0]["spec"][0]
    assert off != shapes.ShapesDataset(6, 64, seed=3)[0]["spec"][0]
    assert not np.isclose(off["size"] * L, round(off["size"] * L))
    for lattice in (9, 20):  # other lattices keep the spec's sides
        spec = shapes.ShapesDataset(12, 64, seed=0, lattice=lattice)[1]["spec"]
        assert all(shapes.MIN_SIZE <= o["size"] <= shapes.MAX_SIZE for o in spec)
    # at 64 px a lattice step is 4 whole pixels: a square has hard edges even without antialiasing
    item = shapes.ShapesDataset(6, 64, seed=3)[0]
    square = [dict(item["spec"][0], shape="square")]
    smooth = np.asarray(shapes.render_shapes(square, 64))
    assert np.array_equal(smooth, np.asarray(shapes.render_shapes(square, 64, 1)))


def test_cli_writes_images_meta_and_tokenizer(tmp_path):
    shapes.main(["--out", str(tmp_path), "--n", "6", "--size", "48", "--vocab-size", "300"])
    records = [json.loads(line) for line in (tmp_path / "meta.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all((tmp_path / r["image"]).is_file() for r in records)
    ds = shapes.ShapesDataset(6, 48)  # the defaults: seed 0, every category, the lattice
    for i, r in enumerate(records):  # item i: every caption, the canonical first
        item = ds[i]
        assert set(r) == {"image", "caption", "canonical", "category", "spec"}
        assert (r["caption"], r["canonical"], r["category"], r["spec"]) == (
            item["captions"], item["caption"], item["category"], item["spec"])
    # every file under its final name: no temporary left over
    assert sorted(os.listdir(tmp_path)) == ["images", "meta.jsonl", "tokenizer"]
    assert sorted(os.listdir(tmp_path / "images")) == [f"{i:06d}.png" for i in range(6)]
    assert os.listdir(tmp_path / "tokenizer") == ["tokenizer.json"]
    assert Image.open(tmp_path / records[0]["image"]).size == (48, 48)
    tok = data.load_text_tokenizer(tmp_path / "tokenizer")
    ids = data.special_token_ids(tok)
    n = tok.get_vocab_size()
    assert sorted(ids.values()) == list(range(n - 7, n))  # after the vocabulary
    assert tok.token_to_id("<|endoftext|>") == n - 8
    prompt = data.build_prompt(records[0]["canonical"])
    assert tok.decode(tok.encode(prompt).ids, skip_special_tokens=False) == prompt
    assert tok.encode("emoji ✨ never seen").ids  # byte-level: any text encodes


def test_cli_errors_are_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out"), "--n", "2"]
    cases = {"--n 0 must be >= 1": ["--out", str(tmp_path / "out"), "--n", "0"],
             "--out": ["--n", "2"],
             "frobnicate": [*out, "--frobnicate"],
             "texture": [*out, "--categories", "counting", "texture"],
             "lattice 3": [*out, "--lattice", "3"],
             "--size -8 must be >= 1": [*out, "--size", "-8"],
             "--vocab-size 0 must be >= 256": [*out, "--vocab-size", "0"],
             "invalid int value: 'two'": [*out, "--seed", "two"]}
    for needle, argv in cases.items():
        with pytest.raises(SystemExit) as e:
            shapes.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, (argv, err)
        assert re.match(r"shapes\.py: error: ", err) and needle in err, (argv, err)
    # the script itself, as a user runs it
    r = subprocess.run([sys.executable, "shapes.py", "--out", str(tmp_path / "out"), "--n", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr == "shapes.py: error: --n 0 must be >= 1\n", r.stderr
    assert os.listdir(tmp_path) == []  # nothing written on the way


# ---------------------------------------------------------------- detector and scoring rule
@pytest.fixture(scope="module")
def dataset():
    """300 rendered dataset scenes, 50 per category, with their canonical captions."""
    ds = shapes.ShapesDataset(300, size=SIZE, seed=7)
    items = [ds[i] for i in range(len(ds))]
    return ([dict(category=it["category"], caption=it["caption"]) for it in items],
            [[it["image"]] for it in items])


def noisy(img, sigma=8.0, seed=0):
    x = np.asarray(img, np.float32) + np.random.default_rng(seed).normal(0, sigma,
                                                                         (*img.size[::-1], 3))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def blurred(img):
    return img.filter(ImageFilter.GaussianBlur(0.7))


def accuracies(result):
    return {c: r["accuracy"] for c, r in result["categories"].items()}


def test_detector_scores_the_dataset_ground_truth(dataset):
    prompts, images = dataset
    result = shapes.evaluate(prompts, images)
    assert set(result["categories"]) == set(shapes.CATEGORIES)
    assert min(accuracies(result).values()) >= 0.99, accuracies(result)
    assert result["overall"] >= 0.99


def test_detector_is_robust_to_noise_and_blur(dataset):
    prompts, images = dataset  # both at once: each alone is milder (all 1.0 at this size)
    result = shapes.evaluate(prompts, [[noisy(blurred(img), seed=i)]
                                        for i, (img,) in enumerate(images)])
    assert min(accuracies(result).values()) >= 0.95, accuracies(result)


@pytest.mark.parametrize("size", [64, SIZE])
def test_single_objects_every_shape_colour_and_extreme_size(size):
    for shape in shapes.SHAPES:
        for color in shapes.PALETTE:
            for side in (shapes.MIN_SIZE, shapes.MAX_SIZE):
                spec = dict(shape=shape, color=color, center=[0.45, 0.55], size=side)
                found = shapes.detect(shapes.render_shapes([spec], size))
                assert [(o["shape"], o["color"]) for o in found] == [(shape, color)], (spec, found)
                np.testing.assert_allclose(found[0]["centroid"], shapes.centroid(spec) * size - 0.5,
                                           atol=1.0)
    # the dataset's triangles point up; upside down, or squashed into a streak, a shape is none of
    # ours
    up = dict(shape="triangle", color="red", center=[0.5, 0.5], size=0.3)
    down = shapes.render_shapes([up], size)
    assert ([o["shape"] for o in shapes.detect(down.transpose(Image.Transpose.FLIP_TOP_BOTTOM))]
            == ["other"])
    assert [o["shape"] for o in shapes.detect(down.resize((size, size // 3)))] == ["other"]


def test_components_are_4_connected_per_class():
    # a ring of 0; three diagonal-only neighbours; 2 stands apart from 1
    cls = np.array([[0, 0, 0, -1, 1],
                    [0, -1, 0, 1, -1],
                    [0, -1, 0, -1, 2],
                    [0, 0, 0, -1, 2]])
    labels = shapes.components(cls)
    assert (labels[cls == 0] == 0).all() and (labels[cls == -1] == -1).all()
    assert labels[0, 4] == 4 and labels[1, 3] == 8 and labels[2, 4] == labels[3, 4] == 14


def test_detect_takes_arrays_and_ignores_specks():
    img = np.full((64, 64, 3), 245, np.uint8)
    img[10:12, 10:12] = shapes.PALETTE["red"]  # 4 pixels: decoder noise, far below MIN_AREA
    img[30:50, 30:50] = shapes.PALETTE["blue"]
    assert ([(o["shape"], o["color"], o["bbox"]) for o in shapes.detect(img)]
            == [("square", "blue", (30, 30, 50, 50))])
    with pytest.raises(ValueError, match="RGB"):
        shapes.detect(np.zeros((8, 8), np.uint8))


def test_parse_caption_reads_every_canonical_form(dataset):
    for p in dataset[0]:
        req = shapes.parse_caption(p["caption"])
        assert len(req["objects"]) == (2 if p["category"] in ("two_object", "position",
                                                              "color_attr") else 1)
        assert (req["relation"] is not None) == (p["category"] == "position")
    assert shapes.parse_caption("three blue squares") == dict(objects=[("square", "blue", 3)],
                                                               relation=None)
    assert shapes.parse_caption("an orange circle below a red triangle") == dict(
        objects=[("circle", "orange", 1), ("triangle", "red", 1)], relation="below")
    with pytest.raises(ValueError, match="canonical"):
        shapes.parse_caption("a cat wearing a hat")


def test_prompt_set_is_fixed_and_covers_every_category():
    prompts = shapes.prompt_set()
    assert prompts == shapes.prompt_set()
    for c in shapes.CATEGORIES:
        captions = [p["caption"] for p in prompts if p["category"] == c]
        assert len(captions) == len(set(captions)) == 10
    counts = [shapes.parse_caption(p["caption"])["objects"][0][2] for p in prompts
              if p["category"] == "counting"]
    assert set(counts) == set(shapes.NUMBERS)  # balanced: two, three and four all asked for
    rels = {shapes.parse_caption(p["caption"])["relation"] for p in prompts
            if p["category"] == "position"}
    assert rels == set(shapes.INVERSE)
    assert shapes.evaluate(prompts, shapes.ground_truth(prompts, SIZE))["overall"] == 1.0
    with pytest.raises(ValueError, match="distinct captions"):
        shapes.prompt_set(19, ["single_object"])  # 3 shapes x 6 colours


def test_validation_and_wide_sets_never_ask_what_the_benchmark_asks():
    benchmark = {p["caption"] for p in shapes.prompt_set()}
    validation = shapes.prompt_set(20, split="validation")
    wide = shapes.prompt_set(20, split="wide")
    captions = [p["caption"] for p in validation], [p["caption"] for p in wide]
    for prompts in (validation, wide):
        for c in shapes.CATEGORIES:
            kind = [p["caption"] for p in prompts if p["category"] == c]
            assert len(kind) == len(set(kind))
    assert not benchmark & set(captions[0])
    assert not (benchmark | set(captions[0])) & set(captions[1])
    for c in ("two_object", "counting", "position", "color_attr"):
        assert sum(p["category"] == c for p in validation) == 20
    # 18 single-object captions, 15 of them the benchmark's: validation takes the rest, wide none
    assert sum(p["category"] == "single_object" for p in validation) == 3
    assert not any(p["category"] in ("single_object", "colors") for p in wide)
    assert all(p["prompt"] == p["caption"] for p in validation)
    # wide asks in the training wordings: a caption the dataset pairs with the same scene kind
    assert sum(p["prompt"] != p["caption"] for p in wide) > len(wide) // 2
    for p in wide:  # the wording asks for the same objects and relation as the caption
        core = next(p["prompt"][len(a):len(p["prompt"]) - len(b)]
                    for a, b in (t.split("{}") for t in shapes.TEMPLATES[::-1])
                    if p["prompt"].startswith(a) and p["prompt"].endswith(b))
        for n, word in shapes.NUMBERS.items():
            core = core.replace(f"{n} ", f"{word} ")
        asked, scored = shapes.parse_caption(core), shapes.parse_caption(p["caption"])
        assert sorted(asked["objects"]) == sorted(scored["objects"])
        if scored["relation"]:
            same = asked["objects"] == scored["objects"]
            inverse = shapes.INVERSE[scored["relation"]]
            assert asked["relation"] == (scored["relation"] if same else inverse)
    assert shapes.evaluate(wide, shapes.ground_truth(wide, SIZE))["overall"] == 1.0
    with pytest.raises(ValueError, match="prompt set"):
        shapes.prompt_set(split="test")
    with pytest.raises(ValueError, match="20 prompts per category"):
        shapes.prompt_set(21, split="validation")  # beyond it, captions RL may draw
    assert shapes.prompt_set(split="validation") == validation  # its size is the default
    # DRAWABLE: the categories with captions outside held_out()
    rng, taken = np.random.default_rng(0), shapes.held_out()
    drawable = {c for c in shapes.CATEGORIES for _ in range(200)
                if shapes.sample_scene(rng, c, lattice=0)[1] not in taken}
    assert drawable == set(shapes.DRAWABLE)


# ------------------------------------------------------------------------------ negative controls
def test_blank_image_fails_every_prompt():
    prompts = shapes.prompt_set(3)
    blank = Image.new("RGB", (SIZE, SIZE), (245, 245, 245))
    result = shapes.evaluate(prompts, [[blank] for _ in prompts])
    assert result["overall"] == 0.0 and not any(accuracies(result).values())


def test_wrong_colours_fail_and_swapped_colours_fail_the_binding():
    prompts = shapes.prompt_set(4)
    colors = list(shapes.PALETTE)
    shift = {c: colors[(i + 1) % len(colors)] for i, c in enumerate(colors)}
    wrong = [[shapes.render_shapes([dict(o, color=shift[o["color"]]) for o in p["spec"]], SIZE)]
             for p in prompts]
    # every canonical caption names its colours
    assert shapes.evaluate(prompts, wrong)["overall"] == 0.0
    attr = [p for p in prompts if p["category"] == "color_attr"]
    swapped = [[shapes.render_shapes([dict(a, color=b["color"]), dict(b, color=a["color"])], SIZE)]
               for a, b in (p["spec"] for p in attr)]
    assert shapes.evaluate(attr, swapped)["overall"] == 0.0


def test_opposite_positions_fail():
    prompts = [p for p in shapes.prompt_set(8) if p["category"] == "position"]
    images = shapes.ground_truth(prompts, SIZE)
    flipped = [dict(p, caption=p["caption"].replace(rel, shapes.INVERSE[rel])) for p in prompts
               for rel in [shapes.parse_caption(p["caption"])["relation"]]]
    assert shapes.evaluate(flipped, images)["overall"] == 0.0
    sideways = [(p, [imgs[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
                for p, imgs in zip(prompts, images)
                if shapes.parse_caption(p["caption"])["relation"] in ("to the left of",
                                                                      "to the right of")]
    assert sideways and shapes.evaluate(*zip(*sideways))["overall"] == 0.0


def test_counting_is_exact_and_extras_are_ignored_elsewhere():
    three = next(p for p in shapes.prompt_set() if p["caption"].startswith("three "))
    img = shapes.ground_truth([three], SIZE)[0]
    for word, ok in (("two", False), ("three", True), ("four", False)):
        prompt = dict(three, caption=three["caption"].replace("three", word))
        assert shapes.evaluate([prompt], [img])["overall"] == ok, word
    shape, color, _ = shapes.parse_caption(three["caption"])["objects"][0]
    # GenEval ignores what was not asked for: three objects still show "a(n) <color> <shape>"
    single = dict(category="single_object",
                  caption=f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}")
    assert shapes.evaluate([single], [img])["overall"] == 1.0


def test_evaluate_averages_images_per_category_then_categories():
    prompts = [p for p in shapes.prompt_set(2) if p["category"] in ("single_object", "counting")]
    truth, blank = shapes.ground_truth(prompts, 64), Image.new("RGB", (64, 64), (245, 245, 245))
    images = [[truth[0][0], blank], [truth[1][0]] * 2, [blank], [truth[3][0], blank, blank, blank]]
    result = shapes.evaluate(prompts, images)
    assert [r["accuracy"] for r in result["prompts"]] == [0.5, 1.0, 0.0, 0.25]
    assert result["categories"] == dict(single_object=dict(accuracy=0.75, images=4),
                                        counting=dict(accuracy=0.2, images=5))
    # the mean of the categories, not of the images
    assert result["overall"] == pytest.approx((0.75 + 0.2) / 2)
    verdict = result["prompts"][0]["images"][1]
    assert not verdict["correct"] and verdict["objects"] == [] and "found 0" in verdict["reason"]


def test_credit_is_the_share_of_parts_met_and_one_exactly_where_score_passes():
    caption = "a red circle below a blue square"  # parts: red circle, blue square, the relation
    requirement = shapes.parse_caption(caption)

    def drawn(top, bottom):  # (shape, colour) above and below
        spec = [dict(shape=s, color=c, center=[0.5, y], size=0.25)
                for (s, c), y in ((top, 0.25), (bottom, 0.75))]
        return shapes.detect(shapes.render_shapes(spec, 64))

    cases = {  # drawn: the share met
        (("square", "blue"), ("circle", "red")): 1.0,
        (("circle", "red"), ("square", "blue")): 2 / 3,  # both objects, the sides swapped
        (("circle", "blue"), ("circle", "red")): 1 / 3,  # the square drawn as a circle
        (("circle", "blue"), ("square", "red")): 0.0,  # the shapes swapped
    }
    for (top, bottom), share in cases.items():
        objects = drawn(top, bottom)
        assert shapes.credit(requirement, objects) == pytest.approx(share), (top, bottom)
        assert shapes.score(requirement, objects)[0] == (share == 1.0)
    # objects missing: their relation is not met either
    assert shapes.judge(requirement, [])[-1][0] is False

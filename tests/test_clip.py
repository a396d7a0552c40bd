"""clip.py against its references: transformers' CLIPModel, CLIPTokenizer and CLIPImageProcessor
in this environment; open_clip (models, HPSv2-style checkpoints, tokenizer with CLIP's real BPE
file) in the reference environment, through tests/openclip_reference.py.

    python -m pytest -q tests/test_clip.py

The open_clip tests skip when .venv-ref is missing (SIMPLEAR_REQUIRE_REF=1, set by .ci/run, makes
that a failure); SIMPLEAR_REF_PYTHON names another interpreter with open_clip.
"""
import gzip
import json
import os
import subprocess
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip

ROOT = Path(__file__).resolve().parent.parent
REF_PYTHON = os.environ.get("SIMPLEAR_REF_PYTHON", str(ROOT / ".venv-ref" / "bin" / "python"))
ATOL = 1e-4  # fp32 embeddings of the same weights, different kernels

STRINGS = [
    "a cat", "A PHOTO of a Dog", "  extra   spaces\tand\nnewlines  ", "café crème brûlée",
    "cafe\u0301 decomposed accents", "naïve Zoë señor Ærøskøbing ÀÉÎÕÜ", "emoji 🐱🐶 and 👩‍👩‍👧!",
    "punctuation!!! ?!... ,;: -- (brackets) [x] {y} #tag @user", "it's a dog's life, isn't it? "
    "we'll see, they've gone", "numbers 12345 and 3.14 and ½", "日本語のテキスト", "Привет мир",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;x&#39;", "&amp;amp; double-escaped &eacute;",
    "“curly” ‘quotes’ and ʼapostrophe", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ１２３　ｉｄｅｏｇｒａｐｈｉｃ",
    "ﬁne ﬂour ﬀ ŉ Ĳssel", "control\x00chars\x0b here\x7f", "<|endoftext|> spelled out", "",
    "a very long caption " + " ".join(f"word{i} and" for i in range(60)),
]


def learn_bpe(texts, n_merges):
    """Merges learnt the way CLIP's were (most frequent pair of symbols within a word, the last
    symbol carrying </w>), over the bytes of clip.clean(text)'s words."""
    byte = clip.bytes_to_unicode()
    words = Counter()
    for t in texts:
        for w in clip.clean(t).split():
            s = [byte[b] for b in w.encode()]
            words[tuple(s[:-1]) + (s[-1] + "</w>",)] += 1
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def write_bpe_gz(path, merges):
    """An open_clip-format merges file: a header line, then one merge per line. No newline at
    the end: open_clip would read the empty last line as a merge (CLIP's file is cut before)."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(["small_bpe.txt#version: 0.2", *(f"{a} {b}" for a, b in merges)]))


@pytest.fixture(scope="module")
def small_tok_dir(tmp_path_factory):
    """A 300-merge CLIP-format vocabulary (814 ids), as open_clip's .txt.gz and as Hugging Face's
    vocab.json + merges.txt."""
    d = tmp_path_factory.mktemp("small_tok")
    corpus = STRINGS * 3 + ["a photo of a cat sitting on a red chair", "two dogs in the snow"] * 5
    write_bpe_gz(d / "small_bpe.txt.gz", learn_bpe(corpus, 300))
    clip.Tokenizer.from_dir(d).save(d)
    return d


# --------------------------------------------------------------------------------------------
# transformers

def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # references start biases at 0 and norms at 1: make them count
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def hf_model(act, eos):
    from transformers import CLIPConfig, CLIPModel
    cfg = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, hidden_act=act,
                         eos_token_id=eos, bos_token_id=812, pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8, hidden_act=act),
        projection_dim=48)
    return randomize(CLIPModel(cfg).eval())


def hf_embeddings(model, pixels, ids):
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    return image, text


def text_ids(end_id, ends, other_end=None):
    """Rows of random ids with end_id at each end position and zero padding after it; other_end
    puts a second end_id after the first (transformers pools at the first)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 998, (len(ends), 77), generator=g)
    ids[ids == end_id] = 1
    for row, end in zip(ids, ends):
        row[end], row[end + 1:] = end_id, 0
        if other_end:
            row[min(end + other_end, 76)] = end_id
    return ids


@pytest.mark.parametrize("act,eos", [("gelu", 7), ("quick_gelu", 2)])
def test_hf_parity(tmp_path, small_tok_dir, act, eos):
    """Embeddings equal transformers' within 1e-4: eos_token_id 7 pools at the first 7 (a second
    one follows it), the legacy 2 at the largest id; both activations; logit_scale as stored."""
    ref = hf_model(act, eos)
    ref.save_pretrained(tmp_path)
    model = clip.load(tmp_path, tokenizer=small_tok_dir)
    assert model.args.act == act and model.args.eos_id == (None if eos == 2 else eos)
    pixels = torch.randn(3, 3, 32, 32)
    ids = text_ids(999 if eos == 2 else eos, [4, 30, 76], other_end=3 if eos == 7 else None)
    want_image, want_text = hf_embeddings(ref, pixels, ids)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), want_image, atol=ATOL, rtol=0)
        torch.testing.assert_close(model.encode_text(ids), want_text, atol=ATOL, rtol=0)
        cos = clip.similarity(model, pixels, ids)
    want = F.cosine_similarity(want_image, want_text)
    torch.testing.assert_close(cos, want, atol=ATOL, rtol=0)
    assert model.logit_scale.item() == ref.logit_scale.item()


def test_save_hf_round_trip(tmp_path, small_tok_dir):
    """save_hf writes what transformers loads with the same weights, and what load reads back;
    its vocab.json + merges.txt give CLIPTokenizer and our Tokenizer the same ids."""
    from transformers import CLIPModel, CLIPTokenizer
    ref = hf_model("gelu", 2)
    ref.save_pretrained(tmp_path / "a")
    model = clip.load(tmp_path / "a", tokenizer=small_tok_dir)
    clip.save_hf(model, tmp_path / "b")
    again = CLIPModel.from_pretrained(tmp_path / "b").eval()
    for k, v in ref.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    ours = clip.load(tmp_path / "b")
    assert ours.tokenizer.vocab == model.tokenizer.vocab
    hf_tok = CLIPTokenizer.from_pretrained(tmp_path / "b")
    assert hf_tok("a photo of a cat")["input_ids"] == [
        ours.tokenizer.start, *ours.tokenizer.encode("a photo of a cat"), ours.tokenizer.end]


def hf_comparable(s):
    """Strings on which transformers' CLIPTokenizer (NFC, whitespace, lower case; no ftfy, no
    HTML unescaping; <|endoftext|> spelled in a caption is its special token) and open_clip's
    cleaning agree."""
    return ("<|" not in s
            and clip.clean(s) == " ".join(unicodedata.normalize("NFC", s).split()).lower())


def assert_same_ids(ours: torch.Tensor, hf_ids: list[list[int]]):
    for row, want in zip(ours.tolist(), hf_ids):
        assert row[:len(want)] == want and not any(row[len(want):])


def test_tokenizer_vs_transformers(small_tok_dir):
    """Our ids equal CLIPTokenizer's (truncated to 77) on the strings where the two cleanings
    agree; the formats (tokenizer.json, vocab.json + merges.txt, .txt.gz) give one tokenizer."""
    from transformers import CLIPTokenizer
    hf_tok = CLIPTokenizer.from_pretrained(small_tok_dir)
    ours = clip.Tokenizer.from_dir(small_tok_dir)  # vocab.json + merges.txt
    texts = [s for s in STRINGS if hf_comparable(s)]
    assert len(texts) >= 12
    ids = ours(texts)
    assert ids.shape == (len(texts), 77) and ids.dtype == torch.long
    assert_same_ids(ids, hf_tok(texts, truncation=True, max_length=77)["input_ids"])
    assert ids[-1, -1] == ours.end and ids[-1, 0] == ours.start  # the long caption, truncated
    hf_tok.save_pretrained(small_tok_dir / "json")  # tokenizer.json
    from_json = clip.Tokenizer.from_dir(small_tok_dir / "json")
    from_gz = clip.Tokenizer.from_dir(small_tok_dir / "small_bpe.txt.gz")
    assert torch.equal(from_json(STRINGS), ours(STRINGS))
    assert torch.equal(from_gz(STRINGS), ours(STRINGS))


# --------------------------------------------------------------------------------------------
# open_clip, in the reference environment

@pytest.fixture(scope="module")
def ref(tmp_path_factory, small_tok_dir):
    if not os.path.isfile(REF_PYTHON):
        msg = (f"no open_clip reference environment ({REF_PYTHON} is missing): `python3 -m venv "
               ".venv-ref && .venv-ref/bin/python -m pip install torch==2.14.1 "
               "torchvision==0.29.1 open-clip-torch` (.ci/run does this), or set "
               "SIMPLEAR_REF_PYTHON")
        if os.environ.get("SIMPLEAR_REQUIRE_REF") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    out = tmp_path_factory.mktemp("open_clip")
    (out / "strings.json").write_text(json.dumps(STRINGS), encoding="utf-8")
    (out / "small_bpe.txt.gz").write_bytes((small_tok_dir / "small_bpe.txt.gz").read_bytes())
    proc = subprocess.run([REF_PYTHON, str(ROOT / "tests" / "openclip_reference.py"), "fixtures",
                           str(out)], capture_output=True, text=True, timeout=300)
    if proc.returncode:
        pytest.fail(f"tests/openclip_reference.py failed: {proc.stderr[-2000:]}")
    return out


@pytest.mark.parametrize("name,source", [
    ("gelu", "gelu"),                       # directory, .bin, architecture from the shapes
    ("quick_gelu", "quick_gelu"),           # directory with open_clip_config.json
    ("gelu", "gelu.safetensors"),           # a file
    ("gelu", "hpsv2_gelu.pt"),              # {"state_dict": {"module.…"}}
    ("quick_gelu", "hpsv2_quick_gelu.pt"),  # … with the directory's open_clip_config.json
])
def test_open_clip_parity(ref, name, source):
    want = torch.load(ref / f"{name}_outputs.pt", weights_only=True)
    path = ref / source
    if source.startswith("hpsv2_quick"):  # HPSv2's file beside its config, as a hub repo holds it
        path = ref / name / source
        path.write_bytes((ref / source).read_bytes())
    model = clip.load(path, tokenizer=ref)
    assert model.args.act == name
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(want["pixels"]), want["image"], atol=ATOL,
                                   rtol=0)
        torch.testing.assert_close(model.encode_text(want["ids"]), want["text"], atol=ATOL,
                                   rtol=0)
    assert model.logit_scale.item() == want["logit_scale"].item()


def test_tokenizer_vs_open_clip(ref):
    """Ids equal open_clip's SimpleTokenizer's on every string (ftfy, HTML entities, unicode,
    truncation), with CLIP's real BPE file and with the small one; and, with the real file,
    transformers' CLIPTokenizer's where the cleanings agree."""
    from transformers import CLIPTokenizer
    want = json.loads((ref / "ids.json").read_text())["ids"]
    real = clip.Tokenizer.from_dir(ref / "bpe_simple_vocab_16e6.txt.gz")
    assert (real.start, real.end, len(real.vocab)) == (49406, 49407, 49408)
    assert real(STRINGS).tolist() == want["real"]
    small = clip.Tokenizer.from_dir(ref / "small_bpe.txt.gz")
    assert small(STRINGS).tolist() == want["small"]
    real.save(ref)
    hf_tok = CLIPTokenizer.from_pretrained(ref)
    texts = [s for s in STRINGS if hf_comparable(s)]
    assert_same_ids(real(texts), hf_tok(texts, truncation=True, max_length=77)["input_ids"])


# --------------------------------------------------------------------------------------------
# Bad input: one clear error each

def tiny_hf_dir(path):
    hf_model("gelu", 2).save_pretrained(path)
    return path


def test_bad_input(tmp_path, small_tok_dir):
    from safetensors.torch import load_file, save_file
    with pytest.raises(FileNotFoundError, match="not found"):
        clip.load(tmp_path / "nope")
    good = tiny_hf_dir(tmp_path / "good")
    with pytest.raises(ValueError, match="no CLIP tokenizer in .*give a tokenizer directory"):
        clip.load(good)
    # a truncated safetensors file
    bad = tmp_path / "trunc"
    bad.mkdir()
    (bad / "config.json").write_bytes((good / "config.json").read_bytes())
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"cannot read {bad}/model.safetensors"):
        clip.load(bad, tokenizer=small_tok_dir)
    # a truncated .bin (open_clip)
    sd = load_file(good / "model.safetensors")
    torch.save(clip.export_state(clip.load(good, tokenizer=small_tok_dir), "open_clip"),
               tmp_path / "oc.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "oc.bin").read_bytes()[:3000])
    with pytest.raises(ValueError, match=f"cannot read {tmp_path}/cut.bin"):
        clip.load(tmp_path / "cut.bin", tokenizer=small_tok_dir)
    # not a state dict / not CLIP's
    torch.save({"w": [1, 2]}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        clip.load(tmp_path / "junk.pt", tokenizer=small_tok_dir)
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an open_clip CLIP state dict"):
        clip.load(tmp_path / "other.pt", tokenizer=small_tok_dir)
    # another model's config.json (the LM's)
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="model_type is 'qwen2', expected 'clip'"):
        clip.load(qwen)
    (qwen / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        clip.load(qwen)
    # a wrong shape, a missing and an unexpected key: named, with the shapes
    for change, message in [
            (lambda s: s.update({"logit_scale": torch.zeros(2)}),
             r"logit_scale has shape \(2,\), expected \(\)"),
            (lambda s: s.pop("text_projection.weight"),
             r"missing key text_projection.weight \(expected shape \(48, 64\)\)"),
            (lambda s: s.update({"extra.weight": torch.zeros(3)}),
             r"unexpected key extra.weight \(shape \(3,\)\)")]:
        d = tmp_path / f"edit{len(message)}"
        d.mkdir()
        (d / "config.json").write_bytes((good / "config.json").read_bytes())
        edited = dict(sd)
        change(edited)
        save_file(edited, d / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            clip.load(d, tokenizer=small_tok_dir)
    # an open_clip file whose config disagrees with its shapes
    (tmp_path / "cfg").mkdir()
    torch.save(torch.load(tmp_path / "oc.bin"), tmp_path / "cfg" / "open_clip_pytorch_model.bin")
    cfg = {"embed_dim": 48, "vision_cfg": {"width": 64, "layers": 2, "patch_size": 8,
                                           "image_size": 32, "head_width": 32},
           "text_cfg": {"width": 64, "heads": 4, "layers": 2, "vocab_size": 1000}}
    (tmp_path / "cfg" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with pytest.raises(ValueError, match=r"visual.transformer.resblocks.0.mlp.c_fc.weight has "
                       r"shape \(128, 64\), expected \(256, 64\)"):
        clip.load(tmp_path / "cfg", tokenizer=small_tok_dir)
    cfg["vision_cfg"]["timm_model_name"] = "vit_base"
    (tmp_path / "cfg" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with pytest.raises(ValueError, match="timm_model_name='vit_base' is not supported"):
        clip.load(tmp_path / "cfg", tokenizer=small_tok_dir)
    with pytest.raises(FileNotFoundError, match="no CLIP weights"):
        clip.load(small_tok_dir)
    with pytest.raises(ValueError, match="pixels must be"):
        clip.load(good, tokenizer=small_tok_dir).encode_image(torch.zeros(1, 3, 224, 224))


# --------------------------------------------------------------------------------------------
# Preprocessing

def test_preprocess_reference():
    """Equal to transformers' CLIPImageProcessor (PIL backend) within 1e-5 — the same PIL bicubic
    resize on the uint8 image, the same crop; only float rounding differs — for odd sizes,
    portrait and landscape, up- and down-scaling, grey and RGBA images; arrays equal images."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    proc = CLIPImageProcessorPil()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
              for h, w in [(300, 227), (517, 223), (224, 224), (99, 101), (1000, 333)]]
    images = [Image.fromarray(a) for a in arrays]
    images += [images[0].convert("L"), images[1].convert("RGBA")]
    want = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    got = clip.preprocess(images)
    assert got.shape == (7, 3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(clip.preprocess(arrays), got[:5], atol=0, rtol=0)
    assert clip.preprocess(images[0], size=32).shape == (1, 3, 32, 32)


def test_preprocess_simplear():
    """SimpleAR's reward preprocessing: a bilinear resize with half-pixel centres and no
    antialiasing, spelled out here with numpy, then [-1, 1] -> [0, 1] and CLIP's statistics."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 48, generator=g) * 2.2 - 1.1  # a decoder overshoots [-1, 1]
    got = clip.preprocess(x, "simplear")
    assert got.shape == (2, 3, 224, 224) and got.dtype == torch.float32

    def axis(n_in, n_out):  # source index pairs and weights: align_corners=False
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    (y0, y1, wy), (x0, x1, wx) = axis(64, 224), axis(48, 224)
    a = x.double().numpy()
    rows = a[:, :, y0] * (1 - wy)[:, None] + a[:, :, y1] * wy[:, None]
    resized = rows[..., x0] * (1 - wx) + rows[..., x1] * wx
    unit = np.clip(resized * 0.5 + 0.5, 0, 1)
    mean, std = np.array(clip.MEAN)[:, None, None], np.array(clip.STD)[:, None, None]
    want = torch.from_numpy((unit - mean) / std).float()
    # float32 interpolation against float64, divided by std ~0.26: a few 1e-5 at most
    torch.testing.assert_close(got, want, atol=5e-5, rtol=0)
    with pytest.raises(ValueError, match="simplear mode takes"):
        clip.preprocess([Image.new("RGB", (8, 8))], "simplear")
    with pytest.raises(ValueError, match="mode must be"):
        clip.preprocess(x, "bicubic")


def test_presets_and_cli(tmp_path, small_tok_dir, capsys):
    """The presets build with the sizes they name; the command line prints one score per
    (image, caption) pair and turns bad input into one line, exit 2."""
    with torch.device("meta"):
        h = clip.CLIP(clip.CLIPArgs.from_name("vit-h-14"))
        big = clip.CLIP(clip.CLIPArgs.from_name("vit-l-14"))
    assert 986e6 < sum(p.numel() for p in h.parameters()) < 987e6  # open_clip's ViT-H-14
    assert 427e6 < sum(p.numel() for p in big.parameters()) < 428e6  # OpenAI's ViT-L/14
    with pytest.raises(ValueError, match="unknown CLIP config"):
        clip.CLIPArgs.from_name("vit-z")
    good = tiny_hf_dir(tmp_path / "m")
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    clip.main(["--ckpt", str(good), "--tokenizer", str(small_tok_dir), "--image",
               str(tmp_path / "a.png"), "--text", "a red square", "a cat", "--dtype", "float32"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(-1 <= float(ln.split("\t")[0]) <= 1 for ln in lines)
    with pytest.raises(SystemExit) as e:
        clip.main(["--ckpt", str(good), "--image", str(tmp_path / "a.png"), "--text", "x"])
    assert e.value.code == 2
    assert "clip.py: error: no CLIP tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_cpu_attention(causal):
    """The bf16 CPU path (matmuls and a softmax instead of SDPA's flash kernel) is attention: it
    equals float32 SDPA on the same weights within bf16's rounding."""
    torch.manual_seed(0)
    attn = clip.Attention(64, 4)
    x = torch.randn(2, 77, 64)
    with torch.no_grad():
        want = attn(x, causal)
        got = attn.to(torch.bfloat16)(x.bfloat16(), causal).float()
    assert (got - want).abs().max() < 0.02 * want.abs().max()

"""Tests of data.py: python -m pytest -q tests/test_data.py (CPU, a few seconds)."""
import codecs
import json
import os
import re
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import data  # noqa: E402
import shapes  # noqa: E402

CORPUS = [shapes.ShapesDataset(60, 16, seed=1)[i]["caption"] for i in range(60)]
CORPUS += data.STYLE_PREFIXES + [
    data.NEGATIVE_PROMPT,
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 3.14 apples!"]
STRINGS = ["<|t2i|>A highly realistic image of a red circle<|soi|>", data.build_negative_prompt(),
           "three blue squares", "it's   a  test\n\nwith\ttabs and 12345 digits",
           "café naïve e\u0301 東京 — ñ", "<|im_start|>user\nhi<|im_end|><|endoftext|>",
           "<|t2i|><|soi|>", " leading and trailing  ", ""]
BOM = codecs.BOM_UTF8


def with_bom(src, dst):
    """Copy the file src to dst with a UTF-8 byte-order mark in front."""
    dst.write_bytes(BOM + src.read_bytes())


# ---------------------------------------------------------------------------------- text side
@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    """A tiny Qwen2-style tokenizer saved the ways a Qwen2 checkpoint can be: tokenizer.json (fast
    save), vocab.json + merges.txt with tokenizer_config.json's added_tokens_decoder, and with
    added_tokens.json."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("qwen")
    bpe = Tokenizer(models.BPE())
    split = pre_tokenizers.Split(Regex(data.QWEN2_SPLIT), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    os.makedirs(root / "slow")
    # vocab.json + merges.txt, the special tokens not in the vocabulary (as Qwen2.5)
    bpe.model.save(str(root / "slow"))
    # adds <|endoftext|> after the vocabulary
    hf = transformers.Qwen2TokenizerFast.from_pretrained(str(root / "slow"))
    hf.add_tokens(["<|im_start|>", "<|im_end|>", *data.SPECIAL_TOKENS], special_tokens=True)
    hf.save_pretrained(str(root / "fast"))
    assert os.path.isfile(root / "fast" / "tokenizer.json")
    decoder = {str(i): dict(content=t.content, lstrip=t.lstrip, rstrip=t.rstrip,
                            normalized=t.normalized, single_word=t.single_word, special=t.special)
               for i, t in hf.added_tokens_decoder.items()}
    config = json.dumps(dict(added_tokens_decoder=decoder))
    (root / "slow" / "tokenizer_config.json").write_text(config)
    os.makedirs(root / "slow_added")
    for name in ("vocab.json", "merges.txt"):
        (root / "slow_added" / name).write_bytes((root / "slow" / name).read_bytes())
    added = json.dumps({t.content: i for i, t in hf.added_tokens_decoder.items()})
    (root / "slow_added" / "added_tokens.json").write_text(added)
    return hf, root


def test_tokenizer_files_agree_with_transformers(qwen_dirs):
    hf, root = qwen_dirs
    expected = [hf(s)["input_ids"] for s in STRINGS]
    for d in ("fast", "slow", "slow_added"):
        tok = data.load_text_tokenizer(root / d)
        assert len(tok.get_vocab()) == len(hf), d
        assert [tok.encode(s).ids for s in STRINGS] == expected, d  # no BOS, specials split out
        assert tok.decode(tok.encode(STRINGS[4]).ids) == hf.decode(hf(STRINGS[4])["input_ids"])
    ids = data.special_token_ids(tok)
    assert [ids[t] for t in data.SPECIAL_TOKENS] == hf.convert_tokens_to_ids(data.SPECIAL_TOKENS)
    assert data.pad_token_id(tok) == hf.convert_tokens_to_ids("<|endoftext|>")
    assert data.encode_prompts(tok, ["a red circle"]) == [hf(STRINGS[0])["input_ids"]]
    assert data.encode_negative(tok) == hf(data.build_negative_prompt())["input_ids"]


def test_tokenizer_files_with_a_byte_order_mark(qwen_dirs, tmp_path):
    """Every tokenizer file of each layout saved with a BOM loads to the same tokenizer."""
    _, root = qwen_dirs
    for d in ("fast", "slow", "slow_added"):
        (tmp_path / d).mkdir()
        for f in (root / d).iterdir():
            with_bom(f, tmp_path / d / f.name)
        assert (tmp_path / d / "tokenizer.json").is_file() == (d == "fast")
        plain = data.load_text_tokenizer(root / d)
        bom = data.load_text_tokenizer(tmp_path / d)
        assert bom.get_vocab() == plain.get_vocab(), d
        assert [bom.encode(s).ids for s in STRINGS] == [plain.encode(s).ids for s in STRINGS], d
    (tmp_path / "slow" / "merges.txt").write_text("#version: 0.2\nnot a merge\n")
    with pytest.raises(ValueError, match="merges.txt: line 2"):
        data.load_text_tokenizer(tmp_path / "slow")
    (tmp_path / "fast" / "tokenizer.json").write_bytes(BOM + b"{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        data.load_text_tokenizer(tmp_path / "fast")


def test_tokenizer_errors(qwen_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data.load_text_tokenizer(tmp_path)
    _, root = qwen_dirs
    bare = data.load_text_tokenizer(root / "fast")
    bare = Tokenizer.from_str(bare.to_str().replace("<|soi|>", "<|xyz|>"))
    with pytest.raises(ValueError, match="soi"):
        data.special_token_ids(bare)
    (tmp_path / "slow").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "slow" / name).write_bytes((root / "slow" / name).read_bytes())
    gap = json.dumps({"<|endoftext|>": 10_000})
    (tmp_path / "slow" / "added_tokens.json").write_text(gap)
    with pytest.raises(ValueError, match="endoftext"):
        data.load_text_tokenizer(tmp_path / "slow")
    tok = data.load_text_tokenizer(root / "slow_added")
    n = tok.get_vocab_size()
    # Qwen2.5-Instruct: SimpleAR's tokens still to add
    (tmp_path / "slow" / "added_tokens.json").write_text("{}")
    tok = data.load_text_tokenizer(tmp_path / "slow", add_special_tokens=True)
    assert sorted(data.special_token_ids(tok).values()) == list(range(n - 10, n - 3))


def test_templates_and_constants():
    assert len(data.STYLE_PREFIXES) == 20 == len(set(data.STYLE_PREFIXES))
    assert data.PROMPT_PREFIX in data.STYLE_PREFIXES
    assert all(p.endswith(" ") for p in data.STYLE_PREFIXES)
    assert data.build_prompt("a cat") == "<|t2i|>A highly realistic image of a cat<|soi|>"
    assert data.build_prompt("a cat", prefix="") == "<|t2i|>a cat<|soi|>"
    assert data.build_negative_prompt("bad") == "<|t2i|>bad<|soi|>"
    assert data.build_negative_prompt().startswith("<|t2i|>An image of aerial view, overexposed")


def test_image_id_mapping():
    assert data.first_image_id(215672, 64000) == 151672
    assert data.first_image_id(215672, 64000, n_text_tokens=151672) == 151672
    for args in [(100, 100, None), (100, 0, None)]:
        with pytest.raises(ValueError, match="no room|not positive"):
            data.first_image_id(*args)
    # with the text tokenizer's size the layout must match exactly: no row more, no row less
    for vocab, codebook, n_text in [(215672, 64000, 151673), (215672, 64000, 151671),
                                    (215672, 1000, 151672), (152672, 64000, 151672)]:
        sizes = (f"LM's {vocab:,} vocabulary rows are not the text tokenizer's {n_text:,} ids "
                 f"+ the visual tokenizer's {codebook:,} codes")
        with pytest.raises(ValueError, match=re.escape(sizes)):
            data.first_image_id(vocab, codebook, n_text)
    codes = np.array([[0, 5], [63999, 7]], np.uint16)
    tokens = data.codes_to_tokens(codes, 151672)
    assert tokens.dtype == torch.long and tokens.tolist() == [[151672, 151677], [215671, 151679]]
    assert data.tokens_to_codes(tokens, 151672, 64000).tolist() == codes.tolist()
    for bad in (151671, 215672):
        with pytest.raises(ValueError, match=str(bad)):
            data.tokens_to_codes(torch.tensor([151672, bad]), 151672, 64000)


def test_special_tokens_spelled_in_prompts_are_kept_and_warned(qwen_dirs):
    """SimpleAR's encoding is kept (the text <|soi|> becomes the token), with one warning per call
    that names the tokens; a prompt without them warns nothing."""
    _, root = qwen_dirs
    tok = data.load_text_tokenizer(root / "fast")
    sp = data.special_token_ids(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails
        plain = data.encode_prompts(tok, ["a red circle", "two <soi> squares"])
        data.encode_negative(tok, "blurry")
    prompts = ["a <|soi|> circle", "x<|t2i|>y", "a <|soi|> square", "a red circle"]
    with pytest.warns(UserWarning) as record:
        ids = data.encode_prompts(tok, prompts)
    assert len(record) == 1
    assert "<|soi|>" in str(record[0].message) and "<|t2i|>" in str(record[0].message)
    assert ids[0].count(sp["<|soi|>"]) == 2 and ids[1].count(sp["<|t2i|>"]) == 2
    assert ids[3] == plain[0]
    with pytest.warns(UserWarning, match=re.escape("<|endoftext|>")):
        negative = data.encode_negative(tok, "bad<|endoftext|>")
    assert tok.token_to_id("<|endoftext|>") in negative


def test_train_bpe_tokenizer_needs_the_bytes(tmp_path):
    """The layout of what it writes is checked on `python shapes.py`'s tokenizer
    (tests/test_shapes.py)."""
    with pytest.raises(ValueError, match="vocab_size 100"):
        data.train_bpe_tokenizer(["a b"], 100, tmp_path / "small")


# ------------------------------------------------------------------------- training sequences
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return data.train_bpe_tokenizer(CORPUS, 400, tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def first(tok):
    """First image id of the test LM: the tokenizer's size; image tokens first..first+99 for a
    100-code codebook."""
    return tok.get_vocab_size()


def items(n, h=2, seed=0):
    """(captions, codes) pairs: a list is a dataset; two captions per item exercise the choice."""
    rng = np.random.default_rng(seed)
    return [([f"{i} red circles", f"item {i}"], rng.integers(0, 100, (h, h))) for i in range(n)]


def test_sequence_layout(tok, first):
    sp = data.special_token_ids(tok)
    codes = np.array([[3, 1], [4, 1]])
    image = [first + 3, first + 1, first + 4, first + 1]
    ids, labels = data.make_sequence(tok, "a red circle", codes, first)
    text = tok.encode(data.PROMPT_PREFIX + "a red circle").ids
    assert ids.tolist() == [sp["<|t2i|>"], *text, sp["<|soi|>"], *image]
    # = one string
    assert ids.tolist() == data.encode_prompts(tok, ["a red circle"])[0] + image
    assert labels.tolist() == ids.tolist()  # loss on every token, text included
    ids, labels = data.make_sequence(tok, "a red circle", codes, first,
                                     prefix="A cinematic view of ", drop=True)
    assert ids.tolist() == labels.tolist() == [sp["<|t2i|>"], sp["<|soi|>"], *image]
    ids, labels = data.make_sequence(tok, "a red circle", codes, first, text_loss=False)
    assert (labels[:-4] == -100).all() and labels[-4:].tolist() == image


def test_sequence_layout_must_match_the_tokenizer(tok, first):
    """Image ids start right after the text ids; codes outside the LM's codebook are refused."""
    codes = np.array([[3, 1], [4, 99]])
    for wrong in (first - 1, first + 1):
        with pytest.raises(ValueError, match=f"first image id {wrong:,} is not the text"):
            data.make_sequence(tok, "a red circle", codes, wrong)
        with pytest.raises(ValueError, match="not the text tokenizer's size"):
            data.T2IBatches(items(8), tok, wrong, 4)
    assert len(data.make_sequence(tok, "x", codes, first, codebook_size=100)[0]) > 4
    with pytest.raises(ValueError, match="codes 1..99 are outside the codebook's 0..63"):
        data.make_sequence(tok, "x", codes, first, codebook_size=64)
    loader = data.T2IBatches(items(8), tok, first, 4, codebook_size=64)
    with pytest.raises(ValueError, match="outside the codebook"):
        next(iter(loader))
    dataset = type("Recorded", (list,), dict(codebook_size=1000))(items(8))  # as a CodeDataset
    with pytest.raises(ValueError, match="1,000-code visual tokenizer, the LM has 64 code rows"):
        data.T2IBatches(dataset, tok, first, 4, codebook_size=64)
    assert data.T2IBatches(dataset, tok, first, 4, codebook_size=1000).codebook_size == 1000


def test_truncation_cuts_the_caption_only(tok, first):
    codes = np.arange(16).reshape(4, 4)
    caption = "a red circle and a blue square and a green triangle"
    full, _ = data.make_sequence(tok, caption, codes, first)
    n_prefix = len(tok.encode(data.PROMPT_PREFIX).ids)
    for max_len in (len(full), len(full) - 3, 2 + n_prefix + 16):
        ids, labels = data.make_sequence(tok, caption, codes, first, max_len=max_len)
        assert len(ids) == max_len and ids[:max_len - 17].tolist() == full[:max_len - 17].tolist()
        # <|soi|> and every code
        assert ids[-17:].tolist() == [full[-17].item()] + list(range(first, first + 16))
    with pytest.raises(ValueError, match="prefix"):
        data.make_sequence(tok, "a red circle", codes, first, max_len=2 + n_prefix + 15)
    dropped = data.make_sequence(tok, "a red circle", codes, first, drop=True, max_len=18)
    assert len(dropped[0]) == 18
    with pytest.raises(ValueError, match="16 image tokens"):
        data.make_sequence(tok, "a red circle", codes, first, drop=True, max_len=17)


def unpadded(batch):
    return [ids[m].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]


def test_batches_padding_and_masks(tok, first):
    loader = data.T2IBatches(items(8), tok, first, 4, p_drop_cond=0.5, seed=3)
    batch = next(iter(loader))
    ids = batch["input_ids"]
    labels = batch["labels"]
    mask = batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    assert ids.dtype == labels.dtype == torch.long and mask.dtype == torch.bool
    lengths = mask.sum(1)
    assert lengths.max() == ids.shape[1] and lengths.min() < ids.shape[1]  # right-padded
    assert (mask == (torch.arange(ids.shape[1]) < lengths[:, None])).all()
    assert (ids[~mask] == tok.token_to_id("<|endoftext|>")).all() and (labels[~mask] == -100).all()
    assert (labels[mask] == ids[mask]).all()
    assert ((ids[mask] >= first).sum(0) == 4 * 4).all()  # every sample keeps its 4 image tokens
    masked = next(iter(data.T2IBatches(items(8), tok, first, 4, seed=3, text_loss=False)))
    image_labels = masked["labels"] >= first
    assert (image_labels | (masked["labels"] == -100)).all() and image_labels.sum() == 16


def test_dropout_rate_prefix_and_caption_choice(tok, first):
    n = 4000
    soi = tok.token_to_id("<|soi|>")
    dataset = [("x", np.zeros((1, 1), int))] * n
    loader = data.T2IBatches(dataset, tok, first, 500, seed=0, shuffle=False)
    it = iter(loader)
    seqs = [s for _ in range(n // 500) for s in unpadded(next(it))]
    dropped = sum(s[1] == soi for s in seqs)
    assert abs(dropped - 0.1 * n) < 4 * (n * 0.1 * 0.9) ** 0.5
    prefixes = {tok.decode(s[1:-2]) for s in seqs if s[1] != soi}
    assert prefixes == {p + "x" for p in data.STYLE_PREFIXES}  # all 20 drawn
    fixed = data.T2IBatches(items(8), tok, first, 8, prefixes=[""], p_drop_cond=0.0)
    captions = {tok.decode(s[1:-5]) for s in unpadded(next(iter(fixed)))}
    assert len(captions) == 8 and captions <= {c for caps, _ in items(8) for c in caps}
    assert any(c.startswith("item") for c in captions)
    assert any(c.endswith("circles") for c in captions)


def test_shuffle_is_deterministic_and_two_ranks_equal_one(tok, first):
    ds = items(21)  # 21 = 5 global batches of 4 + a dropped tail of 1
    one = data.T2IBatches(ds, tok, first, 4, seed=7)
    ranks = [data.T2IBatches(ds, tok, first, 2, seed=7, rank=r, world_size=2) for r in range(2)]
    assert one.steps_per_epoch == ranks[0].steps_per_epoch == 5
    it1 = iter(one)
    its = [iter(r) for r in ranks]
    seen = []
    for step in range(10):  # two epochs
        global_batch = unpadded(next(it1))
        parts = [unpadded(next(it)) for it in its]
        # rank r's slice of the same global batch, same sequences
        assert parts[0] + parts[1] == global_batch
        seen += [tuple(s[-4:]) for s in global_batch]  # the codes identify the item
    epoch1 = seen[:20]
    epoch2 = seen[20:]
    # no duplicates, reshuffled per epoch
    assert len(set(epoch1)) == 20 == len(set(epoch2)) and epoch1 != epoch2
    again = iter(data.T2IBatches(ds, tok, first, 4, seed=7))
    assert [tuple(s[-4:]) for _ in range(5) for s in unpadded(next(again))] == epoch1
    assert list(data.T2IBatches(ds, tok, first, 4, seed=8).order(0)) != list(one.order(0))
    with pytest.raises(ValueError, match="smaller than one global batch"):
        data.T2IBatches(items(3), tok, first, 2, world_size=2)
    with pytest.raises(ValueError, match="batch_size 0"):
        data.T2IBatches(items(3), tok, first, 0)


def test_state_dict_resumes_identically(tok, first):
    ds = items(10)
    loader = data.T2IBatches(ds, tok, first, 3, seed=1, p_drop_cond=0.3)
    it = iter(loader)
    for _ in range(4):  # into the second epoch (3 steps per epoch)
        next(it)
    # plain data: goes into a checkpoint as is
    state = json.loads(json.dumps(loader.state_dict()))
    assert state == dict(epoch=1, position=3, seed=1, n=10)
    expected = [next(it) for _ in range(5)]
    assert (loader.epoch, loader.position) == (2, 9)
    assert not torch.equal(expected[0]["input_ids"], expected[1]["input_ids"])
    resumed = data.T2IBatches(ds, tok, first, 3, seed=1, p_drop_cond=0.3)
    resumed.load_state_dict(state)
    for want, got in zip(expected, iter(resumed)):
        assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(ValueError, match="seed"):
        data.T2IBatches(ds, tok, first, 3, seed=2).load_state_dict(state)


# -------------------------------------------------------------------------------- code shards
class FakeVQ:
    """Stand-in for CosmosTokenizer: code = mean grey level of each 16x16 patch, in 11 steps."""
    spatial_compression = 16
    codebook_size = 64000

    def encode(self, x):
        return ((F.avg_pool2d(x.mean(1, keepdim=True), 16)[:, 0] + 1) * 5).round().long()


def _fallback_pil_to_tensor(img, size):  # only if cosmos_tokenizer.pil_to_tensor is not written yet
    rgb = img.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1)
    return x.float() / 127.5 - 1


@pytest.fixture
def pil_to_tensor(monkeypatch):
    try:
        from cosmos_tokenizer import pil_to_tensor  # noqa: F401
    except ImportError:
        fallback = types.SimpleNamespace(pil_to_tensor=_fallback_pil_to_tensor)
        monkeypatch.setitem(sys.modules, "cosmos_tokenizer", fallback)


def good_records(root, n):
    """n records (grey level 51*(i % 6) -> code 2*(i % 6)) of images in folder images/."""
    os.makedirs(root / "images", exist_ok=True)
    records = []
    for i in range(n):
        Image.new("RGB", (32, 32), (51 * (i % 6),) * 3).save(root / "images" / f"{i}.png")
        caption = f"grey {i}" if i % 2 else [f"grey {i}", f"g{i}"]
        records.append(dict(image=f"images/{i}.png", caption=caption))
    return records


def expected_captions(n):
    return [[f"grey {i}"] if i % 2 else [f"grey {i}", f"g{i}"] for i in range(n)]


def write_meta(root, n=7):
    """n good records, then a missing image, a record without caption, a non-text caption, an
    unparsable line and a broken image file."""
    lines = [json.dumps(r) for r in good_records(root, n)]
    (root / "images" / "broken.png").write_bytes(b"not a png")
    lines += [json.dumps(dict(image="images/nope.png", caption="missing")),
              json.dumps(dict(image="images/0.png")),
              json.dumps(dict(image="images/0.png", caption=[3])), "{not json",
              json.dumps(dict(image="images/broken.png", caption="x"))]
    (root / "meta.jsonl").write_text("\n".join(lines) + "\n")
    return root / "meta.jsonl"


def test_prepare_codes_shards_report_and_resume(tmp_path, pil_to_tensor, capsys):
    meta = write_meta(tmp_path)
    out = tmp_path / "codes"
    report = data.prepare_codes(meta, out, FakeVQ(), 32, shard_size=4, batch_size=3)
    assert report["shards"] == [0, 1, 2] and report["encoded"] == 7
    skipped = dict(missing_image=1, bad_record=2, caption_not_text=1, unreadable_image=1)
    assert report["skipped"] == skipped
    assert report["examples"]["missing_image"] == [7]
    assert report["examples"]["bad_record"] == [8, 10]
    assert json.loads((out / "report_rank0.json").read_text()) == report
    assert "skipped" in capsys.readouterr().out
    # every file under its final name: no temporary left over
    shard_files = [f"{kind}_{k:05d}.{ext}" for k in range(3)
                   for kind, ext in (("codes", "npy"), ("captions", "json"))]
    names = ["index.json", "prepare.json", "report_rank0.json", *shard_files]
    assert sorted(os.listdir(out)) == sorted(names)
    codes = np.load(out / "codes_00000.npy")
    assert codes.dtype == np.uint16 and codes.shape == (4, 2, 2)
    ds = data.CodeDataset(out)
    assert len(ds) == 7 and ds.index["grid"] == [2, 2] and ds.index["resolution"] == 32
    assert ds.codebook_size == 64000
    for i in range(7):
        captions, c = ds[i]
        assert captions == expected_captions(7)[i] and (c == 2 * (i % 6)).all()
    bpe = data.train_bpe_tokenizer(CORPUS, 300, tmp_path / "t")
    batch = next(iter(data.T2IBatches(ds, bpe, bpe.get_vocab_size(), 7, codebook_size=64000)))
    assert batch["input_ids"].shape[0] == 7
    assert (batch["input_ids"] >= bpe.get_vocab_size()).sum() == 7 * 4
    with pytest.raises(ValueError, match="64,000-code visual tokenizer, the LM has 1,000"):
        data.T2IBatches(ds, bpe, bpe.get_vocab_size(), 7, codebook_size=1000)
    stamped = ("codes_00000.npy", "codes_00002.npy", "captions_00002.json")
    stamps = {p: os.stat(out / p).st_mtime_ns for p in stamped}
    os.remove(out / "codes_00001.npy")
    report = data.prepare_codes(meta, out, FakeVQ(), 32, shard_size=4, batch_size=3)
    assert report["shards"] == [1] and report["encoded"] == 3
    assert report["skipped"] == dict(missing_image=1)
    assert stamps == {p: os.stat(out / p).st_mtime_ns for p in stamps}
    assert len(data.CodeDataset(out)) == 7
    with pytest.raises(ValueError, match="prepared with"):
        data.prepare_codes(meta, out, FakeVQ(), 48, shard_size=4)
    with pytest.raises(ValueError, match="resolution 40 .* 16"):
        data.prepare_codes(meta, tmp_path / "other", FakeVQ(), 40)
    for kw in (dict(batch_size=0), dict(shard_size=-1)):
        name, value = next(iter(kw.items()))
        with pytest.raises(ValueError, match=f"{name} {value} must be >= 1"):
            data.prepare_codes(meta, tmp_path / "other", FakeVQ(), 32, **kw)
    no_codebook = types.SimpleNamespace(spatial_compression=16, encode=FakeVQ().encode)
    with pytest.raises(ValueError, match="codebook_size"):
        data.prepare_codes(meta, tmp_path / "other", no_codebook, 32)


def test_prepare_codes_two_ranks(tmp_path, pil_to_tensor):
    meta = write_meta(tmp_path)
    out = tmp_path / "codes"
    r1 = data.prepare_codes(meta, out, FakeVQ(), 32, shard_size=2, rank=1, world_size=2)
    # waits for rank 0's shards
    assert r1["shards"] == [1, 3, 5] and not (out / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="index.json"):
        data.CodeDataset(out)
    r0 = data.prepare_codes(meta, out, FakeVQ(), 32, shard_size=2, rank=0, world_size=2)
    assert r0["shards"] == [0, 2, 4] and r0["encoded"] + r1["encoded"] == 7
    assert [c for c, _ in data.CodeDataset(out)] == expected_captions(7)


def test_meta_and_shard_files_with_a_byte_order_mark(tmp_path, pil_to_tensor):
    """A JSON list or JSONL meta, index.json and the captions saved with a BOM read the same: all
    records encoded, the first one kept."""
    records = good_records(tmp_path, 5)
    (tmp_path / "list.json").write_bytes(BOM + json.dumps(records, indent=1).encode())
    jsonl = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "lines.jsonl").write_bytes(BOM + jsonl.encode())
    for name in ("list.json", "lines.jsonl"):
        assert data.read_meta(tmp_path / name) == records
        out = tmp_path / f"codes_{name}"
        report = data.prepare_codes(tmp_path / name, out, FakeVQ(), 32, shard_size=3)
        assert report["encoded"] == 5 and report["skipped"] == {}
        assert [c for c, _ in data.CodeDataset(out)] == expected_captions(5)
    for name in ("index.json", "captions_00000.json", "captions_00001.json"):
        path = out / name
        path.write_bytes(BOM + path.read_bytes())
    ds = data.CodeDataset(out)
    assert [c for c, _ in ds] == expected_captions(5) and ds.codebook_size == 64000


def test_a_meta_without_usable_records_is_an_error(tmp_path, pil_to_tensor):
    """Not a run that encodes 0 images and exits 0."""
    (tmp_path / "meta.jsonl").write_text('{"img": "a.png", "text": "x"}\n{broken\n')
    with pytest.raises(ValueError, match="none of its 2 records has an image and a caption"):
        data.prepare_codes(tmp_path / "meta.jsonl", tmp_path / "codes", FakeVQ(), 32)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="none of its 0 records"):
        data.prepare_codes(tmp_path / "empty.json", tmp_path / "codes", FakeVQ(), 32)


def test_prepare_warns_of_special_tokens_in_captions(tmp_path, pil_to_tensor):
    records = good_records(tmp_path, 2)
    records[1]["caption"] = "grey <|soi|> 1"
    (tmp_path / "meta.json").write_text(json.dumps(records))
    with pytest.warns(UserWarning, match=re.escape("1 caption(s) spell <|soi|>")):
        data.prepare_codes(tmp_path / "meta.json", tmp_path / "codes", FakeVQ(), 32)


@pytest.fixture(scope="module")
def tiny_vq_dir(tmp_path_factory):
    """A visual tokenizer in our safetensors layout (fixtures.py's tiny config, 64 codes)."""
    from fixtures import write_tiny_vq
    return write_tiny_vq(tmp_path_factory.mktemp("vq") / "vq", levels=(4, 4, 4), jit=False)


def test_prepare_cli_reads_a_meta_with_a_byte_order_mark(tmp_path, tiny_vq_dir, capsys):
    """The CLI too; its warnings are one line each (a caption spelling <|soi|> here)."""
    records = good_records(tmp_path, 3)
    records[2]["caption"] = "grey <|soi|>"
    (tmp_path / "meta.json").write_bytes(BOM + json.dumps(records).encode())
    data.main(["prepare", "--meta", str(tmp_path / "meta.json"), "--vq", tiny_vq_dir,
               "--resolution", "32", "--out", str(tmp_path / "codes")])
    out, err = capsys.readouterr()
    assert "encoded 3 images" in out
    lines = [line for line in err.split("\n") if "warning" in line]  # the rest: the progress bar
    assert len(lines) == 1 and lines[0].startswith("data.py: warning: ") and "<|soi|>" in lines[0]
    ds = data.CodeDataset(tmp_path / "codes")
    assert len(ds) == 3 and ds.codebook_size == 64 and ds.index["grid"] == [2, 2]


def test_cli_errors_are_one_line(tmp_path, capsys):
    meta = tmp_path / "meta.jsonl"
    meta.write_text("")
    prepare = ["prepare", "--meta", str(meta), "--vq", "x", "--out", "o"]
    cases = {"nope.jsonl": ["prepare", "--meta", str(tmp_path / "nope.jsonl"), "--vq", "x",
                            "--resolution", "512", "--out", "o"],
             "--vq": ["prepare", "--meta", "m"],
             "frobnicate": ["frobnicate"],
             "invalid choice: 'shapes'": ["shapes", "--out", str(tmp_path), "--n", "2"],
             "--batch-size 0 must be >= 1": [*prepare, "--resolution", "32", "--batch-size", "0"],
             "--shard-size 0 must be >= 1": [*prepare, "--resolution", "32", "--shard-size", "0"],
             "--resolution 0 must be >= 1": [*prepare, "--resolution", "0"],
             "invalid int value: 'two'": [*prepare, "--resolution", "two"]}
    for needle, argv in cases.items():
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, (argv, err)
        assert re.match(r"data\.py( prepare)?: error: ", err) and needle in err, (argv, err)
    assert os.listdir(tmp_path) == ["meta.jsonl"]  # nothing written on the way


def test_sample_cli_refuses_an_lm_and_a_visual_tokenizer_that_do_not_belong_together(tmp_path):
    """An LM with 64 code rows and a visual tokenizer of 32 codes: one line naming the three sizes,
    exit 2, no image (not 32 of the LM's rows decoded as the other tokenizer's codes)."""
    from fixtures import write_tiny_lm, write_tiny_vq
    lm = write_tiny_lm(tmp_path / "lm", codebook_size=64)
    vq = write_tiny_vq(tmp_path / "vq", levels=(4, 4, 2), jit=False)
    n_text = data.load_text_tokenizer(lm).get_vocab_size()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "sample.py", "--prompt", "a cat", "--ckpt", lm, "--vq", vq,
                        "--size", "32", "--n", "1", "--device", "cpu", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    sizes = (f"the LM's {n_text + 64:,} vocabulary rows are not the text tokenizer's {n_text:,} "
             "ids + the visual tokenizer's 32 codes")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("sample.py: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert sizes in r.stderr, r.stderr
    assert not out.exists() or not list(out.glob("*.png"))

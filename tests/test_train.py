"""train.py on a CPU: DDP (gloo) and accumulation equivalence, exact resume, crash-safe saves,
SimpleAR's vocabulary extension, checkpoints that transformers and sample.py load, and one-line
errors for bad input, found before step 1, from whichever rank meets it.

Fixtures are written in the real formats: PNGs + meta.jsonl encoded by data.prepare_codes with a
stand-in visual tokenizer (16x downsampling, 256 codes: 128 px -> an 8x8 grid), a BPE
tokenizer.json, a transformers Qwen2 checkpoint.
"""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import data
import train
from model import ModelArgs, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red circle", "two blue squares", "a green triangle above a yellow circle",
            "an orange square"]
N_SAMPLES = 12


class FakeVQ:
    """The part of a visual tokenizer that prepare_codes uses: codes are 16x16 patch brightness
    levels."""
    spatial_compression, codebook_size = 16, 256

    def encode(self, x):  # [B, 3, R, R] in [-1, 1] -> [B, R/16, R/16]
        return ((F.avg_pool2d(x, 16).mean(1) + 1) / 2 * 255).round().long().clamp(0, 255)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    os.makedirs(root / "img")
    rng = np.random.default_rng(0)
    with open(root / "meta.jsonl", "w") as f:
        for i in range(N_SAMPLES):
            Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(
                root / f"img/{i}.png")
            f.write(json.dumps(dict(image=f"img/{i}.png", caption=CAPTIONS[i % 4])) + "\n")
    data.train_bpe_tokenizer(CAPTIONS + data.STYLE_PREFIXES, 300, str(root / "tok"))
    data.prepare_codes(str(root / "meta.jsonl"), str(root / "codes"), FakeVQ(), 128, shard_size=8)
    return root


def tiny_args(prepared, out, *extra):
    return ["--config", "tiny", "--tokenizer", str(prepared / "tok"), "--data",
            str(prepared / "codes"), "--out", str(out), "--lr", "1e-3", "--no-progress",
            "--peak-flops", "1e9", *map(str, extra)]


def weights(ckpt):
    return load_file(os.path.join(ckpt, "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def torchrun(args, nproc=2, ok=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "train.py", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def with_flags(args, change):
    """args with change[0]'s value replaced by change[1] (or change appended when args lacks
    change[0])."""
    args = list(args)
    i = args.index(change[0]) if change[0] in args else len(args)
    args[i:i + 2] = change
    return args


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("train.py: error:")]


# ------------------------------------------------------------------------------------- equivalences
def test_ddp_and_accumulation_equal_one_big_batch(prepared, tmp_path):
    # global batch 8 three ways: 1 process x 8; 1 process x 4 x 2 accumulated; 2 processes x 2 x 2
    # accumulated (per-rank batch b = 2 against 2b = 4, and DDP skips the all-reduce on the first
    # micro-batch). In float32, where they are equal up to summation order: under bf16 autocast
    # (--dtype auto on GPUs and bf16 CPUs) each micro-batch rounds on its own, and AdamW's
    # sign-like first steps turn that into weight differences as large as the steps themselves
    k = 3
    # 3 of the 12 samples held out for validation; the 9 others make one global batch an epoch
    common = ["--steps", k, "--schedule", "cosine", "--warmup-steps", 1, "--save-every", 0,
              "--log-every", 1, "--val-frac", 0.25, "--val-every", 2, "--dtype", "float32"]
    train.main(tiny_args(prepared, tmp_path / "big", "--batch-size", 8, *common))
    train.main(tiny_args(prepared, tmp_path / "accum", "--batch-size", 4, "--grad-accum", 2,
                         *common))
    torchrun(tiny_args(prepared, tmp_path / "ddp", "--batch-size", 2, "--grad-accum", 2, *common))
    big = weights(tmp_path / "big" / f"step_{k:07d}")
    for run in ("accum", "ddp"):
        assert max_diff(big, weights(tmp_path / run / f"step_{k:07d}")) < 1e-5, run
        log = [json.loads(line) for line in open(tmp_path / run / "log.jsonl")]
        ref = [json.loads(line) for line in open(tmp_path / "big" / "log.jsonl")]
        assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref], abs=1e-5)
        assert ([r.get("val_loss") for r in log]
                == pytest.approx([r.get("val_loss") for r in ref], abs=1e-5))
    # every 2 steps and at the end
    assert "val_loss" not in ref[0] and "val_loss" in ref[1] and "val_loss" in ref[2]
    assert ref[0]["loss"] > ref[-1]["loss"]  # the weights moved: the comparison is not vacuous


def test_autocast_dtype_follows_the_hardware(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, want in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(train, "cpu_bf16_native", lambda: native)
        assert train.autocast_dtype("auto", cpu) is want
        assert train.autocast_dtype("auto", cuda) is torch.bfloat16
        assert train.autocast_dtype("float32", cpu) is None
        assert train.autocast_dtype("bfloat16", cpu) is torch.bfloat16


def test_resume_equals_uninterrupted(prepared, tmp_path):
    # 12 samples, global batch 4: the 4 steps cross an epoch; cosine + warmup exercise the scheduler
    # state
    common = ["--steps", 4, "--batch-size", 4, "--schedule", "cosine", "--warmup-steps", 2,
              "--save-every", 2, "--log-every", 1]
    train.main(tiny_args(prepared, tmp_path / "full", *common))
    train.main(tiny_args(prepared, tmp_path / "split", *common, "--stop-after", 2))
    assert open(tmp_path / "split" / "latest").read().strip() == "step_0000002"
    assert not os.path.exists(tmp_path / "split" / "step_0000004")
    train.main(tiny_args(prepared, tmp_path / "split", *common, "--resume"))
    full, split = (weights(tmp_path / "full" / "step_0000004"),
                   weights(tmp_path / "split" / "step_0000004"))
    assert max_diff(full, split) < 1e-6
    a = torch.load(tmp_path / "full" / "step_0000004" / "trainer.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "step_0000004" / "trainer.pt", weights_only=False)
    assert a["loader"] == b["loader"] and a["loader"]["epoch"] == 1
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    # the log continues where it stopped: steps 1..4 once each, the same losses and learning rates
    log = lambda run: [(r["step"], r["loss"], r["lr"])
                       for r in map(json.loads, open(tmp_path / run / "log.jsonl"))]
    assert log("split") == log("full") and [r[0] for r in log("full")] == [1, 2, 3, 4]


# -------------------------------------------------------------------------------------- checkpoints
def test_killed_save_leaves_previous_checkpoint(prepared, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = tiny_args(prepared, out, "--steps", 3, "--batch-size", 4, "--save-every", 1)
    real_save, calls = torch.save, []

    class Killed(BaseException):  # not an Exception: like a SIGKILL, nothing may catch it
        pass

    def dying_save(obj, path, *a, **kw):  # the third checkpoint dies half-written
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise Killed
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Killed):
        train.main(args)
    monkeypatch.setattr(torch, "save", real_save)
    assert open(out / "latest").read().strip() == "step_0000002"
    assert sorted(os.listdir(out)) == [".step_0000003.tmp", "latest", "log.jsonl", "step_0000001",
                                       "step_0000002"]
    Transformer.from_pretrained(out / "step_0000002")
    assert torch.load(out / "step_0000002" / "trainer.pt", weights_only=False)["step"] == 2
    train.main(args + ["--resume"])  # finds step 2, not the debris, and cleans the debris up
    assert sorted(os.listdir(out)) == ["latest", "log.jsonl", "step_0000002",
                                       "step_0000003"]  # --keep 2


def test_checkpoint_loads_in_transformers_and_sample(prepared, tmp_path):
    transformers = pytest.importorskip("transformers")
    train.main(tiny_args(prepared, tmp_path, "--steps", 1, "--batch-size", 4))
    ckpt = str(tmp_path / "step_0000001")
    ours = Transformer.from_pretrained(ckpt)
    tok = data.load_text_tokenizer(ckpt)
    ids = data.special_token_ids(tok)
    first = data.first_image_id(ours.args.vocab_size, 256, tok.get_vocab_size())
    assert first == tok.get_vocab_size() == ours.args.vocab_size - 256
    assert ids["<|soi|>"] < first
    hf = transformers.Qwen2ForCausalLM.from_pretrained(ckpt).eval()
    prompt = data.encode_prompts(tok, ["a red circle"])[0]
    assert transformers.AutoTokenizer.from_pretrained(ckpt)(
        data.build_prompt("a red circle")).input_ids == prompt
    x = torch.tensor([prompt + [first + 3, first + 7]])
    with torch.no_grad():
        assert (hf(x).logits.float() - ours(x)).abs().max() < 1e-4
    # sample.py's prompt path on the trained checkpoint, codes only
    sample = pytest.importorskip("sample")
    out = sample.text_to_image(ours, tok, FakeVQ(), ["a red circle"], size=128, n=2, decode=False,
                               progress=False)
    assert out.codes.shape == (1, 2, 8, 8) and 0 <= out.codes.min() and out.codes.max() < 256


def tiny_qwen2(path, tie):
    """A plain Qwen2 checkpoint without SimpleAR's tokens; its matrices have 9 padding rows, as
    Qwen2.5's do."""
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CAPTIONS * 5, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    n = tok.get_vocab_size()
    cfg = transformers.Qwen2Config(vocab_size=n + 9, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=64, max_position_embeddings=512,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(dict(repetition_penalty=1.1), f)
    return n


@pytest.mark.parametrize("tie", [True, False])
def test_vocabulary_extension(tmp_path, tie):
    n_old = tiny_qwen2(tmp_path, tie)
    model, tok = Transformer.from_pretrained(tmp_path), data.load_text_tokenizer(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert train.extend_vocab(model, tok, codebook_size=64) == n_old
    assert [tok.token_to_id(t) for t in data.SPECIAL_TOKENS] == list(range(n_old, n_old + 7))
    V = n_old + 7 + 64
    assert tok.get_vocab_size() == n_old + 7 and model.args.vocab_size == V
    for name in ["embed_tokens.weight"] + ([] if tie else ["lm_head.weight"]):
        w, old = model.state_dict()[name], before[name]
        assert w.shape == (V, 32)
        # kept rows untouched; Qwen's padding rows are not kept
        assert torch.equal(w[:n_old], old[:n_old])
        assert torch.allclose(w[n_old:], old[:n_old].double().mean(0).float().expand(V - n_old, -1),
                              atol=1e-7)
    assert (model.lm_head is None) == tie
    for name in before:
        if "embed" not in name and "lm_head" not in name:
            assert torch.equal(model.state_dict()[name], before[name])


def test_train_from_plain_qwen2(prepared, tmp_path):
    transformers = pytest.importorskip("transformers")
    n_old = tiny_qwen2(tmp_path / "qwen", tie=False)
    out = tmp_path / "run"
    train.main([str(a) for a in ["--init", tmp_path / "qwen", "--data", prepared / "codes",
                                 "--out", out, "--steps", 1, "--batch-size", 4, "--no-progress",
                                 "--peak-flops", 1e9]])
    ckpt = out / "step_0000001"
    tok = data.load_text_tokenizer(ckpt)
    assert tok.token_to_id("<|t2i|>") == n_old and tok.get_vocab_size() == n_old + 7
    hf = transformers.Qwen2ForCausalLM.from_pretrained(ckpt)
    assert hf.config.vocab_size == n_old + 7 + 256  # the data's codebook
    assert hf.lm_head.weight.shape == (n_old + 7 + 256, 32)
    # travels with the weights
    assert json.load(open(ckpt / "generation_config.json"))["repetition_penalty"] == 1.1


# ----------------------------------------------------------------------------------------- pieces
def test_chunked_loss_is_the_global_token_mean():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny"))
    ids = torch.randint(0, 4403, (3, 20))
    labels = ids.clone()
    labels[0, 15:] = -100  # right padding
    labels[2, 9:] = -100
    want = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                           reduction="sum")
    for chunk in (7, 4096):
        model.zero_grad()
        got = train.NextTokenLoss(model, chunk)(ids, labels)
        assert torch.allclose(got, want, rtol=1e-5)
        got.backward()
        g = model.embed_tokens.weight.grad.clone()
        model.zero_grad()
        want_g = torch.autograd.grad(F.cross_entropy(model(ids)[:, :-1].flatten(0, 1),
                                                     labels[:, 1:].flatten(), reduction="sum"),
                                     model.embed_tokens.weight)[0]
        assert torch.allclose(g, want_g, atol=1e-5)


def test_lr_schedule():
    f = lambda s, sched="cosine": train.lr_factor(s, sched, warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert (f(4) == 1.0 and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
            and f(20) == pytest.approx(0.1))
    assert [train.lr_factor(s, "constant", 0, 10, 0.0) for s in (0, 5, 50)] == [1.0, 1.0, 1.0]


def test_flops_accounting():
    a = ModelArgs.from_name("tiny")
    model = Transformer(a)
    matmul = sum(p.numel() for n, p in model.named_parameters()
                 if n.startswith("layers") and n.endswith("proj.weight"))
    assert train.flops_per_token(a, 0) == 6 * (matmul + a.vocab_size * a.dim)
    assert (train.flops_per_token(a, 100) - train.flops_per_token(a, 0)
            == 12 * a.n_layers * a.dim * 100)
    assert train.measure_matmul_flops("cpu", n=128, iters=1) > 1e6


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change,message", [
    (["--data", "/nonexistent"], "no index.json"),
    (["--config", "huge"], "unknown model config"),
    (["--resolution", "120"], "not divisible by 16"),
    (["--resolution", "256"], "holds codes of 128px images"),
    (["--max-len", "40"], "do not fit"),
    (["--codebook-size", "64000"], "256-code"),
    (["--steps", "many"], "invalid int value"),
    (["--n-heads", "3"], "not a multiple"),
    # what used to fail at a later step, or never: flags out of range or that cannot work together
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--beta2", "1"], "--beta2 must be in [0, 1)"),
    (["--val-every", "2"], "needs held-out data"),
    (["--val-data", "elsewhere", "--val-frac", "0.25"], "not both"),
    (["--init", "elsewhere"], "--tokenizer: only with --config"),
    (["--batch-size", "13"], "12 training samples are fewer than one global batch of 13"),
    (["--batch-size", "10", "--val-frac", "0.25"], "9 training samples (3 held out by --val-frac)"),
])
def test_bad_input_is_one_line(prepared, tmp_path, capsys, change, message):
    with pytest.raises(SystemExit) as e:
        train.main(with_flags(tiny_args(prepared, tmp_path / "run", "--steps", 1), change))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("train.py: error: ") and message in err, err
    assert len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "run")  # found before anything is written


def test_vocabulary_is_the_tokenizer_and_the_codebook(prepared, tmp_path, capsys):
    # a checkpoint made for a 512-code visual tokenizer, given codes of a 256-code one: image ids
    # would start 256 ids too late, every code a wrong token
    tok = data.load_text_tokenizer(prepared / "tok")
    margs = asdict(ModelArgs.from_name("tiny")) | dict(vocab_size=tok.get_vocab_size() + 512,
                                                       head_dim=0)
    Transformer(ModelArgs(**margs)).save_pretrained(tmp_path / "ckpt")
    tok.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    args = ["--init", tmp_path / "ckpt", "--data", prepared / "codes", "--out", tmp_path / "run",
            "--steps", 1, "--batch-size", 4, "--no-progress", "--peak-flops", 1e9]
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    numbers = err.replace(",", "")
    assert (f"{tok.get_vocab_size() + 512}" in numbers and f"{tok.get_vocab_size()}" in numbers
            and "256" in numbers)


def test_resume_refuses_what_the_checkpoint_fixed(prepared, tmp_path, capsys):
    common = ["--steps", 2, "--batch-size", 4, "--stop-after", 1]
    train.main(tiny_args(prepared, tmp_path, *common))
    capsys.readouterr()
    for change, message in [(["--lr", "2e-3"], "--lr 0.002 (the checkpoint's: 0.001)"),
                            (["--seed", "1"], "--seed 1 (the checkpoint's: 0)"),
                            (["--n-layers", "1"], "--n-layers 1 (the checkpoint's: 0)"),
                            (["--batch-size", "2"], "trained with a global batch of 4")]:
        with pytest.raises(SystemExit) as e:
            train.main(with_flags(tiny_args(prepared, tmp_path, *common, "--resume"), change))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    # nothing trained, nothing saved
    assert open(tmp_path / "latest").read().strip() == "step_0000001"


def test_text_files_may_start_with_a_byte_order_mark(prepared, tmp_path):
    # what some editors write first: every JSON and text file a run and its resume read accepts it
    codes = tmp_path / "codes"
    tok = tmp_path / "tok"
    shutil.copytree(prepared / "codes", codes)
    shutil.copytree(prepared / "tok", tok)

    def add_bom(path):
        path.write_text(path.read_text(encoding="utf-8"), encoding="utf-8-sig")

    for path in [codes / "index.json", *codes.glob("captions_*.json"), tok / "tokenizer.json"]:
        add_bom(path)
    out = tmp_path / "run"
    args = tiny_args(prepared, out, "--steps", 2, "--batch-size", 4, "--stop-after", 1)
    args = with_flags(with_flags(args, ["--data", str(codes)]), ["--tokenizer", str(tok)])
    train.main(args)
    for name in ("latest", "step_0000001/config.json", "step_0000001/tokenizer.json"):
        add_bom(out / name)
    train.main(args + ["--resume"])
    assert (out / "latest").read_text().strip() == "step_0000002"


def test_bad_input_cli(prepared, tmp_path):
    args = ["--init", str(tmp_path / "missing"), "--data", str(prepared / "codes"),
            "--out", str(tmp_path)]
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        f"train.py: error: --init {tmp_path / 'missing'}: no such checkpoint directory")
    with pytest.raises(SystemExit):  # neither --init nor --config
        train.main(["--data", str(prepared / "codes"), "--out", str(tmp_path)])


# ------------------------------------------------------------------------------ errors across ranks
def test_longest_style_prefix_checked_before_step_1(prepared, tmp_path):
    # Every sample draws one of the 20 style prefixes, and captions are cut to fit --max-len while
    # prefixes are not: a --max-len that leaves room for the short prefixes only used to fail at the
    # first step that drew a long one, on the rank that drew it. Now every rank finds it before
    # step 1 and the user reads it once.
    tok = data.load_text_tokenizer(prepared / "tok")
    n_prefix = {p: len(tok.encode(p, add_special_tokens=False).ids) for p in data.STYLE_PREFIXES}
    longest = max(n_prefix, key=n_prefix.get)
    fits = 8 * 8 + 2 + n_prefix[longest]  # image tokens, <|t2i|> and <|soi|>, the longest prefix
    codes = data.CodeDataset(prepared / "codes")[0][1]
    first = tok.get_vocab_size()
    # what data.py accepts: at this length every prefix makes a sequence...
    for p in data.STYLE_PREFIXES:
        data.make_sequence(tok, CAPTIONS[2], codes, first, p, max_len=fits)
    with pytest.raises(ValueError):  # ...and one token shorter the longest does not
        data.make_sequence(tok, CAPTIONS[2], codes, first, longest, max_len=fits - 1)
    train.main(tiny_args(prepared, tmp_path / "fits", "--steps", 1, "--batch-size", 4,
                         "--max-len", fits))
    out = tmp_path / "short"
    r = torchrun(tiny_args(prepared, out, "--steps", 3, "--batch-size", 2, "--max-len", fits - 1),
                 ok=False)
    assert r.returncode != 0
    # once, although both ranks found it; no rank named, as all share it
    assert error_lines(r.stderr) == [
        f"train.py: error: 64 image tokens (grid 8x8), 2 special tokens and the longest style "
        f"prefix {longest!r} ({n_prefix[longest]} tokens) do not fit a sequence of {fits - 1} "
        f"(--max-len {fits - 1}, max_position_embeddings 2048); captions are cut to fit, "
        f"prefixes are not"], r.stderr[-3000:]
    assert not out.exists()  # nothing written: no step ran


def test_error_on_one_rank_reaches_the_user(prepared, tmp_path):
    # Rank r reads the slice [r*b, (r+1)*b) of each global batch of the epoch's order
    # (data.T2IBatches), so a broken sample at position b of the order is rank 1's alone at step 1:
    # here a code past the 256-code codebook, as a shard written by another visual tokenizer has.
    # Rank 0 waits for rank 1 at the step's all-reduce.
    codes = tmp_path / "codes"
    shutil.copytree(prepared / "codes", codes)
    tok = data.load_text_tokenizer(prepared / "tok")
    rank1 = data.T2IBatches(data.CodeDataset(codes), tok, tok.get_vocab_size(), 2, seed=0, rank=1,
                            world_size=2)
    broken = int(rank1.order(0)[rank1.rank * rank1.batch_size])
    row = broken
    for shard in json.load(open(codes / "index.json"))["shards"]:
        if row < shard["count"]:
            break
        row -= shard["count"]
    array = np.load(codes / shard["codes"], mmap_mode="r+")
    array[row, 0, 0] = 300
    array.flush()
    del array
    out = tmp_path / "run"
    args = with_flags(tiny_args(prepared, out, "--steps", 2, "--batch-size", 2, "--save-every", 1),
                      ["--data", codes])
    r = torchrun(args, ok=False)
    assert r.returncode != 0
    errors = error_lines(r.stderr)
    assert len(errors) == 1, r.stderr[-3000:]
    assert errors[0].startswith(f"train.py: error: rank 1: {codes}: sample {broken} has codes in [")
    assert errors[0].endswith("300], outside the codebook [0, 256)")
    assert not (out / "latest").exists()
    assert not [d for d in os.listdir(out) if "step_" in d]  # no checkpoint, not even a partial one


AGREE = """
import sys
import torch.distributed as dist
import train

dist.init_process_group("gloo")
rank = dist.get_rank()
seen = []
for name, errors in [("one", {1: FileNotFoundError("no such file: x")}),
                     ("differ", {0: ValueError("bad a"), 1: ValueError("bad b")}),
                     ("none", {})]:
    try:
        with train.ranks_agree(rank, 2):
            if rank in errors:
                raise errors[rank]
        seen.append(f"{name} rank {rank}: passes")
    except train.AllRanks as e:
        seen.append(f"{name} rank {rank}: raises {e}")
    except SystemExit as e:
        seen.append(f"{name} rank {rank}: exits {e.code}")
dist.destroy_process_group()
with open(f"{sys.argv[1]}/rank{rank}.txt", "w") as f:
    f.write("\\n".join(seen))
"""


def test_ranks_agree_on_set_up_errors(tmp_path):
    # what the set-up of each rank found, told once by rank 0 and naming the ranks; the others exit
    # with status 2
    (tmp_path / "agree.py").write_text(AGREE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "agree.py"), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert open(tmp_path / "rank0.txt").read().splitlines() == [
        "one rank 0: raises rank 1: no such file: x",
        "differ rank 0: raises rank 0: bad a; rank 1: bad b", "none rank 0: passes"]
    assert open(tmp_path / "rank1.txt").read().splitlines() == [
        "one rank 1: exits 2", "differ rank 1: exits 2", "none rank 1: passes"]

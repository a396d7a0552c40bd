"""sample.py: the decode loop against a slow uncached reference, the sampling primitives, the
CLI."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cosmos_tokenizer import CosmosTokenizer, tensor_to_uint8
from data import NEGATIVE_PROMPT, load_text_tokenizer
from fixtures import write_tiny_lm, write_tiny_vq
from model import ModelArgs, Transformer, resolve_dtype
import sample
from sample import (Sampling, cfg_combine, draw, filter_logits, generate, guided_scores, main,
                    text_to_image)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TEXT, CODES = 307, 64  # 300 text ids + 7 special tokens, then a 64-code book (levels [4, 4, 4])


def tiny_lm(vocab=TEXT + CODES, seed=0):
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              intermediate_size=64, bos_token_id=None, eos_token_id=None)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "bias" in n:
                p.normal_(0, 0.1)
    return m


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@torch.no_grad()
def slow_greedy(model, prompt, negative, n_tokens, cfg, penalty):
    """SimpleAR's HF path recomputed from scratch for every token, on the full vocabulary: penalty
    on every id of the conditional input (prompt text included), log-softmax, guidance, then the
    text rows masked out (where SimpleAR would clamp) and argmax."""
    out = []
    for _ in range(n_tokens):
        ids = prompt + [TEXT + c for c in out]
        cond = model(torch.tensor([ids]))[0, -1]
        uncond = model(torch.tensor([negative + [TEXT + c for c in out]]))[0, -1]
        hit = torch.zeros_like(cond, dtype=torch.bool)
        hit[torch.tensor(ids)] = True
        cond = torch.where(hit, torch.where(cond > 0, cond / penalty, cond * penalty), cond)
        lc, lu = cond.log_softmax(-1), uncond.log_softmax(-1)
        scores = lu + cfg * (lc - lu)
        scores[:TEXT] = float("-inf")
        out.append(int(scores.argmax()) - TEXT)
    return out


@pytest.mark.parametrize("cfg,penalty", [(6.0, 1.1), (1.0, 1.0), (3.0, 2.0)])
def test_greedy_equals_slow_reference(lm, cfg, penalty):
    prompts = [[301, 5, 17, 9, 302], [301, 44, 302], [301, 5, 17, 9, 302]]
    negative = [301, 8, 8, 2, 11, 302, 7]
    greedy = Sampling(guidance_scale=cfg, top_k=1, repetition_penalty=penalty)
    codes = generate(lm, prompts, negative, TEXT, CODES, 12, [0, 1, 2], greedy, progress=False)
    assert codes.shape == (3, 12) and codes.dtype == torch.long
    for p, got in zip(prompts, codes.tolist()):
        assert got == slow_greedy(lm, p, negative, 12, cfg, penalty)
    if penalty == 2.0:  # strong enough to matter: greedy without it repeats more
        plain = greedy.replace(repetition_penalty=1.0)
        assert codes.tolist() != generate(lm, prompts, negative, TEXT, CODES, 12, [0, 1, 2], plain,
                                          progress=False).tolist()


@torch.no_grad()
def test_cfg_on_image_rows_equals_full_vocab_formula(lm):
    cond = lm(torch.tensor([[301, 5, 17, 9, 302]]))[0, -1]
    uncond = lm(torch.tensor([[301, 8, 302]]))[0, -1]
    for s in (0.0, 1.0, 6.0):
        lc, lu = cond.log_softmax(-1), uncond.log_softmax(-1)
        by_hand = lu + s * (lc - lu)
        want = by_hand[TEXT:].softmax(-1)  # full-vocab guidance, text rows masked, renormalised
        got = cfg_combine(cond[TEXT:], uncond[TEXT:], s).softmax(-1)
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(cfg_combine(cond, uncond, 1.0), cond.log_softmax(-1))


def test_filter_logits_matches_transformers_warpers():
    """The same kept set and the same distribution as transformers' warpers (our scores are shifted
    so that each row's best is 0, which softmax, top-k and top-p ignore)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    x = torch.randn(4, CODES) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    for t, k, p in [(0.7, 10, 1.0), (1.0, None, 0.8), (1.3, 20, 0.5), (1.0, 1, 1.0),
                    (2.0, CODES + 5, 0.05)]:
        want = x / t
        if k is not None:
            want = transformers.TopKLogitsWarper(min(k, CODES))(ids, want)
        if p < 1:
            want = transformers.TopPLogitsWarper(p)(ids, want)
        got = filter_logits(x, t, k, p)
        assert torch.equal(got.isfinite(), want.isfinite())
        assert torch.allclose(got.softmax(-1), want.softmax(-1), atol=1e-6)
        assert (got.amax(-1) == 0).all()


def test_sampled_codes_are_always_image_codes(lm):
    prompts = [[301, 5, 302], [301, 6, 7, 8, 302]]
    for t, k, p in [(1.0, None, 1.0), (5.0, None, 1.0), (0.2, 3, 1.0), (1.0, 1000, 0.3),
                    (10.0, 2, 0.9)]:
        s = Sampling(guidance_scale=6.0, temperature=t, top_k=k, top_p=p)
        codes = generate(lm, prompts, [301, 302], TEXT, CODES, 8, [3, 4], s, progress=False)
        assert codes.min() >= 0 and codes.max() < CODES
    # a model that prefers text tokens by far still samples codes
    biased = tiny_lm()
    with torch.no_grad():
        biased.embed_tokens.weight[:TEXT] *= 50
    codes = generate(biased, prompts, [301, 302], TEXT, CODES, 8, [3, 4], Sampling(temperature=5.0),
                     progress=False)
    assert codes.min() >= 0 and codes.max() < CODES


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(1)
    cond, uncond = torch.randn(2, CODES), torch.randn(2, CODES)
    seen = torch.zeros(2, CODES, dtype=torch.bool)
    s = guided_scores(cond, uncond, seen, Sampling(guidance_scale=4.0, top_k=5))
    assert (torch.isfinite(s).sum(-1) == 5).all()
    best = guided_scores(cond, uncond, seen, Sampling(guidance_scale=4.0)).argmax(-1)
    only_best = guided_scores(cond, uncond, seen,
                              Sampling(guidance_scale=4.0, top_p=1e-6)).isfinite()
    assert torch.equal(only_best, torch.nn.functional.one_hot(best, CODES).bool())


def test_same_seed_same_codes_and_batch_independence(lm):
    a = [301, 5, 17, 302]
    b = [301, 9, 9, 9, 9, 9, 302]
    neg = [301, 8, 302]
    kw = dict(sampling=Sampling(guidance_scale=6.0, top_k=40, top_p=0.95, repetition_penalty=1.1),
              progress=False)
    together = generate(lm, [a, a, b, b], neg, TEXT, CODES, 10, [0, 1, 0, 1], **kw)
    assert torch.equal(together, generate(lm, [a, a, b, b], neg, TEXT, CODES, 10, [0, 1, 0, 1],
                                          **kw))
    assert torch.equal(together[:2], generate(lm, [a, a], neg, TEXT, CODES, 10, [0, 1], **kw))
    assert torch.equal(together[3:], generate(lm, [b], neg, TEXT, CODES, 10, [1], **kw))
    assert not torch.equal(together[0], together[1])  # seeds differ → images differ


BAD_SETTINGS = [
    (dict(guidance_scale=-1), "guidance"), (dict(guidance_scale=float("inf")), "guidance"),
    (dict(guidance_scale=float("nan")), "guidance"), (dict(guidance_scale=1e30), "guidance"),
    (dict(temperature=0), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_k=0), "top-k"),
    (dict(top_k=2.5), "top-k"), (dict(top_k=True), "top-k"), (dict(top_p=0), "top-p"),
    (dict(top_p=1.5), "top-p"), (dict(top_p=float("nan")), "top-p"),
    (dict(repetition_penalty=0), "penalty"), (dict(repetition_penalty=float("inf")), "penalty"),
    (dict(repetition_penalty=1e-30), "penalty"), (dict(negative_prompt=None), "negative prompt"),
    (dict(guidance_scale="6"), "guidance"),
]


@pytest.mark.parametrize("kw,match", BAD_SETTINGS)
def test_bad_settings_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kw)


@pytest.mark.parametrize("kw", [dict(guidance_scale=Sampling.MAX_GUIDANCE, top_k=5),
                                dict(temperature=1e-38), dict(temperature=1e38),
                                dict(repetition_penalty=Sampling.MAX_PENALTY),
                                dict(repetition_penalty=1 / Sampling.MAX_PENALTY),
                                dict(top_p=1e-9)])
def test_extreme_valid_settings_still_sample_codes(lm, kw):
    """The edges of every valid range give codes, never NaN or an error (as `--cfg inf` once
    did)."""
    codes = generate(lm, [[301, 5, 302]], [301, 302], TEXT, CODES, 6, [0], Sampling(**kw),
                     progress=False)
    assert codes.min() >= 0 and codes.max() < CODES


def test_draw_is_the_distribution():
    """Inverse-CDF draws against the probabilities: a chi-square test at a fixed seed, with
    zero-probability codes (top-k) never drawn even at u just below 1."""
    torch.manual_seed(0)
    scores = filter_logits(torch.randn(1, 16) * 2, top_k=10).expand(20000, 16)
    codes = draw(scores, torch.rand(20000))
    p = scores[0].softmax(-1)
    counts = torch.bincount(codes, minlength=16).double()
    assert counts[p == 0].sum() == 0
    keep = p > 0
    chi2 = ((counts[keep] - 20000 * p[keep]) ** 2 / (20000 * p[keep])).sum().item()
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    edge = draw(scores[:3], torch.tensor([0.0, 1 - 2 ** -24, 0.5]))
    assert keep[edge].all()


# ------------------------------------------------------------------------------------------------
# strings → PNGs, with checkpoints in the real formats

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return write_tiny_lm(root / "lm"), write_tiny_vq(root / "vq")


def test_cli_end_to_end(ckpts, tmp_path):
    lm, vq = ckpts
    (tmp_path / "prompts.txt").write_text("A red circle!\n\n  two dogs  \n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "sample.py", "--prompt", "a cat wearing a hat",
                        "--prompts-file", str(tmp_path / "prompts.txt"), "--ckpt", lm, "--vq", vq,
                        "--size", "64", "--n", "2", "--batch-size", "3", "--out", str(out),
                        "--grid", "--save-codes", "--device", "cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"6 images, 96 tokens in [\d.]+ s LM \(\d+ tok/s\) \+ [\d.]+ s decoder; "
                        r"16.0 forwards per image \(plain decoding: 16\)",
                        r.stdout.strip().splitlines()[-1])
    stems = [f"{s}_s0_{j}" for s in ("a-cat-wearing-a-hat", "a-red-circle", "two-dogs")
             for j in (0, 1)]
    assert sorted(os.listdir(out)) == sorted(["grid.png"] + [s + e for s in stems
                                                             for e in (".png", ".npy")])
    pngs = [np.asarray(Image.open(out / f"{s}.png")) for s in stems]
    assert all(p.shape == (64, 64, 3) and p.dtype == np.uint8 for p in pngs)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert np.array_equal(grid, np.concatenate([np.concatenate(pngs[i:i + 2], 1)
                                                for i in (0, 2, 4)], 0))
    # the CLI's
    decoder = CosmosTokenizer.from_pretrained(vq, dtype=resolve_dtype("auto", "cpu")[0])
    for s, png in zip(stems, pngs):  # the saved codes decode to the saved image, byte for byte
        codes = np.load(out / f"{s}.npy")
        assert codes.shape == (4, 4) and codes.min() >= 0 and codes.max() < 64
        with torch.no_grad():
            again = tensor_to_uint8(decoder.decode(torch.from_numpy(codes)[None]))[0]
        assert np.array_equal(again, png)


def test_prompts_file_with_a_byte_order_mark(ckpts, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\ntwo dogs\n", encoding="utf-8-sig")
    main(["--prompts-file", str(tmp_path / "prompts.txt"), "--ckpt", ckpts[0], "--vq", ckpts[1],
          "--size", "32", "--n", "1", "--out", str(tmp_path / "o")])
    assert sorted(os.listdir(tmp_path / "o")) == ["a-cat_s0_0.png", "two-dogs_s0_0.png"]


def test_same_seed_same_png_bytes(ckpts, tmp_path, capsys):
    lm, vq = ckpts
    run = lambda out, seed: main(["--prompt", "a cat", "--ckpt", lm, "--vq", vq, "--size", "32",
                                  "--n", "2", "--seed", str(seed), "--out", str(tmp_path / out),
                                  "--device", "cpu"])
    run("a", 0)
    run("b", 0)
    run("c", 1)
    read = lambda out, seed, j: (tmp_path / out / f"a-cat_s{seed}_{j}.png").read_bytes()
    assert read("a", 0, 0) == read("b", 0, 0) and read("a", 0, 1) == read("b", 0, 1)
    assert read("a", 0, 0) != read("a", 0, 1)
    assert read("a", 0, 1) == read("c", 1, 0)  # image j of seed s is seed s + j


def test_batch_composition_does_not_change_images(ckpts, tmp_path):
    lm, _ = ckpts
    # our safetensors format
    vq = CosmosTokenizer.from_pretrained(write_tiny_vq(tmp_path / "vq", jit=False))
    model, tok = Transformer.from_pretrained(lm), load_text_tokenizer(lm)
    kw = dict(size=32, n=2, seed=5,
              sampling=Sampling(guidance_scale=3.0, top_k=50, repetition_penalty=1.1),
              progress=False)
    together = text_to_image(model, tok, vq, ["a cat", "two dogs playing in the snow", "a hat"],
                             batch_size=6, **kw)
    assert together.codes.shape == (3, 2, 2, 2) and together.images.shape == (3, 2, 32, 32, 3)
    for p, prompt in enumerate(["a cat", "two dogs playing in the snow"]):
        alone = text_to_image(model, tok, vq, [prompt], **kw)
        assert torch.equal(alone.codes[0], together.codes[p])
        assert np.array_equal(alone.images[0], together.images[p])  # decoded one by one: same bytes


def test_sampling_defaults_from_generation_config(ckpts, tmp_path):
    assert Sampling.from_checkpoint(ckpts[0]) == Sampling(repetition_penalty=1.1)
    plain = write_tiny_lm(tmp_path / "plain", repetition_penalty=None)
    assert Sampling.from_checkpoint(plain) == Sampling()
    assert Sampling().negative_prompt == NEGATIVE_PROMPT and Sampling().guidance_scale == 6.0
    # a BOM, too
    with open(os.path.join(plain, "generation_config.json"), "w", encoding="utf-8-sig") as f:
        # the chat settings of Qwen2.5-Instruct's file (top_k, temperature) are not the image's
        json.dump({"guidance_scale": 2, "negative_prompt": "", "top_k": 20, "image_top_k": 10,
                   "temperature": 0.7, "image_temperature": 0.8}, f)
    assert Sampling.from_checkpoint(plain) == Sampling(guidance_scale=2.0, negative_prompt="",
                                                       top_k=10, temperature=0.8)
    assert Sampling.from_checkpoint(plain, top_k=None, temperature=0.5) == Sampling(
        guidance_scale=2.0, negative_prompt="", top_k=10, temperature=0.5)  # None: not given


@pytest.mark.parametrize("args,match", [
    (["--prompt", "  "], "empty prompt"),
    (["--prompt", "a cat", "--size", "40"], "size 40 is not a multiple of 16"),
    (["--prompt", "a cat", "--size", "0"], "size must be positive, got 0"),
    (["--prompt", "a cat", "--cfg", "-1"], "guidance scale"),
    (["--prompt", "a cat", "--cfg", "inf"], "guidance scale must be a finite number"),
    (["--prompt", "a cat", "--cfg", "nan"], "guidance scale must be a finite number"),
    (["--prompt", "a cat", "--temperature", "inf"], "temperature"),
    (["--prompt", "a cat", "--repetition-penalty", "0"], "repetition penalty"),
    (["--prompt", "a cat", "--temperature", "-0.5"], "temperature"),
    (["--prompt", "a cat", "--top-k", "0"], "top-k"),
    (["--prompt", "a cat", "--top-p", "0"], "top-p"),
    (["--prompt", "a cat", "--top-p", "1.5"], "top-p"),
    (["--prompt", "a cat", "--n", "0"], "must be >= 1"),
    # 182² codes, and the prompt
    (["--prompt", "a cat", "--size", "2912"], "+ 33124 image tokens = 33"),
    (["--prompt", "a cat", "--size", "2912"],
     "positions, more than the model's max_position_embeddings (32768)"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "prompts file not found"),
    (["--prompt", "a cat", "--jacobi", "--window", "0"], "window must be an integer >= 1, got 0"),
    (["--prompt", "a cat", "--jacobi", "--window", "-3"], "window must be an integer >= 1, got -3"),
    (["--prompt", "a cat", "--window", "8"], "--window applies to Jacobi decoding only"),
    (["--prompt", "a cat", "--no-coupling"], "--no-coupling applies to Jacobi decoding only"),
    (["--prompt", "a cat", "--jacobi", "--branches", "3,0"], "integers >= 1 separated by commas"),
    (["--prompt", "a cat", "--branches", "3"], "--branches applies to Jacobi decoding only"),
    (["--prompt", "a cat", "--no-row-chain"], "--no-row-chain applies to Jacobi decoding only"),
    (["--prompt", "a cat", "--jacobi", "--window", "8", "--no-guess-left"],
     "--no-guess-left applies to a tree with several first candidates"),
    (["--prompt", "a cat", "--jacobi", "--branches", "1,3", "--no-guess-left"],
     "--no-guess-left applies to a tree with several first candidates"),
    (["--prompt", "a cat", "--jacobi", "--branches", "1", "--no-row-chain"],
     "--no-row-chain applies to a tree of candidates"),
    (["--prompt", "a cat", "--jacobi", "--compile"], "--jacobi does not run: drop one of them"),
    (["--prompt", "a cat", "--batch-size", "0"], "batch size (0) must be >= 1"),
    (["--prompt", "a cat", "--seed", str(2 ** 64)], "seed must be in [0, 2^63 - n]"),
    (["--prompt", "a cat", "--seed", "-1"], "seed must be in"),
    (["--prompt", "a cat", "--device", "meta"], "device must be cpu or cuda"),
    (["--prompt", "a cat", "--device", "foo"], "device must be cpu or cuda"),
    (["--prompt", "a cat", "--cfg", "abc"], "invalid float value: 'abc'"),
    (["--prompt", "a cat", "--dtype", "float8"], "invalid choice: 'float8'"),
    (["--prompt", "a cat", "--out", __file__], "exists and is not a directory"),
])
def test_bad_input_exits_2_with_one_line(ckpts, capsys, args, match):
    with pytest.raises(SystemExit) as e:
        main(args + ["--ckpt", ckpts[0], "--vq", ckpts[1]])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err


def test_help_names_each_default_once(capsys):
    """--help adds argparse's "(default: X)" only where the help does not name the default itself
    and there is one to name: no "(default: None)" beside "(default 16)"."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "(default 16)" in out and out.count("(default: 4)") == 1  # --window; --n
    assert "(default: image_temperature, else 1.0)" in out


def test_bad_generation_config_is_named_before_the_weights_load(ckpts, tmp_path, capsys,
                                                                monkeypatch):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(ckpts[0], bad)
    loads = []
    monkeypatch.setattr(Transformer, "from_pretrained", lambda *a, **k: loads.append(a))
    for content, match in (('{"guidance_scale": true}', "guidance scale must be a finite number"),
                           ('{"repetition_penalty": "abc"}',
                            "repetition penalty must be a finite number"),
                           ('{"image_temperature": 0}', "temperature must be > 0"),
                           ("{not json", "is not valid JSON")):
        (bad / "generation_config.json").write_text(content)
        with pytest.raises(SystemExit) as e:
            main(["--prompt", "a cat", "--ckpt", str(bad), "--vq", ckpts[1],
                  "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert (e.value.code == 2 and err.count("\n") == 1 and match in err
                and "generation_config.json" in err)
    assert loads == []


def test_bad_checkpoints_exit_2_with_one_line(ckpts, tmp_path, capsys, monkeypatch):
    small = write_tiny_lm(tmp_path / "small", room=-10)  # 10 rows short of the 64-code book
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed: import fails
    cases = [(["--ckpt", small, "--vq", ckpts[1]], "vocabulary rows are not"),
             (["--ckpt", str(tmp_path / "missing"), "--vq", ckpts[1]],
              "checkpoint directory not found"),
             (["--ckpt", ckpts[0], "--vq", str(tmp_path / "missing")],
              "visual tokenizer directory not found"),
             (["--ckpt", "Daniel0724/SimpleAR-0.5B-RL", "--vq", ckpts[1]],
              "huggingface-cli download Daniel0724/SimpleAR-0.5B-RL --local-dir DIR` "
              "or `git lfs clone https://huggingface.co/Daniel0724/SimpleAR-0.5B-RL DIR`")]
    for args, match in cases:
        with pytest.raises(SystemExit) as e:
            main(["--prompt", "a cat", "--size", "32", "--out", str(tmp_path / "o")] + args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and match in err, (args, err)


def test_default_model_missing_files_name_the_folder_and_the_recipe(ckpts, tmp_path, capsys,
                                                                    monkeypatch):
    empty = tmp_path / "nano"
    (empty / "vq").mkdir(parents=True)
    monkeypatch.setattr(sample, "DEFAULT_CKPT", str(empty))
    monkeypatch.setattr(sample, "DEFAULT_VQ", str(empty / "vq"))
    for args in ([], ["--ckpt", ckpts[0]]):  # the default LM, then only the default tokenizer
        with pytest.raises(SystemExit) as e:
            main(["--prompt", "a cat", "--out", str(tmp_path / "o")] + args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert str(empty) in err and "bash recipes/nano.sh" in err and "model.safetensors" in err


# ------------------------------------------------------------------------------------------------
# the compiled step, positions, dtypes

def test_compiled_step_compiles_once_and_equals_eager(lm):
    """Under compile=True the decode step (forward + sampling) is one graph, with no break
    (fullgraph: a host sync would be an error), reused by a second call with other prompt lengths;
    codes equal eager ones."""
    s = Sampling(guidance_scale=1.5, temperature=5.0, top_p=0.95, repetition_penalty=1.1)
    neg = [301, 8, 302]
    calls = [([[301, 5, 17, 9, 302], [301, 44, 302]], [0, 1]),
             ([[301, 5, 302], [301, 44, 45, 46, 302]], [2, 3])]
    torch._dynamo.reset()
    sample._compiled_steps.clear()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for prompts, seeds in calls:
        eager = generate(lm, prompts, neg, TEXT, CODES, 10, seeds, s, progress=False)
        compiled = generate(lm, prompts, neg, TEXT, CODES, 10, seeds, s, compile=True,
                            progress=False)
        assert torch.equal(eager, compiled)
        assert len(set(eager.flatten().tolist())) > 3  # a sequence worth comparing
    assert counters["stats"]["unique_graphs"] == 1
    lm.cache = None


def test_compiled_step_reads_plain_weights_of_a_prepared_bf16_model(lm):
    """A model readied for decoding in bf16 (packed, with fused projections where oneDNN packs
    bf16) compiles to one graph as well: the graph reads the weights themselves, never the packed
    or fused copies (whose own weights stay on the meta device); its codes are eager's on the
    same weights, give or take a bf16 rounding."""
    bf16 = Transformer(lm.args).eval()
    bf16.load_state_dict(lm.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    args = ([[301, 5, 17, 9, 302]], [301, 8, 302], TEXT, CODES, 10, [0], Sampling(top_k=1))
    plain = generate(bf16, *args, progress=False)
    bf16.prepare_decoding((TEXT, TEXT + CODES))
    torch._dynamo.reset()
    sample._compiled_steps.clear()
    torch._dynamo.utils.counters.clear()
    compiled = generate(bf16, *args, compile=True, progress=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert (compiled == plain).float().mean() >= 0.8
    bf16.cache = None


def test_position_limit_is_checked_before_any_work():
    lm = Transformer(ModelArgs(vocab_size=TEXT + CODES, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                               intermediate_size=64, max_position_embeddings=40)).eval()
    limit = lm.args.max_position_embeddings
    prompt = [301, 5, 302]
    with pytest.raises(ValueError, match=rf"3 tokens \+ {limit} image tokens = {limit + 3} "
                       rf"positions.*\({limit}\)"):
        generate(lm, [prompt], [301, 302], TEXT, CODES, limit, [0], Sampling(), progress=False)
    assert lm.cache is None  # nothing was set up
    assert generate(lm, [prompt], [301, 302], TEXT, CODES, limit - 3, [0], Sampling(top_k=1),
                    progress=False).shape == (1, limit - 3)


def test_png_bytes_do_not_depend_on_n(ckpts, tmp_path):
    """Image j of seed s is image 0 of seed s + j, byte for byte, whatever --n and --batch-size."""
    lm, vq = ckpts
    run = lambda out, *args: main(["--prompt", "a cat", "--ckpt", lm, "--vq", vq, "--size", "32",
                                   "--out", str(tmp_path / out), *args])
    run("many", "--n", "5", "--batch-size", "3")
    run("one", "--n", "1", "--seed", "3")
    assert ((tmp_path / "many" / "a-cat_s0_3.png").read_bytes()
            == (tmp_path / "one" / "a-cat_s3_0.png").read_bytes())


def test_slow_dtype_runs_with_one_warning(ckpts, tmp_path, capsys, monkeypatch):
    import model
    monkeypatch.setattr(model, "cpu_bf16_native", lambda: False)
    main(["--prompt", "a cat", "--ckpt", ckpts[0], "--vq", ckpts[1], "--size", "32", "--n", "1",
          "--dtype", "bfloat16", "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("sample.py: warning: bfloat16 on a CPU "
                                                         "without bf16")
    assert "Traceback" not in err
    assert (tmp_path / "a-cat_s0_0.png").is_file()


def test_int8_quantized_sampling_runs(ckpts, tmp_path):
    main(["--prompt", "a cat", "--ckpt", ckpts[0], "--vq", ckpts[1], "--size", "32", "--n", "2",
          "--quantize", "int8", "--out", str(tmp_path)])
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_jacobi_from_the_cli(ckpts, tmp_path):
    """--jacobi writes the same files; its last line counts fewer forwards than tokens (greedy: same
    codes)."""
    lm, vq = ckpts
    for out, extra in (("plain", []), ("jacobi", ["--jacobi", "--window", "4"])):
        r = subprocess.run([sys.executable, "sample.py", "--prompt", "a cat", "--ckpt", lm,
                            "--vq", vq, "--size", "64", "--n", "2", "--top-k", "1",
                            "--out", str(tmp_path / out), "--save-codes", *extra],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        forwards = float(re.search(r"([\d.]+) forwards per image \(plain decoding: 16\)",
                                   r.stdout).group(1))
        assert forwards == 16.0 if out == "plain" else 4.0 <= forwards < 16.0
    for j in (0, 1):
        assert np.array_equal(np.load(tmp_path / "plain" / f"a-cat_s0_{j}.npy"),
                              np.load(tmp_path / "jacobi" / f"a-cat_s0_{j}.npy"))

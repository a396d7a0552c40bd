"""GRPO: the reward, the advantage, the loss against a slow per-sequence reference, one step's
effect, the loop.

    python -m pytest -q tests/test_grpo.py
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import grpo
import sample
import shapes
from fixtures import write_tiny_lm, write_tiny_vq
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reward_is_one_on_the_scene_a_caption_describes_and_zero_on_a_blank_or_wrong_one():
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng, c) for c in shapes.CATEGORIES]
    captions = [caption for _, caption, _ in scenes]
    images = [[np.asarray(shapes.render_shapes(spec, 64)), np.full((64, 64, 3), 245, np.uint8)]
              for spec, _, _ in scenes]
    assert grpo.geneval_reward(captions, images).tolist() == [[1.0, 0.0]] * len(captions)
    # the first scene's picture under the second caption: a different request
    assert grpo.geneval_reward([captions[1]], [[images[0][0]]]).tolist() == [[0.0]]


def test_parts_reward_gives_partial_credit_where_the_rule_gives_zero():
    caption = "a red circle below a blue square"
    drawn = [(("square", "blue"), ("circle", "red")), (("circle", "red"), ("square", "blue")),
             (("circle", "blue"), ("circle", "red")), (("circle", "blue"), ("square", "red"))]
    images = [[np.asarray(shapes.render_shapes([dict(shape=s, color=c, center=[0.5, y], size=0.25)
                                                for (s, c), y in zip(pair, (0.25, 0.75))], 64))
               for pair in drawn]]
    assert grpo.geneval_reward([caption], images).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    parts = grpo.geneval_reward([caption], images, parts=True)
    np.testing.assert_allclose(parts, [[1.0, 2 / 3, 1 / 3, 0.0]])
    reward = grpo.REWARDS["geneval-nano-parts"](None, "cpu")
    np.testing.assert_array_equal(reward([caption], images), parts)


def test_draw_captions_covers_the_drawable_categories_and_never_the_held_out_captions():
    exclude = shapes.held_out()
    assert {p["caption"] for p in shapes.prompt_set()} < exclude
    assert {p["caption"] for p in shapes.prompt_set(20, split="validation")} < exclude
    drawn = grpo.draw_captions(np.random.default_rng(1), 300, list(shapes.DRAWABLE), exclude)
    assert {c for c, _ in drawn} == set(shapes.DRAWABLE)
    assert not {caption for _, caption in drawn} & exclude
    for _, caption in drawn:
        shapes.parse_caption(caption)  # canonical: the reward can read it
    assert drawn[:20] == grpo.draw_captions(np.random.default_rng(1), 20, list(shapes.DRAWABLE),
                                            exclude)


def test_the_update_runs_under_bf16_autocast_exactly_when_the_rollouts_are_bf16():
    x = torch.randn(2, 8)
    w = torch.randn(8, 8)
    for dtype, want in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)):
        with grpo.update_autocast(dtype, torch.device("cpu")):
            assert (x @ w).dtype == want


def test_group_advantages_normalise_within_each_group():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    a = grpo.group_advantages(r)
    for row, adv in zip(r, a):
        expect = (row - row.mean()) / (row.std(ddof=1) + 1e-4)
        assert np.allclose(adv.numpy(), expect, atol=1e-6)
    assert a[1].abs().max() == 0  # a group that scores alike teaches nothing


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    lm = write_tiny_lm(root / "lm", codebook_size=64, repetition_penalty=None)
    # the nano layout: sampling defaults shipped
    with open(os.path.join(lm, "generation_config.json"), "w") as f:
        json.dump({"guidance_scale": 2.0, "negative_prompt": "", "image_top_k": 10}, f)
    return lm, write_tiny_vq(root / "vq", jit=False)


def slow_logprobs(model, tok, caption, codes, first_id, K):
    """log p of each image token, one uncached forward per prefix: obviously right, quadratic."""
    ids, _ = data.make_sequence(tok, caption, codes, first_id)
    n = codes.numel()
    out = []
    for t in range(len(ids) - n, len(ids)):
        logits = model(ids[None, :t], vocab=(first_id, first_id + K))[0, -1]
        out.append(logits.log_softmax(-1)[ids[t] - first_id])
    return torch.stack(out)


def policy(lm, K=64):
    """(tokenizer, model, first image id) of a tiny checkpoint with K codes."""
    tok = data.load_text_tokenizer(lm)
    model = Transformer.from_pretrained(lm)
    return tok, model, data.first_image_id(model.args.vocab_size, K, tok.get_vocab_size())


def step_gradient(model, ref, *args, **kw) -> dict:
    """{name: gradient} of one grpo.policy_step(model, ref, opt, *args, **kw), the weights left
    as they are: lr 0, and the step's zero_grad skipped so that the gradient stays."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.zero_grad = lambda set_to_none=True: None
    model.zero_grad()
    grpo.policy_step(model, ref, opt, *args, **kw)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_loss_gradient_is_the_advantage_weighted_logprob_gradient(tiny):
    """Batched and padded log-probs equal the slow loop; with beta, the k3 term's gradient is
    (1 - exp(ref - logp)) per token; the whole loss is normalised by every image token of the
    rollout."""
    lm, _ = tiny
    tok, model, first_id = policy(lm)
    ref = Transformer.from_pretrained(lm)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    K = 64
    captions = ["a red circle", "two blue squares to the left of a yellow triangle"]
    codes = torch.randint(0, K, (2, 2, 2, 2), generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([[0.7, -0.7], [0.0, 1.2]])
    beta = 0.1

    fast = step_gradient(model, ref, tok, captions, codes, adv, first_id, K, beta, micro_batch=3,
                         grad_clip=0)

    model.zero_grad()
    total = 0
    for p in range(2):
        for g in range(2):
            logp = slow_logprobs(model, tok, captions[p], codes[p, g], first_id, K)
            with torch.no_grad():
                ref_logp = slow_logprobs(ref, tok, captions[p], codes[p, g], first_id, K)
            d = ref_logp - logp
            total = total - (adv[p, g] * logp).sum() + beta * (torch.exp(d) - d - 1).sum()
    (total / codes.numel()).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(fast[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_a_step_raises_the_likelihood_of_rewarded_images(tiny):
    lm, _ = tiny
    tok, model, first_id = policy(lm)
    K = 64
    codes = torch.randint(0, K, (1, 2, 2, 2), generator=torch.Generator().manual_seed(1))
    adv = grpo.group_advantages([[1.0, 0.0]])
    before = [slow_logprobs(model, tok, "a red circle", codes[0, g], first_id, K).sum().item()
              for g in range(2)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    grpo.policy_step(model, None, opt, tok, ["a red circle"], codes, adv, first_id, K, 0.0, 8, 0)
    after = [slow_logprobs(model, tok, "a red circle", codes[0, g], first_id, K).sum().item()
             for g in range(2)]
    assert after[0] > before[0] and after[1] < before[1]


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_run_writes_checkpoints_and_resumed_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    lm, vq = tiny
    # a random model never draws a caption's scene (GenEval reward 0 everywhere, so no gradient):
    # reward brightness
    monkeypatch.setattr(grpo, "geneval_reward",
                        lambda captions, images: images.mean(axis=(2, 3, 4)) / 255)
    argv = ["--ckpt", lm, "--vq", vq, "--size", "32", "--prompts-per-step", "3", "--group", "2",
            "--lr", "1e-2", "--beta", "0.04", "--steps", "2", "--save-every", "1", "--keep", "0",
            "--no-progress"]
    grpo.main([*argv, "--out", str(tmp_path / "a")])
    grpo.main([*argv, "--out", str(tmp_path / "b"), "--stop-after", "1"])
    grpo.main([*argv, "--out", str(tmp_path / "b"), "--resume"])
    a, b = tmp_path / "a" / "step_0000002", tmp_path / "b" / "step_0000002"
    assert (tmp_path / "a" / "latest").read_text().strip() == "step_0000002"
    wa = Transformer.from_pretrained(a).state_dict()
    wb = Transformer.from_pretrained(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    start = Transformer.from_pretrained(lm).state_dict()
    assert any(not torch.equal(wa[k], start[k]) for k in wa)  # it trained
    assert read_log(tmp_path / "a") == [dict(r, rollout_s=x["rollout_s"], update_s=x["update_s"])
                                       for r, x in zip(read_log(tmp_path / "b"),
                                                       read_log(tmp_path / "a"))]
    # a checkpoint is a complete one: sample.py's defaults travel with it
    assert json.loads((a / "generation_config.json").read_text())["guidance_scale"] == 2.0
    log = read_log(tmp_path / "a")
    assert [r["step"] for r in log] == [1, 2] and all(0 <= r["reward"] <= 1 and "kl" in r
                                                      for r in log)


def test_best_is_the_policy_of_the_best_validation_and_survives_a_resume(tiny, tmp_path,
                                                                         monkeypatch):
    """--val-every 2 over 5 steps: steps 2, 4 and the last are validated and logged, {out}/best
    holds the weights of the step that scored highest (the earliest of ties), and an interrupted,
    resumed run keeps the same."""
    lm, vq = tiny
    monkeypatch.setattr(grpo, "geneval_reward",
                        lambda captions, images: images.mean(axis=(2, 3, 4)) / 255)
    # the tiny model draws no scene: score validation by brightness, which the reward raises, and
    # which must therefore move between steps
    monkeypatch.setattr(grpo.shapes, "evaluate", lambda prompts, images: dict(
        overall=float(np.mean([np.mean(i) for imgs in images for i in imgs])) / 255,
        categories={"two_object": dict(accuracy=0.5, images=len(images))}))
    argv = ["--ckpt", lm, "--vq", vq, "--size", "32", "--prompts-per-step", "3", "--group", "2",
            "--temperature", "5", "--lr", "1e-2", "--beta", "0", "--steps", "5", "--save-every",
            "1", "--keep", "0", "--val-every", "2", "--val-n", "1", "--dtype", "float32",
            "--no-progress"]
    grpo.main([*argv, "--out", str(tmp_path / "a")])
    grpo.main([*argv, "--out", str(tmp_path / "b"), "--stop-after", "3"])
    grpo.main([*argv, "--out", str(tmp_path / "b"), "--resume"])
    validated = [(r["step"], r["validation"]) for r in read_log(tmp_path / "a")
                 if "validation" in r]
    steps, scores = zip(*validated)
    assert steps == (2, 4, 5) and len(set(scores)) > 1
    chosen = json.loads((tmp_path / "a" / "best" / "validation.json").read_text())
    assert chosen["step"] == steps[int(np.argmax(scores))]
    assert round(chosen["overall"], 4) == max(scores)
    best = Transformer.from_pretrained(tmp_path / "a" / "best").state_dict()
    then = Transformer.from_pretrained(tmp_path / "a" / f"step_{chosen['step']:07d}").state_dict()
    assert all(torch.equal(best[k], then[k]) for k in best)
    # a loadable checkpoint, sampling defaults included
    assert json.loads((tmp_path / "a" / "best" / "generation_config.json").read_text())
    assert json.loads((tmp_path / "b" / "best" / "validation.json").read_text()) == chosen
    resumed = Transformer.from_pretrained(tmp_path / "b" / "best").state_dict()
    assert all(torch.equal(best[k], resumed[k]) for k in best)
    assert [(r["step"], r["validation"]) for r in read_log(tmp_path / "b")
            if "validation" in r] == validated
    # another run's best in --out is not taken for this run's
    (tmp_path / "c" / "best").mkdir(parents=True)
    (tmp_path / "c" / "best" / "validation.json").write_text('{"step": 99}')
    grpo.main([*argv[:-7], "--steps", "1", "--no-progress", "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c" / "best").exists()


@pytest.mark.parametrize("flags, word", [(["--group", "1"], "--group"),
                                         (["--val-every", "-1"], "--val-every"),
                                         (["--val-n", "0"], "--val-n"),
                                         (["--categories", "cats"], "cats"),
                                         (["--categories", "colors"], "no caption RL may draw"),
                                         (["--categories", "cats", "--prompts", "CAPS"], "cats"),
                                         (["--steps", "0"], "--steps"),
                                         (["--cfg", "inf"], "guidance scale"),
                                         (["--window", "4"], "add --jacobi"),
                                         (["--size", "4096"], "positions"),
                                         (["--size", "30"], "not a multiple of"),
                                         (["--dtype", "x"], "invalid"),
                                         (["--reward", "cats"], "unknown 'cats'"),
                                         (["--reward", "clip"], "needs --clip-ckpt"),
                                         (["--reward", "clip", "--clip-ckpt", "/nope"], "/nope"),
                                         (["--prompts", "/nope.txt"], "no such file"),
                                         (["--prompts", "EMPTY"], "no usable caption"),
                                         (["--prompts", "CATS"], "not a shapes-world caption"),
                                         (["--prompts", "CATS", "--reward", "geneval-nano-parts"],
                                          "--reward geneval-nano-parts needs"),
                                         (["--logprob", "guided"], "top-k"),
                                         (["--warmup-ratio", "1"], "--warmup-ratio")])
def test_cli_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, flags, word):
    lm, vq = tiny
    out = tmp_path / "run"
    (tmp_path / "empty.json").write_text('[{"caption": ""}]')
    (tmp_path / "cats.txt").write_text("a cat on a mat\n")
    (tmp_path / "caps.txt").write_text("a red circle\n")
    files = {"EMPTY": str(tmp_path / "empty.json"), "CATS": str(tmp_path / "cats.txt"),
             "CAPS": str(tmp_path / "caps.txt")}
    flags = [files.get(f, f) for f in flags]
    with pytest.raises(SystemExit) as e:
        grpo.main(["--ckpt", lm, "--vq", vq, "--out", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert (e.value.code == 2 and "\n" not in err and word in err
            and err.startswith("grpo.py: error: "))
    assert not out.exists()  # found before anything was written


# ------------------------------------------------------------------------------ guided log-prob
def test_guided_logprob_gradient_equals_a_slow_loop_over_both_branches(tiny):
    """--logprob guided: log_softmax((lu + s(lc - lu)) / T) of each image token, both branches
    forwarded with gradient; chunks of 3 tokens recomputed in the backward give the same gradient
    as one pass."""
    lm, _ = tiny
    tok, model, first_id = policy(lm)
    K = 64
    settings = sample.Sampling(guidance_scale=3.0, temperature=0.7, negative_prompt="")
    negative = data.encode_negative(tok, settings.negative_prompt)
    captions = ["a red circle", "two blue squares"]
    codes = torch.randint(0, K, (2, 2, 2, 2), generator=torch.Generator().manual_seed(2))
    adv = torch.tensor([[0.5, -0.5], [1.0, -1.0]])
    grads = [step_gradient(model, None, tok, captions, codes, adv, first_id, K, 0.0, 2, 0,
                           chunk=chunk, guided=(negative, settings)) for chunk in (3, 1000)]

    model.zero_grad()
    total = 0
    for p in range(2):
        for g in range(2):
            ids, _ = data.make_sequence(tok, captions[p], codes[p, g], first_id)
            neg, _ = grpo.negative_sequence(negative, codes[p, g], first_id)
            n = codes[p, g].numel()
            for i in range(n):
                t, u = len(ids) - n + i, len(neg) - n + i
                lc = model(ids[None, :t], vocab=(first_id, first_id + K))[0, -1].log_softmax(-1)
                lu = model(neg[None, :u], vocab=(first_id, first_id + K))[0, -1].log_softmax(-1)
                scores = (lu + 3.0 * (lc - lu)) / 0.7
                total = total - adv[p, g] * scores.log_softmax(-1)[ids[t] - first_id]
    (total / codes.numel()).backward()
    for n, p in model.named_parameters():
        for fast in grads:
            assert torch.allclose(fast[n], p.grad, atol=1e-5, rtol=1e-4), n


# ------------------------------------------------------------------------------------- captions
def test_prompts_file_formats_and_epochs(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("\ufeffa red circle\n\n  two blue squares  \n", encoding="utf-8")
    assert grpo.read_captions(str(text)) == ["a red circle", "two blue squares"]
    js = tmp_path / "p.json"
    js.write_text("\ufeff" + json.dumps([{"caption": "x", "image_path": "a.png"},
                                         {"caption": ["y", "z"]}, {"caption": ""}, {"no": 1}]),
                  encoding="utf-8")
    assert grpo.read_captions(str(js)) == ["x", "y"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('\ufeff{"caption": "first"}\nnot json\n{"caption": "second"}\n',
                  encoding="utf-8")
    assert grpo.read_captions(str(jl)) == ["first", "second"]
    # an epoch is a permutation; epochs differ; the order is a function of (seed, step)
    caps = [f"c{i}" for i in range(10)]
    steps = [grpo.file_captions(caps, 3, s, 5) for s in range(6)]  # 3 epochs of 2 steps
    for e in range(3):
        assert sorted(steps[2 * e] + steps[2 * e + 1]) == sorted(caps)
    assert steps[0] + steps[1] != steps[2] + steps[3]
    assert steps[4] == grpo.file_captions(caps, 3, 4, 5)


def test_rewards_parse_and_sum_with_weights(tiny, tmp_path, monkeypatch):
    assert grpo.parse_rewards(["geneval-nano", "clip=0.5"]) == {"geneval-nano": 1.0, "clip": 0.5}
    for bad, word in [(["cats"], "unknown"), (["clip=x"], "not a number"),
                      (["clip", "clip=2"], "each name once"), (["clip=inf"], "finite")]:
        with pytest.raises(ValueError, match=word):
            grpo.parse_rewards(bad)
    # a weighted sum of two rewards is what the advantages see; both are logged
    lm, vq = tiny
    monkeypatch.setitem(grpo.REWARDS, "bright",
                        lambda args, device: lambda c, images: images.mean(axis=(2, 3, 4)) / 255)
    monkeypatch.setitem(grpo.REWARDS, "red", lambda args, device: lambda c, images:
                        images[..., 0].mean(axis=(2, 3)) / 255)
    out = tmp_path / "run"
    grpo.main(["--ckpt", lm, "--vq", vq, "--size", "32", "--prompts-per-step", "2", "--group",
               "2", "--steps", "1", "--beta", "0", "--reward", "bright=2", "red=-1", "--out",
               str(out), "--no-progress", "--dtype", "float32"])
    r = read_log(out)[0]
    assert r["reward"] == pytest.approx(2 * r["rewards"]["bright"] - r["rewards"]["red"],
                                        abs=1e-3)


def test_preset_sets_simplears_recipe_and_flags_override():
    a = grpo.parse_args(["--preset", "simplear"])
    assert (a.prompts_per_step, a.group, a.lr, a.schedule, a.warmup_ratio, a.min_lr_ratio,
            a.beta, a.size, a.guidance_scale, a.temperature, a.top_k, a.reward) == (
        7, 4, 1e-6, "cosine", 0.1, 0.1, 0.04, 1024, 1.0, 1.0, 64000, ["clip"])
    b = grpo.parse_args(["--preset", "simplear", "--group", "8", "--cfg", "5"])
    assert (b.group, b.guidance_scale, b.prompts_per_step) == (8, 5.0, 7)
    assert grpo.parse_args([]).prompts_per_step == 7 and grpo.parse_args([]).guidance_scale is None


# ---------------------------------------------------------------------------------- distributed
DIST = """
import sys
import grpo
grpo.REWARDS["bright"] = lambda args, device: lambda c, images: (
    images.astype("int64").sum(axis=(2, 3, 4)) % 5 / 4)
grpo.shapes.evaluate = lambda prompts, images: dict(
    overall=sum(i.mean() for imgs in images for i in imgs) / len(images) / 255, categories={})
grpo.main(sys.argv[1:])
"""


def grpo_args(lm, vq, out, *more):
    # at temperature 5 the tiny random model's images differ within a group
    return ["--ckpt", lm, "--vq", vq, "--size", "32", "--prompts-per-step", "3", "--group", "3",
            "--cfg", "1", "--temperature", "5",
            "--lr", "1e-3", "--beta", "0.04", "--steps", "2", "--reward", "bright",
            "--dtype", "float32", "--no-progress", "--out", str(out), *more]


def test_two_processes_equal_one(tiny, tmp_path, monkeypatch):
    """Ranks split the 3 groups 2 + 1, gather the rewards and sum their gradients: the weights
    after 2 steps equal one process's within 1e-5, and the logs agree. Rank 0 validates after
    each step while rank 1 waits, and keeps the same best as one process."""
    lm, vq = tiny
    monkeypatch.setitem(grpo.REWARDS, "bright", lambda args, device: lambda c, images:
                        images.astype("int64").sum(axis=(2, 3, 4)) % 5 / 4)
    # validation by brightness too (the tiny model draws no scene): DIST's
    monkeypatch.setattr(grpo.shapes, "evaluate", lambda prompts, images: dict(
        overall=sum(i.mean() for imgs in images for i in imgs) / len(images) / 255, categories={}))
    val = ["--val-every", "1", "--val-n", "1"]
    grpo.main(grpo_args(lm, vq, tmp_path / "one", *val))
    (tmp_path / "dist.py").write_text(DIST)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "dist.py"), *grpo_args(lm, vq, tmp_path / "two", *val)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = Transformer.from_pretrained(tmp_path / "one" / "step_0000002").state_dict()
    two = Transformer.from_pretrained(tmp_path / "two" / "step_0000002").state_dict()
    start = Transformer.from_pretrained(lm).state_dict()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3  # it trained
    assert all(r["informative"] > 0.5 for r in read_log(tmp_path / "one"))  # not vacuous
    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for x, y in zip(a, b, strict=True):
        assert x["reward"] == y["reward"] and x["forwarded"] == y["forwarded"] == 9
        assert x["kl"] == pytest.approx(y["kl"], abs=1e-6)
        assert x["validation"] == pytest.approx(y["validation"], abs=1e-4)
    chosen = [json.loads((tmp_path / d / "best" / "validation.json").read_text())
              for d in ("one", "two")]
    assert chosen[0]["step"] == chosen[1]["step"]
    one, two = (Transformer.from_pretrained(tmp_path / d / "best").state_dict()
                for d in ("one", "two"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5


def test_resume_with_a_prompts_file_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    lm, vq = tiny
    monkeypatch.setitem(grpo.REWARDS, "bright", lambda args, device: lambda c, images:
                        images.mean(axis=(2, 3, 4)) / 255)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na red circle\ntwo dogs playing in the snow\n")
    argv = grpo_args(lm, vq, tmp_path / "a", "--prompts", str(prompts), "--steps", "3")
    grpo.main(argv)
    argv_b = grpo_args(lm, vq, tmp_path / "b", "--prompts", str(prompts), "--steps", "3")
    grpo.main([*argv_b, "--stop-after", "1"])
    grpo.main([*argv_b, "--resume"])
    wa = Transformer.from_pretrained(tmp_path / "a" / "step_0000003").state_dict()
    wb = Transformer.from_pretrained(tmp_path / "b" / "step_0000003").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a resumed run that would not continue this one is refused, naming what differs
    for change, word in ((["--group", "2"], "--group 2 here, 3 there"),
                         (["--lr", "1e-2"], "--lr 0.01 here, 0.001 there")):
        with pytest.raises(ValueError, match=word):
            grpo.run(grpo.parse_args([*argv_b, "--steps", "4", "--resume", *change]))
    prompts.write_text("a cat\n")
    with pytest.raises(ValueError, match="holds 1 captions, 4 there"):
        grpo.run(grpo.parse_args([*argv_b, "--steps", "4", "--resume"]))


# ------------------------------------------------------------------------------ CLIP rewards
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP saved as a Hugging Face directory (with a byte-level CLIP tokenizer) and
    as HPSv2's checkpoint layout (open_clip keys under "state_dict", no tokenizer)."""
    import clip
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model = clip.CLIP(clip.CLIPArgs.from_name("tiny")).eval()
    symbols = list(clip.bytes_to_unicode().values())
    words = symbols + [s + "</w>" for s in symbols] + [clip.START, clip.END]
    model.tokenizer = clip.Tokenizer({w: i for i, w in enumerate(words)}, [])
    clip.save_hf(model, root / "hf")
    hps = {"state_dict": {f"module.{k}": v for k, v in
                          clip.export_state(model, "open_clip").items()}}
    torch.save(hps, root / "hps.pt")
    return model, str(root / "hf"), str(root / "hps.pt")


def test_clip_rewards_are_the_references_scores(tiny_clip):
    """clip: cosine with "A photo of {caption}" and SimpleAR's bilinear resize of the [-1, 1]
    image; pickscore: exp(logit_scale) x cosine, reference preprocessing, the caption as is."""
    import clip
    model, hf, _ = tiny_clip
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 40, 40, 3), dtype=np.uint8)
    captions = ["a red circle", "two cats"]
    args = grpo.parse_args(["--clip-ckpt", hf, "--pickscore-ckpt", hf])
    got = grpo.REWARDS["clip"](args, "cpu")(captions, images)
    got_pick = grpo.REWARDS["pickscore"](args, "cpu")(captions, images)
    for p in range(2):
        ids = model.tokenizer([f"A photo of {captions[p]}"])
        ids_pick = model.tokenizer([captions[p]])
        for g in range(3):
            x = torch.from_numpy(images[p, g]).permute(2, 0, 1)[None].float() / 127.5 - 1
            with torch.no_grad():
                x = clip.preprocess(x, mode="simplear", size=32)
                cos = clip.similarity(model, x, ids).item()
                ref = clip.preprocess([images[p, g]], mode="reference", size=32)
                pick = (model.logit_scale.exp() * clip.similarity(model, ref, ids_pick)).item()
            assert got[p, g] == pytest.approx(cos, abs=1e-5)
            assert got_pick[p, g] == pytest.approx(pick, abs=1e-4)


def test_run_with_clip_and_hps_rewards(tiny, tiny_clip, tmp_path):
    lm, vq = tiny
    _, hf, hps = tiny_clip
    out = tmp_path / "run"
    (tmp_path / "p.txt").write_text("a cat\na dog on a bike\n")
    grpo.main(["--ckpt", lm, "--vq", vq, "--size", "32", "--prompts-per-step", "2", "--group",
               "2", "--steps", "1", "--beta", "0", "--reward", "clip=1", "hps=0.5",
               "--clip-ckpt", hf, "--hps-ckpt", hps, "--out", str(out), "--no-progress",
               "--prompts", str(tmp_path / "p.txt")])  # HPSv2's tokenizer: --clip-ckpt's
    r = read_log(out)[0]
    assert set(r["rewards"]) == {"clip", "hps"}
    assert r["reward"] == pytest.approx(r["rewards"]["clip"] + 0.5 * r["rewards"]["hps"],
                                        abs=1e-3)
    assert "categories" not in r  # captions from the file


@pytest.mark.parametrize("what", ["truncated", "architecture", "no tokenizer"])
def test_bad_reward_checkpoint_is_one_line(tiny, tiny_clip, tmp_path, capsys, what):
    import shutil
    lm, vq = tiny
    _, hf, hps = tiny_clip
    flags = {"truncated": ["--reward", "clip", "--clip-ckpt", str(tmp_path / "cut")],
             "architecture": ["--reward", "clip", "--clip-ckpt", lm],
             "no tokenizer": ["--reward", "hps", "--hps-ckpt", hps]}[what]
    shutil.copytree(hf, tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        grpo.main(["--ckpt", lm, "--vq", vq, "--out", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("grpo.py: error: "), err
    assert {"truncated": "model.safetensors", "architecture": "config.json",
            "no tokenizer": "tokenizer"}[what] in err, err
    assert not out.exists()


def test_activation_checkpointing_gives_the_same_gradient(tiny):
    lm, _ = tiny
    tok, model, first_id = policy(lm)
    K = 64
    codes = torch.randint(0, K, (2, 2, 2, 2), generator=torch.Generator().manual_seed(3))
    adv = torch.tensor([[0.5, -0.5], [1.0, -1.0]])
    grads = []
    for recompute in (False, True):
        model.gradient_checkpointing = recompute
        grads.append(step_gradient(model, model, tok, ["a cat", "a dog"], codes, adv, first_id,
                                   K, 0.1, 3, 0))
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert any(g.abs().max() > 0 for g in grads[0].values())

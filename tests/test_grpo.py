"""GRPO: the reward, the advantage, the loss against a slow per-sequence reference, one step's
effect, the loop.

    python -m pytest -q tests/test_grpo.py
"""
import json
import os

import numpy as np
import pytest
import torch

import data
import eval as geneval
import grpo
from fixtures import write_tiny_lm, write_tiny_vq
from model import Transformer


def test_reward_is_one_on_the_scene_a_caption_describes_and_zero_on_a_blank_or_wrong_one():
    rng = np.random.default_rng(0)
    scenes = [data.sample_scene(rng, c) for c in data.CATEGORIES]
    captions = [caption for _, caption, _ in scenes]
    images = [[np.asarray(data.render_shapes(spec, 64)), np.full((64, 64, 3), 245, np.uint8)]
              for spec, _, _ in scenes]
    assert grpo.geneval_reward(captions, images).tolist() == [[1.0, 0.0]] * len(captions)
    # the first scene's picture under the second caption: a different request
    assert grpo.geneval_reward([captions[1]], [[images[0][0]]]).tolist() == [[0.0]]


def test_draw_captions_covers_the_categories_and_never_draws_the_benchmark():
    exclude = frozenset(p["caption"] for p in geneval.prompt_set())
    drawn = grpo.draw_captions(np.random.default_rng(1), 300, list(data.CATEGORIES), exclude)
    assert {c for c, _ in drawn} == set(data.CATEGORIES)
    assert not {caption for _, caption in drawn} & exclude
    for _, caption in drawn:
        geneval.parse_caption(caption)  # canonical: the reward can read it
    assert drawn[:20] == grpo.draw_captions(np.random.default_rng(1), 20, list(data.CATEGORIES),
                                            exclude)


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


def test_loss_gradient_is_the_advantage_weighted_logprob_gradient(tiny):
    """Batched and padded log-probs equal the slow loop; with beta, the k3 term's gradient is
    (1 - exp(ref - logp)) per token; the whole loss is normalised by every image token of the
    rollout."""
    lm, _ = tiny
    tok = data.load_text_tokenizer(lm)
    model, ref = Transformer.from_pretrained(lm), Transformer.from_pretrained(lm)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    K = 64
    first_id = data.first_image_id(model.args.vocab_size, K, tok.get_vocab_size())
    captions = ["a red circle", "two blue squares to the left of a yellow triangle"]
    codes = torch.randint(0, K, (2, 2, 2, 2), generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([[0.7, -0.7], [0.0, 1.2]])
    beta = 0.1

    # lr 0: the step leaves the weights; the gradient stays
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.zero_grad = lambda set_to_none=True: None
    grpo.policy_step(model, ref, opt, tok, captions, codes, adv, first_id, K, beta, micro_batch=3,
                     grad_clip=0)
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}

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
    tok = data.load_text_tokenizer(lm)
    model = Transformer.from_pretrained(lm)
    K = 64
    first_id = data.first_image_id(model.args.vocab_size, K, tok.get_vocab_size())
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
    argv = ["--ckpt", lm, "--vq", vq, "--size", "32", "--prompts", "3", "--group", "2",
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


@pytest.mark.parametrize("flags, word", [(["--group", "1"], "--group"),
                                         (["--categories", "cats"], "cats"),
                                         (["--steps", "0"], "--steps"),
                                         (["--cfg", "inf"], "guidance scale"),
                                         (["--window", "4"], "add --jacobi"),
                                         (["--size", "4096"], "positions"),
                                         (["--size", "30"], "not a multiple of"),
                                         (["--dtype", "x"], "invalid")])
def test_cli_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, flags, word):
    lm, vq = tiny
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        grpo.main(["--ckpt", lm, "--vq", vq, "--out", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert (e.value.code == 2 and "\n" not in err and word in err
            and err.startswith("grpo.py: error: "))
    assert not out.exists()  # found before anything was written

"""jacobi.py: greedy codes equal plain decoding's, sampled codes have exactly its distribution
(tested against the distribution computed by enumeration), rows advance independently, the options
and their errors."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import jacobi
import sample
from jacobi import Jacobi, Stats
from model import ModelArgs, Transformer
from sample import Sampling

TEXT = 307  # 300 text ids + 7 special tokens, then the codes


def tiny_lm(codes, seed=0, bias=0.1, scale=1.0):
    """A random Qwen2 with SimpleAR's vocabulary layout; scale multiplies the (tied) embedding, and
    so the logits: large for greedy codes that vary, small for distributions worth sampling."""
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(vocab_size=TEXT + codes, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              intermediate_size=64, bos_token_id=None, eos_token_id=None)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "bias" in n:
                p.normal_(0, bias)
        m.embed_tokens.weight.mul_(scale)
    return m


PROMPTS = [[301, 5, 17, 9, 302], [301, 44, 302], [301, 5, 17, 9, 302], [301, 8, 8, 8, 8, 8, 302]]
NEGATIVE = [301, 8, 302, 7]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(64, bias=3.0, scale=3.0)


@pytest.mark.parametrize("window", [1, 2, 4, 16, 40])
@pytest.mark.parametrize("options", [dict(), dict(init="above"), dict(init="left", coupling=False),
                                     dict(init="random", coupling=True), dict(branches=(3,)),
                                     dict(init="above", branches=(2, 2)),
                                     dict(branches=(3,), guess_left=False, row_chain=False)])
def test_greedy_equals_plain_decoding(lm, window, options):
    """top-k 1 makes every step an argmax: Jacobi must give plain decoding's codes, whatever the
    window (40 is clipped to the 16 tokens), the initial drafts, the coupling and the batch."""
    s = Sampling(guidance_scale=3.0, top_k=1, repetition_penalty=1.3)
    want = sample.generate(lm, PROMPTS, NEGATIVE, TEXT, 64, 16, [0, 1, 2, 3], s, progress=False)
    stats = Stats()
    got = jacobi.generate(lm, PROMPTS, NEGATIVE, TEXT, 64, 16, [0, 1, 2, 3], s,
                          Jacobi(window, **options), width=4, stats=stats, progress=False)
    assert torch.equal(got, want)
    assert min(len(set(row)) for row in want.tolist()) >= 10  # codes worth comparing
    alone = jacobi.generate(lm, PROMPTS[1:2], NEGATIVE, TEXT, 64, 16, [9], s,
                            Jacobi(window, **options), width=4, progress=False)
    assert torch.equal(alone[0], want[1])
    # all but the prefill's
    assert sum(stats.committed[c] * c for c in range(len(stats.committed))) == 4 * 15
    assert all(1 < f <= 16 for f in stats.forwards) and len(stats.forwards) == 4
    if window == 1:
        assert stats.forwards == [16] * 4  # one token per forward: plain decoding


def test_rows_advance_independently_of_their_batch():
    """Sampled codes of an image depend on its prompt and seed only, not on which images share its
    batch, though each row commits a different number of tokens per forward."""
    lm = tiny_lm(64, bias=3.0)
    s = Sampling(guidance_scale=2.0, temperature=5.0, top_k=20, top_p=0.95,
                 repetition_penalty=1.1)
    together = jacobi.generate(lm, PROMPTS, NEGATIVE, TEXT, 64, 16, [5, 6, 7, 8], s, progress=False)
    for i in (0, 3):
        alone = jacobi.generate(lm, [PROMPTS[i]], NEGATIVE, TEXT, 64, 16, [5 + i], s,
                                progress=False)
        assert torch.equal(alone[0], together[i])
    assert not torch.equal(together[0], together[2])  # same prompt, other seed
    assert min(len(set(row)) for row in together.tolist()) >= 5


@pytest.mark.parametrize("speculative", [None, Jacobi(), Jacobi(16, "above"),
                                         Jacobi(5, "random"), Jacobi(branches=(3, 2))])
def test_batch_independence_in_bf16(speculative):
    """In bf16 too (where a changed reduction order shows in the codes), an image's codes do not
    depend on its batch: prompts of other lengths, rows at other positions. Plain decoding and
    Jacobi alike."""
    lm = tiny_lm(64, bias=3.0).to(torch.bfloat16).prepare_decoding((TEXT, TEXT + 64))
    s = Sampling(guidance_scale=2.0, temperature=5.0, top_k=20, repetition_penalty=1.1)
    run = (lambda prompts, seeds: sample.generate(lm, prompts, NEGATIVE, TEXT, 64, 16, seeds, s,
                                                  progress=False)
           if speculative is None else
           jacobi.generate(lm, prompts, NEGATIVE, TEXT, 64, 16, seeds, s, speculative, width=4,
                           progress=False))
    together = run(PROMPTS, [5, 6, 7, 8])
    for i in range(4):
        assert torch.equal(run([PROMPTS[i]], [5 + i])[0], together[i]), i
    assert min(len(set(row)) for row in together.tolist()) >= 5


def test_unguided_and_window_one_runs(lm):
    s = Sampling(guidance_scale=1.0, temperature=2.0)
    codes = jacobi.generate(lm, PROMPTS, NEGATIVE, TEXT, 64, 9, [0, 1, 2, 3], s, Jacobi(3, "above"),
                            progress=False)
    assert codes.shape == (4, 9) and codes.min() >= 0 and codes.max() < 64


# ------------------------------------------------------------------------------------------------
# exactness in distribution: Jacobi's samples against the distribution plain decoding samples from

K = 6
LENGTH = 5
SAMPLES = 24000
SETTINGS = Sampling(guidance_scale=2.0, temperature=1.8, top_k=5, top_p=0.97,
                    repetition_penalty=1.5)
PROMPT = [301, 5, 17, 302]


@torch.no_grad()
def exact_distribution(model, s):
    """P(codes) of every code sequence of LENGTH codes under plain decoding's pipeline, by
    enumeration: one uncached forward per prefix and branch. → {sequence: probability}."""
    probs = {(): 1.0}
    for t in range(LENGTH):
        prefixes = list(probs)
        cond = model(torch.tensor([PROMPT + [TEXT + c for c in x] for x in prefixes]),
                     vocab=(TEXT, TEXT + K))[:, -1]
        uncond = model(torch.tensor([NEGATIVE + [TEXT + c for c in x] for x in prefixes]),
                       vocab=(TEXT, TEXT + K))
        seen = torch.zeros(len(prefixes), K, dtype=torch.bool)
        for i, x in enumerate(prefixes):
            seen[i, list(x)] = True
        p = torch.softmax(sample.guided_scores(cond, uncond[:, -1], seen, s), -1).double()
        probs = {x + (c,): probs[x] * p[i, c].item() for i, x in enumerate(prefixes)
                 for c in range(K) if p[i, c] > 0}
    return probs


def chi_square_failures(codes, exact, alpha=1e-3):
    """The (positions, statistic, threshold) of every per-position marginal, adjacent-pair joint
    and the whole sequence's joint (the long-range structure a pair misses) that holds a value of
    probability 0 or whose chi-square goodness-of-fit test rejects (cells with expected count < 5
    pooled). Bonferroni: each of the 2 * LENGTH statistics is tested at alpha / their number, so
    that exact samples fail the whole test with probability alpha at most."""
    failures = []
    groups = [(t,) for t in range(LENGTH)] + [(t, t + 1) for t in range(LENGTH - 1)]
    groups.append(tuple(range(LENGTH)))
    alpha = alpha / len(groups)
    for where in groups:
        want = {}
        for x, p in exact.items():
            key = tuple(x[t] for t in where)
            want[key] = want.get(key, 0.0) + p
        got = {}
        for row in codes[:, list(where)].tolist():
            got[tuple(row)] = got.get(tuple(row), 0) + 1
        if not set(got) <= set(want):
            failures.append((where, "a value of probability 0 was sampled", 0))
            continue
        cells = []
        pooled_e = 0.0
        pooled_o = 0
        for key, p in want.items():
            e, o = p * len(codes), got.get(key, 0)
            if e < 5:
                pooled_e, pooled_o = pooled_e + e, pooled_o + o
            else:
                cells.append((o, e))
        if pooled_e > 0:
            cells.append((pooled_o, pooled_e))
        stat = sum((o - e) ** 2 / e for o, e in cells)
        threshold = chi2_quantile(len(cells) - 1, 1 - alpha)
        if stat > threshold:
            failures.append((where, round(stat, 1), round(threshold, 1)))
    return failures


def chi2_quantile(df, q):
    """The q-quantile of chi-square with df degrees of freedom (Wilson-Hilferty; within 1% for
    df >= 3)."""
    z = math.sqrt(2) * erfinv(2 * q - 1)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def erfinv(y):
    lo, hi = -6.0, 6.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erf(mid) < y else (lo, mid)
    return (lo + hi) / 2


@pytest.fixture(scope="module")
def small():
    model = tiny_lm(K, seed=3, bias=0.5, scale=0.1)
    return model, exact_distribution(model, SETTINGS)


def test_the_test_sees_a_two_point_bias(small):
    """Power check: plain decoding passes; the same samples with 2% of the mass moved from one code
    to another at one position fail."""
    model, exact = small
    codes = sample.generate(model, [PROMPT] * SAMPLES, NEGATIVE, TEXT, K, LENGTH, range(SAMPLES),
                            SETTINGS, progress=False)
    assert chi_square_failures(codes, exact) == []
    marginal = torch.bincount(codes[:, 2], minlength=K)
    src, dst = int(marginal.argmax()), int(marginal.argmin())
    biased = codes.clone()
    moved = (biased[:, 2] == src).nonzero()[:int(0.02 * SAMPLES), 0]
    biased[moved, 2] = dst
    assert (2,) in [f[0] for f in chi_square_failures(biased, exact)]  # its marginal, not by chance


@pytest.mark.parametrize("options", [Jacobi(4, "random", coupling=False), Jacobi(4, "above"),
                                     Jacobi(3, "left"), Jacobi(),
                                     Jacobi(4, "random", coupling=False, branches=(3,)),
                                     Jacobi(branches=(2, 2)), Jacobi(branches=(2,)),
                                     Jacobi(5, branches=(4,)), Jacobi(5, "above", branches=(3,)),
                                     Jacobi(5, branches=(4,), guess_left=False, row_chain=False)])
def test_jacobi_samples_have_plain_decodings_distribution(small, options):
    """Every option, trees too (the window of 5 cuts (2, 2) to a root, two candidates and two
    under the first; (2,) is a root, two candidates and a chain of two under the first; (4,) in a
    window of 5 is a root and four candidates), with the left guess and rows that run the chain
    (after "above" initial drafts the guess is often live) and without them."""
    model, exact = small
    codes = jacobi.generate(model, [PROMPT] * SAMPLES, NEGATIVE, TEXT, K, LENGTH, range(SAMPLES),
                            SETTINGS, options, width=2, progress=False)
    assert chi_square_failures(codes, exact) == []


def test_argmax_drafts_with_soft_q_are_caught(small, monkeypatch):
    """SimpleAR's SJD verifies argmax drafts against soft probabilities: the same test rejects
    it."""
    model, exact = small
    monkeypatch.setattr(jacobi, "draft_from", lambda p, u: p.argmax(-1))
    codes = jacobi.generate(model, [PROMPT] * SAMPLES, NEGATIVE, TEXT, K, LENGTH, range(SAMPLES),
                            SETTINGS, Jacobi(4, "random", coupling=False), width=2, progress=False)
    failures = chi_square_failures(codes, exact)
    print("argmax drafts, soft q:", failures)
    assert failures


def test_extra_candidates_verified_against_q_itself_are_caught(small, monkeypatch):
    """A tree's second candidate is drawn from q without the first: verifying it against q itself
    (not renormalised without the first) accepts it too often, and the same test sees it."""
    model, exact = small
    right = jacobi.Tree.candidates

    def wrong(self, root, drafts, q, u, guess=None):
        tokens, proposal, void = right(self, root, drafts, q, u, guess)
        lev = (self.level - 1).clamp(min=0)
        return tokens, torch.cat([proposal[:, :1], q[:, lev[1:]]], dim=1), void

    monkeypatch.setattr(jacobi.Tree, "candidates", wrong)
    codes = jacobi.generate(model, [PROMPT] * SAMPLES, NEGATIVE, TEXT, K, LENGTH, range(SAMPLES),
                            SETTINGS, Jacobi(5, branches=(4,)), width=2, progress=False)
    failures = chi_square_failures(codes, exact)
    print("extra candidates verified against q:", failures)
    assert failures


def first_codes(tree, p, q, drafts, gen, guess=False):
    """The code one forward commits first, for N rows of one window: candidates from drafts and q
    (the root's code, 0, as the left guess if guess), then the tree's verification with fresh
    uniforms."""
    N, W, _ = p.shape
    u = lambda: torch.rand(N, W, generator=gen)  # noqa: E731
    root = torch.zeros(N, 1, dtype=torch.long)
    tokens, proposal, void = tree.candidates(root, drafts, q, u(), root[:, 0] if guess else None)
    path, _, last = tree.verify(p, tokens, proposal, void, u(), u())
    return torch.where(path[:, 0] >= 0, tokens.gather(1, path[:, :1].clamp(min=0))[:, 0], last)


@pytest.mark.parametrize("broken,guess", [(None, False), (None, True), ("no residual", False),
                                          ("no residual", True), ("guess as a draw", True)])
def test_candidates_recursive_rejection_gives_p(monkeypatch, broken, guess):
    """Three candidates for one position (its draft from q, then two more from q without
    replacement; rows whose q is one-hot have no more), each tried against the residual the
    misses before it left: the code kept is distributed as p exactly, 400,000 rows against p by a
    chi-square test. With the guess, the second is the root's code (a one-hot proposal; live in
    the one-hot rows too) and the third is drawn from q without both. Caught: trying them all
    against p itself (no residual), and verifying the guess as if q had drawn it."""
    if broken == "no residual":
        monkeypatch.setattr(jacobi, "residual", lambda target, proposal: target)
    if broken == "guess as a draw":
        right = jacobi.Tree.candidates

        def wrong(self, root, drafts, q, u, guess=None):
            tokens, proposal, void = right(self, root, drafts, q, u, guess)
            mass = q[:, 0].scatter(1, drafts[:, :1], 0.0)
            proposal[:, 2] = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
            return tokens, proposal, void

        monkeypatch.setattr(jacobi.Tree, "candidates", wrong)
    gen = torch.Generator().manual_seed(0)
    N, K = 400_000, 5
    tree = jacobi.Tree(4, (3,), "cpu")
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).expand(N, 4, K)
    q = torch.tensor([0.1, 0.1, 0.3, 0.3, 0.2]).repeat(N, 3, 1)
    q[N // 2:] = F.one_hot(torch.tensor(2), K).float()  # a guess: its draft is all there is
    drafts = sample.invert_cdf(q, torch.rand(N, 3, generator=gen))
    codes = first_codes(tree, p, q, drafts, gen, guess)
    counts = torch.bincount(codes, minlength=K).double()
    want = p[0, 0].double() * N
    stat = float(((counts - want) ** 2 / want).sum())
    assert (stat > chi2_quantile(K - 1, 1 - 1e-3)) == (broken is not None), stat


def test_rows_with_only_void_candidates_run_the_chain(lm):
    """Greedy decoding makes every q one-hot, so a tree's extra candidates are all void: without
    the left guess, every row runs the chain, forward for forward, on codes that vary (a
    repetition penalty) and on uniform ones; kept as a tree, the void candidates of a uniform
    image cost the chain's last slots, and so forwards."""
    for penalty in (1.3, 1.0):
        s = Sampling(guidance_scale=3.0, top_k=1, repetition_penalty=penalty)
        runs = {}
        for name, options in [("chain", dict(branches=())), ("rows", dict(guess_left=False)),
                              ("tree", dict(guess_left=False, row_chain=False))]:
            stats = Stats()
            codes = jacobi.generate(lm, PROMPTS * 4, NEGATIVE, TEXT, 64, 48, range(16), s,
                                    Jacobi(**options), width=8, stats=stats, progress=False)
            runs[name] = (codes, stats.forwards)
        assert torch.equal(runs["rows"][0], runs["chain"][0])
        assert runs["rows"][1] == runs["chain"][1], penalty
        if penalty > 1:
            assert min(len(set(row)) for row in runs["chain"][0].tolist()) >= 10
        else:
            assert sum(runs["tree"][1]) > sum(runs["chain"][1])


def test_window_seen_per_row_layouts():
    """The codes each node's repetition penalty sees, with a chain row and a tree row in one
    batch ([N, W, W] ancestry), against a loop over each node's ancestors."""
    W, K = 6, 9
    trees = [jacobi.Tree(W, (), "cpu"), jacobi.Tree(W, (3,), "cpu")]
    ancestry = torch.stack([t.ancestry for t in trees])
    tokens = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 6, 7, 8, 2, 3]])
    seen = torch.zeros(2, K, dtype=torch.bool)
    seen[0, 8] = seen[1, 0] = True
    got = jacobi.window_seen(seen, tokens, ancestry, Sampling(repetition_penalty=1.2))
    for i, tree in enumerate(trees):
        for t in range(W):
            want = set(seen[i].nonzero()[:, 0].tolist())
            want |= {int(tokens[i, s]) for s in range(1, W) if tree.ancestry[t, s]}
            assert set(got[i, t].nonzero()[:, 0].tolist()) == want, (i, t)


def test_tree_layout():
    """Breadth first: the root, its candidates, theirs, then the chain under the first of the last
    level; cut to the window. Which node's p drafts each position after a path's end."""
    tree = jacobi.Tree(10, (2, 2), "cpu")
    parents = [int(row[:t].nonzero()[-1]) if t else -1
               for t, row in enumerate(tree.ancestry.long())]
    assert parents == [-1, 0, 0, 1, 1, 2, 2, 3, 7, 8]
    assert tree.level.tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 4, 5] and tree.height == 5
    assert tree.below[0].tolist() == [1, 3, 7, 8, 9, -1, -1, -1, -1]
    # off the first path: down its own first children, then on along the first path
    assert tree.below[2].tolist() == [5, 7, 8, 9] + [-1] * 5
    assert tree.below[6].tolist() == [7, 8, 9] + [-1] * 6
    assert jacobi.Tree(3, (2, 2), "cpu").level.tolist() == [0, 1, 1]
    assert jacobi.Tree(4, (), "cpu").mask is None  # a chain: the plain window


# ------------------------------------------------------------------------------------------------
# options

def test_branches_from_the_command_line():
    p = argparse.ArgumentParser()
    jacobi.add_args(p)
    assert jacobi.from_args(p.parse_args(["--jacobi", "--branches", "3,2"])).branches == (3, 2)
    assert jacobi.from_args(p.parse_args(["--jacobi"])) == Jacobi()
    args = p.parse_args(["--jacobi", "--no-guess-left", "--no-row-chain"])
    assert jacobi.from_args(args) == Jacobi(guess_left=False, row_chain=False)


@pytest.mark.parametrize("kw,match", [(dict(window=0), "window"), (dict(window=2.5), "window"),
                                      (dict(window=True), "window"),
                                      (dict(init="below"), "draft init"),
                                      (dict(branches=(2, 0)), "branches"),
                                      (dict(branches=(True,)), "branches"),
                                      (dict(branches=3), "branches")])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        Jacobi(**kw)

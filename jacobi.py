"""Speculative Jacobi decoding: several image tokens per forward, plain decoding's distribution.

    python sample.py --prompt "two red circles" --jacobi         # window 16, the default options
    python sample.py --prompt "two red circles" --jacobi --window 16 --draft-init random \
        --no-coupling                                            # SJD as published
    python bench.py jacobi                                       # forwards, wall time, histogram
    python -m pytest -q tests/test_jacobi.py

SJD (Teng et al., arXiv 2410.01699; tyshiwo1/Accelerating-T2I-AR-with-SJD,
scheduler/jacobi_iteration_lumina_mgpt.py) is speculative sampling whose drafts come from the model
itself: each forward runs a window of W positions, the last committed token and W - 1 drafts. At
window slot s the logits give the target distribution p_s of position n + s (n = tokens committed),
and the draft d_s for that position, drawn earlier from q_s, is accepted with probability
min(1, p_s(d_s) / q_s(d_s)), left to right. At the first rejection the position is drawn from
norm(max(0, p_s - q_s)); if every draft passes, one more token comes from p_{W-1}. So a forward
commits between 1 and W tokens, and each has exactly the distribution plain decoding gives it.
Drafts that were not reached become p's own samples for the next forward (the Jacobi iteration),
with q := p; positions new to the window get an initial draft whose q is one-hot (a draft fixed
before the forward is, given it, a deterministic guess: accepting it with probability p(d) is
exact).

What this file does beyond SJD's published form, each an option:

* every image advances by its own accepted count (SJD's batched form commits the batch minimum),
  through per-row cache positions (model.py): an image's codes do not depend on its batch;
* the first token is sampled like every other (SimpleAR's SJD takes it greedily), every draft is
  verified against the exact q that drew it (SimpleAR verifies argmax drafts against soft
  probabilities), the residual is not truncated again by top-k (SJD's code is): exact, as tested;
* coupling (default on): a tail draft that was not reached is not redrawn independently but kept
  with probability min(1, p/q), else redrawn from norm(max(0, p - q)): the maximal coupling of
  SJD-PAC's adaptive continuation (arXiv 2603.18599) and of SCD (arXiv 2510.24211). Still a draw
  from p, and drafts that were right stay put;
* spatial initial drafts: the left neighbour (ours by default; SJD's "repeat horizon"), the token
  above (raster index - grid width, ZipAR's neighbour), or a random code (what SJD uses). With
  coupling, left takes 1.5-2% fewer forwards than above at the shipped model's temperature 0.7,
  and they are within 1% at temperature 1.

p is the sampling pipeline of sample.py (repetition penalty over the prefix each slot assumes,
guidance, temperature, top-k, top-p), in float32. Randomness: image i reads its own stream of
uniforms, drawn up front from torch.Generator().manual_seed(seeds[i]), a fixed number per forward.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

import sample
from sample import Sampling, guided_scores, invert_cdf

INITS = ("left", "above", "random")


@dataclass(frozen=True)
class Jacobi:
    """The decoder's options. window: positions per forward (the last committed token + window - 1
    drafts), >= 1 (1 is plain decoding); a window longer than an image is clipped to it. init: the
    initial draft of a new position, one of INITS. coupling: keep unreached drafts by maximal
    coupling instead of redrawing them. Raises ValueError naming a bad option."""

    window: int = 16
    init: str = "left"
    coupling: bool = True

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if self.init not in INITS:
            raise ValueError(f"draft init must be one of {', '.join(INITS)}, got {self.init!r}")


@dataclass
class Stats:
    """What a Jacobi run did: forwards[i] is image i's model forwards (its prefill included), and
    committed[c] counts the forwards that committed c tokens to one image (c = 1..window)."""

    forwards: list = field(default_factory=list)
    committed: list = field(default_factory=list)

    def add(self, forwards, committed):
        self.forwards += [int(f) for f in forwards]
        counts = torch.bincount(committed, minlength=len(self.committed) + 1).tolist()
        old = self.committed + [0] * (len(counts) - len(self.committed))
        self.committed = [a + b for a, b in zip(old, counts)]


def add_args(p):
    """--jacobi and its options, as sample.py, eval.py and grpo.py take them."""
    g = p.add_argument_group("speculative Jacobi decoding (jacobi.py)")
    g.add_argument("--jacobi", action="store_true",
                   help="decode several tokens per forward, with the same distribution")
    g.add_argument("--window", type=int, default=None,
                   help=f"positions per forward, clipped to the image's tokens "
                   f"(default {Jacobi.window})")
    g.add_argument("--draft-init", choices=INITS, default=None,
                   help=f"initial draft of a new position (default {Jacobi.init})")
    g.add_argument("--no-coupling", action="store_true",
                   help="redraw unreached drafts independently (SJD)")


def from_args(args) -> "Jacobi | None":
    """The Jacobi options the flags ask for, None without --jacobi. ValueError for an option that is
    bad or cannot apply (a Jacobi option without --jacobi; --jacobi with --compile, which compiles
    the one-token step)."""
    flags = (("--window", args.window), ("--draft-init", args.draft_init),
             ("--no-coupling", args.no_coupling or None))
    given = [name for name, value in flags if value is not None]
    if not args.jacobi:
        if given:
            raise ValueError(f"{given[0]} applies to Jacobi decoding only: add --jacobi")
        return None
    if getattr(args, "compile", False):
        raise ValueError("--compile compiles the one-token step, which --jacobi does not run: "
                         "drop one of them")
    coupling = False if args.no_coupling else None
    options = dict(window=args.window, init=args.draft_init, coupling=coupling)
    return Jacobi(**{k: v for k, v in options.items() if v is not None})


def take(x, idx):
    """x [N, S, K] at idx [N, S] → [N, S]."""
    return x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def couple(p, q, d, u_keep, u_draw):
    """Speculative sampling's step, elementwise over [N, S]: keep draft d (drawn from q) with
    probability min(1, p(d)/q(d)), else draw from norm(max(0, p - q)). p, q [N, S, K] float32;
    d [N, S] long; u_keep, u_draw [N, S] uniforms → (codes [N, S], kept [N, S] bool). The codes
    are exact draws from p."""
    ratio = take(p, d) / take(q, d)  # q(d) > 0: d was drawn from q
    kept = u_keep < ratio
    residual = (p - q).clamp(min=0)
    # no residual mass only where p == q to the last bit: a draw from p is then the residual's limit
    empty = residual.sum(-1, keepdim=True) <= 0
    redraw = invert_cdf(torch.where(empty, p, residual), u_draw)
    return torch.where(kept, d, redraw), kept


def draft_from(p, u):
    """Jacobi drafts: a draw from p [N, S, K] per position with uniforms u [N, S]. Stored with
    q := p this is exact; SimpleAR's argmax of p with q := p is not (tests/test_jacobi.py)."""
    return invert_cdf(p, u)


@torch.no_grad()
def generate(model, prompts, negative, first_id, codebook_size, n_tokens, seeds,
             sampling=Sampling(), jacobi=Jacobi(), width=None, stats=None, progress=True):
    """Sample n_tokens image codes for each of len(prompts) images → LongTensor [N, n_tokens],
    with the call shape and the distribution of sample.generate (not its codes: the randomness is
    used differently). width: the code grid's width, for init "above" (default: a square grid).
    stats: a Stats to fill. Raises ValueError as sample.generate does."""
    request = (model, prompts, negative, first_id, codebook_size, n_tokens, seeds, sampling)
    sample.check_generation(*request)
    device = model.embed_tokens.weight.device
    N, K = len(prompts), codebook_size
    W = min(jacobi.window, n_tokens)
    width = width or max(1, round(n_tokens ** 0.5))
    vocab = (first_id, first_id + K)
    logits, ends = sample.prefill(model, prompts, negative, vocab, n_tokens + W, sampling)
    top = int(ends.max())
    branches = logits.shape[0] // N
    # image i's uniforms, 5W per forward: W-1 acceptances, W-1 residual draws, 1 last draw,
    # W-1 keeps and W-1 draws of the tail, W-1 initial drafts
    per = 5 * W
    stream = sample.uniforms(seeds, per * n_tokens + 1, device)
    roles = torch.arange(per, device=device)
    images = torch.arange(N, device=device)
    slots = torch.arange(W, device=device)
    codes = torch.zeros(N, n_tokens + W, dtype=torch.long, device=device)  # room past the end
    seen = torch.zeros(N, K, dtype=torch.bool, device=device)
    codes[:, 0] = sample.sample_codes(logits, seen, stream[:, -1], sampling)  # from the prefill
    seen[images, codes[:, 0]] = True
    n = torch.ones(N, dtype=torch.long, device=device)  # tokens committed, per image
    forwards = torch.ones(N, dtype=torch.long, device=device)  # the prefill counts
    drafts = torch.zeros(N, W - 1, dtype=torch.long, device=device)  # positions n .. n+W-2
    q = torch.zeros(N, W - 1, K, device=device)  # the distribution each draft was drawn from
    known = torch.zeros(N, dtype=torch.long, device=device)  # leading drafts that are no guesses
    committed = []
    bar = tqdm(total=N * n_tokens, initial=N, desc="tokens", disable=not progress, leave=False)
    while True:
        active = n < n_tokens
        if not bool(active.any()):  # host syncs: this, kv_len below, the stats
            break
        u = stream.gather(1, (forwards[:, None] - 1) * per + roles)
        u_accept, u_residual = u[:, :W - 1], u[:, W - 1:2 * W - 2]
        u_last, u_keep = u[:, 2 * W - 2], u[:, 2 * W - 1:3 * W - 2]
        u_tail, u_init = u[:, 3 * W - 2:4 * W - 3], u[:, 4 * W - 3:5 * W - 4]
        # initial drafts (one-hot q) where the window reaches positions it had no draft for
        fresh = slots[None, :-1] >= known[:, None]
        guess = initial_drafts(codes, drafts, n, known, width, jacobi.init, u_init, K)
        drafts = torch.where(fresh, guess, drafts)
        q = torch.where(fresh[..., None], F.one_hot(drafts, K).to(q.dtype), q)
        # the window: the last committed code, then the drafts, at each image's own cache columns
        tokens = torch.cat([codes.gather(1, (n - 1)[:, None]), drafts], dim=1)
        cols = ends[:, None] + (n[:, None] - 1 + slots).repeat(branches, 1)  # [R, W]
        kv_len = top + int(n.max()) + W - 1  # the furthest row's last column, for eager attention
        out = model(first_id + tokens.repeat(branches, 1), input_pos=cols, vocab=vocab,
                    kv_len=kv_len)  # [R, W, K]
        uncond = out[N:] if sampling.guided else None
        assumed = window_seen(seen, drafts, sampling)
        p = torch.softmax(guided_scores(out[:N], uncond, assumed, sampling), dim=-1)  # [N, W, K]
        # verify left to right: slot s's logits give position n + s, whose draft is drafts[:, s]
        new, kept = couple(p[:, :-1], q, drafts, u_accept, u_residual)
        a = kept.long().cumprod(1).sum(1)  # drafts accepted before the first rejection
        # then one more: the residual draw at the rejected slot, or from p_{W-1} if all passed
        after = torch.cat([new, invert_cdf(p[:, -1], u_last)[:, None]], dim=1)  # [N, W]
        more = after.gather(1, a[:, None])[:, 0]
        c = torch.minimum(a + 1, n_tokens - n) * active  # committed, clipped at the image's end
        window = torch.cat([drafts, more[:, None]], dim=1)
        window = window.scatter(1, a[:, None], more[:, None])
        keep = slots[None] < c[:, None]  # [N, W]
        at = n[:, None] + slots
        codes.scatter_(1, at, torch.where(keep, window, codes.gather(1, at)))
        seen |= torch.zeros(N, K, device=device).scatter_add_(1, window, keep.float()) > 0
        # the next drafts: position n + c + s was slot c + s of this window (when c + s < W)
        src = (c[:, None] + slots[:-1]).clamp(max=W - 1)
        p_next = p.gather(1, src[..., None].expand(-1, -1, K))
        sampled = draft_from(p_next, u_tail)
        if jacobi.coupling:  # an old draft is kept or moved by maximal coupling: a draw from p
            old = src.clamp(max=W - 2)
            q_old = q.gather(1, old[..., None].expand(-1, -1, K))
            coupled, _ = couple(p_next, q_old, drafts.gather(1, old), u_keep, u_tail)
            sampled = torch.where(src < W - 1, coupled, sampled)
        drafts = torch.where(active[:, None], sampled, drafts)
        q = torch.where(active[:, None, None], p_next, q)
        known = torch.where(active, W - c, known)
        n = n + c
        forwards = forwards + active.long()
        committed.append(c[active])
        bar.update(int(c.sum()))
    bar.close()
    model.cache = None
    if stats is not None:
        counts = torch.cat(committed).cpu() if committed else torch.zeros(0, dtype=torch.long)
        stats.add(forwards.tolist(), counts)
    return codes[:, :n_tokens]


def window_seen(seen, drafts, sampling):
    """[N, W, K] bool: the codes slot s's repetition penalty sees, the committed ones and drafts
    0..s-1 (the prefix that slot assumes), or seen [N, 1, K] when there is no penalty."""
    if sampling.repetition_penalty == 1.0:
        return seen[:, None]
    N, S = drafts.shape
    out = seen[:, None].repeat(1, S + 1, 1)
    rows = torch.arange(N, device=seen.device)
    for s in range(S):
        out[rows[:, None], s + 1:, drafts[:, s, None]] = True  # seen from slot s + 1 on
    return out


def initial_drafts(codes, drafts, n, known, width, init, u, k):
    """Initial drafts of the window's positions n + s (s >= known[i] for image i): a uniform random
    code, or the code at the position above (raster index - width) or to the left, as it stands: a
    committed code, or a draft that is not itself a guess. "left" gives every new position the last
    code that is not a guess (SJD's repeat horizon); "above" climbs rows until it leaves the
    guesses, and takes that last code where it would leave the image. codes [N, *], drafts [N, S],
    u [N, S] → [N, S]."""
    if init == "random":
        return (u * k).long().clamp(max=k - 1)
    S = drafts.shape[1]
    pos = n[:, None] + torch.arange(S, device=drafts.device)  # [N, S]
    first_guess = (n + known)[:, None]  # positions >= this are guesses
    if init == "above":
        rows_up = torch.div(pos - first_guess, width, rounding_mode="floor") + 1
        src = pos - rows_up * width
        src = torch.where(src >= 0, src, first_guess - 1)
    else:
        src = (first_guess - 1).expand_as(pos)
    from_codes = codes.gather(1, src.clamp(max=codes.shape[1] - 1))
    from_drafts = drafts.gather(1, (src - n[:, None]).clamp(min=0, max=S - 1))
    return torch.where(src >= n[:, None], from_drafts, from_codes)

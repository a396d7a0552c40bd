"""Speculative Jacobi decoding: several image tokens per forward, plain decoding's distribution.

    python sample.py --prompt "two red circles" --jacobi         # window 16, the default options
    python sample.py --prompt "two red circles" --jacobi --window 16 --draft-init random \
        --no-coupling --branches 1                               # SJD as published
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
* a tree of candidates (`branches`): SJD-PAC's proactive drafting. The window's first levels hold
  several candidates per position, its draft and then draws from its q without replacement,
  tried in turn under each parent by recursive rejection sampling (each miss leaves
  norm(max(0, target - proposal)) as the next target: exact), in one forward through a tree
  attention mask (model.py, as SpecInfer verifies token trees); the kept path's keys then move
  to their positions' columns. Each extra node is a slot the chain loses, and the chain's end
  commits a nano image's long uniform runs: five candidates for the first position take fewer
  forwards than the chain in windows of 16 and 32 and more in windows of 4 and 8 (README, `bench.py
  jacobi`). So the default is that tree from a window of 16, a chain below.
* in a tree, the left guess (`guess_left`): the first position's second candidate is the last
  committed code, a guess fixed before the forward and so verified with a one-hot proposal in the
  same recursive rejection (exact); the candidates after it are drawn from q without it. The left
  neighbour is p's top code in a quarter of the first position's misses.
* in a tree, rows that run the chain (`row_chain`): a row whose every candidate past a draft is
  void (with the default (5,): its first draft a guess, whose one-hot q leaves nothing to draw,
  and the left guess, if on, that draft) runs the chain in that forward, the slots it would waste
  holding drafts. A forward whose rows differ takes per-row attention masks and verifies both
  layouts, each row keeping its own. The layout follows from the row's own drafts, so a row
  still does not depend on its batch.

p is the sampling pipeline of sample.py (repetition penalty over the prefix each slot assumes,
guidance, temperature, top-k, top-p), in float32. Randomness: image i reads its own stream of
uniforms, drawn up front from torch.Generator().manual_seed(seeds[i]), a fixed number per forward.
"""
import argparse
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

import sample
from sample import Sampling, guided_scores, invert_cdf

INITS = ("left", "above", "random")
TREE, TREE_FROM = (5,), 16  # the default tree and the smallest window it is used in


@dataclass(frozen=True)
class Jacobi:
    """The decoder's options. window: positions per forward (the last committed token + window - 1
    drafts), >= 1 (1 is plain decoding); a window longer than an image is clipped to it. init: the
    initial draft of a new position, one of INITS. coupling: keep unreached drafts by maximal
    coupling instead of redrawing them. branches: candidates per node at the window's first
    levels, a tree (see Tree; () or (1,) is SJD's chain); None: TREE for windows of at least
    TREE_FROM positions, a chain below, which has too few slots to spare (bench.py jacobi).
    guess_left: in a tree, the first drafted position's second candidate is the last committed
    code, a fixed guess. row_chain: in a tree, a row whose every candidate past a draft is void
    (no mass left in its q's, no live guess) runs the chain instead, its own layout per forward.
    Raises ValueError naming a bad option."""

    window: int = 16
    init: str = "left"
    coupling: bool = True
    branches: tuple | None = None
    guess_left: bool = True
    row_chain: bool = True

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if self.init not in INITS:
            raise ValueError(f"draft init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.branches is None:
            return
        try:
            object.__setattr__(self, "branches", tuple(self.branches))
        except TypeError:
            raise ValueError(f"branches must be a sequence of integers, got {self.branches!r}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.branches):
            raise ValueError(f"branches must be integers >= 1, got {self.branches!r}")

    def resolve(self, n_tokens: int) -> "Jacobi":
        """These options as generate runs them for images of n_tokens codes: the window clipped
        to the image, branches None made the default tree for that window."""
        window = min(self.window, n_tokens)
        branches = self.branches
        if branches is None:
            branches = TREE if window >= TREE_FROM else ()
        return dataclasses.replace(self, window=window, branches=branches)


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
    g.add_argument("--branches", type=branch_list, default=None, metavar="K1,K2,...",
                   help="candidates per node at the window's first levels, a tree (SJD-PAC's "
                   f"proactive drafting; 1: a chain, as SJD; default {','.join(map(str, TREE))} "
                   f"for windows of {TREE_FROM} or more, else 1)")
    g.add_argument("--no-guess-left", action="store_true",
                   help="in a tree, draw the first position's second candidate from q too, not "
                   "the last committed code")
    g.add_argument("--no-row-chain", action="store_true",
                   help="in a tree, keep the tree in rows whose extra candidates are all void")


def from_args(args) -> "Jacobi | None":
    """The Jacobi options the flags ask for, None without --jacobi. ValueError for an option that is
    bad or cannot apply (a Jacobi option without --jacobi; --jacobi with --compile, which compiles
    the one-token step; a tree's option where the window runs a chain)."""
    flags = (("--window", args.window), ("--draft-init", args.draft_init),
             ("--no-coupling", args.no_coupling or None), ("--branches", args.branches),
             ("--no-guess-left", args.no_guess_left or None),
             ("--no-row-chain", args.no_row_chain or None))
    given = [name for name, value in flags if value is not None]
    if not args.jacobi:
        if given:
            raise ValueError(f"{given[0]} applies to Jacobi decoding only: add --jacobi")
        return None
    if getattr(args, "compile", False):
        raise ValueError("--compile compiles the one-token step, which --jacobi does not run: "
                         "drop one of them")
    off = lambda flag: False if flag else None  # noqa: E731
    options = dict(window=args.window, init=args.draft_init, coupling=off(args.no_coupling),
                   branches=args.branches, guess_left=off(args.no_guess_left),
                   row_chain=off(args.no_row_chain))
    jacobi = Jacobi(**{k: v for k, v in options.items() if v is not None})
    branches = jacobi.resolve(jacobi.window).branches
    needs = (("--no-row-chain", "a tree of candidates", max(branches, default=1) >= 2),
             ("--no-guess-left", "a tree with several first candidates", branches[:1] >= (2,)))
    for flag, what, runs in needs:
        if flag in given and not runs:
            raise ValueError(f"{flag} applies to {what}, which this window runs without: add "
                             f"--branches K (K >= 2; the default from a window of {TREE_FROM})")
    return jacobi


def branch_list(text):
    """--branches' value: "3,2" → (3, 2), each >= 1."""
    try:
        branches = tuple(int(k) for k in text.split(","))
    except ValueError:
        branches = ()
    if not branches or min(branches) < 1:
        raise argparse.ArgumentTypeError(
            f"expected integers >= 1 separated by commas, got {text!r}")
    return branches


def take(x, idx):
    """x [N, S, K] at idx [N, S] → [N, S]."""
    return x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def residual(p, q):
    """norm(max(0, p - q)) over the last dim: what speculative sampling draws from after a miss.
    Where there is no mass left (p == q to the last bit) it is p, the residual's limit."""
    r = (p - q).clamp(min=0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp(min=1e-30), p)


def couple(p, q, d, u_keep, u_draw):
    """Speculative sampling's step, elementwise over [N, S]: keep draft d (drawn from q) with
    probability min(1, p(d)/q(d)), else draw from norm(max(0, p - q)). p, q [N, S, K] float32;
    d [N, S] long; u_keep, u_draw [N, S] uniforms → (codes [N, S], kept [N, S] bool). The codes
    are exact draws from p."""
    ratio = take(p, d) / take(q, d)  # q(d) > 0: d was drawn from q
    kept = u_keep < ratio
    return torch.where(kept, d, invert_cdf(residual(p, q), u_draw)), kept


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
    jacobi = jacobi.resolve(n_tokens)
    W = jacobi.window
    J = W - 1  # drafted positions ahead of the last committed token
    tree = Tree(W, jacobi.branches, device)
    chain = Tree(W, (), device) if jacobi.row_chain and tree.mask is not None else None
    width = width or max(1, round(n_tokens ** 0.5))
    vocab = (first_id, first_id + K)
    logits, ends = sample.prefill(model, prompts, negative, vocab, n_tokens + W, sampling)
    top = int(ends.max())
    cfg_rows = logits.shape[0] // N  # rows per image: 2 with guidance
    # image i's uniforms, 6W per forward: per window node its acceptance, its residual (or last)
    # draw and its draw as an extra candidate; per drafted position its keep, its draw and its
    # initial draft
    per = 6 * W
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
    drafts = torch.zeros(N, J, dtype=torch.long, device=device)  # positions n .. n+W-2
    q = torch.zeros(N, J, K, device=device)  # the distribution each draft was drawn from
    known = torch.zeros(N, dtype=torch.long, device=device)  # leading drafts that are no guesses
    committed = []
    bar = tqdm(total=N * n_tokens, initial=N, desc="tokens", disable=not progress, leave=False)
    while True:
        active = n < n_tokens
        if not bool(active.any()):  # host syncs: this, kv_len below, the stats
            break
        u = stream.gather(1, (forwards[:, None] - 1) * per + roles)
        u_accept = u[:, :W]  # per node
        u_draw = u[:, W:2 * W]
        u_extra = u[:, 2 * W:3 * W]
        u_keep = u[:, 3 * W:3 * W + J]  # per drafted position
        u_tail = u[:, 4 * W:4 * W + J]
        u_init = u[:, 5 * W:5 * W + J]
        # initial drafts (one-hot q) where the window reaches positions it had no draft for
        fresh = slots[None, :J] >= known[:, None]
        guess = initial_drafts(codes, drafts, n, known, width, jacobi.init, u_init, K)
        drafts = torch.where(fresh, guess, drafts)
        q = torch.where(fresh[..., None], F.one_hot(drafts, K).to(q.dtype), q)
        # the window: the last committed code, then each node's candidate, at consecutive columns
        root = codes.gather(1, (n - 1)[:, None])
        guess = root[:, 0] if jacobi.guess_left else None
        tokens, proposal, void = tree.candidates(root, drafts, q, u_extra, guess)
        layout, ancestry, below = tree, tree.ancestry, tree.below
        if chain is not None:  # a row whose extra candidates are all void runs the chain
            lone = void[:, tree.extra_nodes].all(1)  # [N]
            # host sync: verify only the layouts some active row runs
            n_lone, n_tree = torch.stack([(lone & active).sum(), (~lone & active).sum()]).tolist()
            if n_lone:
                tokens = torch.where(lone[:, None], torch.cat([root, drafts], 1), tokens)
                proposal = torch.where(lone[:, None, None], torch.cat([proposal[:, :1], q], 1),
                                       proposal)
                void = void & ~lone[:, None]
                layout, ancestry, below = chain, chain.ancestry, chain.below
            if n_lone and n_tree:  # both: a mask, a verification and a table per row
                layout = None
                ancestry = torch.where(lone[:, None, None], chain.ancestry, tree.ancestry)
                below = torch.where(lone[:, None, None], chain.below, tree.below)  # [N, W, J]
        cols = ends[:, None] + (n[:, None] - 1 + slots).repeat(cfg_rows, 1)  # [R, W]
        kv_len = top + int(n.max()) + W - 1  # the furthest row's last column, for eager attention
        mask = ancestry.repeat(cfg_rows, 1, 1) if layout is None else layout.mask
        out = model(first_id + tokens.repeat(cfg_rows, 1), input_pos=cols, vocab=vocab,
                    kv_len=kv_len, tree=mask)  # [R, W, K]
        uncond = out[N:] if sampling.guided else None
        assumed = window_seen(seen, tokens, ancestry, sampling)
        p = torch.softmax(guided_scores(out[:N], uncond, assumed, sampling), dim=-1)  # [N, W, K]
        # node v's logits give the position after it; its children are tried there, in order
        if layout is not None:
            path, end, last = layout.verify(p, tokens, proposal, void, u_accept, u_draw)
        else:  # each row takes its layout's verification (the same uniforms)
            by_tree = tree.verify(p, tokens, proposal, void, u_accept, u_draw)
            by_chain = chain.verify(p, tokens, proposal, void, u_accept, u_draw)
            by_tree = (F.pad(by_tree[0], (0, J - tree.height), value=-1), *by_tree[1:])
            path, end, last = (torch.where(lone.view(-1, *[1] * (x.dim() - 1)), y, x)
                               for x, y in zip(by_tree, by_chain))
        a = (path >= 0).sum(1)  # candidates accepted along the path
        c = torch.minimum(a + 1, n_tokens - n) * active  # committed, clipped at the image's end
        H = path.shape[1]
        window = torch.zeros(N, W, dtype=torch.long, device=device)
        window[:, :H] = tokens.gather(1, path.clamp(min=0))
        window = window.scatter(1, a[:, None], last[:, None])
        keep = slots[None] < c[:, None]  # [N, W]
        at = n[:, None] + slots
        codes.scatter_(1, at, torch.where(keep, window, codes.gather(1, at)))
        seen |= torch.zeros(N, K, device=device).scatter_add_(1, window, keep.float()) > 0
        if mask is not None:  # the path's keys to the columns of their positions
            levels = torch.arange(1, H + 1, device=device)
            src = torch.where(path >= 0, path, levels)  # past the path: a column onto itself
            base = (ends - 1)[:, None] + n.repeat(cfg_rows)[:, None]
            model.cache.move(base + src.repeat(cfg_rows, 1), base + levels)
        # the next drafts: position n + c + s takes p from a node below `end` (Tree.below)
        # [N, J]: the node whose p is that position's, -1 past the tree
        below = below[end] if below.dim() == 2 else below[images, end]
        drawn = below >= 0
        p_next = p.gather(1, below.clamp(min=0)[..., None].expand(-1, -1, K))
        sampled = draft_from(p_next, u_tail)
        old = c[:, None] + slots[:J]  # that position's index among this forward's drafts
        existed = old < J
        waits = old < known[:, None]  # an old draft that is no guess
        old = old.clamp(max=max(J - 1, 0))
        q_old = q.gather(1, old[..., None].expand(-1, -1, K))
        d_old = drafts.gather(1, old)
        if jacobi.coupling:  # an old draft is kept or moved by maximal coupling: a draw from p
            coupled, _ = couple(p_next, q_old, d_old, u_keep, u_tail)
            sampled = torch.where(existed, coupled, sampled)
        # where the tree gives no p, an old draft waits as it is (still a draw from its q)
        drafts = torch.where(active[:, None], torch.where(drawn, sampled, d_old), drafts)
        q = torch.where(active[:, None, None], torch.where(drawn[..., None], p_next, q_old), q)
        known = torch.where(active, (drawn | waits).long().cumprod(1).sum(1), known)
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


class Tree:
    """The window's layout, fixed for a run: node 0 is the last committed token; under every node
    of level L - 1 (breadth first) come branches[L - 1] candidates for position n - 1 + L, drawn
    from that position's q without replacement, the first being its draft (SJD-PAC's proactive
    drafting, arXiv 2603.18599); then a chain of drafts under the first node of the last level,
    out to W nodes (a tree larger than W is cut, breadth first). No branches: SJD's chain.

    level [W] long: a node's depth (its position is n - 1 + level); height: the deepest level.
    ancestry [W, W] bool: ancestry[t, s] says node s is t or one of its ancestors; mask: ancestry,
    or None for a chain (the plain causal window). children [W, C] long: each node's children in
    order, -1 padded. below [W, W - 1] long: below[v, s] is the node whose p drafts position
    n + level[v] + 1 + s after a path that ends at v (-1 where there is none). extra: ((position
    index j, rank r), the first node holding it) of every candidate past the draft, in order;
    slots_of[(j, r)]: all the nodes holding it (one per parent)."""

    def __init__(self, W: int, branches: tuple, device):
        parent, level, rank = [-1], [0], [0]
        frontier = [0]
        for k in branches:
            frontier_next = []
            for v in frontier:
                for i in range(k):
                    parent.append(v)
                    level.append(level[v] + 1)
                    rank.append(i)
                    frontier_next.append(len(parent) - 1)
            frontier = frontier_next
        tip = frontier[0]
        while len(parent) < W:
            parent.append(tip)
            level.append(level[tip] + 1)
            rank.append(0)
            tip = len(parent) - 1
        parent, level, rank = parent[:W], level[:W], rank[:W]
        self.level = torch.tensor(level, device=device)
        self.height = max(level)
        ancestry = torch.zeros(W, W, dtype=torch.bool)
        for t in range(W):
            v = t
            while v >= 0:
                ancestry[t, v], v = True, parent[v]
        self.ancestry = ancestry.to(device)
        chain = level == list(range(W))
        self.mask = None if chain else self.ancestry  # a chain is the plain causal window
        kids = [[t for t in range(W) if parent[t] == v] for v in range(W)]
        width = max(1, max(len(k) for k in kids))
        self.children = torch.tensor([k + [-1] * (width - len(k)) for k in kids], device=device)
        # after a path ending at v: down v's first children, and where they end (at a candidate
        # off the first path), on along the first path, whose p's are the least stale there
        first = [0]
        while kids[first[-1]]:
            first.append(kids[first[-1]][0])
        below = torch.full((W, max(W - 1, 0)), -1, dtype=torch.long)
        for v in range(W):
            node, s = v, 0
            while s < W - 1 and (kids[node] or level[node] + 1 < len(first)):
                node = kids[node][0] if kids[node] else first[level[node] + 1]
                below[v, s], s = node, s + 1
        self.below = below.to(device)
        self.extra = sorted({(level[t] - 1, rank[t]): t for t in range(W - 1, 0, -1)
                             if rank[t] > 0}.items())
        self.extra_nodes = [t for t in range(W) if rank[t] > 0]
        self.slots_of = {jr: [t for t in range(W) if (level[t] - 1, rank[t]) == jr]
                         for jr, _ in self.extra}

    def candidates(self, root, drafts, q, u, guess=None):
        """Every node's token, the distribution that drew it and whether it is void (a position's q
        had no mass left for it): root [N, 1], drafts [N, J], q [N, J, K], u [N, W] → tokens [N,
        W], proposal [N, W, K], void [N, W] bool. A node of rank r holds its position's r-th
        candidate: the draft (r = 0), else a draw from q without the candidates before it.
        guess [N] long: the first position's candidate of rank 1 is this code instead, a fixed
        guess (one-hot proposal), void where it repeats the draft; later ranks draw from q
        without it."""
        N, J, K = q.shape
        lev = (self.level - 1).clamp(min=0)
        tokens = torch.cat([root, drafts.gather(1, lev[None, 1:].expand(N, -1))], dim=1)
        proposal = torch.cat([q.new_ones(N, 1, K), q[:, lev[1:]]], dim=1)  # the root's: unread
        void = torch.zeros_like(tokens, dtype=torch.bool)
        none = torch.zeros(N, dtype=torch.bool, device=q.device)
        state = {}  # position j -> (its q without the candidates so far, void, the last one)
        for (j, r), t in self.extra:  # by position, then rank
            mass, gone, prev = state.get(j, (q[:, j], none, drafts[:, j]))
            mass = mass.scatter(1, prev[:, None], 0.0)
            total = mass.sum(-1, keepdim=True)
            gone = gone | (total[:, 0] <= 0)
            draw = invert_cdf(mass, u[:, t])
            prop, empty = mass / total.clamp(min=1e-30), gone
            if guess is not None and (j, r) == (0, 1):
                draw, prop = guess, F.one_hot(guess, K).to(q.dtype)
                empty = guess == drafts[:, 0]
            state[j] = (mass, gone, draw)
            nodes = self.slots_of[(j, r)]
            tokens[:, nodes] = draw[:, None]
            proposal[:, nodes] = prop[:, None]
            void[:, nodes] = empty[:, None]
        return tokens, proposal, void

    def verify(self, p, tokens, proposal, void, u_accept, u_draw):
        """Speculative sampling down the tree. Under each node v the children are tried in turn
        against p[v], each kept with probability min(1, target(x) / proposal(x)), the target
        becoming norm(max(0, target - proposal)) after each miss (recursive rejection sampling,
        exact for candidates drawn without replacement); the path follows the kept child from
        the root. p, proposal [N, W, K] float32 (node t's p is for the position after it; its
        proposal, what drew its token); tokens [N, W]; void [N, W] bool (never kept); u_accept,
        u_draw [N, W] uniforms, per node → (path [N, height], its nodes by level, -1 past its end;
        end [N], its last node, 0 when none was kept; last [N], the draw from end's target: its
        residual, or p where no child was tried)."""
        N, W, K = p.shape
        target = p
        kept = torch.full((N, W), -1, dtype=torch.long, device=p.device)
        for i in range(self.children.shape[1]):
            child = self.children[:, i]  # [W]
            kid = child.clamp(min=0)
            x = tokens[:, kid]  # [N, W]
            prop = proposal[:, kid]  # [N, W, K]
            trial = (child >= 0) & ~void[:, kid] & (kept < 0)
            ok = trial & (u_accept[:, kid] < take(target, x) / take(prop, x))
            kept = torch.where(ok, child, kept)
            miss = (trial & ~ok)[..., None]
            target = torch.where(miss, residual(target, prop), target)
        # the path's end by pointer jumping (log2 W gathers, not one per level): each node points
        # to its kept child, or to itself where none was kept
        nodes = torch.arange(W, device=p.device)
        jump = torch.where(kept >= 0, kept, nodes)
        for _ in range(max(W - 1, 1).bit_length()):
            jump = jump.gather(1, jump)
        end = jump[:, 0]
        # the path: end's ancestors but the root, each at its level
        on = self.ancestry[end] & (nodes > 0)  # [N, W]
        where = torch.where(on, self.level - 1, self.height)  # off the path: a spare column
        path = torch.full((N, self.height + 1), -1, dtype=torch.long, device=p.device)
        path = path.scatter(1, where, nodes.expand(N, -1))[:, :self.height]
        at_end = end[:, None]
        last = invert_cdf(target.gather(1, at_end[..., None].expand(-1, -1, K))[:, 0],
                          u_draw.gather(1, at_end)[:, 0])  # only the end's target is drawn from
        return path, end, last


def window_seen(seen, tokens, ancestry, sampling):
    """[N, W, K] bool: the codes node t's repetition penalty sees, the committed ones and the
    candidates on its path (the prefix it assumes: its ancestors but the root, and itself), or
    seen [N, 1, K] when there is no penalty. seen [N, K] bool; tokens [N, W], the nodes of a
    Tree; ancestry [W, W] or [N, W, W] bool, its Tree.ancestry (per row)."""
    if sampling.repetition_penalty == 1.0:
        return seen[:, None]
    path = ancestry.clone()
    path[..., 0] = False  # the root is committed: in seen already
    on_path = path.float() @ F.one_hot(tokens, seen.shape[-1]).float()  # [N, W, K]
    return seen[:, None] | (on_path > 0)


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

"""ProPD's dynamic token tree: each step, the tree that buys the most accepted tokens per second.

Two online models (ProPD, arXiv 2402.13485, section 4.2):

- ``AcceptanceModel``: p[d][r], the running probability that the rank-r guess at depth d is the
  model's token given that its parent was; a node's probability is the product along its path, a
  tree's expected accepted length is 1 + the sum over its nodes, and the best n-token tree holds the
  n - 1 most probable nodes (``best_tree``).
- ``LatencyModel``: step seconds as a line in the tree's size, fitted by weighted least squares over
  a moving average per size, weights decaying with the measurement's age; one line per batch size
  and context bucket, since both change what a tree token costs. A plain AR step (the root alone)
  runs no drafter and keeps its own average. A drafter that guesses level by level (the draft
  layer, a draft model) times its drafting apart, per depth, so a tree costs its line plus its
  depth's drafting: on the AMD EPYC a 4-token tree 3 deep took 13.5 ms a step and 1 deep 12.0, and
  a line in the size alone, fitted on the deeper best trees, let ProPD pick them over shallow ones.

``TreeChooser`` puts them together: argmax over candidate trees (each size as deep as the
acceptance model likes, and 1 or 2 deep) of E[accepted(n, depth)] / T(n, depth), size 1 (plain AR)
included, priced every ``CHOOSE_EVERY`` steps, a tree's rate scaled by the part of their promised rate
that trees delivered (``TreeChooser.delivery``). The first steps explore two small trees and AR, each
twice (a size's first step in a batch runs cold: at batch 8 a 2-token tree's first step took 26.8
ms, the next ones 21; kept, it ruled trees out for 32 steps), so that the line has a span;
AR, or the trees, when unpicked for half a half-life, are measured once more (an AR step teaches
the acceptance model nothing, and one slow early measurement would otherwise rule a side out for
good). A size is a candidate only up to twice the largest measured one: the line is trusted
where it was measured, and a big tree (at batch 8, one step over 64 tokens costs ten AR steps) is
reached by doubling while each step up still pays.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

from propd.decoding.lookup import LOOKUP_DEPTH, LOOKUP_RANK, MAX_NGRAM, Chain, Offer
from propd.errors import PropdError
from propd.tree.tree import TokenTree, best_paths, tree_of

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CONTEXT_BUCKET = 512  # tokens: a tree's cost is measured separately per bucket of cache length
DRAFT_DECAY = 0.98  # per step: how fast the draft probabilities' calibration forgets
DRAFT_PRIOR = 4.0  # drafted probability mass the calibration starts from
WIDE_BATCH = 4  # rows from which ``TreeChooser.wide_depth`` limits the trees' depth
# From WIDE_BATCH rows the margin trees must beat AR by: there every row verifies the chosen tree (not
# the draft's picks per row), whose price the delivery already corrects, and with 1.0 (and the chosen
# tree for every row) batch 4 gained 1-5% AR in three side-by-side runs (AMD EPYC), batch 8 -0.6-+0.3%.
WIDE_MARGIN = 1.0
# A measurement counts at most this many times the estimate it updates: a step can stall for reasons
# not its own (a page fault storm, another process), and on the AMD EPYC one AR step that built the
# argmax's int8 screen (0.65 s) made AR look 40 times dearer, so ProPD kept to trees that lost.
OUTLIER = 2.0
# From WIDE_BATCH rows, a tree that wins by less than this factor of AR's rate (its margin included) has
# AR measured again 4 times as often: AR's cost only moves when AR runs, and at batch 8 on the AMD EPYC
# a few AR steps in a slow spell priced AR at 25 ms (its steps took 14) and trees ran for the next 34
# steps. Not below: at batch 1 each AR step measured again gives up a third of a tree step's tokens,
# and there without the rule ProPD gave 1.251x, 1.237x and 1.227x AR against 1.241x, 1.234x and 1.212x with it
# (side by side; at batch 4, whose rows leave it one by one, 0.983x and 0.969x against 0.981x and 0.983x).
NARROW_WIN = 1.2
# A measurement moves every other size's average in its bucket (and its drafting costs) this part of the
# way its own size's moved: the host's speed moves all of them at once, and on the AMD EPYC, where it
# changed by a third between minutes, a size measured in a slow spell and then left alone stayed dear
# (a 4-token step at 11.2 ms against 9.6 for 3 tokens, then 10.3 against 11.4 in the next run, where
# the token between them costs 0.2-0.4 ms). Side by side at batch 1 it gave 1.20x AR against 1.19x
# without: within the host's noise.
SPEED_RATE = 0.1
# Steps a choice of tree holds in its bucket (not an explored or re-measured size, nor the largest size
# measured, from which the trees may grow): a choice prices every candidate tree, 0.09-0.17 ms of a
# batch-1 step on the AMD EPYC, where ProPD's machinery beside its drafting and verification (0.57 ms a
# step against a static tree's 0.15) was most of what kept it below the static 4-token tree. Each step
# still picks its nodes from the draft's probabilities (``select``).
CHOOSE_EVERY = 4
GUESS_DRIFT = 0.01  # per AR step whose guesses did not pay: how fast the price of guesses alone drifts back to its line
# Per row state (not copying, copying: ``NgramIndex``), matched n-gram length (1-3) and guess index (0-3): the
# chance a prompt-lookup guess is the model's token given that the one before it was, measured on the default
# model's greedy answers to 24 MT-Bench questions (first guesses after a 1- / 2- / 3-gram 0.17 / 0.41 / 0.71, and
# 0.30 / 0.55 / 0.77 while copying; ``LookupAcceptance`` follows the prompts at hand).
LOOKUP_PRIOR = [
    [[0.17, 0.4, 0.6, 0.7], [0.4, 0.5, 0.65, 0.75], [0.7, 0.75, 0.8, 0.85]],
    [[0.3, 0.4, 0.75, 0.8], [0.55, 0.6, 0.8, 0.8], [0.77, 0.84, 0.86, 0.9]],
]


def _moved(before: float | None, now: float, rate: float) -> float:
    """A moving average's next value, the new measurement capped at ``OUTLIER`` times it."""
    return now if before is None or before <= 0 else before + rate * (min(now, OUTLIER * before) - before)


class AcceptanceModel:
    """Moving averages of per-depth, per-rank acceptance, started from shipped statistics."""

    def __init__(self, rank_probabilities: list[list[float]], rate: float = 0.02):
        try:
            self.p = [[float(x) for x in row] for row in rank_probabilities]
        except (TypeError, ValueError) as e:
            raise PropdError(f"acceptance statistics (rank_probabilities) must be lists of probabilities per depth: {e}") from None
        if not self.p or not all(self.p) or not all(0 <= x <= 1 for row in self.p for x in row):
            raise PropdError("acceptance statistics (rank_probabilities) must be non-empty lists of probabilities in [0, 1], one per depth")
        self.rate = rate
        self.version = 0  # bumped on every update; trees built from the model are cached per version

    def observe(self, tree: TokenTree, last: int, verified: list[bool] | None = None) -> None:
        """A row's step ended at node ``last``: along its path each depth's guess of that rank was
        right; after it, none of ``last``'s children was. Only the ranks the row verified (its
        ``verified`` nodes of the tree, where given) are seen."""
        ancestry, children, ranks = _shape(tree.paths)
        nodes = ancestry[last]  # root .. last
        nodes = nodes[: next((i for i, node in enumerate(nodes) if ranks[node] >= LOOKUP_RANK), len(nodes))]  # (not another drafter's guesses)
        for depth, (parent, child) in enumerate(zip(nodes, nodes[1:])):
            self._update(depth, ranks[child], children[parent], ranks, verified)
        if len(nodes) - 1 < len(self.p):  # (the drafted children of the path's last drafted node: a lookup chain's are its own)
            self._update(len(nodes) - 1, -1, children[nodes[-1]], ranks, verified)
        self.version += 1

    def _update(self, depth: int, rank: int, children: list[int], ranks: list[int], verified: list[bool] | None) -> None:
        row = self.p[depth]
        for child in children:
            r = ranks[child] if verified is None or verified[child] else len(row)
            if r < len(row):
                row[r] += self.rate * ((r == rank) - row[r])


class LookupAcceptance:
    """Moving averages of the chance that a prompt-lookup guess is the model's token given that
    the guess before it was (the first: given its anchor), per row state (copying or not), matched
    n-gram length and guess index."""

    def __init__(self, prior: list[list[list[float]]] = LOOKUP_PRIOR, rate: float = 0.05):
        self.q = [[list(row) for row in state] for state in prior]
        self.rate = rate

    def _row(self, chain: Chain) -> list[float]:
        return self.q[chain.copying][chain.n - 1]

    def chances(self, chain: Chain) -> list[float]:
        """Each of the chain's nodes' probability of being accepted given that its anchor is."""
        out, p = [], 1.0
        q = self._row(chain)
        for i in range(len(chain.nodes)):
            p *= q[chain.first + i]
            out.append(p)
        return out

    def first(self, chain: Chain) -> float:
        """The chance of a chain's first guess, where a drafted node carries it (its anchor)."""
        return self._row(chain)[0]

    def observe(self, chain: Chain, path: tuple[int, ...], verified: list[bool] | None) -> None:
        """A row's step accepted ``path`` (nodes, root first): each verified guess whose parent was
        accepted was seen (the first guess too, where a drafted node carried it)."""
        accepted, q = set(path), self._row(chain)
        seen = chain.anchor in accepted
        if chain.first and (verified is None or verified[chain.anchor]):
            q[0] += self.rate * (seen - q[0])
        for i, node in enumerate(chain.nodes):
            if not seen or (verified is not None and not verified[node]):
                break
            seen = node in accepted
            q[chain.first + i] += self.rate * (seen - q[chain.first + i])


@functools.lru_cache(maxsize=256)
def _shape(paths: tuple) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """A tree's nodes' paths from the root, their children and ranks as lists (the acceptance
    model walks them for every row of every step: as tensor indexing they took 0.1 ms a batch-8 step)."""
    tree = tree_of(paths)
    return [list(path) for path in tree.lineage], [list(kids) for kids in tree.kids], tree.ranks.tolist()


@dataclass
class _SizeStats:
    seconds: float  # moving average of step time at this size
    weight: float  # how much it counts, decaying with age
    step: int  # when it was last measured
    seeded: bool = False  # taken from another bucket, not yet measured in this one
    count: int = 1  # measurements taken here; of the first two, the faster is kept (the first ran cold)
    recalled: bool = False  # remembered from an earlier run (``TreeChooser.recall``), not yet measured in this one


@dataclass
class LatencyModel:
    """Step time against tree size (tokens per row; a batch whose rows verify their own numbers of
    tokens counts their mean) by weighted linear regression (one line per bucket)."""

    half_life: float = 64.0  # steps after which a measurement counts half
    rate: float = 0.3  # moving-average rate per size
    buckets: dict[tuple[int, int], dict[float, _SizeStats]] = field(default_factory=dict)
    drafts: dict[tuple[int, int], dict[int, float]] = field(default_factory=dict)  # per bucket and depth: a tree's drafting seconds (moving average)
    drafted: dict[tuple[int, int], Counter[int]] = field(default_factory=dict)  # per bucket and depth: drafting measurements taken there
    steps: int = 0
    fits: dict[tuple[int, int], tuple[float, float] | None] = field(default_factory=dict, repr=False)  # ``line``'s, until a measurement or a seed

    def observe(self, key: tuple[int, int], size: float, seconds: float) -> None:
        self.steps += 1
        sizes = self.buckets.setdefault(key, {})
        s = sizes.get(size)
        seconds = min(seconds, OUTLIER * s.seconds) if s is not None and s.seconds > 0 else seconds
        self._follow(key, size, seconds)
        if s is not None and not (s.seeded or s.recalled) and s.count >= 2 and s.seconds > 0:  # the host's speed: every estimate follows part of the way
            follow = 1 + SPEED_RATE * (seconds / s.seconds - 1)
            for other in sizes.values():
                if other is not s:
                    other.seconds *= follow
            drafts = self.drafts.get(key, {})
            for depth in drafts:
                drafts[depth] *= follow
        if s is None:
            sizes[size] = _SizeStats(seconds, 1.0, self.steps)
        elif s.seeded:  # gives way to the first measurement here (counted as the second: no more exploring)
            sizes[size] = _SizeStats(seconds, 1.0, self.steps, count=3)
        else:  # the first ran cold: the faster of two (a remembered size's first step here runs cold too)
            s.seconds = min(s.seconds, seconds) if s.count == 1 or s.recalled else _moved(s.seconds, seconds, self.rate)
            s.count, s.recalled = s.count + 1, False
            s.weight = self._decayed(s) + 1.0
            s.step = self.steps
        self.fits.clear()

    def _follow(self, key: tuple[int, int], size: float, seconds: float) -> None:
        """The seeded tree costs follow a bucket's first measurements. AR's moves them by as much:
        the seed scaled only what a tree costs beyond AR, and kept the smaller batch's AR under it
        (batch 8 seeded from batch 4 priced a 1.25-token tree at 14.5 ms, below its own AR's 17,
        and tried trees that cost 21). The first tree's scales them by its ratio to the seeded line
        (not AR, which runs no drafter: a batch-8 tree's cold first step made a seeded AR 28% dearer
        than it was, and an AR that looks dear is not measured again for 32 steps)."""
        sizes = self.buckets[key]
        trees, ar = [s for n, s in sizes.items() if n > 1 and s.seeded], sizes.get(1)
        if size == 1 and ar is not None and ar.seeded:
            for s in trees:
                s.seconds += seconds - ar.seconds
        elif size > 1 and self.seeded_only(key):
            fit = self.line(key)
            if size in sizes:
                seeded = sizes[size].seconds
            elif fit is not None:
                seeded = fit[0] + fit[1] * size
            else:
                return
            for s in trees if seeded > 0 else ():
                s.seconds *= seconds / seeded

    def tick(self) -> None:
        """A step that measured nothing: the measurements still age, so AR and the trees are measured again in time."""
        self.steps += 1
        self.fits.clear()

    def observe_levels(self, key: tuple[int, int], levels: int, seconds: float) -> None:
        """A tree's drafting: ``levels`` levels of guesses in ``seconds`` (not in the step's own time).
        Of a bucket's first two measurements of a depth, the faster is kept, as for the step sizes:
        the first runs cold (on the AMD EPYC a batch-4 tree's first drafting took 23.6 ms, the next
        1.2; moved toward from the first, the price stayed above 15 ms and ProPD kept to AR there)."""
        depths, seen = self.drafts.setdefault(key, {}), self.drafted.setdefault(key, Counter())
        before = depths.get(levels)
        depths[levels] = min(before, seconds) if seen[levels] == 1 else _moved(before, seconds, self.rate)
        seen[levels] += 1

    def drafting(self, key: tuple[int, int], depth: int) -> float:
        """Seconds to draft a tree ``depth`` levels deep: as measured at that depth, else the
        measured depths' mean per level times it. Per depth, since the first level (the root's
        guesses) runs no pass of the draft and the others do: on the AMD EPYC at batch 1 one
        level took 0.35 ms and two 1.1 ms, and priced at their mean per level the second level
        looked half its cost, and ProPD drafted 2 deep where 1 deep paid more."""
        depths = self.drafts.get(key, {})
        if depth in depths or not depths or depth == 0:
            return depths.get(depth, 0.0)
        return depth * sum(s / n for n, s in depths.items()) / len(depths)

    def memory(self) -> dict:
        """What it measured, as JSON-able data (``recall``)."""
        return {
            "steps": self.steps,
            "sizes": [{"batch": b, "bucket": c, "size": n, **asdict(s)} for (b, c), sizes in self.buckets.items() for n, s in sizes.items()],
            "drafts": [{"batch": b, "bucket": c, "depth": d, "seconds": t} for (b, c), depths in self.drafts.items() for d, t in depths.items()],
        }

    def recall(self, memory: dict) -> None:
        """Take back what an earlier run measured (``memory``): each size counts as measured, so it is
        not explored again, but its first step here runs cold, so of it and the remembered cost the
        smaller is kept, as of a size's first two steps."""
        self.steps = int(memory["steps"])
        for entry in memory["sizes"]:
            stats = _SizeStats(float(entry["seconds"]), float(entry["weight"]), int(entry["step"]), bool(entry["seeded"]), int(entry["count"]), recalled=True)
            self.buckets.setdefault((int(entry["batch"]), int(entry["bucket"])), {})[float(entry["size"])] = stats
        for entry in memory["drafts"]:
            key = (int(entry["batch"]), int(entry["bucket"]))
            self.drafts.setdefault(key, {})[int(entry["depth"])] = float(entry["seconds"])
            self.drafted.setdefault(key, Counter())[int(entry["depth"])] = 1  # (the next drafting is its first here: the faster is kept)
        self.fits.clear()

    def _decayed(self, s: _SizeStats) -> float:
        return s.weight * 0.5 ** ((self.steps - s.step) / self.half_life)

    def seed(self, key: tuple[int, int], source: tuple[int, int]) -> None:
        """Start a bucket from another's measurements, at half their weight. From fewer rows, a
        tree's cost beyond AR's is scaled up by the square root of the ratio of rows: on the Intel
        Xeon with AMX it grew 1.7x from batch 1 to 4 and about 2.9x to 8 (products cost the same up
        to 32 rows, drafting has a fixed part); scaled by the ratio itself, a 2-token tree that
        paid at batch 4 (1.09x AR) was predicted at 4x its cost and never tried there."""
        self.fits.clear()
        src = self.buckets[source]
        ar = src[1].seconds if 1 in src else 0.0
        rows = max(1.0, key[0] / source[0]) ** 0.5
        self.buckets[key] = {
            n: _SizeStats(s.seconds if n == 1 else ar + (s.seconds - ar) * rows, 0.5 * self._decayed(s), self.steps, seeded=True, count=2)
            for n, s in src.items()
        }
        if source in self.drafts:
            self.drafts[key] = {n: seconds * rows for n, seconds in self.drafts[source].items()}

    def count(self, key: tuple[int, int], size: float) -> int:
        """Measurements of ``size`` in this bucket (a seeded size counts as measured)."""
        s = self.buckets.get(key, {}).get(size)
        return 0 if s is None else s.count

    def seeded_only(self, key: tuple[int, int]) -> bool:
        """Whether this bucket's tree costs are all seeded from another, none measured here yet."""
        trees = [s for n, s in self.buckets.get(key, {}).items() if n > 1]
        return bool(trees) and all(s.seeded for s in trees)

    def measured(self, key: tuple[int, int]) -> list[float]:
        return sorted(self.buckets.get(key, {}))

    def line(self, key: tuple[int, int]) -> tuple[float, float] | None:
        """(intercept, slope) in seconds and seconds per token over the trees (sizes > 1), or None
        before two are measured. A step of the root alone runs no drafter: it is no point of the line.
        Kept until the next measurement (choose and select ask for it every step)."""
        if key not in self.fits:
            self.fits[key] = self._fit(key)
        return self.fits[key]

    def _fit(self, key: tuple[int, int]) -> tuple[float, float] | None:
        sizes = {n: s for n, s in self.buckets.get(key, {}).items() if n > 1}
        if len(sizes) < 2:
            return None
        w = {n: self._decayed(s) for n, s in sizes.items()}
        total = sum(w.values())
        mean_n = sum(w[n] * n for n in sizes) / total
        mean_t = sum(w[n] * s.seconds for n, s in sizes.items()) / total
        var = sum(w[n] * (n - mean_n) ** 2 for n in sizes)
        slope = max(0.0, sum(w[n] * (n - mean_n) * (s.seconds - mean_t) for n, s in sizes.items()) / var) if var else 0.0
        return mean_t - slope * mean_n, slope

    def predict(self, key: tuple[int, int], sizes: list[float], depths: list[int] | None = None) -> list[float] | None:
        """Predicted step seconds for each size drafted ``depths`` levels deep (plain AR: its own
        average), or None before a line."""
        fit = self.line(key)
        if fit is None:
            return None
        ar = self.buckets[key].get(1)
        return [ar.seconds if n == 1 and ar else max(1e-6, fit[0] + fit[1] * n + self.drafting(key, d)) for n, d in zip(sizes, depths or [0] * len(sizes))]


class GuessPrice(NamedTuple):
    """How ``TreeChooser.select_guesses`` prices lookup guesses alone: ``_paying``'s base, slope and floor,
    and AR's step seconds and the latency line's per token (what such a step is then expected to take)."""

    base: float
    slope: float
    floor: float
    ar: float
    per_token: float


def _paying(order: list[tuple[int, int]], worth: list[list[float]], B: int, base: float, slope: float, floor: float, roots: float | None = None) -> int:
    """How many of the (row, node) pairs in ``order`` a step takes: the prefix of i pairs whose
    expected tokens per second, the roots' worth (``roots``, default B) plus the pairs' over ``base`` + ``slope`` (1 + i / B) seconds
    (the latency line at 1 + i / B tokens a row), is highest and above ``floor``; 0 where none is."""
    gains, best, k = B if roots is None else roots, floor, 0
    for i, (b, n) in enumerate(order, 1):
        gains += worth[b][n]
        rate = gains / max(1e-6, base + slope * (1 + i / B))
        if rate > best:
            best, k = rate, i
    return k


class TreeChooser:
    """Picks each step's tree from the two models (``choose``) and learns from the step (``observe``)."""

    def __init__(self, acceptance: AcceptanceModel, latency: LatencyModel | None = None, sizes: tuple[int, ...] = SIZES, margin: float = 1.1,
                 wide_depth: int | None = None):
        self.acceptance = acceptance
        # Trees at most this deep from WIDE_BATCH rows on (None: as deep as the acceptance model goes). With the
        # draft layer each level is a drafting pass, and a batch's pass costs more per row kept waiting: on the
        # Intel Xeon with AMX, 1 deep gave 1.08x AR at batch 4 where 2 deep gave 1.00x (1.29x and 1.36x at batch 1).
        self.wide_depth = wide_depth
        self.margin = margin  # a tree must promise this many times AR's tokens per second: estimates are noisy, the best-looking one is biased up
        self.latency = latency or LatencyModel()
        self.sizes = tuple(sorted(sizes))
        # Tried first: two small trees, then AR (a batch's first step runs cold, and AR has no line to correct its one point).
        self.explore = [*sorted({self.sizes[1], self.sizes[min(3, len(self.sizes) - 1)]}), self.sizes[0]]
        self._version = -1_000_000  # the acceptance model's version the trees below were built at
        self._ranked_at = -1_000_000  # and the step
        self._paths: list[tuple[float, tuple[int, ...]]] = []
        self._trees: dict[tuple[int, int | None], tuple[TokenTree, float]] = {}  # (size, depth limit) -> tree, expected length
        self._shapes_at: dict[tuple[float, int | None], list[tuple[TokenTree, float]]] = {}  # ``_shapes``, built with ``_trees``
        self._ar_extra: dict[tuple[int, int], float] = {}  # per bucket: what the drafter's reading after AR steps costs per AR step
        self.expected = 1.0  # accepted tokens per row the last chosen tree expected
        self.expected_rows: list[float] | None = None  # each row's, where ``select`` last gave rows their own nodes
        self._tree_retries = 0  # trees measured again since a tree last won a step
        self._won_by = float("inf")  # the last choice's best tree rate over AR's (with the margin)
        self._ar_won = False  # an AR step since the last tree won on its rate (not explored, not measured again)
        # Draft path probabilities vs what was accepted, per depth: decayed sums (``draft_scale``).
        self._draft_mass: dict[int, float] = {}
        self._draft_accepted: dict[int, float] = {}
        self._drafted_mass: Counter[int] | None = None  # per depth, what the last ``select`` kept
        # The lookup guesses' chances vs what was accepted, likewise (``lookup_scale``).
        self._lookup_mass = self._lookup_accepted = 0.0
        self._guessed_mass: float | None = None  # the chances the last selection kept
        self._exploring = False  # this step measures an explored size: ``select`` keeps it
        self.ar_by_price = False  # this step's AR was priced, not explored or measured again: lookup guesses may replace it (``select_guesses``)
        self._chosen: tuple[tuple, int, tuple[TokenTree, float], float] | None = None  # the last priced choice: (bucket, depth), step, (tree, expected), price
        self._promise: tuple[int, float, float, list[float] | None] | None = None  # the chosen tree's: batch size, tokens, seconds, rows' weights
        self._delivered: dict[int, list[float]] = {}  # per batch size: decayed sums of tokens that came and were promised, seconds taken and priced
        self.lookup = LookupAcceptance()  # for prompt-lookup guesses offered beside the draft's (``Offer``)
        self._guess_scale: dict[tuple[int, int], float] = {}  # per bucket: what steps of lookup guesses alone took over their price
        self._guess_cost: tuple[tuple[int, int], float] | None = None  # the last such step's bucket and price

    def tree(self, size: int, depth: int | None = None) -> tuple[TokenTree, float]:
        """The best tree of ``size`` tokens (at most ``depth`` deep) and its expected accepted length.
        The most probable paths are ranked again after the acceptance model has moved by a few dozen
        observations, over 16 steps at least (at batch 8, 32 observations came every 4 steps, and
        building the trees again took 0.1 ms a step); a tree whose paths came before is not built
        again (``tree_of``: building some 20 trees at each ranking cost a batch-1 step 0.1 ms on average)."""
        if self.acceptance.version - self._version >= 32 and self.latency.steps - self._ranked_at >= 16:
            self._version, self._ranked_at = self.acceptance.version, self.latency.steps
            self._paths = best_paths(self.acceptance.p, max(self.sizes) - 1)
            self._trees, self._shapes_at = {}, {}
        if (size, depth) not in self._trees:
            chosen = [(prob, path) for prob, path in self._paths if depth is None or len(path) <= depth][: size - 1]
            self._trees[(size, depth)] = (tree_of(tuple(p for _, p in chosen)), 1.0 + sum(prob for prob, _ in chosen))
        return self._trees[(size, depth)]

    def choose(self, batch_size: int, context: int, weights: list[float] | None = None) -> TokenTree:
        """The step's tree (``_choose``), its trees priced at the rate trees delivered of the rate they
        promised at about this batch size (``delivery``)."""
        tree, priced = self._choose(batch_size, context, weights)
        rows = batch_size if weights is None else sum(weights)
        wide = batch_size >= WIDE_BATCH  # (``delivery`` is 1 below: no evidence kept for a narrow batch to seed a wide one)
        self._promise = (batch_size, self.expected * rows, priced, weights) if wide and tree.size > 1 and priced else None
        return tree

    def delivery(self, batch_size: int) -> float:
        """Of the accepted tokens per second that the chosen trees promised (tokens as the acceptance
        model expects them, rows weighed as ``choose`` weighs them; seconds as the latency model
        prices the tree), the part that came, over recent tree steps at this batch size (a batch size
        not seen yet starts from the nearest one's). ``select`` gives a tree's nodes to the rows the
        draft is surest of and, in a fixed batch, to the rows behind, so a tree of the rank
        statistics' size promises what the batch's rows do not all get, at a price that is not what
        the nodes verified cost: on 16 MT-Bench questions (AMD EPYC) trees delivered 1.03 of their
        promised tokens at batch 1, 0.80 at batch 4 and 0.49-0.57 at batch 8, where, priced at their
        promise, they ran 100 of 159 steps and ProPD at 0.87x AR. ``DRAFT_PRIOR`` tokens' worth of a
        prior at 1 stays in it. From ``WIDE_BATCH`` rows only (1 below): at batch 1, where one row takes
        every node, side by side it gave 1.37x, 1.27x and 1.38x AR against 1.36x, 1.34x and 1.43x
        without (AMD EPYC)."""
        if batch_size < WIDE_BATCH:
            return 1.0
        came, promised, took, priced = self._delivery_sums(batch_size)
        if not promised:
            return 1.0
        per_token = priced / promised
        return (came + DRAFT_PRIOR) / (promised + DRAFT_PRIOR) * (priced + DRAFT_PRIOR * per_token) / (took + DRAFT_PRIOR * per_token)

    def _choose(self, batch_size: int, context: int, weights: list[float] | None) -> tuple[TokenTree, float | None]:
        """The step's tree and its predicted seconds (None: explored, or no line yet). A new bucket starts
        from the nearest measured one of about its batch size (rows leaving a batch, a context growing past
        a bucket) or of a smaller one, its seeded costs scaled to its own as it measures them
        (``LatencyModel.observe``): where those costs favour a tree, its smallest tree is measured first
        (seeded from batch 4, batch 8's trees were predicted 24 ms where they took 21.5, and ProPD kept to
        AR for 32 steps); where they favour AR, AR (on the AMD EPYC, rows finishing one by one made seven
        new buckets in a batch of 8, and a forced tree step in each cost batch 8 a tenth of its speed).
        After only larger batches it explores afresh. With the rows' ``weights`` (a fixed batch,
        ``DecodeLoop.weights``), a tree's nodes go to the rows that count (``select``), and it is priced at
        their share of the nodes: side by side on MT-Bench (AMD EPYC), batch 4 1.004x and 1.005x AR against
        0.980x and 0.992x without the weights, batch 8 0.997x and 0.959x against 0.940x and 0.953x."""
        key = (batch_size, context // CONTEXT_BUCKET)
        depth = self.wide_depth if batch_size >= WIDE_BATCH else None
        held = self._chosen  # (first: checking what to explore or measure again first cost an AR step 15 us, Intel Xeon with AMX)
        if held is not None and held[0] == (key, depth) and self.latency.steps - held[1] < CHOOSE_EVERY and held[2][0].size < max(self.latency.measured(key)):
            tree, self.expected = held[2]  # (not the largest size measured: the next step measures it, and the trees may grow)
            self._exploring, self.ar_by_price = False, tree.size == 1
            return tree, held[3]
        if not self.latency.measured(key):
            near = max(1, batch_size // 4)
            fitted = [k for k in self.latency.buckets if self.latency.line(k) is not None and k[0] - batch_size <= near]
            if fitted:
                self.latency.seed(key, min(fitted, key=lambda k: (abs(k[0] - key[0]), abs(k[1] - key[1]))))
        unexplored = [n for n in self.explore if self.latency.count(key, self.tree(n, depth)[0].size) < 2]
        self._exploring, self.ar_by_price = bool(unexplored), False
        if unexplored:
            tree, self.expected = self.tree(unexplored[0], depth)
            return tree, None
        # of the rows' nodes, what the rows that count take (``select``; from WIDE_BATCH rows every row verifies the whole tree)
        share = 1.0 if weights is None or batch_size >= WIDE_BATCH else sum(weights) / len(weights)
        stale = self._stale(key)
        if stale is not None:
            self._tree_retries += stale > 1
            tree, self.expected = self.tree(stale, depth)
            return tree, (self.latency.predict(key, [1 + (tree.size - 1) * share], [tree.depth]) or [None])[0]
        trees = self._shapes(2 * max(self.latency.measured(key)), depth)  # (tree, expected accepted tokens)
        seconds = self.latency.predict(key, [1 + (tree.size - 1) * share for tree, _ in trees], [tree.depth for tree, _ in trees])
        seconds = [s + self._ar_extra.get(key, 0.0) if tree.size == 1 else s for (tree, _), s in zip(trees, seconds)]
        delivery = self.delivery(batch_size)
        margin = self.margin if batch_size < WIDE_BATCH else WIDE_MARGIN
        rates = [expected / s * (margin if tree.size == 1 else delivery) for (tree, expected), s in zip(trees, seconds)]
        best = rates.index(max(rates))
        (tree, self.expected), priced = trees[best], seconds[best]
        ar_rate = next((r for (t, _), r in zip(trees, rates) if t.size == 1), None)
        self._won_by = max(r for (t, _), r in zip(trees, rates) if t.size > 1) / ar_rate if ar_rate and len(trees) > 1 else float("inf")
        self._chosen = ((key, depth), self.latency.steps, (tree, self.expected), priced)
        if tree.size > 1 and self.latency.seeded_only(key):  # the smallest tree, measured once here: the seeded trees' costs follow it
            self._exploring, self._chosen, priced = True, None, None
            tree, self.expected = self.tree(self.explore[0], depth)
        if tree.size > 1:
            self._tree_retries = 0
        self._ar_won |= tree.size == 1
        self.ar_by_price = tree.size == 1
        return tree, priced

    def _shapes(self, reach: float, depth: int | None) -> list[tuple[TokenTree, float]]:
        """The candidate trees up to ``reach`` tokens: each size as deep as the acceptance model
        likes (at most ``depth``), and 1 and 2 deep, each tree once."""
        if (reach, depth) not in self._shapes_at:
            trees = {}
            for n in (n for n in self.sizes if n <= reach):
                for d in (depth, 1, 2):
                    tree, expected = self.tree(n, d if depth is None or d is None else min(d, depth))
                    trees.setdefault(tree.paths, (tree, expected))
            self._shapes_at[(reach, depth)] = list(trees.values())
        return self._shapes_at[(reach, depth)]

    def _stale(self, key: tuple[int, int]) -> int | None:
        """A size to measure again: AR, or the smallest explored tree, when that side went unpicked
        for half a half-life (AR: an eighth, while the trees of a wide batch win by less than ``NARROW_WIN``); the
        trees' wait doubles (up to 8 times) with each retry that did not win them a step (where AR
        pays, at batch 8, each retry cost two AR steps)."""
        sizes = self.latency.buckets[key]
        narrow = key[0] >= WIDE_BATCH and self._won_by < NARROW_WIN
        since = self.latency.steps - self.latency.half_life / (8 if narrow else 2)
        if 1 in sizes and sizes[1].step < since:
            return 1
        trees = [s.step for n, s in sizes.items() if n > 1]
        wait = self.latency.half_life / 2 * 2 ** min(self._tree_retries, 3)
        return self.explore[0] if trees and max(trees) < self.latency.steps - wait else None

    def charge_ar(self, batch_size: int, context: int, seconds: float) -> None:
        """Add to AR's cost what the drafter's reading of an AR step's token cost when a tree came
        (the drafter reads them then, not in the AR steps, which are timed without it), where AR
        won a step on its rate since the last tree: a lone AR step measured again between trees
        left a whole reading to one step, AR looked 6% dearer at batch 8 (AMD EPYC), and more
        trees came."""
        if self._ar_won:
            key = (batch_size, context // CONTEXT_BUCKET)
            self._ar_extra[key] = _moved(self._ar_extra.get(key), seconds, self.latency.rate)
            self._chosen = None  # AR's price moved: the next step chooses afresh

    def candidates(self, tree: TokenTree) -> TokenTree:
        """What to draft when the draft's own path probabilities pick the nodes to verify: the rank
        statistics' best tree of 1.5 times the chosen size (twice cost more drafting than it gained),
        no deeper than the chosen tree, since each level costs a drafting pass (a 2-token tree drafted
        as 3 tokens 2 deep cost a batch-8 step 29 ms where 1 deep it costs 20)."""
        return self.tree(min(max(self.sizes), tree.size + tree.size // 2), tree.depth)[0]

    def select(
        self, batch_size: int, context: int, chosen: int, drafted: TokenTree, scores: list[list[float]], offer: Offer | None = None,
        weights: list[float] | None = None,
    ) -> torch.Tensor:
        """Which drafted nodes each row verifies [B, N], from their draft path probabilities [B, N]:
        the batch's most probable (row, node) pairs, so a row the draft is sure of gets a longer
        tree than one it is not (ProPD's tree size per row), as many as buy the most expected tokens
        per second, a node counting its probability times its depth's ``draft_scale`` and a step costing what
        the latency line gives its tokens per row and its ``levels`` of drafting (paid by then, but part
        of the step whose rate this is); before the line exists, or while exploring, each
        row's ``chosen`` - 1 most probable. A node never beats its parent (ties: the lower index, an
        ancestor, first), so rows keep whole paths. At least one node: the drafting is paid by
        then (the root alone after it cost more than an AR step, and timed as one it made AR look slow).
        With an ``offer``, its lookup guesses compete with the drafted nodes (``_worth``). With the
        rows' ``weights`` (a fixed batch, ``DecodeLoop.weights``) a node's worth counts times its row's
        weight in the order and the rate; each row still expects what its own nodes are worth."""
        key = (batch_size, context // CONTEXT_BUCKET)
        B, N = len(scores), len(scores[0])
        mass = [row[1:] for row in scores]  # plain lists: as a dozen tensor ops on a few dozen nodes it took 0.2 ms of a batch-1 step (AMD EPYC)
        tree = offer.tree if offer else drafted
        worth = self._worth(mass, offer, tree)
        fit = None if self._exploring else self.latency.line(key)
        if fit is None:
            picked = [(b, n) for b, row in enumerate(worth) for n in sorted(range(N - 1), key=lambda n: -row[n])[: min(chosen, N) - 1] if row[n] > 0]
        else:
            top = int(B * (2 * max(self.latency.measured(key) or [chosen]) - 1))
            weighed = worth if weights is None else [[w * x for x in row] for w, row in zip(weights, worth)]
            order = sorted(((b, n) for b in range(B) for n in range(N - 1)), key=lambda bn: -weighed[bn[0]][bn[1]])[:top]  # stable: ancestors first
            roots = None if weights is None else sum(weights)
            picked = order[: max(1, _paying(order, weighed, B, fit[0] + self.latency.drafting(key, drafted.depth), fit[1], 0.0, roots))]
        return self._keep(picked, B, N, worth, mass, tree, offer)

    def select_guesses(self, batch_size: int, context: int, offer: Offer) -> torch.Tensor | None:
        """Where a priced choice took AR (``ar_by_price``): the rows' lookup guesses [B, N] of
        ``offer`` (the root's tree with them grafted on) that buy more tokens per second than AR, with
        its margin, at the trees' line without drafting (their cost includes the draft's reading,
        which such a step leaves to a later one); None where none does (an AR step). Such a step is
        priced as AR's step plus the line's cost of its extra tokens, times what such steps took over
        that price (``_guess_scale``): at batch 4 on the AMD EPYC, where a few rows' guesses make a
        ragged step, they cost more than the line's price, and ProPD with guesses ran at 0.95x AR
        against 0.99x without."""
        key = (batch_size, context // CONTEXT_BUCKET)
        price = self._guess_price(key, batch_size)
        if price is None:
            return None
        B, N = offer.tokens.shape
        worth = self._worth([[0.0] * (N - 1) for _ in range(B)], offer, offer.tree)
        order = sorted(((b, n) for b in range(B) for n in range(N - 1) if worth[b][n] > 0), key=lambda bn: -worth[bn[0]][bn[1]])
        k = _paying(order, worth, B, price.base, price.slope, price.floor)
        self._guess_cost = (key, price.ar + price.per_token * k / B)
        if not k and key in self._guess_scale:  # unmeasured while it rules the guesses out: it drifts back, and they are tried again
            self._guess_scale[key] += GUESS_DRIFT * (1.0 - self._guess_scale[key])
        return self._keep(order[:k], B, N, worth, None, offer.tree, offer) if k else None

    def _guess_price(self, key: tuple[int, int], B: int) -> GuessPrice | None:
        """What ``select_guesses`` prices guesses by in ``key``'s bucket; None before AR and the line are measured."""
        fit, ar = self.latency.line(key), self.latency.buckets.get(key, {}).get(1)
        if fit is None or ar is None:
            return None
        extra, scale = self._ar_extra.get(key, 0.0), self._guess_scale.get(key, 1.0)
        return GuessPrice(scale * (ar.seconds - fit[1]) + extra, scale * fit[1], self.margin * B / (ar.seconds + extra), ar.seconds, fit[1])

    def guess_states(self, batch_size: int, context: int) -> set[tuple[bool, int]]:
        """The lookup states (copying, matched n-gram length: ``LookupAcceptance``) whose guesses could
        buy more tokens per second than AR now, at ``select_guesses``'s price, were every row to
        offer ``LOOKUP_DEPTH`` of them: where no row is in one, ``select_guesses`` would take none of
        a step's guesses, and an AR step needs no offer built (``PropdMethod._holding_ar``)."""
        price = self._guess_price((batch_size, context // CONTEXT_BUCKET), batch_size)
        if price is None:
            return set()
        states = set()
        for copying in (False, True):
            for n in range(1, MAX_NGRAM + 1):
                chances = self.lookup.chances(Chain(list(range(1, LOOKUP_DEPTH + 1)), 0, n, 0, copying))
                worth = [[min(1.0, chance * self.lookup_scale) for chance in chances]] * batch_size
                if _paying([(b, i) for i in range(LOOKUP_DEPTH) for b in range(batch_size)], worth, batch_size, price.base, price.slope, price.floor):
                    states.add((copying, n))
        return states

    def _worth(self, mass: list[list[float]], offer: Offer | None, tree: TokenTree) -> list[list[float]]:
        """Expected accepted tokens each node below the root adds [B][N - 1]: its draft path
        probability ``mass`` times its depth's ``draft_scale`` in ``tree``; with an ``offer``, a lookup guess its anchor's
        worth times its chain's chances (``LookupAcceptance``), a drafted node that carries a
        chain's first guess the larger of its own worth and that guess's chance (its ``mass``, which
        this raises to match, is what the draft's calibration counts as promised: counting the
        draft's own, it credited the draft with what the lookup foresaw, and ProPD expected 12.5% and
        11% more accepted tokens than came on reasoning and stem questions, 10.5% and 8% after), and
        a drafted node that a chain duplicates nothing."""
        by_depth = {depth: self.draft_scale(depth) for depth in range(1, tree.depth + 1)}
        scales = [by_depth[len(path)] for path in tree.paths]
        worth = [[scale * m for scale, m in zip(scales, row)] for row in mass]
        lookup_scale = self.lookup_scale
        for b, chain in enumerate(offer.chains if offer else ()):
            for node in offer.duplicates[b]:
                worth[b][node - 1] = 0.0
            if chain is not None:
                anchor = 1.0
                if chain.anchor:  # the drafted node carrying the first guess: as likely as either says
                    anchor = worth[b][chain.anchor - 1] = max(worth[b][chain.anchor - 1], min(1.0, self.lookup.first(chain) * lookup_scale))
                    mass[b][chain.anchor - 1] = anchor / scales[chain.anchor - 1]  # (what the draft's calibration then counts as promised)
                for node, chance in zip(chain.nodes, self.lookup.chances(chain)):
                    worth[b][node - 1] = anchor * min(1.0, chance * lookup_scale)
        for row in worth:  # a node is accepted only after its parent: never worth more (depths' scales may say so)
            for n, lineage in enumerate(tree.lineage[1:]):
                if lineage[-2]:
                    row[n] = min(row[n], row[lineage[-2] - 1])
        return worth

    def _keep(
        self, picked: list[tuple[int, int]], B: int, N: int, worth: list[list[float]], mass: list[list[float]] | None, tree: TokenTree,
        offer: Offer | None,
    ) -> torch.Tensor:
        """The ``picked`` (row, node below the root of ``tree``) pairs as a mask [B, N], the root kept;
        each row's expected accepted tokens, the drafted probability mass kept per depth (``mass``
        None: none drafted) and the lookup guesses' chances kept."""
        keep = [[True] + [False] * (N - 1) for _ in range(B)]
        expected = [1.0] * B
        for b, n in picked:
            keep[b][n + 1] = True
            expected[b] += worth[b][n]
        self.expected_rows = expected
        self._drafted_mass = None
        if mass is not None:
            self._drafted_mass = Counter()
            for b, n in picked:
                self._drafted_mass[len(tree.paths[n])] += mass[b][n]
        guesses = [set(chain.nodes) if chain else set() for chain in offer.chains] if offer else None
        self._guessed_mass = None if guesses is None else sum(worth[b][n] for b, n in picked if n + 1 in guesses[b]) / self.lookup_scale
        return torch.tensor(keep)

    def observe(
        self, tree: TokenTree, batch_size: int, context: int, last_nodes: list[int], seconds: float | None, verified: torch.Tensor | None = None,
        drafted: tuple[int, float] | None = None, offer: Offer | None = None,
    ) -> None:
        """A step over ``tree`` (each row's ``verified`` nodes [B, N] of it, where given) ended at
        ``last_nodes`` and took ``seconds`` (None: not a measure of its cost), of which ``drafted``
        (levels, seconds) drafted it level by level; ``offer``: the lookup guesses it held."""
        key = (batch_size, context // CONTEXT_BUCKET)
        size = tree.size if verified is None else float(verified.sum()) / batch_size
        self._ar_won &= tree.size == 1 or drafted is None
        guessed = offer is not None and drafted is None  # lookup guesses alone: no point of the drafted trees' line
        if guessed and seconds is not None and self._guess_cost is not None and self._guess_cost[0] == key:
            self._guess_scale[key] = _moved(self._guess_scale.get(key, 1.0), seconds / self._guess_cost[1], self.latency.rate)
        self._deliver(batch_size, tree, last_nodes, seconds)
        if seconds is None or guessed:
            self.latency.tick()
        else:
            if drafted is not None and drafted[0] > 0:
                self.latency.observe_levels(key, *drafted)
                seconds -= drafted[1]
            self.latency.observe(key, size, seconds)
        held = None if verified is None else verified.tolist()
        for row, last in enumerate(last_nodes if tree.size > 1 else ()):  # the root alone shows no guess (and would only re-rank the trees)
            self.acceptance.observe(tree, last, None if held is None else held[row])
            if offer is not None and offer.chains[row] is not None:
                self.lookup.observe(offer.chains[row], tree.lineage[last], None if held is None else held[row])
        if self._drafted_mass is None and self._guessed_mass is None:  # (an AR step: nothing was promised)
            return
        paths = (tree.paths[node - 1] for n in last_nodes for node in tree.lineage[n][1:])
        accepted = Counter(0 if LOOKUP_RANK in path else len(path) for path in paths)  # per depth; 0: lookup guesses
        if self._drafted_mass is not None:  # the draft's probabilities picked this tree: how far they over-promised, per depth
            for depth in self._drafted_mass.keys() | self._draft_mass.keys() | accepted.keys() - {0}:
                self._draft_mass[depth] = DRAFT_DECAY * self._draft_mass.get(depth, 0.0) + self._drafted_mass[depth]
                self._draft_accepted[depth] = DRAFT_DECAY * self._draft_accepted.get(depth, 0.0) + accepted[depth]
            self._drafted_mass = None
        if self._guessed_mass is not None:  # and how far the lookup's chances did
            self._lookup_mass = DRAFT_DECAY * self._lookup_mass + self._guessed_mass
            self._lookup_accepted = DRAFT_DECAY * self._lookup_accepted + accepted[0]
            self._guessed_mass = None

    def observe_ar(self, batch_size: int, context: int, steps: int, seconds: float) -> None:
        """``steps`` plain AR steps taken without choosing (``PropdMethod._holding_ar``) took ``seconds``
        in all: AR measured once at their mean, every measurement aged as by that many steps, and
        the price of lookup guesses alone drifting back as by that many steps that took none
        (``select_guesses``: once such steps had cost more than their price, a run of AR steps that
        offered none kept them out for good, and ProPD's memory carried that into later runs)."""
        key = (batch_size, context // CONTEXT_BUCKET)
        self.latency.steps += steps - 1
        self.latency.observe(key, 1.0, seconds / steps)
        if key in self._guess_scale:
            self._guess_scale[key] = 1.0 + (self._guess_scale[key] - 1.0) * (1.0 - GUESS_DRIFT) ** steps

    def memory(self) -> dict:
        """What it learned, as JSON-able data: ``recall`` takes it back in a later run, which then
        starts where this one left off instead of from the shipped statistics and an exploration
        of the step costs (``Propd.method``: remembered per machine, route, model and drafter)."""
        return {
            "acceptance": self.acceptance.p,
            "lookup": self.lookup.q,
            "latency": self.latency.memory(),
            "ar_extra": [[b, c, t] for (b, c), t in self._ar_extra.items()],
            "guess_scale": [[b, c, x] for (b, c), x in self._guess_scale.items()],
            "delivered": [[b, *sums] for b, sums in self._delivered.items()],
            "draft": [[d, self._draft_mass[d], self._draft_accepted.get(d, 0.0)] for d in self._draft_mass],
            "lookup_sums": [self._lookup_mass, self._lookup_accepted],
            "tree_retries": self._tree_retries,
        }

    def recall(self, memory: dict) -> None:
        """Start from what an earlier run learned (``memory``). ValueError (or KeyError, TypeError)
        where it does not fit this chooser (another drafter's statistics, a damaged file), which is
        then left as it was."""
        p, q = memory["acceptance"], memory["lookup"]
        if _widths(p) != _widths(self.acceptance.p) or _widths(q) != _widths(self.lookup.q):
            raise ValueError("its acceptance statistics have another shape")
        latency = LatencyModel(self.latency.half_life, self.latency.rate)
        latency.recall(memory["latency"])
        ar_extra = {(int(b), int(c)): float(t) for b, c, t in memory["ar_extra"]}
        guess_scale = {(int(b), int(c)): float(x) for b, c, x in memory["guess_scale"]}
        delivered = {int(b): [float(x) for x in sums] for b, *sums in memory["delivered"]}
        draft = {int(d): (float(mass), float(accepted)) for d, mass, accepted in memory["draft"]}
        lookup_mass, lookup_accepted = map(float, memory["lookup_sums"])
        retries = int(memory["tree_retries"])
        self.latency, self._ar_extra, self._guess_scale, self._delivered = latency, ar_extra, guess_scale, delivered
        self.acceptance.p = [[float(x) for x in row] for row in p]
        self.acceptance.version += 1
        self.lookup.q = [[[float(x) for x in row] for row in state] for state in q]
        self._draft_mass = {d: mass for d, (mass, _) in draft.items()}
        self._draft_accepted = {d: accepted for d, (_, accepted) in draft.items()}
        self._lookup_mass, self._lookup_accepted, self._tree_retries = lookup_mass, lookup_accepted, retries

    def _deliver(self, batch_size: int, tree: TokenTree, last_nodes: list[int], seconds: float | None) -> None:
        """``delivery``'s evidence: a priced tree's step adds its tokens and seconds (the whole step's:
        its price drafts too), the seconds capped at ``OUTLIER`` times the price (a cold step), the
        sums decaying by ``DRAFT_DECAY`` per such step. Not aged by AR steps: where trees lose, at
        batch 8, evidence that aged away brought them back every few dozen steps (in two bench runs,
        0.96x AR against 1.04x)."""
        if self._promise is None or self._promise[0] != batch_size or tree.size == 1 or seconds is None:
            return
        _, promised, priced, weights = self._promise
        came = sum((1.0 if weights is None else weights[row]) * len(tree.lineage[last]) for row, last in enumerate(last_nodes))
        sums = self._delivery_sums(batch_size)
        self._delivered[batch_size] = [DRAFT_DECAY * total + x for total, x in zip(sums, (came, promised, min(seconds, OUTLIER * priced), priced))]

    def _delivery_sums(self, batch_size: int) -> list[float]:
        """``delivery``'s sums at this batch size: its own, else the nearest batch size's (a batch
        size's first tree step starts its own from those), else none."""
        if batch_size not in self._delivered and self._delivered:
            return self._delivered[min(self._delivered, key=lambda b: (abs(b - batch_size), b))]
        return self._delivered.get(batch_size, [0.0] * 4)

    @property
    def lookup_scale(self) -> float:
        """Accepted lookup guesses per unit of their chances (``LookupAcceptance``), over recent
        steps. The chances are shared by every prompt, and how much an answer copies its prompt is
        the prompt's own: on 16 MT-Bench questions at batch 1 (AMD EPYC) the guesses ProPD kept
        promised 20.8 tokens on reasoning questions where 11 came, 36.7 on stem where 19 came, and
        58.5 on extraction where 83 came. ``DRAFT_PRIOR`` tokens' worth of a prior at 1 stays in it,
        so that a scale that kept the guesses out comes back as its evidence ages."""
        return (self._lookup_accepted + DRAFT_PRIOR) / (self._lookup_mass + DRAFT_PRIOR)

    def draft_scale(self, depth: int) -> float:
        """Accepted nodes per unit of draft path probability at ``depth``, over recent steps. The
        draft is over-confident, and more so deeper, where its probabilities are products: on 16
        MT-Bench questions at batch 1 (AMD EPYC) 0.85 at depth 1 and 0.71 at depth 2, and one scale
        for both expected 12% more of the second level than came. Each depth's holds ``DRAFT_PRIOR``
        of the pooled depths' ratio (itself holding as much of the 0.8 `propd calibrate` measured on
        MT-Bench): a depth whose nodes the scale kept out is no longer measured, and its evidence
        ages into the pooled ratio (without, depth 2 fell to 0.29 on humanities and writing answers
        and stayed there for eight questions, where the draft was as good as ever)."""
        pooled = (sum(self._draft_accepted.values()) + 0.8 * DRAFT_PRIOR) / (sum(self._draft_mass.values()) + DRAFT_PRIOR)
        return (self._draft_accepted.get(depth, 0.0) + DRAFT_PRIOR * pooled) / (self._draft_mass.get(depth, 0.0) + DRAFT_PRIOR)


def _widths(table: list) -> list:
    """A nested table's shape, row by row."""
    return [_widths(row) if isinstance(row, list) else 0 for row in table]

"""Token trees: which head candidates to verify together, as tensors the verification step indexes.

A node is a path of ranks ``(r1, ..., rd)``: at depth d it carries head d-1's rank-rd candidate,
and its parent is the path without the last rank. A tree is a prefix-closed set of such paths plus
the root (the newest accepted token, depth 0). Nodes are ordered by depth, so every node's ancestors
come before it and a root-to-node path is that node's row of the ancestor mask, in index order.
"""

from __future__ import annotations

import functools
import heapq
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from propd.errors import PropdError

RankPath = tuple[int, ...]
MAX_TREE_TOKENS = 256  # a row's tree tokens, root included (ProPD chooses up to 64; a 256-token step costs tens of AR steps here)


@dataclass(frozen=True)
class TokenTree:
    paths: tuple[RankPath, ...]  # node 1.. as rank paths; node 0 is the root
    parents: torch.Tensor  # [N] parent node index (root: 0)
    depths: torch.Tensor  # [N] 0 for the root
    ancestors: torch.Tensor  # [N, N] bool: ancestors[i, j] = j is i or an ancestor of i
    ranks: torch.Tensor  # [N] each node's rank among its parent's candidates (root: 0)
    children: torch.Tensor  # [N, C] each node's children, padded with -1
    kids: tuple[tuple[int, ...], ...]  # the same as lists, for walks in plain Python
    lineage: tuple[tuple[int, ...], ...]  # each node's path, root first, itself last

    @property
    def size(self) -> int:
        """Tokens verified per step, root included."""
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def max_rank(self) -> int:
        return max((r for p in self.paths for r in p), default=-1) + 1

    @classmethod
    def from_paths(cls, paths) -> "TokenTree":
        """Build from Medusa-style choices, e.g. ``[[0], [1], [0, 0]]``; checks prefix closure."""
        nodes = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        index = {(): 0}
        for p in nodes:
            if not p or min(p) < 0:
                raise PropdError(f"invalid tree path {list(p)}: needs one or more non-negative ranks")
            if p[:-1] not in index:
                raise PropdError(f"tree path {list(p)} has no parent {list(p[:-1])} in the tree")
            index[p] = len(index)
        n = len(index)
        parents = torch.tensor([0] + [index[p[:-1]] for p in nodes])
        depths = torch.tensor([0] + [len(p) for p in nodes])
        ancestors = torch.eye(n, dtype=torch.bool)
        for i, p in enumerate(nodes, 1):
            ancestors[i] |= ancestors[index[p[:-1]]]
        ranks = torch.tensor([0] + [p[-1] for p in nodes])
        kids: list[list[int]] = [[] for _ in range(n)]
        for i in range(1, n):
            kids[int(parents[i])].append(i)
        width = max(1, max(len(c) for c in kids))
        children = torch.tensor([c + [-1] * (width - len(c)) for c in kids])
        lineage: list[tuple[int, ...]] = [(0,)]
        for i in range(1, n):
            lineage.append(lineage[int(parents[i])] + (i,))
        return cls(tuple(nodes), parents, depths, ancestors, ranks, children, tuple(map(tuple, kids)), tuple(lineage))


@functools.lru_cache(maxsize=1024)
def tree_of(paths: tuple[RankPath, ...]) -> TokenTree:
    """``TokenTree.from_paths``, built once per shape (trees chosen per step come back often)."""
    return TokenTree.from_paths(paths)


def path_products(tree: TokenTree, probs: torch.Tensor) -> list[list[float]]:
    """Per row, each node's probability times its ancestors' below the root [B][N], from probs [B, N].
    In plain lists, parent before child, and kept as lists for the chooser (as half a dozen tensor
    ops it took 0.055 ms of every batch-1 ProPD step on the AMD EPYC)."""
    products = []
    for row in probs.tolist():
        product = [1.0] * len(row)
        for node in range(1, len(row)):
            product[node] = product[tree.lineage[node][-2]] * row[node]
        products.append(product)
    return products


def chain(depth: int) -> TokenTree:
    """Blockwise parallel decoding: each head's top-1 guess, one after another (built once per depth)."""
    return tree_of(tuple((0,) * d for d in range(1, depth + 1)))


def medusa_paths(name: str = "mc_sim_7b_63") -> list[list[int]]:
    """A tree published with Medusa, as its list of rank paths (most probable first)."""
    return json.loads((resources.files("propd.tree") / "medusa_trees.json").read_text())[name]


def path_probability(rank_probabilities: list[list[float]], path: RankPath) -> float:
    """Probability that every node on the path is right, heads taken as independent (ProPD's model):
    the product of p[d][r_d], where p[d][r] is the chance that head d's rank-r guess is the token."""
    prob = 1.0
    for depth, rank in enumerate(path):
        prob *= rank_probabilities[depth][rank]
    return prob


def expected_accepted(tree: TokenTree, rank_probabilities: list[list[float]]) -> float:
    """Expected tokens per step: the bonus token plus each node's probability of being accepted."""
    return 1.0 + sum(path_probability(rank_probabilities, p) for p in tree.paths)


def best_paths(rank_probabilities: list[list[float]], count: int) -> list[tuple[float, RankPath]]:
    """The ``count`` most probable paths with their probabilities, most probable first. A path is
    never more probable than its prefix, so every prefix of this list is a tree; a best-first
    search over the ranks finds them."""
    frontier = [(-p, (rank,)) for rank, p in enumerate(rank_probabilities[0])]
    heapq.heapify(frontier)
    chosen: list[tuple[float, RankPath]] = []
    while frontier and len(chosen) < count:
        neg_prob, path = heapq.heappop(frontier)
        chosen.append((-neg_prob, path))
        if len(path) < len(rank_probabilities):
            for rank, p in enumerate(rank_probabilities[len(path)]):
                heapq.heappush(frontier, (neg_prob * p, path + (rank,)))
    return chosen


def best_tree(rank_probabilities: list[list[float]], size: int) -> TokenTree:
    """The ``size``-token tree (root included) with the most expected accepted tokens: the size-1
    most probable paths."""
    return TokenTree.from_paths([path for _, path in best_paths(rank_probabilities, size - 1)])


def tree_names() -> list[str]:
    return ["mc_sim_7b_63", "top32", "top16", "top8", "best64", "best16", "best8d2", "chain2", "chain3", "chain4", "chain5"]


def load_tree(spec: str, rank_probabilities: list[list[float]] | None = None) -> TokenTree:
    """A named tree (see ``tree_names``) or a JSON file holding a list of rank paths.

    ``topN`` is the first N nodes of ``mc_sim_7b_63``, which Medusa lists most probable first;
    ``bestN`` is the N-token tree that ``best_tree`` builds from the heads' rank_probabilities, and
    ``bestNdD`` the same at most D deep (a drafter that fills a tree level by level, as the draft
    layer does, pays one pass per level: measured, 8 tokens 2 deep beat 8 tokens 5 deep)."""
    _check_size(spec)
    best = _best_spec(spec)
    if best:
        if not rank_probabilities:
            raise PropdError(f"tree {spec!r} is built from the heads' acceptance statistics, and these heads have none")
        size, depth = best
        return best_tree(rank_probabilities[: depth or len(rank_probabilities)], size)
    if spec == "mc_sim_7b_63":
        return TokenTree.from_paths(medusa_paths(spec))
    if spec.startswith("top") and spec[3:].isdigit():
        paths = medusa_paths()
        if int(spec[3:]) > len(paths):
            raise PropdError(f"tree {spec!r}: mc_sim_7b_63 has {len(paths)} nodes past the root, so topN takes N up to {len(paths)}")
        return TokenTree.from_paths(paths[: int(spec[3:])])
    if spec.startswith("chain") and spec[5:].isdigit():
        return chain(int(spec[5:]))
    path = Path(spec)
    if path.is_file():
        paths = read_paths(path)
        if len(paths) + 1 > MAX_TREE_TOKENS:
            raise PropdError(f"{path}: a tree of {len(paths) + 1} tokens; propd verifies at most {MAX_TREE_TOKENS} a row")
        return TokenTree.from_paths(paths)
    if path.suffix == ".json" or "/" in spec:
        raise PropdError(f"tree file not found: {path}")
    raise PropdError(f"unknown tree {spec!r}: use one of {', '.join(tree_names())}, topN, bestN, bestNdD (at most D deep), chainN or a JSON file")


def read_paths(path: Path) -> list[list[int]]:
    """A JSON file's list of rank paths, each a list of non-negative integers."""
    try:
        paths = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PropdError(f"{path}: cannot read a JSON tree ({e})") from e
    if not isinstance(paths, list):
        raise PropdError(f"{path}: expected a JSON list of rank paths such as [[0], [1], [0, 0]], got {type(paths).__name__}")
    for p in paths:
        if not isinstance(p, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in p):
            raise PropdError(f"{path}: every rank path must be a list of integers, got {json.dumps(p)}")
    return paths


def _check_size(spec: str) -> None:
    """Refuse a named tree past ``MAX_TREE_TOKENS`` before building it (its ancestor mask alone is N x N)."""
    named = re.fullmatch(r"(?:best|top|chain)(\d+)(?:d\d+)?", spec)
    if named and int(named[1]) + spec.startswith(("top", "chain")) > MAX_TREE_TOKENS:
        raise PropdError(f"tree {spec!r} is too large: propd verifies at most {MAX_TREE_TOKENS} tokens a row")


def _best_spec(spec: str) -> tuple[int, int | None] | None:
    """(size, depth limit or None) of a ``bestN`` / ``bestNdD`` name; None for other names."""
    best = re.fullmatch(r"best(\d+)(?:d(\d+))?", spec)
    if best is None:
        return None
    if best[2] is not None and int(best[2]) < 1:
        raise PropdError(f"tree {spec!r}: a tree is at least 1 deep")
    return int(best[1]), None if best[2] is None else int(best[2])


def check_tree_spec(spec: str, root_only_ok: bool = True) -> None:
    """Fail before any work when ``spec`` names no tree (bestN / bestNdD are checked for their size
    and depth only: their statistics come with the heads). ``root_only_ok`` False: the tree must
    hold a node past the root."""
    _check_size(spec)
    best = _best_spec(spec)
    size = best[0] if best else load_tree(spec).size
    if size < 1 or (size == 1 and not root_only_ok):
        raise PropdError(f"tree {spec!r} holds {'no' if size < 1 else 'only the root and no'} nodes to verify: use a larger one")

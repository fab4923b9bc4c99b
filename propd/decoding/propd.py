"""ProPD (arXiv 2402.13485): parallel decoding over the token tree that, at every step, buys the
most accepted tokens per second on this machine, at this batch size and context length.

A step reads as ProPD's: choose the tree from the acceptance and latency models (dynamic tree
generation, ``TreeChooser``); fill it with the drafter's candidates (the draft layer, the Medusa
heads or a draft model), verify it and accept the longest greedy path (the drafter's ``step_tree``:
output identical to AR whatever the tree), with early pruning dropping the nodes the early layers rule out before the
late layers (``pruning``); feed the step's accepted path and wall time back to both models.

With the draft layer, its own path probabilities predict acceptance better than the rank
statistics (``propd calibrate``): below ``WIDE_BATCH`` rows the draft fills the rank statistics'
best tree of 1.5 times the chosen size for every row, and the chooser keeps the batch's most
probable (row, node) pairs, as many as buy the most expected tokens per second, so each row
verifies a tree of its own size (``step_scored``, ``TreeChooser.select``). From ``WIDE_BATCH`` rows,
where only 2-token trees come near paying, every row verifies the chosen tree itself (and it is
priced so): side by side with the per-row choice, batch 4 gained 1-5% AR and batch 8 moved -0.6% to
+0.3% (AMD EPYC; docs/propd.md). In a fixed batch, which ends with its slowest row, a row's
nodes count less the further it is ahead (``DecodeLoop.weights``): the rows behind get the nodes first,
and a tree for them alone is priced at their share.

Beside the draft's nodes each row is offered its prompt-lookup guesses (``lookup``: what followed
its newest n-gram where it last occurred in its prompt or answer), grafted onto the drafted tree
and valued by their own acceptance model, so they compete for the step's tokens with the draft's
nodes; where the chooser prices AR, the guesses alone may replace the AR step, since they need no
drafting (``step_guesses``, ``TreeChooser.select_guesses``). Below ``WIDE_BATCH`` rows only: in
five runs of the same bench on the AMD EPYC they gave batch 1 1.32-1.35x AR against 1.22-1.25x, but
batch 4 0.94-0.96x against 0.96-0.99x and batch 8 0.86-0.97x against 0.89-0.99x.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from propd.decoding.draft import DraftMethod
from propd.decoding.lookup import LOOKUP_DEPTH, Offer
from propd.decoding.loop import State, StepResult
from propd.decoding.pruning import Pruner
from propd.decoding.sampling import Picker
from propd.decoding.spec import SpecMethod
from propd.decoding.tree import TreeMethod
from propd.models import graphs
from propd.models.decoder import Decoder, synchronize
from propd.models.kv_cache import KVCache
from propd.models.loading import write_cache
from propd.tree.dynamic import WIDE_BATCH, TreeChooser
from propd.tree.tree import TokenTree, tree_of

REMEMBER_EVERY = 30.0  # seconds between writes of the chooser's memory (``PropdMethod.remember``)
AR_RUN = 8  # plain AR steps after a priced AR choice before choosing again (``PropdMethod._holding_ar``)
LOOKUP_CHAINS = 4  # room a step's tree keeps beside the draft's nodes for this many lookup chains (rows sharing an anchor share one)


class PropdMethod:
    """ProPD's step. ``chooser`` None keeps the drafter's own static tree (the prune-only ablation);
    ``pruner`` None verifies every tree token through every layer (the dynamic-only ablation)."""

    def __init__(
        self, drafter: DraftMethod | TreeMethod | SpecMethod, chooser: TreeChooser | None, pruner: Pruner | None = None, draft_scores: bool = True,
        lookup: bool = True, memory: Path | None = None,
    ):
        self.drafter, self.chooser, self.pruner = drafter, chooser, pruner
        self.memory = memory if chooser is not None else None  # where the chooser's learning is kept between runs (``remember``)
        self.recalled = False  # whether the chooser started from that memory
        self.learned = Learned()  # when that memory was last written, and whether the chooser learned since
        if self.memory is not None:  # what it learned since its last write, written where the method ends (collected, or at exit)
            weakref.finalize(self, _write_unsaved, self.memory, self.chooser, self.learned)
        self.ar_run: ARRun | None = None  # the AR steps taken after a priced AR choice, while they last
        self.draft_scores = draft_scores and chooser is not None and isinstance(drafter, DraftMethod)
        if self.draft_scores and lookup:  # each row's prompt-lookup guesses offered beside the draft's
            drafter.lookup = True
            drafter.reserve(max(chooser.sizes) + LOOKUP_CHAINS * LOOKUP_DEPTH, max(len(chooser.acceptance.p), LOOKUP_DEPTH), 0)
        elif chooser is not None:
            drafter.reserve(max(chooser.sizes), len(chooser.acceptance.p), len(chooser.acceptance.p[0]))
        self.tree_size, self.tree_depth = drafter.tree_size, drafter.tree_depth
        if self.memory is not None and self.memory.exists():
            try:
                self.chooser.recall(json.loads(self.memory.read_text()))
                self.recalled = True
            except (OSError, ValueError, KeyError, TypeError) as e:
                warnings.warn(f"ProPD's memory {self.memory} is unreadable ({e!r}): starting from the shipped statistics", stacklevel=2)

    def remember(self) -> None:
        """Keep what the chooser learned (``TreeChooser.memory``) for the next run with the same
        machine, route, model and settings, which then need not explore the step costs again. One-shot
        generations (a new method each, 96 tokens, MT-Bench, interleaved; AMD EPYC): batch 8 0.965x AR
        against 0.928x from the shipped statistics, batch 4 0.994x against 0.973x, batch 1 1.41x and
        1.38x against 1.43x and 1.34x. An unwritable cache costs only that. Written after the first
        generation, then at most every ``REMEMBER_EVERY`` seconds and once more where the method ends
        (collected, or at the interpreter's exit): each write
        cost a generation 4-8 ms (Intel Xeon with AMX), 1.5% of a 96-token answer at batch 1."""
        if self.memory is None:
            return
        if self.learned.written_at is not None and time.monotonic() - self.learned.written_at < REMEMBER_EVERY:
            self.learned.unsaved = True
            return
        _write_memory(self.memory, self.chooser, self.learned)

    def start(self, decoder: Decoder, cache: KVCache, hidden: torch.Tensor, picker: Picker, prompts: list[list[int]]) -> tuple[torch.Tensor, State]:
        self._end_ar_run()  # new rows: the next step chooses
        return self.drafter.start(decoder, cache, hidden, picker, prompts)

    def step(self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: State, picker: Picker) -> StepResult:
        rows, context = cache.batch_size, cache.longest
        if self._holding_ar(state, rows):  # AR was priced a moment ago: a plain AR step, nothing chosen or learned
            return self._ar_step(decoder, cache, roots, state, picker)
        tree = self.chooser.choose(rows, context, picker.weights) if self.chooser else self.drafter.tree  # dynamic tree generation
        if tree.size > 1:
            self._catch_up(decoder, state, rows, context)
        clock = Clock.start()
        step = self._verify(decoder, cache, roots, state, picker, tree, rows, context)  # draft, prune early, verify, accept
        if self.chooser:
            self._observe(step, clock, rows, context)  # the acceptance and latency models learn
            self.ar_run = self._ar_run(tree, rows, context)
        return step.result

    def _holding_ar(self, state: State, rows: int) -> bool:
        """Whether this step is one of the ``AR_RUN`` plain AR steps after a priced AR choice: not
        where rows left, nor where a row's lookup guesses could pay. A run that ends is measured
        as one AR step at its mean (``TreeChooser.observe_ar``). Choosing and learning every AR
        step cost ProPD's AR steps 0.3-0.4 ms each at batch 1 (Intel Xeon with AMX), more than their
        own 0.1 ms: what they touch, the step's other Python then met cold."""
        run = self.ar_run
        if run is None:
            return False
        guessing = run.guess_states and any(s in run.guess_states for s in state.lookup.states())
        if run.left > 0 and run.rows == rows and not guessing:
            return True
        self._end_ar_run()
        return False

    def _end_ar_run(self) -> None:
        """End the ``ARRun``, if one is on, and measure it."""
        run, self.ar_run = self.ar_run, None
        if run is not None and run.steps:
            self.chooser.observe_ar(run.rows, run.context, run.steps, run.seconds)

    def _ar_run(self, tree: TokenTree, rows: int, context: int) -> ARRun | None:
        """The AR steps to take after this step, where it priced AR; with lookup guesses, the row
        states whose guesses would break the run (``TreeChooser.guess_states``)."""
        if tree.size > 1 or not self.chooser.ar_by_price:
            return None
        lookup = self.draft_scores and self.drafter.lookup and rows < WIDE_BATCH
        return ARRun(rows, context, self.chooser.guess_states(rows, context) if lookup else set())

    def _ar_step(self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: State, picker: Picker) -> StepResult:
        """A plain AR step of an ``ARRun``, timed for it."""
        clock, run = Clock.start(), self.ar_run
        result = self.drafter.step_tree(decoder, cache, roots, state, picker, tree_of(()))[0]
        run.left -= 1
        if (seconds := clock.seconds()) is not None:
            run.steps, run.seconds = run.steps + 1, run.seconds + seconds
        result.expected = [1.0] * len(roots)
        return result

    def _catch_up(self, decoder: Decoder, state: State, rows: int, context: int) -> None:
        """The drafter reads what the AR steps since its last tree left it, timed apart and charged
        to AR (``TreeChooser.charge_ar``)."""
        clock = Clock.start()
        if ar_steps := self.drafter.catch_up(decoder, state):
            synchronize(decoder.device)
            if (seconds := clock.seconds()) is not None:
                self.chooser.charge_ar(rows, context, seconds / ar_steps)

    def _verify(
        self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: State, picker: Picker, tree: TokenTree, rows: int, context: int,
    ) -> Verification:
        """The step over ``tree``: with draft scores below ``WIDE_BATCH`` rows, each row verifies the
        drafted nodes (and lookup guesses) the chooser selects; where the chooser priced AR there,
        lookup guesses alone may replace the AR step; otherwise every row verifies ``tree``."""
        lookup = self.draft_scores and self.drafter.lookup and rows < WIDE_BATCH
        if tree.size == 1 and lookup and self.chooser.ar_by_price:  # lookup guesses need no drafting
            select = functools.partial(self.chooser.select_guesses, rows, context)
            result, last, verified, offer = self.drafter.step_guesses(decoder, cache, roots, state, picker, select)
            return Verification(result, last, tree, verified, offer, drafted=False)
        if tree.size > 1 and self.draft_scores and rows < WIDE_BATCH:  # the draft's own path probabilities pick each row's nodes
            candidates = self.chooser.candidates(tree)
            select = functools.partial(self.chooser.select, rows, context, tree.size, candidates, weights=picker.weights)
            result, last, verified, offer = self.drafter.step_scored(decoder, cache, roots, state, picker, candidates, select, self.pruner, lookup)
            return Verification(result, last, candidates, verified, offer, drafted=True)
        result, last = self.drafter.step_tree(decoder, cache, roots, state, picker, tree, self.pruner)
        return Verification(result, last, tree, drafted=tree.size > 1)

    def _observe(self, step: Verification, clock: Clock, rows: int, context: int) -> None:
        """Feed the step's accepted paths and wall time to the chooser; the result carries what it expected."""
        last_nodes = step.last.tolist()  # the step's end (on a GPU, where its work is done)
        drafted = self.drafter.drafted if step.drafted else None
        tree = step.offer.tree if step.offer else step.tree
        self.chooser.observe(tree, rows, context, last_nodes, clock.seconds(), step.verified, drafted, step.offer)
        step.result.expected = self.chooser.expected_rows if step.verified is not None else [self.chooser.expected] * rows


@dataclass
class Learned:
    """When a chooser's memory was last written (``PropdMethod.remember``; None: not yet), and whether it learned since."""

    written_at: float | None = None
    unsaved: bool = False


def _write_memory(path: Path, chooser: TreeChooser, learned: Learned) -> None:
    write_cache(path, json.dumps(chooser.memory()))
    learned.written_at, learned.unsaved = time.monotonic(), False


def _write_unsaved(path: Path, chooser: TreeChooser, learned: Learned) -> None:
    """What the chooser learned since its memory was last written, where its method ends."""
    if learned.unsaved:
        _write_memory(path, chooser, learned)


@dataclass
class ARRun:
    """The plain AR steps ProPD takes after a priced AR choice without choosing again (``PropdMethod._holding_ar``):
    for ``rows`` rows from ``context`` cached tokens, ``left`` to take, and the ``steps`` timed so far and their ``seconds``."""

    rows: int
    context: int
    guess_states: set[tuple[bool, int]]  # a row in one of these offers lookup guesses: the run ends
    left: int = AR_RUN
    steps: int = 0
    seconds: float = 0.0


@dataclass
class Verification:
    """One ProPD step's outcome: its result, each row's last accepted node [B] (of ``tree``, the tree
    verified, or of the offer's tree where lookup guesses were grafted on), the nodes each row
    verified [B, N] where rows verified their own, and whether the drafter drafted."""

    result: StepResult
    last: torch.Tensor
    tree: TokenTree
    verified: torch.Tensor | None = None
    offer: Offer | None = None
    drafted: bool = False


@dataclass
class Clock:
    """Wall time from ``start``, or None where a CUDA graph was captured meanwhile (a capture costs
    many replays: no measurement of a step)."""

    started: float
    captures: int

    @classmethod
    def start(cls) -> "Clock":
        return cls(time.perf_counter(), graphs.captured())

    def seconds(self) -> float | None:
        return time.perf_counter() - self.started if graphs.captured() == self.captures else None

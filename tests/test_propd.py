"""ProPD's dynamic trees: the acceptance and latency models learn what they should, the chooser
trades them as ProPD says, and decoding with a tree chosen every step stays identical to AR."""

import gc
import json
import random

import pytest
import torch

from propd.bench.run import _build as build_method
from propd.decoding.ar import ARMethod
from propd.decoding.draft import DraftMethod
from propd.decoding.loop import generate_batch
from propd.decoding.propd import AR_RUN, PropdMethod
from propd.decoding.pruning import Pruner, whole_paths
from propd.decoding.tree import TreeMethod
from propd.heads.early import EarlyHead
from propd.models import graphs
from propd.models.decoder import Decoder
from propd.models.kernels import Route
from propd.tree.dynamic import CHOOSE_EVERY, GUESS_DRIFT, NARROW_WIN, SPEED_RATE, WIDE_BATCH, AcceptanceModel, LatencyModel, TreeChooser
from propd.tree.tree import best_tree, chain, path_products
from tests.conftest import REAL_PROMPTS, tiny_hf_model
from tests.test_draft import random_draft
from tests.test_tree import random_heads, random_tree

STATS = [[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.2, 0.1]]


def test_acceptance_model_moves_toward_what_each_step_shows():
    model = AcceptanceModel([row[:] for row in STATS], rate=0.5)
    tree = chain(3)
    model.observe(tree, 2)  # depths 1 and 2 right, depth 3 wrong
    assert model.p[0][0] == pytest.approx(0.8) and model.p[1][0] == pytest.approx(0.75)
    assert model.p[2][0] == pytest.approx(0.2)
    assert model.p[0][1] == 0.2  # rank 1 was not in the chain: nothing learnt about it


def test_latency_line_fits_and_forgets():
    lat = LatencyModel(half_life=4, rate=1.0)
    key = (1, 0)
    assert lat.predict(key, [8]) is None
    lat.observe(key, 1, 0.020)  # plain AR: no drafter, not on the trees' line
    lat.observe(key, 2, 0.030)
    lat.observe(key, 10, 0.046)
    assert lat.predict(key, [6, 1]) == pytest.approx([0.038, 0.020])
    assert lat.line(key)[1] == pytest.approx(0.002)
    for _ in range(40):  # the machine got slower at size 10; size 2 was not measured again
        lat.observe(key, 10, 0.060)
    assert lat.predict(key, [10]) == pytest.approx([0.060], rel=1e-3)


def test_one_stalled_step_moves_a_cost_at_most_twofold_and_a_stalled_second_step_is_not_kept():
    lat = LatencyModel(rate=0.3)
    key = (6, 0)
    lat.observe(key, 1, 0.014)  # cold first step
    lat.observe(key, 1, 0.650)  # a stall (on the AMD EPYC: the argmax's int8 screen built in this step)
    assert lat.buckets[key][1].seconds == 0.014
    for _ in range(5):
        lat.observe(key, 1, 0.013)
    before = lat.buckets[key][1].seconds
    lat.observe(key, 1, 0.650)
    assert lat.buckets[key][1].seconds == pytest.approx(before * 1.3)  # moved by rate x (2 x before - before)
    for seconds in (0.030, 0.030, 0.900):
        lat.observe(key, 2, seconds)
    assert lat.buckets[key][2].seconds == pytest.approx(0.030 * 1.3)
    lat.seed((5, 0), key)  # a seeded cost: its first measurement here is capped too
    lat.observe((5, 0), 1, 0.650)
    assert lat.buckets[(5, 0)][1].seconds < 0.04


def test_chooser_explores_small_trees_then_picks_ar_when_trees_cost_and_grows_trees_when_they_do_not():
    for slope, want_big in ((0.05, False), (0.0001, True)):
        chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]))
        chosen = []
        for _ in range(40 if want_big else 140):
            size = chooser.choose(1, 100).size
            chosen.append(size)
            chooser.latency.observe((1, 0), size, 0.03 + slope * size + 0.01 * (size > 1))
        assert chosen[:6] == [2, 2, 4, 4, 1, 1]  # two small trees and AR first, twice each (a first step runs cold)
        assert all(n <= 2 * max(chosen[:i]) for i, n in enumerate(chosen[6:], 6))  # never past twice the largest measured
        if want_big:
            assert chosen[8] > 16 and chosen[9:].count(1) == 1, chosen  # AR, long unpicked, is measured once more
        else:
            retries = [i for i, n in enumerate(chosen[6:], 6) if n > 1]  # so are the trees, less often each time they lose
            assert len(retries) == 2 and retries[0] < 40 and retries[1] - retries[0] >= 64 and set(chosen[6:]) == {1, 2}, chosen


def test_trees_for_the_rows_that_count_are_priced_at_their_share_of_the_nodes():
    """Where a fixed batch's rows ahead count less (``DecodeLoop.weights``), a tree's nodes go to the
    rows behind (``select``) and the step costs the line at their share: a tree that loses to AR
    for 3 rows alike wins for the 1 that counts. From ``WIDE_BATCH`` rows every row verifies the
    whole tree, and it is priced so."""
    for rows, weights in ((3, [1.0, 0.0, 0.0]), (8, [1.0] * 3 + [0.0] * 5)):
        chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]), margin=1.0)
        for size in (1, 2, 2, 4, 4, 1):
            chooser.choose(rows, 100)
            chooser.latency.observe((rows, 0), size, 0.013 + 0.006 * (size - 1) + 0.002 * (size > 1))  # a tree token costs half an AR step
        assert chooser.choose(rows, 100).size == 1
        chooser._chosen = None
        assert (chooser.choose(rows, 100, weights).size > 1) == (rows < WIDE_BATCH)


def test_trees_are_priced_at_the_part_of_their_promised_rate_that_trees_delivered_at_about_this_batch_size():
    """``select`` gives a tree's nodes to some rows only, so at batch 8 trees delivered half of the
    tokens the rank statistics' tree promised for every row: the chooser prices the next ones at the
    part of the promised rate (tokens per second, the rows weighed) that came."""
    chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]), margin=1.0)
    for size in (1, 2, 2, 4, 4, 1):  # a tree token costs a tenth of an AR step: trees win on their promise
        chooser.choose(8, 100)
        chooser.latency.observe((8, 0), size, 0.013 + 0.0013 * (size - 1))
    weights = [1.0] * 4 + [0.5] * 4
    tree = chooser.choose(8, 100, weights)
    assert tree.size > 1 and chooser.delivery(8) == 1.0
    _, promised, priced, _ = chooser._promise
    assert promised == pytest.approx(6 * chooser.expected)  # the rows' weights: 4 x 1 + 4 x 0.5
    assert priced == pytest.approx(chooser.latency.predict((8, 0), [tree.size], [tree.depth])[0])  # every row verifies the whole tree
    chooser.observe(tree, 8, 100, [1, 0, 0, 0, 1, 0, 0, 0], 2 * priced)  # two rows accepted a node, one of them half-weighed; twice the price
    assert tree.lineage[1] == (0, 1)
    per_token = priced / promised
    tokens, time = (6 + 1.5 + 4) / (promised + 4), (priced + 4 * per_token) / (2 * priced + 4 * per_token)
    assert chooser.delivery(8) == pytest.approx(tokens * time)
    assert chooser.delivery(7) == chooser.delivery(8) and chooser.delivery(4) == chooser.delivery(8)  # from the nearest batch size seen
    assert chooser.delivery(1) == 1.0  # below WIDE_BATCH rows, one row takes every node: trees priced at their promise
    for sums, size in (([100.0, 100.0, 1.0, 1.0], 2), ([10.0, 100.0, 1.0, 1.0], 1), ([50.0, 100.0, 0.5, 1.0], 2)):  # all, a tenth, half in half the time
        chooser._delivered[8], chooser._chosen = sums, None
        assert min(chooser.choose(8, 100).size, 2) == size, sums
    chooser._delivered[8] = [10.0, 100.0, 1.0, 1.0]
    chooser.observe(tree, 8, 100, [0] * 8, None)  # a step that measured nothing (a CUDA graph's capture) is no evidence
    chooser.observe(chooser.tree(1)[0], 8, 100, [0] * 8, 0.013)  # nor is an AR step
    assert chooser._delivered[8] == [10.0, 100.0, 1.0, 1.0]


def test_ar_is_measured_again_sooner_while_a_wide_batchs_trees_win_narrowly():
    # trees win narrowly, widely (the margin: 1.0 from WIDE_BATCH rows, 1.1 below), narrowly
    for rows, tree_cost, sooner in ((4, 0.0115, True), (4, 0.005, False), (1, 0.01, False)):
        chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]))
        chosen = []
        for _ in range(80):
            size = chooser.choose(rows, 100).size
            chosen.append(size)
            chooser.latency.observe((rows, 0), size, 0.02 + (tree_cost + 0.0015 * size) * (size > 1))
        ar_steps = [i for i, n in enumerate(chosen) if n == 1][1:]  # after exploring
        gaps = [b - a for a, b in zip(ar_steps, ar_steps[1:])]
        assert (chooser._won_by < NARROW_WIN) == (tree_cost != 0.005) and len(gaps) >= 2, (chooser._won_by, chosen)
        assert max(gaps) <= 10 if sooner else min(gaps) > 30, (rows, gaps)


def test_a_new_bucket_starts_from_a_smaller_or_near_batch_measures_its_smallest_tree_and_its_seeded_costs_follow_its_own():
    chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]))
    for size, seconds in ((1, 0.02), (2, 0.022), (4, 0.026)):  # trees pay at batch 4
        chooser.latency.observe((4, 0), size, seconds)
    assert chooser.choose(8, 100).size == 2  # batch 8 after batch 4, its seeded costs favour a tree: the smallest is measured first
    assert chooser.latency.measured((8, 0)) == [1, 2, 4]
    seeded4, seeded2 = 0.02 + 0.006 * 2**0.5, 0.02 + 0.002 * 2**0.5  # a tree's cost past AR's, times the root of the rows' ratio
    assert chooser.latency.buckets[(8, 0)][4].seconds == pytest.approx(seeded4)
    chooser.latency.observe((8, 0), 2, 2 * seeded2)  # trees cost twice batch 4's here: so do the other seeded trees, until measured here
    assert chooser.latency.buckets[(8, 0)][4].seconds == pytest.approx(2 * seeded4)
    assert chooser.latency.buckets[(8, 0)][1].seconds == pytest.approx(0.02)  # AR's seeded cost does not follow the trees'
    assert not chooser.latency.seeded_only((8, 0))
    assert chooser.choose(8, 100).size == 1
    assert chooser.choose(7, 100).size == 1  # a row left the batch: its costs are batch 8's, which favour AR: no tree is forced
    assert chooser.latency.measured((7, 0)) == [1, 2, 4]
    assert chooser.choose(2, 100).size == chooser.explore[0] and chooser.latency.measured((2, 0)) == []  # only larger batches: explores


def test_a_seeded_buckets_tree_costs_move_with_its_own_ar_and_its_first_tree():
    lat = LatencyModel()
    for size, seconds in ((1, 0.020), (2, 0.021), (4, 0.024)) * 2:
        lat.observe((4, 0), size, seconds)
    lat.seed((8, 0), (4, 0))
    seeded = {n: s.seconds for n, s in lat.buckets[(8, 0)].items()}
    assert seeded[2] == pytest.approx(0.020 + 0.001 * 2**0.5)  # batch 4's AR under batch 8's extra
    lat.observe((8, 0), 1, 0.030)  # batch 8's AR: 10 ms dearer than batch 4's
    assert lat.buckets[(8, 0)][1].seconds == 0.030
    assert [lat.buckets[(8, 0)][n].seconds for n in (2, 4)] == pytest.approx([seeded[2] + 0.010, seeded[4] + 0.010])  # not below AR
    lat.observe((8, 0), 3, 0.040)  # the first tree, of a size never seeded: the seeded trees scale by its ratio to their line
    line = (seeded[2] + seeded[4]) / 2 + 0.010
    assert [lat.buckets[(8, 0)][n].seconds for n in (2, 4)] == pytest.approx([(seeded[n] + 0.010) * 0.040 / line for n in (2, 4)])
    assert lat.buckets[(8, 0)][1].seconds == 0.030


def test_ar_is_charged_what_the_drafter_reads_after_it_and_drafts_no_deeper_than_the_tree():
    chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]))
    for size, seconds in ((2, 0.03), (4, 0.042), (1, 0.02)) * 2:  # explored twice each
        chooser.latency.observe((1, 0), size, seconds)
    assert chooser.choose(1, 100).size == 1  # trees buy 1.6-2.1 tokens for 1.5-2.1x AR's time: not enough
    chooser.charge_ar(1, 100, 0.005)  # but each AR step left the drafter 5 ms of reading
    assert chooser.choose(1, 100).size > 1
    tree = chooser.tree(4)[0]
    drafted = chooser.candidates(chooser.tree(2)[0])  # 1.5x the chosen size, as deep as the chosen tree
    assert (drafted.size, drafted.depth) == (3, 1) and tree.depth == 2


def test_a_choice_holds_for_a_few_steps_until_ars_price_moves(monkeypatch):  # (a choice of the largest size measured does not: growing trees, above)
    chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]), sizes=(1, 2, 4, 8))
    for size, seconds in ((2, 0.022), (4, 0.024), (1, 0.02), (8, 0.06)) * 2:  # small trees pay; 8 tokens measured, and dear
        chooser.latency.observe((1, 0), size, seconds)
    priced = []
    monkeypatch.setattr(chooser.latency, "predict", lambda *a, predict=chooser.latency.predict: priced.append(1) or predict(*a))
    chosen = []
    for _ in range(2 * CHOOSE_EVERY):
        tree = chooser.choose(1, 100)
        chosen.append((tree.size, len(priced)))
        chooser.latency.observe((1, 0), tree.size, 0.022 + 0.001 * tree.size)
    assert len({size for size, _ in chosen}) == 1 and 1 < chosen[0][0] < 8  # a tree, not the largest measured
    assert [n for _, n in chosen] == [1] * CHOOSE_EVERY + [2] * CHOOSE_EVERY  # priced every CHOOSE_EVERY steps
    chooser._ar_won = True
    chooser.charge_ar(1, 100, 0.001)  # AR's price moved: priced again at once
    chooser.choose(1, 100)
    assert len(priced) == 3


def test_an_ar_step_measured_again_between_trees_is_not_charged_the_drafters_reading():
    chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]))
    chosen = []
    while chosen.count(1) < 3:  # explored twice, then measured again once trees have won for a while
        size = chooser.choose(1, 100).size
        chosen.append(size)
        if size > 1 and chosen[-2:-1] == [1]:
            chooser.charge_ar(1, 100, 0.005)
        chooser.observe(chooser.tree(size)[0], 1, 100, [size - 1], 0.02 + 0.002 * size * (size > 1))  # (trees deliver: they keep winning)
    assert chosen[6:].count(1) == 1 and chosen[-1] == 1
    chooser.choose(1, 100)  # a tree again
    chooser.charge_ar(1, 100, 0.005)
    assert chooser._ar_extra == {}  # neither the explored AR steps nor the one measured again won a step


def test_from_four_rows_the_chooser_keeps_its_trees_as_shallow_as_asked():
    depths = {}
    for rows in (1, 4):
        chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]), wide_depth=1)
        for _ in range(3):  # the small trees it explores first: 2, 2 (its first step ran cold), 4
            tree = chooser.choose(rows, 100)
            chooser.latency.observe((rows, 0), tree.size, 0.03)
        depths[rows] = tree.depth
    assert depths == {1: 2, 4: 1}


class ScriptedChooser(TreeChooser):
    """Tree sizes in a fixed order (then 3 every step)."""

    def __init__(self, script: list[int]):
        super().__init__(AcceptanceModel([row[:] for row in STATS]), sizes=(1, 3))
        self.script = iter(script)

    def choose(self, batch_size, context, weights=None):
        tree, self.expected = self.tree(next(self.script, 3))
        return tree


@pytest.mark.parametrize("seed", [1, 5])
def test_the_draft_reads_what_ar_steps_left_before_the_next_tree_and_stays_lossless(seed):
    rng, dec, prompts, ar = tiny_case(seed)
    drafter = DraftMethod(random_draft(dec.args, seed), chain(1))
    read = []
    catch_up = drafter.catch_up
    drafter.catch_up = lambda decoder, state: read.append(catch_up(decoder, state)) or read[-1]
    chooser = ScriptedChooser([3, 1, 1, 3, 1, 3, 3])
    out = generate_batch(dec, PropdMethod(drafter, chooser, draft_scores=False), prompts, 40, {0})
    assert [s.token_ids for s in out] == ar
    assert read[:4] == [0, 2, 1, 0]  # AR steps read at the next tree, all but the newest


class PricedARChooser(TreeChooser):
    """AR, priced, every step it is asked; counts the asking and the runs' measurements."""

    def __init__(self, guessing: set):
        super().__init__(AcceptanceModel([row[:] for row in STATS]), sizes=(1, 3))
        self.asked, self.runs, self.guessing = 0, [], guessing

    def choose(self, batch_size, context, weights=None):
        self.asked += 1
        self.ar_by_price, self.expected = True, 1.0
        return self.tree(1)[0]

    def guess_states(self, batch_size, context):
        return self.guessing

    def observe_ar(self, batch_size, context, steps, seconds):
        self.runs.append(steps)
        super().observe_ar(batch_size, context, steps, seconds)


def test_the_lookup_states_whose_guesses_could_pay_are_those_of_likely_guesses_where_tokens_are_cheap():
    for per_token, pays in ((0.0002, True), (0.1, False)):  # (a token costing AR's step: even a 77% guess does not pay)
        chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]), sizes=(1, 2, 4))
        assert chooser.guess_states(1, 100) == set()  # nothing measured: no price
        for size in (1, 2, 4, 1, 2, 4):
            chooser.latency.observe((1, 0), size, 0.02 + per_token * size)
        states = chooser.guess_states(1, 100)
        likeliest = max(((c, n) for c in (False, True) for n in (1, 2, 3)), key=lambda s: chooser.lookup.q[s[0]][s[1] - 1][0])
        assert (likeliest in states) == pays and (states == set()) != pays
    chooser._guess_scale[(1, 0)] = 3.0  # guesses alone had cost three times their price
    chooser.observe_ar(1, 100, AR_RUN, 0.02 * AR_RUN)
    assert chooser._guess_scale[(1, 0)] == pytest.approx(1 + 2 * (1 - GUESS_DRIFT) ** AR_RUN)  # drifting back as over AR_RUN declined steps

def test_after_a_priced_ar_choice_ar_runs_without_choosing_unless_a_rows_lookup_guesses_could_pay():
    rng, dec, prompts, ar = tiny_case(2)
    prompts = prompts[:1]
    asked = []
    for guessing in (set(), {(copying, n) for copying in (False, True) for n in (1, 2, 3)}):
        chooser = PricedARChooser(guessing)
        method = PropdMethod(DraftMethod(random_draft(dec.args, 2), chain(1)), chooser)
        out = generate_batch(dec, method, prompts, 40, {0})
        assert [s.token_ids for s in out] == ar[:1]
        assert out[0].step_expected and set(out[0].step_expected) <= {1.0, None}
        asked.append(chooser.asked)
        if not guessing:  # a choice, then AR_RUN steps measured as one; a new generation chooses at its first step
            assert chooser.asked == -(-len(out[0].step_accepted) // (AR_RUN + 1)) and chooser.runs and set(chooser.runs) == {AR_RUN}
            again = generate_batch(dec, method, prompts, 40, {0})
            assert [s.token_ids for s in again] == ar[:1] and chooser.asked == 2 * asked[-1]
    assert asked[1] > 2 * asked[0]  # a row whose newest n-gram came before (its guesses could pay) ends the run

def test_after_a_long_run_of_ar_the_draft_reads_only_its_window_into_an_emptied_cache_and_stays_lossless(monkeypatch):
    import propd.decoding.draft as draft_module

    monkeypatch.setattr(draft_module, "DRAFT_WINDOW", 4)
    rng, dec, prompts, ar = tiny_case(3)
    drafter = DraftMethod(random_draft(dec.args, 3), chain(1))
    seen = []
    catch_up = drafter.catch_up

    def spy(decoder, state):
        steps = catch_up(decoder, state)
        seen.append((steps, state.cache.lengths.tolist()))
        return steps

    drafter.catch_up = spy
    out = generate_batch(dec, PropdMethod(drafter, ScriptedChooser([3] + [1] * 9 + [3, 1, 1, 3]), draft_scores=False), prompts, 40, {0})
    assert [s.token_ids for s in out] == ar
    (long_run, emptied), (short_run, kept) = seen[1], seen[2]
    assert long_run == 9 and emptied == [4] * len(prompts)  # 9 AR steps: an emptied cache reads only the last 4
    assert short_run == 2 and all(k > e + 2 for k, e in zip(kept, emptied))  # 2: read on top of what it held (and the tree's path)


def test_drafting_levels_are_costed_apart_so_a_shallow_tree_can_win_over_a_deep_one():
    """The draft layer drafts a level per pass: a deep tree costs its passes on top of its size."""
    stats = [[0.7, 0.2, 0.1], [0.6, 0.1, 0.05], [0.6, 0.1, 0.05]]
    rates = {}
    for level_cost in (0.0, 0.004):
        chooser = TreeChooser(AcceptanceModel([row[:] for row in stats]), sizes=(1, 2, 4), margin=1.0)
        for _ in range(2):
            for size in (1, 2, 4):
                depth = chooser.tree(size)[0].depth if size > 1 else 0
                drafted = (depth, level_cost * depth) if size > 1 else None
                chooser.observe(chooser.tree(size)[0], 1, 0, [0], 0.010 + 0.0005 * size + (drafted[1] if drafted else 0.0), None, drafted)
        assert chooser.latency.drafting((1, 0), 1) == pytest.approx(level_cost)
        assert chooser.latency.predict((1, 0), [4, 4], [1, 3]) == pytest.approx([0.012 + level_cost, 0.012 + 3 * level_cost])
        chosen = chooser.choose(1, 0)
        rates[level_cost] = (chosen.size, chosen.depth)
    assert rates[0.0] == (4, 3)  # drafting free: the most probable 4-token tree, a chain
    assert rates[0.004][0] > 1 and rates[0.004][1] == 1  # 4 ms a level: a tree one level deep


def test_a_cold_first_drafting_is_not_kept():
    """Of a bucket's first two drafting measurements at a depth the faster counts (the first runs
    cold); later ones move the average, a stall at most twofold."""
    latency = LatencyModel()
    latency.observe_levels((4, 0), 1, 0.0236)
    latency.observe_levels((4, 0), 1, 0.0012)
    assert latency.drafting((4, 0), 1) == pytest.approx(0.0012)
    latency.observe_levels((4, 0), 1, 0.1)
    assert latency.drafting((4, 0), 1) == pytest.approx(0.0012 + latency.rate * 0.0012)
    latency.observe_levels((4, 0), 2, 0.002)  # each depth counts its own
    latency.observe_levels((4, 0), 2, 0.003)
    assert latency.drafting((4, 0), 2) == pytest.approx(0.002)


def test_a_step_that_captured_a_cuda_graph_is_no_latency_measurement(monkeypatch):
    """A graph's first capture (each new step shape, on a GPU) costs many replays: timed as the
    step's cost it made trees look dear and AR, charged the draft's catch-up, dearer still."""
    rng, dec, prompts, ar = tiny_case(1)
    drafter = DraftMethod(random_draft(dec.args, 1), chain(1))
    chooser = ScriptedChooser([3, 1, 1, 3, 3, 1, 3])
    captured, measured = [], []
    step_tree, observe = drafter.step_tree, chooser.latency.observe

    def step_capturing(*args, **kwargs):  # the 2nd, 4th, ... step captures a graph
        captured.append(len(captured) % 2 == 1)
        monkeypatch.setattr(graphs.GraphedLayers, "captures", graphs.captured() + captured[-1])
        return step_tree(*args, **kwargs)

    monkeypatch.setattr(drafter, "step_tree", step_capturing)
    monkeypatch.setattr(chooser.latency, "observe", lambda *args: measured.append(len(captured) - 1) or observe(*args))
    out = generate_batch(dec, PropdMethod(drafter, chooser, draft_scores=False), prompts, 20, {0})
    assert [s.token_ids for s in out] == [a[:20] for a in ar]
    assert measured == [i for i, cold in enumerate(captured) if not cold] and len(measured) >= 4


def test_a_measurement_moves_the_other_sizes_estimates_part_of_the_way_its_own_moved():
    """The host's speed moves every size's cost at once: a slow spell measured at one size raises the
    others', so a size left alone since is not priced at an old speed against the rest."""
    lat = LatencyModel()
    key = (1, 0)
    for size, seconds in ((1, 0.010), (2, 0.011), (4, 0.012)) * 2:
        lat.observe(key, size, seconds)
    lat.drafts[key] = {1: 0.001}
    before = {n: s.seconds for n, s in lat.buckets[key].items()}
    lat.observe(key, 2, 0.0165)  # 1.5x its estimate
    after = {n: s.seconds for n, s in lat.buckets[key].items()}
    follow = 1 + SPEED_RATE * 0.5
    assert after[1] == pytest.approx(before[1] * follow) and after[4] == pytest.approx(before[4] * follow)
    assert lat.drafts[key][1] == pytest.approx(0.001 * follow)
    assert after[2] == pytest.approx(before[2] + lat.rate * (0.0165 - before[2]))  # its own size: its moving average


def test_a_chooser_recalls_what_an_earlier_one_learned_and_explores_no_more():
    """``memory`` / ``recall``: a later run starts where this one left off (JSON round trip); a
    remembered size's first step there runs cold, so the faster of it and the memory is kept."""
    first = TreeChooser(AcceptanceModel([row[:] for row in STATS]))
    for step in range(60):
        size = first.choose(1, 100).size
        first.latency.observe((1, 0), size, 0.03 + 0.0001 * size + 0.01 * (size > 1))
        first.observe(chain(size - 1) if size > 1 else chain(0), 1, 100, [min(size - 1, step % 3)], None)
    memory = json.loads(json.dumps(first.memory()))
    second = TreeChooser(AcceptanceModel([row[:] for row in STATS]))
    second.recall(memory)
    assert second.acceptance.p == first.acceptance.p != STATS
    assert second.latency.line((1, 0)) == pytest.approx(first.latency.line((1, 0)))
    assert second.choose(1, 100).size == max(second.latency.measured((1, 0)))  # no exploring: the largest size it measured
    ar = second.latency.buckets[(1, 0)][1].seconds
    second.latency.observe((1, 0), 1, 2 * ar)  # the first AR step here, cold
    assert second.latency.buckets[(1, 0)][1].seconds == ar
    second.latency.observe((1, 0), 1, 2 * ar)
    assert second.latency.buckets[(1, 0)][1].seconds > ar
    other = TreeChooser(AcceptanceModel([row[:] for row in STATS[:2]]))  # another drafter's statistics: not this memory
    with pytest.raises(ValueError, match="another shape"):
        other.recall(memory)
    assert other.latency.buckets == {} and other.acceptance.p == STATS[:2]
    memory["latency"]["sizes"][0]["seconds"] = "fast"  # damaged: refused whole, not met mid-decode
    fresh = TreeChooser(AcceptanceModel([row[:] for row in STATS]))
    with pytest.raises(ValueError):
        fresh.recall(memory)
    assert fresh.latency.buckets == {} and fresh.acceptance.p == STATS


def test_propd_keeps_its_choosers_memory_per_settings_and_starts_afresh_from_a_damaged_one(default_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PROPD_MEMORY", str(tmp_path))
    first = default_model.method("propd")
    assert first.memory.parent == tmp_path and not first.memory.exists()
    want = [g.token_ids for g in default_model.generate(REAL_PROMPTS[:2], "ar", max_new_tokens=24)]
    assert [g.token_ids for g in default_model.generate(REAL_PROMPTS[:2], first, max_new_tokens=24)] == want
    second = default_model.method("propd")
    assert second.memory == first.memory and second.chooser.latency.measured((1, 0)) == first.chooser.latency.measured((1, 0)) != []
    assert default_model.method("propd", lookup=False).memory != first.memory  # other settings learn apart
    assert default_model.method("propd", memory=False).memory is None
    monkeypatch.setenv("PROPD_MEMORY", "off")
    assert default_model.method("propd").memory is None
    monkeypatch.delenv("PROPD_MEMORY")
    monkeypatch.setenv("PROPD_CACHE", str(tmp_path / "cache"))
    assert default_model.method("propd").memory.parent == tmp_path / "cache" / "propd"  # by default, in the cache
    monkeypatch.setenv("PROPD_MEMORY", str(tmp_path))
    first.memory.write_text('{"acceptance": [[0.5')
    with pytest.warns(UserWarning, match="unreadable"):
        third = default_model.method("propd")
    assert third.chooser.latency.buckets == {}
    assert [g.token_ids for g in default_model.generate(REAL_PROMPTS[:2], third, max_new_tokens=24)] == want
    assert json.loads(first.memory.read_text())["latency"]["sizes"]  # written whole again



def test_the_memory_is_written_after_the_first_generation_then_at_most_every_so_often_and_at_exit(default_model, tmp_path):
    memory = tmp_path / "memory.json"
    method = default_model.method("propd", memory=memory)
    default_model.generate(REAL_PROMPTS[:1], method, max_new_tokens=8)
    first = memory.read_text()
    assert json.loads(first)["latency"]["sizes"] and not method.learned.unsaved
    default_model.generate(REAL_PROMPTS[1:2], method, max_new_tokens=8)
    assert memory.read_text() == first and method.learned.unsaved  # within REMEMBER_EVERY: not written again
    del method
    gc.collect()  # the method ends (as at the interpreter's exit): what it learned since is written
    assert json.loads(memory.read_text())["latency"]["steps"] > json.loads(first)["latency"]["steps"]

def test_draft_scores_pick_each_rows_most_probable_whole_paths_as_many_as_pay_and_learn_their_calibration():
    tree = best_tree(STATS, 12)
    probs = 0.5 + 0.5 * torch.rand(2, tree.size, generator=torch.Generator().manual_seed(0))
    probs[1, 1:] *= 0.6  # the draft is less sure of row 1
    scores = path_products(tree, probs)
    for slope, want in ((0.05, 1), (0.004, None), (0.0001, 2 * 11)):  # the best node at least; all where trees cost nothing
        chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]), sizes=(1, 2, 4, 8, 12, 16))
        for size in (1, 2, 8, 12):
            chooser.latency.observe((2, 0), size, 0.03 + slope * size + 0.01 * (size > 1))
        kept = chooser.select(2, 100, 4, tree, scores)
        assert kept.shape == (2, tree.size) and kept[:, 0].all()
        extra = int(kept[:, 1:].sum())
        assert extra == want if want else 1 < extra < 22
        assert (kept[:, 1:] <= kept.gather(1, tree.parents[1:].expand(2, -1))).all()  # whole paths: every kept node's parent is kept
        below, taken = torch.tensor(scores)[:, 1:], kept[:, 1:]
        assert below[taken].min() >= torch.cat([below[~taken], torch.zeros(1)]).max()  # the batch's most probable (row, node) pairs
        if want is None:
            assert kept[0].sum() > kept[1].sum()  # the row the draft is surer of gets the larger tree
        scales = torch.tensor([chooser.draft_scale(d) for d in tree.depths[1:].tolist()])
        own = 1 + (scales * below * taken).sum(1)  # each row expects what its own nodes promise, each at its depth's scale
        assert chooser.expected_rows == pytest.approx(own.tolist())
    before = [chooser.draft_scale(d) for d in (1, 2)]
    kept = chooser.select(2, 100, 4, tree, [[1.0] * tree.size] * 2)  # the draft promised every node to both rows...
    chooser.observe(tree, 2, 100, [0, 0], 0.03, kept)  # ...and none was accepted
    assert all(chooser.draft_scale(d) < b for d, b in zip((1, 2), before))
    first = tree.kids[0][0]  # the draft promises the root's first child and its children; every step takes the child, and nothing deeper
    promised = torch.zeros(2, tree.size)
    promised[:, [0, first, *tree.kids[first]]] = 1.0
    for _ in range(20):
        kept = chooser.select(2, 100, 4, tree, promised.tolist())
        chooser.observe(tree, 2, 100, [first, first], 0.03, kept)
    assert chooser.draft_scale(1) > before[0] and chooser.draft_scale(2) < before[1] / 2  # each depth learns its own over-confidence
    promised[:, tree.kids[first]] = 0.0  # then the draft promises nothing deeper: depth 2 goes unmeasured...
    for _ in range(200):
        chooser.observe(tree, 2, 100, [first, first], 0.03, chooser.select(2, 100, 4, tree, promised.tolist()))
    assert chooser.draft_scale(2) > 0.6  # ...and its evidence ages into the pooled depths' ratio
    assert chooser.latency.count((2, 0), 12) == 2  # a step of 12 nodes per row on average


def test_weighted_rows_get_the_nodes_first():
    """In a fixed batch the rows behind count more (``DecodeLoop.weights``): of two rows the draft is
    equally sure of, the one behind gets the nodes a step pays for, and none of the other's comes first."""
    tree = best_tree(STATS, 12)
    scores = path_products(tree, torch.full((2, tree.size), 0.8))
    chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]), sizes=(1, 2, 4, 8, 12, 16))
    for size in (1, 2, 8, 12):
        chooser.latency.observe((2, 0), size, 0.03 + 0.004 * size + 0.01 * (size > 1))
    even = chooser.select(2, 100, 4, tree, scores)
    assert even[0].sum() == even[1].sum()
    kept = chooser.select(2, 100, 4, tree, scores, weights=[0.2, 1.0])
    assert kept[1].sum() > kept[0].sum() and kept[1].sum() >= even[1].sum()


def tiny_case(seed: int) -> tuple[random.Random, Decoder, list[list[int]], list[list[int]]]:
    """A tiny model on an exact route, 1-4 ragged prompts and their AR tokens."""
    rng = random.Random(seed)
    dec = Decoder.from_hf(tiny_hf_model(["llama", "mistral", "qwen2"][seed % 3], seed=seed), Route.parse("float32-torch-pad8"))
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(2, 40))] for _ in range(rng.randint(1, 4))]
    return rng, dec, prompts, [s.token_ids for s in generate_batch(dec, ARMethod(), prompts, 40, {0})]


@pytest.mark.parametrize("seed", range(4))
def test_propd_equals_ar_on_tiny_models_with_trees_changing_every_step(seed):
    rng, dec, prompts, ar = tiny_case(seed)
    stats = [[rng.random() / (r + 1) for r in range(4)] for _ in range(4)]
    drafter = DraftMethod(random_draft(dec.args, seed), chain(1)) if seed % 2 else TreeMethod(random_heads(64, 96, 4, seed), chain(1))
    chooser = TreeChooser(AcceptanceModel(stats), sizes=(1, 3, 8, 20))
    chooser.latency.observe((len(prompts), 0), 1, 1.0)  # make every size look free to try
    method = PropdMethod(drafter, chooser, draft_scores=seed != 3)  # seed 1: the draft's probabilities pick the nodes; 3: the rank statistics
    out = generate_batch(dec, method, prompts, 40, {0})
    assert [s.token_ids for s in out] == ar
    assert len({n for s in out for n in s.step_tree_tokens}) > 1  # the tree did change
    for s in out:  # the acceptance model's prediction, per step; none for a step EOS or the limit cut, which ends the row
        assert len(s.step_expected) == s.steps and None not in s.step_expected[:-1] and min(s.step_expected[:-1]) >= 1.0


class RandomPruner(Pruner):
    """Prunes nodes at random (the root never), with their subtrees, after layer ``layer``."""

    def __init__(self, seed: int, layer: int):
        self.generator, self._layer = torch.Generator().manual_seed(seed), layer

    @property
    def layer(self) -> int:
        return self._layer

    def survivors(self, decoder, early, tokens, tree):
        ok = torch.rand(tokens.shape, generator=self.generator) > 0.35
        ok[:, 0] = True
        return whole_paths(ok, tree)


@pytest.mark.parametrize("seed", range(4))
def test_early_pruning_is_lossless_with_random_decisions_trees_and_ragged_batches(seed):
    rng, dec, prompts, ar = tiny_case(seed)
    tree = random_tree(rng, nodes=rng.randint(4, 20), depth=4, width=3)
    drafter = DraftMethod(random_draft(dec.args, seed), tree) if seed % 2 else TreeMethod(random_heads(64, 96, 4, seed), tree)
    chooser = None
    if seed >= 2:  # both mechanisms
        chooser = TreeChooser(AcceptanceModel([[rng.random() / (r + 1) for r in range(3)] for _ in range(4)]), sizes=(1, 6, 12))
        chooser.latency.observe((len(prompts), 0), 1, 1.0)
    out = generate_batch(dec, PropdMethod(drafter, chooser, RandomPruner(seed, layer=rng.randint(1, 2))), prompts, 40, {0})
    assert [s.token_ids for s in out] == ar
    late, tree_tokens = sum(sum(s.step_late_tokens) for s in out), sum(sum(s.step_tree_tokens) for s in out)
    assert late < tree_tokens  # something was pruned, and the step counted it


def test_the_early_head_prunes_what_its_parent_does_not_predict():
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=2), Route.parse("float32-torch-pad8"))
    head = EarlyHead(dec.args.dim, dec.args.vocab_size, layer=1).eval()
    tree = chain(3)
    early = torch.randn(1, 4, dec.args.dim)
    with torch.no_grad():
        top = dec.lm_head(dec.final_norm(head.blocks(early))).topk(3, dim=-1).indices[0]  # [4, 3]
    tokens = torch.tensor([[7, int(top[0, 1]), int(top[1, 0]), 95 if int(top[2, 0]) != 95 and 95 not in top[2].tolist() else 94]])
    keep = Pruner(head, top_k=3).survivors(dec, early, tokens, tree)
    assert keep.tolist() == [[True, True, True, 94 in top[2].tolist() and tokens[0, 3] == 94]]
    assert Pruner(head, top_k=3, keep_ranks=1).survivors(dec, early, tokens, tree).all()  # a chain holds the drafter's top guesses only
    vocab = torch.tensor(sorted({*range(0, dec.args.vocab_size, 3), *tokens[0].tolist()}))  # the tokens a drafter can guess
    with torch.no_grad():
        logits = dec.lm_head(dec.final_norm(head.blocks(early)))[0][:, vocab]
    among = vocab[logits.topk(3, dim=-1).indices]  # [4, 3]: the early top-3 among those tokens only
    want = [True] + [bool((among[n] == tokens[0, n + 1]).any()) for n in range(3)]
    want = [all(want[: n + 1]) for n in range(4)]  # a pruned node takes its subtree
    assert Pruner(head, top_k=3, vocab=vocab).survivors(dec, early, tokens, tree).tolist() == [want]


def test_default_model_propd_equals_ar_batch_1_and_4(default_model):
    want = [w.token_ids for w in default_model.generate(REAL_PROMPTS, "ar", max_new_tokens=48)]
    for drafter, bs, prune, dynamic in (("draft", 1, False, True), ("draft", 4, True, True), ("medusa", 1, True, False), ("draft", 2, True, False)):
        method = default_model.method("propd", drafter=drafter, prune=prune, dynamic=dynamic)
        got = default_model.generate(REAL_PROMPTS, method, max_new_tokens=48, batch_size=bs)
        assert [g.token_ids for g in got] == want, (drafter, bs, prune, dynamic)
        if prune:
            assert sum(sum(g.stats.step_late_tokens) for g in got) < sum(sum(g.stats.step_tree_tokens) for g in got)
    method = build_method(default_model, "propd+static+prune20r1l12", None, "default")  # the shipped head trained after layer 12
    assert (method.pruner.layer, method.pruner.top_k, method.pruner.keep_ranks) == (12, 20, 1)
    assert method.pruner.vocab is not None  # ranked among the tokens the draft can guess
    got = default_model.generate(REAL_PROMPTS, method, max_new_tokens=48, batch_size=2)
    assert [g.token_ids for g in got] == want


def test_propd_trees_are_two_deep_with_the_draft_layer_unless_asked(default_model):
    """Each level the draft layer drafts costs a pass (docs/propd.md: Depth): its trees stay 2
    deep; ``max_depth`` (``--max-depth``, bench ``+depthN``) and the Medusa heads, which guess every
    depth at once, take more."""
    assert len(default_model.method("propd").chooser.acceptance.p) == 2
    assert len(default_model.method("propd", max_depth=4).chooser.acceptance.p) == 4
    heads = default_model.load_heads("default")
    assert len(default_model.method("propd", drafter="medusa").chooser.acceptance.p) == len(heads.meta["rank_probabilities"])
    assert len(build_method(default_model, "propd+depth3+ranks", None, "default").chooser.acceptance.p) == 3

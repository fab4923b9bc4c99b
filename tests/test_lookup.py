"""Prompt lookup: the n-gram index guesses what followed, its chains verify losslessly alone and
grafted onto ProPD's draft trees, and ProPD learns how far to trust them."""

import random

import pytest
import torch

from propd.decoding.ar import ARMethod
from propd.decoding.draft import DraftMethod
from propd.decoding.lookup import LOOKUP_DEPTH, LOOKUP_RANK, Chain, LookupMethod, LookupState, NgramIndex, graft
from propd.decoding.loop import generate_batch
from propd.decoding.propd import PropdMethod
from propd.tree.dynamic import WIDE_BATCH, AcceptanceModel, LookupAcceptance, TreeChooser
from propd.tree.tree import chain, path_products, tree_of
from tests.test_draft import random_draft
from tests.test_propd import STATS, tiny_case
from tests.test_tree import random_tree


def naive_guess(tokens: list[int], depth: int, max_n: int = 3) -> tuple[list[int], int]:
    for n in range(min(max_n, len(tokens)), 0, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tokens[-n:]:
                return tokens[start + n : start + n + depth], n
    return [], 0


def test_the_index_guesses_what_followed_the_longest_ngram_where_it_last_occurred():
    index = NgramIndex([5, 6, 7, 8, 1, 6, 7, 9, 6, 7])
    assert index.guess(3) == ([9, 6, 7], 2)  # "6 7" last occurred before at 5-6, followed by 9
    index.extend([9])
    assert index.guess(2) == ([6, 7], 3)  # "6 7 9"
    assert NgramIndex([1, 2, 3]).guess(4) == ([], 0)
    rng = random.Random(0)
    for _ in range(200):  # built at once or token by token, it guesses as a scan from the end would
        tokens = [rng.randrange(6) for _ in range(rng.randint(1, 40))]
        grown = NgramIndex(tokens[:1])
        grown.extend(tokens[1:])
        depth = rng.randint(1, 5)
        assert NgramIndex(tokens).guess(depth) == grown.guess(depth) == naive_guess(tokens, depth)
    for _ in range(50):  # guessing between steps (the n-grams are indexed when asked) changes no guess
        tokens = [rng.randrange(6) for _ in range(60)]
        index, end = NgramIndex(tokens[:1]), 1
        while end < len(tokens):
            step = rng.randint(1, 4)
            index.extend(tokens[end : end + step])
            end += step
            if rng.random() < 0.5:
                assert index.guess(3) == naive_guess(tokens[:end], 3)


@pytest.mark.parametrize("seed", range(3))
def test_lookup_decoding_equals_ar_on_tiny_models_and_ragged_batches(seed):
    rng, dec, prompts, _ = tiny_case(seed)
    prompts = [p + p[: rng.randint(1, len(p))] for p in prompts]  # repeats: the lookup finds matches
    ar = [s.token_ids for s in generate_batch(dec, ARMethod(), prompts, 40, {0})]
    out = generate_batch(dec, LookupMethod(chain(rng.randint(1, 5))), prompts, 40, {0})
    assert [s.token_ids for s in out] == ar
    assert max(n for s in out for n in s.step_tree_tokens) > 1  # it did guess


def random_offer(seed: int):
    rng = random.Random(seed)
    tree = random_tree(rng, nodes=rng.randint(2, 12), depth=2, width=3)
    B = rng.randint(1, 4)
    tokens = torch.randint(0, 6, (B, tree.size), generator=torch.Generator().manual_seed(seed))
    rows = [NgramIndex([rng.randrange(6) for _ in range(rng.randint(1, 30))] + [int(tokens[b, 0])]) for b in range(B)]
    scores = path_products(tree, torch.rand(B, tree.size, generator=torch.Generator().manual_seed(seed)))
    return tree, tokens, scores, LookupState(rows), graft(tree, tokens, scores, LookupState(rows), room=64)


@pytest.mark.parametrize("seed", range(40))
def test_a_graft_keeps_the_drafted_tree_and_hangs_each_rows_guesses_where_they_continue_it(seed):
    tree, tokens, scores, state, offer = random_offer(seed)
    full, at = offer.tree, {path: i for i, path in enumerate(offer.tree.paths, 1)}
    for i, path in enumerate(tree.paths, 1):  # every drafted node keeps its token and score
        assert (offer.tokens[:, at[path]] == tokens[:, i]).all() and all(got[at[path]] == want[i] for got, want in zip(offer.scores, scores))
    assert (offer.tokens[:, 0] == tokens[:, 0]).all()
    for b, (row, chain_) in enumerate(zip(state.rows, offer.chains)):
        guesses, n = row.guess(LOOKUP_DEPTH)
        if chain_ is None:
            assert not guesses or (len(guesses) == 1 and any(int(tokens[b, k]) == guesses[0] for k in tree.kids[0]))
            continue
        assert chain_.n == n and offer.tokens[b, chain_.nodes].tolist() == guesses[chain_.first :]
        assert all(full.paths[node - 1][-1] == 0 or full.paths[node - 1][-1] == LOOKUP_RANK for node in chain_.nodes)
        assert [int(full.parents[node]) for node in chain_.nodes] == [chain_.anchor, *chain_.nodes[:-1]]  # a chain from its anchor
        if chain_.anchor:  # grafted under the drafted depth-1 node carrying the first guess
            assert chain_.first == 1 and int(full.depths[chain_.anchor]) == 1 and int(offer.tokens[b, chain_.anchor]) == guesses[0]
        else:
            assert chain_.first == 0 and all(int(offer.tokens[b, k]) != guesses[0] for k in full.kids[0] if k not in chain_.nodes)
        for node in offer.duplicates[b]:  # drafted nodes beside the chain's first node with its token, and their subtrees
            top = next(k for k in full.lineage[node] if int(full.parents[k]) == chain_.anchor)
            assert int(offer.tokens[b, top]) == int(offer.tokens[b, chain_.nodes[0]]) and LOOKUP_RANK not in full.paths[top - 1]
    assert graft(tree, tokens, scores, state, room=tree.size).tree == tree  # no room: the drafted tree alone


def test_selection_counts_a_guess_its_anchors_worth_times_its_chances_and_a_duplicate_nothing():
    tree, tokens, scores, state, offer = next(o for o in map(random_offer, range(100)) if any(c and c.anchor for c in o[4].chains))
    chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]), sizes=(1, 2, 4, 8, 12, 16))
    B = len(tokens)
    for size in (1, 2, 8, 12):
        chooser.latency.observe((B, 0), size, 0.03 + 0.0001 * size + 0.01 * (size > 1))  # trees nearly free: every node that adds pays
    kept = chooser.select(B, 100, 4, tree, offer.scores, offer)
    full = offer.tree
    assert (kept[:, 1:] <= kept.gather(1, full.parents[1:].expand(B, -1))).all()  # whole paths
    for b, chain_ in enumerate(offer.chains):
        assert not kept[b, offer.duplicates[b]].any()
        worth = [chooser.draft_scale(d) * m for d, m in zip(full.depths[1:].tolist(), offer.scores[b][1:])]
        if chain_ is not None:
            anchor = 1.0
            if chain_.anchor:  # a drafted node carrying the first guess: as likely as the draft or the lookup says
                anchor = worth[chain_.anchor - 1] = max(worth[chain_.anchor - 1], min(1.0, chooser.lookup.first(chain_) * chooser.lookup_scale))
            for node, chance in zip(chain_.nodes, chooser.lookup.chances(chain_)):
                worth[node - 1] = anchor * min(1.0, chance * chooser.lookup_scale)
        assert chooser.expected_rows[b] == pytest.approx(1 + sum(w for w, k in zip(worth, kept[b, 1:].tolist()) if k))


def test_the_guesses_chances_are_scaled_by_how_many_of_the_guesses_kept_came():
    tree, tokens, scores, state, offer = next(o for o in map(random_offer, range(100)) if sum(c is not None for c in o[4].chains) >= 1)
    chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]), sizes=(1, 2, 4, 8, 12, 16))
    B = len(tokens)
    for size in (1, 2, 8, 12):
        chooser.latency.observe((B, 0), size, 0.03 + 0.0001 * size + 0.01 * (size > 1))  # trees nearly free: every node that adds pays
    full, guessed = offer.tree, [c.nodes if c else [] for c in offer.chains]
    assert chooser.lookup_scale == 1.0
    for _ in range(30):  # every row's whole chain rejected, step after step
        kept = chooser.select(B, 100, 4, tree, offer.scores, offer)
        assert all(kept[b, guessed[b]].all() for b in range(B))  # every guess kept (they are nearly free)
        before = chooser.lookup_scale
        chooser.observe(full, B, 100, [0] * B, 0.03, kept, offer=offer)
        assert chooser.lookup_scale < before
    low = chooser.lookup_scale
    assert low < 0.75  # (a prior of 4 tokens accepted of 4 promised stays in it)
    for _ in range(10):  # then accepted whole
        kept = chooser.select(B, 100, 4, tree, offer.scores, offer)
        chooser.observe(full, B, 100, [nodes[-1] if nodes else 0 for nodes in guessed], 0.03, kept, offer=offer)
    assert chooser.lookup_scale > 1.3 * low


def test_the_draft_acceptance_model_learns_nothing_from_a_lookup_chain_but_the_drafted_siblings_it_passed():
    tree = tree_of(((0,), (1,), (LOOKUP_RANK,), (LOOKUP_RANK, 0), (LOOKUP_RANK, 0, 0)))
    model = AcceptanceModel([[0.5, 0.3], [0.4, 0.2]], rate=0.5)
    model.observe(tree, tree.paths.index((LOOKUP_RANK, 0)) + 1)  # two guesses of the chain accepted
    assert model.p == [[0.25, 0.15], [0.4, 0.2]]  # the root's drafted children were wrong; the chain's own nodes teach nothing


def test_lookup_acceptance_learns_from_the_guesses_it_saw():
    model = LookupAcceptance(rate=0.5)
    before = [[row[:] for row in state] for state in model.q]
    model.observe(Chain([3, 4, 5], anchor=0, n=2, first=0), (0, 3, 4), None)  # two guesses right, the third wrong
    q, was = model.q[0][1], before[0][1]
    assert q[0] > was[0] and q[1] > was[1] and q[2] < was[2] and q[3] == was[3]
    assert model.q[1] == before[1] and model.q[0][0] == before[0][0]  # (a row copying, another n: other estimates)
    model.observe(Chain([7, 8], anchor=2, n=3, first=1, copying=True), (0, 1), None)  # its anchor, the first guess, was rejected
    assert model.q[1][2][0] < before[1][2][0] and model.q[1][2][1:] == before[1][2][1:]
    model.q[1][2][0] = before[1][2][0]
    model.observe(Chain([7, 8], anchor=0, n=3, first=0, copying=True), (0, 7), [True] * 8 + [False])
    assert model.q[1][2][0] > before[1][2][0] and model.q[1][2][1] == before[1][2][1]  # the second guess was not verified
    assert model.chances(Chain([7, 8], anchor=0, n=3, first=0, copying=True)) == pytest.approx([model.q[1][2][0], model.q[1][2][0] * model.q[1][2][1]])


def test_a_row_is_copying_while_its_last_guess_was_right():
    index = NgramIndex([1, 2, 3, 4, 1, 2])
    assert not index.copying and index.guess(2) == ([3, 4], 2)
    index.extend([3, 9])  # the guess's first token was right
    assert index.copying
    index.guess(2)  # ("9": never before, nothing guessed): the state stays
    index.extend([5])
    assert index.copying
    index.extend([1])
    assert index.guess(1) == ([2], 1)
    index.extend([7])
    assert not index.copying


@pytest.mark.parametrize("seed", range(4))
def test_propd_with_lookup_guesses_equals_ar_on_tiny_models(seed):
    rng, dec, prompts, _ = tiny_case(seed)
    prompts = [p + p[: rng.randint(1, len(p))] for p in prompts[: WIDE_BATCH - 1]]  # (guesses below WIDE_BATCH rows only)
    ar = [s.token_ids for s in generate_batch(dec, ARMethod(), prompts, 40, {0})]
    chooser = TreeChooser(AcceptanceModel([[rng.random() / (r + 1) for r in range(3)] for _ in range(2)]), sizes=(1, 3, 8))
    chooser.latency.observe((len(prompts), 0), 1, 1.0)  # every size looks free to try
    method = PropdMethod(DraftMethod(random_draft(dec.args, seed), chain(1)), chooser)
    grafts = []
    select = chooser.select
    chooser.select = lambda *a, **k: grafts.append(a[-1] is not None and any(a[-1].chains)) or select(*a, **k)
    out = generate_batch(dec, method, prompts, 40, {0})
    assert [s.token_ids for s in out] == ar
    assert any(grafts)  # guesses were offered


def test_default_model_propd_copies_with_lookup_guesses_and_equals_ar(default_model):
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill."
    prompt = f"Repeat this sentence exactly, three times: {text}"
    want = default_model.generate([prompt], "ar", max_new_tokens=64)[0]
    methods = [default_model.method("propd", lookup=on, memory=False) for on in (True, False)]  # from the shipped start, each
    with_lookup, without = (default_model.generate([prompt], method, max_new_tokens=64)[0] for method in methods)
    lookup_alone = default_model.generate([prompt], default_model.method("lookup"), max_new_tokens=64)[0]
    assert with_lookup.token_ids == without.token_ids == lookup_alone.token_ids == want.token_ids
    assert with_lookup.stats.mean_accepted > without.stats.mean_accepted  # the copy is guessed from the prompt
    assert lookup_alone.stats.mean_accepted > 1.5


class ARPricedChooser(TreeChooser):
    """Prices AR every step but every fourth, where it takes a 3-token tree; trees cost next to nothing, whatever the steps take."""

    def __init__(self, batch_size: int):
        super().__init__(AcceptanceModel([row[:] for row in STATS[:2]]), sizes=(1, 3))
        for size in (1, 2, 3):
            self.latency.observe((batch_size, 0), size, 1.0 if size == 1 else 0.01 * size)
        self.steps = 0

    def observe(self, tree, batch_size, context, last_nodes, seconds, *rest):
        super().observe(tree, batch_size, context, last_nodes, None, *rest)  # the costs stay as set

    def observe_ar(self, batch_size, context, steps, seconds):
        self.latency.steps += steps  # (likewise after a run of AR steps)

    def choose(self, batch_size, context, weights=None):
        self.steps += 1
        tree, self.expected = self.tree(3 if self.steps % 4 == 0 else 1)
        self.ar_by_price, self._exploring = tree.size == 1, False
        return tree


@pytest.mark.parametrize("seed", range(4))
def test_where_ar_is_priced_lookup_guesses_alone_step_and_the_draft_reads_them_later_losslessly(seed):
    rng, dec, prompts, _ = tiny_case(seed)
    prompts = [p + p[: rng.randint(1, len(p))] for p in prompts[: WIDE_BATCH - 1]]
    ar = [s.token_ids for s in generate_batch(dec, ARMethod(), prompts, 40, {0})]
    chooser = ARPricedChooser(len(prompts))
    offered = []
    select_guesses = chooser.select_guesses
    chooser.select_guesses = lambda *a: offered.append(select_guesses(*a)) or offered[-1]
    out = generate_batch(dec, PropdMethod(DraftMethod(random_draft(dec.args, seed), chain(1)), chooser), prompts, 40, {0})
    assert [s.token_ids for s in out] == ar
    assert any(kept is not None for kept in offered)  # guesses alone replaced some AR steps


def test_guesses_replace_an_ar_step_only_where_they_buy_more_tokens_per_second_than_ar():
    tree, tokens, _, state, offer = next(o for o in map(random_offer, range(100)) if sum(c is not None for c in o[4].chains) >= 1)
    root = graft(chain(0), tokens[:, :1], torch.ones(len(tokens), 1), state, room=64)
    B = len(tokens)
    for ar_seconds, want in ((0.05, True), (0.003, False)):  # (a whole chain of 3-gram guesses adds 2.3 tokens a row)
        chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]), sizes=(1, 2, 4))
        for size, seconds in ((1, ar_seconds), (2, 0.011), (4, 0.012)):
            chooser.latency.observe((B, 0), size, seconds)
        kept = chooser.select_guesses(B, 100, root)
        assert (kept is not None) == want
        if kept is not None:
            full = root.tree
            assert (kept[:, 1:] <= kept.gather(1, full.parents[1:].expand(B, -1))).all()
            assert all(not kept[b, 1:].any() for b, c in enumerate(root.chains) if c is None)


def test_steps_of_guesses_alone_that_take_longer_than_their_price_make_the_next_ones_dearer():
    tree, tokens, _, state, offer = next(o for o in map(random_offer, range(100)) if sum(c is not None for c in o[4].chains) >= 1)
    root = graft(chain(0), tokens[:, :1], torch.ones(len(tokens), 1), state, room=64)
    B = len(tokens)
    chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS]), sizes=(1, 2, 4))
    for size, seconds in ((1, 0.02), (2, 0.021), (4, 0.022)):
        chooser.latency.observe((B, 0), size, seconds)
    steps = chooser.latency.steps
    for _ in range(40):
        kept = chooser.select_guesses(B, 100, root)
        if kept is None:
            break
        last = [int(kept[b].nonzero().max()) for b in range(B)]  # every kept guess (a chain from the root) accepted: they keep their worth
        chooser.observe(root.tree, B, 100, last, 3 * chooser._guess_cost[1], kept, None, root)
    assert kept is None and chooser._guess_scale[(B, 0)] > 1  # three times their price (capped at twice a step): AR again
    assert chooser.latency.steps > steps and chooser.latency.count((B, 0), 1) == 1  # they aged the measurements, and measured no AR step
    peak = chooser._guess_scale[(B, 0)]
    again = next((i for i in range(1000) if chooser.select_guesses(B, 100, root) is not None), None)
    assert again is not None and chooser._guess_scale[(B, 0)] < peak  # unmeasured while it rules them out, the price drifts back


def test_from_a_wide_batch_every_row_verifies_the_chosen_tree_without_lookup_guesses():
    rng, dec, prompts, _ = tiny_case(0)
    prompts = [[rng.randrange(1, 96) for _ in range(12)] * 2 for _ in range(WIDE_BATCH)]
    ar = [s.token_ids for s in generate_batch(dec, ARMethod(), prompts, 40, {0})]
    chooser = TreeChooser(AcceptanceModel([row[:] for row in STATS[:2]]), sizes=(1, 3, 8))
    chooser.latency.observe((len(prompts), 0), 1, 1.0)  # every size looks free to try
    method = PropdMethod(DraftMethod(random_draft(dec.args, 0), chain(1)), chooser)
    steps = []  # (rows, how the step went, the tree's size where it was given one)

    def recorded(name, original):
        def step(dec_, cache, roots, state, picker, *rest, **options):
            size = rest[0].size if name == "step_tree" else None
            steps.append((len(roots), name, size))
            return original(dec_, cache, roots, state, picker, *rest, **options)
        return step

    for name in ("step_tree", "step_scored", "step_guesses"):
        setattr(method.drafter, name, recorded(name, getattr(method.drafter, name)))
    out = generate_batch(dec, method, prompts, 40, {0})
    assert [s.token_ids for s in out] == ar  # the rows kept their n-gram indexes through the wide steps
    wide = [(name, size) for rows, name, size in steps if rows >= WIDE_BATCH]
    assert {name for name, _ in wide} == {"step_tree"} and any(size > 1 for _, size in wide), steps  # one tree for every row, no guesses

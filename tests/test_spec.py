"""Speculative decoding by a draft model: lossless whatever the draft, its cache following the
accepted path, and clear errors for a draft that cannot serve."""

import random

import pytest

from propd.decoding.ar import ARMethod
from propd.decoding.loop import generate_batch
from propd.decoding.propd import PropdMethod
from propd.decoding.spec import PRIOR, SpecMethod
from propd.errors import PropdError
from propd.models.decoder import Decoder
from propd.models.kernels import Route
from propd.tree.dynamic import AcceptanceModel, TreeChooser
from propd.tree.tree import TokenTree, chain
from tests.conftest import tiny_hf_model
from tests.test_tree import random_tree


@pytest.mark.parametrize("seed", range(4))
def test_spec_equals_ar_with_a_perfect_and_a_random_draft_on_random_trees_and_batches(seed):
    rng = random.Random(seed)
    route = Route.parse("float32-torch-pad8")
    dec = Decoder.from_hf(tiny_hf_model(["llama", "mistral", "qwen2"][seed % 3], seed=seed), route)
    other = Decoder.from_hf(tiny_hf_model("qwen2", seed=seed + 50, layers=2), route)
    depth = rng.randint(1, 5)
    tree = random_tree(rng, nodes=min(rng.randint(2, 16), sum(3**d for d in range(1, depth + 1))), depth=depth, width=3)
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(2, 40))] for _ in range(rng.randint(1, 4))]
    ar = [s.token_ids for s in generate_batch(dec, ARMethod(), prompts, 30, {0})]
    for draft in (dec, other):  # the model drafting for itself; an unrelated model
        method = SpecMethod(draft, tree)
        out = generate_batch(dec, method, prompts, 30, {0})
        assert [s.token_ids for s in out] == ar
        solo = [generate_batch(dec, method, [p], 30, {0})[0].token_ids for p in prompts]
        assert solo == ar
        if draft is dec and {(0,), (0, 0)} <= set(tree.paths):  # drafting for itself, its top guesses are right: deep steps
            assert max(a for s in out for a in s.step_accepted) > 2


def test_a_draft_with_another_vocabulary_or_no_tree_is_refused():
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=1))
    with pytest.raises(PropdError, match="must share the tokenizer"):
        SpecMethod(Decoder.from_hf(tiny_hf_model("llama", seed=2, vocab=80)), chain(3)).check_fits(dec)
    with pytest.raises(PropdError, match="only the root"):
        SpecMethod(dec, chain(0))


def test_engine_spec_needs_a_draft_model(default_model):
    with pytest.raises(PropdError, match="--draft-model"):
        default_model.method("spec")
    tokens = default_model.generate(["Name a colour."], default_model.method("spec", "chain3", draft_model=default_model), max_new_tokens=24)
    assert tokens[0].token_ids == default_model.generate(["Name a colour."], "ar", max_new_tokens=24)[0].token_ids


class RandomChooser(TreeChooser):
    """Any of its sizes, at random: AR steps (the draft model not running) between trees of every size."""

    def __init__(self, rng: random.Random, sizes: tuple[int, ...]):
        super().__init__(AcceptanceModel([row[:] for row in PRIOR]), sizes=sizes)
        self.rng = rng

    def choose(self, batch_size: int, context: int, weights: list[float] | None = None) -> TokenTree:
        tree, self.expected = self.tree(self.rng.choice(self.sizes))
        return tree


@pytest.mark.parametrize("seed", range(3))
def test_propd_drafted_by_a_model_equals_ar_while_trees_change_and_ar_steps_come_between(seed):
    rng = random.Random(seed)
    route = Route.parse("float32-torch-pad8")
    dec = Decoder.from_hf(tiny_hf_model(["llama", "mistral", "qwen2"][seed % 3], seed=seed), route)
    draft = dec if seed == 0 else Decoder.from_hf(tiny_hf_model("qwen2", seed=seed + 50, layers=2), route)
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(2, 40))] for _ in range(rng.randint(1, 4))]
    ar = [s.token_ids for s in generate_batch(dec, ARMethod(), prompts, 30, {0})]
    out = generate_batch(dec, PropdMethod(SpecMethod(draft, chain(1)), RandomChooser(rng, (1, 2, 4, 8))), prompts, 30, {0})
    assert [s.token_ids for s in out] == ar
    sizes = {n for s in out for n in s.step_tree_tokens}
    assert 1 in sizes and len(sizes) > 2
    if draft is dec:  # its own top guesses are right: the draft model caught up after AR steps
        assert max(a for s in out for a in s.step_accepted) > 2


def test_engine_propd_drafted_by_a_model(default_model):
    with pytest.raises(PropdError, match="--draft-model"):
        default_model.method("propd", drafter="model")
    method = default_model.method("propd", drafter="model", draft_model=default_model, memory=False)  # from the shipped start: it explores trees
    out = default_model.generate(["Name a colour."], method, max_new_tokens=24)[0]
    assert out.token_ids == default_model.generate(["Name a colour."], "ar", max_new_tokens=24)[0].token_ids
    assert max(out.stats.step_tree_tokens) > 1 and max(out.stats.step_accepted) > 1  # trees were drafted, and accepted

"""Tree verification equals AR: random trees, random heads, random prompts and batch compositions."""

import random

import pytest
import torch

from propd.decoding.ar import ARMethod
from propd.decoding.loop import generate_batch
from propd.decoding.pruning import whole_paths
from propd.decoding.tree import TreeMethod, Verified, walk, walk_picks
from propd.errors import PropdError
from propd.heads.medusa import MedusaHeads
from propd.models.decoder import Decoder
from propd.tree.tree import TokenTree, best_tree, chain, check_tree_spec, expected_accepted, load_tree, path_products
from tests.conftest import REAL_PROMPTS, tiny_hf_model


def random_tree(rng: random.Random, nodes: int, depth: int, width: int) -> TokenTree:
    paths = {()}
    while len(paths) < nodes + 1:
        parent = rng.choice([p for p in paths if len(p) < depth])
        paths.add(parent + (rng.randrange(width),))
    return TokenTree.from_paths([p for p in paths if p])


def random_heads(dim: int, vocab: int, num_heads: int, seed: int, shared: bool = True, root_conditioned: bool = False) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(dim, vocab, num_heads, 1, shared_lm_head=shared, root_conditioned=root_conditioned)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.3)
    return heads.eval()


def test_tree_structure_of_a_small_tree():
    tree = TokenTree.from_paths([[1], [0], [0, 0], [0, 1], [1, 0]])
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0))
    assert tree.parents.tolist() == [0, 0, 0, 1, 1, 2]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2]
    assert tree.ancestors[5].nonzero().flatten().tolist() == [0, 2, 5]
    assert tree.ranks.tolist() == [0, 0, 1, 0, 1, 0]
    assert tree.children.tolist() == [[1, 2], [3, 4], [5, -1], [-1, -1], [-1, -1], [-1, -1]]
    with pytest.raises(PropdError, match="no parent"):
        TokenTree.from_paths([[0, 1]])


def test_named_trees_load():
    assert load_tree("mc_sim_7b_63").size == 64
    assert load_tree("top16").size == 17
    assert load_tree("chain4").paths == chain(4).paths and chain(4).depth == 4
    with pytest.raises(PropdError, match="unknown tree"):
        load_tree("nope")


def test_best_tree_holds_the_most_probable_paths_and_beats_other_trees_of_its_size():
    rank_probabilities = [[0.5, 0.2, 0.1], [0.3, 0.2, 0.1], [0.25, 0.1, 0.05]]
    tree = best_tree(rank_probabilities, 6)
    assert tree.size == 6
    assert set(tree.paths) == {(0,), (1,), (0, 0), (2,), (0, 1)}  # 0.5, 0.2, 0.15, 0.1, 0.1
    assert expected_accepted(tree, rank_probabilities) == pytest.approx(1 + 0.5 + 0.2 + 0.15 + 0.1 + 0.1)
    rng = random.Random(0)
    for _ in range(20):
        other = random_tree(rng, nodes=5, depth=3, width=3)
        assert expected_accepted(other, rank_probabilities) <= expected_accepted(tree, rank_probabilities) + 1e-12
    assert load_tree("best6", rank_probabilities).paths == tree.paths
    shallow = load_tree("best6d1", rank_probabilities)  # at most 1 deep: the three first-level guesses alone
    assert shallow.depth == 1 and set(shallow.paths) == {(0,), (1,), (2,)}
    assert set(load_tree("best6d2", rank_probabilities).paths) == set(tree.paths)
    with pytest.raises(PropdError, match="acceptance statistics"):
        load_tree("best6")
    with pytest.raises(PropdError, match="at least 1 deep"):
        load_tree("best6d0", rank_probabilities)
    check_tree_spec("best8d2")  # the CLI's early check knows the depth suffix
    with pytest.raises(PropdError, match="at least 1 deep"):
        check_tree_spec("best8d0")


def test_walk_follows_longest_correct_path_and_offsets_pack_it():
    tree = TokenTree.from_paths([[0], [1], [0, 0], [1, 0]])
    # nodes: 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (1,0)
    tokens = torch.tensor([[5, 7, 8, 9, 3], [5, 7, 8, 9, 3]])
    predictions = torch.tensor([[8, 1, 3, 0, 2], [6, 1, 3, 0, 0]])  # row 0: 8 then 3 -> path 0,2,4
    asked = []

    def accept(rows, nodes, kids, valid):
        asked.extend(zip(rows.tolist(), nodes.tolist()))
        picked = predictions[rows, nodes]
        return valid & (kids == picked.unsqueeze(1)), picked

    last, bonus = walk(tokens, tree, accept)
    assert last.tolist() == [4, 0] and bonus.tolist() == [2, 6]
    assert sorted(asked) == [(0, 0), (0, 2), (0, 4), (1, 0)]  # only accepted nodes are projected
    v = Verified.of(None, tree, tokens.tolist(), last.tolist(), bonus.tolist(), [5, 5], [5, 5])
    assert v.counts.tolist() == [3, 1] and v.last.tolist() == [4, 0] and v.roots.tolist() == [2, 6]
    assert v.offsets[0].tolist() == [0, 2, 4] and not v.in_place  # row 0 kept nodes 2 and 4: their K/V move
    assert v.accepted == [[8, 3, 2], [6]] and v.following.tolist() == [[8, 3, 2], [6, 6, 6]]  # the token after each path node, padded
    assert Verified.of(None, tree, tokens.tolist(), [1, 0], [2, 6], [5, 5], [5, 5]).in_place  # paths (0, 1) and (0,): nothing moves
    same_last, same_bonus = walk_picks(tokens.tolist(), tree, predictions)  # every node's pick known: plain lists
    assert same_last == [4, 0] and same_bonus == [2, 6]


@pytest.mark.parametrize("seed", range(4))
def test_walking_known_picks_in_lists_follows_the_tensor_walk(seed):
    """Random trees, tokens drawn from few values (so children often match), rows with their own alive nodes."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        tree = random_tree(rng, rng.randint(0, 12), rng.randint(2, 5), 3)
        B = rng.randint(1, 4)
        tokens, picks = torch.randint(0, 3, (2, B, tree.size), generator=gen)
        alive = whole_paths(torch.rand(B, tree.size, generator=gen) < 0.7, tree) if rng.random() < 0.5 else None

        def accept(rows, nodes, kids, valid):
            picked = picks[rows, nodes]
            return valid & (kids == picked.unsqueeze(1)), picked

        want = walk(tokens, tree, accept, alive)
        got = walk_picks(tokens.tolist(), tree, picks, alive)
        assert all(g == w.tolist() for g, w in zip(got, want))


@pytest.mark.parametrize("seed", range(6))
def test_tree_decoding_equals_ar_on_random_trees_and_batches(seed):
    rng = random.Random(seed)
    family = ["llama", "mistral", "qwen2"][seed % 3]
    hf = tiny_hf_model(family, seed=seed)
    dec = Decoder.from_hf(hf)
    heads = random_heads(64, 96, 4, seed, shared=seed % 2 == 0, root_conditioned=seed % 3 != 1)
    tree = random_tree(rng, nodes=rng.randint(1, 24), depth=4, width=rng.randint(1, 6))
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(2, 20))] for _ in range(rng.randint(1, 5))]
    eos = {0}
    ar = generate_batch(dec, ARMethod(), prompts, 40, eos)
    for batch_size in (1, len(prompts)):
        for i in range(0, len(prompts), batch_size):
            out = generate_batch(dec, TreeMethod(heads, tree), prompts[i : i + batch_size], 40, eos)
            for a, t in zip(ar[i : i + batch_size], out):
                assert t.token_ids == a.token_ids
                assert t.steps <= a.steps


@pytest.mark.parametrize("shared, root_conditioned", [(True, True), (True, False), (False, True)])
def test_heads_guesses_by_the_route_are_the_modules_top_k(shared, root_conditioned):
    """``top_tokens`` runs the heads by the model's route (fp32 here: the same products) and ranks
    what ``logits`` does, over a candidate vocabulary too."""
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=1))
    heads = random_heads(64, 96, 3, seed=2, shared=shared, root_conditioned=root_conditioned)
    if shared:
        heads.candidate_vocab = torch.arange(0, 96, 2)
    hidden, roots = torch.randn(5, 64), torch.randint(0, 96, (5,))
    with torch.no_grad():
        want = heads.logits(hidden, roots, dec, 2).topk(4, dim=-1).indices
    got = heads.top_tokens(hidden, roots, dec, 2, 4)
    assert torch.equal(got, want if heads.candidate_vocab is None else heads.candidate_vocab[want])


class OracleTree(TreeMethod):
    """A chain whose heads know the model's greedy continuation ``full`` (prompt + answer)."""

    def __init__(self, full: list[int], prompt_len: int, depth: int):
        super().__init__(random_heads(64, 96, depth, 0), chain(depth))
        self.full, self.prompt_len, self.cache = full, prompt_len, None

    def step(self, decoder, cache, roots, state, picker):
        self.cache = cache
        return super().step(decoder, cache, roots, state, picker)

    def propose(self, decoder, normed, roots):
        # The root sits at the cache length: every accepted token but the root is cached.
        position = self.prompt_len if self.cache is None else int(self.cache.lengths[0])
        guesses = [self.full[min(position + i, len(self.full) - 1)] for i in range(1, self.tree.depth + 1)]
        return torch.tensor(guesses).view(1, self.tree.depth, 1)


def test_tree_decoding_accepts_several_tokens_when_heads_guess_right():
    """Heads that know the model's greedy continuation get a whole chain accepted every step."""
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=3))
    prompt = [5, 17, 33]
    ar = generate_batch(dec, ARMethod(), [prompt], 30, set())[0].token_ids
    stats = generate_batch(dec, OracleTree(prompt + ar, len(prompt), 3), [prompt], 30, set())[0]
    assert stats.token_ids == ar
    assert stats.mean_accepted > 3.5


def test_default_model_medusa_equals_ar_batch_1_and_4(default_model):
    heads = random_heads(576, 49152, 4, seed=0, root_conditioned=True)
    want = [w.token_ids for w in default_model.generate(REAL_PROMPTS, "ar", max_new_tokens=32)]
    for tree, bs in (("top16", 1), ("mc_sim_7b_63", 4)):
        got = default_model.generate(REAL_PROMPTS, default_model.method("medusa", tree, heads), max_new_tokens=32, batch_size=bs)
        assert [g.token_ids for g in got] == want, (tree, bs)


@pytest.mark.parametrize("seed", range(4))
def test_path_products_multiply_each_nodes_probability_by_its_ancestors_below_the_root(seed):
    rng = random.Random(seed)
    tree = random_tree(rng, rng.randint(1, 20), rng.randint(1, 5), 4)
    probs = torch.rand(3, tree.size, generator=torch.Generator().manual_seed(seed))
    want = torch.ones(3, tree.size)
    for node in range(tree.size):
        for ancestor in tree.ancestors[node].nonzero().flatten().tolist():
            want[:, node] *= probs[:, ancestor] if ancestor else 1.0
    assert torch.allclose(torch.tensor(path_products(tree, probs)), want)  # (as lists: the chooser takes them so)

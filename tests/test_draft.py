"""The EAGLE-style draft layer: lossless on random trees and batches, trains, round-trips, and
proposes in a tree exactly what its training unroll computes."""

import random

import pytest
import torch

from propd.bench.calibration import CalibratingDraft, Calibration, summary
from propd.decoding.ar import ARMethod
from propd.decoding.draft import DraftMethod
from propd.decoding.loop import generate_batch
from propd.decoding.sampling import Picker, RowChoice
from propd.errors import PropdError
from propd.heads.draft import DraftHead
from propd.models.decoder import Decoder, ModelArgs
from propd.models.kernels import autograd_route
from propd.training.train import draft_unroll
from propd.tree.dynamic import AcceptanceModel
from propd.tree.tree import chain
from tests.conftest import REAL_PROMPTS, tiny_hf_model
from tests.test_tree import random_tree


def random_draft(args: ModelArgs, seed: int, candidates: int = 0) -> DraftHead:
    torch.manual_seed(seed)
    vocab = torch.randperm(args.vocab_size)[:candidates].sort().values if candidates else None
    draft = DraftHead(args, candidate_vocab=vocab)
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.3 if p.dim() == 2 else 1.0)
    return draft.eval()


@pytest.mark.parametrize("seed", range(4))
def test_draft_decoding_equals_ar_on_random_trees_and_batches(seed):
    rng = random.Random(seed)
    dec = Decoder.from_hf(tiny_hf_model(["llama", "mistral", "qwen2"][seed % 3], seed=seed))
    draft = random_draft(dec.args, seed, candidates=48 if seed % 2 else 0)
    depth, width = rng.randint(1, 6), rng.randint(1, 6)
    tree = random_tree(rng, nodes=min(rng.randint(1, 24), sum(width**d for d in range(1, depth + 1))), depth=depth, width=width)
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(2, 20))] for _ in range(rng.randint(1, 5))]
    ar = generate_batch(dec, ARMethod(), prompts, 40, {0})
    for batch_size in (1, len(prompts)):
        for i in range(0, len(prompts), batch_size):
            out = generate_batch(dec, DraftMethod(draft, tree), prompts[i : i + batch_size], 40, {0})
            assert [o.token_ids for o in out] == [a.token_ids for a in ar[i : i + batch_size]]


def test_a_row_that_ends_at_its_first_token_leaves_the_batch():
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=2))
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    eos = {generate_batch(dec, ARMethod(), prompts[:1], 1, set())[0].token_ids[0]}  # the first row's first token
    ar = generate_batch(dec, ARMethod(), prompts, 20, eos)
    assert len(ar[0].token_ids) == 1
    out = generate_batch(dec, DraftMethod(random_draft(dec.args, 2), chain(3)), prompts, 20, eos)
    assert [o.token_ids for o in out] == [a.token_ids for a in ar]


def test_the_draft_runs_on_a_plain_bf16_route_as_on_gpus():
    """GPUs take ``F.linear`` in the model's dtype (no packing): the draft's fp32 weights follow it."""
    dec = Decoder.from_hf(tiny_hf_model("qwen2", seed=4), autograd_route(torch.bfloat16))
    prompts = [[5, 6, 7, 8], [9, 10]]
    out = generate_batch(dec, DraftMethod(random_draft(dec.args, 4), chain(3)), prompts, 12, {0})
    assert [len(o.token_ids) for o in out] == [len(a.token_ids) for a in generate_batch(dec, ARMethod(), prompts, 12, {0})]


def test_tree_drafting_computes_what_training_unrolls():
    """Along a chain (each depth's top-1 after the path so far), the method's guesses equal those
    of ``draft_unroll`` fed the same path: what training optimises is what decoding uses."""
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=1))
    draft = random_draft(dec.args, 1)
    method = DraftMethod(draft, chain(3))
    roots, state = method.start(dec, dec.new_cache(1, 64), torch.randn(1, dec.args.dim), Picker([RowChoice(None, 0, 0)]), [[1]])
    first_features = state.pending[0]
    tokens = method.propose(dec, roots, state, method.tree)
    with torch.no_grad():
        unrolled = draft_unroll(draft, dec, first_features, roots.view(1, 1), tokens[:, 1:].view(1, 1, 3))
        guesses = [int((u[0, 0] @ draft.projection(dec)).argmax()) for u in unrolled]
    assert guesses == tokens[0, 1:].tolist()


def test_draft_checkpoint_round_trip_and_errors(tmp_path):
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=2))
    draft = random_draft(dec.args, 2, candidates=32)
    draft.meta = {"base_model": "tiny", "rank_probabilities": [[0.5, 0.2], [0.4, 0.1]]}
    draft.save(tmp_path / "d")
    loaded = DraftHead.load(tmp_path / "d")
    assert loaded.meta["rank_probabilities"] == draft.meta["rank_probabilities"]
    assert torch.equal(loaded.candidate_vocab, draft.candidate_vocab)
    for name, p in draft.state_dict().items():
        assert torch.allclose(loaded.state_dict()[name], p.half().float())
    other = Decoder.from_hf(tiny_hf_model("llama", seed=2, vocab=80)).args
    with pytest.raises(PropdError, match="vocabulary"):
        loaded.check_fits(other)
    (tmp_path / "d" / "draft.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(PropdError, match="corrupt"):
        DraftHead.load(tmp_path / "d")


def test_shipped_draft_equals_ar_on_the_default_model(default_model):
    want = [w.token_ids for w in default_model.generate(REAL_PROMPTS, "ar", max_new_tokens=48)]
    for tree, bs in (("mc_sim_7b_63", 1), ("best16", 4)):
        got = default_model.generate(REAL_PROMPTS, default_model.method("draft", tree), max_new_tokens=48, batch_size=bs)
        assert [g.token_ids for g in got] == want, (tree, bs)
        assert sum(len(g.token_ids) for g in got) / sum(g.stats.steps for g in got) > 1.5


def test_root_only_steps_queue_the_drafts_reading_and_stay_lossless():
    """ProPD may pick plain AR for a while: the draft skips those steps and reads their entries
    later, in order, as if it had read them one by one."""
    rng = random.Random(7)
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=7))
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(2, 20))] for _ in range(3)]
    ar = [s.token_ids for s in generate_batch(dec, ARMethod(), prompts, 30, {0})]
    draft = random_draft(dec.args, 7)
    trees = [chain(1), random_tree(rng, nodes=6, depth=3, width=2), chain(1), chain(1), chain(3)]

    class Alternating(DraftMethod):
        steps = 0

        def step(self, decoder, cache, roots, state, picker):
            self.steps += 1
            self.state = state
            return self.step_tree(decoder, cache, roots, state, picker, trees[self.steps % len(trees)])[0]

    method = Alternating(draft, chain(3))
    assert [s.token_ids for s in generate_batch(dec, method, prompts, 30, {0})] == ar
    features, next_tokens, counts = method.state.pending
    assert features.shape[:2] == next_tokens.shape and int(counts.max()) <= next_tokens.shape[1]


def test_queue_puts_each_rows_entries_after_its_own():
    from propd.decoding.draft import _pack

    first = (torch.tensor([[[1.0], [2.0]], [[5.0], [0.0]]]), torch.tensor([[11, 12], [15, 0]]), torch.tensor([2, 1]))
    then = (torch.tensor([[[3.0]], [[6.0]]]), torch.tensor([[13], [16]]), torch.tensor([1, 1]))
    features, tokens, counts = _pack([first, then, then])
    assert counts.tolist() == [4, 3]
    assert tokens[0].tolist() == [11, 12, 13, 13] and tokens[1, :3].tolist() == [15, 16, 16]
    assert features[0, :, 0].tolist() == [1.0, 2.0, 3.0, 3.0] and features[1, :3, 0].tolist() == [5.0, 6.0, 6.0]


def test_calibration_records_both_predictions_of_every_node_and_stays_lossless():
    rng = random.Random(3)
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=3))
    tree = random_tree(rng, nodes=12, depth=3, width=3)
    method = CalibratingDraft(DraftMethod(random_draft(dec.args, 3), tree), AcceptanceModel([[0.5, 0.2, 0.1]] * 3))
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(2, 20))] for _ in range(3)]
    out = generate_batch(dec, method, prompts, 30, {0})
    assert [o.token_ids for o in out] == [a.token_ids for a in generate_batch(dec, ARMethod(), prompts, 30, {0})]
    record = method.record
    assert len(record.nodes) == len(record.steps) * (tree.size - 1)
    for k, (_, _, observed) in enumerate(record.steps):  # a step's accepted nodes are its accepted length less the root
        assert sum(n[2] for n in record.nodes[k * (tree.size - 1) : (k + 1) * (tree.size - 1)]) == observed - 1
    assert all(0 < ranked <= 1 and 0 <= drafted <= 1 for ranked, drafted, _ in record.nodes)
    result = summary(record)
    for r in result["predictors"].values():
        assert 0 <= r["brier"] <= 1 and sum(b["nodes"] for b in r["bins"]) == len(record.nodes)
    perfect = summary(Calibration([(1.0, 0.0, True), (0.0, 1.0, False)], [(2.0, 2.0, 2)]))["predictors"]
    assert perfect["rank statistics"]["brier"] == 0 and perfect["draft path probability"]["brier"] == 1


def test_a_batch_start_packs_what_the_draft_reads_so_the_first_tree_step_is_not_timed_with_it():
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=1))
    draft = random_draft(dec.args, 0, candidates=40)
    assert draft._fc is None and not dec._vocab_projections
    generate_batch(dec, DraftMethod(draft, chain(2)), [[1, 2, 3]], 1, {0})  # the root token only: no step runs
    assert draft._fc is not None and list(dec._vocab_projections) == [id(draft.candidate_vocab)]


def test_the_drafts_cache_holds_as_many_entries_as_the_models():
    """The draft's cache asks for the model's capacity (not its rounded size, which a power of two
    would double again: on a GPU a graph's attention reads the whole capacity)."""
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=1))
    method, caches, states = DraftMethod(random_draft(dec.args, 1), chain(2)), [], []
    start = method.start
    method.start = lambda decoder, cache, *rest: caches.append(cache) or start(decoder, cache, *rest)
    step = method.step
    method.step = lambda decoder, cache, roots, state, picker: states.append(state) or step(decoder, cache, roots, state, picker)
    generate_batch(dec, method, [[5, 6, 7], [8, 9]], 4, set())
    assert states[0].cache.max_len == caches[0].max_len == 256 + 32


def test_a_draft_queue_keeps_its_window_of_ar_steps_and_joining_rows_line_up_with_its_newest_step(monkeypatch):
    import propd.decoding.draft as draft_module
    from propd.decoding.draft import DraftState
    from propd.models.kv_cache import KVCache

    monkeypatch.setattr(draft_module, "DRAFT_WINDOW", 3)

    def entries(rows: int, value: float) -> tuple:
        return torch.full((rows, 1, 4), value), torch.full((rows, 1), int(value)), torch.ones(rows, dtype=torch.long)

    running = DraftState(KVCache(1, 2, 1, 8, 4), [entries(2, 1.0)])
    for step in range(2, 7):  # five AR steps: the two oldest of the six leave unread
        running.queue(entries(2, float(step)))
    assert len(running.queued) == 4 and running.dropped == 2
    running.join(DraftState(KVCache(1, 1, 1, 8, 4), [entries(1, 9.0)]))
    assert len(running.queued) == 4 and running.cache.batch_size == 3
    assert [e[2].tolist() for e in running.queued] == [[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]]  # the joining row's entry is the newest step's
    features, tokens, counts = running.pending
    assert tokens.tolist() == [[3, 4, 5, 6], [3, 4, 5, 6], [9, 0, 0, 0]] and counts.tolist() == [4, 4, 1]

"""Our decoder matches transformers, and the KV cache operations do what they say."""

import pytest
import torch

from propd.errors import PropdError
from propd.models.decoder import Decoder
from tests.conftest import tiny_hf_model


def prefill_logits(decoder: Decoder, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    cache = decoder.new_cache(B, T + 8)
    return decoder.logits(decoder.extend(ids, cache.chain(T), cache))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_logits_match_transformers_on_tiny_models(family):
    hf = tiny_hf_model(family)
    dec = Decoder.from_hf(hf)
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (prefill_logits(dec, ids) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bfloat16_logits_follow_transformers_bfloat16(family):
    """bf16 takes other code paths (torch products, RoPE through an fp32 copy); it must track the
    bf16 reference to bf16 precision."""
    hf = tiny_hf_model(family).to(torch.bfloat16)
    dec = Decoder.from_hf(hf, torch.bfloat16)
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    got = prefill_logits(dec, ids).float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_tied_embeddings_match_transformers_and_are_held_once():
    hf = tiny_hf_model("qwen2", tie_word_embeddings=True)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (prefill_logits(Decoder.from_hf(hf), ids) - ref).abs().max() < 1e-4
    bf16 = Decoder.from_hf(hf, torch.bfloat16)
    assert bf16.lm_head_weight is bf16.embed_tokens


def test_a_bfloat16_decoder_holds_nothing_of_the_transformers_model():
    """Weights in the route's dtype, norms and biases as fp32 copies: dropping the transformers model
    frees its weights (a memory-mapped checkpoint included)."""
    hf = tiny_hf_model("qwen2")
    theirs = {p.untyped_storage().data_ptr() for p in hf.state_dict().values()}
    dec = Decoder.from_hf(hf, torch.bfloat16)
    ours = [dec.embed_tokens, dec.norm, dec.lm_head_weight, *(t for layer in dec.layers for t in vars(layer).values() if t is not None)]
    assert not theirs & {t.untyped_storage().data_ptr() for t in ours}


def test_sliding_window_layers_are_refused():
    with pytest.raises(PropdError, match="sliding-window"):
        Decoder.from_hf(tiny_hf_model("qwen2", layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=1))


def test_layer_ranges_compose_and_steps_match_full_pass():
    """Running layers [0,k) then [k,L), and decoding token by token, equals one full pass."""
    hf = tiny_hf_model("llama", layers=4)
    dec = Decoder.from_hf(hf)
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        ref = hf(ids).logits
    cache = dec.new_cache(1, 32)
    layout = cache.chain(8)
    h = dec.forward_layers(dec.embed(ids[:, :8]), layout, cache, 0, 2)
    h = dec.forward_layers(h, layout, cache, 2, 4)
    cache.advance(torch.tensor([8]))
    assert (dec.logits(h) - ref[:, :8]).abs().max() < 1e-4
    for t in range(8, 12):
        h = dec.extend(ids[:, t : t + 1], cache.chain(1), cache)
        cache.advance(torch.tensor([1]))
        assert (dec.logits(h)[:, 0] - ref[:, t]).abs().max() < 1e-4


def test_default_model_logits_match_transformers(reference_model):
    ids = torch.tensor([reference_model.encode("Tell me about the moon.")])
    with torch.no_grad():
        ref = reference_model.hf_model(ids).logits
    assert (prefill_logits(reference_model.decoder, ids) - ref).abs().max() < 1e-3


def test_bfloat16_route_tracks_the_fp32_model(default_model, reference_model):
    """Whatever route this machine chose: its logits stay within its dtype's rounding of fp32's."""
    ids = torch.tensor([reference_model.encode("Tell me about the moon.")])
    got, ref = prefill_logits(default_model.decoder, ids).float(), prefill_logits(reference_model.decoder, ids)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_cache_keep_packs_chosen_entries_per_row_and_commits_them():
    from propd.models.kv_cache import KVCache

    cache = KVCache(n_layers=2, batch_size=2, n_kv_heads=1, max_len=16, head_dim=1)
    cache.lengths = torch.tensor([3, 5])
    cache.kv[..., 0] = torch.arange(cache.max_len, dtype=torch.float32)  # each slot holds its own index
    cache.keep(torch.tensor([[1, 3, 4], [2, 0, 0]]), torch.tensor([3, 1]), in_place=False)
    assert cache.lengths.tolist() == [6, 6]
    assert cache.kv[1, 1, 0, 0, 3:6, 0].tolist() == [4.0, 6.0, 7.0]
    assert cache.kv[0, 0, 1, 0, 5, 0].item() == 7.0
    assert cache.kv[0, 0, 1, 0, :5, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_cache_cut_and_select_rows():
    from propd.models.kv_cache import KVCache

    cache = KVCache(1, 3, 1, 8, 1)
    cache.lengths = torch.tensor([4, 5, 6])
    cache.kv[:, :, 2, ..., 0] = 7.0
    cache.cut(torch.tensor([2, 0, 8]))
    assert cache.lengths.tolist() == [2, 0, 6]
    cache.select_rows(torch.tensor([2]))
    assert cache.lengths.tolist() == [6] and cache.kv.shape[2] == 1 and bool((cache.kv[..., :6, 0] == 7.0).all())  # its committed entries


def test_cache_longest_follows_its_lengths_through_every_change():
    from propd.models.kv_cache import KVCache

    cache = KVCache(1, 3, 1, 32, 1)
    other = KVCache(1, 1, 1, 32, 1)
    other.advance(9)
    changes = [
        lambda: cache.advance(1), lambda: cache.advance(torch.tensor([2, 0, 1])), lambda: cache.advance(3),
        lambda: cache.keep(torch.tensor([[0, 1], [0, 2], [1, 2]]), torch.tensor([1, 2, 0]), in_place=False),
        lambda: cache.keep(torch.tensor([[0], [0], [0]]), torch.tensor([1, 0, 1]), in_place=True),
        lambda: cache.cut(torch.tensor([9, 3, 1])), lambda: cache.select_rows(torch.tensor([1, 2])), lambda: cache.join(other),
    ]
    assert cache.longest == 0
    for change in changes:
        change()
        assert cache.longest == int(cache.lengths.max())

def test_rows_join_into_the_room_rows_that_left_kept_else_into_a_new_tensor():
    from propd.models.kv_cache import KVCache

    cache = KVCache(1, 3, 1, 8, 1)
    cache.kv[..., 0] = torch.arange(3, dtype=torch.float32).view(1, 1, 3, 1, 1)  # row r holds r everywhere
    cache.lengths = torch.tensor([4, 5, 6])
    cache.select_rows(torch.tensor([0, 2]))
    held = cache.storage
    other = KVCache(1, 1, 1, 8, 1)
    other.kv[..., 0] = 9.0
    other.lengths = torch.tensor([3])
    cache.join(other)
    assert cache.storage is held and cache.lengths.tolist() == [4, 6, 3] and cache.kv.shape[2] == 3
    assert cache.kv[0, 0, :, 0, :3, 0].tolist() == [[0.0] * 3, [2.0] * 3, [9.0] * 3]  # each row's committed entries
    assert bool((cache.kv[..., 1] == 1.0).all())  # the ones column of every slot
    longer = KVCache(1, 1, 1, 300, 1)  # more entries than the tensor holds: a new one
    longer.kv[..., 0] = 5.0
    longer.lengths = torch.tensor([290])
    cache.join(longer)
    assert cache.storage is not held and cache.max_len >= 300 and cache.lengths.tolist() == [4, 6, 3, 290]
    assert cache.kv[0, 1, :, 0, 2, 0].tolist() == [0.0, 2.0, 9.0, 5.0] and bool((cache.kv[0, 1, 3, 0, :290, 0] == 5.0).all())
    assert bool((cache.kv[..., 1] == 1.0).all())


def test_cache_bookkeeping_of_the_tiles_stays_on_the_cpu_under_a_device_scope():
    """A GPU model decodes in a device scope (``Propd.on_device``); the packed tiles' ``ready``
    counts are the CPU's own, so a cache made there must still cut, join and select rows (the meta
    device stands in for a GPU: a tensor made there can't meet a CPU one)."""
    from propd.models.kv_cache import KVCache

    with torch.device("meta"):
        cache, other = KVCache(2, 2, 1, 32, 4, device="cpu", tiles=True), KVCache(2, 1, 1, 32, 4, device="cpu", tiles=True)
        cache.lengths = torch.tensor([20, 9], device="cpu")
        cache.cut(torch.tensor([17, 12], device="cpu"))
        cache.join(other)
        cache.select_rows(torch.tensor([0, 2], device="cpu"))
    assert cache.ready.device.type == "cpu" and cache.ready.shape == (2, 2) and cache.lengths.tolist() == [17, 0]


def test_cache_pool_lends_a_tensor_again_only_once_no_cache_holds_it():
    import gc

    from propd.models.kv_cache import CachePool, KVCache

    pool = CachePool(keep=2)
    first = KVCache(2, 3, 1, 40, 4, "cpu", pool=pool)
    first.kv[0, 0, 0, 0, 0, 0] = 5.0
    held = first.storage
    second = KVCache(2, 3, 1, 40, 4, "cpu", pool=pool)
    assert second.storage is not held  # the first cache still holds its tensor
    first.select_rows(torch.tensor([0, 2]))  # a view of the same tensor: still held
    busy = KVCache(2, 3, 1, 40, 4, "cpu", pool=pool)
    assert busy.storage is not held
    del first
    gc.collect()
    third = KVCache(2, 3, 1, 40, 4, "cpu", pool=pool)
    assert third.storage is held and third.kv[0, 0, 0, 0, 0, 0] == 5.0 and bool((third.kv[..., 4] == 1.0).all())  # as it was left
    grown = third.storage
    third.join(KVCache(2, 1, 1, 40, 4, "cpu"))  # the joined batch takes a new tensor; the old one is spare
    assert third.storage is not grown and KVCache(2, 3, 1, 40, 4, "cpu", pool=pool).storage is grown
    assert len(pool.tensors()) == 4  # second's, busy's, third's and the spare one
    for n in (5, 6, 7):  # three more shapes, each cache gone at once: spares beyond ``keep`` make room
        KVCache(2, n, 1, 40, 4, "cpu", pool=pool)
    gc.collect()
    assert len(pool.tensors()) == 3 + 2 and all(any(t is c.storage for t in pool.tensors()) for c in (second, busy, third))
    with torch.inference_mode():  # a tensor made in inference mode is lent only in that mode (it takes no in-place write outside)
        inside = KVCache(2, 8, 1, 40, 4, "cpu", pool=pool).storage
    assert KVCache(2, 8, 1, 40, 4, "cpu", pool=pool).storage is not inside


def test_cache_pool_keeps_spares_within_its_bytes_oldest_dropped_first():
    import gc

    from propd.models.kv_cache import CachePool, KVCache

    row = KVCache(2, 1, 1, 40, 4, "cpu").kv.nbytes  # a 1-row cache's bytes
    pool = CachePool(keep=4, spare_bytes=6 * row)
    for rows in (1, 2, 3):  # each cache gone at once
        KVCache(2, rows, 1, 40, 4, "cpu", pool=pool)
    gc.collect()
    assert [t.shape[2] for t in pool.tensors()] == [1, 2, 3]  # 6 rows' bytes in all: within
    KVCache(2, 1, 1, 40, 4, "cpu", pool=pool)  # a spare fits: lent again, nothing made or dropped
    gc.collect()
    assert [t.shape[2] for t in pool.tensors()] == [2, 3, 1]
    KVCache(2, 4, 1, 40, 4, "cpu", pool=pool)  # 4 rows more: the oldest spares make room, down to 2 rows' bytes
    gc.collect()
    assert [t.shape[2] for t in pool.tensors()] == [1, 4]


def test_a_token_sets_projection_is_made_once_and_dropped_with_it():
    """Keyed by the tensor and dropped with it (keyed by its address, every drafter loaded anew left
    its packed rows behind, and a new set at a dead one's address would have taken them)."""
    import gc

    dec = Decoder.from_hf(tiny_hf_model("llama", seed=0))
    tokens = torch.arange(10)
    projection, rows = dec.vocab_projection(tokens), dec.vocab_rows(tokens)
    assert dec.vocab_projection(tokens) is projection and dec.vocab_rows(tokens) is rows
    del tokens, projection, rows
    gc.collect()
    assert not dec._vocab_projections and len(dec._vocab_rows) == 0
    for start in range(10, 60, 10):
        other = torch.arange(start, start + 10)
        assert torch.equal(dec.vocab_rows(other), dec.lm_head_weight[other].float())
        x = torch.randn(3, dec.args.dim)
        assert torch.allclose(dec.vocab_projection(other)(x), x @ dec.lm_head_weight[other].float().t(), atol=1e-4)


def test_batches_decoding_one_after_another_reuse_the_pooled_cache_and_tokens_stay_the_same():
    """Batches take their caches from the decoder's pool, as the last batch left them: the same
    tokens come out as from a cache of its own (every batch's, at two batch sizes)."""
    import random

    from propd.decoding.ar import ARMethod
    from propd.decoding.loop import generate_batch

    rng = random.Random(0)
    prompts = [[[rng.randrange(1, 96) for _ in range(rng.randint(2, 30))] for _ in range(3)] for _ in range(3)]
    prompts += [p[:1] for p in prompts]
    fresh = [[s.token_ids for s in generate_batch(Decoder.from_hf(tiny_hf_model("llama", seed=0)), ARMethod(), p, 20, {0})] for p in prompts]
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=0))
    pooled, lent = [], []
    for p in prompts:
        pooled.append([s.token_ids for s in generate_batch(dec, ARMethod(), p, 20, {0})])
        lent.append(dec.cache_pool.tensors()[-1])
    assert pooled == fresh
    assert lent[0] is lent[1] is lent[2] and lent[3] is lent[4] is lent[5] and lent[2] is not lent[3]  # one tensor a batch size (capacity 256)


@pytest.mark.parametrize("seed", range(3))
def test_a_trees_layout_is_the_same_from_its_mask_or_from_every_rows_copy_of_it_and_follows_edits(seed):
    import random

    from propd.models.kv_cache import KVCache
    from tests.test_tree import random_tree

    rng = random.Random(seed)
    tree = random_tree(rng, rng.randint(1, 12), rng.randint(1, 4), 3)
    cache = KVCache(1, 3, 1, 64, 4)
    cache.advance(torch.tensor([rng.randrange(20) for _ in range(3)]))
    for _ in range(2):  # the second time from the cached order
        shared, per_row = cache.tree(tree.ancestors), cache.tree(tree.ancestors.expand(3, -1, -1))
        for a, b in ((shared.slots, per_row.slots), (shared.positions, per_row.positions), (shared.plan.inplace, per_row.plan.inplace)):
            assert torch.equal(a, b)
        assert torch.equal(shared.plan.path, per_row.plan.path)
    chain = torch.ones(4, 4, dtype=torch.bool).tril()
    before = cache.tree(chain).plan.path.clone()
    chain[3, 2] = False  # node 3 now hangs from node 1: its path changes
    assert not torch.equal(cache.tree(chain).plan.path, before)
    assert torch.equal(cache.tree(chain).plan.path, cache.tree(chain.expand(3, -1, -1)).plan.path)

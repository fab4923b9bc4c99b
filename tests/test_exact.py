"""Exact by construction: a token's logits are bitwise the same whichever tokens and rows share its
step, on every route the machine's check calls exact; and the route choice itself."""

import json
import random
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from propd.decoding.loop import prefill
from propd.decoding.pruning import whole_paths
from propd.decoding.tree import run_tree
from propd.errors import PropdError
from propd.models import attention, graphs, kernels, native, pointwise
from propd.models.decoder import Decoder
from propd.models.kernels import PACKED, SCREEN_ROWS, Linear, Route, choose_route, is_row_invariant, measure_route, packed_rows
from propd.models.kv_cache import KVCache, path_slots
from propd.tree.tree import TokenTree
from tests.conftest import REAL_PROMPTS, tiny_hf_model

TINY = tiny_hf_model("llama", seed=5, layers=2)
ROUTES = [r for r in (Route.parse(n) for n in ("float32-torch-pad8", "bfloat16-onednn", "bfloat16-torch", "bfloat16-amx", "bfloat16-avx512"))
          if measure_route(r, Decoder.from_hf(TINY).args.product_shapes(), rows=(1,)).get("exact")]
TINY_ARGS = Decoder.from_hf(TINY).args
TENSOR_EXACT = attention.blocked_is_exact(TINY_ARGS.n_heads, TINY_ARGS.n_kv_heads, TINY_ARGS.head_dim)  # not with MKL on an AMD EPYC
# attention, norms, RoPE, SiLU: by the C kernels, or by tensor ops where this machine makes those invariant
KERNELS = (["c"] if native.native_kernel() is not None else []) + (["torch"] if TENSOR_EXACT else [])
AMX = native.native_kernel() is not None and bool(native.native_kernel().amx_ready())  # the amx route exists here, exact or broken
OURS = next((f"bfloat16-{k}" for k, code in PACKED.items() if native.native_kernel() is not None and native.native_kernel().bf16_products() & code), None)
# every bf16 kernel of ours that runs here (both where the CPU has AMX): the tests of our products take each
OWN = [f"bfloat16-{k}" for k in ("amx", "avx512") if native.native_kernel() is not None and native.native_kernel().bf16_products() & PACKED[k]]
AMX_ATTENTION = AMX and attention.tiles_take(64)
# The route whose attention over 64-feature heads is a kernel of its own: AMX tiles, or bf16 dot products over a bf16 cache.
DOT_ATTENTION = native.native_kernel() is not None and bool(native.native_kernel().bf16_dot_attention())
WIDE = "bfloat16-amx" if AMX_ATTENTION else "bfloat16-avx512" if OURS == "bfloat16-avx512" else None
# the int8-screened argmax runs here: beside our AVX512-BF16 products (also on a CPU with AMX)
SCREEN = OURS is not None and bool(native.native_kernel().bf16_products() & PACKED["avx512"]) and bool(native.native_kernel().bf16_screen_ready())


def wide_model(family: str = "llama", seed: int = 5, layers: int = 2, route: str | None = WIDE):
    """A tiny model with 64-feature heads (two per K/V head) on ``route``: with AMX its caches keep the
    AMX attention's copy; with AVX512-BF16, its bf16 cache is read by the bf16 dot-product attention."""
    hf = tiny_hf_model(family, seed=seed, layers=layers, hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    return Decoder.from_hf(hf, Route.parse(route))


def kernels_by(kernel: str):
    """The C kernels, or tensor ops, for a while."""
    return mock.patch.object(native, "native_kernel", native.native_kernel if kernel == "c" else lambda: None)


def ar_logits(dec: Decoder, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """Logits after each of ``tokens`` fed one per step after ``prompt``, as AR decoding computes them."""
    cache = dec.new_cache(1, len(prompt) + len(tokens) + 1)
    prefill(dec, cache, [prompt])
    out = []
    for t in tokens:
        out.append(dec.logits(dec.extend(torch.tensor([[t]], device=dec.device), cache.chain(1), cache))[0, 0])
        cache.advance(torch.ones(1, dtype=torch.long, device=dec.device))
    return out


def random_tree_with_path(rng: random.Random, size: int, depth: int) -> tuple[torch.Tensor, list[int]]:
    """An ancestor mask [N, N] of a random tree (nodes after their parents) and one root-to-leaf path in it."""
    parents = [0] + [rng.randrange(i) for i in range(1, size)]
    depths = [0]
    for i in range(1, size):
        if depths[parents[i]] >= depth:
            parents[i] = 0
        depths.append(depths[parents[i]] + 1)
    ancestors = torch.eye(size, dtype=torch.bool)
    for i in range(1, size):
        ancestors[i] |= ancestors[parents[i]]
    leaf = max(range(size), key=lambda i: (depths[i], rng.random()))
    return ancestors, ancestors[leaf].nonzero().flatten().tolist()


def tree_logits_equal_ar(dec: Decoder, rng: random.Random, prompts: list[list[int]], size: int, depth: int) -> None:
    """Verify one random tree per batch (rows: ragged prompts, their own tokens) and compare the
    logits of every node on a root-to-leaf path with AR's at that position, bitwise."""
    ancestors, path = random_tree_with_path(rng, size, depth)
    vocab = dec.args.vocab_size
    tokens = torch.randint(0, vocab, (len(prompts), size), generator=torch.Generator().manual_seed(rng.randrange(1 << 30))).to(dec.device)
    cache = dec.new_cache(len(prompts), max(map(len, prompts)) + size + 1)
    prefill(dec, cache, prompts)
    logits = dec.logits(dec.extend(tokens, cache.tree(ancestors), cache))
    for b, prompt in enumerate(prompts):
        want = ar_logits(dec, prompt, tokens[b, path].tolist())
        for k, node in enumerate(path):
            assert torch.equal(logits[b, node], want[k]), (b, k, float((logits[b, node].float() - want[k].float()).abs().max()))


@pytest.mark.parametrize(("kernel", "route"), [(k, r) for r in ROUTES for k in KERNELS if k == "c" or r.kernel not in PACKED],  # ours are C
                         ids=lambda x: getattr(x, "name", x))
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), size=st.integers(1, 40), depth=st.integers(1, 7))
def test_tree_logits_equal_ar_logits_bitwise_on_random_trees_and_batches(kernel, route, seed, batch, size, depth):
    rng = random.Random(seed)
    dec = Decoder.from_hf(TINY, route)
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(1, 300))] for _ in range(batch)]  # contexts of 1-10 attention blocks
    with kernels_by(kernel):
        tree_logits_equal_ar(dec, rng, prompts, size, depth)


@pytest.mark.skipif(WIDE is None, reason="no AMX or bf16 dot-product attention here")
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), size=st.integers(1, 40), depth=st.integers(1, 7))
def test_wide_head_attention_gives_tree_tokens_ar_logits_bitwise(seed, batch, size, depth):
    """The AMX attention or the bf16 dot-product one: contexts of 1-10 blocks, trees crossing block
    edges, rows of a batch with their own lengths, odd and even counts of entries (the dot-product
    attention adds values two entries at a time), the AMX copy of committed blocks read by every
    step after the first."""
    rng = random.Random(seed)
    dec = wide_model()
    assert (dec.new_cache(1, 8).packed is not None) == AMX_ATTENTION
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(1, 300))] for _ in range(batch)]
    tree_logits_equal_ar(dec, rng, prompts, size, depth)


def random_token_tree(rng: random.Random, size: int, depth: int) -> TokenTree:
    """A random tree of ``size`` nodes at most ``depth`` deep."""
    paths: list[tuple[int, ...]] = [()]
    kids: dict[tuple[int, ...], int] = {}
    while len(paths) < size:
        parent = rng.choice([p for p in paths if len(p) < depth])
        kids[parent] = kids.get(parent, 0) + 1
        paths.append((*parent, kids[parent] - 1))
    return TokenTree.from_paths(paths[1:])


@pytest.mark.parametrize("tiled", [False, *([True] if WIDE else [])])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), size=st.integers(2, 24), depth=st.integers(1, 5))
def test_rows_verifying_their_own_nodes_give_ar_logits_bitwise(tiled, seed, batch, size, depth):
    """Rows of a batch verify their own whole-path subsets of one tree (ProPD's tree size per row):
    with the fused AMX layers the shorter rows' padding is skipped, elsewhere computed again; every
    verified node on a random root-to-leaf path gets AR's logits, bitwise."""
    if not KERNELS:
        pytest.skip("neither C kernels nor invariant tensor attention here")
    rng = random.Random(seed)
    dec = wide_model() if tiled else Decoder.from_hf(TINY, Route.parse("float32-torch-pad8"))
    tree = random_token_tree(rng, size, depth)
    leaf = max(range(size), key=lambda i: (int(tree.depths[i]), rng.random()))
    path = tree.ancestors[leaf].nonzero().flatten().tolist()
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(1, 300))] for _ in range(batch)]
    tokens = torch.randint(0, dec.args.vocab_size, (batch, size), generator=torch.Generator().manual_seed(seed))
    ok = torch.rand(batch, size, generator=torch.Generator().manual_seed(seed + 1)) < 0.5
    ok[:, path] = True
    ok[rng.randrange(batch), 1:] = False  # one row verifies only its path
    ok[:, path] = True
    alive = whole_paths(ok, tree)
    cache = dec.new_cache(batch, max(map(len, prompts)) + size + 1)
    prefill(dec, cache, prompts)
    normed, ran = run_tree(dec, cache, tree, tokens, alive)
    assert torch.equal(ran, alive)
    logits = dec.lm_head(normed)
    for b, prompt in enumerate(prompts):
        want = ar_logits(dec, prompt, tokens[b, path].tolist())
        for k, node in enumerate(path):
            assert torch.equal(logits[b, node], want[k]), (b, k, float((logits[b, node].float() - want[k].float()).abs().max()))


@pytest.mark.skipif(not AMX_ATTENTION, reason="no AMX attention here")
def test_amx_attention_follows_float_attention_and_its_copy_follows_the_cache():
    """Close to fp32 attention over bf16-rounded inputs; after a row is cut back and given other
    tokens, its stale packed blocks are not read (logits as from a fresh cache)."""
    dec = wide_model(route="bfloat16-amx")
    B, KV, H, hd, S = 2, 2, 4, 64, 200
    keys, values = torch.randn(2, B, KV, S, hd + 1).unbind(0)
    keys[..., hd] = values[..., hd] = 1.0
    q = torch.randn(B, 1, H, hd)
    lengths = torch.tensor([150, 33])
    copy = attention.TileCopy(torch.empty(B, KV, S // 32, 32 * hd, dtype=torch.int32), torch.zeros(B, dtype=torch.long), lengths - 1)
    got = attention._native(native.native_kernel(), q, keys, values, attention.chain_plan((lengths - 1).unsqueeze(1), KV, S), copy)
    assert copy.ready.tolist() == [4, 1]
    for b in range(B):
        k, v = (t[b, :, : lengths[b], :hd].bfloat16().float().repeat_interleave(H // KV, 0) for t in (keys, values))
        want = torch.softmax(q[b, 0, :, None].bfloat16().float() @ k.transpose(1, 2) * hd**-0.5, -1) @ v
        torch.testing.assert_close(got[b, 0], want.flatten(), rtol=0, atol=5e-3)
    prompt, other = list(range(1, 90)), torch.tensor([list(range(40, 70))])
    one = torch.ones(1, dtype=torch.long)
    cache = dec.new_cache(1, 128)
    prefill(dec, cache, [prompt])
    dec.extend(torch.tensor([[5]]), cache.chain(1), cache)
    cache.advance(one)
    assert cache.ready[:, 0].tolist() == [2, 2]
    cache.cut(torch.tensor([40]))
    assert cache.ready[:, 0].tolist() == [1, 1]
    fresh = dec.new_cache(1, 128)
    prefill(dec, fresh, [prompt[:40]])
    hidden = []
    for c in (cache, fresh):
        dec.extend(other, c.chain(30), c)
        c.advance(30 * one)
        hidden.append(dec.extend(torch.tensor([[7]]), c.chain(1), c))
    assert torch.equal(*hidden)


@pytest.mark.skipif(not TENSOR_EXACT, reason="the tensor attention is not row-invariant on this machine")
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), size=st.integers(1, 40), depth=st.integers(1, 7))
def test_what_a_cuda_graph_replays_changes_no_bit(seed, batch, size, depth):
    """A graph's step (``graphs.step_inputs``: tokens padded to a power of two, the whole cache
    scored, paths padded, the recent window as wide as the deepest path could need) gives every
    token bitwise the hidden states of the eager step, for AR-style chains and trees over ragged
    caches, whole and as a late-layer range."""
    rng = random.Random(seed)
    dec = Decoder.from_hf(TINY, Route.parse("float32-torch-pad8"))
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(1, 120))] for _ in range(batch)]
    ancestors, _ = random_tree_with_path(rng, size, depth)
    tokens = torch.randint(0, 96, (batch, size), generator=torch.Generator().manual_seed(seed))
    replayed = graphs.GraphedLayers(dec._layer)
    with kernels_by("torch"), torch.inference_mode():
        for tree, start in ((ancestors, 0), (None, 0), (ancestors, 1)):
            out = []
            for as_graph in (True, False):  # each on its own cache: either's writes could hide the other's
                cache = dec.new_cache(batch, max(map(len, prompts)) + size + 1)
                prefill(dec, cache, prompts)
                layout = cache.chain(size) if tree is None else cache.tree(tree)
                x = dec.forward_layers(dec.embed(tokens), layout, cache, 0, start)
                if as_graph:
                    inputs = graphs.step_inputs(x, dec.rope[layout.positions], layout, cache)
                    assert inputs[0].shape[1] == 1 << (size - 1).bit_length()
                    out.append(replayed.layers(inputs, cache, start, 2)[:, :size])
                else:
                    out.append(dec.forward_layers(x, layout, cache, start))
            assert torch.equal(*out)


@pytest.mark.skipif(native.native_kernel() is None, reason="no C compiler: no C kernels")
def test_c_attention_kernel_agrees_with_the_tensor_version():
    """Not bitwise (each adds in its own fixed order), but the same attention: both over random
    trees above ragged caches, grouped query heads, head dims 16 to 128."""
    torch.manual_seed(0)
    for heads, kv_heads, hd in ((4, 2, 16), (9, 3, 64), (14, 2, 64), (12, 2, 128)):
        B, T, S = 3, 7, 320
        keys, values = torch.randn(2, B, kv_heads, S, hd + 1).unbind(0)
        keys[..., hd] = values[..., hd] = 1.0  # the cache's ones column
        ancestors, _ = random_tree_with_path(random.Random(hd), T, 4)
        slots = torch.tensor([[100], [37], [250]]) + torch.arange(T)
        plan = attention.path_plan(slots[:, :1].expand(B, T), path_slots(ancestors.expand(B, T, T), slots), kv_heads, S)
        q = torch.randn(B, T, heads, hd)
        by_c = attention._native(native.native_kernel(), q, keys, values, plan)
        assert torch.allclose(by_c, attention.blocked_attention(q, keys, values, plan), atol=1e-5)


@pytest.mark.skipif(native.native_kernel() is None, reason="no C compiler: no C kernels")
def test_c_attention_over_a_bf16_cache_follows_the_fp32_kernel_over_its_entries_widened():
    """A bf16 cache (``Decoder.cache_dtype``) gives what the fp32 kernel gives over the same entries
    widened, on trees above ragged caches, for 16- to 128-feature heads: bitwise where the entries
    are widened, within bf16's rounding of queries and weights where the CPU's bf16 dot products
    take heads of 32k features."""
    torch.manual_seed(1)
    for heads, kv_heads, hd in ((4, 2, 16), (9, 3, 64), (12, 2, 128)):
        B, T, S = 3, 7, 320
        keys, values = torch.randn(2, B, kv_heads, S, hd + 1, dtype=torch.bfloat16).unbind(0)
        ancestors, _ = random_tree_with_path(random.Random(hd), T, 4)
        slots = torch.tensor([[100], [37], [250]]) + torch.arange(T)
        plan = attention.path_plan(slots[:, :1].expand(B, T), path_slots(ancestors.expand(B, T, T), slots), kv_heads, S)
        q = torch.randn(B, T, heads, hd)
        by_bf16 = attention._native(native.native_kernel(), q, keys, values, plan)
        by_fp32 = attention._native(native.native_kernel(), q, keys.float(), values.float(), plan)
        if hd % 32 or not DOT_ATTENTION:
            assert torch.equal(by_bf16, by_fp32)
        else:
            assert not torch.equal(by_bf16, by_fp32) and torch.allclose(by_bf16, by_fp32, atol=5e-3)
    with pytest.raises(ValueError, match="fp32 entries"):  # the AMX attention reads the cache as fp32
        KVCache(1, 1, 1, 8, 16, tiles=True, dtype=torch.bfloat16)


@pytest.mark.skipif(native.native_kernel() is None, reason="no C compiler: no C kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_pointwise_kernels_agree_with_torch_and_ignore_their_neighbours(dtype):
    """RMSNorm, RoPE and SiLU-gated inputs by C match torch's ops (to rounding; dims with vector
    tails), and a token's result is bitwise the same alone as among 37 others."""
    torch.manual_seed(0)
    x, w = torch.randn(37, 200) * 3, torch.rand(200) + 0.5
    hd, heads = 40, 5
    h = torch.randn(1, 37, (heads + 2) * hd)
    angles = torch.rand(1, 37, hd // 2) * 6
    rope = torch.polar(torch.ones_like(angles), angles)
    gate_up = (torch.randn(37, 2 * 150) * 4).to(dtype)
    with kernels_by("torch"):
        want = (pointwise.rms_norm(x, w, 1e-5), pointwise.rotate(h.clone(), rope, heads, hd, True), pointwise.silu_mul(gate_up, True))
    got = (pointwise.rms_norm(x, w, 1e-5), pointwise.rotate(h.clone(), rope, heads, hd, True), pointwise.silu_mul(gate_up, True))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.allclose(a.float(), b.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    for r in (0, 17, 36):
        assert torch.equal(pointwise.rms_norm(x[r : r + 1], w, 1e-5), got[0][r : r + 1])
        assert torch.equal(pointwise.rotate(h[:, r : r + 1].clone(), rope[:, r : r + 1], heads, hd, True), got[1][:, r : r + 1])
        assert torch.equal(pointwise.silu_mul(gate_up[r : r + 1], True), got[2][r : r + 1])


@pytest.mark.skipif(OURS is None, reason="no bf16 products of ours here: layers run kernel by kernel only")
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: with the qkv bias
@pytest.mark.parametrize("tiled", [False, *([True] if WIDE else [])])  # 16-feature heads (``attend``), 64 (the AMX or dot-product attention)
@pytest.mark.parametrize("ours", OWN)
def test_fused_layers_equal_the_kernel_by_kernel_layers_bitwise(family, tiled, ours):
    """One C call per run of layers gives every hidden state and K/V entry the kernel-by-kernel code
    gives: a random tree over ragged caches, 40 tokens a row (several product calls), and a range of
    layers (what early pruning runs). Entries past a row's prompt and tree are the prompt's padding,
    which the C call skips."""
    dec = wide_model(family, seed=3, layers=3, route=ours) if tiled else Decoder.from_hf(tiny_hf_model(family, seed=3, layers=3), Route.parse(ours))
    assert dec.fused is not None and (dec.new_cache(1, 8).packed is not None) == (tiled and ours.endswith("amx") and AMX_ATTENTION)
    assert dec.new_cache(1, 8).kv.dtype == (torch.bfloat16 if ours.endswith("avx512") else torch.float32)  # the C code writes bf16 entries too
    rng = random.Random(1)
    ancestors, _ = random_tree_with_path(rng, 40, 6)
    tokens = torch.randint(0, dec.args.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    results = []
    for fused in (True, False):
        with mock.patch.object(dec, "fused", dec.fused if fused else None):
            cache = dec.new_cache(3, 200)
            prefill(dec, cache, [[5] * 70, list(range(1, 90)), [7, 8]])
            layout = cache.tree(ancestors)
            early = dec.forward_layers(dec.embed(tokens), layout, cache, 0, 1)
            late = dec.forward_layers(early, layout, cache, 1)
            results.append((early, late, *(cache.kv[:, :, b, :, : n + 40] for b, n in enumerate(cache.lengths.tolist()))))
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.skipif(OURS is None, reason="no bf16 products of ours here")
@pytest.mark.parametrize("out_features", [16, 48, 1000, 1030])  # whole groups of 4 blocks, 3 blocks, tails of 2 and 1, a partial block
@pytest.mark.parametrize("in_features", [96, 416])  # 3 and 13 input blocks: short and long chains of products
@pytest.mark.parametrize("ours", OWN)
def test_our_products_give_a_row_the_same_bits_with_any_rows_beside_it(out_features, in_features, ours):
    """Alone, in calls of 2-32 rows (AMX: the paths for up to 16 and up to 32 rows; AVX512: groups
    of 1-6 rows) and in one call of 73."""
    torch.manual_seed(out_features)
    weight = torch.randn(out_features, in_features)
    lin = Linear(weight, Route.parse(ours))
    x = torch.randn(32, in_features)
    alone = torch.cat([lin(x[i : i + 1]) for i in range(32)])
    for rows in (2, 15, 16, 17, 31, 32):
        assert torch.equal(lin(x[:rows]), alone[:rows]), rows
        assert torch.equal(lin(x[32 - rows :]), alone[32 - rows :]), rows
    many = torch.cat([x.flip(0), x, x[:9]])  # 73 rows in one call: groups of 32, a last one of 9
    assert torch.equal(lin(many), torch.cat([alone.flip(0), alone, alone[:9]]))
    torch.testing.assert_close(alone, x.bfloat16().float() @ weight.bfloat16().float().T, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(OURS is None, reason="no bf16 products of ours here")
@pytest.mark.parametrize("in_features", [64, 416])
@pytest.mark.parametrize("ours", OWN)
def test_our_argmax_picks_what_the_products_argmax_picks_ties_included(in_features, ours):
    torch.manual_seed(0)
    weight = torch.randn(1000, in_features)
    weight[700] = weight[300] = weight[5]  # equal outputs: the first column wins, as torch's argmax
    lin = Linear(weight, Route.parse(ours))
    for rows in (1, 16, 17, 32, 45):
        x = torch.randn(2, rows, in_features)
        x[0, 0] = weight[5] * 4
        assert torch.equal(lin.argmax(x), lin(x).argmax(-1))
    assert lin.argmax(weight[5:6] * 4).item() == 5


@pytest.mark.skipif(not SCREEN, reason="no int8 screen here: it needs our AVX512-BF16 products and AVX512-VNNI")
@pytest.mark.parametrize("in_features", [64, 576])
def test_the_screened_argmax_picks_what_the_full_products_argmax_picks_ties_and_near_ties_included(in_features):
    torch.manual_seed(2)
    weight = torch.randn(5000, in_features) * 0.05  # a partial last block; blocks padded to whole groups of 4
    weight[4900] = weight[3000] = weight[17]  # equal outputs: the first column wins
    weight[18] = weight[17]
    weight[18, 0] += 0.002  # a near tie: one input differs by a bf16 step or two
    lin = Linear(weight, Route.parse("bfloat16-avx512"))
    assert lin.screen is not None and Linear(weight[:1000], Route.parse("bfloat16-avx512")).screen is None  # a small product reads its bf16 weights
    x = torch.randn(6, in_features)
    x[0] = weight[17] * 40
    x[1, 3] *= 300  # an outlier feature
    x[2] = weight[17] * 40 * (1 + 1e-3 * torch.randn(in_features))
    at = torch.empty(6, dtype=torch.long)
    assert lin.screened_argmax(packed_rows(x, lin.packed), at) == 0  # answered by the screen itself
    assert torch.equal(at, lin(x).argmax(-1)) and at[0] == 17
    for trial in range(20):
        y = torch.randn(1 + trial % SCREEN_ROWS, in_features) * (1 + trial % 4)
        y[0] = x[trial % 3]
        if trial % 5 == 0:
            y[-1] = 0.0  # all zero: the screen gives up, the full product answers
        if trial % 5 == 1:
            y[-1] *= 1e25  # past the norm the screen's bound holds for: so does it
        gives_up = trial % 5 < 2
        assert lin.screened_argmax(packed_rows(y, lin.packed), torch.empty(len(y), dtype=torch.long)) == int(gives_up), trial
        assert torch.equal(lin.argmax(y), lin(y).argmax(-1)), trial
    weight[9, 2] = float("inf")
    assert Linear(weight, Route.parse("bfloat16-avx512")).screen is None  # no screen of weights that are not finite


@pytest.mark.skipif(OURS is None, reason="no bf16 products of ours here")
@pytest.mark.parametrize("ours", OWN)
def test_our_topk_gives_the_products_largest_outputs_and_log_probabilities(ours):
    torch.manual_seed(1)
    topk_matches_the_products(torch.randn(1000, 64), Route.parse(ours))


def topk_matches_the_products(weight: torch.Tensor, route: Route) -> None:
    """``Linear.topk`` of ``weight`` [1000, 64] by ``route``: the product's largest outputs, the first
    of equal ones first, and their log-probabilities."""
    weight[700] = weight[300] = weight[5]  # equal outputs: the first column first
    lin = Linear(weight, route)
    x = torch.randn(3, 7, 64)
    x[0, 0] = weight[5] * 4 / weight.std()
    outputs = lin(x)
    values, columns = lin.topk(x, 12)
    assert torch.equal(values, outputs.topk(12, dim=-1).values) and torch.equal(columns[0, 0, :3], torch.tensor([5, 300, 700]))
    assert torch.equal(outputs.gather(-1, columns), values)
    log_probs, same = lin.topk(x, 12, normalized=True)
    assert torch.equal(same, columns)
    torch.testing.assert_close(log_probs, values - outputs.logsumexp(-1, keepdim=True), rtol=0, atol=1e-5)


def test_default_model_tree_logits_equal_ar_logits_bitwise(default_model):
    """On the real model and this machine's chosen route: batch 1 and 4, ragged prompts of 20-400
    tokens, trees of 8-64 nodes."""
    assert default_model.route.exact, f"no exact route found here: {default_model.route_measurements}"
    rng = random.Random(0)
    prompts = [default_model.encode(p) for p in REAL_PROMPTS]
    long = default_model.encode(" ".join(REAL_PROMPTS * 8))
    tree_logits_equal_ar(default_model.decoder, rng, prompts[:1], 64, 6)
    tree_logits_equal_ar(default_model.decoder, rng, [long[:150], prompts[1], long[:400], long[:97]], 48, 8)
    tree_logits_equal_ar(default_model.decoder, rng, [long[:300]], 8, 4)


def test_path_slots_lists_each_nodes_ancestors_in_depth_order():
    ancestors = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool).unsqueeze(0)
    slots = torch.tensor([[10, 11, 12, 13]])
    assert path_slots(ancestors, slots)[0].tolist() == [[10, -1, -1], [10, 11, -1], [10, 12, -1], [10, 12, 13]]


def test_padded_route_is_row_invariant_and_routes_parse():
    weight = torch.randn(40, 24)
    assert is_row_invariant(Route.parse("float32-torch-pad8"), weight, 8)
    for name in ("bfloat16-onednn", "float32-torch-pad8", "float32-torch"):
        assert Route.parse(name).name == name
    with pytest.raises(Exception, match="unknown route"):
        Route.parse("int4-magic")


def test_route_choice_is_measured_once_cached_and_overridable(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPD_CACHE", str(tmp_path))
    shapes = [(48, 32, 2), (96, 32, 1)]
    route, measured = choose_route(shapes, torch.float32)
    assert route.exact and route.dtype == torch.float32
    assert {m["route"] for m in measured} >= {"float32-torch", "float32-onednn"}
    cached = list((tmp_path / "routes").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["results"] == measured
    assert choose_route(shapes, torch.float32)[0] == route  # from the cache
    monkeypatch.setenv("PROPD_ROUTE", "float32-torch-pad8")
    forced, _ = choose_route(shapes, torch.float32)
    assert forced.name == "float32-torch-pad8" and forced.exact


def test_route_finalists_are_chosen_by_their_whole_steps(tmp_path, monkeypatch):
    """Products timed alone rank routes only roughly (their weights stay in the cache): the exact
    routes within ``FINALISTS`` of the fastest are timed as whole steps, and those decide."""
    monkeypatch.setenv("PROPD_CACHE", str(tmp_path))
    products = [
        {"route": "float32-torch-pad8", "exact": True, "ms": {"1": 1.0}},
        {"route": "float32-onednn-pad8", "exact": True, "ms": {"1": 1.4}},
        {"route": "float32-onednn", "exact": True, "ms": {"1": 2.5}},  # not a finalist
        {"route": "float32-torch", "exact": False, "ms": {"1": 0.5}},  # not exact
    ]
    monkeypatch.setattr(kernels, "calibrate", lambda shapes, dtype, q4_1: [dict(r) for r in products])
    asked = []

    def steps(routes):
        asked.append([r.name for r in routes])
        return [{"1x1": 3.0, "8x1": 9.0}, {"1x1": 2.0, "8x1": 10.0}]  # the second is faster by their product

    shapes = [(48, 32, 2)]
    route, measured = choose_route(shapes, torch.float32, steps=steps)
    assert route.name == "float32-onednn-pad8" and route.exact
    assert asked == [["float32-torch-pad8", "float32-onednn-pad8"]]
    assert [("step_ms" in r) for r in measured] == [True, True, False, False]
    assert choose_route(shapes, torch.float32, steps=steps)[0] == route and len(asked) == 1  # from the cache
    assert choose_route(shapes, torch.float32)[0].name == "float32-torch-pad8"  # products alone: another key, another choice


def test_only_q4_1_weights_make_the_q4_route_a_candidate_and_int8_inputs_only_where_asked(monkeypatch):
    measured = []
    def measure(route, shapes, rows=(1, 8, 32)):
        measured.append(route.name)
        return {"route": route.name, "exact": True, "ms": {"1": 1.0}}

    monkeypatch.setattr(kernels, "measure_route", measure)
    kernels.calibrate([(48, 32, 2)], torch.bfloat16)
    assert "bfloat16-avx512" in measured and "bfloat16-avx512q4" not in measured
    measured.clear()
    kernels.calibrate([(48, 32, 2)], torch.bfloat16, q4_1=True)
    assert "bfloat16-avx512q4" in measured and "bfloat16-avx512q4i8" not in measured
    route, _ = kernels.choose_route([(48, 32, 2)], override="bfloat16-avx512q4i8")
    assert route.name == "bfloat16-avx512q4i8"


def test_decode_steps_are_timed_on_the_model_for_each_route():
    from propd.engine import STEP_POINTS, decode_steps_ms

    routes = [Route.parse("float32-torch-pad8"), Route.parse("bfloat16-torch-pad8")]
    timed = decode_steps_ms(TINY, rounds=2)(routes)
    assert len(timed) == 2 and all(set(t) == {f"{b}x{n}" for b, n in STEP_POINTS} for t in timed)
    assert all(ms > 0 for t in timed for ms in t.values())


@pytest.mark.skipif(OURS is None, reason="our packed bf16 kernels do not run here")
def test_a_packed_decoder_keeps_one_copy_of_its_products_and_stays_on_the_cpu():
    dec = Decoder.from_hf(TINY, Route.parse(OURS))
    assert all(w is None for layer in dec.layers for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))
    assert all(p.packed is not None and p.weight is None for ps in dec.products for p in ps)
    with pytest.raises(PropdError, match="stay on the CPU"):
        dec.to("meta")


def test_tensor_attention_is_measured_before_it_is_called_exact(capsys):
    """The probe catches a query whose output moves with the queries beside it, and a CPU whose
    attention would run as such tensor ops is not called exact (a warning says why)."""
    from propd.engine import pick_route

    def crowded(q, keys, values, plan, exact=True):
        return blocked_attention(q, keys, values, plan, exact) * (1 + 1e-6 * (q.shape[1] > 1))

    blocked_attention = attention.blocked_attention
    assert attention.blocked_is_exact.__wrapped__(4, 2, 16) == TENSOR_EXACT
    with mock.patch.object(attention, "blocked_attention", crowded):
        assert not attention.blocked_is_exact.__wrapped__(4, 2, 16)
    cpu = torch.device("cpu")
    route = Route.parse("float32-torch-pad8")
    with mock.patch("propd.engine.runs_native", return_value=False), mock.patch("propd.engine.blocked_is_exact", return_value=False):
        assert not pick_route(TINY_ARGS, None, route.name, cpu)[0].exact
    assert "not row-invariant" in capsys.readouterr().err
    with mock.patch("propd.engine.runs_native", return_value=True):
        assert pick_route(TINY_ARGS, None, route.name, cpu)[0].exact

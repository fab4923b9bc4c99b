"""The Q4_1 routes: weights that hold a GGUF's Q4_1 values multiplied from their 4-bit blocks, by 16-bit
inputs as two int8 planes (avx512q4) or by int8 ones (avx512q4i8), exact by construction like every
route (a row's bits never depend on the rows beside it)."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from propd.models import native
from propd.models.decoder import Decoder
from propd.models.kernels import PACKED, Linear, Route, q4_1_blocks, q4_1_values
from tests.conftest import REAL_PROMPTS, tiny_hf_model
from tests.test_exact import topk_matches_the_products, tree_logits_equal_ar

Q4 = Route.parse("bfloat16-avx512q4")
Q4I8 = Route.parse("bfloat16-avx512q4i8")
LIB = native.native_kernel()
RUNS = LIB is not None and bool(LIB.bf16_products() & PACKED["avx512"]) and bool(LIB.q4_products())  # (their bf16 products by AVX512-BF16)
needs_q4 = pytest.mark.skipif(not RUNS, reason="the Q4_1 routes need AVX512-BF16 and AVX512-VNNI, and a C compiler")
ROUTES = [pytest.param(Q4, marks=needs_q4), pytest.param(Q4I8, marks=needs_q4)]


def q4_model(seed: int = 5, layers: int = 2):
    """A tiny model whose products hold Q4_1 values, as a model read from a Q4_1 GGUF file does."""
    model = tiny_hf_model("llama", seed=seed, layers=layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "layers" in name:
                p.copy_(q4_1_values(p))
    return model


def test_q4_1_blocks_are_found_in_q4_1_values_and_nowhere_else():
    torch.manual_seed(0)
    weight = torch.randn(40, 96) * 0.05
    weight[3, :32] = 0.25  # a block of one value: d = 0
    values = q4_1_values(weight)
    levels, d, m = q4_1_blocks(values)
    assert levels.dtype == torch.uint8 and int(levels.max()) <= 15 and d.dtype == m.dtype == torch.float16
    expanded = (d.float().repeat_interleave(32, 1) * levels.float()) + m.float().repeat_interleave(32, 1)
    assert torch.equal(expanded, values)  # the GGUF reader's fp32 (d q) + m, bitwise
    assert q4_1_blocks(weight) is None  # plain fp32 weights
    assert q4_1_blocks(values[:, :80]) is None  # inputs not in whole blocks of 32
    nudged = values.clone()
    nudged[7, 40] = torch.nextafter(nudged[7, 40], torch.tensor(1.0))
    assert q4_1_blocks(nudged) is None  # one value off the grid


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("out_features", [16, 40, 1030])  # one block, a partial pair of blocks, many with a partial last
@pytest.mark.parametrize("in_features", [64, 416])
def test_q4_products_give_a_row_the_same_bits_with_any_rows_beside_it(route, out_features, in_features):
    torch.manual_seed(out_features + in_features)
    weight = q4_1_values(torch.randn(out_features, in_features) * 0.05)
    lin = Linear(weight, route)
    assert lin.q4 is not None and lin.packed is None
    assert lin.bytes_read == -(-out_features // 16) * (in_features // 32) * 320 < out_features * in_features * 2  # 5 bits a weight against bf16's 16
    x = torch.randn(32, in_features)
    alone = torch.cat([lin(x[i : i + 1]) for i in range(32)])
    for rows in (2, 3, 4, 5, 6, 7, 8, 13, 31, 32):  # groups of up to 3 rows (two planes) or 4 (int8), the last two sharing a small rest
        assert torch.equal(lin(x[:rows]), alone[:rows]), rows
        assert torch.equal(lin(x[32 - rows :]), alone[32 - rows :]), rows
    # the exact product of the inputs as the kernel takes them and the Q4_1 weights, up to fp32 sums' rounding
    inputs = int_inputs(x, 32512 if route == Q4 else 127).double()
    torch.testing.assert_close(alone, (inputs @ weight.double().T).float(), rtol=1e-5, atol=1e-5)


def int_inputs(x: torch.Tensor, levels: int) -> torch.Tensor:
    """x [M, K] as the int8 kernel multiplies it: per block of 32 inputs, integers of max |x| / ``levels``
    (127: one int8 plane; 32512: two, 256 h + l) to the nearest (ties to even) times that scale."""
    blocks = x.view(x.shape[0], -1, 32)
    scale = blocks.abs().amax(2, keepdim=True) / levels
    return (torch.round(blocks * (1 / scale)) * scale.double()).view_as(x)


@pytest.mark.parametrize("route", ROUTES)
def test_fetching_ahead_changes_no_output(route):
    """Whether a call of one row fetches its blocks ahead (``q4_fetch_from``, measured per machine) is speed only."""
    torch.manual_seed(3)
    lin = Linear(q4_1_values(torch.randn(1030, 416) * 0.05), route)
    x = torch.randn(3, 416)
    outputs = []
    try:
        for rows in (1, 2, 4):
            LIB.q4_fetch_from(rows)
            outputs.append([lin(x[:1]), lin(x)])
    finally:
        LIB.q4_fetch_from(2)
    assert all(torch.equal(a, b) for got in outputs[1:] for a, b in zip(got, outputs[0]))


@pytest.mark.parametrize("route", ROUTES)
def test_q4_products_of_inputs_that_are_not_finite_are_not_finite(route):
    weight = q4_1_values(torch.randn(32, 64) * 0.05)
    x = torch.randn(3, 64)
    x[1, 40] = float("nan")
    x[2, 3] = float("inf")
    y = Linear(weight, route)(x)
    assert bool(y[0].isfinite().all()) and not bool(y[1].isfinite().any()) and not bool(y[2].isfinite().any())


@pytest.mark.parametrize("route", ROUTES)
def test_q4_topk_gives_the_products_largest_outputs_and_log_probabilities(route):
    torch.manual_seed(1)
    topk_matches_the_products(q4_1_values(torch.randn(1000, 64) * 0.05), route)


@pytest.mark.parametrize("route", ROUTES)
def test_weights_without_q4_1_values_are_multiplied_in_bf16_on_the_q4_routes(route):
    weight = torch.randn(48, 64)
    lin = Linear(weight, route)
    assert lin.q4 is None
    x = torch.randn(5, 64)
    assert torch.equal(lin(x), Linear(weight, Route.parse("bfloat16-avx512"))(x))


@pytest.mark.parametrize("route", ROUTES)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), size=st.integers(1, 40), depth=st.integers(1, 7))
def test_tree_logits_equal_ar_logits_bitwise_on_the_q4_routes(route, seed, batch, size, depth):
    dec = Decoder.from_hf(q4_model(), route)
    assert dec.fused is not None and all(p.q4 is not None for products in dec.products for p in products)
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(1, 300))] for _ in range(batch)]
    tree_logits_equal_ar(dec, rng, prompts, size, depth)


@pytest.mark.parametrize("route", ROUTES)
def test_the_default_model_runs_its_q4_1_blocks_and_propd_gives_ar_tokens(route):
    """The default model is a Q4_1 GGUF file: on the q4 routes every layer product reads its blocks,
    and so do the draft's (its weights rounded to Q4_1: they only propose), and ProPD's and the
    draft's tokens are AR's on that route."""
    from propd.engine import Propd

    model = Propd.from_pretrained("default", route=route.name)
    assert model.route.exact and all(p.q4 is not None for products in model.decoder.products for p in products)
    prompts = REAL_PROMPTS[:2]
    ar = [g.token_ids for g in model.generate(prompts, "ar", max_new_tokens=32)]
    assert [g.token_ids for g in model.generate(prompts, "propd", max_new_tokens=32)] == ar
    assert [g.token_ids for g in model.generate(prompts, "draft", max_new_tokens=32)] == ar
    draft, dec = model.load_draft(), model.decoder
    with torch.no_grad():
        assert all(p.q4 is not None for p in draft.decoder(dec).products[0]) and draft._packed_fc(dec).q4 is not None
        assert dec.vocab_projection(draft.candidate_vocab).q4 is not None and dec.lm_head.q4 is None  # (the lm_head is the model's own)


@needs_q4
def test_weights_that_only_propose_are_rounded_to_q4_1_on_the_q4_routes_and_kept_elsewhere():
    torch.manual_seed(1)
    weight, odd = torch.randn(48, 64) * 0.05, torch.randn(48, 40)
    q4, bf16 = Decoder.from_hf(q4_model(), Q4), Decoder.from_hf(q4_model(), torch.bfloat16)
    assert q4_1_blocks(q4.proposing(weight)) is not None and torch.equal(q4.proposing(weight), q4_1_values(weight))
    assert q4.proposing(odd) is odd and bf16.proposing(weight) is weight  # (inputs not whole blocks of 32; routes of other weights)

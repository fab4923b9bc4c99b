"""Greedy AR generation on our decoder equals transformers generate, alone and in batches."""

import torch

from propd.decoding.ar import ARMethod
from propd.decoding.loop import generate_batch
from propd.models.decoder import Decoder
from tests.conftest import REAL_PROMPTS, tiny_hf_model


def hf_greedy(hf_model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    x = torch.tensor([ids])
    out = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=sorted(eos), pad_token_id=0)
    return out[0, len(ids) :].tolist()


def test_tiny_batched_ar_equals_transformers_per_row():
    hf = tiny_hf_model("qwen2")
    dec = Decoder.from_hf(hf)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (3, 9, 5, 14)]
    eos = {0}
    batch = generate_batch(dec, ARMethod(), prompts, 20, eos)
    for p, row in zip(prompts, batch):
        assert row.token_ids == hf_greedy(hf, p, 20, eos)
        assert row.mean_accepted == 1.0


def test_default_model_ar_equals_transformers_generate(reference_model):
    results = reference_model.generate(REAL_PROMPTS, max_new_tokens=64)
    for prompt, r in zip(REAL_PROMPTS, results):
        assert r.token_ids == hf_greedy(reference_model.hf_model, reference_model.encode(prompt), 64, reference_model.eos_ids), prompt
    assert sum(r.new_tokens for r in results) > 150


def test_default_model_batch_rows_equal_single_runs(default_model):
    alone = default_model.generate(REAL_PROMPTS, max_new_tokens=48)
    batched = default_model.generate(REAL_PROMPTS, max_new_tokens=48, batch_size=4)
    assert [r.token_ids for r in alone] == [r.token_ids for r in batched]


def test_stream_yields_the_generated_text(default_model):
    pieces = list(default_model.stream("Name a colour.", max_new_tokens=24))
    assert len(pieces) > 1
    assert "".join(pieces) == default_model.generate(["Name a colour."], max_new_tokens=24)[0].text


def test_steps_count_only_the_tokens_they_emitted():
    """The token limit cuts a step's accepted tokens: the per-step counts add up to the output."""
    from tests.test_tree import OracleTree

    dec = Decoder.from_hf(tiny_hf_model("llama", seed=3))
    prompt = [5, 17, 33]
    full = prompt + generate_batch(dec, ARMethod(), [prompt], 40, set())[0].token_ids
    for limit in (1, 6, 13):  # the oracle's chain of 4 gives 5 tokens a step
        s = generate_batch(dec, OracleTree(full, len(prompt), 4), [prompt], limit, set())[0]
        assert 1 + sum(s.step_accepted) == len(s.token_ids) == limit

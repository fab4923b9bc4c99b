"""The CUDA path: the same tokens as on the CPU, lossless tree methods, features and training.
Skipped where torch sees no GPU (CI); run on a GPU machine with ``pytest tests/test_cuda.py``."""

import json
import random

import pytest
import torch

from propd.decoding.ar import ARMethod
from propd.decoding.draft import DraftMethod
from propd.decoding.loop import generate_batch, prefill
from propd.decoding.tree import TreeMethod
from propd.models import graphs
from propd.models.decoder import Decoder
from propd.models.graphs import step_inputs
from propd.training.features import cache_features, load_features
from propd.training.train import evaluate_draft, split_rows, train_draft
from tests.conftest import tiny_hf_model
from tests.test_draft import random_draft
from tests.test_exact import random_tree_with_path
from tests.test_tree import random_heads, random_tree

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.parametrize("seed", range(3))
def test_cuda_decoding_equals_cpu_and_tree_methods_are_lossless(seed):
    rng = random.Random(seed)
    cpu = Decoder.from_hf(tiny_hf_model(["llama", "mistral", "qwen2"][seed], seed=seed))
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(2, 20))] for _ in range(3)]
    expected = [s.token_ids for s in generate_batch(cpu, ARMethod(), prompts, 40, {0})]
    gpu = cpu.to("cuda")
    with torch.device("cuda"):
        tree = random_tree(rng, nodes=12, depth=3, width=4)
        methods = [ARMethod(), TreeMethod(random_heads(64, 96, 3, seed).cuda(), tree), DraftMethod(random_draft(cpu.args, seed).cuda(), tree)]
        for method in methods:
            assert [s.token_ids for s in generate_batch(gpu, method, prompts, 40, {0})] == expected, type(method).__name__


def test_cuda_features_match_cpu_and_the_draft_trains(tmp_path):
    cpu = Decoder.from_hf(tiny_hf_model("llama", seed=3))
    g = torch.Generator().manual_seed(0)
    rows = [{"id": str(i), "prompt_ids": torch.randint(1, 90, (3 + i % 4,), generator=g).tolist(),
             "answer_ids": torch.randint(1, 90, (20 + i % 7,), generator=g).tolist()} for i in range(24)]
    distill = tmp_path / "distill.jsonl"
    distill.write_text("".join(json.dumps(r) + "\n" for r in rows))
    on_cpu = load_features(cache_features(cpu, distill, tmp_path / "cpu.safetensors", [1]))
    gpu = cpu.to("cuda")
    on_gpu = load_features(cache_features(gpu, distill, tmp_path / "gpu.safetensors", [1], batch_size=8), "cuda")
    assert on_gpu["final"].is_cuda and torch.equal(on_gpu["tokens"].cpu(), on_cpu["tokens"])
    torch.testing.assert_close(on_gpu["final"].cpu().float(), on_cpu["final"].float(), atol=2e-2, rtol=1e-2)
    with torch.device("cuda"):
        train_rows, held_rows = split_rows(on_gpu)
        draft, losses = train_draft(gpu, on_gpu, train_rows, epochs=15, batch_size=4, lr=3e-3, candidate_vocab_size=0)
        assert losses[-1] < 0.7 * losses[0]
        assert len(evaluate_draft(gpu, draft, on_gpu, held_rows)["per_depth"]) == 5


def test_cuda_graphs_replay_what_the_eager_layers_compute():
    """Graph replays (captured once per shape, then fed new tokens, slots and paths) against the same
    step's layers run op by op on a second cache: bitwise, AR steps and trees of several sizes."""
    rng = random.Random(0)
    dec = Decoder.from_hf(tiny_hf_model("qwen2", seed=4)).to("cuda")
    prompts = [[rng.randrange(1, 96) for _ in range(n)] for n in (5, 40, 17)]
    with torch.device("cuda"), torch.inference_mode():
        caches = [dec.new_cache(3, 120) for _ in range(2)]
        for cache in caches:
            prefill(dec, cache, prompts)
        for step in range(10):
            ancestors = random_tree_with_path(rng, [9, 12, 5, 16, 7][step // 2], 3)[0] if step % 2 else None
            tokens = torch.randint(0, 96, (3, 1 if ancestors is None else len(ancestors)))
            out = []
            for cache, eager in zip(caches, (True, False)):
                layout = cache.chain(1) if ancestors is None else cache.tree(ancestors)
                if eager:
                    x = dec.embed(tokens)
                    out.append(dec.graphed.layers(step_inputs(x, dec.rope[layout.positions], layout, cache), cache, 0, dec.args.n_layers)[:, : x.shape[1]])
                else:
                    out.append(dec.extend(tokens, layout, cache))
                cache.advance(torch.ones(3, dtype=torch.long))
            assert torch.equal(*out), step
        assert len(dec.graphed.graphs) == 3  # AR, trees padded to 8 and to 16 tokens: each captured once, replayed since


def test_cuda_a_later_batch_of_the_same_shape_replays_the_graphs_the_first_captured():
    """Its cache takes the first batch's tensor again (``CachePool``), so no step shape is captured
    anew (on the H200 every batch of a bench had captured its own)."""
    gpu = Decoder.from_hf(tiny_hf_model("llama", seed=4)).to("cuda")
    with torch.device("cuda"):
        generate_batch(gpu, ARMethod(), [[5, 6, 7], [8, 9, 10, 11]], 12, set())
        captured = graphs.captured()
        generate_batch(gpu, ARMethod(), [[12, 13], [14, 15, 16]], 12, set())
    assert graphs.captured() == captured

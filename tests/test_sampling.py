"""Sampling: seeded, the same at any batch size; exact tree acceptance emits AR sampling's very
tokens for a seed (every method), and its distribution is the model's (chi-square, fixed seeds)."""

import math
import random
from collections import Counter

import pytest
import torch

from propd.decoding.ar import ARMethod
from propd.decoding.draft import DraftMethod
from propd.decoding.loop import generate_batch
from propd.decoding.propd import PropdMethod
from propd.decoding.sampling import Sampling
from propd.decoding.spec import SpecMethod
from propd.decoding.tree import TreeMethod
from propd.errors import PropdError
from propd.models.decoder import Decoder
from propd.models.kernels import Route
from propd.tree.dynamic import AcceptanceModel, TreeChooser
from tests.conftest import REAL_PROMPTS, tiny_hf_model
from tests.test_draft import random_draft
from tests.test_tree import random_heads, random_tree

EXACT = Route.parse("float32-torch-pad8")


def tiny(seed: int = 0) -> Decoder:
    return Decoder.from_hf(tiny_hf_model(["llama", "mistral", "qwen2"][seed % 3], seed=seed), EXACT)


def sample(dec, method, prompts, n, sampling, seeds):
    return [s.token_ids for s in generate_batch(dec, method, prompts, n, set(), sampling=sampling, seeds=seeds)]


def test_sampling_is_seeded_batch_independent_and_tends_to_greedy():
    dec = tiny()
    prompts = [[5, 17, 3], [9, 2, 44, 61, 7], [5, 17, 3]]
    hot = Sampling(2.0)
    together = sample(dec, ARMethod(), prompts, 24, hot, [1, 2, 3])
    alone = [sample(dec, ARMethod(), [p], 24, hot, [s])[0] for p, s in zip(prompts, [1, 2, 3])]
    assert together == alone and together[0] != together[2]  # row seeds, not batch positions, decide
    assert sample(dec, ARMethod(), prompts[:1], 24, hot, [1]) == together[:1]
    greedy = [s.token_ids for s in generate_batch(dec, ARMethod(), prompts, 24, set())]
    assert sample(dec, ARMethod(), prompts, 24, Sampling(1e-4), [7, 8, 9]) == greedy != together


@pytest.mark.parametrize("seed", range(3))
def test_exact_tree_sampling_emits_ar_samplings_tokens(seed):
    rng = random.Random(seed)
    dec = tiny(seed)
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(2, 30))] for _ in range(3)]
    tree = random_tree(rng, nodes=10, depth=3, width=4)
    chooser = TreeChooser(AcceptanceModel([[0.5, 0.2, 0.1, 0.05]] * 3), sizes=(1, 3, 8))
    chooser.latency.observe((len(prompts), 0), 1, 1.0)
    methods = [TreeMethod(random_heads(64, 96, 3, seed), tree), DraftMethod(random_draft(dec.args, seed), tree),
               PropdMethod(DraftMethod(random_draft(dec.args, seed), tree), chooser),
               SpecMethod(dec, tree)]
    for settings in (Sampling(0.7), Sampling(1.0, top_p=0.8), Sampling(1.3, top_k=5)):
        seeds = [rng.randrange(10**6) for _ in prompts]
        want = sample(dec, ARMethod(), prompts, 30, settings, seeds)
        for method in methods:
            assert sample(dec, method, prompts, 30, settings, seeds) == want, (type(method).__name__, settings)


def chi_square_ok(observed: Counter, expected: dict[int, float], n: int) -> bool:
    """Pearson's statistic over categories with >= 5 expected (the rest pooled), against a
    threshold a true distribution exceeds with probability ~3e-7 (Wilson-Hilferty, z = 5)."""
    big = [t for t, p in expected.items() if p * n >= 5]
    cells = [(observed[t], expected[t] * n) for t in big]
    rest = n - sum(o for o, _ in cells)
    rest_expected = n - sum(e for _, e in cells)
    if rest_expected >= 5:
        cells.append((rest, rest_expected))
    elif rest:
        return False
    stat, k = sum((o - e) ** 2 / e for o, e in cells), max(1, len(cells) - 1)
    return stat < k * (1 - 2 / (9 * k) + 5 * math.sqrt(2 / (9 * k))) ** 3


@pytest.mark.parametrize("settings", [Sampling(1.0), Sampling(0.7, top_p=0.9), Sampling(1.5, top_k=8)], ids=["t1", "t0.7-p0.9", "t1.5-k8"])
def test_tree_sampled_tokens_follow_the_models_distribution(settings):
    """The first token (AR's pick after the prompt) and the second (the tree's first drafted
    position) over 1500 seeds, against the model's own probabilities."""
    dec = tiny(1)
    prompt, n = [11, 42, 7, 3], 1500
    tree = random_tree(random.Random(1), nodes=8, depth=2, width=4)
    method = TreeMethod(random_heads(64, 96, 2, 1), tree)
    out = sample(dec, method, [prompt] * n, 2, settings, list(range(n)))
    with torch.inference_mode():
        cache = dec.new_cache(1, 16)
        from propd.decoding.loop import prefill

        p_first = settings.log_probs(dec.logits(prefill(dec, cache, [prompt]))[0]).exp()
        first = Counter(o[0] for o in out)
        assert chi_square_ok(first, {t: float(p) for t, p in enumerate(p_first) if p > 0}, n)
        top = first.most_common(1)[0][0]  # the second token, given the most frequent first one
        cache = dec.new_cache(1, 16)
        p_second = settings.log_probs(dec.logits(prefill(dec, cache, [prompt + [top]]))[0]).exp()
    second = Counter(o[1] for o in out if o[0] == top)
    assert chi_square_ok(second, {t: float(p) for t, p in enumerate(p_second) if p > 0}, first[top])


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    assert (Sampling(1.0, top_k=2).log_probs(logits) > -math.inf).tolist() == [True, True, False, False, False]
    probs = logits.softmax(-1)  # 0.64, 0.24, 0.09, ...
    kept = Sampling(1.0, top_p=0.8).log_probs(logits) > -math.inf
    assert kept.tolist() == [True, True, False, False, False] and probs[0] < 0.8 <= probs[:2].sum()
    for bad in (dict(temperature=0), dict(top_p=0.0), dict(top_k=-1), dict(acceptance="magic")):
        with pytest.raises(PropdError):
            Sampling(**{"temperature": 1.0, **bad})


def test_typical_acceptance_is_fast_and_lossy_by_design():
    rng = random.Random(4)
    dec = tiny(4)
    prompts = [[rng.randrange(1, 96) for _ in range(10)] for _ in range(4)]
    tree = random_tree(rng, nodes=12, depth=3, width=4)
    method = DraftMethod(random_draft(dec.args, 4), tree)
    exact = generate_batch(dec, method, prompts, 30, set(), sampling=Sampling(0.8), seeds=[1, 2, 3, 4])
    typical = generate_batch(dec, method, prompts, 30, set(), sampling=Sampling(0.8, acceptance="typical"), seeds=[1, 2, 3, 4])
    assert all(len(s.token_ids) == 30 for s in typical)
    assert sum(s.mean_accepted for s in typical) >= sum(s.mean_accepted for s in exact)


def test_default_model_sampling_is_identical_across_methods_and_batches(default_model):
    settings = Sampling(0.8, top_p=0.95, seed=123)
    want = [g.token_ids for g in default_model.generate(REAL_PROMPTS, "ar", max_new_tokens=32, sampling=settings)]
    greedy = [g.token_ids for g in default_model.generate(REAL_PROMPTS, "ar", max_new_tokens=32)]
    assert want != greedy
    for method, bs, continuous in (("draft", 1, False), ("propd", 4, False), ("medusa", 2, False), ("lookup", 3, False), ("propd", 2, True)):
        got = default_model.generate(REAL_PROMPTS, default_model.method(method), max_new_tokens=32, batch_size=bs, sampling=settings, continuous=continuous)
        assert [g.token_ids for g in got] == want, (method, bs, continuous)

"""propd bench on a tiny model: schema of results.json, report, plots, and the lossless flag."""

import json

import pytest

from propd.bench.report import build_results, write_report
from propd.bench.run import machine_facts, run_bench
from propd.engine import Propd
from propd.errors import PropdError
from propd.prompts import load_prompts, long_context_prompts
from tests.conftest import tiny_hf_model
from tests.test_tree import random_heads

RUN_KEYS = {
    "method", "batch_size", "tokens_per_s", "mean_accepted", "speedup_vs_ar", "speedup_vs_hf", "lossless", "prompts", "new_tokens",
    "tree_tokens_per_step", "late_tokens_per_step", "rounds", "batch_runs", "speedup_vs_ar_median", "speedup_vs_ar_range", "from_memory",
}


@pytest.fixture(scope="module")
def tiny_propd(default_model):
    """A tiny random model that shares the default model's tokenizer (so prompts are real text)."""
    return Propd(tiny_hf_model("llama", vocab=len(default_model.tokenizer)), default_model.tokenizer, name="tiny")


def test_bench_writes_schema_report_and_plots(tiny_propd, tmp_path):
    prompts = load_prompts(limit=4)
    heads = random_heads(64, len(tiny_propd.tokenizer), 4, seed=1)
    runs = run_bench(tiny_propd, prompts, ["hf", "ar", "medusa"], [1, 2], 12, heads, "top8")
    results = build_results(tiny_propd, runs, machine_facts(tiny_propd), {"prompts_file": "builtin", "prompts": 4, "max_new_tokens": 12})
    paths = write_report(results, runs, tmp_path)
    assert {p.name for p in paths} >= {"results.json", "report.md", "tokens_per_s.png", "steps.png"}
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["runs"]) == 6
    assert data["machine"]["argmax_screen"] is False  # fp32 products: the screen is for our bf16 kernel's vocabulary
    for r in data["runs"]:
        assert RUN_KEYS <= set(r)
        assert r["prompts"] == 4 and r["tokens_per_s"] > 0
    ar = [r for r in data["runs"] if r["method"] == "ar"]
    assert all(r["speedup_vs_ar"] == 1.0 and r["mean_accepted"] == 1.0 for r in ar)
    medusa = [r for r in data["runs"] if r["method"] == "medusa"]
    assert all(r["lossless"] and r["tree_tokens_per_step"] == 9 for r in medusa)
    assert {c["category"] for c in data["per_category"]} == {p.category for p in prompts}
    for run in data["runs"]:  # category times partition the run's time
        cats = [c for c in data["per_category"] if (c["method"], c["batch_size"]) == (run["method"], run["batch_size"])]
        assert sum(c["seconds"] for c in cats) == pytest.approx(run["seconds"], abs=1e-4 * (len(cats) + 1))  # each rounded to 0.1 ms
    assert "| medusa | 2 |" in (tmp_path / "report.md").read_text()


def test_rounds_run_every_batch_again_and_give_a_median_speed_up_of_same_batch_runs(tiny_propd):
    prompts = load_prompts(limit=3)
    runs = run_bench(tiny_propd, prompts, ["ar", "bpd"], [2], 5, random_heads(64, len(tiny_propd.tokenizer), 2, seed=2), rounds=2)
    ar, bpd = runs
    assert len(ar.batches) == len(bpd.batches) == 4  # 2 batches (2 prompts and 1), twice
    assert [g.token_ids for g in bpd.generations] == [g.token_ids for g in ar.generations] and len(ar.generations) == 6
    ar.batches[0] = (ar.batches[0][0], ar.batches[0][1] * 1000)  # one very slow ar run: the median does not follow it
    rec = next(r for r in build_results(tiny_propd, runs, machine_facts(tiny_propd), {})["runs"] if r["method"] == "bpd")
    ratios = sorted(t * a_s / (s * a_t) for (t, s), (a_t, a_s) in zip(bpd.batches, ar.batches))
    assert rec["prompts"] == 3 and rec["rounds"] == 2 and rec["batch_runs"] == 4 and rec["lossless"]
    assert rec["speedup_vs_ar_range"] == [round(ratios[0], 3), round(ratios[-1], 3)]
    assert rec["speedup_vs_ar_median"] == round((ratios[1] + ratios[2]) / 2, 3) < ratios[-1] / 10
    for gen in (bpd.generations[0], bpd.generations[3]):  # prompt 0 in both rounds: reported once
        gen.token_ids[1] = (gen.token_ids[1] + 1) % 100
    rec = next(r for r in build_results(tiny_propd, runs, machine_facts(tiny_propd), {})["runs"] if r["method"] == "bpd")
    assert not rec["lossless"] and [m["prompt_id"] for m in rec["mismatches"]] == [prompts[0].id]
    with pytest.raises(PropdError, match="rounds"):
        run_bench(tiny_propd, prompts, ["ar"], [1], 5, rounds=0)


def test_a_continuous_bench_runs_every_prompt_at_once_per_round_and_shares_its_time_by_steps(tiny_propd, tmp_path):
    prompts = load_prompts(limit=5)
    heads = random_heads(64, len(tiny_propd.tokenizer), 2, seed=3)
    fixed = run_bench(tiny_propd, prompts, ["ar"], [2], 6)[0]
    runs = run_bench(tiny_propd, prompts, ["ar", "bpd"], [2], 6, heads, rounds=2, continuous=True)
    for r in runs:
        assert len(r.batches) == 2 and len(r.generations) == 10  # one run over the 5 prompts a round
        assert [g.token_ids for g in r.generations[:5]] == [g.token_ids for g in fixed.generations]
        assert sum(r.prompt_seconds) == pytest.approx(sum(seconds for _, seconds in r.batches))
        shares = [g.stats.share_seconds for g in r.generations[:5]]
        assert [t / sum(r.prompt_seconds[:5]) for t in r.prompt_seconds[:5]] == pytest.approx([s / sum(shares) for s in shares])
    config = {"prompts_file": "builtin", "prompts": 5, "max_new_tokens": 6, "continuous": True}
    results = build_results(tiny_propd, runs, machine_facts(tiny_propd), config)
    assert all(r["lossless"] and r["batch_runs"] == 2 for r in results["runs"])
    write_report(results, runs, tmp_path)
    assert "continuous batching" in (tmp_path / "report.md").read_text()
    with pytest.raises(PropdError, match="hf"):
        run_bench(tiny_propd, prompts, ["hf", "ar"], [2], 6, continuous=True)


def test_the_report_says_which_propd_runs_started_from_an_earlier_runs_memory(default_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PROPD_MEMORY", str(tmp_path / "memory"))
    prompts = load_prompts(limit=1)
    for remembered in (False, True):  # the first run leaves the memory the second starts from
        runs = run_bench(default_model, prompts, ["ar", "propd", "propd+nomemory"], [1], 8)
        results = build_results(default_model, runs, machine_facts(default_model), {"prompts_file": "builtin", "prompts": 1, "max_new_tokens": 8})
        assert {r["method"]: r["from_memory"] for r in results["runs"]} == {"ar": False, "propd": remembered, "propd+nomemory": False}
        write_report(results, runs, tmp_path)
        assert ("*memory*: `propd` started from" in (tmp_path / "report.md").read_text()) == remembered


def test_lossless_flag_reports_first_difference(tiny_propd):
    prompts = load_prompts(limit=2)
    runs = run_bench(tiny_propd, prompts, ["ar", "bpd"], [1], 6, random_heads(64, len(tiny_propd.tokenizer), 2, seed=2))
    bpd = next(r for r in runs if r.method == "bpd")
    bpd.generations[1].token_ids[3] = (bpd.generations[1].token_ids[3] + 1) % 100  # corrupt one output
    results = build_results(tiny_propd, runs, machine_facts(tiny_propd), {})
    rec = next(r for r in results["runs"] if r["method"] == "bpd")
    assert rec["lossless"] is False
    (m,) = rec["mismatches"]
    assert m["prompt_id"] == prompts[1].id and m["position"] == 3 and m["logit_gap"] > 0


def test_long_context_prompts_join_documents_to_the_asked_length(tmp_path):
    source = tmp_path / "docs.jsonl"
    rows = [{"source": f"t0/{kind}_{i}", "prompt": " ".join(["word"] * (300 + 40 * i))}
            for kind, n in (("cnn_dailymail", 12), ("quoref", 6)) for i in range(n)] + [{"source": "gsm8k/train", "prompt": "unused"}]
    source.write_text("\n".join(json.dumps(r) for r in rows))
    count = lambda text: len(text.split())  # noqa: E731
    prompts = long_context_prompts(source, count, per_category=2, min_tokens=1000, max_tokens=1600)
    assert [p.category for p in prompts] == ["summarization"] * 2 + ["retrieval"] * 2
    assert all(1000 <= count(p.text) <= 1600 for p in prompts)
    assert prompts[0].text.startswith("Article 1:") and prompts[2].text.endswith("using only the documents above.")
    with pytest.raises(PropdError, match="only 2 retrieval prompts"):
        long_context_prompts(source, count, per_category=3, min_tokens=1000, max_tokens=1600)


def test_expected_accepted_is_judged_on_the_steps_no_cut_ended():
    from propd.bench.report import _judged
    from propd.decoding.loop import RowStats, summarize

    stats = RowStats(token_ids=list(range(6)),
                     step_accepted=[2, 3, 1], step_tree_tokens=[4, 4, 4], step_late_tokens=[4, 4, 4], step_seconds=[0.1] * 3, step_expected=[2.5, 2.5, None])
    s = summarize([stats], 0.3)
    assert (s["mean_accepted"], s["expected_accepted"], s["observed_accepted"]) == (2.0, 2.5, 2.5)  # the cut last step counts for speed only
    assert _judged(s) == "2.50 / 2.50 (+0%)" and _judged({"expected_accepted": None, "observed_accepted": None}) == "-"

"""Bench results: records (results.json), Markdown tables (report.md) and PNG plots.

results.json schema
  machine: {cpu, threads, torch, python, dtype, route, exact (the route's row-invariance check passed), device, cuda_graphs,
            argmax_screen (the greedy argmax read in int8 behind an exact bound)}
  config: {prompts_file, prompts, methods, batch_sizes, continuous (rows joining as others finish, not fixed batches), rounds,
           max_new_tokens, model, heads, tree,
           sampling (null: greedy; else temperature, top_p, top_k, seed, acceptance, ...)}
  runs: one record per method x batch size (new_tokens, seconds, steps: summed over every round):
    method, batch_size, prompts (count, one round's), rounds (runs of each batch), batch_runs, new_tokens, seconds, tokens_per_s,
    mean_accepted (tokens per decode step; null for hf), steps,
    expected_accepted / observed_accepted (ProPD: what its acceptance model expected of its uncut steps, and what they accepted),
    tree_tokens_per_step, late_tokens_per_step (tokens through the late layers; < tree tokens when pruned),
    ms_per_step, speedup_vs_ar (tokens/s over ar's), speedup_vs_hf (null when hf did not run),
    speedup_vs_ar_median, speedup_vs_ar_range ([min, max]): over batch runs, each against ar's run of
    the same batch in the same round (null where no run produced tokens),
    lossless (every output, in every round, token-identical to ar's), mismatches (first differing position per prompt),
    from_memory (propd: its chooser started from what an earlier run with the same settings learned on this machine)
  per_category: new_tokens / seconds / tokens_per_s / mean_accepted / expected_accepted / observed_accepted / speedup_vs_ar,
    per method x batch size x category
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from propd.bench.plotting import plt, save_figure
from propd.bench.run import HF, MethodRun, first_mismatch, is_peer
from propd.decoding.loop import summarize


def build_results(model, runs: list[MethodRun], machine: dict, config: dict) -> dict:
    ar = {r.batch_size: r for r in runs if r.method == "ar"}
    tps = {(r.method, r.batch_size): summarize([g.stats for g in r.generations], r.seconds)["tokens_per_s"] for r in runs}
    records, per_category = [], []
    for r in runs:
        ref = ar[r.batch_size]
        rec = {"method": r.method, "batch_size": r.batch_size, "prompts": len(r.generations) // r.rounds, "rounds": r.rounds, "batch_runs": len(r.batches),
               "from_memory": r.from_memory}
        rec |= summarize([g.stats for g in r.generations], r.seconds)
        rec["speedup_vs_ar"] = round(rec["tokens_per_s"] / tps[("ar", r.batch_size)], 3)
        ratios = sorted(tokens * ar_seconds / (seconds * ar_tokens) for (tokens, seconds), (ar_tokens, ar_seconds) in zip(r.batches, ref.batches) if ar_tokens)
        rec["speedup_vs_ar_median"] = round(statistics.median(ratios), 3) if ratios else None
        rec["speedup_vs_ar_range"] = [round(ratios[0], 3), round(ratios[-1], 3)] if ratios else None
        hf_tps = tps.get((HF, r.batch_size))
        rec["speedup_vs_hf"] = round(rec["tokens_per_s"] / hf_tps, 3) if hf_tps else None
        mismatches, differing = [], set()
        for p, a, g in zip(r.prompts, ref.generations, r.generations):  # every round checked, each prompt reported once
            if p.id not in differing and (m := first_mismatch(model, p, a.token_ids, g.token_ids)):
                mismatches.append(m)
                differing.add(p.id)
        rec["lossless"] = not mismatches
        rec["mismatches"] = mismatches
        records.append(rec)
        per_category += _per_category(r, ref)
    return {"machine": machine, "config": config, "runs": records, "per_category": per_category}


def _per_category(run: MethodRun, ref: MethodRun) -> list[dict]:
    """Category rows; a fixed batch's wall time is shared evenly among its prompts (at batch 1 each
    prompt has its own time), a continuous run's by each prompt's share of its steps (``run``)."""

    def grouped(r: MethodRun) -> dict[str, dict]:
        by_cat, seconds = defaultdict(list), defaultdict(float)
        for p, g, t in zip(r.prompts, r.generations, r.prompt_seconds):
            by_cat[p.category].append(g)
            seconds[p.category] += t
        return {cat: summarize([g.stats for g in gens], seconds[cat]) for cat, gens in by_cat.items()}

    mine, ref_cats = grouped(run), grouped(ref)
    return [
        {"method": run.method, "batch_size": run.batch_size, "category": cat, "new_tokens": s["new_tokens"], "seconds": s["seconds"],
         "tokens_per_s": s["tokens_per_s"],
         "mean_accepted": s["mean_accepted"], "expected_accepted": s["expected_accepted"], "observed_accepted": s["observed_accepted"],
         "tree_tokens_per_step": s["tree_tokens_per_step"],
         "speedup_vs_ar": round(s["tokens_per_s"] / ref_cats[cat]["tokens_per_s"], 3)}
        for cat, s in sorted(mine.items())
    ]


def write_report(results: dict, runs: list[MethodRun], out: Path) -> list[Path]:
    """Write results.json, report.md and the plots; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(markdown(results))
    return [out / "results.json", out / "report.md", *plots(results, runs, out)]


def _decoding(sampling: dict | None) -> str:
    if not sampling:
        return "greedy"
    return (f"sampled (temperature {sampling['temperature']}, top-p {sampling['top_p']}, top-k {sampling['top_k']}, "
            f"seed {sampling['seed']}, {sampling['acceptance']} acceptance)")


def markdown(results: dict) -> str:
    m, c = results["machine"], results["config"]
    lines = [
        "# propd bench",
        "",
        f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, {m['dtype']} (products: {m['route']}"
        f"{'; greedy argmax screened in int8' if m.get('argmax_screen') else ''}). "
        f"{c['prompts']} prompts from `{c['prompts_file']}`, up to {c['max_new_tokens']} new tokens, {_decoding(c.get('sampling'))}, "
        f"{_schedule(c)}.",
        "",
        "lossless: *exact* = token-identical to ar, and this route computes every token's logits bitwise as AR does "
        "(row-invariant products, position-ordered attention); *token-identical* = the same tokens on a route that is "
        "not checked exact here; *peer*: another implementation (`hf`: transformers', whose rounding differs outside fp32; `llama.cpp`: "
        "llama.cpp's, computing in the GGUF's own formats), shown with the first token where it differs.",
        "",
        f"*per batch*: the median and range of the speed-ups over ar of each batch run ({_batch_runs(results)}), each against ar's run of "
        "the same batch in the same round: a moment's slowness of the machine moves one of them, not the median.",
        "",
        *_memory_note(results),
        "| method | batch | tokens/s | speed-up vs ar | per batch: median [range] | speed-up vs hf | mean accepted | tree tokens/step "
        "| late tokens/step | ms/step | lossless |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["runs"]:
        same = "exact" if m.get("exact") and not is_peer(r["method"]) else "token-identical"
        lossless = same if r["lossless"] else _differs(r)
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['tokens_per_s']:.2f} | {r['speedup_vs_ar']:.2f}x | "
            f"{_spread(r['speedup_vs_ar_median'], r['speedup_vs_ar_range'])} | "
            f"{_fmt(r['speedup_vs_hf'], 'x')} | {_fmt(r['mean_accepted'])} | "
            f"{_fmt(r['tree_tokens_per_step'])} | {_fmt(r['late_tokens_per_step'])} | {_fmt(r['ms_per_step'])} | {lossless} |"
        )
    lines += ["", "## Per category", "",
              "*expected / observed*: ProPD's acceptance model's prediction for the trees it chose, and what they accepted (tokens per step, "
              "over the steps whose tokens EOS or the limit did not cut).", "",
              "| method | batch | category | tokens/s | speed-up vs ar | mean accepted | expected / observed | tree tokens/step |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["per_category"]:
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['category']} | {r['tokens_per_s']:.2f} | {r['speedup_vs_ar']:.2f}x | {_fmt(r['mean_accepted'])} | "
            f"{_judged(r)} | {_fmt(r['tree_tokens_per_step'])} |"
        )
    return "\n".join(lines) + "\n"


def _schedule(config: dict) -> str:
    if config.get("continuous"):
        return ("continuous batching (all prompts at once, at most the batch size in flight, the next joining as a row finishes; "
                "a batch run is one such run over every prompt)")
    return "in fixed batches (each ends with its slowest row)"


def _memory_note(results: dict) -> list[str]:
    """A line naming the methods whose chooser started from an earlier run's memory, if any."""
    remembered = sorted({r["method"] for r in results["runs"] if r.get("from_memory")})
    if not remembered:
        return []
    names = ", ".join(f"`{name}`" for name in remembered)
    return [f"*memory*: {names} started from what an earlier run with the same settings learned on this machine (`+nomemory`: afresh).", ""]


def _differs(r: dict) -> str:
    """Where a run's tokens first differ from ar's: a defect for propd's methods, a fact for a peer."""
    first = r["mismatches"][0]
    where = f"first at {first['position']}, gap {first['logit_gap']}"
    return f"peer: differs ({len(r['mismatches'])} prompts; {where})" if is_peer(r["method"]) else f"**NO** ({where})"


def _judged(r: dict) -> str:
    """Expected / observed accepted tokens per step and the error, e.g. "2.10 / 2.00 (+5%)"; "-" for a method that chooses no trees."""
    if r.get("expected_accepted") is None or not r.get("observed_accepted"):
        return "-"
    return f"{r['expected_accepted']:.2f} / {r['observed_accepted']:.2f} ({r['expected_accepted'] / r['observed_accepted'] - 1:+.0%})"


def _batch_runs(results: dict) -> str:
    """How many batch runs each batch size's medians are over, e.g. "6 at batch 1, 2 at batch 8"."""
    counts = {r["batch_size"]: r["batch_runs"] for r in results["runs"]}
    return ", ".join(f"{n} at batch {b}" for b, n in counts.items())


def _spread(median: float | None, extent: list[float] | None) -> str:
    return "" if median is None else f"{median:.2f}x [{extent[0]:.2f}-{extent[1]:.2f}]"


def _fmt(x, suffix: str = "") -> str:
    return "" if x is None else f"{x:.2f}{suffix}"


def plots(results: dict, runs: list[MethodRun], out: Path) -> list[Path]:
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in results["runs"]):
        rs = [r for r in results["runs"] if r["method"] == method]
        ax.plot([r["batch_size"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=method)
    ax.set(xlabel="batch size", ylabel="tokens/s", title="Throughput by batch size")
    ax.set_xscale("log", base=2)
    batch_sizes = sorted({r["batch_size"] for r in results["runs"]})
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(save_figure(fig, out / "tokens_per_s.png"))

    tree_runs = [r for r in runs if r.method != "ar" and not is_peer(r.method) and r.generations]
    if tree_runs:
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        for r in tree_runs:
            s = max(r.generations, key=lambda g: g.stats.steps).stats  # the longest generation
            a1.plot(s.step_accepted, label=f"{r.method} (batch {r.batch_size})", alpha=0.8)
            a2.plot(s.step_tree_tokens, label=f"{r.method} tree", alpha=0.8)
            if s.step_late_tokens != s.step_tree_tokens:
                a2.plot(s.step_late_tokens, linestyle="--", label=f"{r.method} after pruning", alpha=0.8)
        a1.set(ylabel="accepted tokens", title="Per decoding step (longest generation)")
        a2.set(xlabel="step", ylabel="tree tokens")
        a1.legend(fontsize=7)
        a2.legend(fontsize=7)
        paths.append(save_figure(fig, out / "steps.png"))

    chosen = [r for r in results["per_category"] if r["expected_accepted"] is not None]  # methods that choose their trees
    if chosen:
        fig, ax = plt.subplots(figsize=(8, 4))
        categories = sorted({r["category"] for r in chosen})
        groups = sorted({(r["method"], r["batch_size"]) for r in chosen}, key=str)
        width = 0.8 / len(groups)
        for i, (method, batch) in enumerate(groups):
            sizes = {r["category"]: r["tree_tokens_per_step"] for r in chosen if (r["method"], r["batch_size"]) == (method, batch)}
            ax.bar([c + i * width for c in range(len(categories))], [sizes.get(c, 0) for c in categories], width, label=f"{method} b={batch}")
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(categories))], categories, rotation=30, ha="right")
        ax.set(ylabel="tree tokens per step (mean)", title="Tree sizes chosen, by category")
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, out / "tree_sizes.png"))

    pruned = [r for r in results["runs"] if r["late_tokens_per_step"] and r["tree_tokens_per_step"] and r["late_tokens_per_step"] < r["tree_tokens_per_step"]]
    if pruned:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [f"{r['method']}\nb={r['batch_size']}" for r in pruned]
        ax.bar(labels, [1 - r["late_tokens_per_step"] / r["tree_tokens_per_step"] for r in pruned])
        ax.set(ylabel="pruned fraction of tree tokens", title="Early pruning ratio")
        paths.append(save_figure(fig, out / "pruning.png"))
    return paths

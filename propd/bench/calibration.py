"""Which predicts a tree node's acceptance better: ProPD's rank statistics or the draft's own path
probability? (``propd calibrate``)

Decoding with the draft layer over one static tree, every node of every step gets two predictions
of "this node lies on the accepted path": the product along its path of the online acceptance
model's p[depth][rank] (what ``TreeChooser`` uses), and the product of the draft's probabilities of
the path's tokens. The node's fate is whether the step accepted it. Reported: each predictor's
reliability curve (mean observed per bin of predicted), Brier score, and how well each predicts a
step's accepted length (1 + the sum over its nodes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from propd.bench.plotting import plt, save_figure
from propd.decoding.draft import DraftMethod, DraftState
from propd.decoding.loop import StepResult
from propd.decoding.sampling import Picker
from propd.decoding.tree import verify
from propd.models.decoder import Decoder
from propd.models.kv_cache import KVCache
from propd.tree.dynamic import AcceptanceModel
from propd.tree.tree import path_probability, path_products

PREDICTORS = ("rank statistics", "draft path probability")
BINS = 10


@dataclass
class Calibration:
    """Per node: (rank-statistics prediction, draft prediction, accepted); per step: (expected
    accepted length by each predictor, observed)."""

    nodes: list[tuple[float, float, bool]] = field(default_factory=list)
    steps: list[tuple[float, float, int]] = field(default_factory=list)


class CalibratingDraft:
    """The draft layer's static tree as a decoding method that records both predictions of every
    node, and learns the rank statistics online as ProPD does."""

    def __init__(self, inner: DraftMethod, acceptance: AcceptanceModel):
        self.inner, self.acceptance, self.record = inner, acceptance, Calibration()
        self.tree_size, self.tree_depth = inner.tree_size, inner.tree_depth

    def start(self, decoder: Decoder, cache: KVCache, hidden: torch.Tensor, picker: Picker, prompts: list[list[int]]):
        return self.inner.start(decoder, cache, hidden, picker, prompts)

    def step(self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: DraftState, picker: Picker) -> StepResult:
        tree = self.inner.tree
        probs = torch.ones(len(roots), tree.size)
        tokens = self.inner.propose(decoder, roots, state, tree, probs)
        ranked = self._rank_predictions()
        result, last = self.inner.finish(tokens, verify(decoder, cache, tree, tokens, picker), state, read=True)
        drafted = path_products(tree, probs)
        for b, node in enumerate(last.tolist()):
            accepted = tree.ancestors[node]
            self.record.nodes += [(ranked[i], drafted[b][i], bool(accepted[i])) for i in range(1, tree.size)]
            self.record.steps.append((1 + sum(ranked[1:]), 1 + sum(drafted[b][1:]), int(tree.depths[node]) + 1))
            self.acceptance.observe(tree, node)
        return result

    def _rank_predictions(self) -> list[float]:
        """Each node's chance of acceptance under the rank statistics (the root's: 1)."""
        return [1.0] + [path_probability(self.acceptance.p, path) for path in self.inner.tree.paths]


def summary(record: Calibration) -> dict:
    """Per predictor: Brier score, reliability bins and the error of the expected accepted length."""
    out = {"nodes": len(record.nodes), "steps": len(record.steps), "predictors": {}}
    observed = torch.tensor([n[2] for n in record.nodes], dtype=torch.float64)
    accepted = torch.tensor([s[2] for s in record.steps], dtype=torch.float64)
    for k, name in enumerate(PREDICTORS):
        predicted = torch.tensor([n[k] for n in record.nodes], dtype=torch.float64)
        expected = torch.tensor([s[k] for s in record.steps], dtype=torch.float64)
        which = (predicted * BINS).long().clamp(max=BINS - 1)
        bins = [
            {"predicted": round(float(predicted[b].mean()), 4), "observed": round(float(observed[b].mean()), 4), "nodes": int(b.sum())}
            for b in (which == i for i in range(BINS)) if b.any()
        ]
        out["predictors"][name] = {
            "brier": round(float(((predicted - observed) ** 2).mean()), 5),
            "expected_accepted": round(float(expected.mean()), 3),
            "observed_accepted": round(float(accepted.mean()), 3),
            "step_abs_error": round(float((expected - accepted).abs().mean()), 3),
            "bins": bins,
        }
    return out


def plot(result: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect")
    for name, r in result["predictors"].items():
        ax.plot([b["predicted"] for b in r["bins"]], [b["observed"] for b in r["bins"]], marker="o", label=f"{name} (Brier {r['brier']:.4f})")
    ax.set(xlabel="predicted P(node accepted)", ylabel="observed fraction accepted", title="Acceptance predictors: calibration")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return path


def markdown(result: dict, header: str) -> str:
    lines = [f"# propd calibrate\n\n{header}\n", "| predictor | Brier score | expected accepted / step | observed | mean abs error per step |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in result["predictors"].items():
        lines.append(f"| {name} | {r['brier']:.4f} | {r['expected_accepted']:.2f} | {r['observed_accepted']:.2f} | {r['step_abs_error']:.2f} |")
    lines += ["", "Reliability (predicted -> observed, nodes):", ""]
    for name, r in result["predictors"].items():
        lines.append(f"- {name}: " + ", ".join(f"{b['predicted']:.2f} -> {b['observed']:.2f} ({b['nodes']})" for b in r["bins"]))
    return "\n".join(lines) + "\n"

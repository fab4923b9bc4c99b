"""``propd train``: self-distil, cache features, train and measure the Medusa heads, early-pruning heads and draft layer, report.

Every stage is resumable: answers already generated and features already cached are reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from propd.engine import Propd, device_name
from propd.training.distill import generate_answers
from propd.training.features import cache_features, load_features
from propd.training.self_prompts import DEFAULT_OPENINGS, write_self_prompts
from propd.training.train import (
    evaluate_draft,
    evaluate_early,
    evaluate_medusa,
    split_rows,
    train_draft,
    train_early,
    train_medusa,
)


@dataclass
class TrainConfig:
    prompts: str
    out: Path
    num_prompts: int = 1000
    self_prompts: int = 0
    self_prompt_openings: tuple[str, ...] = DEFAULT_OPENINGS
    max_new_tokens: int = 192
    batch_size: int = 8
    num_heads: int = 4
    num_layers: int = 1
    early_layers: tuple[int, ...] = (4, 8, 12)
    epochs: float = 2.0
    early_epochs: float = 1.0
    lr: float = 1e-3
    candidate_vocab: int = 8192
    root_conditioned: bool = True
    draft_epochs: float = 3.0
    draft_depth: int = 3
    draft_batch_size: int = 8
    draft_lr: float = 1e-3


def run_training(model: Propd, cfg: TrainConfig) -> dict:
    """Every stage on the model's device."""
    with model.on_device():
        return _run_training(model, cfg)


def _run_training(model: Propd, cfg: TrainConfig) -> dict:
    cfg.out.mkdir(parents=True, exist_ok=True)
    distill = generate_answers(model, cfg.prompts, cfg.out, cfg.num_prompts, cfg.max_new_tokens, cfg.batch_size)
    if cfg.self_prompts:
        own = write_self_prompts(model, cfg.out / "self_prompts.jsonl", cfg.self_prompts, cfg.batch_size, cfg.max_new_tokens, openings=cfg.self_prompt_openings)
        distill = generate_answers(model, own, cfg.out, cfg.self_prompts, cfg.max_new_tokens, cfg.batch_size)
    features_path = cache_features(model.decoder, distill, cfg.out / "features.safetensors", list(cfg.early_layers), cfg.batch_size)
    features = load_features(features_path, model.device)
    train_rows, held_rows = split_rows(features)
    dec = model.decoder

    torch.manual_seed(0)
    heads = None
    if cfg.epochs > 0:
        heads, losses = train_medusa(dec, features, train_rows, cfg.num_heads, cfg.num_layers, cfg.epochs, lr=cfg.lr,
                                     candidate_vocab_size=cfg.candidate_vocab, root_conditioned=cfg.root_conditioned)
        medusa_eval = evaluate_medusa(dec, heads, features, held_rows)

    draft = None
    if cfg.draft_epochs > 0:
        draft, draft_losses = train_draft(dec, features, train_rows, cfg.draft_epochs, cfg.draft_depth, cfg.draft_batch_size, cfg.draft_lr, cfg.candidate_vocab)
        draft_eval = evaluate_draft(dec, draft, features, held_rows)

    early = {}
    for layer in cfg.early_layers:
        head, early_losses = train_early(dec, features, train_rows, layer, cfg.early_epochs, lr=cfg.lr)
        early[layer] = {
            "head": head,
            "logit_lens": evaluate_early(dec, None, layer, features, held_rows),
            "trained": evaluate_early(dec, head, layer, features, held_rows),
            "loss": [early_losses[0], early_losses[-1]],
        }
    chosen = choose_early_layer({k: v["trained"] for k, v in early.items()})

    report = {
        "base_model": model.name,
        "data": {"prompts_file": str(cfg.prompts), "num_prompts": cfg.num_prompts, "self_prompts": cfg.self_prompts,
                 "sequences": int(features["seq"].max()) + 1, "answer_tokens": len(features["seq"]),
                 "train_rows": len(train_rows), "heldout_rows": len(held_rows), "max_new_tokens": cfg.max_new_tokens},
        "early": {str(k): {kk: vv for kk, vv in v.items() if kk != "head"} for k, v in early.items()},
        "early_layer": chosen,
    }
    if heads is not None:
        report["medusa"] = {"num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "epochs": cfg.epochs, "candidate_vocab": cfg.candidate_vocab,
                            "root_conditioned": cfg.root_conditioned, "loss_first_last": [losses[0], losses[-1]], **medusa_eval}
    if draft is not None:
        report["draft"] = {"epochs": cfg.draft_epochs, "depth": cfg.draft_depth, "device": device_name(model.device), "sources": data_sources(report["data"]),
                           "sequences": report["data"]["sequences"],
                           "answer_tokens": report["data"]["answer_tokens"], "loss_first_last": [draft_losses[0], draft_losses[-1]], **draft_eval}
    heads_dir = cfg.out / "heads"
    if heads is not None:
        heads.meta = {"base_model": model.name, "rank_probabilities": medusa_eval["rank_probabilities"], "per_head_accuracy": medusa_eval["per_head"]}
        heads.save(heads_dir, torch.float16)
    if draft is not None:
        draft.meta = {"base_model": model.name, "rank_probabilities": draft_eval["rank_probabilities"], "per_depth_accuracy": draft_eval["per_depth"]}
        draft.save(heads_dir)
    for layer, e in early.items():  # the chosen one, and each layer's under early_heads/ (``--prune-layer``)
        e["head"].meta = {"base_model": model.name, "recall": e["trained"]}
        e["head"].save(heads_dir if layer == chosen else heads_dir / "early_heads" / f"layer-{layer}")
    (heads_dir / "report.json").write_text(json.dumps(report, indent=1))
    (heads_dir / "report.md").write_text(report_markdown(report))
    return report


def choose_early_layer(recall: dict[int, dict[str, float]]) -> int:
    """The earliest layer whose top-10 recall is within 0.03 of the best: earlier pruning saves more."""
    best = max(r["top10"] for r in recall.values())
    return min(k for k, r in recall.items() if r["top10"] >= best - 0.03)


def data_sources(data: dict) -> str:
    sources = f"{data['num_prompts']} prompts from `{data['prompts_file']}`"
    if data["self_prompts"]:
        sources += f" and {data['self_prompts']} prompts the model wrote itself"
    return sources


def report_markdown(report: dict) -> str:
    d = report["data"]
    lines = [
        "# Head training report",
        "",
        f"Base model `{report['base_model']}`; {d['sequences']} self-distilled answers ({d['answer_tokens']} answer tokens, "
        f"up to {d['max_new_tokens']} each) to {data_sources(d)}; held-out rows: {d['heldout_rows']}.",
    ]
    if "medusa" in report:
        m = report["medusa"]
        lines += ["", f"## Medusa heads ({m['num_heads']} heads x {m['num_layers']} residual block, "
                  f"{'reading the root token too, ' if m.get('root_conditioned') else ''}shared frozen lm_head over "
                  f"{m['candidate_vocab'] or 'all'} candidate tokens, {m['epochs']} epochs)", "",
                  "| head (predicts t+k) | top-1 | top-5 | top-10 | top-20 |", "| --- | --- | --- | --- | --- |"]
        for i, acc in enumerate(m["per_head"]):
            lines.append(f"| {i} (t+{i + 2}) | {acc['top1']:.3f} | {acc['top5']:.3f} | {acc['top10']:.3f} | {acc['top20']:.3f} |")
    if "draft" in report:
        dr = report["draft"]
        lines += ["", f"## Draft layer (EAGLE-style, unrolled over {dr['depth']} depths in training, {dr['epochs']} epochs)", "",
                  f"Trained on {dr['sequences']} answers ({dr['answer_tokens']} answer tokens) to {dr['sources']}, on {dr['device']}. "
                  "Accuracy at each tree depth given the path before it is right.", "",
                  "| depth (predicts t+k) | top-1 | top-5 | top-10 | top-20 |", "| --- | --- | --- | --- | --- |"]
        for i, acc in enumerate(dr["per_depth"]):
            lines.append(f"| {i + 1} (t+{i + 2}) | {acc['top1']:.3f} | {acc['top5']:.3f} | {acc['top10']:.3f} | {acc['top20']:.3f} |")
    lines += ["", "## Early-pruning head: recall of the final greedy token in the early top-K", "",
              "| layer | form | top-1 | top-5 | top-10 | top-20 |", "| --- | --- | --- | --- | --- | --- |"]
    for layer, e in report["early"].items():
        for form in ("logit_lens", "trained"):
            r = e[form]
            lines.append(f"| {layer} | {form.replace('_', ' ')} | {r['top1']:.3f} | {r['top5']:.3f} | {r['top10']:.3f} | {r['top20']:.3f} |")
    lines += ["", f"Chosen early layer: **{report['early_layer']}** (earliest within 0.03 top-10 recall of the best)."]
    return "\n".join(lines) + "\n"

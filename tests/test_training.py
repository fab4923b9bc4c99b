"""Head training on a tiny model: the whole pipeline runs, the loss falls, checkpoints round-trip."""

import json
from types import SimpleNamespace

import pytest
import torch

from propd.engine import Propd
from propd.errors import PropdError
from propd.heads.draft import DraftHead
from propd.heads.early import EarlyHead
from propd.heads.medusa import MedusaHeads
from propd.prompts import builtin_prompts_path, load_prompts
from propd.training.distill import generate_answers
from propd.training.features import cache_features, load_features
from propd.training.pipeline import TrainConfig, choose_early_layer, run_training
from propd.training.self_prompts import write_self_prompts
from propd.training.train import draft_unroll
from tests.conftest import tiny_hf_model


@pytest.fixture(scope="module")
def tiny_propd(default_model):
    return Propd(tiny_hf_model("llama", vocab=len(default_model.tokenizer)), default_model.tokenizer, name="tiny")


def test_train_pipeline_runs_and_heads_learn(tiny_propd, tmp_path):
    cfg = TrainConfig(prompts=str(builtin_prompts_path()), out=tmp_path, num_prompts=8, max_new_tokens=24, batch_size=4,
                      num_heads=2, early_layers=(1, 2), epochs=20, early_epochs=5, lr=1e-2, candidate_vocab=64)
    report = run_training(tiny_propd, cfg)
    first, last = report["medusa"]["loss_first_last"]
    assert last < 0.7 * first
    assert report["data"]["sequences"] == 8
    assert set(report["early"]) == {"1", "2"} and report["early_layer"] in (1, 2)
    heads = MedusaHeads.load(tmp_path / "heads")
    assert heads.num_heads == 2 and len(heads.meta["rank_probabilities"][0]) == 10
    assert heads.candidate_vocab is not None and len(heads.candidate_vocab) == 64 and heads.root_conditioned
    prompts = ["Say something.", "Count to three."]
    with_heads = tiny_propd.generate(prompts, tiny_propd.method("bpd", heads=heads), max_new_tokens=16, batch_size=2)
    assert [g.token_ids for g in with_heads] == [g.token_ids for g in tiny_propd.generate(prompts, "ar", max_new_tokens=16)]
    draft = tiny_propd.load_draft(tmp_path / "heads")
    assert len(report["draft"]["per_depth"]) == len(draft.meta["rank_probabilities"]) == 5
    drafted = tiny_propd.generate(prompts, tiny_propd.method("draft", "best8", heads=tmp_path / "heads"), max_new_tokens=16, batch_size=2)
    assert [g.token_ids for g in drafted] == [g.token_ids for g in with_heads]
    assert EarlyHead.load(tmp_path / "heads").layer == report["early_layer"]
    other = 3 - report["early_layer"]  # the other candidate layer's head, kept for --prune-layer
    assert tiny_propd.load_early_head(tmp_path / "heads", other).layer == other
    with pytest.raises(PropdError, match=r"no early head trained after layer 3 \(it has layers \[1, 2\]\)"):
        tiny_propd.load_early_head(tmp_path / "heads", 3)
    pruned = tiny_propd.generate(prompts, tiny_propd.method("propd", heads=tmp_path / "heads", prune=True, prune_layer=other), max_new_tokens=16, batch_size=2)
    assert [g.token_ids for g in pruned] == [g.token_ids for g in with_heads]
    assert "Early-pruning head" in (tmp_path / "heads" / "report.md").read_text()
    again = run_training(tiny_propd, cfg)  # resumes: no new answers, cached features
    assert again["data"] == report["data"]
    early_only = run_training(tiny_propd, TrainConfig(prompts=cfg.prompts, out=tmp_path / "early", num_prompts=4, max_new_tokens=16, batch_size=4,
                                                      early_layers=(2,), epochs=0, draft_epochs=0))
    assert "medusa" not in early_only and "draft" not in early_only and early_only["early_layer"] == 2
    assert sorted(p.name for p in (tmp_path / "early" / "heads").iterdir()) == ["early_head.json", "early_head.safetensors", "report.json", "report.md"]


def test_every_draft_weight_gets_a_gradient_on_a_cpu(tiny_propd):
    """Unrolled draft training runs the attention by tensor ops where autograd records: through
    the C kernel (no graph) the layer's q/k/v weights got no gradient and never trained."""
    torch.manual_seed(0)
    decoder = tiny_propd.decoder
    draft = DraftHead(decoder.args)
    with torch.no_grad():
        draft.w_down.normal_(0, 0.02)  # zero at the start of training: nothing before it would move here
    B, T, depth = 2, 6, 3
    features = torch.randn(B, T, decoder.args.dim)
    tokens = torch.randint(0, decoder.args.vocab_size, (B, T))
    targets = torch.randint(0, decoder.args.vocab_size, (B, T, depth))
    sum(p.square().sum() for p in draft_unroll(draft, decoder, features, tokens, targets)).backward()
    missing = [name for name, p in draft.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == [], missing


def test_heads_checkpoint_round_trip_and_fit_check(tmp_path):
    torch.manual_seed(0)
    heads = MedusaHeads(16, 40, 3, 2, shared_lm_head=True, meta={"base_model": "x"}, root_conditioned=True)
    for p in heads.parameters():
        torch.nn.init.normal_(p)
    heads.save(tmp_path)
    loaded = MedusaHeads.load(tmp_path)
    assert loaded.root_conditioned
    lm_head = torch.randn(40, 16)
    decoder = SimpleNamespace(vocab_rows=lambda tokens: lm_head, embed=torch.nn.Embedding(40, 16))
    x, roots = torch.randn(5, 16), torch.randint(0, 40, (5,))
    assert torch.equal(heads.logits(x, roots, decoder), loaded.logits(x, roots, decoder))
    assert not torch.equal(heads.logits(x, roots, decoder), heads.logits(x, (roots + 1) % 40, decoder))
    with pytest.raises(PropdError, match="hidden size 16"):
        loaded.check_fits(576, 49152)
    MedusaHeads(16, 40, 3, 2).save(tmp_path / "plain")
    (tmp_path / "plain" / "heads.json").write_text((tmp_path / "heads.json").read_text())  # claims a root projection it lacks
    with pytest.raises(PropdError, match="do not match"):
        MedusaHeads.load(tmp_path / "plain")


def test_medusa_format_checkpoint_loads(tmp_path):
    """Medusa-1 layout: config.json + medusa_lm_head.pt with per-head projections."""
    dim, vocab = 8, 30
    state = {}
    for h in range(2):
        state[f"{h}.0.linear.weight"] = torch.randn(dim, dim)
        state[f"{h}.0.linear.bias"] = torch.randn(dim)
        state[f"{h}.1.weight"] = torch.randn(vocab, dim)
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1, "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}))
    heads = MedusaHeads.load(tmp_path)
    assert not heads.shared_lm_head and heads.vocab_size == vocab
    x = torch.randn(3, dim)
    h1 = x + torch.nn.functional.silu(x @ state["1.0.linear.weight"].T + state["1.0.linear.bias"])
    assert torch.allclose(heads.logits(x, None, None)[:, 1], h1 @ state["1.1.weight"].T, atol=1e-5)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    MedusaHeads(8, 20, 1).save(tmp_path)
    (tmp_path / "heads.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PropdError, match="corrupt or unreadable"):
        MedusaHeads.load(tmp_path)
    with pytest.raises(PropdError, match="not found"):
        MedusaHeads.load(tmp_path / "missing")


def test_choose_early_layer_prefers_earliest_near_best():
    assert choose_early_layer({4: {"top10": 0.40}, 8: {"top10": 0.42}, 12: {"top10": 0.50}}) == 12
    assert choose_early_layer({4: {"top10": 0.48}, 8: {"top10": 0.49}, 12: {"top10": 0.50}}) == 4


def test_model_writes_its_own_prompts_and_resumes(default_model, tmp_path):
    path = tmp_path / "self.jsonl"
    write_self_prompts(default_model, path, 3, batch_size=4, max_tokens=64)
    first = load_prompts(path)
    assert [p.id for p in first] == ["self-0", "self-1", "self-2"]
    assert len({p.text for p in first}) == 3 and all(p.text.strip() for p in first)
    write_self_prompts(default_model, path, 5, batch_size=4, max_tokens=64)
    again = load_prompts(path)
    assert len(again) == 5 and again[:3] == first and len({p.text for p in again}) == 5


def test_openings_steer_the_self_prompts(default_model, tmp_path):
    openings = ["Write a Python function", "Extract"]
    write_self_prompts(default_model, tmp_path / "self.jsonl", 4, batch_size=4, max_tokens=96, openings=openings)
    prompts = load_prompts(tmp_path / "self.jsonl")
    assert len(prompts) == 4 and all(any(p.text.startswith(o + " ") for o in openings) for p in prompts)


def test_self_prompts_need_a_model_that_ends_its_messages(tiny_propd, tmp_path):
    with pytest.raises(PropdError, match="not seem to be a chat model"):
        write_self_prompts(tiny_propd, tmp_path / "self.jsonl", 2, batch_size=2, max_tokens=4)


def test_features_of_appended_answers_extend_the_cache(tiny_propd, tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = [{"id": str(i), "prompt_ids": torch.randint(1, 90, (3 + i,), generator=g).tolist(),
             "answer_ids": torch.randint(1, 90, (n,), generator=g).tolist()} for i, n in enumerate((6, 1, 9, 4, 7))]
    distill = tmp_path / "distill.jsonl"

    def features_of(n: int, out: str) -> dict[str, torch.Tensor]:
        distill.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
        return load_features(cache_features(tiny_propd.decoder, distill, tmp_path / out, [1]))

    features_of(3, "grown.safetensors")
    grown, scratch = features_of(5, "grown.safetensors"), features_of(5, "scratch.safetensors")
    assert grown.keys() == scratch.keys() and all(torch.equal(grown[k], scratch[k]) for k in grown)
    rows[0]["answer_ids"][0] += 1  # an earlier answer changed: nothing cached is reused
    changed = features_of(5, "grown.safetensors")
    assert torch.equal(changed["tokens"], torch.tensor([t for r in rows for t in r["prompt_ids"] + r["answer_ids"]]))
    assert not torch.equal(changed["final"], grown["final"])


def test_answers_to_several_prompt_files_share_one_distill_file(tiny_propd, tmp_path):
    own = tmp_path / "own.jsonl"
    own.write_text('{"id": "self-0", "prompt": "Name a river."}\n{"id": "self-1", "prompt": "Name a city."}\n')
    for _ in range(2):  # the second round finds every answer and generates none
        generate_answers(tiny_propd, builtin_prompts_path(), tmp_path, 3, 6, batch_size=2)
        distill = generate_answers(tiny_propd, own, tmp_path, 2, 6, batch_size=2)
        ids = [json.loads(line)["id"] for line in distill.read_text().splitlines()]
        assert len(ids) == 5 and sorted(ids[-2:]) == ["self-0", "self-1"]


def test_heads_are_loaded_once_per_file_and_again_once_it_is_written(tiny_propd, tmp_path):
    """A method made per call (``generate(prompts, "propd")``) takes the loaded draft, its packed
    copies with it; a file written anew is read anew."""
    import os

    draft = DraftHead(tiny_propd.decoder.args, {"base_model": "tiny"})
    draft.save(tmp_path)
    first = tiny_propd.load_draft(tmp_path)
    assert tiny_propd.load_draft(tmp_path) is first and tiny_propd.method("draft", "chain2", heads=tmp_path).draft is first
    with torch.no_grad():
        draft.wo.add_(0.5)
    draft.save(tmp_path)
    stat = (tmp_path / "draft.safetensors").stat()
    os.utime(tmp_path / "draft.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later write, whatever the clock's grain
    second = tiny_propd.load_draft(tmp_path)
    assert second is not first and torch.allclose(second.wo, draft.wo.half().float())

"""The CLI prints JSON results and turns bad input into one clear error line."""

import json
import subprocess
import sys

import pytest
import torch

from propd.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "propd.cli", *args], capture_output=True, text=True, timeout=600)


def test_generate_json_fields():
    r = run_cli("generate", "--json", "--max-new-tokens", "8", "Say hello.", "Count to three.")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"prompt", "text", "token_ids", "new_tokens", "steps", "seconds", "mean_accepted"} <= set(row)
        assert row["new_tokens"] == len(row["token_ids"]) <= 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "   "], "empty prompt"),
        (["generate", "--model", "/no/such/model", "hi"], "does not exist"),
        (["generate", "--prompts", "/no/such.jsonl"], "not found"),
        (["generate", "--device", "gpu0", "hi"], "unknown device"),
        (["generate", "--method", "lookup", "--tree", "best4", "hi"], "verifies a chain of guesses (--tree chainN)"),
    ],
)
def test_bad_input_gives_one_clear_error(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused(capsys):
    assert main(["generate", "--device", "cuda", "hi"]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_bad_prompts_file_and_unsupported_architecture(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\nnot json\n')
    assert main(["generate", "--prompts", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    model_dir = tmp_path / "gpt2ish"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["generate", "--model", str(model_dir), "hi"]) == 2
    assert "unsupported architecture 'gpt2'" in capsys.readouterr().err


def test_over_long_prompt_is_refused(default_model):
    from propd.errors import PropdError

    with pytest.raises(PropdError, match="exceeds the model's context"):
        default_model.generate(["word " * 9000], max_new_tokens=8)


def test_shipped_heads_decode_identically_to_ar_from_the_cli():
    outputs = {}
    for method in ("ar", "bpd", "medusa", "propd"):
        r = run_cli("generate", "--json", "--method", method, "--tree", "top8" if method == "medusa" else "chain4",
                    "--max-new-tokens", "24", "--batch-size", "2", "Name three fruits.", "What is 2+2?")
        assert r.returncode == 0, r.stderr
        outputs[method] = [json.loads(line) for line in r.stdout.splitlines()]
    r = run_cli("generate", "--json", "--continuous", "--method", "propd", "--max-new-tokens", "24", "--batch-size", "1", "Name three fruits.", "What is 2+2?")
    assert r.returncode == 0, r.stderr
    outputs["propd --continuous"] = [json.loads(line) for line in r.stdout.splitlines()]
    for method in ("bpd", "medusa", "propd", "propd --continuous"):
        assert [o["token_ids"] for o in outputs[method]] == [o["token_ids"] for o in outputs["ar"]]
        assert all(o["mean_accepted"] >= 1.0 for o in outputs[method])


def test_streamed_answers_end_their_lines():
    r = run_cli("generate", "--max-new-tokens", "6", "Say hello.", "Count to three.")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "### Say hello." and [line for line in lines if line.startswith("### ")] == ["### Say hello.", "### Count to three."]
    assert lines[lines.index("### Count to three.") - 1] != ""  # the first answer ended its own line, no blank line needed


def test_demo_latency_and_chat_commands(tmp_path):
    demo = run_cli("demo", "--method", "bpd", "--max-new-tokens", "12", "Name a colour.")
    assert demo.returncode == 0, demo.stderr
    assert "speed-up over ar" in demo.stdout and "identical output: yes" in demo.stdout
    lat = run_cli("latency", "--sizes", "1,2", "--out", str(tmp_path))
    assert lat.returncode == 0, lat.stderr
    record = json.loads((tmp_path / "latency.json").read_text())
    rows = record["steps"]
    assert [r["tree_tokens"] for r in rows] == [1, 2] and all(r["ms"] > 0 for r in rows)
    assert record["route"] in lat.stdout and record["weight_read_floor_ms"] > 0 and "floor" in lat.stdout
    assert (tmp_path / "latency.png").stat().st_size > 0
    too_long = "word " * 9000  # past the context: that message is refused, the chat goes on
    chat = subprocess.run([sys.executable, "-m", "propd.cli", "chat", "--max-new-tokens", "8"], input=f"Hello!\n{too_long}\nName a colour.\n\n",
                          capture_output=True, text=True, timeout=600)
    assert chat.returncode == 0, chat.stderr
    assert "exceeds the model's context" in chat.stderr and "Traceback" not in chat.stderr
    answers = [a.strip() for a in chat.stdout.split(">")[1:] if a.strip()]
    assert len(answers) == 2, chat.stdout  # the first message's answer and the third's


def test_prompts_per_category_samples_every_category(tmp_path):
    from propd.prompts import load_prompts

    path = tmp_path / "q.jsonl"
    rows = [{"question_id": i, "category": c, "turns": [f"question {i}"]} for i, c in enumerate("aaabbbccc")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.id for p in load_prompts(path, per_category=2)] == ["0", "1", "3", "4", "6", "7"]
    assert [p.id for p in load_prompts(path, per_category=1, limit=2)] == ["0", "3"]
    assert len(load_prompts(path, limit=4)) == 4

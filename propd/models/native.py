"""propd's C kernels (``csrc``): attention, a layer's per-token steps, bf16 products (AMX or
AVX512-BF16) and whole runs of layers on them, exact by construction.

Built once per machine with the system's C compiler into ``$PROPD_CACHE/kernels`` (keyed by the
sources, the compiler, the flags and the CPU), loaded with ctypes. Without a compiler (a warning
says so), with ``PROPD_KERNELS=torch``, or on a GPU, the tensor versions run: slower, and exact
where this machine's batched products are (``attention.blocked_is_exact`` checks).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import subprocess
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

SOURCES = (
    "attention.c", "attention_amx.c", "pointwise.c", "matmul.c", "matmul_q4.c", "screen.c", "layer.c", "pool.c", "pool.h",
    "tiles.h", "vec.h",
)
ENV = "PROPD_KERNELS"
PARALLEL_WORK = 1 << 12  # elements (attention: query heads x keys) above which a call shares its tasks between threads


def build_id() -> str | None:
    """Which build of the C kernels runs (its file's name: a hash of the sources, compiler, flags and
    CPU), or None: what is measured on them (the route's choice, ProPD's step costs) is kept per build."""
    lib = native_kernel()
    return None if lib is None else Path(lib._name).stem


@functools.cache
def native_kernel() -> ctypes.CDLL | None:
    """The C kernels, or None where they do not run."""
    if os.environ.get(ENV, "c") == "torch":
        return None
    from propd.models.loading import cache_file

    csrc = Path(__file__).parent / "csrc"
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared"]
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        key = "\n".join([*(csrc.joinpath(name).read_text() for name in SOURCES), version, " ".join(flags), platform.machine(), _cpu_flags()])
        lib = cache_file("kernels", key, ".so")
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            sources = [str(csrc / name) for name in SOURCES if name.endswith(".c")]
            subprocess.run([compiler, *flags, "-o", str(tmp), *sources, "-lm", "-lpthread"], capture_output=True, text=True, check=True)
            tmp.replace(lib)
        kernel = ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr if isinstance(e, subprocess.CalledProcessError) else e
        warnings.warn(f"propd: no C kernels ({detail}); using the slower tensor versions", stacklevel=2)
        return None
    kernel.attend.restype = ctypes.c_int
    attend = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 9 + [ctypes.c_float, ctypes.c_int64, ctypes.c_int64]
    kernel.attend.argtypes = attend + [ctypes.c_int64]  # and whether the entries are bf16
    kernel.attend_amx.restype = ctypes.c_int
    kernel.attend_amx.argtypes = attend + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    kernel.rms_norm.restype = None
    kernel.rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float]
    kernel.rope.restype = None
    kernel.rope.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4
    kernel.silu_mul.restype = None
    kernel.silu_mul.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    kernel.amx_ready.restype = ctypes.c_int
    kernel.bf16_dot_attention.restype = ctypes.c_int
    kernel.amx_ready.argtypes = []
    kernel.bf16_products.restype = ctypes.c_int
    kernel.bf16_products.argtypes = []
    kernel.bf16_linear.restype = ctypes.c_int
    kernel.bf16_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5  # ..., threads, kernel (1 AMX tiles, 2 AVX512-BF16)
    kernel.q4_products.restype = ctypes.c_int
    kernel.q4_products.argtypes = []
    kernel.q4_linear.restype = ctypes.c_int
    kernel.q4_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
    kernel.q4_fetch_from.restype = None
    kernel.q4_fetch_from.argtypes = [ctypes.c_int64]
    kernel.q4i8_linear.restype = ctypes.c_int
    kernel.q4i8_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
    kernel.bf16_argmax.restype = ctypes.c_int
    kernel.bf16_argmax.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5
    kernel.bf16_argmax_screened.restype = ctypes.c_int
    kernel.bf16_argmax_screened.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6
    kernel.bf16_screen_ready.restype = ctypes.c_int
    kernel.bf16_screen_ready.argtypes = []
    kernel.bf16_topk.restype = ctypes.c_int
    kernel.bf16_topk.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    kernel.rows_topk.restype = ctypes.c_int
    kernel.rows_topk.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_int64]
    kernel.forward_layers.restype = ctypes.c_int
    kernel.forward_layers.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    return kernel


_kernel_threads: int | None = None  # set while ``own_cores`` holds torch to one thread


def kernel_threads() -> int:
    """Threads our kernels may use: torch's, or what torch had before ``own_cores``."""
    return _kernel_threads or torch.get_num_threads()


def threads(elements: int) -> int:
    """Threads for a call over this many elements: ``kernel_threads`` above ``PARALLEL_WORK``, else one."""
    return kernel_threads() if elements >= PARALLEL_WORK else 1


@contextmanager
def own_cores():
    """torch's ops on one thread and our kernels on all of torch's threads, for a while. Where our
    kernels do the heavy work, torch's remaining ops are small; its OpenMP threads spin after
    each parallel region and then hold the cores our kernels' workers wait for."""
    global _kernel_threads
    if _kernel_threads is not None:
        yield
        return
    _kernel_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(_kernel_threads)
        _kernel_threads = None


def usable(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels, if they can take these tensors: on the CPU, and with no gradient to record."""
    if any(t.device.type != "cpu" or (t.requires_grad and torch.is_grad_enabled()) for t in tensors):
        return None
    return native_kernel()


def _cpu_flags() -> str:
    """-march=native builds for this CPU: a cached build is keyed by its model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))

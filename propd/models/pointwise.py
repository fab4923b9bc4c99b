"""A layer's per-token steps (RMSNorm, RoPE, SiLU-gated product input) by the C kernels where they
run (``native``), else by torch ops on one thread where their rounding would depend on the split
(``serial``). Either way a token's result never depends on the tokens beside it."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from propd.models import native
from propd.models.kernels import serial


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of fp32 x [..., dim] with weight [dim]."""
    lib = native.usable(x, weight)
    if lib is None or x.dtype != torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x = x.contiguous()
    weight = weight if weight.dtype == torch.float32 and weight.is_contiguous() else weight.float().contiguous()  # (as a no-op tensor op, 10 us of a step)
    out = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], ctypes.c_float(eps))
    return out


def rotate(h: torch.Tensor, rope: torch.Tensor, heads: int, head_dim: int, exact: bool) -> torch.Tensor:
    """h [B, T, n * head_dim] (fp32, one token's heads side by side, q then k then v) with RoPE on its
    first ``heads`` heads: rope [B, T, head_dim / 2] complex. Returns [B, T, n, head_dim] (h itself,
    rotated in place, where the C kernel runs)."""
    B, T, _ = h.shape
    lib = native.usable(h)
    if lib is not None and h.is_contiguous() and h.dtype == torch.float32:
        cs = torch.view_as_real(rope).contiguous()
        lib.rope(h.data_ptr(), cs.data_ptr(), B * T, heads, h.shape[-1], head_dim)
        return h.view(B, T, -1, head_dim)
    all_heads = h.view(B, T, -1, head_dim)
    with serial(exact):
        turned = torch.view_as_real(torch.view_as_complex(all_heads[:, :, :heads].unflatten(-1, (-1, 2))) * rope.unsqueeze(2)).flatten(-2)
    return torch.cat([turned, all_heads[:, :, heads:]], dim=2)


def silu_mul(gate_up: torch.Tensor, exact: bool) -> torch.Tensor:
    """silu(gate) * up from gate_up [..., 2 inter] = gate | up, in its dtype (fp32 or bf16)."""
    inter = gate_up.shape[-1] // 2
    lib = native.usable(gate_up)
    if lib is not None and gate_up.dtype in (torch.float32, torch.bfloat16):
        gate_up = gate_up.contiguous()
        out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype)
        rows = gate_up.numel() // gate_up.shape[-1]
        lib.silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, inter, int(gate_up.dtype == torch.bfloat16))
        return out
    with serial(exact):
        act = F.silu(gate_up[..., :inter])
    return act * gate_up[..., inter:]

"""grouped_mm: PyTorch's own grouped GEMM, torch._grouped_mm (where the build and GPU have it).

One launch per projection over all experts, reading each expert's rows through offsets, with no
padding: the bar the Triton kernel has to beat. It is a private PyTorch API, so availability is
probed, and a backend that cannot run is reported as unavailable with the reason, never replaced.
"""

from __future__ import annotations

import functools

import torch

from ..reference import swiglu
from ..routing import RoutingPlan
from ..weights import ExpertWeights
from .base import check_inputs, combine, combine_bytes


@torch.no_grad()
def grouped_mm_forward(x: torch.Tensor, weights: ExpertWeights, plan: RoutingPlan) -> torch.Tensor:
    check_inputs(x, weights, plan)
    x_sorted = x[plan.sorted_token_ids.long()]  # [T*k, H], rows grouped by expert
    ends = plan.expert_offsets[1:]  # group g owns rows [ends[g-1], ends[g])
    h = torch._grouped_mm(x_sorted, weights.w13.transpose(1, 2), offs=ends)  # [T*k, 2F]
    out_sorted = torch._grouped_mm(swiglu(h), weights.w2.transpose(1, 2), offs=ends)  # [T*k, H]
    return combine(out_sorted, plan, x.dtype)


@functools.cache
def _probe(device_str: str) -> str | None:
    """Run a tiny grouped GEMM on the device; return the error text if it fails."""
    device = torch.device(device_str)
    try:
        a = torch.randn(16, 32, device=device, dtype=torch.bfloat16)
        b = torch.randn(2, 32, 16, device=device, dtype=torch.bfloat16)
        offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
        out = torch._grouped_mm(a, b, offs=offs)
        if not torch.allclose(out[:8].float(), (a[:8] @ b[0]).float(), rtol=2e-2, atol=2e-2):
            return "torch._grouped_mm ran but gave wrong results in a probe"
    except Exception as exc:  # the reason is reported, not hidden
        return f"torch._grouped_mm failed on {device}: {str(exc).splitlines()[0]}"
    return None


def grouped_mm_unavailable(cfg, device) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"this PyTorch ({torch.__version__}) has no torch._grouped_mm"
    if cfg.H % 8 or cfg.F % 8:
        return f"torch._grouped_mm needs H and F to be multiples of 8 (16-byte rows); got H={cfg.H}, F={cfg.F}"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _probe(str(device))


def grouped_mm_extra_bytes(cfg, T, stats) -> int:
    rows = T * cfg.top_k
    return rows * (cfg.H + 2 * cfg.F + cfg.F + cfg.H) * 2 + combine_bytes(cfg, T)

"""triton: the fused Triton grouped GEMM (moe_tut.kernels.grouped_gemm.moe_forward_triton).

One persistent launch per GEMM over all experts' tiles, L2-aware tile order, token gather fused into
GEMM1's A load, SwiGLU into its epilogue, routing weight and slot scatter into GEMM2's; then a sum
over k. No host sync, so it is graph-safe. On a CPU-only machine it runs under Triton's interpreter
(correctness only). If triton cannot be imported the row is still listed, as unavailable, with why.
"""

from __future__ import annotations

import torch

from ..env import interpreting
from .base import Backend, BackendUnavailable

try:
    from ..kernels.grouped_gemm import VERSIONS, fast_path_extra_bytes, moe_forward_triton, unfused_extra_bytes
    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # triton (or numpy, which its interpreter needs) is missing
    _IMPORT_ERROR = f"triton cannot be imported ({exc}); pip install 'triton>=3.6' numpy"

    def moe_forward_triton(x, weights, plan):
        raise BackendUnavailable(f"backend 'triton' is unavailable: {_IMPORT_ERROR}")

    def fast_path_extra_bytes(T, top_k, H, F, elem_bytes=2):
        rows = T * top_k
        return rows * F * elem_bytes + (rows * H * elem_bytes if top_k > 1 else 0)

    unfused_extra_bytes = fast_path_extra_bytes
    VERSIONS = {}


def triton_unavailable(cfg, device) -> str | None:
    return _IMPORT_ERROR or triton_device_problem(device)


def triton_device_problem(device) -> str | None:
    """Why Triton kernels cannot run on `device` (shared by every Triton backend), or None."""
    device = torch.device(device)
    if device.type == "cpu" and not interpreting():
        return ("Triton kernels on the CPU need its interpreter: TRITON_INTERPRET=1 set before moe_tut is "
                "imported (`import moe_tut` sets it on machines without CUDA)")
    if device.type not in ("cpu", "cuda"):
        return f"the Triton kernels are written and tested for CUDA GPUs, not {device.type}"
    return None


def triton_extra_bytes(cfg, T, stats) -> int:
    return fast_path_extra_bytes(T, cfg.top_k, cfg.H, cfg.F)


def _register() -> None:
    from . import register

    register(Backend("triton", moe_forward_triton,
                     "Triton: persistent grouped GEMM, fused gather, SwiGLU and weighted scatter",
                     extra_bytes=triton_extra_bytes, unavailable=triton_unavailable, graph_safe=True))
    # The numbered versions as rows of their own (not run by default), so the harness times them
    # side by side exactly like every other backend: `--backends triton_v1,triton_v2,triton_v3,triton_v4,triton`.
    for version in ("v1", "v2", "v3", "v4"):
        forward = VERSIONS.get(version)
        if forward is None:
            continue
        register(Backend(f"triton_{version}", forward, f"Triton grouped GEMM {version} (unfused SwiGLU/combine)",
                         extra_bytes=lambda cfg, T, stats: unfused_extra_bytes(T, cfg.top_k, cfg.H, cfg.F),
                         unavailable=triton_unavailable, graph_safe=True, tags=("triton-version",)))


_register()

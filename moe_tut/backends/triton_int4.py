"""triton_int4: the Triton W4A16 MoE forward (moe_tut.kernels.int4_gemm.moe_forward_triton_int4).

The bf16 `triton` row's kernel structure (persistent grouped GEMM, fused gather, SwiGLU epilogue,
routing weight and slot scatter, sum over k) with INT4 weights (moe_tut.quant, group 128 symmetric by
default) dequantised in registers right before each tensor-core dot; a decode regime for few rows
per expert. No host sync, so it is graph-safe. On a CPU-only machine it runs under Triton's
interpreter (correctness only). If triton cannot be imported the row is still listed, as unavailable.
"""

from __future__ import annotations

import torch

from ..quant import DEFAULT_GROUP_SIZE, Int4ExpertWeights, int4_moe_reference
from .base import Backend, BackendUnavailable
from .triton_backend import fast_path_extra_bytes, triton_device_problem

try:
    from ..kernels.int4_gemm import check_group_size, int4_extra_bytes, moe_forward_triton_int4
    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # triton (or numpy, which its interpreter needs) is missing
    _IMPORT_ERROR = f"triton cannot be imported ({exc}); pip install 'triton>=3.6' numpy"

    def moe_forward_triton_int4(x, weights, plan):
        raise BackendUnavailable(f"backend 'triton_int4' is unavailable: {_IMPORT_ERROR}")

    int4_extra_bytes = fast_path_extra_bytes  # the same temporaries as the bf16 fast path

    def check_group_size(group_size, name="weights"):
        return None


def triton_int4_unavailable(cfg, device) -> str | None:
    problem = _IMPORT_ERROR or triton_device_problem(device)
    if problem:
        return problem
    device = torch.device(device)
    if cfg.H % DEFAULT_GROUP_SIZE or cfg.F % DEFAULT_GROUP_SIZE:
        return (f"prepare() quantises with group size {DEFAULT_GROUP_SIZE}, which must divide H and F; got "
                f"H={cfg.H}, F={cfg.F} (call moe_forward_triton_int4 with Int4ExpertWeights of another group "
                "size)")
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        if major < 8:
            return (f"needs compute capability 8.0 or newer (bf16 tensor cores); "
                    f"{torch.cuda.get_device_name(index)} is {major}.{minor}")
    return None


def triton_int4_extra_bytes(cfg, T, stats) -> int:
    return int4_extra_bytes(T, cfg.top_k, cfg.H, cfg.F)


def prepare(weights, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = True) -> Int4ExpertWeights:
    """bf16 ExpertWeights -> Int4ExpertWeights (quantised on their device), with the kernel's group check first."""
    check_group_size(group_size)
    return Int4ExpertWeights.from_bf16(weights, group_size, symmetric)


def _register() -> None:
    from . import list_backends, register

    if "triton_int4" in list_backends():
        return
    register(Backend("triton_int4", moe_forward_triton_int4,
                     "Triton W4A16: the fused grouped GEMM with INT4 weights dequantised in registers",
                     extra_bytes=triton_int4_extra_bytes, unavailable=triton_int4_unavailable,
                     prepare=prepare, dequantized=lambda q: q.dequantize(), reference=int4_moe_reference,
                     graph_safe=True, weight_format="int4"))


_register()

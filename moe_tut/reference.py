"""The float32 ground truth every backend is tested against.

    y[t] = sum over t's top-k experts e (weight g):  g * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t]))

Computed straight from topk_ids (not from a RoutingPlan, so it also checks the plan), one expert at a
time in float32, so only one expert's weights are ever upcast (glm5's weights in float32 would be 108 GB).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .weights import ExpertWeights


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """[n, 2F] (gate | up) -> silu(gate) * up, [n, F]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def expert_ffn_fp32(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert on rows x [n, H] in float32: W2 @ swiglu(W13 @ x)."""
    h = x.float() @ w13.float().t()
    return swiglu(h) @ w2.float().t()


@torch.no_grad()
def moe_reference(x: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> torch.Tensor:
    """y [T, H] in float32."""
    T, H = x.shape
    y = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    # float32 matmuls must be true float32 here, not TF32, or the ground truth is no better than bf16.
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for e in torch.unique(topk_ids).tolist():
            tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
            out = expert_ffn_fp32(x[tok], weights.w13[e], weights.w2[e])
            y.index_add_(0, tok, out * topk_weights[tok, slot].float()[:, None])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return y


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F, in float64 (NaN if out has NaN/Inf)."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("nan")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff

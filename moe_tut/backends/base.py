"""What every backend shares: the call shape, input checks, the weighted combine, the registry entry.

A backend's forward is  forward(x [T, H], weights, plan) -> y [T, H]. The plan is built once per
routing (RoutingPlan.build) and shared, so every backend does identical work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..presets import MoEConfig
from ..routing import RoutingPlan, RoutingStats
from ..weights import ExpertWeights

Forward = Callable[[torch.Tensor, object, RoutingPlan], torch.Tensor]

BF16_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message says why."""


def check_inputs(x: torch.Tensor, weights: ExpertWeights, plan: RoutingPlan) -> None:
    """Clear errors for inputs that do not fit together, before any kernel runs."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [T, H], got {getattr(x, 'shape', type(x))}")
    T, H = x.shape
    if H != weights.hidden_size:
        raise ValueError(f"x has hidden size {H} but the expert weights expect H={weights.hidden_size}")
    if plan.num_tokens != T:
        raise ValueError(f"x has T={T} tokens but the routing plan was built for {plan.num_tokens}")
    if plan.num_experts != weights.num_experts:
        raise ValueError(f"the routing plan has E={plan.num_experts} experts but the weights have "
                         f"{weights.num_experts}")
    if x.device != weights.device or plan.device != x.device:
        raise ValueError(f"x ({x.device}), weights ({weights.device}) and the routing plan ({plan.device}) "
                         "must be on the same device")
    if x.dtype != weights.dtype:
        raise TypeError(f"x is {x.dtype} but the expert weights are {weights.dtype}; cast one to match")


def combine(out_sorted: torch.Tensor, plan: RoutingPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """Rows in expert order [T*k, H] -> y [T, H] = sum_j topk_weights[t, j] * row of slot (t, j).

    The sum runs in float32; this is the [T, k, H] round trip the fused Triton kernel avoids.
    """
    T, k = plan.num_tokens, plan.top_k
    per_slot = out_sorted[plan.slot_to_sorted.long()].view(T, k, out_sorted.shape[-1]).float()
    return (per_slot * plan.topk_weights.float()[:, :, None]).sum(dim=1).to(out_dtype)


def combine_bytes(cfg: MoEConfig, T: int, out_elem: int = 2) -> int:
    """Temporary bytes of `combine`: the gathered [T, k, H] rows, their float32 copy and product, y."""
    return T * cfg.top_k * cfg.H * (out_elem + 4 + 4) + T * cfg.H * 4


@dataclass
class Backend:
    """One row of the results table.

    forward            the MoE forward (x, weights, plan) -> y
    unavailable        (cfg, device) -> None if it can run, else the reason it cannot
    extra_bytes        (cfg, T, stats) -> estimated temporary bytes beyond weights, x and y
    prepare            ExpertWeights (bf16) -> the weights object this backend takes (INT4 packs here)
    dequantized        prepared weights -> ExpertWeights holding exactly the values the backend
                       computes with (INT4: the dequantised weights), for the tight correctness check;
                       None when prepare() does not change the values
    reference          (x, prepared, topk_ids, topk_weights) -> float32 y computed from the prepared
                       weights expert by expert; the harness uses it instead of `dequantized` where
                       set, so the tight check needs no dequantised copy of every expert (glm5: 54 GB)
    graph_safe         no host sync inside forward, so small-T timing can use CUDA-graph replay
    """

    name: str
    forward: Forward
    description: str
    extra_bytes: Callable[[MoEConfig, int, RoutingStats], int]
    unavailable: Callable[[MoEConfig, torch.device], str | None] = lambda cfg, device: None
    prepare: Callable[[ExpertWeights], object] = lambda w: w
    dequantized: Callable[[object], ExpertWeights] | None = None
    reference: Callable[[torch.Tensor, object, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    graph_safe: bool = True
    weight_format: str = "bf16"
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __call__(self, x: torch.Tensor, weights, plan: RoutingPlan) -> torch.Tensor:
        return self.forward(x, weights, plan)

    def check_available(self, cfg: MoEConfig, device: torch.device) -> None:
        reason = self.unavailable(cfg, torch.device(device))
        if reason:
            raise BackendUnavailable(f"backend {self.name!r} is unavailable: {reason}")

"""reference: the float32 ground truth (moe_tut.reference) as a backend row. Returns float32 y."""

from __future__ import annotations

import torch

from ..reference import moe_reference
from ..routing import RoutingPlan
from ..weights import ExpertWeights
from .base import check_inputs


def reference_forward(x: torch.Tensor, weights: ExpertWeights, plan: RoutingPlan) -> torch.Tensor:
    check_inputs(x, weights, plan)
    return moe_reference(x, weights, plan.topk_ids, plan.topk_weights)


def reference_extra_bytes(cfg, T, stats) -> int:
    # one expert's weights in float32, its rows' intermediates in float32, and y in float32
    return cfg.params_per_expert * 4 + stats.max_load * (2 * cfg.H + 3 * cfg.F) * 4 + T * cfg.H * 4

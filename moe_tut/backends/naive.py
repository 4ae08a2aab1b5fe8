"""naive: one GEMM pair per expert in a Python loop.

The ground truth for speed comparisons, and the lesson: E launches of each GEMM (plus gathers),
a host sync to learn each expert's row count, and at small T each launch has too few rows to fill
the GPU's SMs.
"""

from __future__ import annotations

import torch

from ..reference import swiglu
from ..routing import RoutingPlan
from ..weights import ExpertWeights
from .base import check_inputs, combine


@torch.no_grad()
def naive_forward(x: torch.Tensor, weights: ExpertWeights, plan: RoutingPlan) -> torch.Tensor:
    check_inputs(x, weights, plan)
    out_sorted = x.new_empty(plan.num_rows, weights.hidden_size)
    start = 0
    for e, n in enumerate(plan.counts_host()):  # host sync: the loop needs every expert's count
        if n == 0:
            continue
        rows = slice(start, start + n)
        x_e = x[plan.sorted_token_ids[rows].long()]  # gather this expert's tokens [n, H]
        out_sorted[rows] = swiglu(x_e @ weights.w13[e].t()) @ weights.w2[e].t()
        start += n
    return combine(out_sorted, plan, x.dtype)


def naive_extra_bytes(cfg, T, stats) -> int:
    from .base import combine_bytes

    rows = T * cfg.top_k
    busiest = stats.max_load
    return rows * cfg.H * 2 + busiest * (cfg.H + 2 * cfg.F + cfg.F + cfg.H) * 2 + combine_bytes(cfg, T)

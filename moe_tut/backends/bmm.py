"""bmm: pad every expert to the busiest one and run one batched GEMM per projection.

Two launches instead of 2E, but E * max_load rows are computed where T * k are needed: with
skewed routing most of the work is padding (RoutingStats.wasted_fraction says how much), and the
padded buffers cost memory too.
"""

from __future__ import annotations

import torch

from ..reference import swiglu
from ..routing import RoutingPlan
from ..weights import ExpertWeights
from .base import check_inputs, combine, combine_bytes


@torch.no_grad()
def bmm_forward(x: torch.Tensor, weights: ExpertWeights, plan: RoutingPlan) -> torch.Tensor:
    check_inputs(x, weights, plan)
    E, H = weights.num_experts, weights.hidden_size
    counts = plan.expert_counts
    max_load = int(counts.max())  # host sync: the padded size must be known to allocate
    # Sorted row r belongs to expert row_expert[r], at position r - offsets[e] inside it.
    row_expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts.long(),
                                         output_size=plan.num_rows)
    pos = torch.arange(plan.num_rows, device=x.device) - plan.expert_offsets[row_expert].long()
    x_padded = x.new_zeros(E, max_load, H)
    x_padded[row_expert, pos] = x[plan.sorted_token_ids.long()]
    h = torch.bmm(x_padded, weights.w13.transpose(1, 2))  # [E, max_load, 2F]
    out_padded = torch.bmm(swiglu(h), weights.w2.transpose(1, 2))  # [E, max_load, H]
    return combine(out_padded[row_expert, pos], plan, x.dtype)


def bmm_extra_bytes(cfg, T, stats) -> int:
    padded = cfg.E * stats.max_load
    return padded * (cfg.H + 2 * cfg.F + cfg.F + cfg.H) * 2 + T * cfg.top_k * cfg.H * 2 + combine_bytes(cfg, T)

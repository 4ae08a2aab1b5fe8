"""Routing: which experts each token goes to (simulated), its statistics, and the RoutingPlan.

Simulation. A real router computes logits = x @ W_router and keeps each token's top-k experts.
We draw the logits instead, with a per-expert bias that sets how uneven the load is:

    uniform      no bias: every expert equally likely (load still fluctuates, as in real routing)
    zipf[:a]     bias = -a * log(rank): expert popularity falls off like a Zipf law (default a = 1.2)
    hot          expert 0 gets a large bias: most tokens pick it as one of their k
    all_to_one   every token's first choice is expert 0 (with top_k = 1, all tokens go to it)

Routing weights are the softmax over each token's top-k logits (Mixtral's convention).

RoutingPlan. Computed once per routing and shared by all backends: token slots sorted by expert,
per-expert counts and offsets, the inverse permutation, and (per block size) a block -> expert map.
Everything stays on the device with no host sync, so a forward that builds a plan can be captured in
a CUDA graph. A deferred plan (build(defer=True)) sorts on first read, so one token's forward, which reads
only the router's top-k, sorts nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .env import interpreting

SKEWS = ("uniform", "zipf", "hot", "all_to_one")
DEFAULT_ZIPF_ALPHA = 1.2
HOT_BIAS = 3.0  # logits are N(0, 1): +3 puts expert 0 in almost every token's top-k


def parse_skew(skew: str) -> tuple[str, float]:
    """'zipf:1.5' -> ('zipf', 1.5); other names take no parameter."""
    name, _, param = skew.partition(":")
    if name not in SKEWS:
        raise ValueError(f"unknown skew {skew!r}; valid: {', '.join(SKEWS)} (zipf takes an exponent, e.g. zipf:1.5)")
    if name != "zipf" and param:
        raise ValueError(f"skew {name!r} takes no parameter (got {skew!r})")
    alpha = float(param) if param else DEFAULT_ZIPF_ALPHA
    if name == "zipf" and alpha < 0:
        raise ValueError(f"zipf exponent must be >= 0, got {alpha}")
    return name, alpha


def expert_bias(num_experts: int, skew: str) -> torch.Tensor:
    """Per-expert logit bias [E] (float32) for a skew scenario."""
    name, alpha = parse_skew(skew)
    bias = torch.zeros(num_experts)
    if name == "zipf":
        bias = -alpha * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))
    elif name == "hot":
        bias[0] = HOT_BIAS
    elif name == "all_to_one":
        bias[0] = 1e4
    return bias


def simulate_routing(num_tokens: int, num_experts: int, top_k: int, skew: str = "uniform",
                     seed: int = 0, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of `num_tokens` tokens: returns topk_ids [T, k] (int64) and topk_weights [T, k] (float32).

    Seeded and reproducible: the logits are drawn on the CPU, so the same seed gives the same
    routing on every device.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if num_experts < 1 or top_k < 1:
        raise ValueError(f"num_experts and top_k must be >= 1, got E={num_experts}, top_k={top_k}")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is larger than the number of experts E={num_experts}")
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen) + expert_bias(num_experts, skew)
    top_logits, topk_ids = torch.topk(logits, top_k, dim=1)
    topk_weights = torch.softmax(top_logits, dim=1)
    return topk_ids.to(device), topk_weights.to(device)


def check_routing_tensors(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """Clear errors for a routing that is not [T, k] integer ids with [T, k] float weights on one device."""
    if topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids and topk_weights must both be [T, k]; got {tuple(topk_ids.shape)} "
                         f"and {tuple(topk_weights.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_weights must be a floating-point tensor, got {topk_weights.dtype}")
    if topk_ids.device != topk_weights.device:
        raise ValueError(f"topk_ids is on {topk_ids.device} but topk_weights on {topk_weights.device}")


@dataclass(frozen=True)
class RoutingStats:
    tokens_per_expert: list[int]
    num_tokens: int
    top_k: int

    @classmethod
    def from_ids(cls, topk_ids: torch.Tensor, num_experts: int) -> RoutingStats:
        counts = torch.bincount(topk_ids.flatten().cpu(), minlength=num_experts)
        return cls(counts.tolist(), topk_ids.shape[0], topk_ids.shape[1])

    @property
    def num_experts(self) -> int:
        return len(self.tokens_per_expert)

    @property
    def rows(self) -> int:
        """Routed rows = T * k: the rows the expert GEMMs really need."""
        return self.num_tokens * self.top_k

    @property
    def max_load(self) -> int:
        return max(self.tokens_per_expert)

    @property
    def mean_load(self) -> float:
        return self.rows / self.num_experts

    @property
    def imbalance(self) -> float:
        """max / mean tokens per expert (1.0 = perfectly balanced)."""
        return self.max_load / self.mean_load

    @property
    def active_experts(self) -> int:
        return sum(c > 0 for c in self.tokens_per_expert)

    @property
    def empty_experts(self) -> int:
        return self.num_experts - self.active_experts

    @property
    def padded_rows(self) -> int:
        """Rows computed when every expert is padded to the busiest one (what torch.bmm does)."""
        return self.num_experts * self.max_load

    @property
    def wasted_rows(self) -> int:
        return self.padded_rows - self.rows

    @property
    def wasted_fraction(self) -> float:
        """Share of the padded GEMM's work that is padding."""
        return self.wasted_rows / self.padded_rows if self.padded_rows else 0.0

    def as_dict(self) -> dict:
        return dict(num_tokens=self.num_tokens, top_k=self.top_k, num_experts=self.num_experts,
                    max_load=self.max_load, mean_load=self.mean_load, imbalance=self.imbalance,
                    active_experts=self.active_experts, empty_experts=self.empty_experts,
                    padded_rows=self.padded_rows, wasted_rows=self.wasted_rows,
                    wasted_fraction=self.wasted_fraction)


@dataclass(frozen=True)
class BlockMap:
    """Blocks of `block_m` rows, each within one expert, for grouped kernels.

    block_expert[b] is the expert of block b (-1 past the last used block); block_row_start[b] is its
    first row in the sorted order; its rows end at min(start + block_m, expert_offsets[e + 1]).
    max_blocks is a host-side upper bound (ceil(T*k / block_m) + E), so no host sync is needed.
    """

    block_m: int
    block_expert: torch.Tensor  # [max_blocks] int32
    block_row_start: torch.Tensor  # [max_blocks] int32
    num_blocks: torch.Tensor  # [] int32, on the device
    max_blocks: int


PLAN_METHODS = ("auto", "torch", "kernel")


@functools.cache
def _plan_kernel_module():
    """moe_tut.kernels.plan, imported on first use (it defines a Triton kernel at import), or None
    where Triton is not importable."""
    try:
        from .kernels import plan
    except ImportError:
        return None
    return plan


def _auto_method(topk_ids: torch.Tensor, num_experts: int) -> str:
    # The kernel only pays off as a real GPU launch; under the interpreter (even with CUDA tensors)
    # it is slower than the torch ops.
    if topk_ids.device.type != "cuda" or interpreting():
        return "torch"
    plan_kernel = _plan_kernel_module()
    if plan_kernel is None or not plan_kernel.auto_eligible(topk_ids.numel(), num_experts):
        return "torch"
    return "kernel"


def _build_torch(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    """The plan tensors from torch ops (any size, any device): the reference for the kernel path."""
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    sorted_slots = torch.sort(flat, stable=True).indices
    # scatter_add, not bincount: bincount on CUDA syncs with the host to size its output.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int64))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    slot_to_sorted = torch.empty_like(sorted_slots)
    slot_to_sorted[sorted_slots] = torch.arange(T * k, device=flat.device)
    return dict(
        sorted_slots=sorted_slots.to(torch.int32),
        sorted_token_ids=(sorted_slots // k).to(torch.int32),
        sorted_weights=topk_weights.reshape(-1)[sorted_slots].to(torch.float32),
        slot_to_sorted=slot_to_sorted.to(torch.int32),
        expert_counts=counts.to(torch.int32),
        expert_offsets=offsets.to(torch.int32),
    )


@dataclass(frozen=True)
class RoutingPlan:
    """Token slots grouped by expert. A slot s = t * k + j is token t's j-th expert choice.

    sorted_slots [T*k]       slots in expert order (stable: within an expert, token order)
    sorted_token_ids [T*k]   token of each sorted slot (= sorted_slots // k): the gather index for x
    sorted_weights [T*k]     routing weight of each sorted slot (float32)
    slot_to_sorted [T*k]     inverse permutation: position of slot s in the sorted order
    expert_counts [E]        rows per expert
    expert_offsets [E+1]     expert e owns sorted rows [offsets[e], offsets[e+1]); offsets[E] = T*k
    All index tensors are int32, on the device of topk_ids. With build(defer=True) they are computed on first
    use (`is_built` says whether that has happened), so a backend that works from topk_ids alone never pays
    for them.
    """

    num_tokens: int
    top_k: int
    num_experts: int
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    method: str  # "torch" or "kernel": how the sorted tensors are (or will be) built
    _tensors: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
              validate: bool = True, *, method: str = "auto", defer: bool = False) -> RoutingPlan:
        """Group token slots by expert. `validate` checks ids are in range (a host sync: off when timing).
        Without it an id outside [0, E) is sorted after every expert, into rows no expert owns: the grouped
        backends leave that slot's output row unwritten, so y is undefined (the one-token paths of cuda_int4,
        triton and triton_int4 give such a slot weight 0 instead). Validate wherever the ids are not trusted.

        `method` picks how the tensors are built; every method gives bit-identical results:
          "auto"    the Triton plan kernels (moe_tut.kernels.plan) for CUDA tensors with T*k <= its
                    AUTO_MAX_ROWS (one launch) or AUTO_MULTI_MAX_ROWS (three launches), else the
                    torch ops. The CPU always takes the torch ops: under Triton's
                    interpreter the kernels are far slower.
          "torch"   ~15 small torch kernels (sort, scatter_add, cumsum, ...): any size, any device.
          "kernel"  the Triton kernels: a single CTA up to AUTO_MAX_ROWS rows, a multi-CTA counting
                    sort above, up to its MAX_ROWS; on the CPU they need Triton's interpreter (tests
                    use this).
        `defer`: launch nothing now; the sorted tensors are built (on the stream current then) the first time
        one is read. The harness times forwards this way, so a backend that needs no sorting (one token on
        cuda_int4, triton or triton_int4) skips it. topk_ids and topk_weights must then stay unchanged until
        that first read.
        """
        if method not in PLAN_METHODS:
            raise ValueError(f"method must be one of {', '.join(PLAN_METHODS)}; got {method!r}")
        check_routing_tensors(topk_ids, topk_weights)
        T, k = topk_ids.shape
        if validate and T * k > 0:
            lo, hi = int(topk_ids.min()), int(topk_ids.max())
            if lo < 0 or hi >= num_experts:
                raise ValueError(f"topk_ids must be in [0, {num_experts}); found values in [{lo}, {hi}]")
        if method == "auto":
            method = _auto_method(topk_ids, num_experts)
        if method == "kernel":
            if _plan_kernel_module() is None:
                raise RuntimeError("method='kernel' needs Triton, which could not be imported")
            if topk_ids.device.type != "cuda" and not interpreting():
                raise RuntimeError("method='kernel' on the CPU needs Triton's interpreter (TRITON_INTERPRET=1 "
                                   "before moe_tut is imported)")
        plan = cls(num_tokens=T, top_k=k, num_experts=num_experts, topk_ids=topk_ids, topk_weights=topk_weights,
                   method=method)
        if not defer:
            plan.materialize()
        return plan

    def materialize(self) -> RoutingPlan:
        """Build the sorted tensors now if they are not built yet (a deferred plan); returns the plan."""
        if not self._tensors:
            if self.method == "kernel":
                fields = _plan_kernel_module().build_plan_tensors(self.topk_ids, self.topk_weights, self.num_experts)
            else:
                fields = _build_torch(self.topk_ids, self.topk_weights, self.num_experts)
            self._tensors.update(fields)
        return self

    @property
    def is_built(self) -> bool:
        """Whether the sorted tensors exist (False only for a deferred plan nothing has read yet)."""
        return bool(self._tensors)

    sorted_slots = property(lambda self: self.materialize()._tensors["sorted_slots"])
    sorted_token_ids = property(lambda self: self.materialize()._tensors["sorted_token_ids"])
    sorted_weights = property(lambda self: self.materialize()._tensors["sorted_weights"])
    slot_to_sorted = property(lambda self: self.materialize()._tensors["slot_to_sorted"])
    expert_counts = property(lambda self: self.materialize()._tensors["expert_counts"])
    expert_offsets = property(lambda self: self.materialize()._tensors["expert_offsets"])

    @property
    def num_rows(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def device(self) -> torch.device:
        return self.topk_ids.device

    def counts_host(self) -> list[int]:
        """Rows per expert as Python ints (a device -> host sync)."""
        return self.expert_counts.tolist()

    def block_map(self, block_m: int) -> BlockMap:
        """Split each expert's rows into blocks of `block_m`, without a host sync."""
        if block_m < 1:
            raise ValueError(f"block_m must be >= 1, got {block_m}")
        E = self.num_experts
        max_blocks = math.ceil(self.num_rows / block_m) + E
        blocks_per_expert = (self.expert_counts + block_m - 1) // block_m
        block_offsets = torch.zeros(E + 1, dtype=torch.int32, device=self.device)
        block_offsets[1:] = torch.cumsum(blocks_per_expert, 0)
        b = torch.arange(max_blocks, dtype=torch.int32, device=self.device)
        # Expert of block b: the e with block_offsets[e] <= b < block_offsets[e + 1].
        expert = torch.searchsorted(block_offsets[1:].contiguous(), b, right=True).to(torch.int32)
        used = b < block_offsets[E]
        expert_c = expert.clamp(max=E - 1).long()
        start = self.expert_offsets[expert_c] + (b - block_offsets[expert_c]) * block_m
        return BlockMap(
            block_m=block_m,
            block_expert=torch.where(used, expert, -1).to(torch.int32),
            block_row_start=torch.where(used, start, 0).to(torch.int32),
            num_blocks=block_offsets[E],
            max_blocks=max_blocks,
        )

    def stats(self) -> RoutingStats:
        return RoutingStats(self.counts_host(), self.num_tokens, self.top_k)

"""RoutingPlan in one launch: a single Triton program builds every plan tensor for small T*k.

Why. The torch path of RoutingPlan.build is ~15-18 small kernels (stable sort, zeros + scatter_add,
cumsum, an inverse-permutation index_put, casts). At decode sizes each is pure launch latency: ~40 us
on an H100 even under CUDA-graph replay, as much as the whole expert computation of a small model.
One program of one CTA does the same work in registers, with one launch.

How (N = T*k slots, slot s = t*k + j, N_PAD = next power of two >= N, E_BINS = next power of two >= E+1):

    e[s]      the slot's expert, loaded through the strides of topk_ids (int64 or int32; any int dtype).
              Padding lanes (s >= N) and out-of-range ids get E, an extra bin that no output reads, so
              the histogram never indexes past its bins (its GPU lowering wraps out-of-range values).
    counts    tl.histogram(e, E_BINS)[:E]
    offsets   exclusive cumsum of counts, stored for bins 0..E (offsets[E] = N: bin E is excluded).
    order     tl.sort of the unique int32 key e * N_PAD + s. Sorting by (expert, slot) is exactly the
              stable sort by expert that the torch path does, so the result is bit-identical; the
              slot is key & (N_PAD - 1).
    outputs   sorted position p (0..N-1) gets slot, slot // k and float32(weight[slot]) (a gather from
              topk_weights); slot_to_sorted[slot] = p is a scatter store of the inverse permutation.

No host sync and only device-side work, so a build can be captured in a CUDA graph. All int32
outputs live in one allocation (fewer host-side allocator calls in eager mode), each field starting
on a 64-byte boundary so kernels that take them as pointers keep their 16-byte alignment
specialisation, as with separate tensors.

Limits. One CTA holds N_PAD keys in registers and sorts them with a bitonic network (log2(N_PAD)^2 / 2
compare-exchange stages), and histograms into E_BINS bins; MAX_ROWS and MAX_EXPERTS bound both. The
automatic choice in RoutingPlan.build uses the kernel up to AUTO_MAX_ROWS rows (env
MOE_TUT_PLAN_KERNEL_MAX_ROWS; 0 turns the kernel path off), on CUDA only: under the CPU interpreter
the torch path is much faster, so tests force the kernel explicitly.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_ROWS = 4096  # N_PAD keys in one CTA's registers: 16 per thread at 8 warps
MAX_EXPERTS = 512  # E + 1 <= 1024 histogram bins
MIN_PAD = 32  # one warp's lanes: at decode sizes no lane holds a replicated key or bin
ALIGN = 16  # int32 elements (64 bytes) between the fields of the shared output buffer


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


# Rows up to which RoutingPlan.build picks the kernel on CUDA by itself; larger N is allowed when forced
# (method="kernel"). 2048: on an H100 the kernel builds a plan of N = 2048 rows in 26 us vs 73 us for
# the torch ops, and ties at 4096 (results/h100/plan_v0).
AUTO_MAX_ROWS = min(_env_int("MOE_TUT_PLAN_KERNEL_MAX_ROWS", 2048), MAX_ROWS)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def default_num_warps(n_pad: int) -> int:
    """One warp for decode sizes (the bitonic sort and the scan then stay in registers and shuffles,
    with no cross-warp exchange through shared memory); more warps as the keys per thread grow. A
    guess until scripts/gpu_plan_check.py's sweep has run on a GPU."""
    return max(1, min(8, n_pad // 128))


def supports(num_rows: int, num_experts: int) -> bool:
    """Whether the single-program kernel can build a plan of this size."""
    return 0 <= num_rows <= MAX_ROWS and 1 <= num_experts <= MAX_EXPERTS


def auto_eligible(num_rows: int, num_experts: int) -> bool:
    """Whether RoutingPlan.build(method="auto") should use the kernel for this size (CUDA only)."""
    return 0 < num_rows <= AUTO_MAX_ROWS and supports(num_rows, num_experts)


@triton.jit
def _plan_kernel(ids_ptr, ids_s0, ids_s1, w_ptr, w_s0, w_s1, N, K, E,
                 sorted_slots_ptr, sorted_tok_ptr, sorted_w_ptr, slot_to_sorted_ptr, counts_ptr, offsets_ptr,
                 N_PAD: tl.constexpr, E_BINS: tl.constexpr):
    s = tl.arange(0, N_PAD)
    live = s < N
    t = s // K
    ids = tl.load(ids_ptr + t * ids_s0 + (s - t * K) * ids_s1, mask=live, other=0)
    # Padding and out-of-range ids go to bin E: compared in the ids' own dtype, so int64 ids beyond the
    # int32 range cannot wrap into a valid expert.
    e = tl.where(live & (ids >= 0) & (ids < E), ids, E).to(tl.int32)

    counts = tl.histogram(e, E_BINS)
    bins = tl.arange(0, E_BINS)
    tl.store(counts_ptr + bins, counts, mask=bins < E)
    tl.store(offsets_ptr + bins, tl.cumsum(counts, 0) - counts, mask=bins <= E)

    # Unique keys, so any sort is stable; (expert, slot) order is torch.sort(stable=True)'s order.
    keys = tl.sort(e * N_PAD + s)
    slot = keys & (N_PAD - 1)
    p = tl.arange(0, N_PAD)
    keep = p < N
    tok = slot // K
    w = tl.load(w_ptr + tok * w_s0 + (slot - tok * K) * w_s1, mask=keep, other=0.0)
    tl.store(sorted_slots_ptr + p, slot, mask=keep)
    tl.store(sorted_tok_ptr + p, tok, mask=keep)
    tl.store(sorted_w_ptr + p, w.to(tl.float32), mask=keep)
    tl.store(slot_to_sorted_ptr + slot, p, mask=keep)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def build_plan_tensors(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                       num_warps: int | None = None) -> dict[str, torch.Tensor]:
    """The RoutingPlan tensor fields, built by one launch of `_plan_kernel`.

    Inputs are checked by RoutingPlan.build (shapes [T, k], dtypes, device; ids in range when it
    validates). Returns sorted_slots, sorted_token_ids, sorted_weights, slot_to_sorted, expert_counts,
    expert_offsets with the exact values and dtypes of the torch path.
    """
    T, k = topk_ids.shape
    N, E = T * k, num_experts
    if not supports(N, E):
        raise ValueError(f"the plan kernel handles T*k <= {MAX_ROWS} and 1 <= E <= {MAX_EXPERTS}; "
                         f"got T*k = {N}, E = {E}")
    device = topk_ids.device
    n_pad = max(MIN_PAD, _next_pow2(N))
    e_bins = max(MIN_PAD, _next_pow2(E + 1))
    n_al = _aligned(N)
    buf = torch.empty(3 * n_al + _aligned(E) + E + 1, dtype=torch.int32, device=device)
    sorted_slots, sorted_tok, slot_to_sorted = buf[:N], buf[n_al:n_al + N], buf[2 * n_al:2 * n_al + N]
    counts = buf[3 * n_al:3 * n_al + E]
    offsets = buf[3 * n_al + _aligned(E):]
    sorted_w = torch.empty(N, dtype=torch.float32, device=device)
    _plan_kernel[(1,)](
        topk_ids, topk_ids.stride(0), topk_ids.stride(1), topk_weights, topk_weights.stride(0),
        topk_weights.stride(1), N, k, E, sorted_slots, sorted_tok, sorted_w, slot_to_sorted, counts, offsets,
        N_PAD=n_pad, E_BINS=e_bins, num_warps=num_warps or default_num_warps(n_pad))
    return dict(sorted_slots=sorted_slots, sorted_token_ids=sorted_tok, sorted_weights=sorted_w,
                slot_to_sorted=slot_to_sorted, expert_counts=counts, expert_offsets=offsets)

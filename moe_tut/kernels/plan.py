"""RoutingPlan on the GPU in one launch (small T*k) or three (large T*k), with no host sync.

Why. The torch path of RoutingPlan.build is ~15-18 small kernels (stable sort, zeros + scatter_add,
cumsum, an inverse-permutation index_put, casts). At decode sizes each is pure launch latency: ~40 us
on an H100 even under CUDA-graph replay, as much as the whole expert computation of a small model.
In eager mode at prefill sizes (T*k = 4096..65536) the same ~15 host launches make the forward
host-bound. One program of one CTA does the work in registers for small N; for large N a counting
sort by chunks spreads it over many CTAs in three launches.

Single-CTA kernel (N = T*k slots, slot s = t*k + j, N_PAD = next power of two >= N, E_BINS = next
power of two >= E+1):

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

Multi-CTA kernels (a counting sort; chunk c holds slots [c * CHUNK, (c + 1) * CHUNK), C chunks):

    A  grid C   sort the chunk by the key e * CHUNK + (s - c * CHUNK) (the single-CTA sort, CHUNK keys)
                and store the sorted keys; histogram the chunk into hist[c, 0..E] (bin E: bad ids and
                the last chunk's padding, as in the single-CTA kernel).
    B  1 CTA    scan hist over experts and chunks: expert_counts, expert_offsets, and
                delta[c, e] = base[c, e] - first[c, e], where base[c, e] = offsets[e] + rows of expert
                e in chunks before c (where chunk c's rows of e start in the output) and first[c, e] =
                rows of chunk c in bins < e (where they start in the chunk's own sorted keys).
    C  grid C   the key at sorted position q of chunk c goes to p = q + delta[c, e]: its rank within
                expert e inside the chunk plus base[c, e]. Writes the outputs as the single-CTA kernel.

Within an expert, chunk order is slot order and each chunk is sorted by slot, so p is again the stable
sort by expert, bit-identical to the torch path; no atomics, so it is deterministic. Out-of-range ids
(bin E) are placed after every expert, as in the single-CTA kernel. Why not one big CTA: its bitonic
sort grows as log2(N)^2 stages over N keys in one SM, already no faster than torch at N = 4096
(results/h100/plan_v0); chunks keep each sort short and use many SMs. The scratch (sorted keys,
hist, delta) lives in the int32 output allocation, after the fields.

On sm_90+ every plan kernel is launched with programmatic dependent launch (kernels/pdl.py): it waits
for the previous kernel (the router's) at its top, and lets the forward's next kernel start while it drains.

Both paths do only device-side work, so a build can be captured in a CUDA graph. All int32 outputs
live in one allocation (fewer host-side allocator calls in eager mode), each field starting on a
64-byte boundary so kernels that take them as pointers keep their 16-byte alignment specialisation, as
with separate tensors.

Limits and choice. The single CTA holds N_PAD keys in registers (SINGLE_MAX_ROWS); the multi-CTA path
goes to MAX_ROWS (bounded by the one-CTA scan over C x (E + 1) counts); both histogram into E + 1 <=
1024 bins. build_plan_tensors takes the single CTA for N <= AUTO_MAX_ROWS and the multi-CTA
kernels above. RoutingPlan.build's automatic choice, on CUDA only, uses the single CTA up to
AUTO_MAX_ROWS (env MOE_TUT_PLAN_KERNEL_MAX_ROWS, default 2048; 0 turns it off) and the multi-CTA
kernels up to AUTO_MULTI_MAX_ROWS (env MOE_TUT_PLAN_KERNEL_MULTI_MAX_ROWS, default MAX_ROWS; 0
turns it off). Under the CPU interpreter the torch path is much
faster, so tests force the kernel explicitly.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..env import programmatic_launch_ok
from .launch import launch, next_power_of_2
from .pdl import pdl_launch, wait_for_previous_kernel

SINGLE_MAX_ROWS = 4096  # N_PAD keys in one CTA's registers: 16 per thread at 8 warps
MAX_ROWS = 1 << 18  # multi-CTA path (T = 32768 at k = 8): <= 128 chunks at the default chunk sizes
MAX_EXPERTS = 512  # E + 1 <= 1024 histogram bins
MIN_PAD = 32  # one warp's lanes: at decode sizes no lane holds a replicated key or bin
ALIGN = 16  # int32 elements (64 bytes) between the fields of the shared output buffer
MIN_CHUNK, MAX_CHUNK = 16, 4096  # slots per program of the multi-CTA path (a power of two); small in tests
SCAN_TILE = 4096  # hist entries the scan program holds per step (chunks x experts): 16 a thread at 8 warps


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


# Rows up to which the single-CTA kernel builds the plan: RoutingPlan.build picks it on CUDA by itself,
# and build_plan_tensors (also when forced with method="kernel") switches to the multi-CTA kernels
# above it. 2048: on an H100 the kernel builds a plan of N = 2048 rows in 26 us vs 73 us for the torch
# ops, and ties at 4096 (results/h100/plan_v0).
AUTO_MAX_ROWS = min(_env_int("MOE_TUT_PLAN_KERNEL_MAX_ROWS", 2048), SINGLE_MAX_ROWS)
# Rows up to which RoutingPlan.build picks the multi-CTA kernels by itself (for N > AUTO_MAX_ROWS): all of
# them. On an H100 (results/h100/plan_v1, N = 4096..65536 at the (E, k) of mixtral, deepseek-v3 and
# qwen3-30b-a3b) they build a plan in 12-32 us vs 78-129 us for the torch ops under graph replay, and in
# 96-182 us vs 240-555 us of wall clock per eager call. At N = 2048 the single CTA stays ahead in eager
# mode (62 vs 153 us), so the switch stays at AUTO_MAX_ROWS.
AUTO_MULTI_MAX_ROWS = min(_env_int("MOE_TUT_PLAN_KERNEL_MULTI_MAX_ROWS", MAX_ROWS), MAX_ROWS)


def default_num_warps(n_pad: int) -> int:
    """One warp for decode sizes (the bitonic sort and the scan then stay in registers and shuffles,
    with no cross-warp exchange through shared memory); more warps as the keys per thread grow. A
    guess until scripts/gpu_plan_check.py's sweep has run on a GPU. Also used for a chunk's sort."""
    return max(1, min(8, n_pad // 128))


def default_chunk(num_rows: int) -> int:
    """Slots per program of the multi-CTA path. 512 keeps each program's bitonic sort short (the
    single-CTA kernel builds N = 512 in 9 us, launch included) and still gives 128 programs at N =
    65536, about one per SM of an H100; larger N grows the chunk so the one-CTA scan reads at most
    128 x (E + 1) counts. On an H100 (results/h100/plan_v1, deepseek-v3): N = 8192 took 17.7 / 18.4 /
    22.5 / 36.1 us at chunks of 256 / 512 / 1024 / 2048, N = 65536 60.6 / 31.9 / 31.1 / 36.5 us."""
    return min(MAX_CHUNK, max(512, next_power_of_2(-(-num_rows // 128))))


def supports(num_rows: int, num_experts: int) -> bool:
    """Whether the plan kernels (single- or multi-CTA) can build a plan of this size."""
    return 0 <= num_rows <= MAX_ROWS and 1 <= num_experts <= MAX_EXPERTS


def uses_multi_cta(num_rows: int) -> bool:
    """Whether build_plan_tensors takes the multi-CTA kernels by default (N = 0 never: nothing to chunk)."""
    return num_rows > max(0, AUTO_MAX_ROWS)


def auto_eligible(num_rows: int, num_experts: int) -> bool:
    """Whether RoutingPlan.build(method="auto") should use the kernels for this size (CUDA only)."""
    if num_rows <= 0 or not supports(num_rows, num_experts):
        return False
    return num_rows <= AUTO_MAX_ROWS or num_rows <= AUTO_MULTI_MAX_ROWS


@triton.jit
def _slot_experts(ids_ptr, ids_s0, ids_s1, s, live, K, E):
    # The expert bin of each slot s (token s // K, choice s % K), read through the ids' strides. Padding
    # lanes and out-of-range ids go to bin E, which no output reads and the sorts place after every
    # expert: compared in the ids' own dtype, so int64 ids beyond the int32 range cannot wrap into a
    # valid expert.
    t = s // K
    ids = tl.load(ids_ptr + t * ids_s0 + (s - t * K) * ids_s1, mask=live, other=0)
    return tl.where(live & (ids >= 0) & (ids < E), ids, E).to(tl.int32)


@triton.jit
def _place_slots(w_ptr, w_s0, w_s1, slot, p, live, K, sorted_slots_ptr, sorted_tok_ptr, sorted_w_ptr,
                 slot_to_sorted_ptr):
    # Sorted position p gets its slot, the slot's token and float32 routing weight; the slot gets p.
    tok = slot // K
    w = tl.load(w_ptr + tok * w_s0 + (slot - tok * K) * w_s1, mask=live, other=0.0)
    tl.store(sorted_slots_ptr + p, slot, mask=live)
    tl.store(sorted_tok_ptr + p, tok, mask=live)
    tl.store(sorted_w_ptr + p, w.to(tl.float32), mask=live)
    tl.store(slot_to_sorted_ptr + slot, p, mask=live)


@triton.jit
def _plan_kernel(ids_ptr, ids_s0, ids_s1, w_ptr, w_s0, w_s1, N, K, E,
                 sorted_slots_ptr, sorted_tok_ptr, sorted_w_ptr, slot_to_sorted_ptr, counts_ptr, offsets_ptr,
                 N_PAD: tl.constexpr, E_BINS: tl.constexpr, USE_PDL: tl.constexpr = False):
    # The first kernel of a forward: with PDL it follows whatever the caller ran last (the router), so it
    # waits before reading the routing.
    wait_for_previous_kernel(USE_PDL)
    s = tl.arange(0, N_PAD)
    e = _slot_experts(ids_ptr, ids_s0, ids_s1, s, s < N, K, E)

    counts = tl.histogram(e, E_BINS)
    bins = tl.arange(0, E_BINS)
    tl.store(counts_ptr + bins, counts, mask=bins < E)
    tl.store(offsets_ptr + bins, tl.cumsum(counts, 0) - counts, mask=bins <= E)

    # Unique keys, so any sort is stable; (expert, slot) order is torch.sort(stable=True)'s order.
    keys = tl.sort(e * N_PAD + s)
    slot = keys & (N_PAD - 1)
    p = tl.arange(0, N_PAD)
    _place_slots(w_ptr, w_s0, w_s1, slot, p, p < N, K, sorted_slots_ptr, sorted_tok_ptr, sorted_w_ptr,
                 slot_to_sorted_ptr)


@triton.jit
def _chunk_sort_kernel(ids_ptr, ids_s0, ids_s1, N, K, E, keys_ptr, hist_ptr,
                       CHUNK: tl.constexpr, E_BINS: tl.constexpr, USE_PDL: tl.constexpr = False):
    # Multi-CTA step A: one chunk of CHUNK slots, sorted by (expert, slot) and histogrammed.
    wait_for_previous_kernel(USE_PDL)
    c = tl.program_id(0)
    q = tl.arange(0, CHUNK)
    s = c * CHUNK + q
    live = s < N
    # Bad ids and padding lanes -> bin E: the scan places bin E after every expert. Padding exists only
    # in the last chunk, whose bin-E count no later chunk reads, and it sorts after that chunk's live
    # slots (the slot is in the key), so it moves no output.
    e = _slot_experts(ids_ptr, ids_s0, ids_s1, s, live, K, E)
    hist = tl.histogram(e, E_BINS)
    bins = tl.arange(0, E_BINS)
    tl.store(hist_ptr + c * (E + 1) + bins, hist, mask=bins <= E)
    # Unique keys (the slot within the chunk in the low bits): padding sorts last, so the live keys fill
    # sorted positions 0..live-1 and the same `live` mask selects them.
    keys = tl.sort(e * CHUNK + q)
    tl.store(keys_ptr + s, keys, mask=live)


@triton.jit
def _chunk_scan_kernel(hist_ptr, delta_ptr, counts_ptr, offsets_ptr, C, E,
                       C_PAD: tl.constexpr, EB: tl.constexpr, USE_PDL: tl.constexpr = False):
    # Multi-CTA step B, one program: bins 0..E in column blocks of EB, all chunks at once; the carries
    # hold the bins left of the block (over all chunks, and per chunk).
    wait_for_previous_kernel(USE_PDL)
    c = tl.arange(0, C_PAD)
    cols = tl.arange(0, EB)
    left_per_chunk = tl.zeros([C_PAD], dtype=tl.int32)
    left = tl.sum(left_per_chunk, 0)
    for e0 in range(0, E + 1, EB):
        b = e0 + cols
        m = (c < C)[:, None] & (b <= E)[None, :]
        idx = c[:, None] * (E + 1) + b[None, :]
        cnt = tl.load(hist_ptr + idx, mask=m, other=0)
        tot = tl.sum(cnt, 0)
        off = left + tl.cumsum(tot, 0) - tot  # expert_offsets; at bin E: the rows of all experts
        base = off[None, :] + tl.cumsum(cnt, 0) - cnt  # + rows of this bin in earlier chunks
        first = left_per_chunk[:, None] + tl.cumsum(cnt, 1) - cnt  # chunk's rows in lower bins
        tl.store(delta_ptr + idx, base - first, mask=m)
        tl.store(counts_ptr + b, tot, mask=b < E)
        tl.store(offsets_ptr + b, off, mask=b <= E)
        left += tl.sum(tot, 0)
        left_per_chunk += tl.sum(cnt, 1)


@triton.jit
def _chunk_place_kernel(keys_ptr, delta_ptr, w_ptr, w_s0, w_s1, N, K, E,
                        sorted_slots_ptr, sorted_tok_ptr, sorted_w_ptr, slot_to_sorted_ptr,
                        CHUNK: tl.constexpr, USE_PDL: tl.constexpr = False):
    # Multi-CTA step C: each sorted key of the chunk to its global sorted position.
    wait_for_previous_kernel(USE_PDL)
    c = tl.program_id(0)
    q = tl.arange(0, CHUNK)
    live = c * CHUNK + q < N
    key = tl.load(keys_ptr + c * CHUNK + q, mask=live, other=0)
    e = key // CHUNK
    slot = c * CHUNK + (key & (CHUNK - 1))
    p = q + tl.load(delta_ptr + c * (E + 1) + e, mask=live, other=0)
    _place_slots(w_ptr, w_s0, w_s1, slot, p, live, K, sorted_slots_ptr, sorted_tok_ptr, sorted_w_ptr,
                 slot_to_sorted_ptr)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def build_plan_tensors(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                       num_warps: int | None = None, *, multi_cta: bool | None = None,
                       chunk: int | None = None) -> dict[str, torch.Tensor]:
    """The RoutingPlan tensor fields, built by one launch of `_plan_kernel` or, for large N, by the
    three multi-CTA kernels.

    Inputs are checked by RoutingPlan.build (shapes [T, k], dtypes, device; ids in range when it
    validates). Returns sorted_slots, sorted_token_ids, sorted_weights, slot_to_sorted, expert_counts,
    expert_offsets with the exact values and dtypes of the torch path.

    multi_cta: None picks by size (uses_multi_cta); True/False forces a path (tests, timing; N = 0
    always takes the single CTA). chunk: slots per program of the multi-CTA path (default_chunk).
    num_warps: of the single-CTA kernel, or of the multi-CTA path's sorting kernel.
    Every launch uses programmatic dependent launch where env.programmatic_launch_ok allows it (kernels/pdl.py).
    """
    T, k = topk_ids.shape
    N, E = T * k, num_experts
    if not supports(N, E):
        raise ValueError(f"the plan kernel handles T*k <= {MAX_ROWS} and 1 <= E <= {MAX_EXPERTS}; "
                         f"got T*k = {N}, E = {E}")
    multi = (uses_multi_cta(N) if multi_cta is None else bool(multi_cta)) and N > 0
    if not multi and N > SINGLE_MAX_ROWS:
        raise ValueError(f"the single-CTA plan kernel handles T*k <= {SINGLE_MAX_ROWS}; got T*k = {N}")
    if multi:
        chunk = chunk or default_chunk(N)
        if not (MIN_CHUNK <= chunk <= MAX_CHUNK and chunk & (chunk - 1) == 0):
            raise ValueError(f"chunk must be a power of two in [{MIN_CHUNK}, {MAX_CHUNK}], got {chunk}")
        if -(-N // chunk) > SCAN_TILE:  # the scan holds at least one bin of every chunk at once
            raise ValueError(f"chunk {chunk} splits T*k = {N} into more than {SCAN_TILE} chunks; use a larger chunk")
    device = topk_ids.device
    n_al, e_al = _aligned(N), _aligned(E)
    fields_len = 3 * n_al + e_al + _aligned(E + 1)
    num_chunks = -(-N // chunk) if multi else 0
    hist_len = _aligned(num_chunks * (E + 1))
    # Multi-CTA scratch after the fields: sorted keys [N], hist [C, E + 1], delta [C, E + 1].
    buf = torch.empty(fields_len + (n_al + 2 * hist_len if multi else 0), dtype=torch.int32, device=device)
    sorted_slots, sorted_tok, slot_to_sorted = buf[:N], buf[n_al:n_al + N], buf[2 * n_al:2 * n_al + N]
    counts = buf[3 * n_al:3 * n_al + E]
    offsets = buf[3 * n_al + e_al:3 * n_al + e_al + E + 1]
    sorted_w = torch.empty(N, dtype=torch.float32, device=device)
    ids_args = (topk_ids, topk_ids.stride(0), topk_ids.stride(1))
    w_args = (topk_weights, topk_weights.stride(0), topk_weights.stride(1))
    outs = (sorted_slots, sorted_tok, sorted_w, slot_to_sorted)
    pdl = pdl_launch(programmatic_launch_ok(device))  # per call: MOE_TUT_PDL may change between captures
    if not multi:
        n_pad = max(MIN_PAD, next_power_of_2(N))
        launch(_plan_kernel, (1,), (*ids_args, *w_args, N, k, E, *outs, counts, offsets),
               dict(N_PAD=n_pad, E_BINS=max(MIN_PAD, next_power_of_2(E + 1)),
                    num_warps=num_warps or default_num_warps(n_pad), **pdl))
    else:
        keys = buf[fields_len:fields_len + N]
        hist = buf[fields_len + n_al:fields_len + n_al + hist_len]
        delta = buf[fields_len + n_al + hist_len:]
        launch(_chunk_sort_kernel, (num_chunks,), (*ids_args, N, k, E, keys, hist),
               dict(CHUNK=chunk, E_BINS=max(MIN_PAD, next_power_of_2(E + 1)),
                    num_warps=num_warps or default_num_warps(chunk), **pdl))
        c_pad = max(MIN_PAD, next_power_of_2(num_chunks))
        eb = max(1, min(next_power_of_2(E + 1), SCAN_TILE // c_pad))
        launch(_chunk_scan_kernel, (1,), (hist, delta, counts, offsets, num_chunks, E),
               dict(C_PAD=c_pad, EB=eb, num_warps=8, **pdl))
        launch(_chunk_place_kernel, (num_chunks,), (keys, delta, *w_args, N, k, E, *outs),
               dict(CHUNK=chunk, num_warps=4, **pdl))
    return dict(sorted_slots=sorted_slots, sorted_token_ids=sorted_tok, sorted_weights=sorted_w,
                slot_to_sorted=slot_to_sorted, expert_counts=counts, expert_offsets=offsets)

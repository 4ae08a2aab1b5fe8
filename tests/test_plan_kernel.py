"""The plan kernels (moe_tut.kernels.plan) against the torch path of RoutingPlan.build.

Every field must be bit-identical (torch.equal, same dtype and device): the kernels replace the torch
ops inside RoutingPlan.build, so any difference would change which rows a backend computes. On the
CPU the kernels run under Triton's interpreter (forced with method="kernel", or build_plan_tensors
with multi_cta=True and a small chunk so that a few dozen rows already span several chunks); the
`gpu` tests check the automatic dispatch, larger sizes and CUDA-graph capture on a real GPU.
"""

import os

import pytest
import torch

from moe_tut.bench.timing import capture_graph
from moe_tut.kernels import plan as plan_kernel
from moe_tut.routing import SKEWS, RoutingPlan, simulate_routing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIELDS = ("sorted_slots", "sorted_token_ids", "sorted_weights", "slot_to_sorted", "expert_counts", "expert_offsets")


def assert_same_plan(a: RoutingPlan, b: RoutingPlan):
    assert (a.num_tokens, a.top_k, a.num_experts) == (b.num_tokens, b.top_k, b.num_experts)
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.device == y.device and x.shape == y.shape, name
        assert torch.equal(x, y), f"{name}: {x.tolist()} != {y.tolist()}"


def both(ids, w, E):
    """(kernel plan, torch plan) for the same routing; the torch plan also passes its own invariants."""
    kern = RoutingPlan.build(ids, w, E, method="kernel")
    ref = RoutingPlan.build(ids, w, E, method="torch")
    assert_same_plan(kern, ref)
    return kern, ref


@pytest.mark.parametrize("T,E,k,skew,id_dtype,w_dtype", [
    (1, 8, 2, "uniform", torch.int64, torch.float32),         # decode, mixtral-like
    (1, 256, 8, "zipf", torch.int64, torch.bfloat16),         # E = 256 with N = 8: 248 empty experts
    (37, 7, 3, "zipf", torch.int32, torch.float32),           # prime E, N = 111 (not a power of two)
    (8, 8, 8, "uniform", torch.int64, torch.bfloat16),        # top_k = E: every expert gets every token
    (50, 16, 1, "all_to_one", torch.int32, torch.float16),    # all to one expert, 15 empty
    (13, 509, 4, "hot", torch.int32, torch.bfloat16),         # prime E near MAX_EXPERTS
    (3, 512, 8, "uniform", torch.int64, torch.float64),       # E = MAX_EXPERTS: 1024 histogram bins
    (33, 64, 2, "hot", torch.int16, torch.float32),           # N = 66: just past a power of two
    (9, 200, 4, "uniform", torch.uint8, torch.float32),       # unsigned ids
])
def test_kernel_matches_torch(T, E, k, skew, id_dtype, w_dtype):
    ids, w = simulate_routing(T, E, k, skew, seed=T + E)
    kern, _ = both(ids.to(DEVICE, id_dtype), w.to(DEVICE, w_dtype), E)
    assert kern.expert_offsets[-1] == T * k


def test_kernel_at_auto_limit():
    # The largest N the automatic dispatch sends to the kernel (qwen3-30b-a3b at T = 128).
    T, E, k = plan_kernel.AUTO_MAX_ROWS // 8, 128, 8
    ids, w = simulate_routing(T, E, k, "zipf", seed=7)
    both(ids.to(DEVICE), w.to(DEVICE), E)


@pytest.mark.parametrize("seed", range(6))
def test_kernel_random_routings(seed):
    gen = torch.Generator().manual_seed(seed)
    E = int(torch.randint(1, 300, (1,), generator=gen))
    k = int(torch.randint(1, min(E, 8) + 1, (1,), generator=gen))
    T = int(torch.randint(1, 40, (1,), generator=gen))
    # Ids drawn with repeats and any order (not the distinct top-k of a real router): the plan must
    # not depend on that, and heavy collisions stress the stable order within an expert.
    ids = torch.randint(0, min(E, 5 + seed), (T, k), generator=gen)
    w = torch.rand(T, k, generator=gen)
    both(ids.to(DEVICE), w.to(DEVICE), E)


@pytest.mark.parametrize("ids,E", [
    ([[0]], 1),                         # T = 1, k = 1, E = 1
    ([[3, 3], [3, 3], [3, 3]], 4),      # one expert, the last: offsets are all 0 but offsets[E]
    ([[1, 0], [0, 1], [1, 0]], 2),      # ties everywhere: order must follow the slot
    ([[2], [0], [2], [1], [0]], 3),     # top-1, out-of-order tokens
])
def test_kernel_by_hand(ids, E):
    ids = torch.tensor(ids, device=DEVICE)
    w = torch.arange(ids.numel(), dtype=torch.float32, device=DEVICE).reshape(ids.shape) / 7
    kern, _ = both(ids, w, E)
    flat = ids.flatten()
    assert torch.equal(flat[kern.sorted_slots.long()], torch.sort(flat, stable=True).values)


def test_kernel_non_contiguous_inputs():
    # A transposed view: the kernel reads through strides instead of copying.
    ids = torch.randint(0, 6, (4, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE).t()
    w = torch.rand(4, 9, generator=torch.Generator().manual_seed(1)).to(DEVICE).t()
    assert not ids.is_contiguous()
    both(ids, w, 6)


def test_kernel_empty_routing():
    ids = torch.empty(0, 2, dtype=torch.int64, device=DEVICE)
    kern, _ = both(ids, torch.empty(0, 2, device=DEVICE), 5)
    assert kern.expert_offsets.tolist() == [0] * 6


def test_kernel_fields_keep_alignment():
    # The int32 fields share one buffer; each must start 16-byte aligned like a fresh tensor, or every
    # Triton kernel that takes it as a pointer would compile (and autotune) a second specialisation.
    ids, w = simulate_routing(5, 7, 3, seed=0)
    kern = RoutingPlan.build(ids.to(DEVICE), w.to(DEVICE), 7, method="kernel")
    for name in FIELDS:
        assert getattr(kern, name).data_ptr() % 16 == 0, name


def test_kernel_keeps_validation_and_limits():
    ids, w = torch.tensor([[0, 9]], device=DEVICE), torch.ones(1, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        RoutingPlan.build(ids, w, 4, method="kernel")
    with pytest.raises(ValueError, match="method must be one of"):
        RoutingPlan.build(ids, w, 16, method="triton")
    big = torch.zeros(plan_kernel.MAX_ROWS + 1, 1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=f"plan kernel handles T\\*k <= {plan_kernel.MAX_ROWS} "):
        RoutingPlan.build(big, torch.ones(big.shape, device=DEVICE), 4, method="kernel")
    many = torch.zeros(1, 1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="plan kernel handles"):
        RoutingPlan.build(many, torch.ones(1, 1, device=DEVICE), plan_kernel.MAX_EXPERTS + 1, method="kernel")


def test_out_of_range_ids_stay_in_bounds():
    # validate=False with bad ids is undefined (the torch path hits a device assert on CUDA), but the
    # kernel must still write only inside its outputs: bad slots sort last, counted by no expert.
    ids = torch.tensor([[1, 7], [-2, 1]], device=DEVICE)
    p = RoutingPlan.build(ids, torch.ones(2, 2, device=DEVICE), 3, validate=False, method="kernel")
    assert p.expert_counts.tolist() == [0, 2, 0] and p.expert_offsets.tolist() == [0, 0, 2, 2]
    assert p.sorted_slots.tolist() == [0, 3, 1, 2]
    assert torch.equal(p.sorted_slots[p.slot_to_sorted.long()].cpu(), torch.arange(4, dtype=torch.int32))


def test_auto_uses_torch_off_gpu():
    ids, w = simulate_routing(4, 8, 2, seed=0)
    p = RoutingPlan.build(ids, w, 8)  # auto on the CPU: the torch path (the interpreter is slower)
    assert_same_plan(p, RoutingPlan.build(ids, w, 8, method="torch"))
    from moe_tut import routing

    assert routing._auto_method(ids, 8) == "torch"


# --- multi-CTA path (counting sort by chunks) -------------------------------------------------------

def multi(ids, w, E, chunk):
    """The multi-CTA fields with `chunk` slots per program, checked field by field against the torch path."""
    fields = plan_kernel.build_plan_tensors(ids, w, E, multi_cta=True, chunk=chunk)
    ref = RoutingPlan.build(ids, w, E, method="torch")
    for name in FIELDS:
        x, y = fields[name], getattr(ref, name)
        assert x.dtype == y.dtype and x.device == y.device and x.shape == y.shape, name
        assert torch.equal(x, y), f"{name}: {x.tolist()} != {y.tolist()}"
    return fields


@pytest.mark.parametrize("T,E,k,skew,id_dtype,w_dtype,chunk", [
    (37, 7, 3, "zipf", torch.int32, torch.float32, 16),         # N = 111: 7 chunks, the last with 15 rows
    (32, 8, 2, "uniform", torch.int64, torch.bfloat16, 16),     # N = 64: exactly 4 full chunks
    (50, 16, 1, "all_to_one", torch.int32, torch.float16, 16),  # one expert takes every row, 15 empty
    (40, 61, 5, "hot", torch.int64, torch.bfloat16, 32),        # prime E, N = 200
    (12, 512, 8, "uniform", torch.int64, torch.float32, 32),    # E = MAX_EXPERTS (bins E and E + 1 = 513)
    (13, 509, 4, "zipf", torch.int32, torch.bfloat16, 16),      # prime E near the limit, mostly empty
    (8, 8, 8, "uniform", torch.int64, torch.float64, 16),       # top_k = E: every expert in every chunk
    (9, 200, 4, "uniform", torch.uint8, torch.float32, 16),     # unsigned ids
    (33, 64, 2, "hot", torch.int16, torch.float32, 64),         # N = 66: one full chunk and 2 rows
    (16, 8, 2, "zipf", torch.int64, torch.float32, 32),         # N = chunk: a single chunk
    (5, 8, 2, "zipf", torch.int32, torch.bfloat16, 16),         # N = 10 < chunk: one partial chunk
])
def test_multi_cta_matches_torch(T, E, k, skew, id_dtype, w_dtype, chunk):
    ids, w = simulate_routing(T, E, k, skew, seed=T + E)
    fields = multi(ids.to(DEVICE, id_dtype), w.to(DEVICE, w_dtype), E, chunk)
    assert fields["expert_offsets"][-1] == T * k


@pytest.mark.parametrize("seed", range(6))
def test_multi_cta_random_routings(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    E = int(torch.randint(1, 300, (1,), generator=gen))
    k = int(torch.randint(1, min(E, 8) + 1, (1,), generator=gen))
    T = int(torch.randint(10, 60, (1,), generator=gen))
    chunk = (16, 32, 64)[seed % 3]
    # Few distinct ids in any order: every expert spans several chunks, so the per-chunk bases matter.
    ids = torch.randint(0, min(E, 3 + seed), (T, k), generator=gen)
    w = torch.rand(T, k, generator=gen)
    multi(ids.to(DEVICE), w.to(DEVICE), E, chunk)


@pytest.mark.parametrize("ids,E", [
    ([[3, 3]] * 20, 4),                       # one expert, the last: offsets all 0 but offsets[E]
    ([[1, 0], [0, 1]] * 12, 2),               # ties in every chunk: order must follow the slot
    ([[2], [0]] * 16 + [[1]], 3),             # N = 33: expert 1 only in the last, partial chunk
    ([[0]] * 16 + [[1]] * 16 + [[0]], 2),     # expert 0 in chunks 0 and 2, expert 1 only in chunk 1
])
def test_multi_cta_by_hand(ids, E):
    ids = torch.tensor(ids, device=DEVICE)
    w = torch.arange(ids.numel(), dtype=torch.float32, device=DEVICE).reshape(ids.shape) / 7
    fields = multi(ids, w, E, 16)
    flat = ids.flatten()
    assert torch.equal(flat[fields["sorted_slots"].long()], torch.sort(flat, stable=True).values)


def test_multi_cta_non_contiguous_inputs():
    ids = torch.randint(0, 6, (4, 30), generator=torch.Generator().manual_seed(0)).to(DEVICE).t()
    w = torch.rand(4, 30, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16).t()
    assert not ids.is_contiguous() and not w.is_contiguous()
    multi(ids, w, 6, 16)  # N = 120: 8 chunks


def test_multi_cta_just_above_single_cta_limit():
    # The default dispatch of method="kernel": the single CTA up to AUTO_MAX_ROWS, chunks above it.
    T, E, k = plan_kernel.AUTO_MAX_ROWS + 1, 128, 1
    assert plan_kernel.uses_multi_cta(T * k) and not plan_kernel.uses_multi_cta(plan_kernel.AUTO_MAX_ROWS)
    ids, w = simulate_routing(T, E, k, "zipf", seed=3)
    both(ids.to(DEVICE), w.to(DEVICE, torch.bfloat16), E)
    if plan_kernel.AUTO_MAX_ROWS % plan_kernel.default_chunk(T * k) == 0:  # the default limit, 2048
        assert T * k % plan_kernel.default_chunk(T * k) == 1  # the last chunk holds a single row


def test_multi_cta_fields_keep_alignment():
    ids, w = simulate_routing(21, 7, 3, seed=0)
    fields = plan_kernel.build_plan_tensors(ids.to(DEVICE), w.to(DEVICE), 7, multi_cta=True, chunk=16)
    for name in FIELDS:
        assert fields[name].data_ptr() % 16 == 0, name


def test_multi_cta_out_of_range_ids_like_single_cta():
    # validate=False with bad ids: both paths place them after every expert, in slot order, and count
    # them nowhere; bad ids in several chunks (and the padding of the last one) must not mix.
    ids = torch.tensor([[1, 7], [-2, 1], [0, 3], [2, 9]] * 10 + [[5, 0]], device=DEVICE)
    w = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    one = plan_kernel.build_plan_tensors(ids, w, 3, multi_cta=False)
    many = plan_kernel.build_plan_tensors(ids, w, 3, multi_cta=True, chunk=16)
    for name in FIELDS:
        assert torch.equal(one[name], many[name]), name
    assert many["expert_offsets"].tolist() == [0, 11, 31, 41]
    bad = (ids.flatten() < 0) | (ids.flatten() >= 3)
    assert torch.equal(many["sorted_slots"][41:].long().cpu(), torch.nonzero(bad.cpu()).flatten())


def test_multi_cta_limits():
    ids, w = torch.zeros(40, 1, dtype=torch.int64, device=DEVICE), torch.ones(40, 1, device=DEVICE)
    for chunk in (8, 24, plan_kernel.MAX_CHUNK * 2):
        with pytest.raises(ValueError, match="chunk must be a power of two"):
            plan_kernel.build_plan_tensors(ids, w, 4, multi_cta=True, chunk=chunk)
    many = torch.zeros(plan_kernel.SCAN_TILE * 16 + 1, 1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="into more than"):
        plan_kernel.build_plan_tensors(many, torch.ones(many.shape, device=DEVICE), 4, multi_cta=True, chunk=16)
    big = torch.zeros(plan_kernel.SINGLE_MAX_ROWS + 1, 1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="single-CTA plan kernel handles"):
        plan_kernel.build_plan_tensors(big, torch.ones(big.shape, device=DEVICE), 4, multi_cta=False)
    assert plan_kernel.supports(plan_kernel.MAX_ROWS, plan_kernel.MAX_EXPERTS)
    assert not plan_kernel.supports(plan_kernel.MAX_ROWS + 1, 8)
    assert plan_kernel.MAX_ROWS >= 65536 and plan_kernel.SINGLE_MAX_ROWS < plan_kernel.MAX_ROWS
    # N = 0 has nothing to chunk: the single CTA writes the zero offsets.
    empty = plan_kernel.build_plan_tensors(ids[:0], w[:0], 5, multi_cta=True)
    assert empty["expert_offsets"].tolist() == [0] * 6


def test_default_chunk_bounds_the_scan():
    for n in (1, 2049, 4096, 65536, 65537, plan_kernel.MAX_ROWS):
        c = plan_kernel.default_chunk(n)
        assert plan_kernel.MIN_CHUNK <= c <= plan_kernel.MAX_CHUNK and c & (c - 1) == 0
        assert -(-n // c) <= 128, n


def test_auto_multi_limit(monkeypatch):
    # On up to MAX_ROWS by default (timed on an H100: faster than the torch ops from N = 4096 on);
    # one number turns it off.
    if "MOE_TUT_PLAN_KERNEL_MULTI_MAX_ROWS" not in os.environ:
        assert plan_kernel.AUTO_MULTI_MAX_ROWS == plan_kernel.MAX_ROWS
    monkeypatch.setattr(plan_kernel, "AUTO_MAX_ROWS", 2048)
    monkeypatch.setattr(plan_kernel, "AUTO_MULTI_MAX_ROWS", 0)
    assert plan_kernel.auto_eligible(2048, 128) and not plan_kernel.auto_eligible(2049, 128)
    monkeypatch.setattr(plan_kernel, "AUTO_MULTI_MAX_ROWS", 65536)
    assert plan_kernel.auto_eligible(2049, 128) and plan_kernel.auto_eligible(65536, 128)
    assert not plan_kernel.auto_eligible(65537, 128) and not plan_kernel.auto_eligible(4096, 513)
    from moe_tut import routing

    ids, _ = simulate_routing(1024, 8, 4, seed=0)
    assert routing._auto_method(ids, 8) == "torch"  # the CPU never takes the kernels by itself


# --- GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_auto_dispatch_and_sizes():
    from moe_tut import routing

    for T, E, k in [(1, 8, 2), (1, 256, 8), (16, 128, 8), (128, 128, 8), (7, 61, 5), (512, 128, 8)]:
        ids, w = simulate_routing(T, E, k, "zipf", seed=T, device="cuda")
        assert routing._auto_method(ids, E) == ("kernel" if plan_kernel.auto_eligible(T * k, E) else "torch")
        assert_same_plan(RoutingPlan.build(ids, w, E), RoutingPlan.build(ids, w, E, method="torch"))
    assert plan_kernel.auto_eligible(128 * 8, 128)
    ids, w = simulate_routing(plan_kernel.MAX_ROWS // 8 + 1, 128, 8, seed=0, device="cuda")
    assert routing._auto_method(ids, 128) == "torch"  # past every limit
    for T, k in [(256, 8), (512, 8), (plan_kernel.SINGLE_MAX_ROWS, 1)]:  # forced, either path
        ids, w = simulate_routing(T, 256, k, "hot", seed=T, device="cuda")
        both(ids, w.to(torch.bfloat16), 256)
        single = plan_kernel.build_plan_tensors(ids, w, 256, multi_cta=False)  # the single CTA at its limit
        ref = RoutingPlan.build(ids, w, 256, method="torch")
        for name in FIELDS:
            assert torch.equal(single[name], getattr(ref, name)), name


@pytest.mark.gpu
@pytest.mark.parametrize("num_warps", [1, 2, 4, 8])
def test_gpu_num_warps(num_warps):
    # Any layout the heuristic might pick must give the same plan.
    for T, E, k in [(1, 8, 2), (64, 256, 8), (100, 7, 3)]:
        ids, w = simulate_routing(T, E, k, seed=1, device="cuda")
        ref = RoutingPlan.build(ids, w, E, method="torch")
        for multi_cta in (False, True):
            fields = plan_kernel.build_plan_tensors(ids, w, E, num_warps=num_warps, multi_cta=multi_cta, chunk=64)
            for name in FIELDS:
                assert torch.equal(fields[name], getattr(ref, name)), (multi_cta, name)


def check_graph_replay(T, E, k, method):
    """RoutingPlan.build(validate=False) captured in a CUDA graph: one replay on new routing data gives that
    routing's plan."""
    ids, w = simulate_routing(T, E, k, seed=0, device="cuda")
    out = {}

    def build():
        out["plan"] = RoutingPlan.build(ids, w, E, validate=False, method=method)

    graph, _ = capture_graph(build)
    new_ids, new_w = simulate_routing(T, E, k, "hot", seed=5, device="cuda")
    ids.copy_(new_ids)
    w.copy_(new_w)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_plan(out["plan"], RoutingPlan.build(new_ids, new_w, E, method="torch"))


@pytest.mark.gpu
def test_gpu_build_in_cuda_graph():
    check_graph_replay(16, 128, 8, "auto")  # the single-CTA kernel, chosen by itself


@pytest.mark.gpu
def test_gpu_multi_cta_large_sizes():
    # The presets' (E, k) from N = 4096 to 65536 (T = 8192, k = 8) and MAX_ROWS, default chunks and dispatch
    # (method="kernel"), plus chunk sizes other than the default at one size.
    cases = [(T, E, k) for E, k in [(8, 2), (256, 8), (128, 8)] for T in (4096 // k, 16384 // k, 65536 // k)]
    cases += [(plan_kernel.MAX_ROWS // 8, 512, 8), (plan_kernel.MAX_ROWS, 8, 1), (10007, 509, 3)]
    for i, (T, E, k) in enumerate(cases):
        assert plan_kernel.uses_multi_cta(T * k)
        ids, w = simulate_routing(T, E, k, SKEWS[i % len(SKEWS)], seed=i, device="cuda")
        both(ids.to(torch.int32 if i % 2 else torch.int64), w.to(torch.bfloat16 if i % 3 else torch.float32), E)
    ids, w = simulate_routing(4097, 256, 8, "hot", seed=1, device="cuda")
    ref = RoutingPlan.build(ids, w, 256, method="torch")
    for chunk in (16, 256, 1024, plan_kernel.MAX_CHUNK):
        fields = plan_kernel.build_plan_tensors(ids, w, 256, multi_cta=True, chunk=chunk)
        for name in FIELDS:
            assert torch.equal(fields[name], getattr(ref, name)), (chunk, name)


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,k", [(8192, 128, 8), (700, 256, 8)])
def test_gpu_multi_cta_in_cuda_graph(T, E, k):
    assert plan_kernel.uses_multi_cta(T * k)
    check_graph_replay(T, E, k, "kernel")  # the three multi-CTA launches

"""The single-launch plan kernel (moe_tut.kernels.plan) against the torch path of RoutingPlan.build.

Every field must be bit-identical (torch.equal, same dtype and device): the kernel replaces the torch
ops inside RoutingPlan.build, so any difference would change which rows a backend computes. On the
CPU the kernel runs under Triton's interpreter (forced with method="kernel"); the `gpu` tests check
the automatic dispatch, larger sizes and CUDA-graph capture on a real GPU.
"""

import pytest
import torch

from moe_tut.kernels import plan as plan_kernel
from moe_tut.routing import RoutingPlan, simulate_routing

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
    with pytest.raises(ValueError, match="plan kernel handles"):
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


# --- GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_auto_dispatch_and_sizes():
    from moe_tut import routing

    for T, E, k in [(1, 8, 2), (1, 256, 8), (16, 128, 8), (128, 128, 8), (7, 61, 5)]:
        ids, w = simulate_routing(T, E, k, "zipf", seed=T, device="cuda")
        assert routing._auto_method(ids, E) == ("kernel" if T * k <= plan_kernel.AUTO_MAX_ROWS else "torch")
        assert_same_plan(RoutingPlan.build(ids, w, E), RoutingPlan.build(ids, w, E, method="torch"))
    ids, w = simulate_routing(4096, 128, 8, seed=0, device="cuda")
    assert routing._auto_method(ids, 128) == "torch"  # past the limit
    for T, k in [(256, 8), (512, 8), (plan_kernel.MAX_ROWS, 1)]:  # forced up to MAX_ROWS
        ids, w = simulate_routing(T, 256, k, "hot", seed=T, device="cuda")
        both(ids, w.to(torch.bfloat16), 256)


@pytest.mark.gpu
@pytest.mark.parametrize("num_warps", [1, 2, 4, 8])
def test_gpu_num_warps(num_warps):
    # Any layout the heuristic might pick must give the same plan.
    for T, E, k in [(1, 8, 2), (64, 256, 8), (100, 7, 3)]:
        ids, w = simulate_routing(T, E, k, seed=1, device="cuda")
        fields = plan_kernel.build_plan_tensors(ids, w, E, num_warps=num_warps)
        ref = RoutingPlan.build(ids, w, E, method="torch")
        for name in FIELDS:
            assert torch.equal(fields[name], getattr(ref, name)), name


@pytest.mark.gpu
def test_gpu_build_in_cuda_graph():
    # build(validate=False) must be capturable: one replay on new routing data gives that routing's plan.
    T, E, k = 16, 128, 8
    ids, w = simulate_routing(T, E, k, seed=0, device="cuda")
    out = {}

    def build():
        out["plan"] = RoutingPlan.build(ids, w, E, validate=False)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        build()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        build()
    new_ids, new_w = simulate_routing(T, E, k, "hot", seed=5, device="cuda")
    ids.copy_(new_ids)
    w.copy_(new_w)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_plan(out["plan"], RoutingPlan.build(new_ids, new_w, E, method="torch"))

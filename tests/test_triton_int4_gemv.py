"""INT4 GEMV decode path (moe_tut.kernels.int4_gemv) against the float32 reference on the dequantised weights.

Runs on the CPU under Triton's interpreter with tiny shapes; `@pytest.mark.gpu` tests run preset-like shapes
where there is a GPU. Tolerances as tests/test_triton_int4.py: the forward's bf16 output within 2e-2 of
int4_moe_reference. The intermediate results (float32 throughout) are checked much tighter: they may differ
from dequantize-then-multiply only by float32 rounding.
"""

import functools
import math
from dataclasses import replace

import pytest
import torch

import moe_tut  # noqa: F401  (interpreter, before the kernels are defined)
from moe_tut.bench.timing import capture_graph
from moe_tut.kernels import grouped_gemm as gg
from moe_tut.kernels import int4_gemm as ig
from moe_tut.kernels import int4_gemv as gv
from moe_tut.presets import custom
from moe_tut.quant import Int4ExpertWeights, dequantize, int4_moe_reference
from moe_tut.reference import relative_error, swiglu
from moe_tut.routing import RoutingPlan, simulate_routing
from moe_tut.weights import ExpertWeights

TOL = 2e-2
FP32_TOL = 1e-5  # float32 sums of exact products; one bf16 rounding anywhere would show as ~1e-3
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GemvConfig = gv.GemvConfig


def make_case(E, H, F, k, T, routing="uniform", G=128, symmetric=True, dtype=torch.bfloat16, seed=0, ids=None):
    w = ExpertWeights.random(custom(E, H, F, k), device=DEVICE, dtype=dtype, seed=seed)
    q = Int4ExpertWeights.from_bf16(w, G, symmetric)
    if ids is None:
        ids, tw = simulate_routing(T, E, k, routing, seed=seed, device=DEVICE)
    else:  # a given routing (repeated experts allowed), random weights
        ids = torch.tensor(ids, device=DEVICE)
        tw = torch.softmax(torch.randn(ids.shape, generator=torch.Generator().manual_seed(seed)), 1).to(DEVICE)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    return x, q, ids, tw, RoutingPlan.build(ids, tw, E)


def check(x, q, ids, tw, plan, **kw):
    y = gv.moe_forward_int4_gemv(x, q, plan, **kw)
    assert y.shape == x.shape and y.dtype == x.dtype
    err = relative_error(y, int4_moe_reference(x, q, ids, tw))
    assert err < TOL, f"relative error {err:.3g} vs the dequantised reference"
    return y


@pytest.fixture(autouse=True)
def fresh_schedules():
    """gemv_schedule's cache emptied before each test: tests change module constants (FUSED_MIN_WEIGHT_BYTES) and
    functions (interpreting) that a cached schedule was decided with."""
    gv._gemv_schedule.cache_clear()


@pytest.fixture
def nan_buffers(monkeypatch):
    """Every intermediate buffer NaN-filled (not torch.empty): an element a kernel skips shows up as NaN."""
    def nan_alloc(shape, like, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)

    monkeypatch.setattr(gv, "_alloc", nan_alloc)


# (id, case kwargs, forward kwargs); H and F are multiples of the group size
CASES = [
    ("T1", dict(E=4, H=128, F=256, k=2, T=1), {}),  # one decode token: most experts empty
    ("T3-asym-G64", dict(E=4, H=128, F=256, k=2, T=3, G=64, symmetric=False), {}),
    ("empty-experts-top1", dict(E=8, H=64, F=128, k=1, T=3, G=64), {}),  # GEMM2 writes y itself
    ("topk-eq-E", dict(E=4, H=64, F=128, k=4, T=2, G=32), {}),  # every token to every expert
    # H, F not multiples of BLOCK_N (64) or of BLOCK_K 128 (lowered to the group, 32): partial column blocks
    ("H96-F160-G32-asym", dict(E=5, H=96, F=160, k=2, T=2, G=32, symmetric=False), {}),
    ("split-k2", dict(E=4, H=256, F=512, k=2, T=1, G=128), dict(split_k=2)),
    ("split-k4-asym-G32", dict(E=4, H=128, F=128, k=2, T=4, G=32, symmetric=False), dict(split_k=4)),
    ("split-k2-top1", dict(E=3, H=256, F=256, k=1, T=2, G=128), dict(split_k=2)),
    ("small-blocks", dict(E=4, H=128, F=128, k=2, T=2, G=128),
     dict(config=GemvConfig(16, 64, 2), config2=GemvConfig(32, 32, 1))),  # many programs and K steps
    ("pipelined-asym", dict(E=4, H=256, F=256, k=2, T=2, G=64, symmetric=False),
     dict(config=GemvConfig(16, 64, 2, stages=3), config2=GemvConfig(32, 32, 1, stages=2))),
]


@pytest.mark.parametrize("case,kw", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forward_matches_dequantised_reference(case, kw, nan_buffers):
    x, q, ids, tw, plan = make_case(**case)
    if "split_k" in kw:  # the forced split really happens in both GEMMs
        cfg = replace(gv.INTERPRETER_GEMV_CONFIG, split_k=kw["split_k"])
        assert gv.plan_splits(q, plan, 1, cfg, cfg, x.device)[2:] == (kw["split_k"], kw["split_k"])
    y = check(x, q, ids, tw, plan, **kw)
    assert torch.isfinite(y).all()


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same [1, k] values with element stride 2 along k: one_token_routing refuses it (plan path)."""
    base = torch.zeros(1, 2 * t.shape[1], dtype=t.dtype, device=t.device)
    base[:, ::2] = t
    return base[:, ::2]


# One token from the router's top-k, no sorted plan: (id, case kwargs, forward kwargs, ids dtype, weights dtype)
ONE_TOKEN_CASES = [
    ("k2", dict(E=4, H=128, F=256, k=2, T=1), {}, torch.int64, torch.float32),
    ("k3-asym-G64-int32-bf16", dict(E=5, H=128, F=128, k=3, T=1, G=64, symmetric=False), {}, torch.int32,
     torch.bfloat16),
    ("k1-gemm2-writes-y", dict(E=3, H=64, F=128, k=1, T=1, G=64), {}, torch.int64, torch.float32),
    ("split-k2", dict(E=4, H=256, F=512, k=2, T=1), dict(split_k=2), torch.int64, torch.float16),
    ("duplicate-ids", dict(E=4, H=64, F=128, k=3, T=1, G=64, ids=[[2, 2, 0]]), {}, torch.int64, torch.float32),
]


@pytest.mark.parametrize("case,kw,ids_dtype,w_dtype", [c[1:] for c in ONE_TOKEN_CASES],
                         ids=[c[0] for c in ONE_TOKEN_CASES])
def test_one_token_path_reads_no_plan_and_matches_the_plan_path(case, kw, ids_dtype, w_dtype, nan_buffers):
    x, q, ids, tw, _ = make_case(**case)
    ids, tw = ids.to(ids_dtype), tw.to(w_dtype)
    plan = RoutingPlan.build(ids, tw, q.num_experts, defer=True)
    y = check(x, q, ids.long(), tw.float(), plan, **kw)
    assert not plan.is_built and torch.isfinite(y).all()
    sorted_plan = RoutingPlan.build(strided_copy(ids), strided_copy(tw), q.num_experts)
    assert gv.one_token_routing(sorted_plan) is None
    assert torch.equal(y, gv.moe_forward_int4_gemv(x, q, sorted_plan, **kw))


@pytest.mark.parametrize("case,kw", [(dict(E=4, H=192, F=256, k=3, T=1, G=64), {}),  # partial column block of 128
                                     (dict(E=4, H=256, F=512, k=2, T=1), dict(split_k=2)),
                                     (dict(E=3, H=64, F=128, k=1, T=1, G=64), dict(split_k=2))],  # slices alone
                         ids=["k3", "k2-split2", "k1-split2"])
def test_one_token_slot_sum_in_gemm2_equals_the_slot_sum_kernel(case, kw, monkeypatch, nan_buffers):
    # GEMM2's last program per column block sums the k slots and K slices (SUM_SLOTS_LAST): the same bits as the
    # slot-sum kernel, and every element of y written (NaN-filled buffers)
    x, q, ids, tw, _ = make_case(**case)
    plan = RoutingPlan.build(ids, tw, q.num_experts, defer=True)
    monkeypatch.setenv(gg.ONE_TOKEN_SUM_ENV, "kernel")
    expected = gv.moe_forward_int4_gemv(x, q, plan, config2=gv.GemvConfig(128, 64, 4), **kw)
    monkeypatch.setenv(gg.ONE_TOKEN_SUM_ENV, "gemm2")
    y = gv.moe_forward_int4_gemv(x, q, plan, config2=gv.GemvConfig(128, 64, 4), **kw)
    assert torch.equal(y, expected) and torch.isfinite(y).all()


@pytest.mark.parametrize("case,kw", [(dict(E=4, H=256, F=192, k=2, T=1, G=64), dict(split_k=2)),  # partial column block
                                     (dict(E=5, H=256, F=128, k=3, T=3, G=64, symmetric=False), dict(split_k=4)),
                                     (dict(E=2, H=256, F=128, k=2, T=4), dict(split_k=2, rows=2))],
                         ids=["T1-split2", "T3-asym-split4", "T4-rows2-split2"])
def test_split_gemm1_finishes_the_swiglu_in_its_last_slice(case, kw, monkeypatch, nan_buffers):
    # the last K slice of each GEMM1 tile applies the SwiGLU and stores act' prepared (FINISH_LAST): the same bits
    # as the finisher kernel, every element written, one token (no plan) and plan paths with 1-2 rows per program
    x, q, ids, tw, plan = make_case(**case)
    config = GemvConfig(64, 64, 4)
    monkeypatch.setenv(gv.FINISH_ENV, "kernel")
    expected = gv.moe_forward_int4_gemv(x, q, plan, config=config, **kw)
    monkeypatch.setenv(gv.FINISH_ENV, "gemm1")
    y = check(x, q, ids, tw, plan, config=config, **kw)
    assert torch.equal(y, expected) and torch.isfinite(y).all()
    monkeypatch.setenv(gv.FINISH_ENV, "later")
    with pytest.raises(ValueError, match="MOE_TUT_GEMV_FINISH"):
        gv.moe_forward_int4_gemv(x, q, plan, config=config, **kw)


# GEMM1 and GEMM2 in one launch (MOE_TUT_GEMV_FUSED=1): (id, case kwargs, forward kwargs), configs that fuse (one
# warp count, GEMM2's K slices whole blocks of GEMM1 columns)
FUSED_CASES = [
    ("T1-split2-gemm2-split4", dict(E=4, H=256, F=512, k=2, T=1),
     dict(config=GemvConfig(16, 64, 2, split_k=2), config2=GemvConfig(32, 64, 2, split_k=4))),
    ("T3-asym-pipelined-plan", dict(E=4, H=128, F=256, k=2, T=3, G=64, symmetric=False),
     dict(config=GemvConfig(16, 64, 2, stages=2), config2=GemvConfig(32, 64, 2, split_k=2))),
    ("T4-rows2-both-split", dict(E=2, H=256, F=128, k=2, T=4),
     dict(config=GemvConfig(16, 64, 2, split_k=2), config2=GemvConfig(64, 64, 2, split_k=2), rows=2)),
    ("top1-y-direct-partial-block", dict(E=5, H=96, F=160, k=1, T=2, G=32),
     dict(config=GemvConfig(16, 32, 2), config2=GemvConfig(64, 32, 2))),
    ("one-token-k3-asym", dict(E=5, H=128, F=128, k=3, T=1, G=64, symmetric=False),
     dict(config=GemvConfig(16, 64, 2, split_k=2), config2=GemvConfig(32, 64, 2, split_k=2))),
]


@pytest.fixture
def fused_calls(monkeypatch):
    """(gemm1 keywords, gemm2 keywords, the counters after the launch) of every int4_gemv.gemv_fused_gemms call."""
    calls = []
    real = gv.gemv_fused_gemms

    def spy(xp, xw, act, act_w, weights, plan, gemm1, gemm2, counters, pdl=False):
        real(xp, xw, act, act_w, weights, plan, gemm1, gemm2, counters, pdl)
        calls.append((gemm1, gemm2, counters.clone()))

    monkeypatch.setattr(gv, "gemv_fused_gemms", spy)
    return calls


@pytest.mark.parametrize("case,kw", [c[1:] for c in FUSED_CASES], ids=[c[0] for c in FUSED_CASES])
def test_fused_launch_gives_the_two_launches_bits(case, kw, fused_calls, monkeypatch, nan_buffers):
    x, q, ids, tw, plan = make_case(**case)
    if case["T"] == 1:
        plan = RoutingPlan.build(ids, tw, q.num_experts, defer=True)
    monkeypatch.setenv(gv.FUSED_ENV, "0")
    expected = gv.moe_forward_int4_gemv(x, q, plan, **kw)
    assert not fused_calls
    monkeypatch.setenv(gv.FUSED_ENV, "1")
    y = check(x, q, ids, tw, plan, **kw)
    assert torch.equal(y, expected) and torch.isfinite(y).all()
    [(gemm1, gemm2, counters)] = fused_calls
    # every ticket was taken; each real row block's GEMM2 K slices were counted complete by exactly their GEMM1
    # column blocks (the count a GEMM2 tile waits for), and the row blocks past the routing's last were never touched
    E, rows, F, H = q.num_experts, gemm1["rows"], q.ffn_size, q.hidden_size
    grid1 = gv.gemv_grid(plan.num_rows, E, rows, F, gemm1["config"], gemm1["split_k"])
    grid2 = gv.gemv_grid(plan.num_rows, E, rows, H, gemm2["config"], gemm2["split_k"])
    assert gemm2["split_k"] == kw["config2"].split_k or kw["config2"].split_k == 0
    real = case["k"] if case["T"] == 1 else sum(-(-int(n) // rows) for n in torch.bincount(ids.flatten(),
                                                                                         minlength=E))
    ready = counters[1:].view(grid1[0], gemm2["split_k"]).cpu()
    assert counters[0] == math.prod(grid1) + math.prod(grid2)
    assert (ready[:real] == F // gemm2["split_k"] // gemm1["config"].block_n).all() and (ready[real:] == 0).all()


def test_fusion_rules(fused_calls, monkeypatch):
    cfg = GemvConfig(16, 64, 2)
    assert gv.fusion_blocker(512, cfg, GemvConfig(32, 64, 4), 1, 1) == "GEMM1 has 2 warps, GEMM2 4"
    assert "160 are not whole blocks of 64" in gv.fusion_blocker(320, GemvConfig(64, 64, 2), cfg, 1, 2)
    assert gv.fusion_blocker(384, GemvConfig(64, 64, 2), cfg, 2, 1) is None
    monkeypatch.setenv(gv.FINISH_ENV, "kernel")  # a split GEMM1 must finish the SwiGLU in its last slice
    assert gv.fusion_blocker(384, GemvConfig(64, 64, 2), cfg, 2, 1) == "MOE_TUT_GEMV_FINISH=kernel"
    monkeypatch.delenv(gv.FINISH_ENV)
    monkeypatch.setenv(gv.FUSED_ENV, "1")
    x, q, ids, tw, plan = make_case(E=4, H=128, F=256, k=2, T=2)
    check(x, q, ids, tw, plan, config=cfg, config2=GemvConfig(32, 64, 4))  # not fusable: two launches, still right
    assert not fused_calls
    monkeypatch.setattr(gv, "interpreting", lambda: False)  # the GPU's defaults fuse with one warp count
    c1, c2 = gv.default_configs(torch.device("cpu"), 0.25, fused=True)
    assert (c1, c2) == (gv.FUSED_GEMM1_CONFIG, gv.FUSED_GEMM2_CONFIG) and c1.num_warps == c2.num_warps
    # H100 (132 SMs): GEMM1 in the fused launch cut to GEMV_SPLIT_K_MAX slices on mixtral (2 x 224 programs of 64
    # columns) and deepseek-v3 (8 x 32), where two launches cut it in 4 and 4
    per_sm = gv.FUSED_GEMM1_PROGRAMS_PER_SM
    assert gv.gemv_split_k(448, 4096, 128, 132, per_sm) == gv.gemv_split_k(256, 7168, 128, 132, per_sm) == 8
    assert gv.gemv_split_k(448, 4096, 128, 132) == gv.gemv_split_k(256, 7168, 128, 132) == 4
    monkeypatch.setenv(gv.FUSED_ENV, "yes")
    with pytest.raises(ValueError, match="MOE_TUT_GEMV_FUSED='yes'"):
        gv.moe_forward_int4_gemv(x, q, plan)
    monkeypatch.setenv(gv.FUSED_ENV, " ")  # blank: auto, one launch for one token whose GEMM2 is split along K
    big = gv.FUSED_MIN_WEIGHT_BYTES
    assert gv.fuse_gemms(True, 2, big) and not gv.fuse_gemms(True, 1, big) and not gv.fuse_gemms(False, 8, big)
    assert not gv.fuse_gemms(True, 2, big - 1)  # a small forward: two launches
    monkeypatch.setenv(gv.FUSED_ENV, "1")
    assert gv.fuse_gemms(False, 1, 0)
    monkeypatch.setenv(gv.FUSED_ENV, "0")
    assert not gv.fuse_gemms(True, 8, big)


def test_fused_launch_refuses_what_it_cannot_run():
    x, q, ids, tw, plan = make_case(E=4, H=128, F=256, k=2, T=2)
    xp, xw = gv.prepare_activations(x)
    act, act_w = gv._prepared_buffers(plan.num_rows, 256, x)
    cfg = GemvConfig(16, 64, 2)
    gemm1 = dict(rows=1, config=cfg, split_k=1, gather_rows=True, swiglu=True, out=act, out_w=act_w)
    gemm2 = dict(rows=1, config=cfg, split_k=1, weight_scatter=True, out=torch.empty(1, 4, 128, device=DEVICE))
    zeros = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="one launch: need 1 \\+ 4 int32 counters, got 2"):
        gv.gemv_fused_gemms(xp, xw, act, act_w, q, plan, gemm1, gemm2, zeros[:2])
    with pytest.raises(ValueError, match="one launch: GEMM1 has 2 warps, GEMM2 4"):
        gv.gemv_fused_gemms(xp, xw, act, act_w, q, plan, gemm1, dict(gemm2, config=GemvConfig(16, 64, 4)), zeros)
    split = dict(gemm1, split_k=2, out=torch.empty(2, 4, 512, device=DEVICE), out_w=None)
    with pytest.raises(ValueError, match="one launch: GEMM1 is split along K but has no finish_into"):
        gv.gemv_fused_gemms(xp, xw, act, act_w, q, plan, split, gemm2, zeros)


def test_one_token_with_gemm2_split_takes_the_fused_launch_by_default(fused_calls, monkeypatch):
    monkeypatch.delenv(gv.FUSED_ENV, raising=False)
    monkeypatch.setattr(gv, "FUSED_MIN_WEIGHT_BYTES", 0)  # the test's experts are tiny
    x, q, ids, tw, _ = make_case(E=4, H=256, F=512, k=2, T=1)
    one_token = RoutingPlan.build(ids, tw, 4, defer=True)
    check(x, q, ids, tw, one_token, split_k=2)
    assert len(fused_calls) == 1 and fused_calls[0][1]["split_k"] == 2
    check(x, q, ids, tw, one_token, split_k=1)  # GEMM2 not split: two launches
    x, q, ids, tw, plan = make_case(E=4, H=256, F=512, k=2, T=2)
    check(x, q, ids, tw, plan, split_k=2)  # two tokens: two launches
    assert len(fused_calls) == 1


def test_gemv_schedule_is_cached_and_follows_the_environment(monkeypatch):
    monkeypatch.setattr(gv, "FUSED_MIN_WEIGHT_BYTES", 0)
    x, q, ids, tw, _ = make_case(E=4, H=256, F=512, k=2, T=1)
    plan = RoutingPlan.build(ids, tw, 4, defer=True)
    monkeypatch.setenv(gv.FUSED_ENV, "auto")
    fused = gv.gemv_schedule(q, plan, 1, True, x.device, split_k=2)
    assert fused is gv.gemv_schedule(q, plan, 1, True, x.device, split_k=2)  # cached
    assert fused.fused and fused.n_fused == 1 + 2 * 2 and fused.sum_in_gemm2 and not plan.is_built  # 2 slots
    monkeypatch.setenv(gv.FUSED_ENV, "0")
    two = gv.gemv_schedule(q, plan, 1, True, x.device, split_k=2)
    assert not two.fused and two.n_fused == 0 and two.split2 == 2
    monkeypatch.setenv(gv.ONE_TOKEN_SUM_ENV, "kernel")
    assert not gv.gemv_schedule(q, plan, 1, True, x.device, split_k=2).sum_in_gemm2
    monkeypatch.setenv(gv.FINISH_ENV, "kernel")
    assert gv.gemv_schedule(q, plan, 1, True, x.device, split_k=2).n_finish == 0
    monkeypatch.setenv(gv.CONFIG_ENV, "16,64,2")
    assert gv.gemv_schedule(q, plan, 1, True, x.device).config1 == GemvConfig(16, 64, 2)
    monkeypatch.setenv(gv.FUSED_ENV, "sometimes")
    with pytest.raises(ValueError, match="MOE_TUT_GEMV_FUSED"):
        gv.gemv_schedule(q, plan, 1, True, x.device)


def test_one_token_path_out_of_range_id_adds_nothing():
    x, q, _, tw, _ = make_case(E=4, H=64, F=128, k=3, T=1, G=64)
    ids = torch.tensor([[1, 9, 0]], device=DEVICE)
    ok_ids, ok_w = ids.clone(), tw.clone()
    ok_ids[0, 1], ok_w[0, 1] = 0, 0.0
    y = gv.moe_forward_int4_gemv(x, q, RoutingPlan.build(ids, tw, 4, validate=False, defer=True))
    assert torch.equal(y, gv.moe_forward_int4_gemv(x, q, RoutingPlan.build(strided_copy(ok_ids), strided_copy(ok_w),
                                                                              4)))


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_expert_with_more_rows_than_a_block(rows, nan_buffers):
    # expert 0 gets 5 rows (tokens repeat it), expert 3 none: ROWS = 1, 2, 4 all need several row blocks,
    # the last one partial, and the rows must land in the right token slots
    ids = [[0, 0], [0, 1], [2, 0], [0, 2]]
    x, q, ids, tw, plan = make_case(4, 64, 128, 2, 4, G=64, ids=ids)
    check(x, q, ids, tw, plan, rows=rows)


def test_hot_expert_and_fp16(nan_buffers):
    # 'hot' routing: expert 0 in almost every token's top-k; fp16 activations (weights dequantise to fp16)
    x, q, ids, tw, plan = make_case(6, 64, 128, 2, 4, "hot", G=32, dtype=torch.float16)
    assert q.dtype == torch.float16
    check(x, q, ids, tw, plan, rows=2)


def test_split_k_changes_only_rounding():
    x, q, ids, tw, plan = make_case(4, 128, 128, 2, 2, "zipf", G=32, symmetric=False)
    y1 = gv.moe_forward_int4_gemv(x, q, plan, split_k=1)
    y4 = gv.moe_forward_int4_gemv(x, q, plan, split_k=4)
    assert relative_error(y4, y1.float()) < 1e-2


# ---- the intermediate results, checked tightly ---------------------------------------------------------


def test_prepared_activations():
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.bfloat16)
    xp, xw = gv.prepare_activations(x)
    ref_p, ref_w = gv.prepare_activations_reference(x)
    assert torch.equal(xp, ref_p)  # a bf16 value times a power of two: exact
    torch.testing.assert_close(xw, ref_w, rtol=1e-6, atol=1e-6)
    assert torch.equal(gv.unprepare_activations(xp), x.float())


@pytest.mark.parametrize("G,symmetric,one_in_mask", [(32, False, True), (64, True, False), (128, False, False),
                                                    (128, True, True)])
@pytest.mark.parametrize("split", [1, 2])
def test_gemms_differ_from_dequantize_then_multiply_only_by_float32_rounding(G, symmetric, one_in_mask, split,
                                                                               nan_buffers, monkeypatch):
    # GEMM1 (gathered rows, SwiGLU) and GEMM2 (routing weight, slot scatter) against float64 products with
    # the float32 dequantised weights (c s + z exactly), in both forms of the code extraction (one_in_mask)
    monkeypatch.setattr(gv, "one_in_mask", lambda device: one_in_mask)
    E, H, F, k, T = 4, 128, 128, 2, 3
    x, q, ids, tw, plan = make_case(E, H, F, k, T, "zipf", G, symmetric)
    cfg = gv.adapt_block_k(GemvConfig(64, 64, 4), G)
    w13 = dequantize(q.w13, torch.float32).double()
    w2 = dequantize(q.w2, torch.float32).double()
    rows = plan.num_rows
    experts = torch.repeat_interleave(torch.arange(E, device=DEVICE), plan.expert_counts.long())
    tokens = plan.sorted_token_ids.long()
    xp, xw = gv.prepare_activations(x)
    act, act_w = gv._prepared_buffers(rows, F, x)
    if split == 1:
        gv.gemv_grouped_gemm(xp, xw, q.w13, plan, rows=2, config=cfg, split_k=1, gather_rows=True, swiglu=True,
                             out=act, out_w=act_w)
    else:
        part1 = gv._alloc_f32((split, rows, 2 * F), x)
        gv.gemv_grouped_gemm(xp, xw, q.w13, plan, rows=2, config=cfg, split_k=split, gather_rows=True, swiglu=True,
                             out=part1)
        gv._gemv_swiglu_finish_kernel[(rows, 1)](part1, act, act_w, F, part1.stride(0), part1.stride(1),
                                                 act.stride(0), act_w.stride(0), SPLIT_K=split, BLOCK=F)
    h = torch.einsum("rh,rnh->rn", x.double()[tokens], w13[experts])
    act_ref = swiglu(h)
    act_plain = gv.unprepare_activations(act)
    assert relative_error(act_plain, act_ref) < FP32_TOL
    torch.testing.assert_close(act_w, act_plain.view(rows, F // 8, 8).sum(2), rtol=1e-5, atol=1e-6)

    part2 = gv._alloc_f32((split, rows, H), x)
    gv.gemv_grouped_gemm(act, act_w, q.w2, plan, rows=1, config=cfg, split_k=split, weight_scatter=True, out=part2)
    out_ref = torch.einsum("rf,rhf->rh", act_plain.double(), w2[experts]) * plan.sorted_weights.double()[:, None]
    slots = plan.sorted_slots.long()
    assert relative_error(part2.sum(0)[slots], out_ref) < FP32_TOL


# ---- the switch in moe_forward_triton_int4 -------------------------------------------------------------


@pytest.fixture
def gemv_calls(monkeypatch):
    """The keyword arguments of every call of int4_gemv.gemv_forward (which still runs): the GEMV forward that
    moe_forward_int4_gemv and triton_int4's decode batches run."""
    calls = []
    real = gv.gemv_forward

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(gv, "gemv_forward", spy)
    return calls


def test_triton_int4_routes_decode_batches_to_gemv(gemv_calls, monkeypatch):
    calls = gemv_calls
    v = ig.Int4Variant.parse("magic,post,split,gemv")
    assert v.gemv == gv.GEMV_MAX_TOKENS == 4
    x, q, ids, tw, plan = make_case(4, 64, 128, 2, 3, G=64)
    y = ig.moe_forward_triton_int4(x, q, plan, variant=v)
    assert len(calls) == 1 and relative_error(y, int4_moe_reference(x, q, ids, tw)) < TOL
    ig.moe_forward_triton_int4(x, q, plan, variant=ig.Int4Variant.parse("gemv=2"))  # T = 3 > 2: tl.dot path
    ig.moe_forward_triton_int4(x, q, plan, variant=v, path="prefill")  # prefill regime: tl.dot path
    assert len(calls) == 1
    ig.moe_forward_triton_int4(x, q, plan, variant=ig.Int4Variant.parse("gemv,splitk=2"))
    assert calls[-1] == dict(split_k=2)
    monkeypatch.setenv(ig.VARIANT_ENV, "gemv")  # the harness's way in
    ig.moe_forward_triton_int4(x, q, plan)
    assert len(calls) == 3
    # T = 3 > 2 tokens, but 3 * 2 / 8 <= 1 row per expert: the GEMV kernels with gemvrows=1, not without it
    x, q, ids, tw, plan = make_case(8, 64, 128, 2, 3, G=64)
    ig.moe_forward_triton_int4(x, q, plan, variant=ig.Int4Variant.parse("gemv=2"))
    assert len(calls) == 3
    y = ig.moe_forward_triton_int4(x, q, plan, variant=ig.Int4Variant.parse("gemv=2,gemvrows=1"))
    assert len(calls) == 4 and relative_error(y, int4_moe_reference(x, q, ids, tw)) < TOL
    assert ig.DECODE_VARIANT.takes_gemv(16, 8, 256) and ig.DECODE_VARIANT.takes_gemv(16, 8, 128)  # deepseek-v3, qwen3
    assert ig.DECODE_VARIANT.takes_gemv(4, 2, 8) and not ig.DECODE_VARIANT.takes_gemv(8, 2, 8)  # mixtral T=4, T=8


def test_variant_text():
    assert ig.Int4Variant.parse("gemv") == ig.Int4Variant(gemv=4)
    v = ig.Int4Variant.parse("magic,post,split,asm,gemv=2")
    assert v.gemv == 2 and ig.Int4Variant.parse(v.label()) == v
    v = ig.Int4Variant.parse("gemv,gemvrows=0.5")
    assert v.gemv_rows == 0.5 and ig.Int4Variant.parse(v.label()) == v
    with pytest.raises(ValueError, match="gemvrows"):
        ig.Int4Variant.parse("gemvrows=-1")
    assert ig.Int4Variant.parse(ig.Int4Variant(gemv=4).label()).gemv == 4
    assert ig.DECODE_VARIANT.gemv == 4  # the default: T <= 4 runs the GEMV kernels (H100, int4_gemv_v1)
    with pytest.raises(ValueError, match="gemv=N"):
        ig.Int4Variant.parse("gmv")
    with pytest.raises(ValueError, match="token count"):
        ig.Int4Variant(gemv=-1)


# ---- host-side rules -------------------------------------------------------------------------------------


def test_rows_split_and_block_rules():
    assert gv.rows_per_block(1, 2, 8) == 1 and gv.rows_per_block(4, 2, 8) == 1  # mixtral T=1, 4
    assert gv.rows_per_block(8, 2, 8) == 2 and gv.rows_per_block(64, 2, 8) == gv.MAX_ROWS_PER_BLOCK
    assert gv.rows_per_block(4, 8, 256) == 1  # deepseek-v3
    # H100 (132 SMs), BLOCK_K 128: mixtral T=1 GEMM1 at BLOCK_N 32 (2 x 448 programs, 6.8 per SM) is split in 2,
    # a GEMM with 7 per SM is not; GEMM2 (K = 14336) in 8 at BLOCK_N 64 (2 x 64 programs), in 4 at BLOCK_N 32;
    # qwen3 T=1 GEMM2 (K = 768, 8 x 32 programs) in 2, not 4 (slices would be < GEMV_MIN_SLICE = 256)
    assert gv.gemv_split_k(896, 4096, 128, 132) == 2
    assert gv.gemv_split_k(7 * 132, 4096, 128, 132) == 1
    assert gv.gemv_split_k(128, 14336, 128, 132) == 8
    assert gv.gemv_split_k(256, 14336, 128, 132) == 4
    assert gv.gemv_split_k(8, 14336, 128, 132) == gv.GEMV_SPLIT_K_MAX
    assert gv.gemv_split_k(256, 768, 128, 132) == 2
    assert gv.gemv_split_k(256, 384, 128, 132) == 1
    assert gv.resolve_split_k(GemvConfig(split_k=8), 10, 768, 132) == 2  # lowered until K holds whole steps
    assert gv.adapt_block_k(GemvConfig(32, 128, 4), 96).block_k == 32
    assert gv.adapt_block_k(GemvConfig(32, 128, 4), 256).block_k == 128
    assert GemvConfig.parse("64, 128, 8, 2") == GemvConfig(64, 128, 8, 2)
    assert GemvConfig.parse("16,128,2,0,3") == GemvConfig(16, 128, 2, stages=3)
    assert GemvConfig(32, 128, 4, 2, 3).label() == "n32k128w4s2st3"
    with pytest.raises(ValueError, match="BLOCK_N,BLOCK_K,warps"):
        GemvConfig.parse("64,128")
    with pytest.raises(ValueError, match="power of two"):
        GemvConfig(24, 128, 4)
    with pytest.raises(ValueError, match="stages"):
        GemvConfig(32, 128, 4, stages=0)


def test_configs_pinned_by_the_environment(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(gv.CONFIG_ENV, "32,128,4,0,3; 32,128,4")
    assert gv.default_configs(cpu, 4.0) == (GemvConfig(32, 128, 4, stages=3), GemvConfig(32, 128, 4))
    monkeypatch.setenv(gv.CONFIG_ENV, "16,128,4")  # GEMM2 left as the module's
    assert gv.default_configs(cpu) == (GemvConfig(16, 128, 4), gv.DEFAULT_GEMM2_CONFIG)
    for bad, match in (("16,128", "BLOCK_N,BLOCK_K,warps"), ("16,128,2;16,128,2;16,128,2", "at most two"),
                       ("24,128,2", "power of two")):
        monkeypatch.setenv(gv.CONFIG_ENV, bad)
        with pytest.raises(ValueError, match=f"MOE_TUT_GEMV_CONFIG=.*{match}"):
            gv.default_configs(cpu)
    monkeypatch.setenv(gv.CONFIG_ENV, " ")  # blank: as unset
    monkeypatch.setattr(gv, "interpreting", lambda: False)
    assert gv.default_configs(cpu) == (gv.DEFAULT_GEMM1_CONFIG, gv.DEFAULT_GEMM2_CONFIG)


def test_default_gemm1_block_by_rows_per_expert(monkeypatch):
    monkeypatch.setattr(gv, "interpreting", lambda: False)  # the GPU's choice (the interpreter has its own)
    cpu = torch.device("cpu")
    assert gv.default_configs(cpu, 2 * 1 / 8) == (gv.DEFAULT_GEMM1_CONFIG, gv.DEFAULT_GEMM2_CONFIG)  # mixtral T=1
    assert gv.default_configs(cpu, 2 * 2 / 8)[0] == gv.WIDE_GEMM1_CONFIG  # mixtral T=2: half a row per expert
    assert gv.default_configs(cpu, 8 * 4 / 256)[0] == gv.DEFAULT_GEMM1_CONFIG  # deepseek-v3 T=4
    assert gv.default_configs(cpu)[0] == gv.DEFAULT_GEMM1_CONFIG


def test_unsupported_weights_and_zero_tokens():
    x, q, ids, tw, plan = make_case(3, 64, 64, 2, 2, G=4)  # a word of 8 codes would span two groups
    assert "multiple of 8" in gv.gemv_unsupported(q)
    with pytest.raises(ValueError, match="multiple of 8"):
        gv.moe_forward_int4_gemv(x, q, plan)
    x, q, ids, tw, plan = make_case(3, 64, 64, 2, 2, G=64)
    ids0 = torch.empty(0, 2, dtype=torch.long, device=DEVICE)
    plan0 = RoutingPlan.build(ids0, torch.empty(0, 2, device=DEVICE), 3)
    assert gv.moe_forward_int4_gemv(x[:0], q, plan0).shape == (0, 64)
    with pytest.raises(ValueError, match="power of two"):
        gv.moe_forward_int4_gemv(x, q, plan, rows=3)


# ---- GPU code generation, checked on any machine ---------------------------------------------------------

# Compiles the kernel for NVIDIA targets without a GPU (Triton ships ptxas) with the interpreter off: catches
# constructs that fail to lower, and guards the two properties the design relies on: the K loop converts no
# layout (no shared memory round trip per step) and the packed words arrive as 128-bit loads.
AOT_SCRIPT = r"""
import json, re
from aot import compile_kernel
from moe_tut.kernels import int4_gemv as gv

roles = {  # role: flags, N, K, group size, zeros, config
    "gemm1": (dict(GATHER_X=True, SWIGLU=True, ACT_OUT=True, WEIGHT_SCATTER=False, SPLIT_K=1), 14336, 4096, 128,
              False, gv.DEFAULT_GEMM1_CONFIG),
    "gemm2-asym-splitk4": (dict(GATHER_X=False, SWIGLU=False, ACT_OUT=False, WEIGHT_SCATTER=True, SPLIT_K=4), 4096,
                           14336, 128, True, gv.DEFAULT_GEMM2_CONFIG),
    "gemm1-unpipelined": (dict(GATHER_X=True, SWIGLU=True, ACT_OUT=True, WEIGHT_SCATTER=False, SPLIT_K=2), 14336,
                          4096, 128, False, gv.GemvConfig(32, 128, 4)),
    "gemm2-asym-pipelined": (dict(GATHER_X=False, SWIGLU=False, ACT_OUT=False, WEIGHT_SCATTER=True, SPLIT_K=4), 4096,
                             14336, 128, True, gv.GemvConfig(64, 128, 4, stages=3)),
}
out = []
for cc in (80, 90):
    for role, (flags, N, K, G, hz, cfg) in roles.items():
        const = dict(flags, N=N, KW=K // 8, E=8, E_PAD=16, GROUP_SIZE=G, HAS_ZEROS=hz, ROWS=1, BLOCK_N=cfg.block_n,
                     BLOCK_K=cfg.block_k, ONE_IN_MASK=cc < 90, STAGES=cfg.stages)  # ONE_IN_MASK as one_in_mask
        kernel = compile_kernel(
            gv._gemv_kernel, const,
            ptr_types=dict(x_ptr="*fp32", xw_ptr="*fp32", q_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16",
                           out_ptr="*fp32", out_w_ptr="*fp32", row_weight_ptr="*fp32"),
            unit_strides=("stride_sn", "stride_zn"),
            aligned=("x_ptr", "xw_ptr", "q_ptr", "s_ptr", "z_ptr", "out_ptr", "out_w_ptr", "stride_xm", "stride_xwm",
                     "stride_qe", "stride_qn", "stride_se", "stride_sg", "stride_ze", "stride_zg", "stride_os",
                     "stride_om", "stride_owm", "one_bits"),
            cc=cc, num_warps=cfg.num_warps, num_stages=cfg.stages)
        ttgir = kernel.asm["ttgir"]
        loop = ttgir[ttgir.index("scf.for"):]
        loop = loop[:loop.index("scf.yield")]
        ptx = kernel.asm["ptx"]
        out.append(dict(cc=cc, role=role, loop_converts=loop.count("convert_layout") + loop.count("local_alloc"),
                        v4_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx)),
                        async_16b=len(re.findall(r"cp\.async\.cg\.shared\.global(?:\.\w+)* \[[^]]+\], \[[^]]+\], 0x10",
                                                 ptx)),
                        pipelined=cfg.stages > 1))
print(json.dumps(out))
"""


def test_kernel_compiles_for_sm80_and_sm90_without_conversions_in_the_k_loop():
    from aot import run_aot_script

    results = run_aot_script(AOT_SCRIPT)
    assert len(results) == 8 and sum(r["pipelined"] for r in results) == 4
    for r in results:
        # GEMM1: gate and up words + 8 activation vectors; GEMM2: words + 8 activation vectors + word sums, each
        # 16 bytes per thread: 128-bit loads, or (pipelined) 16-byte asynchronous copies into shared memory
        assert r["loop_converts"] == 0 and r["async_16b" if r["pipelined"] else "v4_loads"] >= 9, r


FUSED_AOT_SCRIPT = r"""
import json, re
from aot import compile_kernel
from moe_tut.kernels import int4_gemv as gv

c1, c2 = gv.FUSED_GEMM1_CONFIG, gv.FUSED_GEMM2_CONFIG
f32 = "*fp32"
out = []
for cc in (80, 90):  # mixtral T = 1 as the forward launches it: GEMM1 in 8 K slices, GEMM2 in 8, slots summed in GEMM2
    const = dict(H=4096, F=14336, E=8, E_PAD=16, GROUP1=128, GROUP2=128, HAS_ZEROS1=False, HAS_ZEROS2=False, SPLIT1=8,
                 SPLIT2=8, ROWS=1, BLOCK_N1=c1.block_n, BLOCK_K1=c1.block_k, STAGES1=c1.stages, BLOCK_N2=c2.block_n,
                 BLOCK_K2=c2.block_k, STAGES2=c2.stages, ONE_IN_MASK=cc < 90, ONE_TOKEN_TOPK=2, SUM_SLOTS_LAST=True,
                 ACT_CACHE=gv.act_cache(14336, 8), USE_PDL=cc >= 90)
    kernel = compile_kernel(
        gv._gemv_fused_kernel, const,
        ptr_types=dict(x_ptr=f32, xw_ptr=f32, q1_ptr="*i32", s1_ptr="*bf16", z1_ptr="*bf16", out1_ptr=f32,
                       out1_w_ptr=f32, act_ptr=f32, act_w_ptr=f32, q2_ptr="*i32", s2_ptr="*bf16", z2_ptr="*bf16",
                       out2_ptr=f32, x_rows_ptr="*i64", row_weight_ptr=f32, y_ptr="*bf16"),
        unit_strides=("stride_s1n", "stride_z1n", "stride_s2n", "stride_z2n"),
        aligned=("x_ptr", "xw_ptr", "q1_ptr", "s1_ptr", "act_ptr", "act_w_ptr", "q2_ptr", "s2_ptr", "out1_ptr",
                 "out2_ptr", "stride_xm", "stride_xwm", "stride_q1e", "stride_q1n", "stride_q2e", "stride_q2n",
                 "stride_s1e", "stride_s1g", "stride_s2e", "stride_s2g", "stride_am", "stride_awm", "stride_o1s",
                 "stride_o1m", "stride_o2s", "stride_o2m", "one_bits"),
        cc=cc, num_warps=c1.num_warps, num_stages=1, maxnreg=gv.FUSED_MAXNREG)
    ptx = kernel.asm["ptx"]
    out.append(dict(cc=cc, maxnreg=re.findall(r"\.maxnreg (\d+)", ptx),
                    async_16b=len(re.findall(r"cp\.async\.cg\.shared\.global(?:\.\w+)* \[[^]]+\], \[[^]]+\], 0x10",
                                             ptx))))
print(json.dumps(out))
"""


def test_fused_kernel_compiles_for_sm80_and_sm90_under_its_register_cap():
    # the one-launch kernel as the forward runs it (register cap included): GEMM1's K loop still pipelined (16-byte
    # asynchronous copies of its gate and up words and activations)
    from aot import run_aot_script

    results = run_aot_script(FUSED_AOT_SCRIPT)
    assert [r["cc"] for r in results] == [80, 90]
    for r in results:
        assert r["maxnreg"] == [str(gv.FUSED_MAXNREG)] and r["async_16b"] >= 9, r


# ---- GPU: preset-like shapes --------------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The presets' H and F with fewer experts (deepseek-v3, qwen3 keep their top-k), so weights build fast.
GPU_SHAPES = {"mixtral": (8, 4096, 14336, 2), "deepseek-v3-32e": (32, 7168, 2048, 8), "qwen3-30b-a3b": (128, 2048,
                                                                                                         768, 8)}


@functools.cache
def gpu_weights(shape: str, symmetric: bool) -> Int4ExpertWeights:
    E, H, F, k = GPU_SHAPES[shape]
    return Int4ExpertWeights.from_bf16(ExpertWeights.random(custom(E, H, F, k), device=DEVICE), 128, symmetric)


@gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("T", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_gpu_preset_shapes(shape, T, symmetric):
    E, H, F, k = GPU_SHAPES[shape]
    q = gpu_weights(shape, symmetric)
    ids, tw = simulate_routing(T, E, k, "uniform", seed=T, device=DEVICE)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(DEVICE, torch.bfloat16)
    plan = RoutingPlan.build(ids, tw, E)
    y = check(x, q, ids, tw, plan)
    for kw in (dict(rows=2), dict(split_k=1), dict(split_k=4), dict(config=GemvConfig(64, 128, 8)),
               dict(config=GemvConfig(32, 128, 4)), dict(config=GemvConfig(64, 128, 4, 2, 3), config2=GemvConfig(
                   64, 128, 4, stages=3))):
        assert relative_error(gv.moe_forward_int4_gemv(x, q, plan, **kw), y.float()) < TOL, kw
    variant = ig.Int4Variant.parse("magic,post,split,asm,gemv=8")
    assert relative_error(ig.moe_forward_triton_int4(x, q, plan, variant=variant), y.float()) < 1e-2


@gpu
@needs_cuda
def test_gpu_forward_replays_in_a_cuda_graph():
    # no host sync: capture works and replays match a fresh call (plan built inside, as the harness does)
    x, q, ids, tw, plan = make_case(8, 1024, 2048, 2, 2, "uniform")

    def forward():
        return gv.moe_forward_int4_gemv(x, q, RoutingPlan.build(ids, tw, 8, validate=False))

    y = forward()
    graph, y_graph = capture_graph(forward)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_graph, y)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_gpu_one_token_slot_sum_in_gemm2(shape, monkeypatch):
    # the arrival counters across SMs: the same bits as the slot-sum kernel, eagerly and over graph replays with
    # new x and routing each time (the prep kernel zeroes the counters every forward)
    E, H, F, k = GPU_SHAPES[shape]
    q = gpu_weights(shape, True)
    x = torch.randn(1, H, device=DEVICE).bfloat16()
    ids, tw = simulate_routing(1, E, k, "uniform", device=DEVICE)
    plan = RoutingPlan.build(ids, tw, E, defer=True)

    def forward(mode):
        monkeypatch.setenv(gg.ONE_TOKEN_SUM_ENV, mode)
        return gv.moe_forward_int4_gemv(x, q, plan)

    assert torch.equal(forward("gemm2"), forward("kernel"))
    check(x, q, ids, tw, plan)
    monkeypatch.setenv(gg.ONE_TOKEN_SUM_ENV, "gemm2")
    graph, y_graph = capture_graph(lambda: gv.moe_forward_int4_gemv(x, q, plan))
    for seed in range(1, 6):
        x.copy_(torch.randn(1, H, generator=torch.Generator().manual_seed(seed)).to(DEVICE, x.dtype))
        new_ids, new_tw = simulate_routing(1, E, k, "uniform", seed=seed, device=DEVICE)
        plan.topk_ids.copy_(new_ids)
        plan.topk_weights.copy_(new_tw)
        graph.replay()
        assert torch.equal(y_graph, forward("kernel")), seed


@gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_gpu_split_gemm1_finishes_in_its_last_slice(shape, T, symmetric, monkeypatch):
    # the arrival counters of GEMM1's K slices across SMs, over graph replays with new x each time. Symmetric: the
    # same bits as the finisher kernel. With zero points act' also carries word sums, which the two kernels add in
    # another order on the GPU (a bf16 ulp in a few outputs; measured on an H100: 1-8 of 4096-16384)
    E, H, F, k = GPU_SHAPES[shape]
    q = gpu_weights(shape, symmetric)
    ids, tw = simulate_routing(T, E, k, "uniform", seed=T, device=DEVICE)
    x = torch.randn(T, H, device=DEVICE).bfloat16()
    plan = RoutingPlan.build(ids, tw, E)

    def forward(mode):
        monkeypatch.setenv(gv.FINISH_ENV, mode)
        return gv.moe_forward_int4_gemv(x, q, plan, split_k=4)

    def same(a, b):
        return torch.equal(a, b) if symmetric else relative_error(a, b) < 1e-3

    assert same(forward("gemm1"), forward("kernel"))
    check(x, q, ids, tw, plan, split_k=4)
    monkeypatch.setenv(gv.FINISH_ENV, "gemm1")
    graph, y_graph = capture_graph(lambda: gv.moe_forward_int4_gemv(x, q, plan, split_k=4))
    for seed in range(1, 4):
        x.copy_(torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to(DEVICE, x.dtype))
        graph.replay()
        assert same(y_graph, forward("kernel")), seed


@gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape,T", [("qwen3-30b-a3b", 16), ("deepseek-v3-32e", 4), ("mixtral", 8)])
def test_gpu_decode_batches_up_to_one_row_per_expert_take_gemv(shape, T, symmetric, gemv_calls):
    # The default decode variant runs the GEMV kernels past T = 4 where experts get at most one row on average
    # (qwen3 T=16: 1.0); mixtral T=8 (2 rows per expert) stays on the tl.dot path
    E, H, F, k = GPU_SHAPES[shape]
    q = gpu_weights(shape, symmetric)
    ids, tw = simulate_routing(T, E, k, "uniform", seed=T, device=DEVICE)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(DEVICE, torch.bfloat16)
    plan = RoutingPlan.build(ids, tw, E)
    y = ig.moe_forward_triton_int4(x, q, plan)
    assert len(gemv_calls) == (T * k <= E or T <= 4)
    assert relative_error(y, int4_moe_reference(x, q, ids, tw)) < TOL


@gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_gpu_fused_launch_gives_the_two_launches_bits(shape, T, symmetric, fused_calls, monkeypatch):
    # GEMM2's tiles wait on GEMM1's ready counts across SMs: the same bits as two launches of the same blocks, eagerly
    # and over graph replays with new x and routing each time (a tile that read act' before it was complete would
    # differ; the prep kernel zeroes the queue and the counts every forward)
    E, H, F, k = GPU_SHAPES[shape]
    q = gpu_weights(shape, symmetric)
    ids, tw = simulate_routing(T, E, k, "uniform", seed=T, device=DEVICE)
    x = torch.randn(T, H, device=DEVICE).bfloat16()
    # the fused launch's blocks, GEMM1's split pinned (two launches would split it less)
    blocks = dict(config=replace(gv.FUSED_GEMM1_CONFIG, split_k=8), config2=gv.FUSED_GEMM2_CONFIG)

    def forward(fused):
        monkeypatch.setenv(gv.FUSED_ENV, fused)
        return gv.moe_forward_int4_gemv(x, q, RoutingPlan.build(ids, tw, E, validate=False, defer=T == 1), **blocks)

    assert torch.equal(forward("1"), forward("0")) and len(fused_calls) == 1
    check(x, q, ids, tw, RoutingPlan.build(ids, tw, E), **blocks)
    graph, y_graph = capture_graph(lambda: forward("1"))
    for seed in range(1, 6):
        x.copy_(torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to(DEVICE, x.dtype))
        new_ids, new_tw = simulate_routing(T, E, k, "uniform", seed=seed, device=DEVICE)
        ids.copy_(new_ids)
        tw.copy_(new_tw)
        graph.replay()
        assert torch.equal(y_graph, forward("0")), seed

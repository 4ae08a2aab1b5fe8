"""Triton grouped GEMM (moe_tut.kernels.grouped_gemm): v1..v4 and the fast path against the float32
reference, on random and awkward shapes. Runs on the CPU under Triton's interpreter (`import moe_tut`
turns it on), with shapes kept tiny because the interpreter costs ~1 ms per program per K step;
`@pytest.mark.gpu` tests run real sizes where there is a GPU.
"""

import pytest
import torch

import moe_tut  # noqa: F401  (interpreter + its bf16 dot fix, before the kernels are defined)
from moe_tut.backends import get_backend
from moe_tut.bench.timing import capture_graph
from moe_tut.env import interpreting
from moe_tut.kernels import grouped_gemm as gg
from moe_tut.presets import custom, get_preset
from moe_tut.reference import moe_reference, relative_error
from moe_tut.routing import RoutingPlan, simulate_routing
from moe_tut.weights import ExpertWeights

# bf16: the interpreter's float32 -> bf16 cast truncates, which about doubles the error (~1e-2 worst
# seen here); float32 on the interpreter is exact float32, on a GPU tl.dot uses TF32.
TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4 if interpreting() else 1e-2}
VERSIONS = list(gg.VERSIONS)  # v1, v2, v3, v4, fast
# Small tiles, so tiny shapes still have several row blocks, column blocks and K steps, partial
# groups of GROUP_M, and persistent programs that loop over more than one tile.
SMALL = gg.TileConfig(16, 32, 32, group_m=2, num_warps=4, num_stages=2)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (id, E, H, F, top_k, T, routing): routing is a skew name or a function T -> topk_ids [T, k]
CASES = [
    ("T1", 4, 64, 96, 2, 1, "uniform"),  # one decode token: 2 rows, most experts empty
    ("T-lt-BM", 4, 48, 80, 2, 5, "uniform"),  # 10 rows < BLOCK_M: every block is partial
    ("empty-experts", 8, 64, 64, 1, 3, "uniform"),  # 3 rows over 8 experts
    ("all-include-0", 4, 64, 96, 2, 20,  # every token's first choice is expert 0, the second varies
     lambda T: torch.stack([torch.zeros(T, dtype=torch.long), 1 + torch.arange(T) % 3], 1)),
    ("all-to-one-top1", 5, 64, 64, 1, 37, "all_to_one"),  # top-1, all 37 rows on expert 0: 3 blocks
    ("prime-E7-zipf", 7, 64, 96, 3, 19, "zipf"),  # prime E, skewed load
    ("H40-F72", 5, 40, 72, 2, 11, "uniform"),  # multiples of 8, not of 16 or of any block: partial K, N
    ("H33-F47-unaligned", 3, 33, 47, 2, 9, "uniform"),  # not multiples of 8: rows not 16-byte aligned
    ("topk-eq-E", 4, 64, 96, 4, 9, "uniform"),  # every token to every expert
    ("prefill-rows", 4, 64, 96, 2, 40, "hot"),  # 20 rows per expert: the fast path's non-decode rule
]
CASE_IDS = [c[0] for c in CASES]


def make_case(E, H, F, k, T, routing, dtype=torch.bfloat16, seed=0):
    w = ExpertWeights.random(custom(E, H, F, k), device=DEVICE, dtype=dtype, seed=seed)
    if callable(routing):
        ids = routing(T)
        tw = torch.softmax(torch.randn(T, k, generator=torch.Generator().manual_seed(seed)), dim=1)
        ids, tw = ids.to(DEVICE), tw.to(DEVICE)
    else:
        ids, tw = simulate_routing(T, E, k, routing, seed=seed, device=DEVICE)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    return x, w, ids, tw, RoutingPlan.build(ids, tw, E)


def check(fn, x, w, ids, tw, plan, **kw):
    y = fn(x, w, plan, **kw)
    assert y.shape == x.shape and y.dtype == x.dtype
    err = relative_error(y, moe_reference(x, w, ids, tw))
    assert err < TOL[x.dtype], f"relative error {err:.3g}"
    return y


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_versions_match_reference(version, case):
    x, w, ids, tw, plan = make_case(*case[1:])
    check(gg.VERSIONS[version], x, w, ids, tw, plan, config=SMALL)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fast_path_default_configs(case):
    # config=None: the decode/prefill rule picks the tiles (one large tile under the interpreter)
    x, w, ids, tw, plan = make_case(*case[1:])
    check(gg.moe_forward_triton, x, w, ids, tw, plan)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fast_path_tma(case):
    # TMA tensor descriptors for the weights and GEMM2's A (the interpreter runs them; on a GPU only
    # sm_90+ does, others fall back to pointers). Tile edges read the next expert's rows or past the
    # end (zero-filled); the masked store must drop them. H33-F47 has unaligned rows: pointer fallback.
    x, w, ids, tw, plan = make_case(*case[1:])
    check(gg.moe_forward_triton, x, w, ids, tw, plan, config=SMALL, tma=True)


@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[6], CASES[8], CASES[9]],
                         ids=[CASES[i][0] for i in (1, 5, 6, 8, 9)])
def test_gate_up_in_one_box_gives_the_bits_of_two(case, monkeypatch):
    # MOE_TUT_TRITON_GATE_UP: GEMM1's gate and up rows as one 3-D TMA box and one dot ("box", the default), or two
    # boxes and two dots; each output sums the same products in the same order, so the bits agree. F = 72 and 80
    # (H40-F72, T-lt-BM) are not multiples of BLOCK_N: the box's rows past F must be zeros, not the up half's.
    x, w, ids, tw, plan = make_case(*case[1:])
    monkeypatch.delenv(gg.GATE_UP_ENV, raising=False)
    assert gg.gate_up_in_one_box()
    y = check(gg.moe_forward_triton, x, w, ids, tw, plan, config=SMALL, tma=True)
    monkeypatch.setenv(gg.GATE_UP_ENV, "two")
    assert not gg.gate_up_in_one_box()
    assert torch.equal(gg.moe_forward_triton(x, w, plan, config=SMALL, tma=True), y)
    monkeypatch.setenv(gg.GATE_UP_ENV, "one")
    with pytest.raises(ValueError, match="MOE_TUT_TRITON_GATE_UP='one'"):
        gg.moe_forward_triton(x, w, plan, config=SMALL, tma=True)


def test_gate_up_box_launch_flag(monkeypatch):
    # the box needs TMA, a fused gate/up GEMM and w13's halves adjacent (a contiguous [E, 2N, K]); else two dots
    flags = []
    real = gg._moe_gemm_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                flags.append(kwargs["GATE_UP_BOX"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(gg, "_moe_gemm_kernel", Spy())
    x, w, ids, tw, plan = make_case(*CASES[9][1:])
    out = torch.empty(plan.num_rows, w.ffn_size, dtype=x.dtype, device=DEVICE)
    kw = dict(gather_rows=True, swiglu=True, config=SMALL)
    gg.grouped_gemm(x, w.w13, plan, out, tma=True, **kw)
    gg.grouped_gemm(x, w.w13, plan, out, tma=False, **kw)
    padded = torch.zeros(w.num_experts, 2 * w.ffn_size + 8, w.hidden_size, dtype=x.dtype, device=DEVICE)
    padded[:, : 2 * w.ffn_size] = w.w13
    gg.grouped_gemm(x, padded[:, : 2 * w.ffn_size], plan, out, tma=True, **kw)  # expert stride != 2N rows
    ref = gg.grouped_gemm_reference(x, w.w13, plan, gather_rows=True, swiglu=True)
    assert relative_error(out, ref) < 1e-2
    gg.grouped_gemm(torch.randn(plan.num_rows, w.ffn_size, device=DEVICE, dtype=x.dtype), w.w2, plan,
                    torch.empty(plan.num_rows, w.hidden_size, dtype=x.dtype, device=DEVICE), config=SMALL, tma=True)
    assert flags == [gg.tma_supported(torch.device(DEVICE)), False, False, False]


def test_tma_choice(monkeypatch):
    dev = torch.device(DEVICE)
    assert gg.want_tma(dev, False) is False
    monkeypatch.setenv(gg.TMA_ENV, "0")
    assert gg.want_tma(dev) is False
    monkeypatch.setenv(gg.TMA_ENV, "1")
    assert gg.want_tma(dev) == gg.tma_supported(dev)
    w = torch.zeros(3, 48, 40, dtype=torch.bfloat16)
    assert gg._tma_ok(w) and gg._tma_ok(w[0])
    assert not gg._tma_ok(torch.zeros(3, 48, 33, dtype=torch.bfloat16))  # 66-byte rows
    assert not gg._tma_ok(w[:, :24])  # experts not adjacent: no 2-D view [E * N, K]


def test_decode_threshold_and_loop_options_from_environment(monkeypatch):
    monkeypatch.setenv(gg.DECODE_ENV, "4")
    assert gg.is_decode(16, 2, 8) and not gg.is_decode(17, 2, 8)
    monkeypatch.setenv(gg.DECODE_ENV, "0")
    assert not gg.is_decode(1, 1, 8)
    for bad in ("-1", "many"):
        monkeypatch.setenv(gg.DECODE_ENV, bad)
        with pytest.raises(ValueError, match=f"MOE_TUT_DECODE_MAX_ROWS='{bad}'"):
            gg.is_decode(1, 1, 8)
    monkeypatch.setenv(gg.DECODE_ENV, "")
    assert gg.decode_max_rows() == gg.DECODE_MAX_ROWS_PER_EXPERT
    monkeypatch.setenv(gg.LOOP_ENV, "flatten,ws")
    assert gg.loop_options() == (True, True)
    monkeypatch.setenv(gg.LOOP_ENV, "fast")
    with pytest.raises(ValueError, match="flatten"):
        gg.loop_options()


def test_gemm2_config_pinned_apart(monkeypatch):
    monkeypatch.setenv(gg.CONFIG_ENV, "16,32,32,2,4,2")
    monkeypatch.setenv(gg.CONFIG2_ENV, "32,16,64,1,4,2")
    x, w, ids, tw, plan = make_case(*CASES[5][1:])
    check(gg.moe_forward_triton, x, w, ids, tw, plan)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("version", ["v1", "fast"])
def test_other_dtypes(version, dtype):
    # nothing in the kernels is bf16-specific: float32 accumulators, stores cast to the output dtype
    x, w, ids, tw, plan = make_case(5, 40, 72, 2, 11, "uniform", dtype=dtype)
    check(gg.VERSIONS[version], x, w, ids, tw, plan, config=SMALL)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_output_element_is_written(version, monkeypatch):
    # Buffers are torch.empty; fill them with NaN instead, so any element the kernels skip shows up
    # in y (partial blocks, empty experts, the k = 1 case where GEMM2 writes y directly).
    def nan_alloc(shape, like, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)

    monkeypatch.setattr(gg, "_alloc", nan_alloc)
    for case in (CASES[2], CASES[6]):  # empty experts with top-1; odd H, F with top-2
        x, w, ids, tw, plan = make_case(*case[1:])
        y = check(gg.VERSIONS[version], x, w, ids, tw, plan, config=SMALL)
        assert torch.isfinite(y).all()


# One token from the router's top-k (grouped_gemm.one_token_routing): (id, E, H, F, k, ids or None, ids dtype,
# weights dtype).
ONE_TOKEN_CASES = [
    ("k2", 4, 64, 96, 2, None, torch.int64, torch.float32),
    ("k3-prime-E-int32-bf16-weights", 7, 40, 72, 3, None, torch.int32, torch.bfloat16),
    ("k1-gemm2-writes-y", 5, 64, 64, 1, None, torch.int64, torch.float32),
    ("topk-eq-E", 4, 48, 80, 4, None, torch.int64, torch.float16),
    ("duplicate-ids", 4, 64, 96, 3, [2, 2, 0], torch.int64, torch.float32),
]


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same [1, k] values with element stride 2 along k: one_token_routing refuses it (plan path)."""
    base = torch.zeros(1, 2 * t.shape[1], dtype=t.dtype, device=t.device)
    base[:, ::2] = t
    return base[:, ::2]


@pytest.mark.parametrize("case", ONE_TOKEN_CASES, ids=[c[0] for c in ONE_TOKEN_CASES])
def test_one_token_path_reads_no_plan_and_matches_the_plan_path(case, monkeypatch):
    _, E, H, F, k, fixed, ids_dtype, w_dtype = case
    x, w, ids, tw, _ = make_case(E, H, F, k, 1, "uniform", dtype=torch.float32)
    if fixed is not None:
        ids = torch.tensor([fixed], device=DEVICE)
    ids, tw = ids.to(ids_dtype), tw.to(w_dtype)
    monkeypatch.setattr(gg, "_alloc", lambda shape, like, dtype=None: torch.full(
        shape, float("nan"), dtype=dtype or like.dtype, device=like.device))
    plan = RoutingPlan.build(ids, tw, E, defer=True)
    assert gg.one_token_routing(plan) is not None
    y = check(gg.moe_forward_triton, x, w, ids.long(), tw.float(), plan)
    assert not plan.is_built and torch.isfinite(y).all()
    sorted_plan = RoutingPlan.build(strided_copy(ids), strided_copy(tw), E)
    assert gg.one_token_routing(sorted_plan) is None
    assert torch.equal(y, gg.moe_forward_triton(x, w, sorted_plan))


def test_one_token_path_out_of_range_id_adds_nothing():
    x, w, _, tw, _ = make_case(4, 64, 96, 3, 1, "uniform", dtype=torch.float32)
    ids = torch.tensor([[1, 7, 0]], device=DEVICE)
    ok_ids, ok_w = ids.clone(), tw.clone()
    ok_ids[0, 1], ok_w[0, 1] = 0, 0.0
    y = gg.moe_forward_triton(x, w, RoutingPlan.build(ids, tw, 4, validate=False, defer=True))
    assert torch.equal(y, gg.moe_forward_triton(x, w, RoutingPlan.build(strided_copy(ok_ids), strided_copy(ok_w), 4)))


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_one_token_slot_sum_in_gemm2_equals_the_slot_sum_kernel(k, monkeypatch):
    # T = 1: GEMM2's last program per column block sums the k slot rows (SUM_SLOTS_LAST); same bits as the
    # separate slot-sum kernel. H = 72: a partial last column block of 64 / 32.
    x, w, ids, tw, _ = make_case(8, 72, 40, k, 1, "uniform", seed=k)
    plan = RoutingPlan.build(ids, tw, 8, defer=True)
    for config in (None, SMALL):  # the interpreter's one big tile; 32-wide tiles: 3 column blocks
        monkeypatch.setenv(gg.ONE_TOKEN_SUM_ENV, "kernel")
        expected = gg.moe_forward_triton(x, w, plan, config=config)
        monkeypatch.setenv(gg.ONE_TOKEN_SUM_ENV, "gemm2")
        assert torch.equal(gg.moe_forward_triton(x, w, plan, config=config), expected)
    assert not plan.is_built
    monkeypatch.setenv(gg.ONE_TOKEN_SUM_ENV, "atomics")
    with pytest.raises(ValueError, match="MOE_TUT_ONE_TOKEN_SUM"):
        gg.moe_forward_triton(x, w, plan)


def test_gemm1_zeroes_the_arrival_counters_and_gemm2_counts_every_slot():
    E, H, F, k = 4, 64, 48, 3
    x, w, ids, tw, _ = make_case(E, H, F, k, 1, "uniform")
    plan = RoutingPlan.build(ids, tw, E, defer=True)
    rows = gg.one_token_routing(plan)
    arrivals = torch.full((H // 16,), 7, dtype=torch.int32, device=DEVICE)  # stale counts from anything
    inter = gg.grouped_gemm(x, w.w13, plan, torch.empty(k, F, dtype=x.dtype, device=DEVICE), gather_rows=True,
                            swiglu=True, config=SMALL, topk_rows=rows, zero_arrivals=arrivals)
    assert torch.equal(arrivals, torch.zeros_like(arrivals))
    out = torch.empty(k, H, dtype=x.dtype, device=DEVICE)
    y = torch.full((1, H), float("nan"), dtype=x.dtype, device=DEVICE)
    gg.grouped_gemm(inter, w.w2, plan, out, scale_rows=True, scatter_rows=True, config=SMALL, topk_rows=rows,
                    sum_into=(y, arrivals))
    assert torch.equal(y, gg.sum_slots(out, 1, k, x))
    assert torch.equal(arrivals[:H // 32], torch.full((H // 32,), k, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="one tile config"):  # an autotuner would count its trial runs too
        gg.grouped_gemm(inter, w.w2, plan, out, scale_rows=True, topk_rows=rows, sum_into=(y, arrivals),
                        configs=[SMALL, gg.DEFAULT_CONFIG])
    with pytest.raises(ValueError, match="at least 2 counters"):
        gg.grouped_gemm(inter, w.w2, plan, out, scale_rows=True, topk_rows=rows, config=SMALL,
                        sum_into=(y, arrivals[:1]))


@pytest.mark.parametrize("version", VERSIONS)
def test_zero_tokens(version):
    # T = 0: nothing to launch, an empty y
    E, H, F, k = 3, 32, 48, 2
    w = ExpertWeights.random(custom(E, H, F, k), device=DEVICE)
    ids = torch.empty(0, k, dtype=torch.long, device=DEVICE)
    plan = RoutingPlan.build(ids, torch.empty(0, k, device=DEVICE), E)
    y = gg.VERSIONS[version](torch.empty(0, H, dtype=torch.bfloat16, device=DEVICE), w, plan)
    assert y.shape == (0, H)


# ---- the grouped GEMM on its own, flag by flag ----------------------------------------------------

FLAGS = [  # (id, gather_rows, swiglu, scale_rows, scatter_rows)
    ("plain", False, False, False, False),
    ("gather", True, False, False, False),
    ("gather-swiglu", True, True, False, False),
    ("scale-scatter", False, False, True, True),
    ("all", True, True, True, True),
]


@pytest.mark.parametrize("version", [1, 2, 3, 4])
@pytest.mark.parametrize("flags", FLAGS, ids=[f[0] for f in FLAGS])
def test_grouped_gemm_matches_its_reference(version, flags):
    _, gather, swiglu, scale, scatter = flags
    E, K, N, T, k = 5, 40, 24, 13, 2  # N < BLOCK_N and K not a multiple of BLOCK_K; prime E
    gen = torch.Generator().manual_seed(3)
    ids, tw = simulate_routing(T, E, k, "zipf", seed=3, device=DEVICE)
    plan = RoutingPlan.build(ids, tw, E)
    rows = plan.num_rows
    a = torch.randn(T if gather else rows, K, generator=gen).to(DEVICE, torch.bfloat16)
    w = (torch.randn(E, 2 * N if swiglu else N, K, generator=gen) / K ** 0.5).to(DEVICE, torch.bfloat16)
    out = torch.full((rows, N), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    kw = dict(gather_rows=gather, swiglu=swiglu, scale_rows=scale, scatter_rows=scatter)
    gg.grouped_gemm(a, w, plan, out, version=version, config=SMALL, **kw)
    ref = gg.grouped_gemm_reference(a, w, plan, **kw)
    assert relative_error(out, ref) < 1e-2
    if version == 4:  # the TMA loads (K = 40: 80-byte rows, aligned; partial last K block)
        out.fill_(float("nan"))
        gg.grouped_gemm(a, w, plan, out, version=version, config=SMALL, tma=True, **kw)
        assert relative_error(out, ref) < 1e-2


def test_autotuner_path_runs_and_keys_exist():
    # Under the interpreter the autotuner times configs with a host clock; on a GPU with do_bench.
    # Keys that are not kernel arguments are silently ignored by triton, so check the names too.
    configs = [SMALL, gg.TileConfig(32, 32, 64, group_m=4, num_warps=4, num_stages=2)]
    tuner = gg._autotuned_kernel(tuple(configs))
    assert set(tuner.keys) <= set(tuner.arg_names)
    x, w, ids, tw, plan = make_case(*CASES[5][1:])
    out = torch.empty(plan.num_rows, w.ffn_size, dtype=x.dtype, device=DEVICE)
    gg.grouped_gemm(x, w.w13, plan, out, gather_rows=True, swiglu=True, version=4, configs=configs)
    ref = gg.grouped_gemm_reference(x, w.w13, plan, gather_rows=True, swiglu=True)
    assert relative_error(out, ref) < 1e-2
    assert tuner.best_config.kwargs["BLOCK_M"] in (16, 32)


def test_autotuner_drops_small_row_tiles_above_16_rows_per_expert():
    # more than 16 rows per expert (M_BUCKET >= 32): the 16- and 32-row tiles are not timed at all; at fewer rows,
    # or when no tall tile is offered, every candidate stays
    small, tall = SMALL, gg.TileConfig(64, 32, 32, group_m=2, num_warps=4, num_stages=2)
    cands = [small.as_triton(), tall.as_triton()]
    assert gg._drop_small_row_tiles(cands, dict(M_BUCKET=32)) == cands[1:]
    assert gg._drop_small_row_tiles(cands, dict(M_BUCKET=16)) == cands
    assert gg._drop_small_row_tiles(cands[:1], dict(M_BUCKET=64)) == cands[:1]
    x, w, ids, tw, plan = make_case(*CASES[9][1:])  # 80 rows on 4 experts: M_BUCKET 32
    tuner = gg._autotuned_kernel((small, tall))
    out = torch.empty(plan.num_rows, w.ffn_size, dtype=x.dtype, device=DEVICE)
    gg.grouped_gemm(x, w.w13, plan, out, gather_rows=True, swiglu=True, version=4, configs=[small, tall])
    assert relative_error(out, gg.grouped_gemm_reference(x, w.w13, plan, gather_rows=True, swiglu=True)) < 1e-2
    assert tuner.best_config.kwargs["BLOCK_M"] == 64 and len(tuner.configs_timings) == 1


def test_pinned_config_from_environment(monkeypatch):
    monkeypatch.setenv(gg.CONFIG_ENV, "16,32,32,2,4,2")
    assert gg.pinned_config() == SMALL
    x, w, ids, tw, plan = make_case(*CASES[1][1:])
    check(gg.moe_forward_triton, x, w, ids, tw, plan)
    monkeypatch.setenv(gg.CONFIG_ENV, "64,128")
    with pytest.raises(ValueError, match="MOE_TUT_TRITON_CONFIG='64,128': a tile config is six integers"):
        gg.moe_forward_triton(x, w, plan)
    monkeypatch.setenv(gg.CONFIG_ENV, " ")  # blank: as unset
    monkeypatch.setenv(gg.CONFIG2_ENV, "64,128,64")  # the error names the variable that holds the bad value
    with pytest.raises(ValueError, match="MOE_TUT_TRITON_CONFIG2='64,128,64': a tile config"):
        gg.pinned_config(gg.CONFIG2_ENV)
    assert gg.pinned_config() is None
    monkeypatch.setenv(gg.CONFIG_ENV, "64,100,64,8,4,3")
    with pytest.raises(ValueError, match="power of two"):
        gg.pinned_config()


# ---- GPU compilation, checked on any machine ------------------------------------------------------

# Compiles the kernel for NVIDIA targets without a GPU (triton ships ptxas), in a subprocess with
# the interpreter off. It catches what the interpreter cannot: constructs that fail to lower, and a
# K loop that is not software-pipelined (its shared memory would be one stage, not num_stages).
AOT_SCRIPT = r"""
import json
from aot import compile_kernel
from moe_tut.kernels import grouped_gemm as gg

fn = gg._moe_gemm_kernel.fn
roles = {  # GATHER_A, SWIGLU, SCALE_ROWS, SCATTER_C, MAP_FROM_OFFSETS, PERSISTENT, TMA_W, TMA_A
    "v1-gemm1": (1, 0, 0, 0, 0, 0, 0, 0), "v3-gemm2": (0, 0, 0, 0, 0, 1, 0, 0),
    "fast-gemm1": (1, 1, 0, 0, 1, 1, 0, 0), "fast-gemm2": (0, 0, 1, 1, 1, 1, 0, 0),
    "fast-gemm1-tma": (1, 1, 0, 0, 1, 1, 1, 0), "fast-gemm2-tma": (0, 0, 1, 1, 1, 1, 1, 1),
    "box-gemm1-tma": (1, 1, 0, 0, 1, 1, 1, 0),
}
# GATE_UP_BOX at the H100's prefill tile: the gate and up rows of 128 columns in one m64n256k16 wgmma per k16
box_tile = gg.TileConfig(128, 128, 64, 8, 8, 3)
names = ("GATHER_A", "SWIGLU", "SCALE_ROWS", "SCATTER_C", "MAP_FROM_OFFSETS", "PERSISTENT", "TMA_W", "TMA_A")
out = []
for cc in (80, 90):
    for role, flags in roles.items():
        if role.endswith("tma") and cc < 90:
            continue
        box = role.startswith("box")
        cfg = box_tile if box else gg.TileConfig(16, 32, 128, 8, 4, 3) if role.startswith("fast") else gg.DEFAULT_CONFIG
        const = dict(zip(names, map(bool, flags)), E=8, E_PAD=16, EVEN_K=True, BLOCK_M=cfg.block_m,
                     BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, FLATTEN=False,
                     WARP_SPECIALIZE=False, GATE_UP_BOX=box)
        kernel = compile_kernel(
            fn, const, ptr_types=dict(a_ptr="*bf16", w_ptr="*bf16", c_ptr="*bf16", row_scale_ptr="*fp32"),
            unit_strides=("stride_ak", "stride_wk", "stride_cn"),
            aligned=("a_ptr", "w_ptr", "c_ptr", "stride_am", "stride_we", "stride_wn", "stride_cm", "N", "K"),
            cc=cc, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        per_stage = (cfg.block_m + (2 if flags[1] else 1) * cfg.block_n) * cfg.block_k * 2
        out.append(dict(cc=cc, role=role, tma=bool(flags[6]), shared=kernel.metadata.shared, per_stage=per_stage,
                        estimate=cfg.smem_bytes(2 if flags[1] else 1),
                        n256=".m64n256k16." in kernel.asm["ptx"], n128=".m64n128k16." in kernel.asm["ptx"]))
print(json.dumps(out))
"""


def test_kernels_compile_for_sm80_and_sm90_with_a_pipelined_k_loop():
    from aot import run_aot_script

    results = run_aot_script(AOT_SCRIPT)
    assert len(results) == 11
    box = [r for r in results if r["role"].startswith("box")]
    assert len(box) == 1 and box[0]["n256"] and not box[0]["n128"], box  # one wide wgmma, no pair of narrow ones
    for r in results:
        # at least double-buffered (pipelined), and never more than the estimate the filter uses
        # (TMA adds its mbarriers: a few bytes per stage)
        assert 2 * r["per_stage"] <= r["shared"] <= r["estimate"] + (256 if r["tma"] else 0), r


# ---- host-side rules (no kernel runs) -------------------------------------------------------------


@pytest.mark.parametrize("skew", ["uniform", "zipf", "hot", "all_to_one"])
@pytest.mark.parametrize("block_m", [16, 64])
def test_max_row_blocks_bounds_the_block_map(skew, block_m):
    # the host-side grid bound must cover every row block the device finds, for any routing
    for T, E, k in [(1, 8, 2), (7, 16, 1), (100, 5, 3), (33, 4, 4)]:
        ids, tw = simulate_routing(T, E, k, skew, seed=T)
        plan = RoutingPlan.build(ids, tw, E)
        assert int(plan.block_map(block_m).num_blocks) <= gg.max_row_blocks(T * k, E, block_m)


def test_decode_rule():
    # decode at <= 8 rows per expert on average (the threshold measured on an H100)
    assert gg.is_decode(1, 2, 8) and gg.is_decode(32, 2, 8) and not gg.is_decode(33, 2, 8)
    assert gg.is_decode(128, 8, 128) and not gg.is_decode(128, 8, 64)  # qwen3 T=128: 8 rows; deepseek: 16
    assert gg.is_decode(256, 8, 256) and not gg.is_decode(1024, 8, 256)  # deepseek-v3


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-gate-up"])
def test_decode_configs_fill_the_sms(fused):
    # mixtral at T = 1: 2 experts touched; 132 SMs (H100), 99 KB of shared memory (RTX 4090)
    for N in (4096, 14336):
        cfgs = gg.get_decode_configs(N, est_row_blocks=2, num_sms=132, fused_gate_up=fused,
                                     smem_limit=99 * 1024)
        assert len(cfgs) == 1 and cfgs[0].block_m == 16 and cfgs[0].block_k == 128
        assert cfgs[0].smem_bytes(2 if fused else 1) <= 99 * 1024
        # 32 wide where 64-wide tiles leave SMs idle (N=4096: 128 < 132 tiles); N=14336: 448 tiles of 64 fill 0.85
        # of 4 rounds of 132 SMs, 896 of 32 fill 0.97 of 7, less than DECODE_FILL_MARGIN better (measured slower)
        assert cfgs[0].block_n == (64 if N == 14336 else 32)
    # 64-wide tiles would leave SMs idle but 32-wide ones do not: the 32-wide tile
    assert [c.block_n for c in gg.get_decode_configs(64 * 100, 1, 132, fused)] == [32]
    # too few columns to fill the GPU either way: the 64-wide tile (fewer, longer weight streams)
    assert [c.block_n for c in gg.get_decode_configs(64, 1, 132, fused)] == [64]


def test_decode_tile_width_follows_the_sm_fill():
    assert gg.sm_fill(192, 132) == pytest.approx(192 / 264) and gg.sm_fill(396, 132) == 1.0 and gg.sm_fill(0, 132) == 0
    # glm-4.5 at T = 1, GEMM1 (F = 1536, fused, 8 experts touched): 192 tiles of 64 (fill 0.73), 384 of 32 (0.97)
    assert [c.block_n for c in gg.get_decode_configs(1536, 8, 132, True)] == [32]
    # its GEMM2 (N = 5120): 640 tiles of 64 fill 0.97, as 1280 of 32 do: the wider tile stays
    assert [c.block_n for c in gg.get_decode_configs(5120, 8, 132, False)] == [64]
    # deepseek-v3 at T = 1, GEMM1 (F = 2048): 256 tiles of 64 (0.97): 64
    assert [c.block_n for c in gg.get_decode_configs(2048, 8, 132, True)] == [64]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,k,H,slices", [(1, 2, 40, 1), (3, 1, 1000, 1), (5, 8, 1500, 1), (2, 3, 33, 4)])
def test_sum_slots_matches_torch(T, k, H, slices, dtype):
    part = torch.randn(slices, T * k, H, generator=torch.Generator().manual_seed(T)).to(DEVICE, dtype)
    like = torch.empty(0, dtype=torch.bfloat16, device=DEVICE)
    y = gg.sum_slots(part if slices > 1 else part[0], T, k, like)
    ref = part.float().view(slices, T, k, H).sum(dim=(0, 2))
    assert y.shape == (T, H) and y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2)
    assert gg.sum_slots(part[:, :0], 0, k, like).shape == (0, H)
    with pytest.raises(ValueError, match="not"):
        gg.sum_slots(part[0, :-1], T, k, like)  # one slot short


@pytest.mark.parametrize("limit_kb", [99, 163, 227])  # sm_86/89, sm_80, sm_90
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-gate-up"])
def test_autotune_configs_fit_shared_memory(limit_kb, fused):
    nb = 2 if fused else 1
    fitted = [c.fit(limit_kb * 1024, nb) for c in gg.get_autotune_configs(fused)]
    kept = [c for c in fitted if c is not None]
    assert len(kept) >= 4
    assert all(c.smem_bytes(nb) <= limit_kb * 1024 and c.num_stages >= 2 for c in kept)


def test_triton_backend_is_registered():
    b = get_backend("triton")
    cfg = get_preset("debug")
    assert b.graph_safe and b.unavailable(cfg, DEVICE) is None
    assert b.extra_bytes(cfg, 16, None) == 16 * 2 * (cfg.F + cfg.H) * 2
    x, w, ids, tw, plan = make_case(*CASES[0][1:])
    check(b, x, w, ids, tw, plan)


# ---- GPU: real sizes --------------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@needs_cuda
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("T", [1, 16, 1000])
def test_gpu_mid_size(version, T):
    x, w, ids, tw, plan = make_case(8, 1024, 2048, 2, T, "zipf")
    check(gg.VERSIONS[version], x, w, ids, tw, plan)


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 16, 64])
def test_gpu_mixtral_decode(T):
    cfg = get_preset("mixtral")
    w = ExpertWeights.random(cfg, device="cuda")
    ids, tw = simulate_routing(T, cfg.E, cfg.top_k, "uniform", device="cuda")
    x = torch.randn(T, cfg.H, device="cuda").bfloat16()
    plan = RoutingPlan.build(ids, tw, cfg.E)
    for version in ("v3", "fast"):
        check(gg.VERSIONS[version], x, w, ids, tw, plan)


@gpu
@needs_cuda
@pytest.mark.parametrize("preset", ["mixtral", "qwen3-30b-a3b", "deepseek-v3"])
def test_gpu_one_token_slot_sum_in_gemm2(preset, monkeypatch):
    # the arrival counters across SMs (acquire / release, .cg loads): the same bits as the slot-sum kernel,
    # eagerly and over graph replays with new x and routing each time (the counters start at zero every forward)
    cfg = get_preset(preset)
    w = ExpertWeights.random(cfg, device="cuda")
    x = torch.randn(1, cfg.H, device="cuda").bfloat16()
    ids, tw = simulate_routing(1, cfg.E, cfg.top_k, "uniform", device="cuda")
    plan = RoutingPlan.build(ids, tw, cfg.E, defer=True)

    def both():
        monkeypatch.setenv(gg.ONE_TOKEN_SUM_ENV, "kernel")
        expected = gg.moe_forward_triton(x, w, plan)
        monkeypatch.setenv(gg.ONE_TOKEN_SUM_ENV, "gemm2")
        return expected, gg.moe_forward_triton(x, w, plan)

    expected, y = both()
    assert torch.equal(y, expected)
    check(gg.moe_forward_triton, x, w, ids, tw, plan)
    graph, y_graph = capture_graph(lambda: gg.moe_forward_triton(x, w, plan))
    for seed in range(1, 6):
        x.copy_(torch.randn(1, cfg.H, generator=torch.Generator().manual_seed(seed)).to("cuda", x.dtype))
        new_ids, new_tw = simulate_routing(1, cfg.E, cfg.top_k, "uniform", seed=seed, device="cuda")
        plan.topk_ids.copy_(new_ids)
        plan.topk_weights.copy_(new_tw)
        graph.replay()
        monkeypatch.setenv(gg.ONE_TOKEN_SUM_ENV, "kernel")
        assert torch.equal(y_graph, gg.moe_forward_triton(x, w, plan)), seed


@gpu
@needs_cuda
@pytest.mark.parametrize("F", [2048, 1000])
def test_gpu_gate_up_in_one_box(F, monkeypatch):
    # one box / one m64n256k16 dot against two boxes / two dots at the H100's prefill tile: the same bits; F = 1000
    # leaves the last column block partial (the box's rows past F come back zero); autotuned, within tolerance
    x, w, ids, tw, plan = make_case(8, 1024, F, 2, 2000, "zipf")
    tile = gg.TileConfig(128, 128, 64, 8, 8, 3)
    y_box = check(gg.moe_forward_triton, x, w, ids, tw, plan, config=tile, tma=True)
    check(gg.moe_forward_triton, x, w, ids, tw, plan)
    monkeypatch.setenv(gg.GATE_UP_ENV, "two")
    assert torch.equal(gg.moe_forward_triton(x, w, plan, config=tile, tma=True), y_box)


@gpu
@needs_cuda
def test_gpu_fast_path_replays_in_a_cuda_graph():
    # graph_safe: no host sync, so capture works and replays match a fresh call
    x, w, ids, tw, plan = make_case(8, 1024, 2048, 2, 16, "uniform")
    y = gg.moe_forward_triton(x, w, plan)  # compile and autotune outside the capture
    graph, y_graph = capture_graph(lambda: gg.moe_forward_triton(x, w, plan))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_graph, y)

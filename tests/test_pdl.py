"""Programmatic dependent launch (kernels/pdl.py) in the decode forwards of `triton` and `triton_int4` and in
the plan kernels.

CPU: the interpreter keeps PDL off. With PDL forced on and the two PTX instructions replaced by recorders,
every kernel of a decode forward is launched with PDL and each of its programs waits before its first load
or store. In the sm_90 code of each of these kernels the wait comes before any global memory access.
GPU (`-m gpu`): PDL on gives the bits of PDL off, eagerly and in a CUDA graph, with alternating inputs.
"""

import math

import pytest
import torch
from triton.runtime import interpreter

import moe_tut  # noqa: F401  (interpreter + its bf16 dot fix, before the kernels are defined)
from moe_tut.backends import get_backend
from moe_tut.bench.timing import capture_graph
from moe_tut.env import PDL_ENV, interpreting, programmatic_launch_ok
from moe_tut.kernels import grouped_gemm as gg
from moe_tut.kernels import int4_gemm as ig
from moe_tut.kernels import int4_gemv as gv
from moe_tut.kernels import pdl
from moe_tut.kernels import plan as plan_kernels
from moe_tut.presets import custom
from moe_tut.routing import RoutingPlan, simulate_routing
from moe_tut.weights import ExpertWeights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The decode variant with both GEMMs cut in two K slices: the SwiGLU finishers join the chain.
SPLIT_VARIANT = ig.DECODE_VARIANT.label() + ",splitk=2"
MEMORY_OPS = ("create_load", "create_masked_load", "create_store", "create_masked_store", "create_tensor_pointer_load",
              "create_tensor_pointer_store", "create_atomic_cas", "create_atomic_rmw", "create_make_tensor_descriptor",
              "create_descriptor_load", "create_descriptor_store", "create_descriptor_gather",
              "create_descriptor_scatter")


def make_inputs(backend: str, E: int, H: int, F: int, k: int, T: int, seed: int = 0):
    """(the backend's prepared weights, x, topk_ids, topk_weights) on DEVICE."""
    w = ExpertWeights.random(custom(E, H, F, k), device=DEVICE, seed=seed)
    ids, tw = simulate_routing(T, E, k, "uniform", seed=seed, device=DEVICE)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, torch.bfloat16)
    return get_backend(backend).prepare(w), x, ids, tw


def forward(backend: str, weights, x, ids, tw, plan_method: str = "auto") -> torch.Tensor:
    """One forward as the harness times it, the plan built inside and deferred (on the CPU the plan kernel needs
    "kernel"): a single token's forward reads the router's top-k and launches no plan kernel."""
    plan = RoutingPlan.build(ids, tw, weights.num_experts, validate=False, method=plan_method, defer=True)
    return get_backend(backend).forward(x, weights, plan)


# ---- CPU: the interpreter keeps PDL off ---------------------------------------------------------------------


@pytest.mark.skipif(not interpreting(), reason="checks the interpreter's setting")
@pytest.mark.parametrize("backend", ["triton", "triton_int4"])
def test_interpreter_runs_without_programmatic_launch(backend, monkeypatch):
    monkeypatch.setenv(PDL_ENV, "1")
    assert not programmatic_launch_ok(torch.device("cpu"))
    assert not programmatic_launch_ok(torch.device("cuda", 0))  # the interpreter, even for CUDA tensors
    weights, x, ids, tw = make_inputs(backend, 4, 256, 256, 2, 1)
    y_on = forward(backend, weights, x, ids, tw, "kernel")
    monkeypatch.setenv(PDL_ENV, "0")
    assert torch.equal(forward(backend, weights, x, ids, tw, "kernel"), y_on)


# ---- CPU: PDL forced on under the interpreter, with recorders for the PTX -----------------------------------


def force_pdl(monkeypatch) -> list[dict]:
    """Turn PDL on under the interpreter and record each launch: its kernel, USE_PDL and launch_pdl, its grid,
    and the programs that called the (fake) gdc_wait and gdc_launch_dependents. Every load, store and atomic
    of a program of a PDL launch fails unless that program has waited."""
    launches: list[dict] = []
    for module in (gg, ig, gv, plan_kernels):
        monkeypatch.setattr(module, "programmatic_launch_ok", lambda device: True)
    original_run = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launch = dict(kernel=self.__name__, use_pdl=kwargs.get("USE_PDL", False),
                      launch_pdl=kwargs.get("launch_pdl", False), waited=set(), released=set())
        launches.append(launch)
        result = original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        launch["programs"] = math.prod(interpreter.interpreter_builder.grid_dim)
        return result

    def program() -> tuple[int, int, int]:
        return interpreter.interpreter_builder.grid_idx

    def wait():
        launches[-1]["waited"].add(program())

    def launch_dependents():
        assert program() in launches[-1]["waited"], "gdc_launch_dependents before gdc_wait"
        launches[-1]["released"].add(program())

    def checked(original):
        def memory_op(self, *args, **kwargs):
            launch = launches[-1]
            assert not launch["use_pdl"] or self.grid_idx in launch["waited"], \
                f"{launch['kernel']} program {self.grid_idx} touched memory before gdc_wait"
            return original(self, *args, **kwargs)
        return memory_op

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    monkeypatch.setattr(pdl, "gdc_wait", wait)
    monkeypatch.setattr(pdl, "gdc_launch_dependents", launch_dependents)
    builder = interpreter.InterpreterBuilder
    for name in MEMORY_OPS:
        monkeypatch.setattr(builder, name, checked(getattr(builder, name)))
    return launches


def assert_all_wait_first(launches: list[dict], plain: frozenset[int] = frozenset()) -> None:
    """Every launch but those at the `plain` positions uses PDL, and each of its programs waits first."""
    for i, launch in enumerate(launches):
        if i in plain:
            assert not launch["use_pdl"] and not launch["launch_pdl"], launch["kernel"]
            continue
        assert launch["use_pdl"] and launch["launch_pdl"], launch["kernel"]
        # every program waits (even one with nothing to do), then lets the next kernel start
        assert len(launch["waited"]) == launch["programs"] and launch["released"] == launch["waited"], launch


PLAN = "_plan_kernel"
DECODE_CHAINS = {  # (backend, T, variant): the kernels of the forward (plan included), in launch order
    ("triton", 1, None): ["_moe_gemm_kernel", "_moe_gemm_kernel"],  # no plan, GEMM2 sums the slots: one token
    ("triton", 16, None): [PLAN, "_moe_gemm_kernel", "_moe_gemm_kernel", "_sum_slots_kernel"],
    ("triton_int4", 1, None): ["_gemv_prep_kernel", "_gemv_kernel", "_gemv_kernel"],  # GEMM2 sums the slots
    # GEMM2 split along K: both GEMMs in one launch (int4_gemv.fuse_gemms), GEMM1 finishing the SwiGLU
    ("triton_int4", 1, SPLIT_VARIANT): ["_gemv_prep_kernel", "_gemv_fused_kernel"],
    ("triton_int4", 16, None): [PLAN, "_moe_int4_kernel", "_moe_int4_kernel", "_sum_slots_kernel"],
    ("triton_int4", 16, SPLIT_VARIANT): [PLAN, "_moe_int4_kernel", "_swiglu_slices_kernel", "_moe_int4_kernel",
                                         "_sum_slots_kernel"],
}
# launches that keep the plain launch: the bf16 GEMM2 (moe_forward_triton says why)
PLAIN_LAUNCHES = {("triton", 1, None): frozenset({1}), ("triton", 16, None): frozenset({2})}


@pytest.mark.skipif(not interpreting(), reason="the recorders replace the PTX under the interpreter")
@pytest.mark.parametrize("backend,T,variant", list(DECODE_CHAINS),
                         ids=[f"{b}-T{t}" + ("-splitk2" if v else "") for b, t, v in DECODE_CHAINS])
def test_decode_kernels_wait_before_touching_memory(backend, T, variant, monkeypatch):
    # E = 4, k = 2: T = 16 is still decode (T*k/E = 8 rows per expert)
    if variant:
        monkeypatch.setenv(ig.VARIANT_ENV, variant)
    monkeypatch.setattr(gv, "FUSED_MIN_WEIGHT_BYTES", 0)  # these experts are tiny; the fused launch takes them too
    weights, x, ids, tw = make_inputs(backend, 4, 256, 256, 2, T)
    assert gg.is_decode(T, 2, 4)
    expected = forward(backend, weights, x, ids, tw, "kernel")
    launches = force_pdl(monkeypatch)
    assert torch.equal(forward(backend, weights, x, ids, tw, "kernel"), expected)
    assert [launch["kernel"] for launch in launches] == DECODE_CHAINS[backend, T, variant]
    assert_all_wait_first(launches, PLAIN_LAUNCHES.get((backend, T, variant), frozenset()))


@pytest.mark.skipif(not interpreting(), reason="the recorders replace the PTX under the interpreter")
def test_prefill_gemms_keep_the_plain_launch(monkeypatch):
    weights, x, ids, tw = make_inputs("triton", 4, 128, 128, 2, 24)
    assert not gg.is_decode(24, 2, 4)
    expected = forward("triton", weights, x, ids, tw, "kernel")
    launches = force_pdl(monkeypatch)
    assert torch.equal(forward("triton", weights, x, ids, tw, "kernel"), expected)
    assert [(launch["kernel"], launch["use_pdl"]) for launch in launches] == [
        (PLAN, True), ("_moe_gemm_kernel", False), ("_moe_gemm_kernel", False), ("_sum_slots_kernel", False)]


@pytest.mark.skipif(not interpreting(), reason="the recorders replace the PTX under the interpreter")
def test_multi_cta_plan_kernels_wait_before_touching_memory(monkeypatch):
    ids, tw = simulate_routing(20, 8, 2, "zipf", device=DEVICE)
    expected = plan_kernels.build_plan_tensors(ids, tw, 8, multi_cta=True, chunk=16)
    launches = force_pdl(monkeypatch)
    fields = plan_kernels.build_plan_tensors(ids, tw, 8, multi_cta=True, chunk=16)
    assert all(torch.equal(fields[name], expected[name]) for name in expected)
    assert [launch["kernel"] for launch in launches] == ["_chunk_sort_kernel", "_chunk_scan_kernel",
                                                         "_chunk_place_kernel"]
    assert_all_wait_first(launches)


# ---- CPU: the sm_90 code waits before its first global memory access ----------------------------------------

# Compiled without a GPU (Triton ships ptxas), in a subprocess with the interpreter off, with the decode flags.
# The wait sits in the entry block, which comes first in the PTX, so "griddepcontrol.wait before the first
# global load, store or atomic in the text" means before every one that runs. USE_PDL off emits nothing.
AOT_SCRIPT = r"""
import json, re
from aot import compile_kernel
from moe_tut.kernels import grouped_gemm as gg, int4_gemm as ig, int4_gemv as gv, plan

bf16, f32 = "*bf16", "*fp32"
dec = ig.DECODE_CONFIGS[0]
gemm = dict(E=8, E_PAD=16, EVEN_K=True, MAP_FROM_OFFSETS=True, PERSISTENT=True, TMA_W=False, TMA_A=False,
            FLATTEN=False, WARP_SPECIALIZE=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8)
int4 = dict(E=8, E_PAD=16, EVEN_K=True, BLOCK_M=dec.block_m, BLOCK_N=dec.block_n, BLOCK_K=dec.block_k, GROUP_M=8,
            GROUP_SIZE=128, HAS_ZEROS=False, GROUPS_PER_TILE=1, MAGIC=True, POST_SCALE=True, SPLIT=True, ASM=True,
            PIPE_SCALES=False, STACK=False, PACKED=False)
gemv = dict(E=8, E_PAD=16, GROUP_SIZE=128, HAS_ZEROS=False, ROWS=1, BLOCK_N=32, BLOCK_K=128, ONE_IN_MASK=False)
kernels = {  # name: (JIT function, constexprs, pointer types, warps, stages)
    "gemm1": (gg._moe_gemm_kernel.fn, dict(gemm, GATHER_A=True, SWIGLU=True, SCALE_ROWS=False, SCATTER_C=False),
              dict(a_ptr=bf16, w_ptr=bf16, c_ptr=bf16, row_scale_ptr=f32), 4, 4),
    "gemm2": (gg._moe_gemm_kernel.fn, dict(gemm, GATHER_A=False, SWIGLU=False, SCALE_ROWS=True, SCATTER_C=True),
              dict(a_ptr=bf16, w_ptr=bf16, c_ptr=bf16, row_scale_ptr=f32), 4, 4),
    "gemm1_one_token_zeroes_arrivals": (gg._moe_gemm_kernel.fn, dict(gemm, GATHER_A=True, SWIGLU=True,
                                        SCALE_ROWS=False, SCATTER_C=False, ONE_TOKEN_TOPK=8, ZERO_COUNTERS=True),
                                        dict(a_ptr=bf16, w_ptr=bf16, c_ptr=bf16, row_scale_ptr=f32), 4, 4),
    "gemm2_one_token_sums_slots": (gg._moe_gemm_kernel.fn, dict(gemm, GATHER_A=False, SWIGLU=False, SCALE_ROWS=True,
                                   SCATTER_C=True, ONE_TOKEN_TOPK=8, SUM_SLOTS_LAST=True),
                                   dict(a_ptr=bf16, w_ptr=bf16, c_ptr=bf16, row_scale_ptr=f32, y_ptr=bf16), 4, 4),
    "sum_slots": (gg._sum_slots_kernel, dict(TOP_K=8, SPLIT_K=2, BLOCK=1024), dict(part_ptr=f32, y_ptr=bf16), 4, 1),
    "int4_gemm1_splitk": (ig._moe_int4_kernel.fn, dict(int4, GATHER_A=True, SWIGLU=True, SCALE_ROWS=False,
                                                       SCATTER_C=False, SPLIT_K=2),
                          dict(a_ptr=bf16, q_ptr="*u8", s_ptr=bf16, z_ptr=bf16, c_ptr=f32, row_scale_ptr=f32),
                          dec.num_warps, dec.num_stages),
    "int4_gemm2": (ig._moe_int4_kernel.fn, dict(int4, GATHER_A=False, SWIGLU=False, SCALE_ROWS=True, SCATTER_C=True,
                                                SPLIT_K=1),
                   dict(a_ptr=bf16, q_ptr="*u8", s_ptr=bf16, z_ptr=bf16, c_ptr=bf16, row_scale_ptr=f32),
                   dec.num_warps, dec.num_stages),
    "swiglu_slices": (ig._swiglu_slices_kernel, dict(SPLIT_K=2, BLOCK=1024), dict(p_ptr=f32, out_ptr=bf16), 4, 1),
    "gemv_prep": (gv._gemv_prep_kernel, dict(BLOCK=1024), dict(x_ptr=bf16, xp_ptr=f32, xw_ptr=f32), 4, 1),
    "gemv_gemm1": (gv._gemv_kernel, dict(gemv, N=2048, KW=512, GATHER_X=True, SWIGLU=True, ACT_OUT=True,
                                         WEIGHT_SCATTER=False, SPLIT_K=1),
                   dict(x_ptr=f32, xw_ptr=f32, q_ptr="*i32", s_ptr=bf16, z_ptr=bf16, out_ptr=f32, out_w_ptr=f32,
                        row_weight_ptr=f32), 4, 1),
    "gemv_gemm2_splitk": (gv._gemv_kernel, dict(gemv, N=4096, KW=256, GATHER_X=False, SWIGLU=False, ACT_OUT=False,
                                                WEIGHT_SCATTER=True, SPLIT_K=2),
                          dict(x_ptr=f32, xw_ptr=f32, q_ptr="*i32", s_ptr=bf16, z_ptr=bf16, out_ptr=f32,
                               out_w_ptr=f32, row_weight_ptr=f32), 4, 1),
    "gemv_prep_zeroes_arrivals": (gv._gemv_prep_kernel, dict(BLOCK=1024, ZERO_COUNTERS=True),
                                  dict(x_ptr=bf16, xp_ptr=f32, xw_ptr=f32), 4, 1),
    "gemv_gemm2_one_token_sums_slots": (gv._gemv_kernel, dict(gemv, N=4096, KW=256, GATHER_X=False, SWIGLU=False,
                                        ACT_OUT=False, WEIGHT_SCATTER=True, SPLIT_K=2, ONE_TOKEN_TOPK=8,
                                        SUM_SLOTS_LAST=True),
                                        dict(x_ptr=f32, xw_ptr=f32, q_ptr="*i32", s_ptr=bf16, z_ptr=bf16, out_ptr=f32,
                                             out_w_ptr=f32, row_weight_ptr=f32, y_ptr=bf16), 4, 1),
    "gemv_gemm1_split_finishes": (gv._gemv_kernel, dict(gemv, N=2048, KW=512, GATHER_X=True, SWIGLU=True,
                                  ACT_OUT=False, WEIGHT_SCATTER=False, SPLIT_K=2, FINISH_LAST=True),
                                  dict(x_ptr=f32, xw_ptr=f32, q_ptr="*i32", s_ptr=bf16, z_ptr=bf16, out_ptr=f32,
                                       out_w_ptr=f32, row_weight_ptr=f32, act_ptr=f32, act_w_ptr=f32), 4, 1),
    "gemv_fused": (gv._gemv_fused_kernel, dict(H=4096, F=2048, E=8, E_PAD=16, GROUP1=128, GROUP2=128,
                                                HAS_ZEROS1=False, HAS_ZEROS2=False, SPLIT1=2, SPLIT2=2, ROWS=1,
                                                BLOCK_N1=64, BLOCK_K1=128, STAGES1=3, BLOCK_N2=64, BLOCK_K2=128,
                                                STAGES2=1, ONE_TOKEN_TOPK=8, SUM_SLOTS_LAST=True, ACT_CACHE=""),
                   dict(x_ptr=f32, xw_ptr=f32, q1_ptr="*i32", s1_ptr=bf16, z1_ptr=bf16, out1_ptr=f32, out1_w_ptr=f32,
                        act_ptr=f32, act_w_ptr=f32, q2_ptr="*i32", s2_ptr=bf16, z2_ptr=bf16, out2_ptr=f32,
                        row_weight_ptr=f32, y_ptr=bf16), 4, 1),
    "gemv_finish": (gv._gemv_swiglu_finish_kernel, dict(SPLIT_K=2, BLOCK=1024),
                    dict(part_ptr=f32, xp_ptr=f32, xw_ptr=f32), 4, 1),
    "plan": (plan._plan_kernel, dict(N_PAD=32, E_BINS=32), dict(ids_ptr="*i64", w_ptr=f32, sorted_w_ptr=f32), 1, 1),
    "chunk_sort": (plan._chunk_sort_kernel, dict(CHUNK=512, E_BINS=256), dict(ids_ptr="*i64"), 4, 1),
    "chunk_scan": (plan._chunk_scan_kernel, dict(C_PAD=32, EB=128), {}, 8, 1),
    "chunk_place": (plan._chunk_place_kernel, dict(CHUNK=512), dict(w_ptr=f32, sorted_w_ptr=f32), 4, 1),
}
memory = re.compile(r"\.global\b")  # ld/st/atom/red.global, cp.async ... .global
out = []
for name, (fn, const, ptrs, warps, stages) in kernels.items():
    for use_pdl in (True, False):
        ptx = compile_kernel(fn, dict(const, USE_PDL=use_pdl), ptrs, unit_strides=(), aligned=(), cc=90,
                             num_warps=warps, num_stages=stages).asm["ptx"]
        body = ptx[ptx.index("{", ptx.index(".entry")):]  # after the parameters (.param .ptr .global ...)
        wait = body.find("griddepcontrol.wait")
        release = body.find("griddepcontrol.launch_dependents")
        first = memory.search(body)
        out.append(dict(kernel=name, use_pdl=use_pdl, wait=wait, release=release,
                        first_memory=first.start() if first else -1))
print(json.dumps(out))
"""


def test_sm90_code_waits_before_any_global_memory_access():
    from aot import run_aot_script

    results = run_aot_script(AOT_SCRIPT)
    assert len(results) == 40
    for r in results:
        if not r["use_pdl"]:  # nothing emitted: the kernel is what it was before PDL
            assert r["wait"] == r["release"] == -1, r
            continue
        assert 0 <= r["wait"] < r["release"] < r["first_memory"], r


# ---- GPU: the same bits with PDL on, eagerly and in a CUDA graph --------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# A small preset-like shape: qwen3-30b-a3b's H and F with 16 experts and top-4 (T = 16 is decode: 4 rows per
# expert). triton_int4 at T = 1 splits K there (GEMV finisher), SPLIT_VARIANT does at T = 16.
GPU_SHAPE = (16, 2048, 768, 4)


@gpu
@needs_cuda
@pytest.mark.parametrize("backend,T,variant", [("triton", 1, None), ("triton", 16, None), ("triton_int4", 1, None),
                                               ("triton_int4", 16, None), ("triton_int4", 16, SPLIT_VARIANT)])
def test_gpu_programmatic_launch_gives_the_same_bits(backend, T, variant, monkeypatch):
    # With PDL each kernel may be scheduled before the previous one ends; a missing or late wait would let a
    # kernel read the previous forward's intermediates (the allocator and the graph reuse the same memory), so the
    # inputs, routing included, alternate.
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or newer")
    if variant:
        monkeypatch.setenv(ig.VARIANT_ENV, variant)
    E, H, F, k = GPU_SHAPE
    weights, x, ids, tw = make_inputs(backend, E, H, F, k, T)
    assert gg.is_decode(T, k, E)
    inputs = [(x, ids, tw)]
    for seed in (1, 2):
        ids_s, tw_s = simulate_routing(T, E, k, "zipf" if seed == 1 else "uniform", seed=seed, device=DEVICE)
        inputs.append((torch.randn_like(x), ids_s, tw_s))
    monkeypatch.setenv(PDL_ENV, "0")
    expected = [forward(backend, weights, *inp) for inp in inputs]
    monkeypatch.setenv(PDL_ENV, "1")
    assert programmatic_launch_ok(x.device)
    for _ in range(3):
        for inp, want in zip(inputs, expected, strict=True):
            assert torch.equal(forward(backend, weights, *inp), want)
    src = [t.clone() for t in inputs[0]]
    graph, y = capture_graph(lambda: forward(backend, weights, *src))
    for _ in range(3):
        for inp, want in zip(inputs, expected, strict=True):
            for buf, t in zip(src, inp, strict=True):
                buf.copy_(t)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, want)


@gpu
@needs_cuda
@pytest.mark.parametrize("multi_cta", [False, True], ids=["single-cta", "multi-cta"])
def test_gpu_plan_kernels_give_the_same_bits_with_programmatic_launch(multi_cta, monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or newer")
    routings = [simulate_routing(512, 64, 8, skew, seed=s, device=DEVICE) for s, skew in enumerate(("uniform", "hot"))]

    def build(ids, tw):
        return plan_kernels.build_plan_tensors(ids, tw, 64, multi_cta=multi_cta, chunk=512)

    monkeypatch.setenv(PDL_ENV, "0")
    expected = [build(*r) for r in routings]
    monkeypatch.setenv(PDL_ENV, "1")
    src = [t.clone() for t in routings[0]]
    graph, fields = capture_graph(lambda: build(*src))
    for _ in range(3):
        for routing, want in zip(routings, expected, strict=True):
            got = build(*routing)
            assert all(torch.equal(got[name], want[name]) for name in want)
            for buf, t in zip(src, routing, strict=True):
                buf.copy_(t)
            graph.replay()
            torch.cuda.synchronize()
            assert all(torch.equal(fields[name], want[name]) for name in want)

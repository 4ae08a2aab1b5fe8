"""Triton W4A16 MoE forward (moe_tut.kernels.int4_gemm) against the reference on the dequantised weights.

Runs on the CPU under Triton's interpreter (`import moe_tut` turns it on) with tiny shapes and large
tiles (the interpreter costs ~1 ms per program per K step); `@pytest.mark.gpu` tests run mid sizes
where there is a GPU. The interpreter truncates float32 -> bf16 (a GPU rounds to nearest even), which
about doubles the bf16 error: ~1.2e-2 here against the 2e-2 bound, where the bf16 kernel shows ~6e-3.
"""

from dataclasses import replace

import pytest
import torch

import moe_tut  # noqa: F401  (interpreter + its bf16 dot fix, before the kernels are defined)
from moe_tut.backends import get_backend
from moe_tut.bench.timing import capture_graph
from moe_tut.env import interpreting
from moe_tut.kernels import grouped_gemm as gg
from moe_tut.kernels import int4_gemm as ig
from moe_tut.presets import custom, get_preset
from moe_tut.quant import Int4ExpertWeights, QuantizedTensor, quantize, unpack_int4
from moe_tut.reference import moe_reference, relative_error
from moe_tut.routing import RoutingPlan, simulate_routing
from moe_tut.weights import ExpertWeights

TOL = 2e-2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TileConfig = gg.TileConfig

# (id, E, H, F, top_k, T, routing, group size, symmetric): H and F are multiples of the group size
CASES = [
    ("T1", 4, 128, 256, 2, 1, "uniform", 128, True),  # one decode token: most experts empty
    ("T-lt-BM-asym", 4, 64, 128, 2, 5, "uniform", 32, False),  # 10 rows < BLOCK_M: every block is partial
    ("empty-experts", 8, 64, 64, 1, 3, "uniform", 64, True),  # top-1: GEMM2 writes y directly
    ("all-to-one-top1", 5, 64, 128, 1, 37, "all_to_one", 64, False),  # 37 rows on one expert
    ("prime-E7-zipf", 7, 64, 96, 3, 19, "zipf", 32, True),  # prime E, skewed load
    # H, F not multiples of BLOCK_K = 128 or BLOCK_N: partial K steps, several groups per step
    ("H96-F160", 5, 96, 160, 2, 11, "uniform", 32, False),
    ("topk-eq-E", 4, 64, 128, 4, 9, "uniform", 64, True),  # every token to every expert
    ("prefill-rows", 4, 64, 128, 2, 40, "hot", 64, False),  # 20 rows per expert: the prefill rule
]
CASE_IDS = [c[0] for c in CASES]


def make_case(E, H, F, k, T, routing, G=128, symmetric=True, dtype=torch.bfloat16, seed=0):
    w = ExpertWeights.random(custom(E, H, F, k), device=DEVICE, dtype=dtype, seed=seed)
    q = Int4ExpertWeights.from_bf16(w, G, symmetric)
    ids, tw = simulate_routing(T, E, k, routing, seed=seed, device=DEVICE)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    return x, q, ids, tw, RoutingPlan.build(ids, tw, E)


def check(fn, x, q, ids, tw, plan, **kw):
    y = fn(x, q, plan, **kw)
    assert y.shape == x.shape and y.dtype == x.dtype
    err = relative_error(y, moe_reference(x, q.dequantize(), ids, tw))
    assert err < TOL, f"relative error {err:.3g} vs the dequantised reference"
    return y


@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_dequantised_reference(case, path):
    x, q, ids, tw, plan = make_case(*case[1:])
    check(ig.moe_forward_triton_int4, x, q, ids, tw, plan, path=path)


def test_rule_picks_the_regime(monkeypatch):
    m = ig.DECODE_MAX_ROWS_PER_EXPERT_INT4  # mean rows per expert at or below which it is decode: 16, bf16's is 8
    assert m == 16 == 2 * gg.DECODE_MAX_ROWS_PER_EXPERT and gg.decode_max_rows(m) == m
    assert ig.path_for(1, 2, 8) == "decode" and ig.path_for(4 * m, 2, 8) == "decode"
    assert ig.path_for(4 * m + 1, 2, 8) == "prefill" and ig.path_for(1024, 8, 256) == "prefill"
    assert ig.path_for(64, 2, 8) == "decode" and not gg.is_decode(64, 2, 8)  # mixtral T=64: 16 rows per expert
    assert ig.path_for(512, 8, 256) == "decode" and ig.path_for(513, 8, 256) == "prefill"  # deepseek-v3
    monkeypatch.setenv(gg.DECODE_ENV, "8")  # the variable sets both kernels' threshold
    assert ig.path_for(64, 2, 8) == "prefill" and ig.path_for(32, 2, 8) == "decode"
    monkeypatch.delenv(gg.DECODE_ENV)
    # the default (shape-chosen) path on a prefill-sized case, with the backend's own check
    x, q, ids, tw, plan = make_case(*CASES[-1][1:])
    check(get_backend("triton_int4"), x, q, ids, tw, plan)


@pytest.mark.parametrize("G,symmetric,cfg", [
    (64, False, TileConfig(16, 32, 32, group_m=2, num_warps=4, num_stages=2)),  # a group spans 2 K steps
    (32, True, TileConfig(32, 32, 64, group_m=2, num_warps=4, num_stages=2)),  # 2 groups per K step
], ids=["group-spans-steps", "groups-per-step"])
def test_small_tiles_loop_over_many_tiles(G, symmetric, cfg):
    # small tiles: several row blocks, column blocks and K steps, partial GROUP_M groups, and
    # persistent programs that loop over more than one tile
    x, q, ids, tw, plan = make_case(4, 64, 128, 2, 13, "zipf", G, symmetric)
    check(ig.moe_forward_triton_int4, x, q, ids, tw, plan, config=cfg)


def test_intermediate_int4_and_reference_agree():
    # the one-expert-at-a-time reference equals moe_reference on the whole dequantised model
    x, q, ids, tw, plan = make_case(*CASES[4][1:])
    ref = ig.int4_moe_reference(x, q, ids, tw)
    assert torch.equal(ref, moe_reference(x, q.dequantize(), ids, tw))


def test_fp16_activations():
    # weights dequantise to the activation dtype (Int4ExpertWeights.dtype); fp16 takes the same path
    x, q, ids, tw, plan = make_case(5, 64, 128, 2, 11, "uniform", 64, True, dtype=torch.float16)
    assert q.dtype == torch.float16
    check(ig.moe_forward_triton_int4, x, q, ids, tw, plan, path="decode")


@pytest.fixture
def nan_outputs(monkeypatch):
    """Buffers from _alloc (torch.empty) filled with NaN instead, so an element no kernel writes shows."""
    monkeypatch.setattr(ig, "_alloc", lambda shape, like, dtype=None: torch.full(
        shape, float("nan"), dtype=dtype or like.dtype, device=like.device))


@pytest.fixture
def tail_launches(monkeypatch):
    """The `tail` argument of every int4_grouped_gemm launch the forward makes (None: one launch for the GEMM)."""
    launches = []
    real = ig.int4_grouped_gemm
    monkeypatch.setattr(ig, "int4_grouped_gemm", lambda *a, **kw: launches.append(kw.get("tail")) or real(*a, **kw))
    return launches


def test_every_output_element_is_written(nan_outputs):
    for case in (CASES[2], CASES[5]):  # empty experts with top-1; partial K and N with top-2
        x, q, ids, tw, plan = make_case(*case[1:])
        y = check(ig.moe_forward_triton_int4, x, q, ids, tw, plan)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("splitk", [2, 4])
@pytest.mark.parametrize("T", [1, 9])
def test_decode_split_k_matches_reference(T, splitk, symmetric, nan_outputs):
    # K slices write float32 partials that a finisher adds up (GEMM1 with the SwiGLU): every partial
    # element must be written (NaN-filled buffers), and the result must match the unsplit kernel.
    x, q, ids, tw, plan = make_case(4, 256, 512, 2, T, "zipf", 64, symmetric)
    v = ig.Int4Variant(magic=True, post_scale=True, split=True, split_k=splitk)
    assert ig.gemm_split_k(v, q.w13, 512, plan.num_rows, ig.adapt_to_group(ig.INTERPRETER_DECODE_CONFIG, 64), None,
                           x.device) == splitk
    y = check(ig.moe_forward_triton_int4, x, q, ids, tw, plan, path="decode", variant=v)
    y1 = ig.moe_forward_triton_int4(x, q, plan, path="decode", variant=replace(v, split_k=1))
    assert relative_error(y, y1.float()) < 1e-2


def test_decode_split_k_rule():
    # H100 (132 SMs), decode tile 16x64x128: mixtral T=1 GEMM1 has 448 tiles, GEMM2 128 (K = 14336)
    assert ig.decode_split_k(448, 4096, 128, 132) == 1
    assert ig.decode_split_k(128, 14336, 128, 132) == 2
    assert ig.decode_split_k(16, 14336, 128, 132) == 8  # at most SPLIT_K_MAX
    assert ig.decode_split_k(2000, 4096, 128, 132) == 1  # enough tiles already
    assert ig.decode_split_k(96, 2048, 128, 132) == 4  # slices stay >= 512 long
    assert ig.decode_split_k(10, 384, 128, 132) == 1  # K = 3 steps cannot be split in two
    with pytest.raises(ValueError, match="power of two"):
        ig.Int4Variant(split_k=3)


def test_swiglu_slices_matches_torch():
    part = torch.randn(3, 5, 2 * 40)
    g, u = part.sum(0).split(40, dim=1)
    ref = torch.nn.functional.silu(g) * u
    out = ig.swiglu_slices(part.to(DEVICE), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and relative_error(out, ref.to(DEVICE)) < 1e-2


def test_zero_tokens():
    E, H, F, k = 3, 64, 64, 2
    q = Int4ExpertWeights.from_bf16(ExpertWeights.random(custom(E, H, F, k), device=DEVICE), 64)
    ids = torch.empty(0, k, dtype=torch.long, device=DEVICE)
    plan = RoutingPlan.build(ids, torch.empty(0, k, device=DEVICE), E)
    y = ig.moe_forward_triton_int4(torch.empty(0, H, dtype=torch.bfloat16, device=DEVICE), q, plan)
    assert y.shape == (0, H)


# ---- the dequantised tile, value by value -----------------------------------------------------------


def expected_tile(qt: QuantizedTensor, e: int) -> torch.Tensor:
    """quant.dequantize's values of expert e; under the interpreter with its float32 -> bf16 truncation."""
    if not interpreting():
        return qt.dequantize()[e]
    N, K = qt.shape[1:]
    G = qt.group_size
    c = unpack_int4(qt.packed[e]).float().view(N, K // G, G)
    s = qt.scales[e].t().float()[..., None]
    z = -8 * s if qt.zeros is None else qt.zeros[e].t().float()[..., None]
    f32 = (c * s + z).view(N, K)
    return (f32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # keep the top 16 bits


VARIANTS = [ig.Int4Variant(), ig.Int4Variant(magic=True), ig.Int4Variant(split=True, magic=True),
            ig.Int4Variant(post_scale=True), ig.Int4Variant(magic=True, post_scale=True, split=True)]
VARIANT_IDS = [v.label() for v in VARIANTS]


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("G,symmetric,block_k", [(32, True, 128), (64, False, 32), (128, True, 64), (32, False, 32)])
def test_kernel_multiplies_with_exactly_the_dequantised_values(G, symmetric, block_k, variant):
    # GEMM with A = identity rows: out[r, n] = W[n, r] exactly (one nonzero product, float32
    # accumulator), so the output is the weight tile the kernel built. Expert 1 of 2 gets every row,
    # so the expert stride is exercised; N = 48 leaves a partial column block.
    E, N, K = 2, 48, 128
    w = torch.randn(E, N, K, generator=torch.Generator().manual_seed(G)).to(DEVICE, torch.bfloat16)
    qt = quantize(w, G, symmetric)
    plan = RoutingPlan.build(torch.ones(K, 1, dtype=torch.long, device=DEVICE), torch.ones(K, 1, device=DEVICE), E)
    out = torch.full((K, N), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    a = torch.eye(K, device=DEVICE, dtype=torch.bfloat16)
    # post_scale: s * (128 + c) + (z - 128 s) with one nonzero product is c * s + z rounded once, as dequantize
    ig.int4_grouped_gemm(a, qt, plan, out, config=TileConfig(16, 32, block_k, 2, 4, 2), variant=variant)
    assert torch.equal(out.t(), expected_tile(qt, 1))


# ---- kernel switches (Int4Variant): the decode experiments of scripts/gpu_triton_int4_tune.py -------


# stack only changes GEMM1 (SwiGLU), so the single-GEMM exact-values test above has no use for it
STACKED = [ig.Int4Variant(stack=True), ig.Int4Variant(stack=True, magic=True, post_scale=True, split=True)]


@pytest.mark.parametrize("variant", VARIANTS[1:] + STACKED, ids=VARIANT_IDS[1:] + [v.label() for v in STACKED])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[5]], ids=[CASES[1][0], CASES[4][0], CASES[5][0]])
def test_variants_match_dequantised_reference(case, variant):
    x, q, ids, tw, plan = make_case(*case[1:])
    for path in ("decode", "prefill"):
        check(ig.moe_forward_triton_int4, x, q, ids, tw, plan, path=path, variant=variant)


def routed_counts(counts, k, seed=0):
    """topk_ids [T, k] with counts[e] rows on expert e, and random weights. Slot j of token t takes the (j*T + t)-th
    id of the sorted list, so a token's k experts are distinct as long as no expert has T or more rows."""
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    T = len(ids) // k
    ids = ids[: T * k].view(k, T).t().contiguous()  # token t gets ids[t], ids[T + t], ...: distinct experts
    g = torch.Generator().manual_seed(seed)
    tw = torch.softmax(torch.randn(T, k, generator=g), dim=1)
    return ids.to(DEVICE), tw.to(DEVICE)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("counts,k", [((70, 64, 13, 81), 1), ((70, 64, 13, 81, 30, 70), 2)], ids=["top1", "top2"])
def test_prefill_tail_split_runs_every_row_once(counts, k, symmetric, monkeypatch, nan_outputs, tail_launches):
    # forced on the interpreter: main tile 64 rows, tail tile 16. Expert rows 64 + 6 (a tail), 64 (none), 13 (tail
    # only), 64 + 17 (more than 16 left: a second main tile), 30 (main only); outputs start NaN, so a row no launch
    # writes, or a launch writing past its rows, shows
    E, H, F = len(counts), 128, 256
    w = ExpertWeights.random(custom(E, H, F, k), device=DEVICE)
    q = Int4ExpertWeights.from_bf16(w, 128, symmetric)
    ids, tw = routed_counts(counts, k)
    assert torch.bincount(ids.flatten(), minlength=E).tolist() == list(counts)
    T = ids.shape[0]
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    plan = RoutingPlan.build(ids, tw, E)
    monkeypatch.setenv(ig.TAIL_ENV, "1")
    y = check(ig.moe_forward_triton_int4, x, q, ids, tw, plan, path="prefill")
    assert tail_launches == [(16, 0), (16, 64)] * 2  # both GEMMs, main then tail
    monkeypatch.setenv(ig.TAIL_ENV, "0")
    tail_launches.clear()
    assert torch.equal(ig.moe_forward_triton_int4(x, q, plan, path="prefill"), y)  # same tile shapes: same bits
    assert tail_launches == [None, None]


def test_tail_split_rule(monkeypatch):
    big, mid = TileConfig(256, 64, 64, 8, 8, 3), TileConfig(128, 64, 64, 8, 8, 3)
    small = TileConfig(64, 64, 128, 8, 8, 3)
    monkeypatch.delenv(ig.TAIL_ENV, raising=False)
    assert ig.tail_split(None, [big, mid, small], 512, DEVICE) is None  # the CPU: only when forced
    monkeypatch.setenv(ig.TAIL_ENV, "1")
    assert ig.tail_split(small, None, 512, DEVICE) == ([small], [replace(small, block_m=16)])
    monkeypatch.setattr(ig, "interpreting", lambda: False)
    cuda = torch.device("cuda", 0)
    monkeypatch.setenv(ig.TAIL_ENV, "auto")
    assert ig.tail_split(None, [big, mid, small, replace(big, num_stages=4)], 256, cuda) == (
        [big, replace(big, num_stages=4)], [small])
    assert ig.tail_split(None, [big, mid, small], 255.9, cuda) is None  # fewer rows per expert than a big tile
    assert ig.tail_split(None, [big, mid], 512, cuda) is None  # no 64-row candidate
    assert ig.tail_split(None, [mid, small], 512, cuda) == ([mid], [small])
    monkeypatch.setenv(ig.TAIL_ENV, "0")
    assert ig.tail_split(None, [big, mid, small], 512, cuda) is None
    with pytest.raises(ValueError, match="at most half of MAIN_M"):
        x, q, ids, tw, plan = make_case(*CASES[0][1:])
        ig.int4_grouped_gemm(x, q.w13, plan, torch.empty(plan.num_rows, 256, dtype=x.dtype), gather_rows=True,
                             swiglu=True, config=small, tail=(16, 64))


def test_variants_fp16_and_small_tiles():
    # fp16 activations: the magic constant is 1024 (0x6400); small tiles: many tiles and K steps, a
    # group spanning 2 K steps with post_scale, per-GEMM configs, more programs per SM than tiles
    v = ig.Int4Variant(magic=True, post_scale=True, split=True, programs_per_sm=64)
    x, q, ids, tw, plan = make_case(5, 64, 128, 2, 11, "uniform", 64, False, dtype=torch.float16)
    check(ig.moe_forward_triton_int4, x, q, ids, tw, plan, path="decode", variant=v)
    x, q, ids, tw, plan = make_case(4, 64, 128, 2, 13, "zipf", 64, True)
    check(ig.moe_forward_triton_int4, x, q, ids, tw, plan, variant=v, config=TileConfig(16, 32, 32, 2, 4, 2),
          config2=TileConfig(32, 16, 64, 2, 4, 2))


def test_variant_text_and_environment(monkeypatch):
    v = ig.Int4Variant.parse("magic, post,split,ppsm=8")
    assert v == ig.Int4Variant(magic=True, post_scale=True, split=True, programs_per_sm=8)
    assert ig.Int4Variant.parse(v.label()) == v
    w = ig.Int4Variant.parse("magic,post,split,asm,pipe")
    assert w.asm and w.pipe_scales and ig.Int4Variant.parse(w.label()) == w
    with pytest.raises(ValueError, match="needs 'magic', 'post' and 'split'"):
        ig.Int4Variant.parse("magic,asm")
    pairs = ig.Int4Variant.parse("magic,post,split,asm,pairs")
    assert pairs.byte_pairs and ig.Int4Variant.parse(pairs.label()) == pairs and ig.DECODE_VARIANT.byte_pairs
    with pytest.raises(ValueError, match="'pairs' is a form of 'asm'"):
        ig.Int4Variant.parse("magic,post,split,pairs")
    assert ig.Int4Variant.parse("v0") == ig.Int4Variant() == ig.Int4Variant.parse("")
    p = ig.Int4Variant.parse("stack,packed")
    assert p == ig.Int4Variant(stack=True, packed=True) and ig.Int4Variant.parse(p.label()) == p
    ko = ig.Int4Variant.parse("stack,packed,korder")
    assert ko.korder and ig.Int4Variant.parse(ko.label()) == ko
    with pytest.raises(ValueError, match="'korder' is a form of 'packed'"):
        ig.Int4Variant.parse("stack,korder")
    with pytest.raises(ValueError, match="'packed' is the dequantise-then-dot path"):
        ig.Int4Variant.parse("packed,post")
    with pytest.raises(ValueError, match="unknown"):
        ig.Int4Variant.parse("magic,fast")
    monkeypatch.setenv(ig.VARIANT_ENV, "magic,post")
    assert ig.pinned_variant() == ig.Int4Variant(magic=True, post_scale=True)
    x, q, ids, tw, plan = make_case(*CASES[0][1:])
    check(ig.moe_forward_triton_int4, x, q, ids, tw, plan)
    monkeypatch.setenv(ig.VARIANT_ENV, "bogus")
    with pytest.raises(ValueError, match=ig.VARIANT_ENV):
        ig.moe_forward_triton_int4(x, q, plan)


def test_packed_only_tiles_are_dropped_for_the_v0_dequantisation():
    bad, good = TileConfig(256, 128, 64, 8, 8, 2), TileConfig(128, 128, 64, 8, 8, 3)
    assert (bad.block_m, bad.block_n) in ig.PACKED_ONLY_TILES  # any stage count, group or BLOCK_K
    assert ig.drop_packed_only([bad, good], has_zeros=False) == [good]
    assert ig.drop_packed_only([bad, good], has_zeros=True) == [good]
    assert ig.drop_packed_only([bad], has_zeros=False) == [bad]  # symmetric weights were computed right
    with pytest.raises(ValueError, match="needs the `packed` switch"):
        ig.drop_packed_only([bad], has_zeros=True)


def test_post_scale_lowers_block_k_to_the_group():
    post = ig.Int4Variant(post_scale=True)
    cfg, v = ig.adapt_to_variant(TileConfig(16, 64, 256), 128, post)
    assert cfg.block_k == 128 and v.post_scale
    cfg, v = ig.adapt_to_variant(TileConfig(16, 64, 128), 96, post)
    assert cfg.block_k == 32 and v.post_scale
    cfg, v = ig.adapt_to_variant(TileConfig(16, 64, 128), 8, post)  # no BLOCK_K >= 16 inside a group of 8
    assert cfg.block_k == 128 and not v.post_scale
    assert ig.adapt_to_variant(TileConfig(16, 64, 256), 128, ig.Int4Variant())[0].block_k == 256
    cfg, v = ig.adapt_to_variant(TileConfig(256, 64, 256), 64, ig.Int4Variant(packed=True))  # packed: likewise
    assert cfg.block_k == 64 and v.packed


# ---- clear errors before any kernel runs ------------------------------------------------------------


def test_errors_are_clear():
    x, q, ids, tw, plan = make_case(4, 96, 192, 2, 3, "uniform", 32)
    w = q.dequantize()
    with pytest.raises(TypeError, match="Int4ExpertWeights"):
        ig.moe_forward_triton_int4(x, w, plan)
    with pytest.raises(TypeError, match="bfloat16"):  # activations of another dtype than the weights
        ig.moe_forward_triton_int4(x.half(), q, plan)
    q32 = Int4ExpertWeights.from_bf16(ExpertWeights(w.w13.float(), w.w2.float()), 32)
    with pytest.raises(TypeError, match="bf16 or fp16"):
        ig.moe_forward_triton_int4(x.float(), q32, plan)
    q24 = Int4ExpertWeights.from_bf16(w, 24)  # a valid format, but no power-of-two BLOCK_K >= 16 fits it
    with pytest.raises(ValueError, match="group size 24 is not supported"):
        ig.moe_forward_triton_int4(x, q24, plan)
    with pytest.raises(ValueError, match="group size 24 is not supported"):
        get_backend("triton_int4").prepare(w, 24)  # refused before quantising
    q96 = Int4ExpertWeights.from_bf16(w, 96)  # 96 = 3 * 32: supported (BLOCK_K <= 32)
    with pytest.raises(ValueError, match="BLOCK_K=64"):
        ig.moe_forward_triton_int4(x, q96, plan, config=TileConfig(16, 32, 64, 2, 4, 2))
    check(ig.moe_forward_triton_int4, x, q96, ids, tw, plan)  # default configs adapt BLOCK_K to 32
    with pytest.raises(ValueError, match="path"):
        ig.moe_forward_triton_int4(x, q, plan, path="fast")


def test_pinned_config_from_environment(monkeypatch):
    x, q, ids, tw, plan = make_case(*CASES[1][1:])
    monkeypatch.setenv(ig.CONFIG_ENV, "16,32,32,2,4,2")
    assert ig.pinned_config() == TileConfig(16, 32, 32, 2, 4, 2)
    check(ig.moe_forward_triton_int4, x, q, ids, tw, plan)
    monkeypatch.setenv(ig.CONFIG_ENV, "16,32,64,2,4,2")  # BLOCK_K 64 > G = 32 covers two groups: fine
    check(ig.moe_forward_triton_int4, x, q, ids, tw, plan)
    monkeypatch.setenv(ig.CONFIG_ENV, "64,128")
    with pytest.raises(ValueError, match=ig.CONFIG_ENV):
        ig.moe_forward_triton_int4(x, q, plan)


# ---- host-side rules (no kernel runs) -----------------------------------------------------------------


def test_block_k_and_group_size_rules():
    assert ig.block_k_fits_group(64, 128) and ig.block_k_fits_group(256, 128) and not ig.block_k_fits_group(64, 96)
    assert ig.adapt_to_group(TileConfig(16, 32, 128), 96).block_k == 32
    assert ig.adapt_to_group(TileConfig(16, 32, 128), 48).block_k == 16
    assert ig.adapt_to_group(TileConfig(16, 32, 128), 32).block_k == 128  # whole groups per step
    for ok in (2, 8, 16, 32, 48, 96, 128, 256):
        ig.check_group_size(ok)
    for bad in (6, 12, 24, 40):
        with pytest.raises(ValueError, match="power of two or a multiple of 16"):
            ig.check_group_size(bad)


@pytest.mark.parametrize("fused", [False, True], ids=["gemm2", "gemm1-fused"])
def test_decode_config_is_the_measured_tile_where_it_fits(fused):
    # one tile, no autotuning: 16x64x128 (4 warps, 4 stages) where it fits, fewer stages where it does not
    wt = 2 if fused else 1
    for limit_kb in (99, 163, 227):  # sm_86/89, sm_80, sm_90
        (cfg,) = ig.get_decode_configs(4096, 2, 132, fused, limit_kb * 1024, 128, False)
        assert (cfg.block_m, cfg.block_n, cfg.block_k) == (16, 64, 128)
        assert ig.smem_bytes(cfg, wt, 128, False) <= limit_kb * 1024
    (small,) = ig.get_decode_configs(4096, 2, 132, fused, 24 * 1024, 128, True)
    assert ig.smem_bytes(small, wt, 128, True) <= 24 * 1024
    with pytest.raises(RuntimeError, match="no INT4 decode tile fits"):
        ig.get_decode_configs(4096, 2, 132, fused, 4 * 1024, 128, True)


def test_fast_path_configs_follow_the_rules_and_are_fresh_lists():
    # the forward asks for these on every call (cached): the decode tile rule and the fitted prefill list,
    # per GEMM with its own group size, and a caller mutating a returned list cannot change the next answer
    x, q, ids, tw, plan = make_case(8, 256, 512, 2, 1, "uniform", G=64)
    limit, sms = gg.smem_limit(x.device), gg.num_sms(x.device)
    regime, c1, c2 = ig.fast_path_configs(x, q, plan)
    assert regime == "decode"
    assert c1 == ig.get_decode_configs(512, 2, sms, True, limit, 64, False)
    assert c2 == ig.get_decode_configs(256, 2, sms, False, limit, 64, False)
    _, p1, p2 = ig.fast_path_configs(x, q, plan, "prefill")
    assert p2 == list(dict.fromkeys(c for c in (ig.fit(ig.adapt_to_group(c, 64), limit, 1, 64, False)
                                              for c in ig.get_prefill_configs(False)) if c is not None))
    p1.clear()
    assert ig.fast_path_configs(x, q, plan, "prefill")[1] and ig.fast_path_configs(x, q, plan, "prefill")[2] == p2


def test_decode_register_cap_rule(monkeypatch):
    # GEMM 2's cap: on sm_90 only, where its tiles are more than 4 programs per SM; the variable pins or turns it off
    cuda = torch.device("cuda", 0)
    assert ig.decode_register_cap(10**6, DEVICE) is None  # the CPU: never
    monkeypatch.setattr(ig, "interpreting", lambda: False)
    monkeypatch.setattr(ig, "num_sms", lambda device: 132)
    monkeypatch.setattr(ig, "_capability", lambda index: (9, 0))
    monkeypatch.delenv(ig.DECODE_MAXNREG_ENV, raising=False)
    mixtral_t16, qwen3_t32 = ig.decode_tiles(32, 8, 4096, 64), ig.decode_tiles(256, 128, 2048, 64)
    assert (mixtral_t16, qwen3_t32) == (512, 4096)
    assert ig.decode_register_cap(mixtral_t16, cuda) is None  # one wave at 4 programs per SM
    assert ig.decode_register_cap(qwen3_t32, cuda) == ig.DECODE_GEMM2_MAXNREG
    assert ig.decode_register_cap(4 * 132 + 1, cuda) == ig.DECODE_GEMM2_MAXNREG
    monkeypatch.setattr(ig, "_capability", lambda index: (8, 9))
    assert ig.decode_register_cap(10**6, cuda) is None  # not measured off sm_90
    monkeypatch.setenv(ig.DECODE_MAXNREG_ENV, "80")
    assert ig.decode_register_cap(1, cuda) == 80
    monkeypatch.setenv(ig.DECODE_MAXNREG_ENV, "0")
    assert ig.decode_register_cap(10**6, cuda) is None
    monkeypatch.setenv(ig.DECODE_MAXNREG_ENV, "300")
    with pytest.raises(ValueError, match="MOE_TUT_INT4_DECODE_MAXNREG='300'"):
        ig.decode_register_cap(1, cuda)


def test_decode_gemm2_launch_rule(monkeypatch):
    # a GEMM 2 of at most 4 programs per SM (one wave) is launched after GEMM 1, not under PDL
    cuda = torch.device("cuda", 0)
    assert not ig.decode_gemm2_one_wave(1, torch.device("cpu"))
    monkeypatch.setattr(ig, "num_sms", lambda device: 132)
    mixtral_t16, qwen3_t32 = ig.decode_tiles(32, 8, 4096, 64), ig.decode_tiles(256, 128, 2048, 64)
    assert ig.decode_gemm2_one_wave(mixtral_t16, cuda) and ig.decode_gemm2_one_wave(4 * 132, cuda)
    assert not ig.decode_gemm2_one_wave(4 * 132 + 1, cuda) and not ig.decode_gemm2_one_wave(qwen3_t32, cuda)


@pytest.mark.parametrize("limit_kb", [99, 163, 227])  # sm_86/89, sm_80, sm_90
@pytest.mark.parametrize("G,has_zeros", [(128, False), (32, True)])
@pytest.mark.parametrize("fused", [False, True], ids=["gemm2", "gemm1-fused"])
def test_prefill_configs_fit_shared_memory(limit_kb, G, has_zeros, fused):
    nb = 2 if fused else 1
    kept = [c for c in (ig.fit(ig.adapt_to_group(c, G), limit_kb * 1024, nb, G, has_zeros)
                        for c in ig.get_prefill_configs(fused)) if c is not None]
    assert len(kept) >= 3
    assert all(ig.smem_bytes(c, nb, G, has_zeros) <= limit_kb * 1024 and c.num_stages >= 2 for c in kept)


def test_backend_is_registered():
    b = get_backend("triton_int4")
    cfg = get_preset("debug")
    assert b.graph_safe and b.weight_format == "int4" and b.unavailable(cfg, DEVICE) is None
    assert "group size 128" in b.unavailable(custom(4, 96, 128, 2), DEVICE)
    assert b.extra_bytes(cfg, 16, None) == 16 * 2 * (cfg.F + cfg.H) * 2
    w = ExpertWeights.random(custom(4, 128, 256, 2), device=DEVICE)
    q = b.prepare(w)
    assert isinstance(q, Int4ExpertWeights) and q.group_size == 128 and q.symmetric
    assert torch.equal(b.dequantized(q).w13, q.dequantize().w13)


# ---- GPU compilation, checked on any machine --------------------------------------------------------

# Compiles the kernel for NVIDIA targets without a GPU (triton ships ptxas), in a subprocess with the
# interpreter off: catches constructs that fail to lower, and a K loop that is not software-pipelined
# (its shared memory would be one stage of the A and packed tiles, not num_stages).
AOT_SCRIPT = r"""
import json
from aot import compile_kernel
from moe_tut.kernels import int4_gemm as ig

fn = ig._moe_int4_kernel.fn
names = ("GATHER_A", "SWIGLU", "SCALE_ROWS", "SCATTER_C")
pms = dict(MAGIC=True, POST_SCALE=True, SPLIT=True)
roles = {  # role: flags, config, group size, zeros, switches
    "decode-gemm1": ((1, 1, 0, 0), ig.TileConfig(16, 64, 256, 8, 8, 4), 128, False, {}),  # 2 groups per K step
    "prefill-gemm2": ((0, 0, 1, 1), ig.PREFILL_CONFIGS[0], 64, True, {}),  # 1 group per K step
    "decode-gemm1-pms": ((1, 1, 0, 0), ig.DECODE_CONFIGS[0], 128, False, pms),  # post-scale, split, magic
    "decode-gemm2-pms-zeros": ((0, 0, 1, 1), ig.DECODE_CONFIGS[0], 128, True, pms),
    # under the decode GEMM 2 register cap (decode_register_cap): still pipelined
    "decode-gemm2-asm-capped": ((0, 0, 1, 1), ig.DECODE_CONFIGS[0], 128, False, {**pms, "ASM": True}),
    # the inline-PTX unpack on byte pairs (16-bit registers), as the default decode variant runs it
    "decode-gemm1-asm-pairs": ((1, 1, 0, 0), ig.DECODE_CONFIGS[0], 128, False,
                               {**pms, "ASM": True, "BYTE_PAIRS": True}),
    # inline-PTX unpack (GPU only: the interpreter cannot run it); scales as int32 words in the pipeline
    "decode-gemm1-asm-pipe": ((1, 1, 0, 0), ig.DECODE_CONFIGS[0], 128, False,
                              {**pms, "ASM": True, "PIPE_SCALES": True}),
    "decode-gemm2-pipe-zeros": ((0, 0, 1, 1), ig.DECODE_CONFIGS[0], 128, True, {**pms, "PIPE_SCALES": True}),
    "decode-gemm1-splitk4": ((1, 1, 0, 0), ig.DECODE_CONFIGS[0], 128, False, {**pms, "SPLIT_K": 4}),
    "prefill-gemm1-stack": ((1, 1, 0, 0), ig.PREFILL_CONFIGS_FUSED[0], 128, False, {"STACK": True}),
    # inline-PTX dequantisation (GPU only): fma.rn.bf16x2 must lower on sm_80 as well as sm_90
    "prefill-gemm1-stack-packed": ((1, 1, 0, 0), ig.PREFILL_CONFIGS_FUSED[0], 128, False,
                                   {"STACK": True, "PACKED": True}),
    "prefill-gemm2-packed-zeros": ((0, 0, 1, 1), ig.PREFILL_CONFIGS[0], 128, True, {"PACKED": True}),
    # the unpack in K order (korder)
    "prefill-gemm1-stack-packed-korder": ((1, 1, 0, 0), ig.PREFILL_CONFIGS_FUSED[0], 128, False,
                                          {"STACK": True, "PACKED": True, "KORDER": True}),
    "prefill-gemm2-packed-zeros-korder": ((0, 0, 1, 1), ig.PREFILL_CONFIGS[0], 128, True,
                                          {"PACKED": True, "KORDER": True}),
    # a tail split's two launches (tail_split): the main one, then the tail one in 64-row tiles
    "prefill-gemm1-tail-main": ((1, 1, 0, 0), ig.PREFILL_CONFIGS_FUSED[0], 128, False,
                                {"STACK": True, "PACKED": True, "TAIL": 64}),
    "prefill-gemm2-tail": ((0, 0, 1, 1), ig.TileConfig(64, 128, 128, 8, 8, 3), 128, False,
                           {"PACKED": True, "TAIL": 64, "MAIN_M": 256}),
}
out = []
for cc in (80, 90):
    for role, (flags, cfg, G, hz, switches) in roles.items():
        const = dict(zip(names, map(bool, flags)), E=8, E_PAD=16, EVEN_K=True, BLOCK_M=cfg.block_m,
                     **{**dict(MAGIC=False, POST_SCALE=False, SPLIT=False, ASM=False, PIPE_SCALES=False, SPLIT_K=1,
                               STACK=False, PACKED=False, BYTE_PAIRS=False, KORDER=False),
                        **switches},
                     BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, GROUP_SIZE=G,
                     HAS_ZEROS=hz, GROUPS_PER_TILE=max(1, cfg.block_k // G))
        kernel = compile_kernel(
            fn, const, ptr_types=dict(a_ptr="*bf16", c_ptr="*bf16", s_ptr="*bf16", z_ptr="*bf16", q_ptr="*u8",
                                      row_scale_ptr="*fp32"),
            unit_strides=("stride_ak", "stride_qk", "stride_sn", "stride_zn", "stride_cn"),
            aligned=("a_ptr", "q_ptr", "s_ptr", "z_ptr", "c_ptr", "stride_am", "stride_qe", "stride_qn", "stride_se",
                     "stride_sg", "stride_ze", "stride_zg", "stride_cm", "N", "K"),
            cc=cc, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            maxnreg=ig.DECODE_GEMM2_MAXNREG if role.endswith("capped") else None)
        assert role.endswith("capped") == (f".maxnreg {ig.DECODE_GEMM2_MAXNREG}" in kernel.asm["ptx"]), role
        nb = 2 if flags[1] else 1
        per_stage = cfg.block_m * cfg.block_k * 2 + nb * cfg.block_n * cfg.block_k // 2
        out.append(dict(cc=cc, role=role, shared=kernel.metadata.shared, per_stage=per_stage,
                        estimate=ig.smem_bytes(cfg, nb, G, hz)))
print(json.dumps(out))
"""


def test_kernel_compiles_for_sm80_and_sm90_with_a_pipelined_k_loop():
    from aot import run_aot_script

    results = run_aot_script(AOT_SCRIPT)
    assert len(results) == 32
    for r in results:
        assert 2 * r["per_stage"] <= r["shared"] <= r["estimate"], r


# ---- GPU: mid sizes ------------------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("G", [32, 128])
@pytest.mark.parametrize("T", [1, 16, 64, 1000])  # 64: 16 rows per expert, the decode regime's largest
def test_gpu_mid_size(T, G, symmetric):
    x, q, ids, tw, plan = make_case(8, 1024, 2048, 2, T, "zipf", G, symmetric)
    y = check(ig.moe_forward_triton_int4, x, q, ids, tw, plan)
    # the other regime on the same inputs agrees too
    other = "prefill" if ig.path_for(T, 2, 8) == "decode" else "decode"
    assert relative_error(ig.moe_forward_triton_int4(x, q, plan, path=other), y.float()) < TOL


@gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("routing", ["uniform", "zipf"])
def test_gpu_prefill_tail_split(routing, symmetric, monkeypatch, nan_outputs, tail_launches):
    # ~500 rows per expert: the default splits each GEMM into a main and a tail launch (tail_split); both ways agree
    # with the reference, and every row is written (outputs start NaN)
    x, q, ids, tw, plan = make_case(8, 1024, 2048, 2, 2000, routing, 128, symmetric)
    y = check(ig.moe_forward_triton_int4, x, q, ids, tw, plan)
    assert [t[1] > 0 for t in tail_launches] == [False, True, False, True], tail_launches
    monkeypatch.setenv(ig.TAIL_ENV, "0")
    assert relative_error(ig.moe_forward_triton_int4(x, q, plan), y.float()) < TOL


@gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gpu_fp16_prefill(symmetric):
    # fp16 activations take the v0 dequantisation (packed is bf16-only), whose GEMM2 Triton 3.6 miscompiled at
    # the 256x128x64 tile with zero points and group 128 (PACKED_ONLY_TILES): the autotuner must not get it
    x, q, ids, tw, plan = make_case(8, 1024, 2048, 2, 1000, "zipf", 128, symmetric, dtype=torch.float16)
    check(ig.moe_forward_triton_int4, x, q, ids, tw, plan)


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 64])
def test_gpu_odd_sizes(T):
    # H, F multiples of the group (64) but not of 128 or of any BLOCK_N; prime E; skewed routing
    x, q, ids, tw, plan = make_case(7, 960, 1344, 3, T, "hot", 64, False)
    check(ig.moe_forward_triton_int4, x, q, ids, tw, plan)


@gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gpu_decode_register_cap_keeps_the_bits(symmetric, monkeypatch):
    # qwen3-30b-a3b's H and F, T = 32: GEMM 2's tiles outnumber 4 per SM, so the default caps its registers; a cap
    # changes how ptxas allocates, never the arithmetic
    x, q, ids, tw, plan = make_case(128, 2048, 768, 8, 32, "uniform", 128, symmetric)
    assert ig.path_for(32, 8, 128) == "decode" and not ig.DECODE_VARIANT.takes_gemv(32, 8, 128)
    monkeypatch.setenv(ig.DECODE_MAXNREG_ENV, "0")
    y = check(ig.moe_forward_triton_int4, x, q, ids, tw, plan)
    for regs in ("", "96", "80"):  # "": the rule (96 on an H100)
        monkeypatch.setenv(ig.DECODE_MAXNREG_ENV, regs)
        assert torch.equal(ig.moe_forward_triton_int4(x, q, plan), y), regs


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gpu_decode_unpack_forms_keep_the_bits(symmetric, dtype):
    # The inline-PTX unpack on 4 packed bytes per call (asm), on byte pairs (asm,pairs) and the unpack in Triton
    # ops (magic) make the same magic values, so the same outputs, bit for bit; split-K on and off
    x, q, ids, tw, plan = make_case(8, 1024, 2048, 2, 16, "zipf", 128, symmetric, dtype=dtype)
    base = ig.Int4Variant.parse("magic,post,split")
    for split_k in (0, 1):
        variants = [replace(base, split_k=split_k), replace(base, asm=True, split_k=split_k),
                    replace(base, asm=True, byte_pairs=True, split_k=split_k)]
        outs = [check(ig.moe_forward_triton_int4, x, q, ids, tw, plan, path="decode", variant=v) for v in variants]
        assert all(torch.equal(o, outs[0]) for o in outs[1:]), split_k


@gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gpu_prefill_unpack_in_k_order_keeps_the_bits(symmetric, monkeypatch):
    # `korder` unpacks each byte's two nibbles into one register in K order instead of interleaving after: the same
    # dequantised tile, so the same bits, with the tail split's two launches per GEMM and without
    x, q, ids, tw, plan = make_case(8, 1024, 2048, 2, 1000, "zipf", 128, symmetric)
    packed, korder = ig.Int4Variant.parse("stack,packed"), ig.Int4Variant.parse("stack,packed,korder")
    for tail in ("1", "0"):
        monkeypatch.setenv(ig.TAIL_ENV, tail)
        y = check(ig.moe_forward_triton_int4, x, q, ids, tw, plan, path="prefill", variant=packed)
        assert torch.equal(ig.moe_forward_triton_int4(x, q, plan, path="prefill", variant=korder), y), tail


@gpu
@needs_cuda
def test_gpu_forward_replays_in_a_cuda_graph():
    # graph_safe: no host sync, so capture works and replays match a fresh call
    x, q, ids, tw, plan = make_case(8, 1024, 2048, 2, 16, "uniform")
    y = ig.moe_forward_triton_int4(x, q, plan)  # compile and autotune outside the capture
    graph, y_graph = capture_graph(lambda: ig.moe_forward_triton_int4(x, q, plan))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_graph, y)

"""Every torch backend against the float32 reference, on random and awkward shapes."""

import pytest
import torch

from moe_tut.backends import BackendUnavailable, get_backend, list_backends
from moe_tut.presets import custom, get_preset
from moe_tut.reference import moe_reference, relative_error
from moe_tut.routing import RoutingPlan, simulate_routing
from moe_tut.weights import ExpertWeights

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-5}
TORCH_BACKENDS = ["naive", "bmm", "grouped_mm"]

CASES = [  # (id, E, H, F, top_k, T, skew)
    ("debug-T64", 4, 512, 1024, 2, 64, "uniform"),
    ("T1", 4, 64, 128, 2, 1, "uniform"),              # a single decode token
    ("empty-experts", 8, 64, 128, 1, 3, "uniform"),   # 3 tokens over 8 experts: most get none
    ("one-hot-expert", 6, 64, 96, 2, 40, "hot"),      # one expert takes almost every token
    ("all-to-one", 5, 64, 96, 1, 33, "all_to_one"),   # top-1: literally every token to expert 0
    ("topk-eq-E", 4, 64, 96, 4, 17, "uniform"),       # every expert gets every token
    ("prime-E-zipf", 7, 96, 160, 3, 29, "zipf"),      # prime E, skewed load
    ("odd-sizes", 3, 40, 72, 2, 11, "uniform"),       # H, F multiples of 8 but not of 16
    ("unaligned", 3, 33, 47, 2, 9, "uniform"),        # H, F not multiples of 8: grouped_mm must say why
]


def setup_case(E, H, F, k, T, skew, dtype=torch.bfloat16, seed=0):
    cfg = custom(E, H, F, k)
    w = ExpertWeights.random(cfg, dtype=dtype, seed=seed)
    ids, tw = simulate_routing(T, E, k, skew, seed=seed)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 7)).to(dtype)
    return cfg, w, x, ids, tw, RoutingPlan.build(ids, tw, E)


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backend_matches_reference(backend, case):
    _, E, H, F, k, T, skew = case
    cfg, w, x, ids, tw, plan = setup_case(E, H, F, k, T, skew)
    b = get_backend(backend)
    reason = b.unavailable(cfg, x.device)
    if reason:
        assert backend == "grouped_mm" and (H % 8 or F % 8), reason
        assert "multiples of 8" in reason
        with pytest.raises(BackendUnavailable, match="multiples of 8"):
            b.check_available(cfg, x.device)
        return
    y = b(x, w, plan)
    assert y.shape == (T, H) and y.dtype == x.dtype
    ref = moe_reference(x, w, ids, tw)
    assert relative_error(y, ref) < TOL[x.dtype]


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_backends_in_float32(backend):
    # float32 weights: every backend must agree with the reference to float32 rounding
    cfg, w, x, ids, tw, plan = setup_case(4, 64, 96, 2, 21, "zipf", dtype=torch.float32)
    assert relative_error(get_backend(backend)(x, w, plan), moe_reference(x, w, ids, tw)) < TOL[torch.float32]


def test_reference_by_hand():
    # One token, top-1 to expert 1 with weight 0.5; identity-like weights make the result checkable by hand.
    H = F = 2
    w13 = torch.zeros(2, 2 * F, H)
    w13[1, :F] = torch.eye(2) * 10.0  # gate = 10 x  (silu(10 x) ~ 10 x for x = 1, 2)
    w13[1, F:] = torch.eye(2)  # up = x
    w2 = torch.zeros(2, H, F)
    w2[1] = torch.eye(2)
    x = torch.tensor([[1.0, 2.0]])
    y = moe_reference(x, ExpertWeights(w13, w2), torch.tensor([[1]]), torch.tensor([[0.5]]))
    expect = 0.5 * torch.nn.functional.silu(10 * x) * x
    assert torch.allclose(y, expect)


def test_reference_is_a_registered_row():
    assert {"naive", "bmm", "grouped_mm", "reference"} <= set(list_backends())
    cfg, w, x, ids, tw, plan = setup_case(4, 64, 96, 2, 9, "uniform")
    y = get_backend("reference")(x, w, plan)
    assert y.dtype == torch.float32 and torch.equal(y, moe_reference(x, w, ids, tw))


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_bad_inputs_give_clear_errors(backend):
    cfg, w, x, ids, tw, plan = setup_case(4, 64, 96, 2, 9, "uniform")
    b = get_backend(backend)
    with pytest.raises(ValueError, match="hidden size 32"):
        b(torch.randn(9, 32).bfloat16(), w, plan)
    with pytest.raises(TypeError, match="x is torch.float32 but the expert weights are torch.bfloat16"):
        b(x.float(), w, plan)
    with pytest.raises(ValueError, match="T=8 tokens but the routing plan was built for 9"):
        b(x[:8], w, plan)
    with pytest.raises(ValueError, match="2-D"):
        b(x[None], w, plan)
    other = RoutingPlan.build(torch.zeros(9, 2, dtype=torch.int64), tw, 6)
    with pytest.raises(ValueError, match="E=6 experts"):
        b(x, w, other)


def test_unknown_backend():
    with pytest.raises(ValueError, match="registered: naive"):
        get_backend("cutlass")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", TORCH_BACKENDS + ["reference"])
def test_backends_on_gpu(backend):
    torch.manual_seed(0)
    cfg = get_preset("debug")
    w = ExpertWeights.random(cfg, device="cuda")
    for T, skew in [(1, "uniform"), (300, "zipf"), (64, "all_to_one")]:
        ids, tw = simulate_routing(T, cfg.E, cfg.top_k, skew, device="cuda")
        x = torch.randn(T, cfg.H, device="cuda", dtype=torch.bfloat16)
        y = get_backend(backend)(x, w, RoutingPlan.build(ids, tw, cfg.E))
        assert relative_error(y, moe_reference(x, w, ids, tw)) < 2e-2


@pytest.mark.gpu
def test_mixed_devices_rejected():
    cfg, w, x, ids, tw, plan = setup_case(4, 64, 96, 2, 9, "uniform")
    with pytest.raises(ValueError, match="same device"):
        get_backend("naive")(x.cuda(), w, plan)


@pytest.mark.parametrize("backend", TORCH_BACKENDS + ["triton"])
def test_zero_tokens(backend):
    # T = 0 (an empty batch) returns an empty y instead of failing in the combine's reshape
    cfg, w, x, ids, tw, plan = setup_case(4, 64, 96, 2, 1, "uniform")
    empty = RoutingPlan.build(ids[:0], tw[:0], 4)
    assert get_backend(backend)(x[:0], w, empty).shape == (0, 64)

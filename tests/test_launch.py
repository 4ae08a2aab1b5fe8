"""kernels/launch.py: repeated launches straight to the compiled kernel.

CPU: when the direct launch is allowed (Triton version, interpreter, MOE_TUT_FAST_LAUNCH, launch hooks), and
that its key separates every argument Triton specialises on. Under the interpreter every launch goes through
Triton (checked: results right, nothing remembered).
GPU (`-m gpu`): the second launch of a key is a direct one and computes the same as Triton's dispatcher, for a
plain kernel, for a misaligned view (its own key), for an autotuned kernel (the chosen config remembered), and
for the whole `triton` / `triton_int4` forwards (the same bits as MOE_TUT_FAST_LAUNCH=0, eagerly and in a
CUDA graph).
"""

import pytest
import torch
import triton
import triton.language as tl

import moe_tut  # noqa: F401  (interpreter + its bf16 dot fix, before the kernels are defined)
from moe_tut.backends import get_backend
from moe_tut.bench.timing import capture_graph
from moe_tut.kernels import launch as ln
from moe_tut.presets import custom
from moe_tut.routing import RoutingPlan, simulate_routing
from moe_tut.weights import ExpertWeights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr, TWICE: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=ok).to(tl.float32)
    r = alpha * x + y
    if TWICE:
        r = 2 * r
    tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=ok)


# TWICE from the length of x: a heuristic that reads something the launch key does not hold (n is passed apart).
_axpy_heur = triton.heuristics({"TWICE": lambda a: a["x_ptr"].shape[0] > 500})(_axpy_kernel)
_axpy_tuned = triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=2),
                                       triton.Config({"BLOCK": 128}, num_warps=4)], key=["n"])(
    triton.heuristics({"TWICE": lambda a: a["n"] % 2 == 1})(_axpy_kernel))


def axpy(x, y, alpha, fn=_axpy_kernel, n=None, **constexprs):
    out = torch.empty_like(x)
    n = x.numel() if n is None else n
    kwargs = dict(constexprs) if fn is _axpy_tuned else dict(BLOCK=64, **constexprs)
    ln.launch(fn, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), (x, y, out, n, alpha), kwargs)
    return out


def expected(x, y, alpha, twice=False, n=None):
    r = alpha * x.float() + y.float()
    r = (2 * r if twice else r).to(x.dtype)
    return r if n is None else r[:n]


@pytest.fixture
def fresh_entries():
    ln.clear()
    yield
    ln.clear()


def test_key_separates_dtype_alignment_and_values():
    base = torch.zeros(64, dtype=torch.bfloat16)
    other = torch.ones(64, dtype=torch.bfloat16)
    key = ln._key(_axpy_kernel, 0, (base, 5), dict(BLOCK=64))
    assert key == ln._key(_axpy_kernel, 0, (other, 5), dict(BLOCK=64))  # another aligned tensor: same kernel
    assert key != ln._key(_axpy_kernel, 0, (base[1:], 5), dict(BLOCK=64))  # 2 bytes off: not 16-byte aligned
    assert key != ln._key(_axpy_kernel, 0, (base.float(), 5), dict(BLOCK=64))
    assert key != ln._key(_axpy_kernel, 0, (base, 16), dict(BLOCK=64))  # ints by value (Triton: ==1, %16)
    assert key != ln._key(_axpy_kernel, 0, (base, 5), dict(BLOCK=128))
    assert key != ln._key(_axpy_kernel, 0, (base, 5), dict(BLOCK=64, num_warps=8))
    assert key != ln._key(_axpy_kernel, 1, (base, 5), dict(BLOCK=64))  # another device
    assert key != ln._key(_axpy_tuned, 0, (base, 5), dict(BLOCK=64))


def test_host_integer_helpers_match_triton():
    for a in range(0, 300):
        for b in (1, 2, 3, 16, 64, 100):
            assert ln.cdiv(a, b) == triton.cdiv(a, b)
    for n in range(1, 5000):
        assert ln.next_power_of_2(n) == triton.next_power_of_2(n)


def test_when_the_direct_launch_is_allowed(monkeypatch):
    monkeypatch.setattr(ln, "interpreting", lambda: False)
    monkeypatch.setattr(ln, "_VERSION_OK", True)
    monkeypatch.delenv(ln.FAST_LAUNCH_ENV, raising=False)
    assert ln.fast_launch_enabled()
    monkeypatch.setenv(ln.FAST_LAUNCH_ENV, "0")
    assert not ln.fast_launch_enabled()
    monkeypatch.setenv(ln.FAST_LAUNCH_ENV, "1")
    assert ln.fast_launch_enabled()

    def hook(metadata):
        pass

    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert not ln.fast_launch_enabled()  # a profiler's hook sees every launch
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert ln.fast_launch_enabled()
    monkeypatch.setattr(ln, "_VERSION_OK", False)
    assert not ln.fast_launch_enabled()
    monkeypatch.setattr(ln, "_VERSION_OK", True)
    monkeypatch.setattr(ln, "interpreting", lambda: True)
    assert not ln.fast_launch_enabled()


def test_heuristics_fixed_by_the_key_or_dynamic():
    x = torch.zeros(8)
    args = dict(x_ptr=x, n=5, BLOCK=64)
    heuristics, dynamic = ln._first_heuristics([("EVEN", lambda a: a["n"] % a["BLOCK"] == 0)], dict(args))
    assert [h[0::2] for h in heuristics] == [("EVEN", False)] and not dynamic  # ints held by value in the key
    assert ln._first_heuristics([("BIG", lambda a: a["x_ptr"].shape[0] > 4)], dict(args))[1]  # a tensor's shape
    chained = [("EVEN", lambda a: a["n"] % 2 == 0), ("BIG", lambda a: a["x_ptr"].numel() > 4),
               ("BOTH", lambda a: a["EVEN"] and a["BIG"])]
    named = dict(args)
    heuristics, dynamic = ln._first_heuristics(chained, named)
    assert dynamic and named["BOTH"] is False and [h[2] for h in heuristics] == [False, True, False]
    assert not ln._first_heuristics(chained[:1] + [("ODD", lambda a: not a["EVEN"])], dict(args))[1]
    assert ln._first_heuristics([("ALL", lambda a: len({**a}))], dict(args))[1]  # iterates, a tensor among them
    assert not ln._first_heuristics([("ALL", lambda a: len({**a}))], dict(n=5, BLOCK=64))[1]
    assert ln._first_heuristics([("G", lambda a: a.get("GROUP", 1))], dict(args))[1]  # an absent name: not assumed


class _StubKernel:
    """What launch() hands a remembered compiled kernel: records each run's grid and arguments."""

    function = packed_metadata = None

    def __init__(self):
        self.runs = []

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit, *values):
        self.runs.append(((gx, gy, gz), values))


@pytest.mark.parametrize("dynamic", [False, True])
def test_direct_launch_arguments(dynamic, monkeypatch, fresh_entries):
    # A remembered entry for fn(a_ptr, n, *, out_ptr, SCALE, BLOCK, FLAG=False) with BLOCK from an autotuner and FLAG
    # from a heuristic; a later call passes new tensors (positional and by keyword) and gets them, with the
    # remembered constants, whether the heuristic is recomputed (dynamic) or not.
    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 7

    monkeypatch.setattr(ln, "driver", type("D", (), {"active": Driver()})())
    monkeypatch.setattr(ln, "fast_launch_enabled", lambda: True)
    fn, kernel = object(), _StubKernel()
    a, out = torch.zeros(64), torch.zeros(64)
    kwargs = dict(out_ptr=out, SCALE=3, num_warps=4)
    named = dict(a_ptr=a, n=64, **kwargs, BLOCK=32, FLAG=True)
    rest = [("out_ptr", None), ("SCALE", None), ("BLOCK", None), ("FLAG", False)]
    heuristics = [("FLAG", lambda m: m["n"] > 10, True)]
    entry = ln._Entry(fn, kernel, dict(BLOCK=32), heuristics, ["a_ptr", "n"], rest, dynamic, named, kwargs)
    ln._ENTRIES[ln._key(fn, 0, (a, 64), kwargs)] = entry
    seen = []

    def grid(meta):
        seen.append(meta)
        return (meta["BLOCK"] * 2,)

    a2, out2 = torch.ones(64), torch.ones(64)
    assert ln.launch(fn, grid, (a2, 64), dict(out_ptr=out2, SCALE=3, num_warps=4)) is kernel
    (g, values), = kernel.runs
    assert g == (64, 1, 1) and values[0] is a2 and values[2] is out2 and values[1:2] + values[3:] == (64, 3, 32, True)
    assert seen[0]["BLOCK"] == 32 and seen[0]["FLAG"] is True and seen[0]["SCALE"] == 3
    assert not dynamic == ("out_ptr" not in seen[0])  # a direct launch's grid sees no tensors
    assert entry.constants == ([] if dynamic else [None, 3, 32, True])


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's path")
def test_interpreter_goes_through_triton(fresh_entries):
    x, y = torch.randn(100), torch.randn(100)
    for _ in range(2):
        torch.testing.assert_close(axpy(x, y, 0.5), expected(x, y, 0.5))
    assert not ln._ENTRIES


@pytest.mark.gpu
def test_direct_launch_computes_what_triton_does(fresh_entries):
    assert ln.fast_launch_enabled(), "the direct launch is checked on Triton 3.6 only"
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = (torch.randn(1000, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    torch.testing.assert_close(axpy(x, y, 0.5), expected(x, y, 0.5), rtol=0, atol=0)
    assert len(ln._ENTRIES) == 1
    for n in (1000, 999):  # the second launch of a key is direct; a new n is a new key
        x2, y2 = (torch.randn(n, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        torch.testing.assert_close(axpy(x2, y2, -1.5), expected(x2, y2, -1.5), rtol=0, atol=0)
    assert len(ln._ENTRIES) == 3  # alpha and n by value
    # A view 2 bytes into the buffer: not 16-byte aligned, so not the kernel compiled for aligned pointers.
    xs, ys = x[1:], y[1:]
    for _ in range(2):
        torch.testing.assert_close(axpy(xs, ys, 0.5), expected(xs, ys, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(axpy(x, y, 0.5, TWICE=True), expected(x, y, 0.5, twice=True), rtol=0, atol=0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("n", [5000, 4999])
def test_autotuned_launch_remembers_config_and_heuristic(n, fresh_entries):
    x, y = (torch.randn(n, device="cuda", dtype=torch.float16) for _ in range(2))
    first = axpy(x, y, 2.0, fn=_axpy_tuned)
    (entry,) = ln._ENTRIES.values()
    assert entry.extra["BLOCK"] == _axpy_tuned.best_config.kwargs["BLOCK"]
    assert entry.heuristics[0][0::2] == ("TWICE", n % 2 == 1)
    for _ in range(3):
        torch.testing.assert_close(axpy(x, y, 2.0, fn=_axpy_tuned), first, rtol=0, atol=0)
    torch.testing.assert_close(first, expected(x, y, 2.0, twice=n % 2 == 1), rtol=0, atol=0)
    assert len(ln._ENTRIES) == 1


@pytest.mark.gpu
def test_heuristic_beyond_the_key_goes_through_triton(fresh_entries):
    short, long = (torch.randn(m, device="cuda", dtype=torch.float32) for m in (400, 600))
    for _ in range(2):  # n = 300 both times: one key, but TWICE differs with the length of x
        out_short = axpy(short, short, 1.0, fn=_axpy_heur, n=300)[:300]
        out_long = axpy(long, long, 1.0, fn=_axpy_heur, n=300)[:300]
        torch.testing.assert_close(out_short, expected(short, short, 1.0, n=300), rtol=0, atol=0)
        torch.testing.assert_close(out_long, expected(long, long, 1.0, twice=True, n=300), rtol=0, atol=0)
    assert len(ln._ENTRIES) == 1


def _forward_inputs(backend, E, H, F, k, T, seed=0):
    w = ExpertWeights.random(custom(E, H, F, k), device="cuda", seed=seed)
    b = get_backend(backend)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
    ids, tw = simulate_routing(T, E, k, device="cuda", seed=seed)
    return b, b.prepare(w), x, ids, tw


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton_int4"])
@pytest.mark.parametrize("T", [1, 16, 200, 3000])
def test_forwards_match_the_dispatcher(backend, T, monkeypatch, fresh_entries):
    E, H, F, k = 16, 512, 384, 4
    b, prepared, x, ids, tw = _forward_inputs(backend, E, H, F, k, T)

    def forward():
        return b(x, prepared, RoutingPlan.build(ids, tw, E, validate=False, defer=True))

    monkeypatch.setenv(ln.FAST_LAUNCH_ENV, "0")
    want = forward()
    monkeypatch.setenv(ln.FAST_LAUNCH_ENV, "1")
    for _ in range(3):  # first launches through Triton, the others direct
        torch.testing.assert_close(forward(), want, rtol=0, atol=0)
    assert ln._ENTRIES
    graph, out = capture_graph(forward)
    graph.replay()
    torch.testing.assert_close(out, want, rtol=0, atol=0)

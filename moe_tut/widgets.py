"""The glue between moe_tut and the tutorial notebooks: preset choice, small tables, figures, widgets.

Notebooks only call into this module (and the rest of moe_tut); no benchmark or kernel logic lives in
a notebook. Every interactive view has a static twin: a plain function that draws the same figure
from arguments, so the figure also shows where widgets do not (GitHub, CI). Widgets are built so their
callbacks can be driven from plain Python, without a kernel or a browser (tests/test_widgets.py):

    w = routing_explorer("debug")          # ipywidgets.interactive; w.result is the RoutingStats
    w.children[1].value = 256              # re-computes synchronously
    dash = Dashboard("debug", batch=1, seq=8)
    dash.seq.value = 16; dash.button.click()   # runs the benchmark once; dash.rows holds the rows

ipywidgets (the `notebooks` extra) is imported only by the widget builders, so the plain helpers work
without it.
"""

from __future__ import annotations

import functools
import html
import importlib
import importlib.util
import inspect
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from . import env
from .backends import default_backends, get_backend, list_backends
from .bench.ceilings import Ceilings, measure_ceilings
from .bench.harness import Row, run_point
from .bench.memory import CPU_WEIGHT_LIMIT_BYTES, InsufficientMemoryError, check_fits
from .bench.results import format_table, read_results
from .presets import PRESETS, MoEConfig, get_preset
from .routing import RoutingStats, simulate_routing
from .weights import ExpertWeights

GB = 1e9
REPO_ROOT = Path(__file__).resolve().parents[1]
# The H100 results committed with the repo (naive, bmm, grouped_mm on every preset; see README).
H100_RESULTS = REPO_ROOT / "results" / "h100" / "torch_backends" / "moe_bench.csv"
# Token counts the notebooks sweep. On the CPU every forward is a correctness run, so T stays small.
GPU_TOKENS = [1, 16, 128, 1024, 8192]
CPU_TOKENS = [1, 16, 64, 256]
GPU_BATCH_SEQ = (4, 256)  # T = 1024, the CLI's default on a GPU
# The dashboard's first run on a GPU: one decode step of 16 tokens, and the backends that compile at
# most one Triton kernel per GEMM there (the decode tile is fixed: no autotuning). The former default,
# every backend at T = 1024, took 410 s in the recorded H100 run (results/h100/notebooks/meta.json) while
# its six timed forwards take about 50 ms together (that run's figure), so nearly all of it was outside
# the timed calls, where a first run compiles, autotunes prefill tiles and loads the cuda_int4 extension.
DASHBOARD_GPU_BATCH_SEQ = (1, 16)
DASHBOARD_GPU_BACKENDS = ("naive", "bmm", "grouped_mm", "triton")
CPU_BATCH_SEQ = (1, 16)  # T = 16: Triton under its interpreter takes seconds per forward at T = 64
# Routing scenarios the notebooks compare (moe_tut.routing documents each).
SKEW_CHOICES = ["uniform", "zipf:0.5", "zipf:1.2", "zipf:2.0", "hot", "all_to_one"]
# For the tile estimate when there is no GPU: an H100 SXM has 132 SMs.
REFERENCE_SM_COUNT = 132
# Columns of the rows tables the notebooks show (a subset of harness.Row).
ROW_COLUMNS = ["config", "T", "skew", "backend", "status", "median_ms", "speedup_vs_naive", "tflops",
               "weight_gbps", "roofline_pct", "weight_gb", "peak_extra_gb", "rel_err", "timing", "reason"]


# ---------------------------------------------------------------------------------------------- setup

def on_gpu() -> bool:
    return env.has_cuda()


def pick_preset(name: str | None = None, verbose: bool = True) -> MoEConfig:
    """The notebook's preset: `name`, or mixtral on a GPU and debug on the CPU. Says which, and why."""
    chosen = name or ("mixtral" if on_gpu() else "debug")
    cfg = get_preset(chosen)
    if verbose:
        print(f"preset: {cfg.describe()}")
        if on_gpu():
            print(f"device: {env.device_info().summary()}")
        else:
            why = " No CUDA GPU here, so the default is the tiny debug preset." if name is None else ""
            print(f"device: CPU only.{why} Triton kernels run under Triton's CPU interpreter "
                  f"(TRITON_INTERPRET={'1' if env.interpreting() else '0'}); every time below is a CPU "
                  "correctness run, not GPU performance.")
    return cfg


def default_tokens() -> list[int]:
    """Token counts to sweep: decode to prefill on a GPU, small ones on the CPU."""
    return list(GPU_TOKENS if on_gpu() else CPU_TOKENS)


def default_batch_seq() -> tuple[int, int]:
    return GPU_BATCH_SEQ if on_gpu() else CPU_BATCH_SEQ


def dashboard_batch_seq() -> tuple[int, int]:
    """The dashboard's default point: a 16-token decode step on a GPU, 1 x 16 on the CPU too."""
    return DASHBOARD_GPU_BATCH_SEQ if on_gpu() else CPU_BATCH_SEQ


def dashboard_backends() -> list[str]:
    """Backends ticked by default: on a GPU the quick ones (DASHBOARD_GPU_BACKENDS), on the CPU every
    default backend (there every Triton kernel runs one fixed config under the interpreter: nothing to
    compile or autotune)."""
    names = default_backends()
    return [n for n in names if n in DASHBOARD_GPU_BACKENDS] if on_gpu() else names


def source_of(obj, start: str | None = None, lines: int | None = None) -> str:
    """The package's own source of `obj` (a Triton kernel too: its Python function), or an excerpt:
    from the first line containing `start`, `lines` lines long."""
    while not inspect.isroutine(obj) and not inspect.isclass(obj) and not inspect.ismodule(obj) \
            and hasattr(obj, "fn"):  # triton.jit / autotune / heuristics wrap the Python function in .fn
        obj = obj.fn
    text = inspect.getsource(obj)
    if start is None:
        return text
    src = text.splitlines()
    first = next((i for i, line in enumerate(src) if start in line), None)
    if first is None:
        raise ValueError(f"{start!r} does not occur in the source of {getattr(obj, '__qualname__', obj)}")
    return "\n".join(src[first:first + lines if lines else None]) + "\n"


def show_source(obj, start: str | None = None, lines: int | None = None):
    """The package's own source of `obj` (or the excerpt source_of picks), highlighted: notebooks show
    code this way, never a copy."""
    from IPython.display import Code

    return Code(source_of(obj, start, lines), language="python")


def frame(records: Iterable, columns: Sequence[str] | None = None):
    """A pandas DataFrame of dicts or harness Rows (only `columns`, when given)."""
    import pandas as pd

    recs = [r if isinstance(r, dict) else r.as_dict() for r in records]
    df = pd.DataFrame(recs)
    if columns is not None:
        df = df[[c for c in columns if c in df.columns]]
    return df


def rows_frame(rows: Iterable):
    return frame(rows, ROW_COLUMNS)


def table(records: Iterable, columns: Sequence[str] | None = None, precision: int = 3):
    """`frame` for display: an HTML table without the index, long text not truncated (needs jinja2)."""
    return frame(records, columns).style.hide(axis="index").format(precision=precision)


def presets_to_compare(cfg: MoEConfig, *names: str) -> list[MoEConfig]:
    """`cfg` and the named presets, without duplicates (routing and napkin math need no weights)."""
    return list({c.name: c for c in [cfg, *(get_preset(n) for n in names)]}.values())


@functools.cache
def device_sm_count() -> int:
    """This GPU's SM count; on the CPU, an H100's (132), for napkin math only."""
    return env.device_info().sm_count if on_gpu() else REFERENCE_SM_COUNT


# ----------------------------------------------------------------------------------- 00 environment

def environment_table(info: env.DeviceInfo | None = None) -> list[dict]:
    """What this machine has: GPU, SMs, L2, shared memory per block, capability, versions."""
    info = info or env.device_info()

    def fmt(value, unit=""):
        if value is None:
            return "- (no CUDA GPU)" if info.kind == "cpu" else "unknown"
        return f"{value:.1f} {unit}".strip() if isinstance(value, float) else f"{value} {unit}".strip()

    items = [
        ("device", info.name if info.kind == "cuda" else f"CPU ({info.name})"),
        ("compute capability", fmt(info.capability and f"sm_{info.capability}")),
        ("SMs", fmt(info.sm_count)),
        ("GPU memory total", fmt(info.total_memory_gb, "GB")),
        ("GPU memory free", fmt(info.free_memory_gb, "GB")),
        ("L2 cache", fmt(info.l2_cache_mb, "MB")),
        ("shared memory per block (opt-in)", fmt(info.shared_memory_per_block_kb, "KB")),
        ("torch", info.torch_version),
        ("triton", info.triton_version or "not installed"),
        ("CUDA (torch build)", info.cuda_version or "- (CPU build of torch)"),
        ("driver", info.driver or "-"),
        ("python", info.python),
        ("Triton interpreter (TRITON_INTERPRET=1)", "on" if info.triton_interpreter else "off"),
    ]
    return [{"what": k, "value": v} for k, v in items]


def int4_weight_bytes(cfg: MoEConfig, group_size: int | None = None, symmetric: bool = True) -> int | str:
    """Bytes of a preset's expert weights in moe_tut.quant's INT4 format, or why there is no number.

    Sized with the format's own classes (Int4ExpertWeights of empty "meta" tensors, which validate
    their shapes), at `group_size` (default: the format's default) and symmetric or asymmetric:
    nothing is allocated or quantised.
    """
    if importlib.util.find_spec("moe_tut.quant") is None:
        return "INT4 not built yet"
    quant = importlib.import_module("moe_tut.quant")
    G = group_size or quant.DEFAULT_GROUP_SIZE

    def qt(E: int, N: int, K: int):
        scales = torch.empty(E, K // G, N, dtype=quant.SCALE_DTYPE, device="meta")
        return quant.QuantizedTensor(
            packed=torch.empty(E, N, K // 2, dtype=torch.uint8, device="meta"), scales=scales,
            zeros=None if symmetric else torch.empty_like(scales), group_size=G, symmetric=symmetric,
            shape=(E, N, K))

    try:
        return quant.Int4ExpertWeights(qt(cfg.E, 2 * cfg.F, cfg.H), qt(cfg.E, cfg.H, cfg.F)).nbytes
    except (ValueError, TypeError, AttributeError) as exc:
        return f"INT4 size unknown: {exc}"


def int4_backends() -> list[str]:
    """Registered backends that compute with INT4 weights."""
    return [n for n in list_backends() if get_backend(n).weight_format == "int4"]


def _fits(cfg: MoEConfig, tokens: int, device, weight_bytes: int | None = None) -> str:
    try:
        check_fits(cfg, [tokens], device, weight_bytes=weight_bytes)
    except InsufficientMemoryError:
        return "no"
    return "yes"


def fits_table(tokens: int = 8192, device=None) -> list[dict]:
    """For each preset: its bf16 weights and whether they (plus activations at T=`tokens`) fit here; INT4 too."""
    device = torch.device(device) if device is not None else env.default_device()
    kernels = ", ".join(int4_backends()) or "INT4 not built yet"
    out = []
    for cfg in PRESETS.values():
        int4 = int4_weight_bytes(cfg)
        rec = {"preset": cfg.name, "E": cfg.E, "H": cfg.H, "F": cfg.F, "top_k": cfg.top_k,
               "bf16 GB": round(cfg.weight_bytes() / GB, 3), f"bf16 fits (T={tokens})": _fits(cfg, tokens, device)}
        if isinstance(int4, str):
            rec["INT4 GB"], rec[f"INT4 fits (T={tokens})"] = int4, int4
        else:
            rec["INT4 GB"] = round(int4 / GB, 3)
            rec[f"INT4 fits (T={tokens})"] = _fits(cfg, tokens, device, weight_bytes=int4)
        rec["INT4 backends"] = kernels
        out.append(rec)
    return out


def fit_reasons(tokens: int = 8192, device=None) -> list[str]:
    """check_fits' own message for every preset whose bf16 weights do not fit here."""
    device = torch.device(device) if device is not None else env.default_device()
    reasons = []
    for cfg in PRESETS.values():
        try:
            check_fits(cfg, [tokens], device)
        except InsufficientMemoryError as exc:
            reasons.append(f"{cfg.name}: {exc}")
    return reasons


def backend_table(cfg: MoEConfig, device=None) -> list[dict]:
    """Every registered backend, and whether it can run `cfg` on this device (with the reason if not)."""
    device = torch.device(device) if device is not None else env.default_device()
    out = []
    for name in list_backends():
        b = get_backend(name)
        reason = b.unavailable(cfg, device)
        out.append({"backend": name, "weights": b.weight_format, "what it does": b.description,
                    f"runs {cfg.name} here": "yes" if not reason else f"no: {reason}"})
    return out


def cuda_extension_status(device=None) -> str:
    """Whether the CUDA C++ INT4 extension (csrc/) is built and runs here, or why not.

    Asks the `cuda_int4` backend itself, which builds the extension on first use where it can (on a
    GPU with a CUDA toolkit: about a minute the first time, cached afterwards).
    """
    device = torch.device(device) if device is not None else env.default_device()
    if "cuda_int4" in list_backends():
        reason = get_backend("cuda_int4").unavailable(get_preset("debug"), device)
        return "built: the cuda_int4 backend runs on this GPU" if reason is None else f"not built here: {reason}"
    csrc = REPO_ROOT / "csrc"
    sources = sorted(csrc.glob("**/*.cu")) if csrc.is_dir() else []
    if not sources:
        return ("not built: the CUDA INT4 extension does not exist yet (csrc/ has no .cu source; it is planned), "
                "so there is nothing to build")
    return f"not built: csrc/ has {len(sources)} .cu file(s) but no cuda_int4 backend is registered in this install"


def what_runs_here(device=None) -> list[str]:
    """Plain sentences: what the tutorial runs on this machine and what it does not."""
    device = torch.device(device) if device is not None else env.default_device()
    debug = get_preset("debug")
    runnable = [r["backend"] for r in backend_table(debug, device) if r[f"runs {debug.name} here"] == "yes"]
    if device.type == "cuda":
        fit = [r["preset"] for r in fits_table(8192, device) if r["bf16 fits (T=8192)"] == "yes"]
        return [f"GPU: timings are real. Presets whose bf16 weights fit at T=8192: {', '.join(fit) or 'none'}.",
                f"backends that run here: {', '.join(runnable)}"]
    limit = CPU_WEIGHT_LIMIT_BYTES / GB
    return [
        f"runs: the debug preset (and custom shapes up to {limit:.1f} GB of weights) on the CPU",
        f"runs: backends {', '.join(runnable)}; Triton kernels under Triton's CPU interpreter (slow: seconds "
        "per forward, for correctness only)",
        "runs: routing simulation and its statistics for every preset (no weights needed)",
        "does not run: presets with more than 0.5 GB of expert weights (mixtral and up), GPU timings, CUDA-graph "
        "timing, the torch.profiler CUDA kernel table, the CUDA INT4 extension",
        "every time printed on this machine is a CPU correctness run, not GPU performance",
    ]


# ---------------------------------------------------------------------------------------- 01 routing

def routing_stats(cfg: MoEConfig, T: int, skew: str = "uniform", top_k: int | None = None,
                  seed: int = 0) -> RoutingStats:
    """Simulate routing of T tokens for a preset (optionally another top-k) and return its statistics."""
    k = min(top_k or cfg.top_k, cfg.E)
    topk_ids, _ = simulate_routing(T, cfg.E, k, skew, seed=seed)
    return RoutingStats.from_ids(topk_ids, cfg.E)


def skew_sweep(cfg: MoEConfig, T: int, alphas: Sequence[float], seeds: Sequence[int] = (0, 1, 2, 3)) -> list[dict]:
    """Imbalance and bmm padding waste vs the Zipf exponent (alpha = 0 is uniform), averaged over seeds."""
    out = []
    for a in alphas:
        stats = [routing_stats(cfg, T, f"zipf:{a}", seed=s) for s in seeds]
        out.append({"config": cfg.name, "alpha": float(a),
                    "imbalance": sum(s.imbalance for s in stats) / len(stats),
                    "wasted_fraction": sum(s.wasted_fraction for s in stats) / len(stats),
                    "active_experts": sum(s.active_experts for s in stats) / len(stats)})
    return out


def plot_skew_scenarios(cfg: MoEConfig, T: int, skews: Sequence[str] = ("uniform", "zipf", "hot", "all_to_one"),
                        seed: int = 0):
    """Tokens per expert for each routing scenario, side by side."""
    from .plots import plot_tokens_per_expert

    fig, axes = plt.subplots(1, len(skews), figsize=(4.2 * len(skews), 3.4), sharey=True)
    for ax, skew in zip(axes, skews):
        s = routing_stats(cfg, T, skew, seed=seed)
        plot_tokens_per_expert(s, ax=ax, title=f"{skew}: imbalance {s.imbalance:.2f}x, "
                                               f"waste {100 * s.wasted_fraction:.0f}%")
        ax.legend(fontsize=7)
    fig.suptitle(f"{cfg.name} (E={cfg.E}, top-{cfg.top_k}), T={T}: tokens per expert")
    fig.tight_layout()
    return fig


def plot_skew_sweep(cfgs: Sequence[MoEConfig], T: int, alphas: Sequence[float] | None = None):
    """Load imbalance (max/mean) and bmm padding waste vs the Zipf exponent, one line per preset."""
    alphas = list(alphas) if alphas is not None else [round(0.25 * i, 2) for i in range(13)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for cfg in cfgs:
        pts = skew_sweep(cfg, T, alphas)
        label = f"{cfg.name} (E={cfg.E})"
        ax1.plot(alphas, [p["imbalance"] for p in pts], marker="o", label=label)
        ax2.plot(alphas, [100 * p["wasted_fraction"] for p in pts], marker="o", label=label)
    ax1.set_ylabel("imbalance: busiest / mean expert")
    ax2.set_ylabel("bmm padding waste (% of padded rows)")
    ax2.set_ylim(0, 100)
    for ax in (ax1, ax2):
        ax.set_xlabel("zipf alpha (0 = uniform)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"T={T} tokens, mean over 4 seeds")
    fig.tight_layout()
    return fig


def plot_waste_vs_tokens(cfgs: Sequence[MoEConfig], tokens: Sequence[int], skew: str = "uniform"):
    """Padding waste and share of experts with no token vs T, for uniform (or any) routing."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for cfg in cfgs:
        stats = [routing_stats(cfg, T, skew) for T in tokens]
        label = f"{cfg.name} (E={cfg.E}, top-{cfg.top_k})"
        ax1.plot(tokens, [100 * s.wasted_fraction for s in stats], marker="o", label=label)
        ax2.plot(tokens, [100 * s.empty_experts / s.num_experts for s in stats], marker="o", label=label)
    ax1.set_ylabel("bmm padding waste (%)")
    ax2.set_ylabel("experts with no token (%)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{skew} routing")
    fig.tight_layout()
    return fig


def _show(fig) -> None:
    """Display a figure once (inside a widget's output too) and free it."""
    from IPython.display import display

    display(fig)
    plt.close(fig)


ROUTING_TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]


def routing_explorer(preset: str | None = None, T: int = 1024, top_k: int | None = None, skew: str = "zipf",
                     alpha: float = 1.2):
    """Interactive tokens-per-expert histogram: preset, T, top-k, skew (and the Zipf exponent).

    An ipywidgets.interactive: children are [preset, T, top-k, skew, zipf alpha, output]; `.result` is the
    RoutingStats of the last draw. Changing any control re-computes at once (routing is cheap).
    """
    import ipywidgets as W

    from .plots import plot_tokens_per_expert

    cfg = pick_preset(preset, verbose=False)
    preset_w = W.Dropdown(options=list(PRESETS), value=cfg.name, description="preset")
    tokens_w = W.SelectionSlider(options=ROUTING_TOKENS, value=T if T in ROUTING_TOKENS else 1024,
                                 description="T", continuous_update=False)
    k_w = W.IntSlider(min=1, max=cfg.E, value=min(top_k or cfg.top_k, cfg.E), description="top-k",
                      continuous_update=False)
    skew_w = W.Dropdown(options=["uniform", "zipf", "hot", "all_to_one"], value=skew, description="skew")
    alpha_w = W.FloatSlider(min=0.0, max=3.0, step=0.1, value=alpha, description="zipf alpha",
                            continuous_update=False, disabled=skew != "zipf")

    def on_preset(change):  # registered before interactive's own observer, so it runs first
        new = get_preset(change["new"])
        k_w.max = new.E
        k_w.value = min(new.top_k, new.E)

    preset_w.observe(on_preset, names="value")
    skew_w.observe(lambda change: setattr(alpha_w, "disabled", change["new"] != "zipf"), names="value")

    def draw(preset, T, top_k, skew, alpha):
        c = get_preset(preset)
        name = f"zipf:{alpha}" if skew == "zipf" else skew
        stats = routing_stats(c, T, name, top_k=top_k)
        fig, ax = plt.subplots(figsize=(8, 3.5))
        plot_tokens_per_expert(stats, ax=ax, title=(
            f"{c.name}, T={T}, top-{stats.top_k}, {name}: imbalance {stats.imbalance:.2f}x, "
            f"{stats.empty_experts} empty experts, bmm padding waste {100 * stats.wasted_fraction:.0f}%"))
        ax.title.set_fontsize(9)
        _show(fig)
        return stats

    return W.interactive(draw, preset=preset_w, T=tokens_w, top_k=k_w, skew=skew_w, alpha=alpha_w)


# ------------------------------------------------------------------------- 02/03/06 benchmark runs

@functools.cache
def _ceilings(device: str) -> Ceilings:
    return measure_ceilings(device)


def device_ceilings(device=None) -> Ceilings:
    """The two measured ceilings of this device (dense bf16 GEMM, copy), measured once per session."""
    device = torch.device(device) if device is not None else env.default_device()
    return _ceilings(str(device))


def make_weights(cfg: MoEConfig, device=None, seed: int = 0) -> ExpertWeights:
    """Random bf16 expert weights, after checking they fit (a clear message instead of an OOM)."""
    device = torch.device(device) if device is not None else env.default_device()
    check_fits(cfg, [1], device)
    return ExpertWeights.random(cfg, device=device, seed=seed)


def run_sweep(cfg: MoEConfig, tokens: Sequence[int], backends: Sequence[str] | None = None,
              skews: str | Sequence[str] = "uniform", weights: ExpertWeights | None = None, seed: int = 0,
              progress: bool = True) -> list[Row]:
    """The benchmark harness (bench.run_point) over token counts and skews, with a progress bar.

    Every backend is checked against the float32 reference before it is timed (see bench.harness).
    """
    from tqdm.auto import tqdm

    backends = list(backends) if backends is not None else default_backends()
    skews = [skews] if isinstance(skews, str) else list(skews)
    device = weights.device if weights is not None else env.default_device()
    check_fits(cfg, list(tokens), device, weight_bytes=0 if weights is not None else None)
    weights = weights if weights is not None else ExpertWeights.random(cfg, device=device, seed=seed)
    ceilings = device_ceilings(device)
    rows: list[Row] = []
    prepared: dict = {}  # INT4 weights quantised once for the sweep, not once per point
    with tqdm(total=len(tokens) * len(skews) * len(backends), desc=cfg.name, unit="row",
              disable=not progress) as bar:
        for skew in skews:
            for T in tokens:
                rows += run_point(cfg, T, weights, backends, ceilings, skew=skew, seed=seed,
                                  progress=bar.set_postfix_str, prepared_cache=prepared)
                bar.update(len(backends))
    return rows


def print_rows(rows: Sequence[Row]) -> None:
    """The CLI's table, with the CPU caveat where it applies."""
    print(format_table(list(rows)))
    if not on_gpu():
        print("(CPU correctness run: these times are not GPU performance)")


class _OpCounter:
    """Counts the aten operators a call dispatches (one GPU kernel or more each, bar view ops)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[func] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


MATMUL_OPS = ("aten.mm", "aten.bmm", "aten._grouped_mm", "aten.addmm", "aten.baddbmm")


def op_counts(name: str, cfg: MoEConfig, weights: ExpertWeights, T: int, skew: str = "uniform",
              seed: int = 0) -> dict:
    """What one forward of backend `name` dispatches: matmul ops and all non-view ops.

    Counted at PyTorch's dispatcher (the same on the CPU and on a GPU), not timed. On a GPU every
    matmul and every other non-view op launches at least one kernel (view ops only change metadata).
    A Triton kernel is one launch that the dispatcher does not see, so it is not counted here.
    """
    from .bench.harness import make_inputs
    from .routing import RoutingPlan

    backend = get_backend(name)
    x, ids, w = make_inputs(cfg, T, skew, weights.device, seed)
    plan = RoutingPlan.build(ids, w, cfg.E)
    prepared = backend.prepare(weights)
    counter = _OpCounter()
    with counter.mode:
        backend(x, prepared, plan)
    matmuls = sum(n for f, n in counter.counts.items() if str(f.overloadpacket) in MATMUL_OPS)
    compute = sum(n for f, n in counter.counts.items() if not f.is_view)
    return {"backend": name, "T": T, "active experts": plan.stats().active_experts, "matmul ops": matmuls,
            "non-view ops": compute}


def op_count_table(cfg: MoEConfig, weights: ExpertWeights, tokens: Sequence[int],
                   backends: Sequence[str] = ("naive", "grouped_mm")) -> list[dict]:
    """op_counts for each backend that can run here, at each T."""
    runnable = [b for b in backends if not get_backend(b).unavailable(cfg, weights.device)]
    return [op_counts(b, cfg, weights, T) for T in tokens for b in runnable]


def launch_estimate(cfg: MoEConfig, T: int, sm_count: int | None = None, skew: str = "uniform",
                    block_m: int = 128, block_n: int = 128, seed: int = 0) -> dict:
    """Napkin math for idle SMs: naive's per-expert GEMM launches vs one grouped launch per GEMM.

    Assumes each GEMM is cut into block_m x block_n output tiles and an SM works on one tile at a
    time, all tiles taking equal time (cuBLAS picks its own tiles; this is an estimate, not a
    measurement). A launch with `tiles` tiles runs ceil(tiles / SMs) waves; the share of SM-slots
    doing work is tiles / (waves * SMs).
    """
    sms = sm_count or device_sm_count()
    stats = routing_stats(cfg, T, skew, seed=seed)
    loads = [n for n in stats.tokens_per_expert if n]
    n_tiles = [(2 * cfg.F + block_n - 1) // block_n, (cfg.H + block_n - 1) // block_n]  # GEMM1 (2F), GEMM2 (H)
    naive_tiles = [math.ceil(n / block_m) * nt for n in loads for nt in n_tiles]
    grouped_tiles = [sum(math.ceil(n / block_m) * nt for n in loads) for nt in n_tiles]

    def busy(tiles):
        waves = sum(math.ceil(t / sms) for t in tiles)
        return 100.0 * sum(tiles) / (waves * sms)

    return {"config": cfg.name, "T": T, "active experts": len(loads),
            "mean rows per expert": T * cfg.top_k / len(loads),
            "naive GEMM launches": len(naive_tiles), "naive tiles per launch": sum(naive_tiles) / len(naive_tiles),
            "naive % SM-slots busy": busy(naive_tiles), "grouped GEMM launches": 2,
            "grouped tiles per launch": sum(grouped_tiles) / 2, "grouped % SM-slots busy": busy(grouped_tiles),
            "SMs": sms}


def profile_table(name: str, cfg: MoEConfig, weights: ExpertWeights, T: int, skew: str = "uniform",
                  row_limit: int = 15) -> tuple[str, int]:
    """torch.profiler on a GPU: the kernel table of one forward of backend `name`, and its kernel count."""
    if weights.device.type != "cuda":
        raise RuntimeError("profile_table needs a CUDA device (there is no CUDA kernel to profile on the CPU)")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from .bench.harness import make_inputs
    from .routing import RoutingPlan

    backend = get_backend(name)
    x, ids, w = make_inputs(cfg, T, skew, weights.device)
    prepared = backend.prepare(weights)
    backend(x, prepared, RoutingPlan.build(ids, w, cfg.E))  # warm-up: the first call pays one-time costs
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        backend(x, prepared, RoutingPlan.build(ids, w, cfg.E, validate=False, defer=True))
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    return prof.key_averages().table(sort_by="device_time_total", row_limit=row_limit), kernels


def plot_wasted_flops(cfg: MoEConfig, T: int, skews: Sequence[str] = SKEW_CHOICES, seed: int = 0):
    """Useful vs padding GFLOP of the padded bmm for each routing scenario (from RoutingStats)."""
    flops_per_row = 2 * cfg.params_per_expert  # one routed row through both GEMMs
    stats = [routing_stats(cfg, T, s, seed=seed) for s in skews]
    useful = [s.rows * flops_per_row / 1e9 for s in stats]
    wasted = [s.wasted_rows * flops_per_row / 1e9 for s in stats]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.bar(skews, useful, color="C2", label="useful (T*k rows)")
    ax.bar(skews, wasted, bottom=useful, color="C3", alpha=0.7, label="padding (E*max_load - T*k rows)")
    for i, s in enumerate(stats):
        ax.text(i, useful[i] + wasted[i], f"{100 * s.wasted_fraction:.0f}%", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("GFLOP per forward")
    ax.set_title(f"{cfg.name}, T={T}: what torch.bmm computes (label: share wasted on padding)")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def skew_table(cfg: MoEConfig, T: int, skews: Sequence[str] = SKEW_CHOICES, seed: int = 0) -> list[dict]:
    """RoutingStats per routing scenario, with the FLOPs a padded bmm computes and wastes."""
    flops_per_row = 2 * cfg.params_per_expert
    out = []
    for skew in skews:
        s = routing_stats(cfg, T, skew, seed=seed)
        out.append({"skew": skew, "max load": s.max_load, "mean load": s.mean_load, "imbalance": s.imbalance,
                    "empty experts": s.empty_experts, "useful GFLOP": s.rows * flops_per_row / 1e9,
                    "bmm GFLOP": s.padded_rows * flops_per_row / 1e9, "wasted %": 100 * s.wasted_fraction})
    return out


def plot_by_skew(rows: Sequence, metric: str = "median_ms", title: str | None = None):
    """Grouped bars: one group per routing scenario, one bar per backend (ok rows only)."""
    recs = [r if isinstance(r, dict) else r.as_dict() for r in rows]
    recs = [r for r in recs if r["status"] == "ok"]
    skews = list(dict.fromkeys(r["skew"] for r in recs))
    backends = list(dict.fromkeys(r["backend"] for r in recs))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(skews) + 2), 3.8))
    width = 0.8 / max(1, len(backends))
    for j, b in enumerate(backends):
        vals = [next((float(r[metric]) for r in recs if r["skew"] == s and r["backend"] == b), math.nan)
                for s in skews]
        ax.bar([i + j * width for i in range(len(skews))], vals, width, label=b, color=f"C{j}")
    ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(skews))], skews)
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def measured_results(path: Path | str | None = None) -> list[dict]:
    """Benchmark rows from a results CSV (default: the committed H100 run); [] if the file is absent."""
    p = Path(path) if path is not None else H100_RESULTS
    return read_results(p) if p.is_file() else []


def speedup_pivot(rows: Sequence, backend: str):
    """Speedup of `backend` over naive: one row per preset, one column per T (a pandas DataFrame)."""
    df = frame(rows)
    df = df[(df["backend"] == backend) & (df["status"] == "ok")]
    out = df.pivot_table(index="config", columns="T", values="speedup_vs_naive", sort=False)
    out.columns = [f"T={t}" for t in out.columns]
    return out.round(2)


def per_expert_times(rows: Sequence, config: str, backend: str = "naive") -> list[dict]:
    """Time per active expert for one preset: where it stays flat, the loop is paying per expert, not per token."""
    recs = [r if isinstance(r, dict) else r.as_dict() for r in rows]
    recs = sorted((r for r in recs if r["config"] == config and r["backend"] == backend and r["status"] == "ok"),
                  key=lambda r: r["T"])
    return [{"T": r["T"], "active experts": r["active_experts"], "GEMM launches": 2 * r["active_experts"],
             "ms": r["median_ms"], "ms per active expert": r["median_ms"] / r["active_experts"]} for r in recs]


def plot_speedup_vs_tokens(rows: Sequence, backends: Sequence[str] = ("bmm", "grouped_mm"), title: str = ""):
    """Speedup over naive vs T, one panel per backend, one line per preset; 1.0 = as fast as naive."""
    recs = [r if isinstance(r, dict) else r.as_dict() for r in rows]
    recs = [r for r in recs if r["status"] == "ok" and not math.isnan(float(r["speedup_vs_naive"]))]
    fig, axes = plt.subplots(1, len(backends), figsize=(5.5 * len(backends), 3.8), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], backends):
        for i, cfg in enumerate(dict.fromkeys(r["config"] for r in recs)):
            pts = sorted((r["T"], r["speedup_vs_naive"]) for r in recs if r["config"] == cfg and r["backend"] == b)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=cfg, color=f"C{i}")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_title(f"{b} vs naive")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("speedup over naive (higher is better)")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ 06 dashboard

def plot_memory(rows: Sequence, ax=None, title: str | None = None):
    """Per row: expert-weight GB, with the peak extra GB the forward allocated stacked on top (GPU only)."""
    recs = [r if isinstance(r, dict) else r.as_dict() for r in rows]
    recs = [r for r in recs if r["status"] == "ok"]
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['config']}\nT={r['T']}\n{r['backend']}" for r in recs]
    weights = [float(r["weight_gb"]) for r in recs]
    extra = [float(r["peak_extra_gb"]) for r in recs]
    x = range(len(recs))
    ax.bar(x, weights, color="C0", label="expert weights")
    if any(not math.isnan(e) for e in extra):
        ax.bar(x, [0.0 if math.isnan(e) else e for e in extra], bottom=weights, color="C1",
               label="peak extra during the forward")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("GB")
    ax.set_title(title or ("memory: weights + peak extra" if on_gpu()
                           else "memory: weights (peak extra is measured on a GPU only)"))
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return ax.figure


def plot_dashboard(rows: Sequence, title: str | None = None):
    """Latency, speedup over naive, TFLOP/s and memory per backend, for one benchmark run."""
    from .plots import plot_backend_bars

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    plot_backend_bars(rows, "median_ms", ax=axes[0][0], title="latency: one MoE forward (ms, median)")
    plot_backend_bars(rows, "speedup_vs_naive", ax=axes[0][1], title="speedup over naive (x)")
    axes[0][1].axhline(1.0, color="black", linestyle="--", linewidth=1)
    plot_backend_bars(rows, "tflops", ax=axes[1][0], title="useful TFLOP/s")
    plot_memory(rows, ax=axes[1][1])
    where = "" if on_gpu() else " (CPU correctness run: not GPU performance)"
    fig.suptitle((title or "all backends, same inputs") + where)
    fig.tight_layout()
    return fig


BATCHES = [1, 2, 4, 8, 16, 32, 64]
SEQS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


class Dashboard:
    """Every registered backend side by side. Nothing runs until the Run button (or `run()`).

    Controls: preset, batch, seq (T = batch * seq), skew, one checkbox per registered backend (a
    backend registered later appears by itself). Run checks the memory fit, then times every ticked
    backend with the benchmark harness, with a progress bar, and redraws the four panels.
    Defaults: dashboard_batch_seq() and dashboard_backends() (a quick first run on a GPU).
    """

    def __init__(self, preset: str | None = None, batch: int | None = None, seq: int | None = None,
                 skew: str = "uniform", backends: Sequence[str] | None = None):
        import ipywidgets as W

        cfg = pick_preset(preset, verbose=False)
        b0, s0 = dashboard_batch_seq()
        batch, seq = batch or b0, seq or s0
        chosen = set(backends) if backends is not None else set(dashboard_backends())
        self.device = env.default_device()
        self.preset = W.Dropdown(options=list(PRESETS), value=cfg.name, description="preset")
        self.batch = W.Dropdown(options=sorted(set(BATCHES) | {batch}), value=batch, description="batch")
        self.seq = W.Dropdown(options=sorted(set(SEQS) | {seq}), value=seq, description="seq")
        self.skew = W.Dropdown(options=list(dict.fromkeys([skew, *SKEW_CHOICES])), value=skew, description="skew")
        self.backend_boxes = {name: W.Checkbox(value=name in chosen, description=name, indent=False,
                                               layout=W.Layout(width="auto"))
                              for name in list_backends()}
        self.button = W.Button(description="Run", button_style="primary", icon="play",
                               tooltip="time every ticked backend on the chosen point")
        self.progress = W.IntProgress(min=0, max=1, value=0, description="progress")
        self.status = W.HTML()
        self.out = W.Output()
        self.tokens_label = W.HTML()
        for w in (self.batch, self.seq):
            w.observe(lambda _: self._update_tokens(), names="value")
        self._update_tokens()
        self.button.on_click(self._on_click)
        header = W.HTML(f"<b>{html.escape(env.device_info().summary())}</b>")
        self.widget = W.VBox([
            header,
            W.HBox([self.preset, self.skew]),
            W.HBox([self.batch, self.seq, self.tokens_label]),
            W.HBox([W.Label("backends:"), *self.backend_boxes.values()]),
            W.HBox([self.button, self.progress]),
            self.status,
            self.out,
        ])
        self.status.value = "Pick a point and press <b>Run</b>."
        self.rows: list[Row] = []
        self.runs = 0
        self.figure = None
        self._weights: tuple[str, ExpertWeights] | None = None

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def tokens(self) -> int:
        return self.batch.value * self.seq.value

    def selected_backends(self) -> list[str]:
        return [name for name, box in self.backend_boxes.items() if box.value]

    def _update_tokens(self) -> None:
        self.tokens_label.value = f"T = batch x seq = <b>{self.tokens}</b> tokens"

    def _weights_for(self, cfg: MoEConfig) -> ExpertWeights:
        if self._weights is None or self._weights[0] != cfg.name:
            self._weights = None  # free the previous preset's weights before allocating the next
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._weights = (cfg.name, ExpertWeights.random(cfg, device=self.device))
        return self._weights[1]

    def _on_click(self, _button) -> None:
        with self.out:  # in a kernel, an unexpected exception shows here as a traceback
            self.run()

    def run(self) -> list[Row]:
        """Time every ticked backend at the chosen point and redraw. Returns the rows (also in .rows)."""
        cfg = get_preset(self.preset.value)
        T, skew, names = self.tokens, self.skew.value, self.selected_backends()
        if not names:
            self.status.value = "Tick at least one backend."
            return []
        try:
            check_fits(cfg, [T], self.device)
        except InsufficientMemoryError as exc:
            self.status.value = f"<b>not run</b>: {html.escape(str(exc))}"
            return []
        self.button.disabled = True
        try:
            self.progress.max, self.progress.value = len(names), 0
            self.status.value = f"running {cfg.name}, T={T}, {skew}: preparing weights and ceilings..."
            weights = self._weights_for(cfg)
            ceilings = device_ceilings(self.device)
            started = []

            def tick(msg: str) -> None:
                self.progress.value = len(started)
                started.append(msg)
                self.status.value = f"running {html.escape(msg)} ({len(started)}/{len(names)})"

            rows = run_point(cfg, T, weights, names, ceilings, skew=skew, progress=tick)
            self.progress.value = len(names)
        finally:
            self.button.disabled = False
        self.rows = rows
        self.runs += 1
        failed = [f"{r.backend} ({r.reason})" for r in rows if r.status == "failed"]
        not_run = [f"{r.backend}: {r.status} ({r.reason})" for r in rows if r.status in ("unavailable", "skipped")]
        self.status.value = (f"run {self.runs}: {cfg.name}, T={T}, {skew}, {len(rows)} backend(s)"
                             + (f"; <b>FAILED</b>: {html.escape('; '.join(failed))}" if failed else "")
                             + (f"; not run here: {html.escape('; '.join(not_run))}" if not_run else ""))
        self._render(cfg, T, skew)
        return rows

    def _render(self, cfg: MoEConfig, T: int, skew: str) -> None:
        from IPython.display import display

        fig = plot_dashboard(self.rows, title=f"{cfg.name}, T={T}, {skew}")
        self.figure = fig
        self.out.clear_output(wait=True)
        with self.out:
            display(fig)
            print(format_table(self.rows))
        plt.close(fig)

"""One-call GPU check of the CUDA INT4 kernel (csrc/moe_int4.cu): build, correctness, decode timings.

    python scripts/gpu_cuda_int4_check.py [--all-archs] [--presets mixtral deepseek-v3 qwen3-30b-a3b]
                                          [--tokens 1 4 16] [--skip-tests] [--budget-s 225]

1. Builds the extension (for this GPU's architecture only, ~4x faster than the default four-architecture
   build, unless --all-archs is given or TORCH_CUDA_ARCH_LIST is set).
2. Runs the GPU tests: pytest -m gpu tests/test_cuda_int4.py.
3. Times one MoE decode forward at each T on each preset, for every kernel version (v1..v5, or --versions), two ways:
   `kernels` = the three launches on a prebuilt RoutingPlan (what the kernel itself costs) and `forward` =
   RoutingPlan.build + the kernels (the timed unit of moe_tut.bench). Timing is moe_tut.bench.timing's:
   CUDA-graph replay, L2 flushed before each replay, median of CUDA events. bf16 grouped_mm (torch's
   grouped GEMM on the bf16 weights) is timed beside it for scale. Each row prints the packed-weight
   bandwidth of the experts the routing touched (codes + scales (+ zeros)) against this GPU's measured
   device-copy bandwidth, and the relative error against the float32 reference on the dequantised
   weights of those experts.

Writes $OUT/cuda_int4_check.csv when OUT is set. Every row is guarded: a failure is printed and recorded,
and the run goes on. Designed to finish in under 4 minutes on an H100 (the first build is ~1 minute of it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import moe_tut
from moe_tut.backends import cuda_int4 as ci4
from moe_tut.backends import get_backend
from moe_tut.bench.ceilings import measure_ceilings
from moe_tut.bench.harness import make_inputs
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import time_cuda
from moe_tut.quant import Int4ExpertWeights, QuantizedTensor, dequantize
from moe_tut.reference import expert_ffn_fp32, relative_error
from moe_tut.routing import RoutingPlan
from moe_tut.weights import ExpertWeights

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["gpu", "preset", "T", "impl", "timed", "median_us", "p20_us", "p80_us", "active_experts",
           "touched_MB", "GBps", "pct_of_copy", "rel_err", "status", "reason"]


def say(msg: str) -> None:
    print(msg, flush=True)


def expert_slice(qt: QuantizedTensor, e: int) -> QuantizedTensor:
    _, N, K = qt.shape
    z = None if qt.zeros is None else qt.zeros[e:e + 1]
    return QuantizedTensor(qt.packed[e:e + 1], qt.scales[e:e + 1], z, qt.group_size, qt.symmetric, (1, N, K))


def reference_touched(x, q: Int4ExpertWeights, topk_ids, topk_weights) -> torch.Tensor:
    """moe_reference on the dequantised weights, dequantising only the experts the routing touched."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(topk_ids).tolist():
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        w13 = dequantize(expert_slice(q.w13, e), q.dtype)[0]
        w2 = dequantize(expert_slice(q.w2, e), q.dtype)[0]
        y.index_add_(0, tok, expert_ffn_fp32(x[tok], w13, w2) * topk_weights[tok, slot].float()[:, None])
    return y


def runner(grouped, x, w, q, plan, ids, tw, E: int, version: int | None, timed: str):
    """The call to time: grouped_mm on bf16 weights (version None), or cuda_int4 `version` on a prebuilt
    plan (timed = "kernels") or with the plan built inside (timed = "forward", like moe_tut.bench)."""
    if version is None:
        return lambda: grouped(x, w, RoutingPlan.build(ids, tw, E, validate=False))
    if timed == "kernels":
        return lambda: ci4.cuda_int4_forward(x, q, plan, version=version)
    return lambda: ci4.cuda_int4_forward(x, q, RoutingPlan.build(ids, tw, E, validate=False), version=version)


def run_tests() -> None:
    say("== GPU tests: pytest -m gpu tests/test_cuda_int4.py")
    start = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                              "tests/test_cuda_int4.py"], cwd=ROOT, capture_output=True, text=True, timeout=240)
        lines = (res.stdout + res.stderr).strip().splitlines()
        failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
        for ln in failures[:20] + lines[-3:]:
            say("   " + ln)
        say(f"   pytest exit code {res.returncode} in {time.perf_counter() - start:.0f} s")
    except subprocess.TimeoutExpired:
        say("   pytest did not finish in 240 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek-v3", "qwen3-30b-a3b"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--versions", nargs="+", type=int, default=sorted(ci4.VERSIONS))
    ap.add_argument("--all-archs", action="store_true", help="build for sm_80/86/89/90 (the default build)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--budget-s", type=float, default=225.0, help="stop timing new rows after this long")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        say("no CUDA GPU: this script is for GPU machines (tests/test_cuda_int4.py covers the CPU side)")
        return 1
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    gpu = props.name
    say(f"device: {gpu} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs), torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}, moe_tut {moe_tut.__version__}")

    # 1. build
    if not args.all_archs and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{props.major}.{props.minor}"  # inherited by the pytest run too
    say(f"== build (TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<default: 8.0 8.6 8.9 9.0>')})")
    start = time.perf_counter()
    try:
        ext = ci4.load_extension()
    except Exception as exc:
        say(f"   build failed: {exc}")
        return 1
    say(f"   built/loaded in {time.perf_counter() - start:.0f} s: {ext.__file__}")

    # 2. correctness
    if not args.skip_tests:
        run_tests()

    # 3. timings
    say("== ceilings")
    ceil = measure_ceilings(dev)
    say(f"   device copy {ceil.copy_gbps:.0f} GB/s (read + write), bf16 GEMM {ceil.gemm_tflops:.0f} TFLOP/s")
    rows: list[dict] = []
    grouped = get_backend("grouped_mm")
    for name in args.presets:
        cfg = moe_tut.get_preset(name)
        try:
            say(f"== {cfg.describe()}: making weights")
            w = ExpertWeights.random(cfg, device=dev)
            q = Int4ExpertWeights.from_bf16(w)
            say(f"   {q.describe_compression()}; {q.nbytes / 1e9:.2f} GB packed")
        except Exception as exc:
            say(f"   skipped {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            rows.append(dict(gpu=gpu, preset=name, status="failed", reason=str(exc).splitlines()[0][:200]))
            continue
        bytes_per_expert = q.nbytes / cfg.E
        for T in args.tokens:
            try:
                x, ids, tw = make_inputs(cfg, T, "uniform", dev, seed=0)
                plan = RoutingPlan.build(ids, tw, cfg.E)
                active = int(torch.unique(ids).numel())
                touched = bytes_per_expert * active
                ref = reference_touched(x, q, ids, tw)
                bf16_ok = grouped.unavailable(cfg, dev) is None
            except Exception as exc:
                say(f"   skipped {name} T={T}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                rows.append(dict(gpu=gpu, preset=name, T=T, status="failed", reason=str(exc).splitlines()[0][:200]))
                continue
            impls = [(f"cuda_int4 v{v}", v) for v in args.versions] + ([("grouped_mm bf16", None)] if bf16_ok else [])
            for impl, version in impls:
                for timed in (("kernels", "forward") if version is not None else ("forward",)):
                    row = dict(gpu=gpu, preset=name, T=T, impl=impl, timed=timed, active_experts=active,
                               touched_MB=round(touched / 1e6, 2), status="ok", reason="")
                    rows.append(row)
                    if time.perf_counter() - t0 > args.budget_s:
                        row.update(status="skipped", reason=f"time budget of {args.budget_s:.0f} s spent")
                        continue
                    try:
                        run = runner(grouped, x, w, q, plan, ids, tw, cfg.E, version, timed)
                        touched_row = w.bytes_per_expert() * active if version is None else touched
                        y = run()
                        err = relative_error(y, ref) if version is not None else float("nan")
                        tm = time_cuda(run, use_graph=True)
                        gbps = touched_row / (tm.median_ms * 1e-3) / 1e9
                        row.update(median_us=round(tm.median_ms * 1e3, 1), p20_us=round(tm.p20_ms * 1e3, 1),
                                   p80_us=round(tm.p80_ms * 1e3, 1), GBps=round(gbps), rel_err=f"{err:.2e}",
                                   pct_of_copy=round(100 * gbps / ceil.copy_gbps, 1),
                                   touched_MB=round(touched_row / 1e6, 2))
                        if version is not None and not err < 1e-2:
                            row.update(status="failed", reason=f"relative error {err:.3g} >= 1e-2")
                    except Exception as exc:  # one bad row must not end the run
                        row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    say(f"   {name:14s} T={T:<3d} {impl:16s} {timed:8s} "
                        + (f"{row['median_us']:8.1f} us {row['GBps']:6d} GB/s ({row['pct_of_copy']:5.1f}% of copy) "
                           f"touched {row['touched_MB']:8.1f} MB err {row['rel_err']}"
                           if "median_us" in row else "")
                        + ("" if row["status"] == "ok" else f" [{row['status']}: {row['reason']}]"))
        del w, q
        torch.cuda.empty_cache()
    out = os.environ.get("OUT")
    if out:
        path = write_csv(Path(out) / "cuda_int4_check.csv", rows, COLUMNS)
        say(f"wrote {path}")
    say(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

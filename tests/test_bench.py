"""Harness, memory checks, results files and the CLI end to end on the debug preset (CPU)."""

import argparse
import csv
import json
import math

import pytest
import torch

from moe_tut.bench import InsufficientMemoryError, check_fits, measure_ceilings, run_point, time_call
from moe_tut.bench.cli import main
from moe_tut.bench.results import format_table, read_results, write_csv
from moe_tut.bench.timing import L2_FLUSH_ENV, l2_flush_mode, l2_flusher
from moe_tut.presets import custom, get_preset
from moe_tut.weights import ExpertWeights


def test_cpu_timer_is_labelled():
    t = time_call(lambda: torch.ones(10).sum(), "cpu")
    assert t.method == "cpu-clock" and t.median_ms > 0 and t.p20_ms <= t.median_ms <= t.p80_ms


def test_l2_flush_mode_default_override_and_bad_values(monkeypatch):
    monkeypatch.delenv(L2_FLUSH_ENV, raising=False)
    assert l2_flush_mode() == "read"  # the default (see moe_tut/bench/timing.py for why not do_bench's write)
    monkeypatch.setenv(L2_FLUSH_ENV, "write")
    assert l2_flush_mode() == "write"
    monkeypatch.setenv(L2_FLUSH_ENV, "zero")
    with pytest.raises(ValueError, match="MOE_TUT_L2_FLUSH='zero': expected one of"):
        l2_flush_mode()
    with pytest.raises(ValueError, match="L2 flush mode 'evict'"):  # checked before any buffer is allocated
        l2_flusher("evict")


def test_cli_l2_flush_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv(L2_FLUSH_ENV, "read")  # restored after the test; the CLI flag overrides it
    assert main(["--config", "debug", "--tokens", "2", "--backends", "naive", "--out", str(tmp_path), "--no-plots",
                 "--l2-flush", "write"]) == 0
    assert json.loads((tmp_path / "moe_bench.json").read_text())["l2_flush"] == "write"
    (row,) = read_results(tmp_path / "moe_bench.csv")
    assert row["l2_flush"] == ("write" if torch.cuda.is_available() else "")  # CPU timings flush nothing
    with pytest.raises(SystemExit):
        main(["--config", "debug", "--l2-flush", "zero"])


def test_ceilings_and_roofline():
    c = measure_ceilings("cpu", gemm_size=64, copy_bytes=1 << 20)
    assert c.gemm_tflops > 0 and c.copy_gbps > 0
    # the bound is the larger of the compute time and the memory time
    assert c.roofline_ms(c.gemm_tflops * 1e12, 0) == pytest.approx(1e3)
    assert c.roofline_ms(0, c.copy_gbps * 1e9) == pytest.approx(1e3)


def test_cpu_refuses_large_presets_with_advice():
    with pytest.raises(InsufficientMemoryError, match="no CUDA GPU.*--config debug"):
        check_fits(get_preset("mixtral"), [1024], torch.device("cpu"))
    check_fits(get_preset("debug"), [1024], torch.device("cpu"))


@pytest.mark.gpu
def test_gpu_memory_check_names_need_free_and_fixes():
    free, _ = torch.cuda.mem_get_info()
    huge = custom(E=1024, H=8192, F=8192, top_k=2)  # 412 GB of bf16 weights: fits no GPU today
    with pytest.raises(InsufficientMemoryError) as exc:
        check_fits(huge, [8192], torch.device("cuda"))
    msg = str(exc.value)
    assert f"{free / 1e9:.1f} GB is free" in msg and "INT4" in msg and "smaller T" in msg


def test_run_point_rows():
    cfg = get_preset("debug")
    w = ExpertWeights.random(cfg)
    ceilings = measure_ceilings("cpu", gemm_size=64, copy_bytes=1 << 20)
    rows = run_point(cfg, 16, w, ["naive", "bmm", "grouped_mm"], ceilings, skew="zipf")
    assert [r.backend for r in rows] == ["naive", "bmm", "grouped_mm"]
    for r in rows:
        assert r.status == "ok", r.reason
        assert r.rel_err < 2e-2 and r.timing == "cpu-clock" and r.median_ms > 0
        assert r.useful_gflop == pytest.approx(cfg.useful_flops(16) / 1e9)
        assert 0 < r.roofline_pct and r.weight_gb == pytest.approx(cfg.weight_bytes() / 1e9)
    assert rows[0].speedup_vs_naive == 1.0
    assert "naive" in format_table(rows)


def test_int4_rows_quantise_once_and_check_against_the_expert_by_expert_reference(monkeypatch):
    # prepared_cache: one quantisation for every T and both INT4 backends; the tight check uses the
    # backend's `reference` (dequantises one touched expert at a time), not a dequantised copy of all
    from moe_tut import backends
    from moe_tut.quant import Int4ExpertWeights

    calls = []
    real = Int4ExpertWeights.from_bf16.__func__

    def counting(cls, *a, **kw):
        calls.append(1)
        return real(cls, *a, **kw)

    monkeypatch.setattr(Int4ExpertWeights, "from_bf16", classmethod(counting))
    monkeypatch.setattr(Int4ExpertWeights, "dequantize", lambda self, *a: pytest.fail("full dequantise"))
    cfg = custom(4, 128, 256, 2)
    w = ExpertWeights.random(cfg)
    ceilings = measure_ceilings("cpu", gemm_size=64, copy_bytes=1 << 20)
    cache = {}
    rows = []
    for T in (1, 5):
        rows += run_point(cfg, T, w, ["triton_int4", "naive"], ceilings, prepared_cache=cache)
    assert len(calls) == 1 and list(cache) == ["int4"]
    int4 = [r for r in rows if r.backend == "triton_int4"]
    assert all(r.status == "ok" and r.rel_err < 1e-2 and r.rel_err_vs_bf16 > r.rel_err for r in int4), int4
    assert backends.get_backend("cuda_int4").reference is backends.get_backend("triton_int4").reference


def test_failing_backend_is_reported_not_timed(monkeypatch):
    from moe_tut import backends

    broken = backends.Backend("broken", lambda x, w, plan: torch.zeros_like(x), "always zero",
                              extra_bytes=lambda *a: 0)
    monkeypatch.setitem(backends._REGISTRY, "broken", broken)
    cfg = get_preset("debug")
    rows = run_point(cfg, 8, ExpertWeights.random(cfg), ["broken"], measure_ceilings("cpu", 64, 1 << 20))
    assert rows[0].status == "failed" and "relative error" in rows[0].reason
    assert math.isnan(rows[0].median_ms)


def test_cli_end_to_end_debug(tmp_path, capsys):
    rc = main(["--config", "debug", "--tokens", "1", "24", "--skew", "hot", "--out", str(tmp_path),
               "--backends", "naive,bmm,grouped_mm"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "grouped_mm" in out and "ceilings on this device" in out
    on_gpu = torch.cuda.is_available()
    assert ("not GPU performance" in out) != on_gpu  # CPU runs say so; GPU runs do not
    rows = read_results(tmp_path / "moe_bench.csv")
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert {r["T"] for r in rows} == {1, 24}
    assert {r["timing"] for r in rows} <= ({"cuda-graph", "cuda-events"} if on_gpu else {"cpu-clock"})
    meta = json.loads((tmp_path / "moe_bench.json").read_text())
    assert meta["command"].startswith("python -m moe_tut.bench --config debug")
    assert meta["device"]["kind"] == ("cuda" if on_gpu else "cpu") and meta["ceilings"]["copy_gbps"] > 0
    assert {"date", "git_commit", "timing"} <= set(meta)
    assert (tmp_path / "moe_bench_debug.png").stat().st_size > 1000


def test_cli_batch_seq_and_custom_shape(tmp_path):
    assert main(["--E", "6", "--H", "64", "--F", "96", "--top-k", "2", "--batch", "2", "--seq", "5",
                 "--backends", "naive", "--out", str(tmp_path), "--no-plots"]) == 0
    with (tmp_path / "moe_bench.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert (row["config"], row["T"], row["E"], row["top_k"]) == ("custom", "10", "6", "2")


@pytest.mark.parametrize("argv,msg", [
    (["--config", "mixtrall"], "unknown preset 'mixtrall'; valid presets: mixtral"),
    (["--config", "debug", "--batch", "-2"], "--batch must be >= 1"),
    (["--config", "debug", "--tokens", "0"], "token counts must be >= 1"),
    (["--config", "debug", "--top-k", "9"], "top_k=9 is larger than the number of experts E=4"),
    (["--config", "debug", "--backends", "cutlass"], "unknown backend 'cutlass'"),
    (["--config", "debug", "--skew", "lopsided"], "unknown skew"),
    (["--config", "mixtral"], "no CUDA GPU"),
    (["--full", "--config", "debug"], "--full runs every preset"),
])
def test_cli_bad_input(argv, msg, capsys):
    if "mixtral" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present: mixtral is allowed")
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_cli_list(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "deepseek-v3" in out and "grouped_mm" in out


def test_module_entry_point(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "moe_tut.bench", "--config", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "valid presets" in proc.stderr


def test_write_csv_columns(tmp_path):
    # columns: given, or every key in first-seen order; missing values empty, keys outside the columns dropped
    path = write_csv(tmp_path / "sub" / "a.csv", [dict(a=1, b=2), dict(b=3, c=4)])
    assert path.read_text().splitlines() == ["a,b,c", "1,2,", ",3,4"]
    path = write_csv(tmp_path / "b.csv", [dict(a=1, b=2, z=9)], fieldnames=["b", "a", "c"])
    assert path.read_text().splitlines() == ["b,a,c", "2,1,"]


def test_timed_forward_hands_the_backend_a_deferred_plan():
    # The timed unit builds the plan deferred: a backend that reads no sorted tensor (cuda_int4 and the Triton
    # fast paths at T = 1) launches no sorting at all; one that reads them gets the same plan, built on demand.
    from moe_tut.bench.harness import timed_forward
    from moe_tut.routing import RoutingPlan, simulate_routing

    ids, tw = simulate_routing(1, 4, 2, seed=0)
    eager = RoutingPlan.build(ids, tw, 4)
    seen = []

    def backend(x, weights, plan):
        seen.append(plan.is_built)
        offsets = plan.expert_offsets  # reading one builds all
        seen.append(plan.is_built)
        return offsets

    offsets = timed_forward(backend, torch.zeros(1, 8), None, ids, tw, 4)()
    assert seen == [False, True] and torch.equal(offsets, eager.expert_offsets)


def test_compare_settings_alternates_and_restores_the_environment(monkeypatch):
    # The A/B scripts' loop: every point runs with its setting's variables set, the order flips on odd passes,
    # and the variables are back as they were afterwards.
    import os

    from moe_tut.bench import harness

    seen = []

    def fake_run_point(cfg, T, weights, backend_names, ceilings, seed=0, prepared_cache=None):
        seen.append((cfg.name, T, os.environ.get("MOE_TUT_AB_KNOB")))
        return [harness.Row(cfg.name, T, "uniform", b, "ok") for b in backend_names]

    monkeypatch.setattr(harness, "run_point", fake_run_point)
    monkeypatch.delenv("MOE_TUT_AB_KNOB", raising=False)
    settings = {("a", 1): {"MOE_TUT_AB_KNOB": "1"}, ("b", 2): {"MOE_TUT_AB_KNOB": "2"}}
    out = list(harness.compare_settings(["debug"], [1, 3], ["naive", "bmm"], settings, 2, None, "cpu"))
    assert seen == [("debug", 1, "1"), ("debug", 1, "2"), ("debug", 1, "2"), ("debug", 1, "1"),
                    ("debug", 3, "1"), ("debug", 3, "2"), ("debug", 3, "2"), ("debug", 3, "1")]
    assert [(T, p, label, r.backend) for _, T, p, label, r in out[:4]] == [
        (1, 0, ("a", 1), "naive"), (1, 0, ("a", 1), "bmm"), (1, 0, ("b", 2), "naive"), (1, 0, ("b", 2), "bmm")]
    assert len(out) == 16 and "MOE_TUT_AB_KNOB" not in os.environ


def test_env_ab_script_parses_settings():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_env_ab.py"
    spec = importlib.util.spec_from_file_location("gpu_env_ab", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.parse_setting("k:MOE_TUT_TRITON_CONFIG=128,128,64,8,8,4 MOE_TUT_PDL=0") == (
        "k", {"MOE_TUT_TRITON_CONFIG": "128,128,64,8,8,4", "MOE_TUT_PDL": "0"})
    assert script.parse_setting("as-is:") == ("as-is", {})
    for bad in ("no-colon", ":A=1", "k:A", "k:=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            script.parse_setting(bad)

"""moe_tut.widgets: the notebook helpers and the widgets' callbacks, driven from plain Python (no kernel,
no browser). Changing a widget's value re-runs an `interactive` callback synchronously; Button.click()
runs its handlers, so both are exercised exactly as a reader's clicks would."""

import importlib.util
import math

import ipywidgets
import matplotlib.pyplot as plt
import pytest
import torch

import moe_tut
from moe_tut import widgets as mw
from moe_tut.backends import Backend, naive

ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _controls(w) -> dict:
    return {c.description: c for c in w.children if hasattr(c, "description") and c.description}


def test_pick_preset_defaults_by_device(capsys):
    cfg = mw.pick_preset(None)
    out = capsys.readouterr().out
    assert cfg.name == ("mixtral" if ON_GPU else "debug")
    assert f"preset: {cfg.name}" in out
    if not ON_GPU:
        assert "not GPU performance" in out and "interpreter" in out
    assert mw.pick_preset("qwen3-30b-a3b", verbose=False).E == 128


def test_environment_and_fits_tables():
    env_rows = {r["what"]: r["value"] for r in mw.environment_table()}
    assert env_rows["torch"] == torch.__version__
    assert env_rows["SMs"] != "" and "shared memory per block (opt-in)" in env_rows
    fits_rows = mw.fits_table(8192)
    html = mw.table(fits_rows).to_html()  # what the notebook displays: every preset, no truncation
    assert "bf16 fits (T=8192)" in html and all(name in html for name in moe_tut.PRESETS)
    fits = {r["preset"]: r for r in fits_rows}
    assert set(fits) == set(moe_tut.PRESETS)
    assert fits["debug"]["bf16 GB"] == pytest.approx(moe_tut.get_preset("debug").weight_bytes() / 1e9, abs=1e-3)
    if not ON_GPU:
        assert fits["debug"]["bf16 fits (T=8192)"] == "yes" and fits["glm5"]["bf16 fits (T=8192)"] == "no"
        assert any(line.startswith("glm5:") for line in mw.fit_reasons(8192))
    if importlib.util.find_spec("moe_tut.quant") is None:
        assert fits["glm5"]["INT4 GB"] == "INT4 not built yet"
    else:  # sized from moe_tut.quant's own format: smaller than bf16 by more than 3x, less than 4x
        ratio = fits["glm5"]["bf16 GB"] / fits["glm5"]["INT4 GB"]
        assert 3.0 < ratio < 4.0


def test_backend_table_lists_every_registered_backend():
    names = [r["backend"] for r in mw.backend_table(moe_tut.get_preset("debug"))]
    assert names == moe_tut.list_backends()
    status = mw.cuda_extension_status()
    if "cuda_int4" not in moe_tut.list_backends():
        assert status.startswith("not built")
    elif not ON_GPU:  # the backend's own reason: it needs a CUDA GPU
        assert status.startswith("not built here:") and "CUDA" in status
    assert any("run" in line for line in mw.what_runs_here())


def test_routing_helpers_follow_the_skew():
    cfg = moe_tut.get_preset("deepseek-v3")  # routing needs no weights: any preset runs on a CPU
    table = {r["skew"]: r for r in mw.skew_table(cfg, 1024)}
    assert table["uniform"]["wasted %"] < table["zipf:2.0"]["wasted %"] < 100
    assert table["uniform"]["useful GFLOP"] == pytest.approx(table["hot"]["useful GFLOP"])
    sweep = mw.skew_sweep(cfg, 1024, [0.0, 1.0, 2.0])
    assert sweep[0]["imbalance"] < sweep[1]["imbalance"] < sweep[2]["imbalance"]
    for fig in (mw.plot_skew_scenarios(cfg, 256), mw.plot_skew_sweep([cfg], 256, [0.0, 1.0]),
                mw.plot_waste_vs_tokens([cfg], [1, 64]), mw.plot_wasted_flops(cfg, 256)):
        assert fig.axes


def test_routing_explorer_recomputes_on_every_change():
    w = mw.routing_explorer("debug", T=1024, skew="zipf")
    assert isinstance(w, ipywidgets.interactive)
    c = _controls(w)
    assert set(c) == {"preset", "T", "top-k", "skew", "zipf alpha"}
    assert (w.result.num_tokens, w.result.top_k, w.result.num_experts) == (1024, 2, 4)
    c["T"].value = 64
    assert w.result.num_tokens == 64
    c["top-k"].value = 1
    assert w.result.top_k == 1 and w.result.rows == 64
    c["preset"].value = "deepseek-v3"  # top-k follows the preset: its max is E, its value the preset's k
    assert (c["top-k"].max, c["top-k"].value) == (256, 8)
    assert (w.result.num_experts, w.result.top_k) == (256, 8)
    c["preset"].value = "debug"  # back to 4 experts: top-k 8 must not reach the routing
    assert (w.result.num_experts, w.result.top_k) == (4, 2)
    c["skew"].value = "all_to_one"
    assert c["zipf alpha"].disabled
    assert w.result.tokens_per_expert[0] == w.result.num_tokens  # every token's first choice is expert 0
    c["skew"].value = "zipf"
    assert not c["zipf alpha"].disabled
    before = w.result.imbalance
    c["zipf alpha"].value = 3.0
    assert w.result.imbalance > before


@pytest.fixture
def debug_weights():
    return moe_tut.ExpertWeights.random(moe_tut.get_preset("debug"), device=mw.env.default_device())


def test_op_counts_and_launch_estimate(debug_weights):
    cfg = moe_tut.get_preset("debug")
    table = {(r["backend"], r["T"]): r for r in mw.op_count_table(cfg, debug_weights, [1, 64], ["naive", "bmm"])}
    for T in (1, 64):
        assert table[("naive", T)]["matmul ops"] == 2 * table[("naive", T)]["active experts"]
        assert table[("bmm", T)]["matmul ops"] == 2
    est = mw.launch_estimate(moe_tut.get_preset("qwen3-30b-a3b"), 16, sm_count=132)
    assert est["naive GEMM launches"] == 2 * est["active experts"]
    assert est["naive % SM-slots busy"] < est["grouped % SM-slots busy"] <= 100
    # qwen3: 2F = 1536 -> 12 tiles of 128 for GEMM 1, H = 2048 -> 16 for GEMM 2; one row block each at T=16
    assert est["naive tiles per launch"] == 14


def test_run_sweep_and_its_plots(debug_weights):
    cfg = moe_tut.get_preset("debug")
    rows = mw.run_sweep(cfg, [1, 8], ["naive", "bmm"], skews=["uniform", "hot"], weights=debug_weights,
                        progress=False)
    assert [(r.skew, r.T, r.backend) for r in rows] == [
        (s, T, b) for s in ("uniform", "hot") for T in (1, 8) for b in ("naive", "bmm")]
    assert all(r.status == "ok" and r.rel_err < 2e-2 for r in rows)
    assert all(r.speedup_vs_naive == 1.0 for r in rows if r.backend == "naive")
    assert list(mw.rows_frame(rows).columns)[:4] == ["config", "T", "skew", "backend"]
    assert len(mw.plot_by_skew(rows).axes) == 1
    assert len(mw.plot_dashboard(rows).axes) == 4
    if not ON_GPU:
        with pytest.raises(RuntimeError, match="CUDA"):
            mw.profile_table("naive", cfg, debug_weights, 8)


def test_measured_results_tables():
    rows = mw.measured_results()
    if not mw.H100_RESULTS.is_file():
        assert rows == []
        return
    pivot = mw.speedup_pivot(rows, "bmm")
    assert "qwen3-30b-a3b" in pivot.index and "T=1" in pivot.columns
    per = mw.per_expert_times(rows, "qwen3-30b-a3b")
    assert [p["T"] for p in per] == sorted(p["T"] for p in per)
    assert all(p["GEMM launches"] == 2 * p["active experts"] for p in per)
    assert len(mw.plot_speedup_vs_tokens(rows).axes) == 2


def test_dashboard_runs_only_on_click_and_redraws():
    dash = mw.Dashboard("debug", batch=1, seq=8, backends=["naive", "bmm"])
    assert list(dash.backend_boxes) == moe_tut.list_backends()
    assert dash.selected_backends() == ["naive", "bmm"]
    dash.seq.value = 4  # moving a control does not run anything
    assert dash.runs == 0 and dash.rows == [] and "T = batch x seq = <b>4</b>" in dash.tokens_label.value
    dash.button.click()
    assert dash.runs == 1 and not dash.button.disabled
    assert [(r.T, r.backend, r.status) for r in dash.rows] == [(4, "naive", "ok"), (4, "bmm", "ok")]
    assert (dash.progress.value, dash.progress.max) == (2, 2)
    assert len(dash.figure.axes) == 4 and "T=4" in dash.figure.texts[0].get_text()
    dash.batch.value, dash.seq.value = 2, 8
    dash.backend_boxes["grouped_mm"].value = True
    dash.skew.value = "hot"
    dash.button.click()
    assert dash.runs == 2
    assert [(r.T, r.skew, r.backend) for r in dash.rows] == [(16, "hot", b) for b in ("naive", "bmm", "grouped_mm")]
    for box in dash.backend_boxes.values():
        box.value = False
    assert dash.run() == [] and "at least one backend" in dash.status.value and dash.runs == 2


@pytest.mark.skipif(ON_GPU, reason="on a GPU mixtral fits; this checks the CPU's refusal")
def test_dashboard_reports_a_preset_that_does_not_fit():
    dash = mw.Dashboard("debug", batch=1, seq=4, backends=["naive"])
    dash.preset.value = "mixtral"
    dash.button.click()
    assert dash.runs == 0 and dash.rows == []
    assert "not run" in dash.status.value and "mixtral" in dash.status.value


def test_dashboard_shows_backends_registered_later():
    registry = moe_tut.backends._REGISTRY
    name = "test_later_backend"
    moe_tut.register(Backend(name, naive.naive_forward, "the naive loop under another name (test)",
                             extra_bytes=naive.naive_extra_bytes, graph_safe=False))
    try:
        dash = mw.Dashboard("debug", batch=1, seq=4, backends=["naive"])
        assert name in dash.backend_boxes
        dash.backend_boxes[name].value = True
        rows = dash.run()
        assert [r.backend for r in rows] == ["naive", name]
        assert rows[1].status == "ok" and not math.isnan(rows[1].speedup_vs_naive)
    finally:
        registry.pop(name)

"""moe_tut.widgets and moe_tut.lessons: the notebook helpers and the widgets' callbacks, driven from plain
Python (no kernel, no browser). Changing a widget's value re-runs an `interactive` callback synchronously;
Button.click() runs its handlers, so both are exercised exactly as a reader's clicks would."""

import importlib.util
import math

import ipywidgets
import matplotlib.pyplot as plt
import pytest
import torch

import moe_tut
from moe_tut import lessons as L
from moe_tut import quant
from moe_tut import widgets as mw
from moe_tut.backends import Backend, naive
from moe_tut.kernels import grouped_gemm as gg

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


def test_dashboard_defaults_are_quick_on_a_gpu():
    """A GPU's first run: a 16-token decode step and the backends without a prefill autotuning sweep; the
    CPU keeps every default backend (its kernels run one fixed config under the interpreter)."""
    assert mw.dashboard_batch_seq() == (1, 16)
    if ON_GPU:
        assert mw.dashboard_backends() == [b for b in moe_tut.backends.default_backends()
                                           if b in mw.DASHBOARD_GPU_BACKENDS]
        assert "triton_int4" not in mw.dashboard_backends()
    else:
        assert mw.dashboard_backends() == moe_tut.backends.default_backends()
    dash = mw.Dashboard("debug")
    assert dash.tokens == 16 and dash.selected_backends() == mw.dashboard_backends()


def test_source_of_unwraps_triton_kernels_and_cuts_excerpts():
    assert mw.source_of(gg._tile_coords).lstrip().startswith("@triton.jit")
    excerpt = mw.source_of(gg._moe_gemm_kernel, start="if PERSISTENT:", lines=2).splitlines()
    assert len(excerpt) == 2 and "if PERSISTENT:" in excerpt[0] and "tl.range" in excerpt[1]
    with pytest.raises(ValueError, match="does not occur"):
        mw.source_of(gg._tile_coords, start="no such line")
    assert "def naive_forward" in mw.show_source(naive.naive_forward).data


# ------------------------------------------------------------------------- moe_tut.lessons (04 and 05)


@pytest.mark.parametrize("m, n, group_m", [
    (1, 1, 1),  # a single tile
    (5, 7, 1),  # row-major
    (5, 7, 2),  # the last group has one row block
    (9, 4, 8),  # 9 row blocks: one full group of 8 and a partial one
    (36, 17, 8),
    (3, 10, 4),  # fewer row blocks than GROUP_M
    (40, 300, 8),  # more tiles than one probe program covers (1024)
], ids=lambda v: str(v))
def test_tile_order_is_the_kernels(m, n, group_m):
    """The PyTorch mirror and the kernel's own _tile_coords (run in the probe kernel) give the same tile of
    every tile index, and the order is a permutation of the grid."""
    km, kn = L.kernel_tile_coords(m, n, group_m)
    pm, pn = L.tile_coords(torch.arange(m * n), m, n, group_m)
    assert torch.equal(km, pm) and torch.equal(kn, pn)
    order = L.launch_order(m, n, group_m)
    assert torch.equal(order.flatten().sort().values, torch.arange(m * n))
    if group_m == 1:  # row-major: tile i * n + j is (i, j)
        assert torch.equal(order, torch.arange(m * n).view(m, n))
    else:  # the first group's rows are walked column by column
        rows = min(group_m, m)
        assert torch.equal(order[:rows, 0], torch.arange(rows))
        assert order[0, 1] == rows


def test_persistent_assignment_strides_by_the_program_count():
    m, n, g, P = 6, 5, 2, 4
    prog, step = L.persistent_assignment(m, n, g, P)
    order = L.launch_order(m, n, g)
    assert torch.equal(prog, order % P) and torch.equal(step, order // P)
    counts = torch.bincount(prog.flatten(), minlength=P)
    assert counts.max() - counts.min() <= 1  # every program gets its share, give or take one tile
    assert set(step[prog == 0].tolist()) == set(range(int(counts[0])))


def test_gemm_grid_and_l2_estimate():
    cfg = moe_tut.get_preset("mixtral")
    grid = L.gemm_grid(cfg, 1024)
    bm = moe_tut.RoutingPlan.build(*moe_tut.simulate_routing(1024, cfg.E, cfg.top_k, seed=0), cfg.E).block_map(64)
    assert grid.num_pid_m == int(bm.num_blocks) and grid.num_pid_n == 2 * cfg.F // 128
    assert (grid.N, grid.K, grid.rows) == (2 * cfg.F, cfg.H, 1024 * cfg.top_k)
    assert L.persistent_programs(grid, 132) == 264  # 132 SMs x 2 programs of 64 x 128 tiles
    wave = L.programs_per_wave(grid, 132)
    row_major, grouped = L.l2_estimate(grid, 1, wave), L.l2_estimate(grid, 8, wave)
    assert row_major["tiles in first wave"] == grouped["tiles in first wave"] == wave
    # Row-major: the first wave is one expert's whole row of 224 weight tiles, and a few row blocks.
    assert row_major["weight tiles"] == grid.num_pid_n and row_major["A blocks"] == 2
    assert grouped["A blocks"] == 8 and grouped["first wave MB"] < row_major["first wave MB"] / 3
    assert grouped["each block once GB"] == row_major["each block once GB"]
    assert 1 <= grouped["re-reads"] < row_major["re-reads"]
    one_wave = L.l2_estimate(grid, 1, grid.num_tiles)  # everything at once: each block is read once
    assert one_wave["re-reads"] == pytest.approx(1.0)
    assert L.l2_estimate(grid, 8, wave, source="kernel") == grouped
    assert L.orders_agree(L.gemm_grid(moe_tut.get_preset("debug"), 256))
    table = L.l2_table([moe_tut.get_preset("debug")], [64], 132)
    assert [r["order"] for r in table] == ["row-major", "GROUP_M=8"]
    assert "MB" in L.l2_summary(grid, wave)


def test_tile_pictures_and_explorer():
    grid = L.gemm_grid(moe_tut.get_preset("debug"), 256)
    assert len(L.plot_tile_order(grid, sms=4).axes) == 4  # two panels and their colour bars
    assert len(L.plot_persistent(grid, 6).axes) == 4
    w = L.tile_order_explorer("debug", 256, 8, 132)
    c = _controls(w)
    assert set(c) == {"preset", "T", "GROUP_M", "SMs"}
    assert w.result["order"] == "GROUP_M=8"
    c["GROUP_M"].value = 1
    assert w.result["order"] == "row-major"
    c["preset"].value = "mixtral"  # T=256: one 64-row block per expert, 224 column blocks each
    assert w.result["weight tiles"] == 264  # the first 264 tiles: all of expert 0's, 40 of expert 1's


def test_version_check_records_what_each_version_fuses():
    cfg = moe_tut.custom(E=4, H=64, F=96, top_k=2)  # tiny: five forwards under the interpreter
    weights = moe_tut.ExpertWeights.random(cfg, device=mw.env.default_device())
    real = gg.grouped_gemm
    rows = {r["version"]: r for r in L.version_check(cfg, weights, 5, progress=False)}
    assert gg.grouped_gemm is real  # the spy is removed
    assert list(rows) == list(gg.VERSIONS)
    assert all(r["check"] == "ok" and r["rel err vs float32"] < 2e-2 and r["launches"] == 2 for r in rows.values())
    assert rows["v1"]["GEMM 1 fuses"] == "gather x rows into A" and rows["v1"]["GEMM 2 fuses"] == "-"
    assert rows["v1"]["left to PyTorch"] == "SwiGLU, weight + combine"
    assert "SwiGLU epilogue" in rows["fast"]["GEMM 1 fuses"]
    assert rows["fast"]["GEMM 2 fuses"] == "x routing weight, scatter to token slot"
    assert len(L.version_check_lines(list(rows.values()), cfg, 5, "zipf")) == 5
    assert [r["version"] for r in L.schedule_table()] == ["v1", "v2", "v3", "v4"]
    assert L.version_backends(moe_tut.get_preset("debug"))[:5] == L.VERSION_BACKENDS
    assert {r["used by"] for r in L.autotune_table()} == {"v4 (both GEMMs), fast path GEMM 2",
                                                          "fast path GEMM 1 (gate + up tiles)"}


def test_h100_results_in_lesson_form():
    rows = L.h100_version_rows()
    if not L.H100_VERSIONS_CSV.is_file():
        assert rows == []
        return
    assert {r["backend"] for r in rows} == set(L.H100_VERSION_NAMES.values())
    assert all(0 < r["roofline_pct"] <= 105 for r in rows)  # a bound can only be beaten by rounding
    lines = L.gain_lines(rows, ("triton_v1", "triton_v4", "triton (fast, kernel v0)"), config="mixtral")
    assert len(lines) == 5 and all(line.startswith("mixtral T=") for line in lines)
    pivot = L.metric_pivot(rows, "median_ms")
    assert ("mixtral", "triton_v1") in pivot.index and "T=8192" in pivot.columns
    assert len(L.plot_versions(rows, "mixtral").axes) == 2
    full = L.h100_full_rows()
    sp = L.int4_speedups(full)
    assert sp and all(r["speedup over bf16"] > 0 for r in sp)
    assert any("triton_int4 on mixtral" in line for line in L.crossover_lines(full))
    c = L.h100_ceilings()
    best = {r["T"]: r for r in L.roofline_ratio(moe_tut.get_preset("mixtral"), [1, 8192], c)}
    cfg = moe_tut.get_preset("mixtral")
    assert best[1]["ratio"] == pytest.approx(cfg.weight_bytes() / L.int4_bytes(cfg))  # memory-bound: bytes
    assert best[8192]["ratio"] == pytest.approx(1.0) and best[8192]["bf16 is"] == "compute-bound"
    assert len(L.plot_int4_h100(full).axes) == 2
    assert len(L.plot_int4_latency(full, "mixtral").axes) == 1


def test_read_floor_and_decode_floor_table():
    floor = L.read_floor_rows()
    assert floor, "results/h100/read_floor_v2 is committed"
    best = L.best_stream(floor)
    assert sorted(best) == [29.0, 59.0, 117.0, 182.0, 700.0]
    assert all(best[mb] <= r["median_us"] for r in floor for mb in [r["MB"]])  # the best of every kernel
    intercept, gbps = L.read_floor_fit(floor)
    assert 0 < intercept < 10 and 2500 < gbps < 3500  # a few us per launch, then ~3 TB/s
    assert all(abs(L.read_floor_us(floor, mb) - us) < 0.05 * us for mb, us in best.items())  # the line fits
    assert len(L.plot_read_floor(floor).axes) == 2
    table = L.decode_floor_table()
    assert [(r["preset"], r["GEMM"]) for r in table] == [("mixtral", 1), ("mixtral", 2), ("deepseek-v3", 1),
                                                          ("deepseek-v3", 2)]
    mixtral = moe_tut.get_preset("mixtral")
    # GEMM 1 reads twice GEMM 2's bytes: 2 experts x 2F x H codes at 0.5 B plus a bf16 scale per 128
    assert table[0]["MB read"] == pytest.approx(2 * 2 * mixtral.F * mixtral.H * (0.5 + 2 / 128) / 1e6, abs=0.1)
    assert table[0]["MB read"] == pytest.approx(2 * table[1]["MB read"], abs=0.15)  # both rounded to 0.1
    for row in table:  # every kernel variant took longer than a plain read of its bytes
        times = [v for k, v in row.items() if k.endswith("(us)") and k != "a plain read (us)"]
        assert len(times) == len(L.DECODE_DIAG_VARIANTS)
        assert all(t > row["a plain read (us)"] for t in times)
    assert L.decode_floor_table(root="/nonexistent") == []


def test_read_floor_fit_needs_two_sizes():
    with pytest.raises(ValueError, match="two sizes"):
        L.read_floor_fit([{"MB": 29.0, "kernel": "stream b1", "median_us": 14.0}])


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_worked_example_round_trips(symmetric):
    values = torch.randn(8, generator=torch.Generator().manual_seed(3))
    ex = L.worked_example(values, symmetric)
    codes, packed = ex["codes"], ex["packed"].long()
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.equal(packed, codes[0::2] | (codes[1::2] << 4))  # low nibble = even k, high = odd k
    assert torch.equal(ex["unpacked"], codes)
    deq = (codes.float() * ex["scale"] + ex["zero"]).to(torch.bfloat16).float()
    assert torch.equal(ex["dequantized"], deq)
    ulp = 2.0 ** (torch.floor(torch.log2(deq.abs().clamp(min=1e-30))) - 7)  # one bf16 step at each value
    assert (ex["error"].abs() <= ex["scale"] / 2 + ulp / 2 + 1e-7).all()
    if symmetric:  # the formula of the notebook's text: c = round(w / scale) + 8
        assert torch.equal(codes, torch.round(ex["values"] / ex["scale"]).long() + 8)
        assert ex["scale"] == pytest.approx(ex["values"].abs().max().item() / 7, rel=2 ** -8)
    else:
        assert ex["zero"] <= ex["values"].min().item()
    table, packing = L.worked_example_table(ex), L.packing_table(ex)
    assert len(table) == 8 and len(packing) == 4
    assert packing[0]["value"] == f"0x{int(ex['packed'][0]):02X}"
    assert packing[0]["low nibble"] == f"k=0: code {int(codes[0])}"
    assert "unpack(pack(codes)) == codes: True" in L.example_summary(ex)
    assert L.plot_worked_example(ex).axes


def test_worked_example_explorer():
    w = L.worked_example_explorer(0, 8, True)
    c = _controls(w)
    assert w.result["symmetric"] and w.result["group_size"] == 8
    c["symmetric"].value = False
    assert not w.result["symmetric"]
    c["group size"].value = 16
    assert len(w.result["codes"]) == 16


def test_memory_numbers_are_the_formats_own(debug_weights):
    cfg = moe_tut.get_preset("debug")
    for G in (64, 128):
        for sym in (True, False):
            assert L.int4_bytes(cfg, G, sym) == quant.Int4ExpertWeights.from_bf16(debug_weights, G, sym).nbytes
    assert L.int4_bytes(cfg) == mw.int4_weight_bytes(cfg)
    table = {r["preset"]: r for r in L.memory_table()}
    assert set(table) == set(moe_tut.PRESETS)
    glm5 = table["glm5"]
    assert glm5["sym: x smaller than bf16"] == pytest.approx(2 / (0.5 + 2 / 128))  # 3.88x: 4.125 bits
    assert glm5["sym: x smaller than fp32"] == pytest.approx(2 * glm5["sym: x smaller than bf16"])
    assert glm5["asym: x smaller than bf16"] == pytest.approx(2 / (0.5 + 4 / 128))
    assert len(L.plot_memory_bars(list(table.values())).axes) == 1


def test_group_size_sweep(debug_weights):
    cfg = moe_tut.get_preset("debug")
    rows = L.group_size_sweep(cfg, debug_weights, [32, 128], T=16, progress=False)
    err = {(r["group size"], r["mode"]): r for r in rows}
    assert set(err) == {(g, m) for g in (32, 128) for m in ("symmetric", "asymmetric")}
    for mode in ("symmetric", "asymmetric"):  # smaller groups: less error, more bits
        assert err[(32, mode)]["weight rel err"] < err[(128, mode)]["weight rel err"]
        assert err[(32, mode)]["bits per weight"] > err[(128, mode)]["bits per weight"]
    assert err[(128, "symmetric")]["bits per weight"] == pytest.approx(4 + 16 / 128)
    # moe_tut.quant's docstring: 11.7% (symmetric) and 10.0% (asymmetric) on Gaussian weights at G = 128.
    assert err[(128, "symmetric")]["weight rel err"] == pytest.approx(0.117, abs=0.01)
    assert err[(128, "asymmetric")]["weight rel err"] < err[(128, "symmetric")]["weight rel err"]
    assert all(0 < r["forward rel err vs bf16"] < 0.5 for r in rows)
    assert "G = 128, symmetric" in L.sweep_summary(rows)
    assert len(L.plot_group_size_sweep(rows).axes) == 2


def test_int4_kernel_check(debug_weights):
    cfg = moe_tut.get_preset("debug")
    lines = L.int4_kernel_check(cfg, debug_weights, 1)
    assert lines and lines[0].startswith("triton_int4:") and "(ok)" in lines[0]
    here = L.int4_backends_here(cfg)
    assert here[0] == "triton" and "triton_int4" in here and ("cuda_int4" in here) == ON_GPU


def test_int4_speedups_pair_rows_of_the_same_point():
    rows = [{"config": "c", "T": T, "backend": b, "status": "ok", "median_ms": ms}
            for T, b, ms in [(1, "triton", 2.0), (1, "triton_int4", 1.0), (8, "triton", 2.0), (8, "triton_int4", 4.0),
                             (8, "cuda_int4", 8.0), (16, "triton_int4", 1.0)]]  # T=16 has no bf16 row to pair
    sp = {(r["T"], r["backend"]): r["speedup over bf16"] for r in L.int4_speedups(rows)}
    assert sp == {(1, "triton_int4"): 2.0, (8, "triton_int4"): 0.5, (8, "cuda_int4"): 0.25}
    assert L.crossover_lines(rows) == [
        "triton_int4 on c: faster than bf16 at T = 1 (2.00x); not faster at T = 8 (0.50x)",
        "cuda_int4 on c: faster than bf16 at T = none; not faster at T = 8 (0.25x)"]

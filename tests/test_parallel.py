"""Expert parallelism (moe_tut.distributed) against the single-process forward.

CPU (CI): 2 and 4 gloo ranks, each a spawned process, on the debug preset and small custom shapes, with
uneven routing, a rank that receives no rows and a rank that holds no tokens; the bad inputs that must
raise on every rank instead of hanging; the torchrun launcher end to end. GPU (`gpu` marker, >= 2 GPUs):
2 NCCL ranks against the single-GPU forward.

Spawning a process costs seconds on a 2-core CI machine, so each world runs every scenario in one
session (a module-scoped fixture) and the tests read its results. A session that does not finish
within SESSION_TIMEOUT_S is killed and fails: a hang fails the test instead of blocking CI.
"""

import datetime
import math
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_tut.backends import get_backend
from moe_tut.bench.timing import L2_FLUSH_MODES
from moe_tut.distributed import (
    ExpertParallelError,
    ExpertParallelMoE,
    dispatch_counts,
    expert_range,
    random_expert_weights,
    shard_weights,
    token_slice,
)
from moe_tut.presets import custom, get_preset
from moe_tut.reference import moe_reference, relative_error
from moe_tut.routing import RoutingPlan, simulate_routing
from moe_tut.weights import ExpertWeights

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-5}
SESSION_TIMEOUT_S = 150  # a whole multi-rank session; far above its normal ~10 s
PG_TIMEOUT_S = 30  # any single collective
SHORT_TIMEOUT_S = 2  # the subgroup of the missing-rank scenario
GPU_SESSION_TIMEOUT_S = 160  # the GPU session compiles and autotunes Triton kernels for a few shapes

# (id, E, H, F, top_k, T, skew, backend, dtype). Each compares every rank's rows with the single-process
# forward of the same backend and with the float32 reference.
CASES_2 = [
    ("debug-uniform-grouped_mm", 4, 512, 1024, 2, 64, "uniform", "grouped_mm", torch.bfloat16),
    ("zipf-naive", 8, 64, 128, 2, 48, "zipf", "naive", torch.bfloat16),        # skewed: ranks get unequal rows
    ("hot-grouped_mm", 8, 64, 128, 2, 40, "hot", "grouped_mm", torch.bfloat16),  # expert 0 (rank 0) in most top-k
    ("all_to_one-top1", 4, 64, 96, 1, 33, "all_to_one", "naive", torch.bfloat16),  # rank 1 receives no rows
    ("T1-one-rank-empty", 4, 64, 96, 2, 1, "uniform", "grouped_mm", torch.bfloat16),  # rank 1 holds no token
    ("odd-T", 6, 40, 72, 3, 11, "zipf", "naive", torch.bfloat16),               # T not divisible by N
    ("fp32", 4, 64, 96, 2, 21, "zipf", "grouped_mm", torch.float32),            # float32: float32 rounding only
    ("triton", 4, 128, 256, 2, 12, "zipf", "triton", torch.bfloat16),           # the Triton kernel (interpreter)
    ("triton_int4", 4, 128, 256, 2, 12, "uniform", "triton_int4", torch.bfloat16),  # INT4 via Backend.prepare
]
CASES_4 = [
    ("debug-uniform", 4, 512, 1024, 2, 64, "uniform", "grouped_mm", torch.bfloat16),  # one expert per rank
    ("zipf", 8, 64, 128, 2, 50, "zipf:2.0", "naive", torch.bfloat16),
    ("hot", 8, 64, 128, 3, 30, "hot", "grouped_mm", torch.bfloat16),
    ("T3-one-rank-empty", 8, 64, 96, 2, 3, "uniform", "naive", torch.bfloat16),  # rank 3 holds no token
]


# ------------------------------------------------------------------------------------------ spawning


def _entry(fn, rank, world_size, init_file, out_dir, backend, args):
    torch.set_num_threads(1)  # N ranks share the CI machine's 2 cores
    result = {}
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        result = fn(rank, world_size, *args)
    except BaseException:
        result = {"crash": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_ranks(fn, world_size: int, tmp_path: Path, *args, backend: str = "gloo",
              timeout_s: float = SESSION_TIMEOUT_S) -> list[dict]:
    """Run fn(rank, world_size, *args) in `world_size` spawned processes; each rank's returned dict."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, str(tmp_path / "pg_init"), str(tmp_path),
                                              backend, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        pytest.fail(f"ranks {hung} of {world_size} did not finish within {timeout_s:.0f} s (a hang)")
    results = []
    for r in range(world_size):
        path = tmp_path / f"rank{r}.pt"
        assert path.exists(), f"rank {r} exited with code {procs[r].exitcode} and wrote no result"
        res = torch.load(path, weights_only=False)
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
        results.append(res)
    return results


# ------------------------------------------------------------------------------------------ rank workers


def _inputs(E, H, F, k, T, skew, dtype, seed=0):
    """The same global problem on every rank (CPU generators)."""
    cfg = custom(E, H, F, k)
    full = ExpertWeights.random(cfg, dtype=dtype, seed=seed)
    ids, tw = simulate_routing(T, E, k, skew, seed=seed)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 7)).to(dtype)
    return cfg, full, ids, tw, x


def _compare(rank, world, cfg, full, ids, tw, x, backend, device="cpu") -> dict:
    """Expert-parallel rows of this rank vs the single-process forward and the float32 reference."""
    b = get_backend(backend)
    reason = b.unavailable(cfg, torch.device(device))
    if reason:
        return {"skipped": reason}
    full = ExpertWeights(full.w13.to(device), full.w2.to(device))
    ids, tw, x = ids.to(device), tw.to(device), x.to(device)
    sl = token_slice(x.shape[0], world, rank)
    moe = ExpertParallelMoE(cfg, shard_weights(full, rank, world), backend)
    y = moe(x[sl], ids[sl], tw[sl])
    d = moe.dispatch(x[sl], ids[sl], tw[sl])
    prepared = b.prepare(full)
    single = b(x, prepared, RoutingPlan.build(ids, tw, cfg.E))[sl]
    ref = moe_reference(x, b.dequantized(prepared) if b.dequantized else full, ids, tw)[sl]
    out = {"shape": tuple(y.shape), "dtype": y.dtype, "tokens": x[sl].shape[0], "rows_received": d.recv_rows.shape[0],
           "vs_single": relative_error(y.cpu(), single.cpu()), "vs_ref": relative_error(y.cpu(), ref.cpu())}
    if b.dequantized is not None:
        out["vs_bf16_ref"] = relative_error(y.cpu(), moe_reference(x, full, ids, tw)[sl].cpu())
    return out


def _expect_error(fn) -> dict:
    start = time.monotonic()
    try:
        fn()
    except ExpertParallelError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    except Exception as exc:  # a different error type is a test failure, reported with its type
        return {"other": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - start}
    return {"no_error": True}


def _rank_owning_nothing_ids(T, E, k, world, seed=0):
    """Routing that only uses the experts of ranks 0..N-2, so the last rank receives no rows."""
    owned = expert_range(E, world, world - 1).start  # experts below this belong to other ranks
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(owned, generator=gen)[:k] for _ in range(T)])
    tw = torch.softmax(torch.randn(T, k, generator=gen), dim=1)
    return ids, tw


def _session(rank, world, cases):
    res = {}
    for case_id, E, H, F, k, T, skew, backend, dtype in cases:
        cfg, full, ids, tw, x = _inputs(E, H, F, k, T, skew, dtype)
        res[case_id] = _compare(rank, world, cfg, full, ids, tw, x, backend)
    # The last rank's experts get no rows at all (its compute runs no kernel; it still sends and combines).
    cfg, full, _, _, x = _inputs(8, 64, 96, 2, 24, "uniform", torch.bfloat16)
    ids, tw = _rank_owning_nothing_ids(24, 8, 2, world)
    res["last-rank-receives-nothing"] = _compare(rank, world, cfg, full, ids, tw, x, "grouped_mm")

    # Bad inputs: every rank must raise ExpertParallelError, quickly.
    cfg_bad = custom(world + 1, 64, 96, 2)  # E = N + 1: never divisible by N >= 2
    w_bad = ExpertWeights.random(cfg_bad)
    res["E-not-divisible"] = _expect_error(lambda: ExpertParallelMoE(cfg_bad, w_bad, "naive"))
    cfg_ok = custom(world * 2, 64, 96, 2)
    cfg_mine = cfg_ok if rank == 0 else custom(world * 2, 32, 96, 2)  # rank >= 1 disagrees on H
    w_mine = random_expert_weights(cfg_mine, expert_range(cfg_mine.E, world, rank))
    res["mismatched-config"] = _expect_error(lambda: ExpertParallelMoE(cfg_mine, w_mine, "naive"))
    moe = ExpertParallelMoE(cfg_ok, random_expert_weights(cfg_ok, expert_range(cfg_ok.E, world, rank)), "naive")
    ids, tw = simulate_routing(6, cfg_ok.E, 2, seed=rank)
    x = torch.randn(6, 64).bfloat16()
    res["wrong-dtype"] = _expect_error(lambda: moe(x.float() if rank == 1 else x, ids, tw))
    bad_ids = ids.clone()
    if rank == 0:
        bad_ids[0, 0] = cfg_ok.E
    res["ids-out-of-range"] = _expect_error(lambda: moe(x, bad_ids, tw))
    res["unknown-backend-on-one-rank"] = _expect_error(
        lambda: ExpertParallelMoE(cfg_ok, moe.weights, "naive" if rank else "cutlass"))
    # After all that, the group still works: the errors left no rank inside a collective.
    res["after-errors"] = relative_error(moe(x, ids, tw, validate=True), moe(x, ids, tw, validate=False))

    # A rank that never arrives: the others' collective fails after the group's timeout instead of hanging.
    short = dist.new_group(timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_S))
    moe_short = ExpertParallelMoE(cfg_ok, moe.weights, "naive", group=short)
    if rank == 0:
        start = time.monotonic()
        try:
            moe_short(x, ids, tw)
            res["missing-rank"] = {"no_error": True}
        except Exception as exc:
            res["missing-rank"] = {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - start}
    dist.barrier()  # the other ranks wait here, alive, while rank 0 times out
    return res


# ------------------------------------------------------------------------------------------ sessions


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_ranks(_session, 2, tmp_path_factory.mktemp("ep2"), CASES_2)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_ranks(_session, 4, tmp_path_factory.mktemp("ep4"), CASES_4)


def _check_case(results, case):
    case_id, E, H, F, k, T, skew, backend, dtype = case
    per_rank = [r[case_id] for r in results]
    if "skipped" in per_rank[0]:
        pytest.skip(per_rank[0]["skipped"])
    world = len(results)
    assert sum(r["tokens"] for r in per_rank) == T
    assert sum(r["rows_received"] for r in per_rank) == T * k  # every (token, slot) row reached one rank
    for rank, r in enumerate(per_rank):
        assert r["shape"] == (token_slice(T, world, rank).stop - token_slice(T, world, rank).start, H)
        assert r["dtype"] == dtype
        assert r["vs_single"] < TOL[dtype], (rank, r)
        assert r["vs_ref"] < TOL[dtype], (rank, r)
        if "vs_bf16_ref" in r:  # INT4: the quantisation error is reported, and is not small
            assert r["vs_bf16_ref"] > r["vs_ref"]


@pytest.mark.parametrize("case", CASES_2, ids=[c[0] for c in CASES_2])
def test_two_ranks_match_single_process(world2, case):
    _check_case(world2, case)


@pytest.mark.parametrize("case", CASES_4, ids=[c[0] for c in CASES_4])
def test_four_ranks_match_single_process(world4, case):
    _check_case(world4, case)


def test_uneven_routing_gives_uneven_ranks(world2):
    # the skewed cases really exercise uneven splits: the ranks receive different row counts
    hot = [r["hot-grouped_mm"]["rows_received"] for r in world2]
    assert hot[0] > hot[1]
    assert [r["all_to_one-top1"]["rows_received"] for r in world2] == [33, 0]
    assert [r["T1-one-rank-empty"]["tokens"] for r in world2] == [1, 0]


@pytest.mark.parametrize("fixture", ["world2", "world4"])
def test_a_rank_that_receives_nothing(fixture, request):
    results = request.getfixturevalue(fixture)
    per_rank = [r["last-rank-receives-nothing"] for r in results]
    assert per_rank[-1]["rows_received"] == 0
    for r in per_rank:
        assert r["vs_single"] < TOL[torch.bfloat16] and r["vs_ref"] < TOL[torch.bfloat16]


@pytest.mark.parametrize("fixture", ["world2", "world4"])
@pytest.mark.parametrize("scenario, message", [
    ("E-not-divisible", r"not divisible by the world size"),
    ("mismatched-config", r"rank 1 has H=32 but rank 0 has H=64"),
    ("wrong-dtype", r"rank 1: TypeError: x is torch.float32 but the expert weights are torch.bfloat16"),
    ("ids-out-of-range", r"rank 0: ValueError: topk_ids must be global expert ids"),
    ("unknown-backend-on-one-rank", r"rank 0: ValueError: unknown backend 'cutlass'"),
])
def test_bad_input_raises_on_every_rank(fixture, scenario, message, request):
    import re

    results = request.getfixturevalue(fixture)
    for rank, r in enumerate(results):
        got = r[scenario]
        assert "error" in got, f"rank {rank}: {got}"
        assert re.search(message, got["error"]), got["error"]
        assert got["seconds"] < PG_TIMEOUT_S / 2  # an answer, not a timeout
    assert len({r[scenario]["error"] for r in results}) == 1  # the same message everywhere


@pytest.mark.parametrize("fixture", ["world2", "world4"])
def test_group_still_works_after_errors(fixture, request):
    for r in request.getfixturevalue(fixture):
        assert r["after-errors"] == 0.0


def test_missing_rank_times_out_instead_of_hanging(world2):
    got = world2[0]["missing-rank"]
    assert "error" in got, got
    assert SHORT_TIMEOUT_S * 0.9 < got["seconds"] < SHORT_TIMEOUT_S + 10


# ------------------------------------------------------------------------------------------ no processes


def test_partition_helpers():
    assert expert_range(256, 8, 3) == range(96, 128)
    with pytest.raises(ValueError, match="E=6 experts are not divisible by the world size 4"):
        expert_range(6, 4, 0)
    for T, N in [(64, 2), (11, 2), (3, 4), (0, 2), (8193, 8)]:
        slices = [token_slice(T, N, r) for r in range(N)]
        sizes = [s.stop - s.start for s in slices]
        assert sum(sizes) == T and max(sizes) - min(sizes) <= 1
        assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))


def test_shards_are_slices_of_the_whole():
    cfg = custom(8, 32, 48, 2)
    whole = random_expert_weights(cfg, seed=3)
    for rank in range(4):
        part = random_expert_weights(cfg, expert_range(8, 4, rank), seed=3)
        ref = shard_weights(whole, rank, 4)
        assert torch.equal(part.w13, ref.w13) and torch.equal(part.w2, ref.w2)


def test_dispatch_counts_by_hand():
    # 4 tokens over 2 ranks (tokens 0,1 on rank 0), E = 4 (experts 0,1 on rank 0), k = 2
    ids = torch.tensor([[0, 1], [0, 2], [3, 2], [1, 3]])
    assert dispatch_counts(ids, 4, 2).tolist() == [[3, 1], [1, 3]]


def test_no_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    cfg = get_preset("debug")
    with pytest.raises(ExpertParallelError, match="init_distributed"):
        ExpertParallelMoE(cfg, ExpertWeights.random(custom(2, 512, 1024, 2)), "naive")


# ------------------------------------------------------------------------------------------ the launcher


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from moe_tut.distributed.report import LaunchChoice, run_launcher

    # gloo on CPU processes even where GPUs are (the GPU launcher runs in scripts/gpu_expert_parallel.sh)
    choice = LaunchChoice("debug", 2, "cpu", ("grouped_mm", "naive"), "CPU ranks")
    return run_launcher(choice, [40], skew="zipf", out_dir=tmp_path_factory.mktemp("launch"), reps=2,
                        timeout_s=SESSION_TIMEOUT_S)


def test_launcher_end_to_end(launched):
    rows, meta = launched.rows, launched.meta
    assert meta["world_size"] == 2 and meta["config"] == "debug" and meta["tokens"] == [40]
    assert meta["l2_flush"] in L2_FLUSH_MODES  # the mode a GPU run would use (the rows say "" on the CPU)
    assert "--expert-parallel" in meta["command"] and meta["command"].startswith("torchrun --nproc-per-node 2")
    assert (launched.out_dir / "moe_ep_bench.csv").exists() and (launched.out_dir / "moe_ep_bench.json").exists()
    for backend in ("grouped_mm", "naive"):
        mine = [r for r in rows if r["backend"] == backend]
        assert [r["scope"] for r in mine] == ["rank", "rank", "all", "single"]
        assert all(r["status"] == "ok" for r in mine), [r["reason"] for r in mine]
        ranks, layer, single = mine[:2], mine[2], mine[3]
        assert [r["tokens"] for r in ranks] == [20, 20]
        assert sum(r["rows_received"] for r in ranks) == 40 * 2 == layer["rows_received"]
        assert layer["rel_err"] < 2e-2 and single["rel_err"] < 2e-2 and layer["rel_err_vs_single"] < 2e-2
        for r in ranks + [layer]:
            assert r["dispatch_ms"] > 0 and r["compute_ms"] > 0 and r["combine_ms"] > 0 and r["total_ms"] > 0
            assert 0 < r["comm_fraction"] < 1 and r["timing"] == "cpu-clock" and r["dist_backend"] == "gloo"
            assert r["l2_flush"] == ""  # no cache flush on the CPU
        # the layer's time is its slowest rank's, repetition by repetition
        assert layer["total_ms"] >= min(r["total_ms"] for r in ranks)
        assert layer["speedup_vs_single"] == pytest.approx(single["total_ms"] / layer["total_ms"])
    assert "CPU correctness run" in launched.stdout and "rank" in launched.table()


def test_launcher_refuses_indivisible_experts(tmp_path):
    from moe_tut.distributed.report import LaunchChoice, LauncherError, run_launcher

    choice = LaunchChoice("debug", 2, "cpu", ("naive",), "test")
    start = time.monotonic()
    with pytest.raises(LauncherError, match="E=5 experts are not divisible by the world size 2"):
        run_launcher(choice, [8], out_dir=tmp_path, extra=("--E", "5"), timeout_s=SESSION_TIMEOUT_S)
    assert time.monotonic() - start < 60


def test_plots_render(launched):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_tut.distributed.report import plot_comm_compute_split, plot_dispatch_example

    fig = plot_comm_compute_split(launched.rows)
    assert len(fig.axes) == 2  # one panel per backend
    plt.close(fig)
    ids, _ = simulate_routing(12, 8, 2, "zipf")
    fig = plot_dispatch_example(ids, 8, 2)
    assert len(fig.axes) == 2
    plt.close(fig)


def test_choose_launch_without_enough_gpus():
    from moe_tut.distributed.report import choose_launch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs: the launcher would use NCCL")
    choice = choose_launch(get_preset("deepseek-v3"), 2)
    assert choice.device == "cpu" and choice.config == "debug" and "too large" in choice.note
    with pytest.raises(ValueError, match="not divisible"):
        choose_launch(custom(6, 64, 64, 2), 4)


# ------------------------------------------------------------------------------------------ GPU


GPU_CASES = [  # (id, E, H, F, top_k, T, skew, backend); few shapes, since each new one compiles and autotunes
    ("debug-uniform-triton", 4, 512, 1024, 2, 256, "uniform", "triton"),
    ("zipf-T1000-triton", 8, 256, 512, 2, 1000, "zipf", "triton"),
    ("T1-one-rank-empty-triton", 4, 512, 1024, 2, 1, "uniform", "triton"),  # decode tiles; rank 1 holds no token
    ("zipf-T1000-grouped_mm", 8, 256, 512, 2, 1000, "zipf", "grouped_mm"),
    ("debug-uniform-triton_int4", 4, 512, 1024, 2, 256, "uniform", "triton_int4"),
]


def _gpu_session(rank, world):
    res = {}
    for case_id, E, H, F, k, T, skew, backend in GPU_CASES:
        cfg, full, ids, tw, x = _inputs(E, H, F, k, T, skew, torch.bfloat16)
        res[case_id] = _compare(rank, world, cfg, full, ids, tw, x, backend, device=f"cuda:{rank}")
    cfg, full, _, _, x = _inputs(4, 512, 1024, 2, 64, "uniform", torch.bfloat16)
    ids, tw = _rank_owning_nothing_ids(64, 4, 2, world)
    res["last-rank-receives-nothing"] = _compare(rank, world, cfg, full, ids, tw, x, "triton", device=f"cuda:{rank}")
    moe = ExpertParallelMoE(cfg, shard_weights(ExpertWeights(full.w13.cuda(), full.w2.cuda()), rank, world), "triton")
    xg = x.cuda()
    res["wrong-dtype"] = _expect_error(lambda: moe(xg.float() if rank == 1 else xg, ids.cuda(), tw.cuda()))
    return res


@pytest.mark.gpu
def test_two_gpus_nccl_match_single_gpu(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    results = run_ranks(_gpu_session, 2, tmp_path, backend="nccl", timeout_s=GPU_SESSION_TIMEOUT_S)
    for key in results[0]:
        if key == "wrong-dtype":
            for r in results:
                assert "rank 1: TypeError: x is torch.float32" in r[key].get("error", str(r[key]))
            continue
        per_rank = [r[key] for r in results]
        if "skipped" in per_rank[0]:
            continue
        for rank, r in enumerate(per_rank):
            assert r["vs_single"] < 2e-2 and r["vs_ref"] < 2e-2, (key, rank, r)
            assert not math.isnan(r["vs_single"])
    assert results[1]["last-rank-receives-nothing"]["rows_received"] == 0

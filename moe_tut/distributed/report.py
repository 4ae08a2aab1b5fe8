"""Expert parallelism for notebooks and scripts: the dispatch picture, the launcher run as a subprocess,
its results read back, and the communication / compute plot.

A notebook kernel is one process, and N ranks are N processes (NCCL wants one per GPU), so the
notebook does not host the ranks: `run_launcher` starts `torchrun` (as `python -m torch.distributed.run`,
the same program) on the benchmark, waits for it with a hard timeout, and reads the CSV it wrote.
Its output is captured, never forwarded to the notebook's stderr.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from ..bench.memory import CPU_WEIGHT_LIMIT_BYTES
from ..bench.results import read_results
from ..presets import MoEConfig, get_preset
from ..routing import simulate_routing
from .bench import RESULTS_STEM, format_ep_table
from .expert_parallel import dispatch_counts, expert_range, token_slice

STAGES = (("dispatch_ms", "dispatch (all-to-all out)"), ("compute_ms", "compute (local grouped kernel)"),
          ("combine_ms", "combine (all-to-all back + weighted sum)"))
STAGE_COLORS = ("tab:orange", "tab:blue", "tab:green")


class LauncherError(RuntimeError):
    """The launcher exited with an error or ran past its timeout; the message has its stderr's tail."""


# -------------------------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class LaunchChoice:
    config: str
    world_size: int
    device: str  # "cuda" (NCCL, one GPU per rank) or "cpu" (gloo)
    backends: tuple[str, ...]
    note: str


def choose_launch(cfg: MoEConfig, world_size: int = 2, backends: tuple[str, ...] | None = None) -> LaunchChoice:
    """Where the launcher can run `cfg` on `world_size` ranks from here: NCCL when this machine has that
    many GPUs, else gloo on CPU processes (then only small shapes: the debug preset replaces a large one)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= world_size:
        config, device = cfg, "cuda"
        note = f"{world_size} of this machine's {gpus} GPUs, NCCL"
    else:
        device = "cpu"
        where = "no GPU" if gpus == 0 else f"{gpus} GPU(s), fewer than {world_size} ranks need"
        config = cfg
        note = f"{world_size} CPU processes, gloo ({where} here)"
        if cfg.weight_bytes() > CPU_WEIGHT_LIMIT_BYTES:
            config = get_preset("debug")
            note += f"; {cfg.name} is too large for CPU ranks, so the debug preset runs instead"
    expert_range(config.E, world_size, 0)  # E must be divisible by the world size: a clear error here
    if backends is None:
        backends = ("triton",) if device == "cuda" else ("grouped_mm",)
    return LaunchChoice(config.name, world_size, device, tuple(backends), note)


# -------------------------------------------------------------------------------------------- the launcher


def launcher_command(config: str, world_size: int, tokens, backends, skew: str = "uniform",
                     out_dir: str | Path = "out", reps: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """The torchrun command line of the expert-parallel benchmark (the same as `torchrun ...`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
           "-m", "moe_tut.bench", "--expert-parallel", "--config", config,
           "--tokens", *[str(t) for t in tokens], "--backends", ",".join(backends), "--skew", skew,
           "--out", str(out_dir), "--no-plots"]
    if reps is not None:
        cmd += ["--reps", str(reps)]
    return cmd + list(extra)


@dataclass
class LaunchResult:
    command: list[str]
    stdout: str
    stderr: str
    out_dir: Path
    rows: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def table(self) -> str:
        return format_ep_table(self.rows)

    def shell_command(self) -> str:
        """The command as a reader would type it (torchrun instead of python -m torch.distributed.run)."""
        args = self.command[3:]
        return "torchrun " + " ".join(args)


def read_ep_results(out_dir: str | Path) -> tuple[list[dict], dict]:
    """The launcher's CSV rows (numbers parsed) and its JSON metadata."""
    out_dir = Path(out_dir)
    rows = read_results(out_dir / f"{RESULTS_STEM}.csv")
    meta = json.loads((out_dir / f"{RESULTS_STEM}.json").read_text())
    return rows, meta


def run_launcher(choice: LaunchChoice, tokens, skew: str = "uniform", out_dir: str | Path | None = None,
                 reps: int | None = None, timeout_s: float = 600.0, extra: tuple[str, ...] = ()) -> LaunchResult:
    """Run the benchmark on `choice.world_size` ranks in a subprocess and read its results.

    The subprocess gets its own session, so on timeout the launcher and every rank it started are
    killed together. Its stdout and stderr are captured (returned), never printed here. Without
    `out_dir` the results go to a temporary folder, read and then removed.
    """
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="moe_ep_") as tmp:
            return run_launcher(choice, tokens, skew, tmp, reps, timeout_s, extra)
    out_dir = Path(out_dir)
    cmd = launcher_command(choice.config, choice.world_size, tokens, choice.backends, skew, out_dir, reps, extra)
    env = dict(os.environ)
    if choice.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the ranks then see no GPU: gloo, and Triton's interpreter
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks share the cores
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise LauncherError(f"the launcher ran past {timeout_s:.0f} s and was killed: {' '.join(cmd)}\n"
                            + _tail(stderr)) from None
    if proc.returncode != 0:
        raise LauncherError(f"the launcher exited with code {proc.returncode}: {' '.join(cmd)}\n" + _tail(stderr))
    rows, meta = read_ep_results(out_dir)
    return LaunchResult(cmd, stdout, stderr, out_dir, rows, meta)


def _tail(text: str, lines: int = 25) -> str:
    """The ranks' own `error:` lines (torchrun's report that follows them says only which rank failed),
    then the last lines of stderr."""
    all_lines = text.strip().splitlines()
    errors = list(dict.fromkeys(line for line in all_lines if line.startswith("error: ")))
    head = "\n".join(errors) + "\n" if errors else ""
    return head + "last lines of its stderr:\n" + "\n".join(all_lines[-lines:])


# -------------------------------------------------------------------------------------------- traffic


def traffic_table(cfg: MoEConfig, T: int, world_sizes=(2, 4, 8), skew: str = "uniform", seed: int = 0,
                  bytes_per_value: int = 2) -> list[dict]:
    """What the dispatch moves for a global batch of T tokens, per world size N that divides E, from a
    simulated routing (the combine moves the same rows back):

    rows per rank          T/N * k (token, slot) rows each rank sends (some to itself: a local copy)
    remote rows per rank   the ones that cross to another rank
    per-rank-dedup rows    remote rows if each token went once per destination rank, not once per slot
    remote MB per rank     remote rows * H * bytes_per_value (bf16: 2)
    """
    ids, _ = simulate_routing(T, cfg.E, cfg.top_k, skew, seed=seed)
    out = []
    for N in world_sizes:
        if cfg.E % N:
            continue
        per = cfg.E // N
        dest = ids // per  # [T, k]
        src = torch.empty(T, dtype=torch.int64)
        for r in range(N):
            src[token_slice(T, N, r)] = r
        remote = dest != src[:, None]
        # a token's distinct remote destinations: once per (token, destination rank)
        hit = torch.zeros(T, N, dtype=torch.bool)
        hit[torch.arange(T)[:, None].expand_as(dest)[remote], dest[remote]] = True
        remote_rows = remote.sum().item() / N
        out.append({"ranks": N, "experts per rank": per, "rows per rank": round(T * cfg.top_k / N),
                    "remote rows per rank": round(remote_rows), "per-rank-dedup rows": round(hit.sum().item() / N),
                    "remote MB per rank": round(remote_rows * cfg.H * bytes_per_value / 1e6, 1)})
    return out


# -------------------------------------------------------------------------------------------- plots


def plot_dispatch_example(topk_ids: torch.Tensor, num_experts: int, world_size: int, title: str | None = None):
    """Left: for every token (rows, grouped by the rank that holds it) how many of its k slots go to each
    rank. Right: the [source, destination] row counts the dispatch's first all-to-all exchanges."""
    ids = topk_ids.detach().cpu().long()
    T, k = ids.shape
    per = expert_range(num_experts, world_size, 0).stop
    dest = ids // per
    per_token = torch.stack([(dest == r).sum(1) for r in range(world_size)], dim=1)  # [T, N]
    counts = dispatch_counts(ids, num_experts, world_size)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, max(3.5, 0.22 * T + 1)),
                                   gridspec_kw={"width_ratios": [1.3, 1]})
    ax0.imshow(per_token.numpy(), cmap="Blues", vmin=0, vmax=k, aspect="auto")
    for t in range(T):
        for r in range(world_size):
            n = int(per_token[t, r])
            if n:
                ax0.text(r, t, str(n), ha="center", va="center", fontsize=7,
                         color="white" if n > k / 2 else "black")
    for r in range(1, world_size):
        ax0.axhline(token_slice(T, world_size, r).start - 0.5, color="black", linewidth=1.5)
    ax0.set_xticks(range(world_size), [f"to rank {r}" for r in range(world_size)])
    ax0.set_yticks(range(T), [f"t{t} @ r{_owner(t, T, world_size)}" for t in range(T)], fontsize=7)
    ax0.set_title(f"slots per token and destination (k = {k})")
    ax1.imshow(counts.numpy(), cmap="Oranges", vmin=0)
    for s in range(world_size):
        for d in range(world_size):
            ax1.text(d, s, str(int(counts[s, d])), ha="center", va="center", fontsize=10)
    ax1.set_xticks(range(world_size), [f"rank {r}" for r in range(world_size)])
    ax1.set_yticks(range(world_size), [f"rank {r}" for r in range(world_size)])
    ax1.set_xlabel("destination (owns experts)")
    ax1.set_ylabel("source (holds tokens)")
    ax1.set_title("rows sent: source -> destination")
    fig.suptitle(title or f"dispatch of T={T} tokens, E={num_experts} experts over {world_size} ranks "
                          f"({per} experts each)")
    fig.tight_layout()
    return fig


def _owner(t: int, T: int, world_size: int) -> int:
    return next(r for r in range(world_size) if t < token_slice(T, world_size, r).stop)


def _as_dicts(rows) -> list[dict]:
    return [r if isinstance(r, dict) else r.as_dict() for r in rows]


def plot_comm_compute_split(rows, title: str | None = None):
    """Per (T, backend): a bar per rank and one for the layer (per repetition its slowest rank), split
    into dispatch / compute / combine (the phased pass), a tick at the end-to-end median, and the
    single-device forward for comparison."""
    recs = _as_dicts(rows)
    points = list(dict.fromkeys((r["T"], r["backend"]) for r in recs if r["scope"] in ("rank", "all")))
    fig, axes = plt.subplots(len(points), 1, figsize=(9, 1.2 + 0.55 * (len(recs) / max(1, len(points)) + 1)
                                                      * len(points)), squeeze=False)
    for ax, (T, backend) in zip(axes[:, 0], points):
        group = [r for r in recs if r["T"] == T and r["backend"] == backend]
        bars = [r for r in group if r["scope"] == "rank"] + [r for r in group if r["scope"] == "all"]
        labels = [f"rank {r['rank']}" if r["scope"] == "rank" else "layer (slowest rank)" for r in bars]
        single = next((r for r in group if r["scope"] == "single"), None)
        for i, r in enumerate(bars):
            left = 0.0
            for (key, name), color in zip(STAGES, STAGE_COLORS):
                value = float(r[key]) if r["status"] == "ok" else float("nan")
                if value == value:
                    ax.barh(i, value, left=left, color=color, label=name if i == 0 else None)
                    left += value
            if r["status"] == "ok":
                ax.plot(float(r["total_ms"]), i, marker="|", markersize=18, color="black",
                        label="end to end (no barriers)" if i == 0 else None)
            else:
                ax.text(0, i, f" {r['status']}: {str(r['reason'])[:60]}", va="center", fontsize=8)
        if single is not None:
            i = len(bars)
            labels.append("1 device (all experts)")
            if single["status"] == "ok":
                ax.barh(i, float(single["total_ms"]), color="tab:gray", label="single-device forward")
            else:
                ax.text(0, i, f" {single['status']}: {str(single['reason'])[:70]}", va="center", fontsize=8)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_xlabel("ms (median)")
        world = bars[0]["world_size"] if bars else "?"
        device = bars[0]["device"] if bars else ""
        kind = " - CPU correctness run, not GPU performance" if device == "cpu" else ""
        ax.set_title(f"{bars[0]['config'] if bars else ''}, T={T} (global), {backend}, {world} ranks "
                     f"({bars[0]['dist_backend'] if bars else ''}){kind}", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig

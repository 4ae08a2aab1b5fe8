"""Static figures from benchmark rows (dicts or harness Rows). The notebooks' widgets wrap these."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt


def _records(rows) -> list[dict]:
    return [r if isinstance(r, dict) else r.as_dict() for r in rows]


def _ok(rec: dict) -> bool:
    return rec.get("status") == "ok" and not math.isnan(float(rec.get("median_ms", math.nan)))


def plot_latency_vs_tokens(rows, config: str, ax=None, title: str | None = None):
    """Latency (ms, log) vs T (log) per backend for one preset, with the roofline bound drawn."""
    recs = [r for r in _records(rows) if r["config"] == config]
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    backends = list(dict.fromkeys(r["backend"] for r in recs))
    for name in backends:
        pts = sorted((r["T"], r["median_ms"]) for r in recs if r["backend"] == name and _ok(r))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    # INT4 rows have a lower bound (fewer weight bytes); the line drawn is the bf16 one, the largest per T.
    bound_by_t: dict[int, float] = {}
    for r in recs:
        if _ok(r):
            bound_by_t[r["T"]] = max(bound_by_t.get(r["T"], 0.0), float(r["roofline_ms"]))
    if bound_by_t:
        ax.plot(*zip(*sorted(bound_by_t.items())), color="black", linestyle="--", label="roofline bound (bf16)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("one MoE forward (ms, median)")
    ax.set_title(title or f"{config}: latency vs tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return ax.figure


def plot_metric_vs_tokens(rows, config: str, metric: str, ax=None, title: str | None = None,
                          ylabel: str | None = None, logy: bool = True):
    """Any row metric (roofline_pct, tflops, weight_gbps, ...) vs T (log) per backend, for one preset."""
    recs = [r for r in _records(rows) if r["config"] == config and _ok(r)]
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["backend"] for r in recs):
        pts = sorted((r["T"], float(r[metric])) for r in recs if r["backend"] == name)
        pts = [p for p in pts if not math.isnan(p[1])]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel(ylabel or metric)
    ax.set_title(title or f"{config}: {metric} vs tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return ax.figure


def plot_backend_bars(rows, metric: str = "median_ms", ax=None, title: str | None = None):
    """One bar per (config, T, backend) for a metric (median_ms, speedup_vs_naive, tflops, weight_gb...)."""
    recs = [r for r in _records(rows) if _ok(r)]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 0.5 * len(recs) + 2), 4))
    labels = [f"{r['config']}\nT={r['T']}\n{r['backend']}" for r in recs]
    values = [float(r[metric]) for r in recs]
    ax.bar(range(len(values)), values, color=[f"C{i % 10}" for i in range(len(values))])
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.grid(True, axis="y", alpha=0.3)
    return ax.figure


def plot_tokens_per_expert(stats, ax=None, title: str | None = None):
    """Bar chart of tokens per expert with the mean and the busiest expert marked."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    counts = stats.tokens_per_expert
    ax.bar(range(len(counts)), counts, color="C0")
    ax.axhline(stats.mean_load, color="black", linestyle="--", label=f"mean {stats.mean_load:.1f}")
    ax.axhline(stats.max_load, color="C3", linestyle=":", label=f"max {stats.max_load} (bmm pads to this)")
    ax.set_xlabel("expert")
    ax.set_ylabel("tokens routed")
    ax.set_title(title or f"imbalance {stats.imbalance:.2f}x, padding waste {100 * stats.wasted_fraction:.0f}%")
    ax.legend()
    return ax.figure

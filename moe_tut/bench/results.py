"""Results: the printed table, the long-format CSV and the JSON metadata written beside it."""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import subprocess
from pathlib import Path

from ..env import DeviceInfo
from .ceilings import Ceilings
from .harness import Row
from .timing import l2_flush_mode

COLUMNS = [  # (header, Row field, format)
    ("config", "config", "{}"),
    ("T", "T", "{}"),
    ("backend", "backend", "{}"),
    ("ms", "median_ms", "{:.3f}"),
    ("vs naive", "speedup_vs_naive", "{:.2f}x"),
    ("TFLOP/s", "tflops", "{:.1f}"),
    ("weight GB/s", "weight_gbps", "{:.0f}"),
    ("% roofline", "roofline_pct", "{:.0f}%"),
    ("weights GB", "weight_gb", "{:.2f}"),
    ("peak extra GB", "peak_extra_gb", "{:.2f}"),
    ("rel err", "rel_err", "{:.1e}"),
    ("status", "status", "{}"),
]


def format_cell(value, fmt: str) -> str:
    """One table cell: `fmt` applied to the value, "-" for NaN (not measured)."""
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def render_table(columns, records: list[dict], cell=None) -> str:
    """Aligned text table of `records` (dicts with "status" and "reason") over `columns` = (header, field,
    format) triples: the first three columns left-aligned, the rest right-aligned, the last one (status) free;
    a row that is not ok shows "status: reason" there. `cell(record, field, fmt)` overrides format_cell."""
    cell = cell or (lambda rec, field, fmt: format_cell(rec[field], fmt))
    table = [[h for h, _, _ in columns]]
    for rec in records:
        cells = [cell(rec, f, fmt) for _, f, fmt in columns]
        if rec["status"] != "ok":
            cells[-1] = f"{rec['status']}: {rec['reason']}"
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(columns) - 1)]
    lines = []
    for i, row in enumerate(table):
        lines.append("  ".join(c.rjust(w) if j > 2 else c.ljust(w) for j, (c, w) in
                               enumerate(zip(row[:-1], widths))) + "  " + row[-1])
        if i == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def format_table(rows: list[Row]) -> str:
    return render_table(COLUMNS, [r.as_dict() for r in rows])


def git_commit() -> str | None:
    """MOE_TUT_GIT_COMMIT if set (a copied tree, whose .git may be missing or stale), else HEAD of the
    checkout (+dirty)."""
    if os.environ.get("MOE_TUT_GIT_COMMIT"):
        return os.environ["MOE_TUT_GIT_COMMIT"]
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return os.environ.get("MOE_TUT_GIT_COMMIT")
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("MOE_TUT_GIT_COMMIT")


def metadata(info: DeviceInfo, ceilings: Ceilings, command: str, extra: dict | None = None) -> dict:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "git_commit": git_commit(),
        "device": info.as_dict(),
        "ceilings": ceilings.as_dict(),
        "timing": ("GPU: CUDA events, median, L2 made cold before each call (l2_flush); CUDA-graph replay for "
                   "T <= 64 (graph-safe backends). CPU: perf_counter median of correctness runs, not GPU performance."),
        "l2_flush": l2_flush_mode(),
        **(extra or {}),
    }


def write_csv(path, records: list[dict], fieldnames: list[str] | None = None) -> Path:
    """records as a CSV at path (its folder created): columns `fieldnames`, else every key of the records in
    first-seen order; a missing value is written empty and keys outside the columns are left out. Returns the
    path. The GPU scripts under scripts/ write their result files with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    return path


def write_results(rows: list[Row], meta: dict, out_dir: Path, stem: str = "moe_bench") -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    csv_path = write_csv(out_dir / f"{stem}.csv", [r.as_dict() for r in rows])
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    return csv_path, json_path


def read_results(csv_path: Path) -> list[dict]:
    """The CSV back as dicts with numbers parsed (for plots and notebooks)."""
    out = []
    with Path(csv_path).open() as f:
        for rec in csv.DictReader(f):
            parsed = {}
            for k, v in rec.items():
                try:
                    parsed[k] = int(v) if v.lstrip("-").isdigit() else float(v)
                except ValueError:
                    parsed[k] = v
            out.append(parsed)
    return out

#!/usr/bin/env python3
"""Execute every tutorial notebook headless (nbclient, kernel python3) with its default parameters
(mixtral on a GPU), save the executed copies and their figures as PNGs, and pack them into one tar.

    python scripts/gpu_notebooks.py --out $OUT            # -> $OUT/notebooks_executed.tar

The committed notebooks stay output-free; the executed copies are for results/ (key figures).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tarfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("notebooks", nargs="*", help="default: notebooks/*.ipynb")
    args = p.parse_args()
    out = Path(args.out) / "notebooks_executed"
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(n) for n in args.notebooks] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    failed = 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        start = time.time()
        try:
            NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
            status = "ok"
        except Exception as exc:  # report and keep going: the other notebooks still run
            status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[-1][:300] if str(exc) else ''}"
            failed += 1
        nbformat.write(nb, out / path.name)
        figures = 0
        for ci, cell in enumerate(nb.cells):
            for oi, output in enumerate(cell.get("outputs", [])):
                png = output.get("data", {}).get("image/png")
                if png:
                    (out / f"{path.stem}_cell{ci:02d}_{oi}.png").write_bytes(base64.b64decode(png))
                    figures += 1
        print(f"{path.name}: {status} in {time.time() - start:.0f} s, {figures} figures", flush=True)
    tar_path = Path(args.out) / "notebooks_executed.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(out, arcname="notebooks_executed")
    print(f"wrote {tar_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

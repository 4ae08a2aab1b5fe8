#!/usr/bin/env python3
"""Execute every tutorial notebook headless (nbclient, kernel python3) with its default parameters
(mixtral on a GPU), save the executed copies and their figures as PNGs, and pack them into one tar.

    python scripts/gpu_notebooks.py --out $OUT            # -> $OUT/notebooks_executed.tar
    python scripts/gpu_notebooks.py --out $OUT --preset qwen3-30b-a3b notebooks/04_triton_grouped_gemm.ipynb

Figures are named <notebook>_cell<index>_<output>.png (the README links some of them). Beside them,
notebooks_run.json records each notebook's status, seconds and figure count, with the device and versions,
for results/<gpu>/notebooks/meta.json. --preset sets PRESET in a cell inserted after each notebook's
`parameters` cell (as papermill and tests/test_notebooks.py do), which shifts that notebook's figure
indices by one. The committed notebooks stay output-free;
the executed copies are for results/ (key figures).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from moe_tut.nbexec import poll_in_slices

ROOT = Path(__file__).resolve().parents[1]


def inject_preset(nb, preset: str) -> None:
    """Insert `PRESET = "<preset>"` right after the notebook's `parameters` cell (papermill's convention)."""
    index = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
    if index is None:
        raise SystemExit("a notebook has no cell tagged `parameters`, so --preset cannot be injected")
    cell = nbformat.v4.new_code_cell(f"PRESET = {preset!r}  # injected by scripts/gpu_notebooks.py")
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)


def environment() -> dict:
    """GPU and versions of this run (without importing moe_tut here: the notebooks' kernels do that)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("--preset", help="PRESET for every notebook (default: each notebook's own, mixtral on a GPU)")
    p.add_argument("notebooks", nargs="*", help="default: notebooks/*.ipynb")
    args = p.parse_args()
    out = Path(args.out) / "notebooks_executed"
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(n) for n in args.notebooks] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    failed = 0
    runs = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if args.preset:
            inject_preset(nb, args.preset)
        start = time.time()
        client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        client.on_notebook_start = lambda notebook, client=client: poll_in_slices(client.kc)
        try:
            client.execute()
            status = "ok"
        except Exception as exc:  # report and keep going: the other notebooks still run
            status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[-1][:300] if str(exc) else ''}"
            failed += 1
        seconds = time.time() - start
        nbformat.write(nb, out / path.name)
        figures = 0
        for ci, cell in enumerate(nb.cells):
            for oi, output in enumerate(cell.get("outputs", [])):
                png = output.get("data", {}).get("image/png")
                if png:
                    (out / f"{path.stem}_cell{ci:02d}_{oi}.png").write_bytes(base64.b64decode(png))
                    figures += 1
        runs.append({"notebook": path.stem, "status": status, "seconds": round(seconds, 1), "figures": figures})
        print(f"{path.name}: {status} in {seconds:.0f} s, {figures} figures", flush=True)
    (out / "notebooks_run.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv), "preset": args.preset or
         "each notebook's default", **environment(), "notebooks": runs}, indent=2) + "\n")
    tar_path = Path(args.out) / "notebooks_executed.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(out, arcname="notebooks_executed")
    print(f"wrote {tar_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

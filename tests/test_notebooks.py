"""Every tutorial notebook runs headless, top to bottom, on the debug preset, and is committed clean.

Each notebook is executed with nbclient in a fresh `python3` kernel (the one ipykernel installs), with
the notebooks folder as working directory, after a cell that sets PRESET = "debug" is inserted right
after the notebook's `parameters` cell (as papermill does). Any cell error fails the test. Committed
notebooks must have no outputs and the `python3` kernelspec, so they diff cleanly and run anywhere.

The kernel client's reply polls are cut into short slices (moe_tut.nbexec.poll_in_slices, whose docstring
has the measurement).
"""

import json
import time
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from moe_tut.nbexec import poll_in_slices

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 120  # per cell
# The debug preset keeps every notebook near or under a minute on a 2-core CPU (the slowest, 04, ~60 s). One
# far over that fails even if no cell timed out (a reply noticed only at the cell timeout passes nbclient).
NOTEBOOK_BUDGET_S = 150
INJECTED = 'PRESET = "debug"  # injected by tests/test_notebooks.py'


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    for expected in ("00_environment", "01_routing", "02_naive_loop", "03_padded_bmm", "04_triton_grouped_gemm",
                     "05_int4", "06_dashboard"):
        assert f"{expected}.ipynb" in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_clean(path):
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in nb.metadata, "saved widget state: clear outputs before committing"
    for i, cell in enumerate(_code_cells(nb)):
        assert cell.outputs == [], f"code cell {i} has outputs: clear them before committing"
        assert cell.execution_count is None, f"code cell {i} has an execution count"
    # every cell has an id in the file itself (nbformat adds missing ones on read, with a warning that says it
    # will become an error)
    raw = json.loads(Path(path).read_text())
    assert all("id" in c for c in raw["cells"]), "a cell has no id: normalise the notebook before committing"
    first = _code_cells(nb)[0]
    assert "parameters" in first.metadata.get("tags", []), "the first code cell must be tagged `parameters`"
    assert "PRESET" in first.source, "the parameters cell must define PRESET"


def _stderr(nb) -> list[str]:
    return [o.text for c in _code_cells(nb) for o in c.outputs
            if o.output_type == "stream" and o.name == "stderr"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = _read(path)
    params = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(INJECTED)
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(params + 1, injected)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.on_notebook_start = lambda notebook: poll_in_slices(client.kc)
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the failing cell and its traceback, on any error
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f} s")
    assert elapsed < NOTEBOOK_BUDGET_S, f"{path.name} took {elapsed:.0f} s (budget {NOTEBOOK_BUDGET_S} s)"
    errors = [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors
    if not torch.cuda.is_available():
        # On the CPU (what CI runs) nothing may write to stderr: warnings there also show as red cells in
        # JupyterLab, which the browser test treats as errors. (GPU profiling may print to stderr.)
        assert _stderr(nb) == []
    # The debug preset was really used (the notebook printed its choice).
    printed = "".join(o.get("text", "") for c in _code_cells(nb) for o in c.outputs
                      if o.output_type == "stream")
    assert "preset: debug" in printed

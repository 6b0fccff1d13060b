"""Every tutorial notebook executes top to bottom: on the bundled model (slow; runs in CI) and, with
small budgets, on the real offline models (marked ``real_tutorials``; not in the default run):

    python -m pytest -q -m real_tutorials tests/test_tutorials.py

Each tutorial keeps its model, dataset and token budgets in one cell tagged ``parameters`` (the
papermill convention); a run on another model inserts a cell after it that overrides them.

The tutorials are committed with their outputs, written by ``python scripts/run_tutorials.py``; a
fast test checks that every committed notebook was run top to bottom and kept its outputs small.
"""

import re
import time
from pathlib import Path

import pytest

from conftest import require_named_model

TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("*.ipynb"))
DECODER_TUTORIALS = [p for p in TUTORIALS if not p.name.startswith("05")]  # 05 is the masked-LM tutorial
REAL_BUDGETS = {"FIT_TOKENS": 4_000, "EVAL_TOKENS": 300, "TUNED_TOKENS": 2_000, "PROBE_TOKENS": 300}


def parameters_cell(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "each tutorial has exactly one cell tagged 'parameters'"
    return tagged[0]


def execute(path: Path, workdir: Path, **overrides):
    """Run the notebook at ``path`` in ``workdir``, with ``overrides`` assigned after its parameters cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # committed outputs are replaced by this run's
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    at = parameters_cell(nb)
    defined = {line.split("=")[0].strip() for line in nb.cells[at].source.splitlines() if "=" in line}
    assert {"MODEL", "DATASET"} <= defined
    assigned = {k: v for k, v in overrides.items() if k in defined}
    if assigned:
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in assigned.items())))
    start = time.perf_counter()
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    print(f"{path.name} ({overrides.get('MODEL', 'default')}): {time.perf_counter() - start:.0f} s")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, "\n".join(f"{e['ename']}: {e['evalue']}" for e in errors)
    return nb


def check_outputs(nb):
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "each tutorial shows its plots inline"
    if any("import circuitsvis" in c.source for c in nb.cells if c.cell_type == "code"):
        html = [o["data"]["text/html"] for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
        views = [h for h in html if "circuitsvis" in h.lower() or "<script" in h]
        assert views, "the circuitsvis view rendered no HTML"
        assert not any("unpkg.com" in h for h in views), "offline, circuitsvis must inline its bundled JavaScript"
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    nans = [line for line in printed.splitlines() if re.search(r"\bnan\b", line, re.IGNORECASE)]
    assert not nans, f"a tutorial printed NaN (warnings go to stderr and are allowed): {nans}"


def test_there_are_seven_tutorials():
    assert [p.name[:2] for p in TUTORIALS] == ["01", "02", "03", "04", "05", "06", "07"]


WIDGETS = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_committed_tutorials_have_outputs(path):
    """Committed as ``python scripts/run_tutorials.py`` writes them: every code cell run, in order,
    in one kernel, no errors, plots as PNG, no widget state, and small enough to read in a diff."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    fix = "run `python scripts/run_tutorials.py` and commit the notebooks"
    not_run = [i for i, c in enumerate(code) if c.execution_count is None]
    assert not not_run, f"{path.name}: code cells {not_run} have no outputs: {fix}"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{path.name} was not run top to bottom: {fix}"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{path.name} has an error output: {fix}"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no plot: {fix}"
    assert "widgets" not in nb.metadata and not any(m in o.get("data", {}) for o in outputs for m in WIDGETS), \
        f"{path.name} keeps widget state: {fix}"
    assert path.stat().st_size < 3_000_000, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB"


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path):
    check_outputs(execute(path, tmp_path))


@pytest.mark.real_tutorials
@pytest.mark.parametrize(
    "name", ["smollm2-135m", pytest.param("gemma3-270m", marks=pytest.mark.gemma)]
)
@pytest.mark.parametrize("path", DECODER_TUTORIALS, ids=[p.stem for p in DECODER_TUTORIALS])
def test_tutorial_runs_on_real_model(path, name, tmp_path):
    require_named_model(name)
    check_outputs(execute(path, tmp_path, MODEL=name, **REAL_BUDGETS))

"""Every tutorial notebook executes top to bottom: on the bundled model (slow; runs in CI) and, with
small budgets, on the real offline models (marked ``real_tutorials``; not in the default run):

    python -m pytest -q -m real_tutorials tests/test_tutorials.py

Each tutorial keeps its model, dataset and token budgets in one cell tagged ``parameters`` (the
papermill convention); a run on another model inserts a cell after it that overrides them.
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
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
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


def test_there_are_five_tutorials():
    assert [p.name[:2] for p in TUTORIALS] == ["01", "02", "03", "04", "05"]


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

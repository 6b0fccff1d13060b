"""Execute every tutorial in place, so the notebooks are committed with their outputs.

    python scripts/run_tutorials.py                      # all of tutorials/*.ipynb
    python scripts/run_tutorials.py tutorials/03_early_exit.ipynb

Each notebook runs top to bottom in a fresh kernel, in a scratch folder (what it writes, such as
``runs/``, is thrown away), offline, with tqdm progress bars off (``TQDM_DISABLE=1``) and
matplotlib's inline backend, so plots are PNG outputs. Before writing, the outputs are kept small:
no widget state or widget views, no per-cell timing metadata, and no HTML output over 200 KB (a
circuitsvis view embeds its whole JavaScript bundle, about 1.3 MB, which GitHub does not run
anyway): it is replaced by a line saying to run the cell. A notebook that raises is not
written, and the script exits with 1. It prints how long each took and its size on disk.
``tests/test_tutorials.py::test_committed_tutorials_have_outputs`` checks the result.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDGET_MIME = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")
PROGRESS = re.compile(r"\d+%\|.*\||TqdmWarning: IProgress not found|from \.autonotebook import")  # tqdm's bars and notice
DROP_MIME = (*WIDGET_MIME, "image/svg+xml", "application/pdf")  # PNG is the one image format kept
MAX_HTML = 200_000  # characters of one text/html output kept as it is


def slim(nb) -> None:
    """Drop widget state and views, extra image formats and execution timing from ``nb``, in place."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.outputs:
            data = out.get("data")
            if data is not None:
                if any(mime in data for mime in WIDGET_MIME):
                    continue  # a widget (a notebook progress bar); its text/plain is only its repr
                for mime in DROP_MIME:
                    data.pop(mime, None)
                if len(data.get("text/html", "")) > MAX_HTML:  # an interactive view (circuitsvis): too big to commit
                    data.pop("text/html")
                    data["text/plain"] = "(an interactive view, not kept in the committed notebook: run this cell to see it)"
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                out["text"] = without_progress(out["text"])
                if not out["text"].strip():
                    continue
            kept.append(out)
        cell.outputs = kept


def without_progress(text: str) -> str:
    """``text`` as a terminal would leave it (the last state of each ``\r``-rewritten line), less
    tqdm's progress lines: the library's bars take ``disable=not progress``, which ``TQDM_DISABLE``
    does not override."""
    lines = (line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    return "\n".join(line for line in lines if not PROGRESS.search(line))


def run(path: Path, timeout: int) -> float:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lensmat-tutorial-") as workdir:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": workdir}}).execute()
    seconds = time.perf_counter() - start
    slim(nb)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: tutorials/*.ipynb")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "tutorials").glob("*.ipynb"))
    # the kernel inherits this environment: offline, no progress bars, inline PNG figures
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
                      MPLBACKEND="module://matplotlib_inline.backend_inline")
    failed, total = [], 0.0
    for path in paths:
        try:
            seconds = run(path, args.timeout)
        except Exception as exc:  # nbclient's CellExecutionError names the cell and the traceback
            failed.append(path.name)
            print(f"{path.name}: FAILED\n{exc}", file=sys.stderr)
            continue
        total += seconds
        print(f"{path.name}: {seconds:.0f} s, {path.stat().st_size / 1024:.0f} KiB", flush=True)
    print(f"total: {total:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

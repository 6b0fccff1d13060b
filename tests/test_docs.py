"""The documentation stays true: every dotted ``lensmat.…`` name in README.md, docs/*.md and the
tutorials (code and markdown cells) resolves, every relative link points at a file that exists,
and the README's quickstart runs (slow; in CI).

A name resolves when the longest importable module prefix imports and ``getattr`` finds the rest
(``lensmat.analyses.swap.block_layout``: the module ``lensmat.analyses.swap``, then
``block_layout``). File paths (``lensmat/…``) and the command's words (``lensmat compare``) are not
names. A page can exempt a passage (a table of names that no longer exist, say) by wrapping it in
``<!-- names: off -->`` … ``<!-- names: on -->``.
"""

import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
NAME = re.compile(r"(?<![\w/.\-])lensmat(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
OFF = re.compile(r"<!-- names: off -->.*?<!-- names: on -->", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def texts() -> dict[str, str]:
    """Each documentation source's text, by a readable label."""
    out = {str(p.relative_to(ROOT)): OFF.sub("", p.read_text()) for p in PAGES}
    for path in TUTORIALS:
        cells = json.loads(path.read_text())["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] in ("code", "markdown"):
                out[f"{path.relative_to(ROOT)} cell {i}"] = OFF.sub("", "".join(cell["source"]))
    return out


def resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_documented_name_resolves():
    names: dict[str, set[str]] = {}
    for where, text in texts().items():
        for name in NAME.findall(text):
            names.setdefault(name, set()).add(where)
    assert len(names) > 20, "the name pattern found almost nothing: is it broken?"
    broken = {name: sorted(where) for name, where in sorted(names.items()) if not resolves(name)}
    assert not broken, "documented names that do not resolve:\n" + "\n".join(
        f"  {name}  ({', '.join(where)})" for name, where in broken.items())


def test_relative_links_point_at_files():
    missing = []
    for page in [*PAGES, ROOT / "benchmarks" / "README.md"]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve()
            if not resolved.exists():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                missing.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not missing, "broken links:\n" + "\n".join(missing)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.+?)\s*$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def quickstart() -> str:
    """The first ```python block under the README's "Quickstart" heading."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^#+\s+Quickstart\s*$(.*?)(?=^#+\s)", readme, re.M | re.S)
    assert section, 'the README has no "Quickstart" heading'
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert block, "the README's Quickstart has no ```python block"
    return block.group(1)


def test_quickstart_is_short_and_ends_in_a_picture():
    code = quickstart()
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 10
    assert ".plot(" in lines[-1]


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(quickstart(), "README.md quickstart", "exec"), {"__name__": "__quickstart__"})
        assert plt.get_fignums(), "the quickstart drew no figure"
    finally:
        plt.close("all")

"""``report.html``: one self-contained page per run folder, readable offline.

The page inlines plotly.js (the Python package's offline bundle, gzipped and base64-encoded, unpacked by
the browser), its own small script and style
(``lensmat/reports/assets/``) and the run's data (``report.json``'s fields and ``views.json``), so
it opens from disk or an e-mail attachment with no server and no network. It shows the run's
provenance, every per-layer table of :meth:`~lensmat.reports.results.Report.to_dataframe` as curves
(hover values, bootstrap intervals as error bars), a table of every value at a chosen layer, the
report's matrices as heatmaps (R², transfer), early-exit's trade-off curves, and, when the report
has views, the trajectory of a few held-out lines: tokens × layers coloured by a chosen statistic,
a cell's top-k on click, and a pinned token's rank through the layers.

:func:`write_html` writes it into a folder being published; :func:`rebuild` (``lensmat view``)
writes it again into an existing run folder.
"""

from __future__ import annotations

import functools
import json
import math
import os
from importlib import resources
from pathlib import Path

FILE = "report.html"
# what each x value indexes, by the site column of Report.to_dataframe
X_TITLES = {"post": "residual layer l", "mid": "block l (resid_mid)", "block": "block", "pruned": "blocks removed k",
            "rank": "rank k", "offset": "implant offset", "model": "model"}


@functools.lru_cache(maxsize=1)
def plotly_js() -> str:
    """The plotly.js bundle of the installed plotly package."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:  # pragma: no cover - plotly is a dependency
        raise ImportError("report.html needs plotly (pip install plotly).") from None
    return get_plotlyjs()


@functools.lru_cache(maxsize=1)
def packed_plotly_js() -> str:
    """:func:`plotly_js` gzipped (no timestamp: the same bytes every time) and base64-encoded, as the page
    inlines it (about 2.0 MB instead of 4.8 MB); the page unpacks it with the browser's
    ``DecompressionStream`` before drawing."""
    import base64
    import gzip

    return base64.b64encode(gzip.compress(plotly_js().encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")


def _asset(name: str) -> str:
    return resources.files("lensmat.reports").joinpath("assets", name).read_text(encoding="utf-8")


def _finite(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def curves(report) -> list[dict]:
    """The per-layer tables as figures: one per (site, metric), one line per lens, with x, y and the
    interval bounds (``None`` where missing); the page draws them with plotly."""
    frame = report.to_dataframe(intervals=True)
    out = []
    frame = frame[frame["metric"] != "non_finite"]  # a count of left-out positions, not a curve
    for (site, metric), rows in frame.groupby(["site", "metric"], sort=False):
        lines = []
        for lens, part in rows.groupby("lens", sort=False):
            part = part.sort_values("layer")
            lines.append({"name": str(lens), "x": [_finite(float(x)) for x in part["layer"]],
                          "y": [_finite(v) for v in part["value"]],
                          "low": [_finite(v) for v in part["ci_low"]], "high": [_finite(v) for v in part["ci_high"]]})
        out.append({"site": site, "metric": metric, "x_title": X_TITLES.get(site, site), "lines": lines})
    return out


def heatmaps(report) -> list[dict]:
    """The report's matrices: ``r2.{mat, id}`` (compare: R² of the map, or the identity, from ``h_l`` to
    ``h_l'``) and ``transfer.{lens}.{metric}`` (lens of layer i read at layer j)."""
    out = []
    for name, matrix in (report.get("r2") or {}).items():
        if isinstance(matrix, list) and matrix and isinstance(matrix[0], list):
            out.append({"title": f"R² of {name} from h_l (rows) to h_l' (columns)", "z": matrix,
                        "x_title": "target layer l'", "y_title": "source layer l"})
    for lens, matrices in (report.get("transfer") or {}).items():
        for metric, matrix in matrices.items():
            if isinstance(matrix, list):
                out.append({"title": f"transfer, {lens}: {metric} of the lens of layer i (rows) read at layer j",
                            "z": matrix, "x_title": "layer read j", "y_title": "lens of layer i"})
    return out


def trade_offs(report) -> list[dict]:
    """early-exit's curves: per lens and rule, speed-up against agreement with the full model."""
    out = []
    for lens, rules in (report.get("curves") or {}).items():
        if not isinstance(rules, dict):
            continue
        for rule, points in rules.items():
            if isinstance(points, list) and points and isinstance(points[0], dict):
                keys = [k for k, v in points[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
                out.append({"lens": lens, "rule": rule, "keys": keys,
                            "points": [{k: _finite(p.get(k)) for k in keys} for p in points]})
    return out


def _scalars(report) -> dict:
    keys = ("model", "dataset", "n_layers", "n_fit_tokens", "n_eval_tokens", "n_tokens", "n_kept", "protocol",
            "lens", "k", "kendall_tau", "p_value", "text", "statistic", "sites")
    return {k: report[k] for k in keys if k in report and not isinstance(report[k], dict)}


def page_data(report) -> dict:
    """Everything the page shows, as one JSON-able dict."""
    views = getattr(report, "views", None) or {}
    return {"command": report.command, "model": report.get("model"), "summary": _scalars(report),
            "provenance": report.get("provenance") or {}, "bootstrap": report.get("bootstrap"),
            "curves": curves(report), "heatmaps": heatmaps(report), "trade_offs": trade_offs(report),
            "paired": report.get("paired") or {}, "trajectories": views.get("trajectories")}


def _script_json(obj) -> str:
    """JSON safe inside a ``<script>`` element (no ``</`` and no HTML comment openers)."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def render(report) -> str:
    """The page of a :class:`~lensmat.reports.results.Report` (with its ``views``), as HTML text."""
    from html import escape

    title = f"lensmat {report.command}: {report.get('model', '')}".rstrip(": ")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>", f"<style>{_asset('report.css')}</style>", "</head><body>",
        f"<h1>{escape(title)}</h1>", '<main id="lensmat-report"></main>',
        f'<script type="application/json" id="lensmat-data">{_script_json(page_data(report))}</script>',
        f'<script type="application/octet-stream" id="plotly-gz">{packed_plotly_js()}</script>',
        f"<script>{_asset('report.js')}</script>", "</body></html>", ""])


def write_html(report, folder: str | os.PathLike) -> Path:
    """Write ``folder/report.html`` (atomically: a temporary file, then rename); returns its path."""
    folder = Path(folder)
    tmp = folder / f".{FILE}.tmp"
    tmp.write_text(render(report), encoding="utf-8")
    os.replace(tmp, folder / FILE)
    return folder / FILE


def rebuild(run_dir: str | os.PathLike) -> Path:
    """(Re)write ``run_dir/report.html`` from the folder's ``report.json`` and ``views.json`` (``lensmat
    view``); the folder's manifest then lists it, so lensmat still owns the folder. Returns its path."""
    from lensmat.outputs import claim, refresh_manifest
    from lensmat.reports.results import load_report

    report = load_report(run_dir)
    folder = Path(run_dir).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    with claim(folder, force=True):
        path = write_html(report, folder)
        refresh_manifest(folder)
    return path

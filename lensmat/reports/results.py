"""Reports as objects: a report dict that knows its command, turns into a tidy table and draws its figures.

:class:`Report` is a ``dict`` (every ``report["lenses"]`` keeps working) with :meth:`~Report.to_dataframe`,
:meth:`~Report.plot`, :meth:`~Report.save` and a notebook view; :func:`load_report` reads a run folder's
``report.json`` (this or an older lensmat) back into one. The fields are docs/reports.md's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lensmat import plots
from lensmat.outputs import publish
from lensmat.reports.writing import strict, write_report

# command: what plots it (the CLI's figures; a trajectory's heatmap needs the Trajectory itself)
PLOTS = {"compare": plots.compare_plots, "submodules": plots.submodule_plots, "linearity": plots.linearity_plots,
         "linearity-models": plots.linearity_models_plot, "saturation": plots.saturation_plots,
         "early-exit": plots.early_exit_plots, "trajectory": plots.trajectory_summary_plots,
         "transfer": plots.transfer_plots, "attribution": plots.attribution_plots,
         "intervene": plots.intervene_plots}
COMMANDS = tuple(PLOTS)
# the keys that tell an older report's command (checked in this order)
_SIGNATURES = (("intervene", "intervention"), ("attribution", "largest"), ("transfer", "transfer"), ("early-exit", "curves"), ("submodules", "variants"),
               ("linearity-models", "models"),
               ("linearity", "pruning"), ("saturation", "mean_layer"), ("trajectory", "statistic"),
               ("compare", "r2"))
COLUMNS = ["lens", "site", "layer", "metric", "value"]
INTERVAL_COLUMNS = ["ci_low", "ci_high"]
_LINEARITY = ("linearity", "linearity_no_residual", "heldout_linearity", "heldout_linearity_no_residual",
              "norm_ratio", "cosine")


def infer_command(report: dict) -> str | None:
    """The command that wrote ``report``: its ``command`` field, else the first of :data:`_SIGNATURES`
    whose key it holds; None if neither."""
    if "command" in report:
        return report["command"]
    return next((command for command, key in _SIGNATURES if key in report), None)


class Report(dict):
    """One analysis's report (docs/reports.md): a dict, with its ``command`` (one of :data:`COMMANDS`,
    also the ``"command"`` field) and the views below.

    ``None`` (JSON null) means not measured or undefined (a layer no position was scored at, a test
    with too few tokens); NaN never appears in a Report: NaN/Inf values given to it become ``None``
    and are listed in ``non_finite_values``, as in ``report.json``.
    """

    def __init__(self, report: dict, command: str | None = None, views: dict | None = None) -> None:
        report = dict(report)
        #: data for report.html only (e.g. ``trajectories``, :mod:`lensmat.analyses.trajectory_view`), written to
        #: ``views.json`` beside ``report.json``, not into it
        self.views = {**(report.pop("views", None) or {}), **(views or {})}
        command = command or infer_command(report)
        if command not in COMMANDS:
            raise ValueError(f"Cannot tell which lensmat command wrote this report (command {command!r}, keys "
                             f"{', '.join(list(report)[:8])}); pass command= one of {', '.join(COMMANDS)}.")
        super().__init__({**strict(report), "command": command})

    @property
    def command(self) -> str:
        return self["command"]

    def to_dataframe(self, intervals: bool = False):
        """A tidy pandas DataFrame of the report's per-layer tables, one row per ``lens, site, layer,
        metric``, with its ``value`` (nats for surprisal, KL and CE; NaN where the report has null).

        ``lens``: the lens, swap variant or kind, model (``linearity-models``), or ``"model"`` for a
        measure of the model itself. ``site`` says what ``layer`` indexes: ``post`` the residual layer
        ``0..L`` (for ``submodules`` variants: the first swapped block's input), ``mid`` block ``l``'s
        ``resid_mid``, ``block`` block ``0..L-1``, ``pruned`` the number ``k`` of blocks removed,
        ``rank`` saturation's rank ``k``, ``offset`` the implant's offset, ``model`` the model's index.
        Left out (read them from the dict): ``r2`` matrices, scalars, early-exit's λ and threshold
        curves, ``settles_at_layer``. ``intervals``: also ``ci_low`` and ``ci_high``, the value's
        bootstrap interval where the report has one (NaN elsewhere).
        """
        import pandas as pd

        rows: list[tuple] = []
        _TABLES[self.command](self, rows)
        columns = COLUMNS + INTERVAL_COLUMNS
        frame = pd.DataFrame(rows, columns=columns).astype({c: float for c in ["value", *INTERVAL_COLUMNS]})
        return frame if intervals else frame[COLUMNS]

    def plot(self, out: str | os.PathLike | None = None) -> list:
        """The figures of the CLI's report (:mod:`lensmat.plots`; for ``trajectory`` the per-layer means
        of its ``statistic``), as a list; ``out``: a folder to save their PNGs in (then closed)."""
        return PLOTS[self.command](self, out)

    def write(self, folder: Path, figures=None) -> None:
        """``report.json`` (with its ``provenance``), ``views.json`` (when the report has views), the figures
        and ``report.html`` (:mod:`lensmat.reports.html`) into an open output folder (:func:`lensmat.outputs.publish`).
        ``figures(folder)`` draws the figures instead of :meth:`plot` (a trajectory draws its heatmap)."""
        from lensmat.reports import html

        self.setdefault("provenance", provenance())
        write_report(self, folder)
        if self.views:
            write_views(self.views, folder)
        (figures or (lambda out: self.plot(out=out)))(folder)
        html.write_html(self, folder)

    def save(self, out: str | os.PathLike, force: bool = False) -> Path:
        """Write the report folder ``out`` (``report.json`` and the figures), refused if ``out`` exists
        unless ``force`` and lensmat wrote it (:func:`lensmat.outputs.publish`). Returns ``out``."""
        with publish(out, force) as folder:
            self.write(folder)
        return Path(out)

    def show(self, height: int = 820):
        """The run's ``report.html`` page (:mod:`lensmat.reports.html`), inline in Jupyter: an IPython
        ``HTML`` object holding the whole page in an iframe (about 2–3 MB; offline)."""
        from html import escape

        from IPython.display import HTML

        from lensmat.reports.html import render

        return HTML(f'<iframe srcdoc="{escape(render(self), quote=True)}" title="lensmat {self.command} report" '
                    f'style="width:100%;height:{int(height)}px;border:1px solid #d7dce3"></iframe>')

    def _repr_html_(self) -> str:
        title = f"lensmat {self.command}: {plots.model_label(self.get('model', ''))}".rstrip(": ")
        frame = self.to_dataframe()
        table = frame.pivot(index=["site", "lens", "metric"], columns="layer", values="value")
        return plots.html_table(table, title)


def provenance() -> dict:
    """Where a report came from: the lensmat, torch, transformers, TransformerLens and Python versions,
    the time it was written (UTC, ISO 8601) and the command line (``lensmat …`` when the CLI ran it,
    else the Python program's ``sys.argv``)."""
    import datetime
    import platform
    import shlex
    import sys
    from importlib import metadata

    from lensmat._version import __version__

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    from lensmat.outputs import COMMAND_LINE

    argv = COMMAND_LINE or sys.argv
    return {"lensmat_version": __version__, "torch_version": version("torch"),
            "transformers_version": version("transformers"), "transformer_lens_version": version("transformer-lens"),
            "python_version": platform.python_version(),
            "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command_line": shlex.join(argv)}


VIEWS = "views.json"


def write_views(views: dict, folder: str | os.PathLike) -> Path:
    """``folder/views.json``: a report's views (compact strict JSON; NaN as null)."""
    path = Path(folder) / VIEWS
    path.write_text(json.dumps(strict(views), separators=(",", ":"), allow_nan=False, ensure_ascii=False))
    return path


def load_report(run_dir: str | os.PathLike, command: str | None = None) -> Report:
    """The :class:`Report` in ``run_dir/report.json`` (or the file itself), written by this or an older
    lensmat; ``command`` names it when its keys do not (:func:`infer_command`)."""
    path = Path(run_dir).expanduser()
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"No report at {path}: pass the folder a lensmat command wrote with --out (or out=), "
                                "which holds report.json.")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a JSON report ({err}): it was cut short or edited; run the command again "
                         "with --out to rewrite it.") from None
    if not isinstance(report, dict):
        raise ValueError(f"{path} holds a JSON {type(report).__name__}, not a report object; pass a lensmat "
                         "report.json.")
    views_file = path.parent / VIEWS
    try:
        views = json.loads(views_file.read_text(encoding="utf-8")) if views_file.is_file() else None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{views_file} is not JSON ({err}): it was cut short or edited; run the command again "
                         "with --out to rewrite it, or delete it (report.html then has no trajectory view).") from None
    return Report(report, command, views if isinstance(views, dict) else None)


def _bound(scores: dict, bound: str, metric: str, i: int | None = None):
    """The ``ci_low`` / ``ci_high`` value of ``metric`` beside ``scores`` (at index ``i`` of a list), or None."""
    value = (scores.get(bound) or {}).get(metric) if isinstance(scores.get(bound), dict) else None
    if i is not None:
        value = value[i] if isinstance(value, list) and i < len(value) else None
    return value if isinstance(value, (int, float)) else None


def _lists(rows: list, lens: str, site: str, scores: dict, keys=None) -> None:
    """A row per layer of every list of numbers in ``scores`` (of ``keys`` when given), with its interval."""
    for metric in scores if keys is None else keys:
        values = scores.get(metric)
        if isinstance(values, list) and all(v is None or isinstance(v, (int, float)) for v in values):
            rows.extend((lens, site, layer, metric, v, _bound(scores, "ci_low", metric, layer),
                         _bound(scores, "ci_high", metric, layer)) for layer, v in enumerate(values))


def _records(rows: list, lens: str, site: str, records: list[dict], x: str) -> None:
    """A row per record and numeric field of ``records``, at the record's ``x``, with its interval."""
    for r in records:
        rows.extend((lens, site, r[x], metric, v, _bound(r, "ci_low", metric), _bound(r, "ci_high", metric))
                    for metric, v in r.items() if metric != x and (v is None or isinstance(v, (int, float))))


def _compare(report: dict, rows: list) -> None:
    for name, scores in report["lenses"].items():
        _lists(rows, name, "post", scores)
    for name, scores in report.get("mid", {}).get("lenses", {}).items():
        _lists(rows, name, "mid", scores)


def _submodules(report: dict, rows: list) -> None:
    for name, scores in report["variants"].items():
        _lists(rows, name, "post", scores)
    for name, scores in report["single_block"].items():
        _lists(rows, name, "block", scores)


def _linearity(report: dict, rows: list) -> None:
    _lists(rows, "model", "block", report, _LINEARITY)
    _lists(rows, "model", "post", report, ("anisotropy", "intrinsic_dimension"))
    for variant, records in report["pruning"].items():
        _records(rows, variant, "pruned", records, "k")


def _linearity_models(report: dict, rows: list) -> None:
    for i, r in enumerate(report["models"]):
        _records(rows, r["model"], "model", [{**r, "index": i}], "index")


def _saturation(report: dict, rows: list) -> None:
    _lists(rows, "model", "post", report, ("probe_accuracy", "probe_control"))
    for metric in ("mean_layer", "mean_rank"):
        rows.extend((report["lens"], "rank", k, metric, v, _bound(report, "ci_low", metric, k - 1),
                     _bound(report, "ci_high", metric, k - 1)) for k, v in enumerate(report[metric], start=1))
    _records(rows, report["lens"], "offset", report.get("intervention_sweep") or [], "offset")


def _early_exit(report: dict, rows: list) -> None:
    for lens, records in report.get("fixed_exit", {}).items():
        _records(rows, lens, "post", records, "layer")


def _trajectory(report: dict, rows: list) -> None:
    for lens, summary in report["summary"].items():
        _lists(rows, lens, "post", summary, [k for k in summary if k.startswith("mean_")])


def _transfer(report: dict, rows: list) -> None:
    """Lens ``{lens}@{i}`` (the translator of layer ``i``) read at each layer ``j``."""
    for lens, matrices in report["transfer"].items():
        for metric, matrix in matrices.items():
            if not isinstance(matrix, list):  # ci_low / ci_high: the bounds, left out of the table
                continue
            for i, row in enumerate(matrix):
                rows.extend((f"{lens}@{i}", "post", j, metric, v, None, None) for j, v in enumerate(row or []))


def _attribution(report: dict, rows: list) -> None:
    """Per lens and block (site ``block``): ``attn``, ``mlp`` and the readings ``logprob_{pre,mid,post}``;
    the causal effects under lens ``model``: ``{kind}_{effect}_effect``."""
    for lens in report["lenses"]:
        readings = {f"logprob_{site}": values for site, values in report["logprob"][lens].items()}
        _lists(rows, lens, "block", {"attn": report["attn"][lens], "mlp": report["mlp"][lens], **readings})
    _lists(rows, "model", "block", {f"{kind}_{effect}_effect": values for kind, effects in report["effects"].items()
                                    for effect, values in effects.items()})


def _intervene(report: dict, rows: list) -> None:
    """Per lens, the means over positions of each measure: ``{part}_{metric}``, part ``clean``,
    ``intervened`` or ``delta`` (intervened − clean)."""
    for lens, metrics in report["per_layer"].items():
        _lists(rows, lens, "post", {f"{part}_{metric}": values for metric, parts in metrics.items()
                                    for part, values in parts.items()})


_TABLES = {"compare": _compare, "submodules": _submodules, "linearity": _linearity,
           "linearity-models": _linearity_models, "saturation": _saturation, "early-exit": _early_exit,
           "trajectory": _trajectory, "transfer": _transfer, "attribution": _attribution,
           "intervene": _intervene}

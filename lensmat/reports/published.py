"""Every reporting analysis with ``out=`` and ``force=``, returning a :class:`~lensmat.reports.results.Report`:
what it writes beside ``report.json``."""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from pathlib import Path

import matplotlib.pyplot as plt

from lensmat.analyses import attribution as _attribution
from lensmat.analyses import compare as _compare
from lensmat.analyses import early_exit as _early_exit
from lensmat.analyses import intervene_view as _intervene_view
from lensmat.analyses import linearity as _linearity
from lensmat.analyses import linearity_models as _linearity_models
from lensmat.analyses import saturation as _saturation
from lensmat.analyses import submodules as _submodules
from lensmat.analyses import trajectory as _trajectory
from lensmat.analyses import trajectory_view as _trajectory_view
from lensmat.analyses import transfer as _transfer
from lensmat.outputs import publish, writes_output
from lensmat.reports.results import Report
from lensmat.reports.writing import published


def _reporting(analysis, command: str):
    """``analysis``, its report returned as a :class:`Report` of ``command``."""
    @functools.wraps(analysis)
    def run(*args, **kwargs) -> Report:
        return Report(analysis(*args, **kwargs), command)
    return run


def _with_views(analysis):
    """``analysis`` whose ``views`` default to the trajectory view of 6 held-out lines
    (:func:`~lensmat.analyses.trajectory_view.sample_views`), for ``report.html``."""
    @functools.wraps(analysis)
    def run(*args, **kwargs):
        kwargs.setdefault("views", _trajectory_view.sample_views)
        return analysis(*args, **kwargs)
    return run


compare = published(_reporting(_with_views(_compare.compare), "compare"), Report.write)
submodules = published(_reporting(_submodules.submodules, "submodules"), Report.write)
linearity = published(_reporting(_linearity.linearity, "linearity"), Report.write)
saturation = published(_reporting(_saturation.saturation, "saturation"), Report.write)
early_exit = published(_reporting(_early_exit.early_exit, "early-exit"), Report.write)
transfer = published(_reporting(_transfer.transfer, "transfer"), Report.write)


def _trajectory_report(*args, **kwargs) -> tuple[_trajectory.Trajectory, Report]:
    kwargs.setdefault("views", _trajectory_view.text_views)
    traj, report = _trajectory.trajectory_report(*args, **kwargs)
    return traj, Report(report, "trajectory")


def _trajectory_files(result, folder: Path) -> None:
    traj, report = result
    # the heatmap, not the summary figure of Report.plot
    report.write(folder, figures=lambda out: plt.close(traj.plot(report["statistic"], out=out)))
    traj.to_csv(folder / "trajectory.csv")


trajectory_report = published(functools.wraps(_trajectory.trajectory_report)(_trajectory_report), _trajectory_files)


def _intervene_report(*args, **kwargs) -> tuple[_intervene_view.InterventionView, Report]:
    view, report = _intervene_view.intervene_report(*args, **kwargs)
    return view, Report(report, "intervene")


def _intervene_files(result, folder: Path) -> None:
    """``report.json`` and the Δ figures (:meth:`Report.write`), ``intervene.csv`` (one row per lens,
    layer and position) and, with a generation, each continuation's trajectory heatmap
    (``generation_clean.png``, ``generation_intervened.png``, coloured by KL)."""
    view, report = result
    report.write(folder)
    view.to_csv(folder / "intervene.csv")
    if view.generation is not None:
        for side in ("clean", "intervened"):
            fig = getattr(view.generation, side).plot("kl")
            fig.savefig(folder / f"generation_{side}.png", dpi=120, bbox_inches="tight")
            plt.close(fig)


intervene_report = published(functools.wraps(_intervene_view.intervene_report)(_intervene_report), _intervene_files)


def _attribution_files(result: _attribution.Attribution, folder: Path) -> None:
    """``report.json`` (the ``attribution`` report) and ``attribution.png``, through :meth:`Report.write`."""
    Report(result.to_dict(), "attribution").write(folder)


attribute = published(_attribution.attribute, _attribution_files)


@writes_output
def linearity_over_models(models: list, dataset: str | None = None, *, out: str | os.PathLike | None = None,
                          force: bool = False, load=None, **kwargs) -> Report:
    """:func:`lensmat.analyses.linearity_models.linearity_over_models`, with ``out``: each model's report and
    figures go to ``out/NN-name/`` as they are done, and the summary to ``out/report.json`` with
    ``linearity_models.png`` (against tokens seen when every model records them)."""
    with publish(out, force) if out is not None else nullcontext() as folder:
        def each(i: int, name: str, report: dict) -> None:
            if folder is not None:
                Report(report, "linearity").write(folder / f"{i:02d}-{Path(name).name}")

        summary = Report(_linearity_models.linearity_over_models(models, dataset, load=load, each=each, **kwargs),
                         "linearity-models")
        if folder is not None:
            summary.write(folder)
    return summary

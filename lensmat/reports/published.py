"""Every reporting analysis with ``out=`` and ``force=``: what it writes beside ``report.json``."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import matplotlib.pyplot as plt

from lensmat import plots
from lensmat.analyses import compare as _compare
from lensmat.analyses import early_exit as _early_exit
from lensmat.analyses import linearity as _linearity
from lensmat.analyses import linearity_models as _linearity_models
from lensmat.analyses import saturation as _saturation
from lensmat.analyses import submodules as _submodules
from lensmat.analyses import trajectory as _trajectory
from lensmat.outputs import publish, writes_output
from lensmat.reports.writing import published, write_report


def _figures(draw):
    """A writer: ``report.json``, then the figures ``draw(report, folder)`` saves."""
    def write(report: dict, folder: Path) -> None:
        write_report(report, folder)
        draw(report, folder)
    return write


compare = published(_compare.compare, _figures(plots.compare_plots))
submodules = published(_submodules.submodules, _figures(plots.submodule_plots))
linearity = published(_linearity.linearity, _figures(plots.linearity_plots))
saturation = published(_saturation.saturation, _figures(plots.saturation_plots))
early_exit = published(_early_exit.early_exit, _figures(plots.early_exit_plots))


def _trajectory_files(result, folder: Path) -> None:
    traj, report = result
    write_report(report, folder)
    plt.close(traj.plot(report["statistic"], out=folder))
    traj.to_csv(folder / "trajectory.csv")


trajectory_report = published(_trajectory.trajectory_report, _trajectory_files)


@writes_output
def linearity_over_models(models: list, dataset: str | None = None, *, out: str | os.PathLike | None = None,
                          force: bool = False, load=None, **kwargs) -> dict:
    """:func:`lensmat.analyses.linearity_models.linearity_over_models`, with ``out``: each model's report and
    figures go to ``out/NN-name/`` as they are done, and the summary to ``out/report.json`` with
    ``linearity_models.png`` (against tokens seen when every model records them)."""
    with publish(out, force) if out is not None else nullcontext() as folder:
        def each(i: int, name: str, report: dict) -> None:
            if folder is not None:
                _figures(plots.linearity_plots)(report, folder / f"{i:02d}-{Path(name).name}")

        summary = _linearity_models.linearity_over_models(models, dataset, load=load, each=each, **kwargs)
        if folder is not None:
            _figures(plots.linearity_models_plot)(summary, folder)
    return summary

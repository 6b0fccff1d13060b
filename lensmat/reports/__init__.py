"""Reports: the analyses written to a folder (``report.json``, figures, tables), for the CLI and the
Python API alike.

The layer above :mod:`lensmat.analyses`: each analysis there computes and returns its report;
here it gains ``out=`` and ``force=`` (:func:`~lensmat.reports.writing.published`), so the folder
is claimed before any work and published atomically when the work is done. It may import every
layer below it (analyses, lenses, stats, data, models and the bottom modules); only the CLI and
the package face import it. The map of the layers: ``docs/modules.md``.

Entry points: :func:`compare`, :func:`submodules`, :func:`linearity`, :func:`linearity_over_models`,
:func:`saturation`, :func:`early_exit`, :func:`transfer`, :func:`trajectory_report`, :func:`intervene_report` (the same names, with ``out``,
as ``lensmat.<name>``), each returning a :class:`~lensmat.reports.results.Report` (a dict with
``to_dataframe``, ``plot``, ``save``); :func:`attribute` (returns its
:class:`~lensmat.analyses.attribution.Attribution`, writes the ``attribution`` report);
:func:`load_report` (a run folder's ``report.json`` as a ``Report``); :func:`~lensmat.reports.writing.write_report` (strict JSON);
:mod:`lensmat.reports.tables` (the CLI's text tables); :mod:`lensmat.reports.html` (``report.html``, the run
as one offline page, written beside every ``report.json``; :func:`~lensmat.reports.html.rebuild` is ``lensmat view``).
"""

from lensmat.reports.published import (attribute, compare, early_exit, intervene_report, linearity,
                                       linearity_over_models, saturation, submodules, trajectory_report, transfer)
from lensmat.reports.results import Report, load_report
from lensmat.reports.writing import published, write_report

__all__ = ["Report", "attribute", "compare", "early_exit", "intervene_report", "linearity", "linearity_over_models", "load_report",
           "published", "saturation", "submodules", "trajectory_report", "transfer", "write_report"]

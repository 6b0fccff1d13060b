"""Lenses: a residual state read as logits, and how well each reading agrees with the model.

The layer above :mod:`lensmat.stats` (it may import stats, data, models and the bottom modules).
:mod:`~lensmat.lenses.base` holds the :class:`Lens` interface, the logit lens and the mat lens;
:mod:`~lensmat.lenses.tuned` the tuned lens (and the tuned-lens package's format);
:mod:`~lensmat.lenses.jacobian` TransformerLens's J-lens; :mod:`~lensmat.lenses.importers` the
paper's released maps; :mod:`~lensmat.lenses.metrics` scores lenses against the model
(:func:`~lensmat.lenses.metrics.evaluate_lenses`, returning a
:class:`~lensmat.lenses.metrics.LensEvaluation`); :mod:`~lensmat.lenses.registry` builds lenses
by name. The map of the layers: ``docs/modules.md``.
"""

from lensmat.lenses.base import Lens, LogitLens, MatLens, read_layers, predictions_table, readout, top_predictions
from lensmat.lenses.patchscope import PatchscopeLens

__all__ = ["Lens", "LogitLens", "MatLens", "PatchscopeLens", "read_layers", "predictions_table", "readout",
           "top_predictions"]

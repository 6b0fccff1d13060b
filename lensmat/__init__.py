"""lensmat: linear maps between the layers of a transformer, read through lenses.

Data flows one way, and the sub-packages follow it (``docs/modules.md``):
text -> tokens (:mod:`lensmat.data`) -> hook activations -> statistics -> maps (:mod:`lensmat.stats`)
-> lenses and metrics (:mod:`lensmat.lenses`) -> analyses (:mod:`lensmat.analyses`) -> report folders
(:mod:`lensmat.reports`) -> the ``lensmat`` command (:mod:`lensmat.cli`). Models come from
:func:`load_model` (:mod:`lensmat.models`). This face re-exports the names a notebook needs; the
analyses here are the :mod:`lensmat.reports` versions, which take ``out=`` and ``force=``.
"""

from lensmat import plots
from lensmat._version import __version__
from lensmat.analyses.attribution import Attribution
from lensmat.analyses.exit_probe import ExitProbe, train_exit_probe
from lensmat.analyses.generation import generate
from lensmat.analyses.intervene import NoEffectWarning, score_intervention
from lensmat.analyses.intervene_view import Ablate, InterventionView, Steer, intervene, steering_vector
from lensmat.analyses.linearity import evaluate_pruning, linearity_profile, linearity_score
from lensmat.analyses.saturation_rankings import saturation_layers
from lensmat.analyses.submodules import evaluate_swaps, fit_submodule_maps
from lensmat.analyses.swap import SUBMODULE_KINDS, swap, swap_hooks
from lensmat.analyses.trajectory import Trajectory, trajectory
from lensmat.data import Batch, Masking, batches, load_lines, tokenize
from lensmat.lenses.base import Lens, LogitLens, MatLens, predictions_table, top_predictions
from lensmat.lenses.jacobian import JLens, fit_jlens
from lensmat.lenses.metrics import evaluate_lenses
from lensmat.lenses.tuned import TunedLens, TunedLensTraining, train_tuned_lens
from lensmat.models import ModelInfo, describe, is_masked_lm, load_model
from lensmat.reports import Report, attribute, compare, early_exit, linearity, load_report, saturation, submodules, transfer
from lensmat.stats.artifacts import load_maps, save_maps
from lensmat.stats.bootstrap import Bootstrap
from lensmat.stats.collect import collect, resid_hook, resid_hooks
from lensmat.stats.fit import LinearMap, MapSet, fit_layer_maps, fit_map, r2, r2_matrices
from lensmat.stats.gram import GramStats
from lensmat.stats.pipeline import fit_maps, tokenized

__all__ = [
    "__version__", "plots",
    # models and data
    "ModelInfo", "describe", "is_masked_lm", "load_model", "Batch", "Masking", "batches", "load_lines", "tokenize",
    # statistics and maps
    "GramStats", "collect", "resid_hook", "resid_hooks", "LinearMap", "MapSet", "fit_layer_maps", "fit_map", "r2",
    "r2_matrices", "fit_maps", "tokenized", "load_maps", "save_maps", "Bootstrap",
    # lenses
    "Lens", "LogitLens", "MatLens", "predictions_table", "top_predictions", "JLens", "fit_jlens", "TunedLens",
    "TunedLensTraining", "TunedLensConfig", "train_tuned_lens", "evaluate_lenses",
    # analyses
    "SUBMODULE_KINDS", "evaluate_swaps", "fit_submodule_maps", "swap", "swap_hooks", "Trajectory", "trajectory",
    "Attribution", "generate", "ExitProbe", "train_exit_probe", "saturation_layers", "evaluate_pruning", "linearity_profile", "linearity_score", "score_intervention",
    "intervene", "InterventionView", "Steer", "Ablate", "steering_vector", "NoEffectWarning",
    # reports: the analyses with out= and force=, returning a Report; a saved one read back
    "compare", "submodules", "linearity", "saturation", "early_exit", "transfer", "attribute", "Report", "load_report",
]


def __getattr__(name: str):
    """Old names that still resolve, with a DeprecationWarning (``lensmat.TunedLensConfig``)."""
    if name == "TunedLensConfig":
        from lensmat.lenses import tuned

        return tuned.__getattr__(name)
    raise AttributeError(f"module 'lensmat' has no attribute {name!r}")

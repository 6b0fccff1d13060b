"""lensmat: linear maps between the layers of a transformer, read through lenses.

Data flows one way: text -> tokens (:mod:`lensmat.data`) -> hook activations and sufficient
statistics -> maps -> lenses -> metrics (:mod:`lensmat.metrics`) -> reports and plots.
Models come from :func:`load_model` (:mod:`lensmat.models`).
"""

from lensmat._version import __version__
from lensmat.collect import collect, resid_hook, resid_hooks
from lensmat.statistics import GramStats
from lensmat.compare import compare
from lensmat.data import Batch, Masking, batches, load_lines, tokenize
from lensmat.early_exit import early_exit
from lensmat.generation import generate
from lensmat.fit import LinearMap, MapSet, fit_layer_maps, fit_map, r2, r2_matrices
from lensmat.io import load_maps, save_maps
from lensmat.jlens import JLens, fit_jlens
from lensmat.lenses import Lens, LogitLens, MatLens, predictions_table, top_predictions
from lensmat.linearity import evaluate_pruning, linearity, linearity_profile, linearity_score
from lensmat.metrics import evaluate_lenses
from lensmat.models import ModelInfo, describe, is_masked_lm, load_model
from lensmat.pipeline import fit_maps, tokenized
from lensmat.saturation import saturation, saturation_layers
from lensmat.submodules import evaluate_swaps, fit_submodule_maps, submodules
from lensmat.swap import SUBMODULE_KINDS, swap, swap_hooks
from lensmat.tuned import TunedLens, TunedLensConfig, train_tuned_lens
from lensmat.trajectory import Trajectory, trajectory


__all__ = [
    "Batch", "GramStats", "Lens", "LinearMap", "LogitLens", "MapSet", "MatLens", "ModelInfo", "__version__",
    "batches", "collect", "compare", "describe", "evaluate_lenses", "fit_layer_maps", "fit_map", "fit_maps",
    "load_lines", "load_maps", "load_model", "r2", "r2_matrices", "resid_hook", "resid_hooks", "save_maps",
    "tokenize", "tokenized", "SUBMODULE_KINDS", "evaluate_swaps", "fit_submodule_maps", "submodules", "swap",
    "swap_hooks", "JLens", "fit_jlens", "TunedLens", "TunedLensConfig", "train_tuned_lens",
    "predictions_table", "top_predictions", "Trajectory", "trajectory", "Masking", "is_masked_lm", "early_exit", "generate", "saturation", "saturation_layers", "evaluate_pruning", "linearity", "linearity_profile", "linearity_score",
]

"""lensmat: linear maps between the layers of a transformer, read through lenses.

Data flows one way: text -> tokens (:mod:`lensmat.data`) -> hook activations and sufficient
statistics -> maps -> lenses -> metrics (:mod:`lensmat.metrics`) -> reports and plots.
Models come from :func:`load_model` (:mod:`lensmat.models`).
"""

from importlib.metadata import PackageNotFoundError, version

from lensmat.data import Batch, batches, load_lines, tokenize
from lensmat.models import ModelInfo, describe, load_model

try:
    __version__ = version("lensmat")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["Batch", "ModelInfo", "batches", "describe", "load_lines", "load_model", "tokenize", "__version__"]

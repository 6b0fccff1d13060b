"""Import the "Jump to Conclusions" authors' released matrices (``i_j.pickle``) safely.

The released files are pickles, and unpickling can run arbitrary code. They are read with a
restricted unpickler that accepts only what a pickled tensor or array is made of (torch's
tensor rebuild functions, numpy's array reconstruction, ``collections.OrderedDict``); the
tensor bytes inside are read with ``torch.load(weights_only=True)``, never with the
``weights_only=False`` that a plain ``pickle.load`` of a tensor would trigger. Anything else is
refused with :class:`UnsafePickleError` before it is constructed. Zip files written by
``torch.save`` are read with ``torch.load(weights_only=True)`` directly.

Conventions assumed for the released maps (check them against your copy): ``i_j.pickle`` maps
residual layer ``i`` to layer ``j`` (0 = embeddings, as lensmat's ``h_i``); the matrix acts on
column vectors, ``y = A x`` (shape ``[d_out, d_in]``), so lensmat stores ``W = Aᵀ``.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from lensmat.stats.collect import resid_hook
from lensmat.stats.fit import LinearMap, MapSet
from lensmat.stats.artifacts import ArtifactError, check_tensors, load_torch_tensors, owned, weights_only_refusal
from lensmat.models import describe


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that asks for something other than tensor data."""


def _tensor_from_bytes(data: bytes):
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafePickleError(f"Refusing the tensor bytes inside this pickle ({weights_only_refusal(err)}): they ask "
                                "for something other than tensor data, so they were not unpickled.") from None


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"), ("collections", "OrderedDict"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("torch", "Size"),
}
_REPLACED = {("torch.storage", "_load_from_bytes"): _tensor_from_bytes}


class _TensorOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _REPLACED:
            return _REPLACED[(module, name)]
        if (module, name) in _ALLOWED:
            return getattr(importlib.import_module(module), name)
        raise UnsafePickleError(
            f"Refusing to load {module}.{name}: this file asks for something other than tensor data, "
            "so it was not unpickled. Only pickled tensors/arrays are accepted."
        )


def load_tensor_pickle(path: str | os.PathLike) -> torch.Tensor:
    """A tensor from a pickle (or ``torch.save`` zip) file, without running code from it."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        obj = load_torch_tensors(path, "import the matrices the authors released (tensors or arrays only).")
    else:
        with open(path, "rb") as f:
            obj = _TensorOnlyUnpickler(f).load()
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2:
        raise ValueError(f"{path} does not hold a 2-D matrix (got {type(obj).__name__}).")
    return owned(obj)


def import_paper_maps(folder: str | os.PathLike, model, *, transpose: bool = True) -> MapSet:
    """Read every ``i_j.pickle`` in ``folder`` into a :class:`~lensmat.stats.fit.MapSet` for ``model``.

    ``transpose=True`` takes the files as ``y = A x`` matrices (stored as ``W = Aᵀ``). The maps'
    provenance says ``imported``. Each file is checked: layers ``0 <= i < j <= L``, no map given twice (``0_3``
    and ``00_3``), a finite floating-point ``d_model × d_model`` matrix (:func:`lensmat.stats.artifacts.check_tensors`).
    The authors fitted them on GPT-2 inputs *without* BOS, at one random position per sentence
    (``sashayd/mat``, ``add_tokenization.py``): the provenance records that ``scoring``, and the
    numbers that belong beside theirs come from ``compare(..., scoring=Scoring("one-random", bos=False))``.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.pickle") if re.fullmatch(r"\d+_\d+", p.stem))
    if not files:
        raise FileNotFoundError(f"No i_j.pickle files in {folder}.")
    info = describe(model)
    d, maps, seen = info.d_model, {}, {}
    for path in files:
        i, j = (int(x) for x in path.stem.split("_"))
        if not (0 <= i < j <= info.n_layers):
            raise ArtifactError(f"{path.name}: layers {i} -> {j} are outside 0..{info.n_layers} for this model "
                                f"or not i < j; import the files released for {info.name}.")
        if (i, j) in seen:
            raise ArtifactError(f"{path.name} and {seen[(i, j)]} both hold the map {i} -> {j}; keep one of them.")
        seen[(i, j)] = path.name
        A = load_tensor_pickle(path)
        check_tensors(path, {"matrix": A}, {"matrix": (d, d)}, f"this model needs a finite floating-point {d}x{d} "
                      f"matrix; import the files released for {info.name}, or re-download this one.", {"matrix": "its matrix"})
        W = A.float().T.contiguous() if transpose else A.float()
        src, tgt = resid_hook(i), resid_hook(j)
        maps[(src, tgt)] = LinearMap(W, None, src, tgt)
    return MapSet(maps, info.to_dict(), provenance={"source": "imported", "from": str(folder), "files": len(files),
                                                    "transposed": transpose,
                                                    "scoring": {"positions": "one-random", "bos": False}})

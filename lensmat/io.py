"""Saved artifacts: a folder with ``<kind>.safetensors`` and ``meta.json``.

``meta.json`` holds ``format_version``, ``kind``, ``lensmat_version``, the model identity
(:class:`~lensmat.models.ModelInfo`), what was fitted and on which data. Folders are written
atomically (a temporary sibling folder, then a rename), so an interrupted write never leaves a
folder that loads. Loading reads only safetensors and JSON (no pickle) and checks every field.
Every loader hands back tensors in memory PyTorch allocated itself (:func:`owned`), so what is
computed from a loaded tensor does not depend on where in a file buffer it happened to lie.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
REQUIRED_META = ("format_version", "kind", "lensmat_version", "model")


class ArtifactError(ValueError):
    """A saved folder that is missing, corrupted or of an unsupported format."""


ALIGNMENT = 64  # bytes: what PyTorch's CPU allocator guarantees, and what math libraries' fast paths expect


def owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in memory PyTorch allocated itself: its own contiguous storage, ``ALIGNMENT``-aligned.

    safetensors, numpy and pickles hand back tensors that view a file buffer at any offset
    (safetensors: 8 or 40 bytes past a 64-byte boundary). BLAS libraries pick their kernels by the
    alignment of the buffers, so accumulating into such a tensor (``addmm_``) can add in another order
    than into a fresh one: on some CPUs (MKL on AMD EPYC) a resumed fit then differed from an
    uninterrupted one by ~1e-14. Every loader passes what it reads through here; ``t`` itself is
    returned when it already owns such memory, else a copy.
    """
    storage = t.untyped_storage()
    if (storage.resizable() and t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0
            and t.data_ptr() == storage.data_ptr() and storage.nbytes() == t.nbytes):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file, each :func:`owned` (copied one at a time, so the
    peak is the file plus one tensor)."""
    with safe_open(str(path), framework="pt") as f:
        return {key: owned(f.get_tensor(key)) for key in f.keys()}


def save_artifact(path: str | os.PathLike, kind: str, tensors: dict[str, torch.Tensor], meta: dict,
                  force: bool = False) -> Path:
    """Write ``path/<kind>.safetensors`` and ``path/meta.json`` atomically.

    An existing ``path`` is replaced only with ``force=True``.
    """
    import lensmat

    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; choose another folder or pass force=True (--force).")
    path.parent.mkdir(parents=True, exist_ok=True)
    full_meta = {"format_version": FORMAT_VERSION, "kind": kind, "lensmat_version": lensmat.__version__, **meta}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / f"{kind}.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_artifact(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of a folder written by :func:`save_artifact`; raises :class:`ArtifactError`."""
    path = Path(path)
    meta_file, tensor_file = path / "meta.json", path / f"{kind}.safetensors"
    if not meta_file.is_file() or not tensor_file.is_file():
        raise ArtifactError(f"{path} is not a saved lensmat {kind} folder (needs meta.json and {kind}.safetensors).")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{meta_file} is not valid JSON ({err}); the folder is corrupted, refit or re-copy it.") from None
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ArtifactError(f"{meta_file} lacks required field(s) {missing}; the folder is incomplete, refit it.")
    if not isinstance(meta["format_version"], int) or meta["format_version"] > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {meta['format_version']!r}, newer than this lensmat reads "
            f"({FORMAT_VERSION}); upgrade lensmat (pip install -U lensmat)."
        )
    if meta["kind"] != kind:
        raise ArtifactError(f"{path} holds a {meta['kind']!r} artifact, not {kind!r}.")
    try:
        tensors = read_tensors(tensor_file)
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{tensor_file} is truncated or corrupted ({err}); refit or re-copy it.") from None
    return tensors, meta


def save_maps(maps, path: str | os.PathLike, force: bool = False) -> Path:
    """Save a :class:`~lensmat.fit.MapSet` to a folder (``maps.safetensors`` + ``meta.json``)."""
    tensors, index = {}, []
    for i, ((src, tgt), m) in enumerate(maps.maps.items()):
        tensors[f"{i}.W"] = m.W.float()
        if m.b is not None:
            tensors[f"{i}.b"] = m.b.float()
        index.append([src, tgt])
    meta = {"model": maps.model, "intercept": maps.intercept, "ridge": maps.ridge, "pairs": index,
            "provenance": maps.provenance or {}}
    return save_artifact(path, "maps", tensors, meta, force=force)


def load_maps(path: str | os.PathLike, model=None):
    """Load a :class:`~lensmat.fit.MapSet`; with ``model``, refuse it when the model differs."""
    from lensmat.fit import LinearMap, MapSet

    tensors, meta = load_artifact(path, "maps")
    if "pairs" not in meta:
        raise ArtifactError(f"{path}/meta.json lacks the 'pairs' index; the folder is incomplete, refit it.")
    maps = {}
    for i, (src, tgt) in enumerate(meta["pairs"]):
        if f"{i}.W" not in tensors:
            raise ArtifactError(f"{path}: map {i} ({src} -> {tgt}) is missing from maps.safetensors; refit it.")
        maps[(src, tgt)] = LinearMap(tensors[f"{i}.W"], tensors.get(f"{i}.b"), src, tgt)
    result = MapSet(maps, meta["model"], bool(meta.get("intercept", False)), float(meta.get("ridge", 0.0)),
                    meta.get("provenance"))
    if model is not None:
        result.check_model(model)
    return result

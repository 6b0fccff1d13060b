"""Saved artifacts: a folder with ``<kind>.safetensors`` and ``meta.json``.

``meta.json`` holds ``format_version``, ``kind``, ``lensmat_version``, the model identity
(:class:`~lensmat.models.identity.ModelInfo`), what was fitted and on which data. Folders are written
atomically (a temporary sibling folder, then a rename), so an interrupted write never leaves a
folder that loads. Loading reads only safetensors and JSON (no pickle) and checks every field and every
tensor (:func:`check_tensors`: the keys, floating point, shape, finite values).
Every loader hands back tensors in memory PyTorch allocated itself (:func:`owned`), so what is
computed from a loaded tensor does not depend on where in a file buffer it happened to lie.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file

from lensmat.outputs import publish

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


def weights_only_refusal(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file (``Unsupported global: GLOBAL os.system …``),
    without torch's advice to load it with ``weights_only=False``, which would run the file's code."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    reason = re.search(r"WeightsUnpickler error: (.+?\.)(?:\s|$)", text)
    return reason[1] if reason else "it asks for objects other than tensors"


def load_torch_tensors(path: str | os.PathLike, fix: str, mmap: bool = False):
    """What a ``torch.save`` file holds, read with ``torch.load(weights_only=True)`` only (tensors and
    plain containers, never code; memory-mapped with ``mmap``); an unreadable or refused file raises
    :class:`ArtifactError` naming it and ``fix``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise ArtifactError(f"{path} holds something other than tensor data ({weights_only_refusal(err)}); it was not "
                            f"unpickled: lensmat reads such files with torch.load(weights_only=True) only; {fix}") from None
    except Exception as err:  # torch raises RuntimeError or EOFError for a truncated or damaged file
        raise ArtifactError(f"{path} could not be read as tensors with torch.load(weights_only=True) ({err}); "
                            f"{fix}") from None
    return obj


def check_tensors(where: str | os.PathLike, tensors: dict, shapes: dict[str, tuple[int | None, ...]], fix: str,
                  labels: dict[str, str] | None = None) -> None:
    """Refuse what a file holds unless it is exactly the keys of ``shapes``, each a floating-point tensor of that
    shape (``None``: any size) holding finite values. Every loader checks its tensors here; the
    :class:`ArtifactError` names ``where``, the first bad entry (``labels[key]``, else the key), what is wrong
    and ``fix``."""
    missing, extra = [k for k in shapes if k not in tensors], [k for k in tensors if k not in shapes]
    if missing or extra:
        found = "; ".join(part for part in (f"missing {missing[:4]}" if missing else "",
                                            f"unexpected {extra[:4]}" if extra else "") if part)
        raise ArtifactError(f"{where} does not hold the tensors expected: {found}; {fix}")
    for key, shape in shapes.items():
        t = tensors[key]
        if not isinstance(t, torch.Tensor):
            problem = f"is a {type(t).__name__}, not a tensor"
        elif not t.is_floating_point():
            problem = f"has dtype {t.dtype}; only floating-point tensors are read"
        elif t.dim() != len(shape) or any(n is not None and n != m for n, m in zip(shape, t.shape)):
            problem = f"has shape {_shape(t.shape)}, expected {_shape(shape)}"
        elif not bool(torch.isfinite(t).all()):
            bad = ~torch.isfinite(t)
            problem = f"holds {int(bad.sum())} NaN/Inf value(s), the first at index {_index(bad)}"
        else:
            continue
        raise ArtifactError(f"{where}: {(labels or {}).get(key, key)} {problem}; {fix}")


def _shape(shape) -> str:
    return "x".join("?" if n is None else str(n) for n in shape) or "a scalar"


def _index(mask: torch.Tensor) -> tuple[int, ...]:
    """The index of the first ``True`` of ``mask`` (row-major)."""
    flat, index = int(mask.reshape(-1).to(torch.uint8).argmax()), []
    for n in reversed(mask.shape):
        flat, i = divmod(flat, n)
        index.append(i)
    return tuple(reversed(index))


_RESIDUAL = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|mid|post)")
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def residual_depth(hook: str) -> float | None:
    """Where a residual hook sits along the stream: ``h_l`` (``blocks.{l}.hook_resid_pre`` or
    ``blocks.{l-1}.hook_resid_post``) at ``l``, block ``l``'s ``hook_resid_mid`` at ``l + 0.5``; ``None``
    for any other hook."""
    m = _RESIDUAL.fullmatch(hook)
    return None if m is None else int(m[1]) + {"pre": 0.0, "mid": 0.5, "post": 1.0}[m[2]]


def check_pairs(where: str | os.PathLike, pairs, n_layers: int, model=None) -> list[tuple[str, str]]:
    """The ``(source, target)`` hook pairs of a maps index, refused (:class:`ArtifactError`, naming the first
    bad pair) unless each is two hook names of blocks ``0..n_layers-1`` listed once, a residual pair goes
    forward (``h_2 -> h_5``, never ``h_5 -> h_2``), and, given ``model``, its hooks are the model's."""
    fix = "the index in meta.json is corrupted or was edited; refit the maps (lensmat fit) or re-copy the folder."
    if not isinstance(pairs, list):
        raise ArtifactError(f"{where}/meta.json: 'pairs' is a {type(pairs).__name__}, not a list of pairs; {fix}")
    seen: dict[tuple[str, str], int] = {}
    for i, pair in enumerate(pairs):
        hooks = list(pair) if isinstance(pair, (list, tuple)) else []
        if len(hooks) != 2 or not all(isinstance(h, str) for h in hooks):
            problem = f"is {pair!r}, not [source hook, target hook]"
        elif tuple(hooks) in seen:
            problem = f"({hooks[0]} -> {hooks[1]}) is listed twice (also pair {seen[tuple(hooks)]})"
        elif any(m and int(m[1]) >= n_layers for m in map(_BLOCK.match, hooks)):
            problem = f"({hooks[0]} -> {hooks[1]}) names a block outside 0..{n_layers - 1} of its {n_layers}-block model"
        elif model is not None and any(h not in model.hook_dict for h in hooks):
            problem = f"names {next(h for h in hooks if h not in model.hook_dict)!r}, which is not a hook of this model"
        elif None not in (depths := [residual_depth(h) for h in hooks]) and depths[0] >= depths[1]:
            problem = (f"({hooks[0]} -> {hooks[1]}) does not go forward along the residual stream; a residual map goes "
                       "from an earlier layer to a later one (source layer < target layer)")
        else:
            seen[(hooks[0], hooks[1])] = i
            continue
        raise ArtifactError(f"{where}/meta.json: pair {i} {problem}; {fix}")
    return list(seen)


def hook_widths(model, hooks) -> dict[str, int]:
    """The width of each of ``model``'s ``hooks``: ``d_model`` on the residual stream, else the width a
    one-token forward pass captures there."""
    from lensmat.models import input_device

    widths = {h: int(model.cfg.d_model) for h in hooks if residual_depth(h) is not None}
    rest = [h for h in hooks if h not in widths]
    if rest:
        def width_of(name: str):  # keyed by the name asked for: the bridge may call the hook by its own name
            def width(act: torch.Tensor, hook) -> None:
                widths[name] = int(act.shape[-1])
            return width

        with torch.inference_mode():
            model.run_with_hooks(torch.zeros(1, 1, dtype=torch.long, device=input_device(model)),
                                 fwd_hooks=[(h, width_of(h)) for h in rest], return_type=None)
    return widths


def save_artifact(path: str | os.PathLike, kind: str, tensors: dict[str, torch.Tensor], meta: dict,
                  force: bool = False) -> Path:
    """Write ``path/<kind>.safetensors`` and ``path/meta.json`` atomically (:func:`lensmat.outputs.publish`).

    An existing ``path`` is replaced only with ``force=True``, and only when lensmat wrote it.
    """
    from lensmat._version import __version__

    full_meta = {"format_version": FORMAT_VERSION, "kind": kind, "lensmat_version": __version__, **meta}
    with publish(path, force, kind=kind) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / f"{kind}.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
    return Path(path)


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
    """Save a :class:`~lensmat.stats.fit.MapSet` to a folder (``maps.safetensors`` + ``meta.json``)."""
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
    """Load a :class:`~lensmat.stats.fit.MapSet`, checked: with ``model``, refused when the model differs, then its
    index (:func:`check_pairs`) and tensors (:func:`check_tensors`: ``W`` of pair ``i`` is ``[d_source,
    d_target]``, ``b`` is ``[d_target]``) against the widths of ``model``'s hooks (:func:`hook_widths`);
    without ``model``, residual hooks against the ``d_model`` the folder records and any other hook against
    the first map that reads or writes it."""
    from lensmat.stats.fit import LinearMap, MapSet
    from lensmat.models import check_same_model

    tensors, meta = load_artifact(path, "maps")
    info = meta["model"]
    if "pairs" not in meta:
        raise ArtifactError(f"{path}/meta.json lacks the 'pairs' index; the folder is incomplete, refit it.")
    if not isinstance(info, dict) or not all(type(info.get(k)) is int for k in ("n_layers", "d_model")):
        raise ArtifactError(f"{path}/meta.json does not record the model's n_layers and d_model; the folder is "
                            "corrupted, refit the maps (lensmat fit) or re-copy it.")
    if model is not None:
        check_same_model(info, model, what=f"the maps in {path}")
    pairs = check_pairs(path, meta["pairs"], info["n_layers"], model)
    hooks = list(dict.fromkeys(h for pair in pairs for h in pair))
    if model is not None:
        widths = hook_widths(model, hooks)
    else:
        widths = {h: info["d_model"] for h in hooks if residual_depth(h) is not None}
        for i, (src, tgt) in enumerate(pairs):  # any other hook: as wide as the first map that reads or writes it
            W = tensors.get(f"{i}.W")
            if W is not None and W.dim() == 2:
                widths.setdefault(src, W.shape[0])
                widths.setdefault(tgt, W.shape[1])
    intercept = bool(meta.get("intercept", False))
    shapes, labels = {}, {}
    for i, (src, tgt) in enumerate(pairs):
        shapes[f"{i}.W"], labels[f"{i}.W"] = (widths.get(src), widths.get(tgt)), f"{i}.W (the map {src} -> {tgt})"
        if intercept or f"{i}.b" in tensors:  # maps fitted with an intercept but saved without the flag keep their b
            shapes[f"{i}.b"], labels[f"{i}.b"] = (widths.get(tgt),), f"{i}.b (the intercept of {src} -> {tgt})"
    check_tensors(f"{path}/maps.safetensors", tensors, shapes, "the file is corrupted or does not belong to its "
                  "meta.json; refit the maps (lensmat fit) or re-copy the folder.", labels)
    maps = {(src, tgt): LinearMap(tensors[f"{i}.W"], tensors.get(f"{i}.b"), src, tgt) for i, (src, tgt) in enumerate(pairs)}
    return MapSet(maps, info, intercept, float(meta.get("ridge", 0.0)), meta.get("provenance"))

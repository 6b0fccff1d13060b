"""The ``tuned-lens`` package's saved format (``config.json`` + ``params.pt``), read and checked so a
published lens loads as a :class:`~lensmat.lenses.tuned.TunedLens` (see :meth:`TunedLens.from_package`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from jaxtyping import Float

from lensmat.models import describe


PACKAGE_PARAMS = "params.pt"
PACKAGE_CONFIG = "config.json"
# numpy's default print options: the package hashes with them, so a user's np.set_printoptions must not change the hash
_NUMPY_PRINT_DEFAULTS = dict(threshold=1000, edgeitems=3, linewidth=75, suppress=False, floatmode="maxprec", sign="-",
                             nanstr="nan", infstr="inf", formatter=None, legacy=False)


def is_package_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is laid out as a ``tuned-lens`` package lens (``config.json``, no lensmat ``meta.json``)."""
    return (Path(path) / PACKAGE_CONFIG).is_file() and not (Path(path) / "meta.json").exists()


def package_unembed_hash(model) -> str:
    """The ``unembed_hash`` the ``tuned-lens`` package records for a model, reproduced exactly: its
    ``tensor_hash``, SHA-256 of numpy's ``array_str(W_U as [d_vocab, d_model] float32, precision=1)``
    under numpy's default print options. numpy summarises a large matrix by its corners (3 rows and
    columns at each end, one decimal), so the hash tells models apart, not small edits or dtypes."""
    import hashlib

    import numpy as np

    W = model.W_U.detach().T.float().cpu().numpy()
    with np.printoptions(**_NUMPY_PRINT_DEFAULTS):
        return hashlib.sha256(str.encode(np.array_str(W, precision=1))).hexdigest()


def read_package(path: str | os.PathLike, model) -> tuple[Float[torch.Tensor, "L d d"], Float[torch.Tensor, "L d"], dict]:
    """``(W, b, meta)`` of a lens saved by the ``tuned-lens`` package (0.2.0's ``TunedLens.save``, and the layout of
    its hub repository ``AlignmentResearch/tuned-lens``: ``lens/<model>/config.json`` + ``params.pt``).

    ``config.json`` is the package's ``TunedLensConfig``: ``base_model_name_or_path``, ``d_model``,
    ``num_hidden_layers``, ``bias``, ``base_model_revision``, ``unembed_hash``, ``lens_type``
    (``"linear_tuned_lens"``). ``params.pt`` is the state dict of its ``layer_translators``:
    ``{i}.weight`` (``[d, d]``, ``nn.Linear``'s ``[out, in]``) and ``{i}.bias`` (``[d]``, absent
    when ``bias`` is false: zero here) for ``i = 0..L-1``; the final norm and unembedding are not
    saved (the lens reads through the model's own). Its translator is ``h + weight·h + bias`` on HF
    ``hidden_states[i]``, the input of block ``i``, which is lensmat's residual layer ``i``
    (``blocks.{i}.hook_resid_pre``), so ``W_i = weightᵀ``; layer ``L`` has no translator (identity).
    The package writes no safetensors file, so ``params.pt`` is the only parameter file read, with
    ``torch.load(weights_only=True)``.

    Checked against ``model``: ``num_hidden_layers`` and ``d_model``; the ``unembed_hash``
    (:func:`package_unembed_hash`, reproduced exactly; a config without one is not checked); the
    basis, which must be the raw Hugging Face one the package trains in (lensmat's default); every translator
    a finite floating-point tensor (:func:`lensmat.stats.artifacts.check_tensors`).
    """
    path = Path(path)
    config = package_config(path, model)
    L, d, bias = int(model.cfg.n_layers), int(model.cfg.d_model), bool(config.get("bias", True))
    state = package_params(path, L, d, bias)
    W = torch.stack([state[f"{i}.weight"].float().T for i in range(L)])
    b = torch.stack([state[f"{i}.bias"].float() for i in range(L)]) if bias else torch.zeros(L, d)
    meta = {"model": describe(model).to_dict(), "format": "tuned-lens package",
            "provenance": {"source": str(path), "package_config": config}}
    return W, b, meta


def package_config(path: Path, model) -> dict:
    """The package's ``config.json`` in the folder ``path``, checked against ``model`` as :func:`read_package` says."""
    import json

    from lensmat.stats.artifacts import ArtifactError
    from lensmat.models import ModelMismatchError, basis_of

    try:
        config = json.loads((path / PACKAGE_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}/{PACKAGE_CONFIG} is not a readable tuned-lens config ({err}).") from err
    missing = [k for k in ("d_model", "num_hidden_layers") if not isinstance(config, dict) or k not in config]
    if missing:
        raise ArtifactError(f"{path}/{PACKAGE_CONFIG} is not a tuned-lens config (no {', '.join(missing)}); "
                            "pass the lens folder (lens/<model>/ of the package's hub repository), not a model folder.")
    if config.get("lens_type", "linear_tuned_lens") != "linear_tuned_lens":
        raise ArtifactError(f"{path} holds a {config['lens_type']!r} lens; lensmat reads the package's "
                            "'linear_tuned_lens' only.")
    L, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    if (config["num_hidden_layers"], config["d_model"]) != (L, d):
        raise ModelMismatchError(
            f"The tuned lens in {path} was trained for {config.get('base_model_name_or_path')!r} "
            f"({config['num_hidden_layers']} layers, d_model {config['d_model']}); this model has {L} layers, "
            f"d_model {d}. Load the lens for this model.")
    if basis_of(model) != "raw":
        raise ModelMismatchError(f"The tuned-lens package trains on raw Hugging Face hidden states, but this model is in "
                                 f"the {basis_of(model)!r} basis; load it with lensmat.load_model (raw weights).")
    expected = config.get("unembed_hash")
    if expected and expected != package_unembed_hash(model):
        raise ModelMismatchError(
            f"The tuned lens in {path} records the unembedding hash {expected[:12]}…, this model's is "
            f"{package_unembed_hash(model)[:12]}…: it was trained for another model ({config.get('base_model_name_or_path')!r}).")
    return config


def package_params(path: Path, L: int, d: int, bias: bool) -> dict[str, torch.Tensor]:
    """The state dict of ``params.pt`` in the folder ``path``: ``L`` translators of width ``d``, with or
    without ``bias``, every one a finite floating-point tensor of its shape (:func:`read_package`)."""
    from lensmat.stats.artifacts import ArtifactError, check_tensors, load_torch_tensors

    params = path / PACKAGE_PARAMS
    if not params.is_file():
        raise ArtifactError(f"{path} has a tuned-lens config.json but no {PACKAGE_PARAMS}; copy the lens's parameters "
                            "beside it (the hub repository keeps both in lens/<model>/).")
    state = load_torch_tensors(params, "re-download it (a lens's params.pt holds tensors only).")
    shapes = {f"{i}.{part}": (d, d) if part == "weight" else (d,) for i in range(L)
              for part in (("weight", "bias") if bias else ("weight",))}
    want = set(shapes)
    if not isinstance(state, dict) or set(state) != want:
        if not isinstance(state, dict):
            found = f"a {type(state).__name__}"
        else:
            lacking, extra = sorted(want - set(state)), sorted(set(state) - want)
            found = "; ".join(part for part in (f"missing {lacking[:4]}" if lacking else "",
                                                f"unexpected {extra[:4]}" if extra else "") if part)
        raise ArtifactError(f"{params} is not the state dict of {L} translators with{'' if bias else 'out'} bias "
                            f"(keys 0.weight … {L - 1}.{'bias' if bias else 'weight'}): {found}. It must come from "
                            "tuned-lens 0.2.0's TunedLens.save, for this config.")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or tuple(v.shape) != shapes[k]]
    if bad:
        raise ArtifactError(f"{params}: {bad[0]} is not a {'[d, d]' if bad[0].endswith('.weight') else '[d]'} "
                            f"tensor for d_model {d}; the file does not match its config.json.")
    check_tensors(params, state, shapes, "re-download it (a lens's params.pt holds finite floating-point translators).")
    return state

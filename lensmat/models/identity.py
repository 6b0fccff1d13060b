"""What a model is: its identity (:class:`ModelInfo`: shape, basis, weight hashes and fingerprints),
recorded in every artifact and checked when one is loaded (:func:`check_same_model`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ModelInfo:
    """What identifies a model for lensmat: maps and lenses record it and check it on load."""

    name: str
    n_layers: int
    d_model: int
    d_vocab: int
    n_ctx: int
    basis: str  # "raw" (HF weights) or "processed" (compatibility mode: folded LN, centred)
    normalization_type: str | None
    config_hash: str
    unembed_hash: str  # sha256 of W_U and b_U as float32: exact, so it changes with the model's dtype
    unembed_fingerprint: tuple[float, ...] = ()  # 16 fixed entries of W_U: the same weights in any dtype
    source: dict | None = None  # for a GGUF file: its path, sha256, architecture and tensor types
    fingerprint_version: int = 2  # 2: exact integer indices; artifacts without the field used the legacy ones

    def to_dict(self) -> dict:
        return asdict(self)


_CONFIG_KEYS = ("n_layers", "d_model", "d_vocab", "n_ctx", "n_heads", "d_head", "d_mlp", "act_fn",
                "normalization_type", "positional_embedding_type", "parallel_attn_mlp", "architecture")


def _sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def basis_of(model) -> str:
    """``"processed"`` when the bridge's weights were folded/centred, else ``"raw"``."""
    return "processed" if getattr(model, "_weights_processed", False) else "raw"


def describe(model) -> ModelInfo:
    """The :class:`ModelInfo` of a bridge (hashes its unembedding: W_U and b_U)."""
    cfg = model.cfg
    cfg_view = {k: str(getattr(cfg, k, None)) for k in _CONFIG_KEYS}
    w_hash = _sha256(model.W_U)
    b_U = getattr(model, "b_U", None)
    if b_U is not None:
        w_hash = hashlib.sha256((w_hash + _sha256(b_U)).encode()).hexdigest()[:16]
    return ModelInfo(
        name=str(getattr(cfg, "model_name", "unknown")),
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        d_vocab=int(cfg.d_vocab),
        n_ctx=int(cfg.n_ctx),
        basis=basis_of(model),
        normalization_type=getattr(cfg, "normalization_type", None),
        config_hash=hashlib.sha256(json.dumps(cfg_view, sort_keys=True).encode()).hexdigest()[:16],
        unembed_hash=w_hash,
        unembed_fingerprint=_fingerprint(model.W_U),
        source=getattr(cfg, "lensmat_source", None),
    )


def _fingerprint(W: torch.Tensor, n: int = 16, legacy: bool = False) -> tuple[float, ...]:
    """``n`` evenly spaced entries of ``W``, rounded to 6 decimals. The indices are exact integers
    (``legacy``: the float32 ``linspace`` of lensmat ≤ 0.1.0, which rounds past 2^24 entries and
    ran off the end of GPT-2's and larger unembeddings; kept only to read maps saved with it)."""
    flat = W.detach().reshape(-1)
    if legacy:
        idx = torch.linspace(0, flat.numel() - 1, n).long().clamp(max=flat.numel() - 1)
    else:
        idx = torch.tensor([i * (flat.numel() - 1) // (n - 1) for i in range(n)])
    return tuple(round(float(v), 6) for v in flat[idx.to(flat.device)].float().cpu())


def _same_unembedding(saved: dict, info: ModelInfo, model=None) -> bool:
    """Exact hash match, or (another dtype of the same weights) fingerprints within bfloat16 precision;
    an artifact saved before ``fingerprint_version`` 2 is compared with the legacy fingerprint of ``model``."""
    if saved.get("unembed_hash") == info.unembed_hash:
        return True
    theirs, ours = saved.get("unembed_fingerprint") or (), info.unembed_fingerprint
    if saved.get("fingerprint_version", 1) < 2:
        ours = _fingerprint(model.W_U, legacy=True) if model is not None else ()
    if len(theirs) != len(ours) or not ours:
        return False
    return all(abs(a - b) <= 1e-2 * max(abs(a), abs(b)) + 1e-6 for a, b in zip(theirs, ours))


class ModelMismatchError(ValueError):
    """Maps or lenses fitted on a different model than the one given."""


_IDENTITY_FIELDS = ("d_model", "n_layers", "d_vocab", "basis")


def check_same_model(saved: dict, model, what: str = "this artifact") -> None:
    """Raise :class:`ModelMismatchError` naming every identity field that differs.

    The unembedding must be the same weights: the same hash, or the same fingerprint within
    bfloat16 precision (maps fitted on a float32 model apply to its bfloat16 copy).
    """
    info = describe(model)
    current = info.to_dict()
    diffs = [f"{k}: fitted on {saved.get(k)!r}, model has {current[k]!r}"
             for k in _IDENTITY_FIELDS if saved.get(k) != current[k]]
    if not _same_unembedding(saved, info, model):
        diffs.append(f"unembed_hash: fitted on {saved.get('unembed_hash')!r}, model has {info.unembed_hash!r} "
                     "(different unembedding weights)")
    if diffs:
        raise ModelMismatchError(
            f"{what} were fitted on a different model ({saved.get('name')!r}) than {info.name!r}: "
            + "; ".join(diffs) + ". Refit them on this model (lensmat fit --model ...) or load the matching model."
        )

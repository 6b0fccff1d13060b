"""The few places where lensmat depends on how transformers and TransformerLens work inside.

Each assumption is named here once, and ``tests/test_dependencies.py`` checks every one on the
installed versions with a message that names the dependency and its version, so a release that
changes one fails loudly instead of giving wrong numbers.

- **The KV-cache keyword.** transformers 5.24 renamed the cache argument of the model, decoder
  layer and attention forwards from ``past_key_values`` to ``cache`` (the old name is still
  accepted, with a FutureWarning, until 5.40). TransformerLens 4.3's attention bridges read only
  ``past_key_values`` (or ``layer_past``) from their keyword arguments, so under transformers
  5.24 a cached forward through a bridge silently leaves the cache empty and every decoding
  step attends to itself alone. :func:`bridge_cache_shim` hands the cache on under both names.
- **The offline switch.** ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import, into a
  module constant; :func:`hub_offline` sets both, so a local load never waits on the network.
- **What a checkpoint filled.** ``from_pretrained(..., output_loading_info=True)`` reports missing,
  unexpected and misshapen keys, leaving tied weights and non-persistent buffers out;
  :func:`weights_problem` reads that report.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from importlib import metadata

import torch

CACHE_KWARGS = ("cache", "past_key_values")


def version(package: str) -> str:
    """The installed version of ``package`` (``"missing"`` when it is not installed)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def versions() -> str:
    """``transformers X, transformer-lens Y, torch Z``: for error messages and reports."""
    return ", ".join(f"{p} {version(p)}" for p in ("transformers", "transformer-lens", "torch"))


def cache_kwarg(module: torch.nn.Module) -> str:
    """The keyword under which ``module.forward`` takes its key/value cache: ``"cache"``
    (transformers ≥ 5.24) or ``"past_key_values"`` (earlier releases)."""
    params = inspect.signature(module.forward).parameters
    for name in CACHE_KWARGS:
        if name in params:
            return name
    raise RuntimeError(f"{type(module).__name__}.forward takes no key/value cache argument (looked for "
                       f"{' or '.join(CACHE_KWARGS)}) with {versions()}; lensmat's cached generation "
                       "needs one. Please report this with these versions.")


def _hand_on_cache(module, args, kwargs):
    cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    if cache is None:
        return None
    return args, {**kwargs, "cache": cache, "past_key_values": cache}


@contextlib.contextmanager
def bridge_cache_shim(model):
    """Within the block, every attention bridge of ``model`` receives the key/value cache under
    both ``cache`` and ``past_key_values`` (see the module docstring); the hooks are removed on exit."""
    handles = [block.attn.register_forward_pre_hook(_hand_on_cache, with_kwargs=True)
               for block in model.blocks if hasattr(block, "attn")]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def hub_offline():
    """Make Hugging Face libraries skip the network (local loads otherwise wait on time-outs)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        import huggingface_hub.constants as hub_constants

        saved_const = hub_constants.HF_HUB_OFFLINE
        hub_constants.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):  # pragma: no cover - very old huggingface_hub
        hub_constants = None
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_const


def weights_problem(model, info: dict, n: int = 5) -> str | None:
    """What keeps a checkpoint from filling ``model``'s architecture, from the loading info of
    ``from_pretrained(..., output_loading_info=True)``; None when it fills it. Transformers counts no tied
    weight (``lm_head.weight`` tied to the embeddings) nor non-persistent buffer as missing."""
    def first(keys) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")

    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    mismatched = [f"{k}: {tuple(theirs)} there, {tuple(ours)} expected" for k, theirs, ours in info["mismatched_keys"]]
    parts = []
    if missing:
        n_expected = len(model.state_dict())
        parts.append(f"none of its {n_expected} tensors is in the checkpoint (missing: {first(missing)})"
                     if len(missing) >= n_expected else
                     f"{len(missing)} of its {n_expected} tensors are not in the checkpoint and would be random "
                     f"(missing: {first(missing)})")
    if mismatched:
        parts.append(f"{len(mismatched)} would be random because the checkpoint's have another shape "
                     f"({first(mismatched)})")
    if unexpected:
        parts.append(f"the checkpoint holds {len(unexpected)} tensor{'s' * (len(unexpected) != 1)} it has no place "
                     f"for, which would be dropped (unexpected: {first(unexpected)})")
    if not parts:
        return None
    arch = type(model).__name__
    declared = list(getattr(model.config, "architectures", None) or [])
    if declared and declared != [arch]:
        arch += f" (config.json declares {', '.join(declared)})"
    return f"does not fill its architecture, {arch}: " + "; ".join(parts)

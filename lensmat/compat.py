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
"""

from __future__ import annotations

import contextlib
import inspect
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

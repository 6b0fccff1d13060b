"""Swap sub-modules for their fitted linear maps inside the live model, with hooks.

Sub-module kinds and the hook pair (input -> output) each replaces, per block ``l``:

===========  ==================================  ==================================
kind         input                               output
===========  ==================================  ==================================
``ln1``      ``blocks.{l}.hook_resid_pre``       ``blocks.{l}.ln1.hook_out``
``attn``     ``blocks.{l}.ln1.hook_out``         ``blocks.{l}.hook_attn_out``
``ln2``      ``blocks.{l}.hook_resid_mid``       ``blocks.{l}.ln2.hook_out``
``mlp``      ``blocks.{l}.ln2.hook_out``         ``blocks.{l}.hook_mlp_out``
``block``    ``blocks.{l}.hook_resid_pre``       ``blocks.{l}.hook_resid_post``
===========  ==================================  ==================================

Models with parallel attention and MLP (``cfg.parallel_attn_mlp``, e.g. GPT-J, Pythia) have
no ``hook_resid_mid``: there ``ln2`` reads ``hook_resid_pre`` instead (documented substitute).
Attention-only models have no ``ln2``/``mlp`` and asking for them is an error.

A swap is a list of ``(hook name, fn)`` pairs (:func:`swap_hooks`) that composes with
``run_with_hooks``, ``run_with_cache`` and your own hooks, or the :func:`swap` context manager.
The input hook records the live input; the output hook returns ``map(input)`` instead of the
module's output. The replaced module's own computation still runs (forward hooks can replace
its output but not skip it), so a swapped forward costs a full forward plus the maps.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

from lensmat.fit import MapSet

SUBMODULE_KINDS = ("ln1", "attn", "ln2", "mlp", "block")


def submodule_pair(model, kind: str, layer: int) -> tuple[str, str]:
    """``(input hook, output hook)`` of sub-module ``kind`` in block ``layer`` (0..L-1)."""
    n_blocks = int(model.cfg.n_layers)
    if kind not in SUBMODULE_KINDS:
        raise ValueError(f"Unknown sub-module kind {kind!r}; valid kinds: {', '.join(SUBMODULE_KINDS)}.")
    if not 0 <= layer < n_blocks:
        raise IndexError(f"Block {layer} is out of range: this model has blocks 0..{n_blocks - 1}.")
    p = f"blocks.{layer}"
    if kind in ("ln2", "mlp") and getattr(model.cfg, "attn_only", False):
        raise ValueError(f"This model is attention-only: it has no {kind}; use kinds ln1, attn or block.")
    mid = f"{p}.hook_resid_pre" if getattr(model.cfg, "parallel_attn_mlp", False) else f"{p}.hook_resid_mid"
    pair = {
        "ln1": (f"{p}.hook_resid_pre", f"{p}.ln1.hook_out"),
        "attn": (f"{p}.ln1.hook_out", f"{p}.hook_attn_out"),
        "ln2": (mid, f"{p}.ln2.hook_out"),
        "mlp": (f"{p}.ln2.hook_out", f"{p}.hook_mlp_out"),
        "block": (f"{p}.hook_resid_pre", f"{p}.hook_resid_post"),
    }[kind]
    missing = [h for h in pair if h not in model.hook_dict]
    if missing:
        raise ValueError(
            f"This model has no hook {missing[0]!r}, so the {kind} sub-module of block {layer} cannot be "
            f"fitted or swapped (its architecture differs from pre-norm GPT-2 style blocks); use kinds "
            f"{', '.join(k for k in SUBMODULE_KINDS if k != kind)}."
        )
    return pair


def expand_kinds(kinds: Iterable[str]) -> list[str]:
    """Kinds in block order; ``"ln"`` stands for ``ln1`` and ``ln2`` together."""
    wanted = set()
    for k in kinds:
        wanted |= {"ln1", "ln2"} if k == "ln" else {k}
    unknown = wanted - set(SUBMODULE_KINDS)
    if unknown:
        raise ValueError(f"Unknown sub-module kind(s) {sorted(unknown)}; valid: ln, {', '.join(SUBMODULE_KINDS)}.")
    return [k for k in SUBMODULE_KINDS if k in wanted]


def swap_hooks(model, maps: MapSet, kinds: Iterable[str] = ("attn",), layers: Iterable[int] | None = None) -> list:
    """Hooks that make the chosen sub-modules output their maps' predictions.

    Args:
        maps: sub-module maps (see :func:`lensmat.submodules.fit_submodule_maps`), checked
            against ``model``.
        kinds: among ``ln1, attn, ln2, mlp, block`` (``ln`` = both LayerNorms).
        layers: blocks to swap (default: all).

    Returns ``[(hook name, fn), ...]`` in forward order, for ``model.run_with_hooks(...,
    fwd_hooks=...)`` or ``model.hooks(...)``.
    """
    maps.check_model(model)
    kinds = expand_kinds(kinds)
    if "block" in kinds and len(kinds) > 1:
        raise ValueError("Swap 'block' alone: it already replaces everything inside the block.")
    blocks = range(int(model.cfg.n_layers)) if layers is None else sorted(set(layers))
    device, dtype = model.W_U.device, model.W_U.dtype
    hooks = []
    for layer in blocks:
        for kind in kinds:
            src, tgt = submodule_pair(model, kind, layer)
            linear = maps.get(src, tgt).to(device, dtype)
            slot: dict = {}

            def save(act, hook, slot=slot):
                slot["x"] = act

            def replace(act, hook, slot=slot, linear=linear):
                return linear(slot.pop("x")).to(act.dtype)

            hooks += [(src, save), (tgt, replace)]
    return hooks


@contextlib.contextmanager
def swap(model, maps: MapSet, kinds: Iterable[str] = ("attn",), layers: Iterable[int] | None = None):
    """Within the block, the chosen sub-modules of ``model`` output their linear maps.

    Example::

        with lensmat.swap(model, maps, kinds={"attn"}, layers=range(5, 8)):
            logits = model(tokens)

    The hooks are removed on exit, also after an exception; hooks you added before stay.
    """
    with model.hooks(fwd_hooks=swap_hooks(model, maps, kinds, layers)):
        yield model

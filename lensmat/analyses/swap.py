"""Swap sub-modules for their fitted linear maps inside the live model, with hooks.

Sub-module kinds and the hook pair (input -> output) each replaces in block ``l`` depend on the
block's layout (:func:`block_layout`); the pairs are :data:`_PAIRS`, written without ``blocks.{l}.``:

- ``pre-norm`` (GPT-2, GPT-Neo, OPT, BLOOM, Llama, Mistral, Mixtral, Qwen, Gemma, Phi-3, StableLM,
  OLMo): ``ln1`` ``hook_resid_pre -> ln1.hook_out``, ``attn`` ``ln1.hook_out -> hook_attn_out``,
  ``ln2`` ``hook_resid_mid -> ln2.hook_out``, ``mlp`` ``ln2.hook_out -> hook_mlp_out``.
- ``sandwich`` (a norm before and after each sub-layer: Gemma 2, Gemma 3): as pre-norm, but
  ``attn`` and ``mlp`` end at ``attn.hook_out`` / ``mlp.hook_out``, before their output norms
  (``ln1_post``, ``ln2_post``), which stay exact in every kind but ``block``.
- ``parallel`` (attention and MLP both read ``h_l``; no ``hook_resid_mid``): as pre-norm, with
  ``ln2`` reading ``hook_resid_pre`` (GPT-NeoX / Pythia).
- ``parallel-one-norm`` (the same with one norm per block: GPT-J, Phi, Falcon): no ``ln2``, and
  ``mlp`` reads ``ln1.hook_out``.
- ``post-norm`` (LayerNorm after each residual add: BERT, RoBERTa): ``ln1`` ``ln1.hook_in ->
  ln1.hook_out``, ``attn`` ``hook_resid_pre -> attn.o.hook_out`` (before the residual add),
  ``ln2`` ``hook_resid_mid -> ln2.hook_out``, ``mlp`` ``ln1.hook_out -> hook_mlp_out``.
- ``post-sublayer-norm`` (a norm after each sub-layer and none before it: OLMo 2):
  ``attn`` ``hook_resid_pre -> attn.hook_out``, ``ln1`` ``attn.hook_out -> ln1_post.hook_out``,
  ``mlp`` ``hook_resid_mid -> mlp.hook_out``, ``ln2`` ``mlp.hook_out -> ln2_post.hook_out``.
- ``block`` is ``hook_resid_pre -> hook_resid_post`` in every layout.

A kind a family lacks (``ln2`` with one norm per block; ``ln2``/``mlp`` in attention-only models)
is an error naming the kinds it has (:func:`model_kinds`). ``tests/test_architectures.py`` checks
every pair of every family: the output is a function of the input alone, and the model reads it.

A swap is a list of ``(hook name, fn)`` pairs (:func:`swap_hooks`) that composes with
``run_with_hooks``, ``run_with_cache`` and your own hooks, or the :func:`swap` context manager.
The input hook records the live input; the output hook returns ``map(input)`` instead of the
module's output. The replaced module's own computation still runs (forward hooks can replace
its output but not skip it), so a swapped forward costs a full forward plus the maps.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

from lensmat.deprecation import renamed
from lensmat.stats.fit import MapSet

SUBMODULE_KINDS = ("ln1", "attn", "ln2", "mlp", "block")
LAYOUTS = ("pre-norm", "parallel", "parallel-one-norm", "sandwich", "post-norm", "post-sublayer-norm")
POST_NORM = frozenset({"BertForMaskedLM", "RobertaForMaskedLM"})  # cfg.architecture of post-LN encoders
_PAIRS = {  # layout: kind: (input, output) hook suffixes
    "pre-norm": {"ln1": ("hook_resid_pre", "ln1.hook_out"), "attn": ("ln1.hook_out", "hook_attn_out"),
                 "ln2": ("hook_resid_mid", "ln2.hook_out"), "mlp": ("ln2.hook_out", "hook_mlp_out")},
    "parallel": {"ln1": ("hook_resid_pre", "ln1.hook_out"), "attn": ("ln1.hook_out", "hook_attn_out"),
                 "ln2": ("hook_resid_pre", "ln2.hook_out"), "mlp": ("ln2.hook_out", "hook_mlp_out")},
    "parallel-one-norm": {"ln1": ("hook_resid_pre", "ln1.hook_out"), "attn": ("ln1.hook_out", "hook_attn_out"),
                          "mlp": ("ln1.hook_out", "hook_mlp_out")},
    "sandwich": {"ln1": ("hook_resid_pre", "ln1.hook_out"), "attn": ("ln1.hook_out", "attn.hook_out"),
                 "ln2": ("hook_resid_mid", "ln2.hook_out"), "mlp": ("ln2.hook_out", "mlp.hook_out")},
    "post-norm": {"ln1": ("ln1.hook_in", "ln1.hook_out"), "attn": ("hook_resid_pre", "attn.o.hook_out"),
                  "ln2": ("hook_resid_mid", "ln2.hook_out"), "mlp": ("ln1.hook_out", "hook_mlp_out")},
    "post-sublayer-norm": {"ln1": ("attn.hook_out", "ln1_post.hook_out"), "attn": ("hook_resid_pre", "attn.hook_out"),
                           "ln2": ("mlp.hook_out", "ln2_post.hook_out"), "mlp": ("hook_resid_mid", "mlp.hook_out")},
}


def block_layout(model) -> str:
    """How a block wires its norms and sub-layers: one of :data:`LAYOUTS` (see the module docstring),
    from the Hugging Face architecture name (``cfg.architecture``: BERT, RoBERTa), the bridge's
    norm hooks (``ln1_post``, ``ln2``) and ``cfg.parallel_attn_mlp``."""
    if getattr(model.cfg, "architecture", None) in POST_NORM:
        return "post-norm"
    if "blocks.0.ln1_post.hook_out" in model.hook_dict:
        return "sandwich" if "blocks.0.ln1.hook_out" in model.hook_dict else "post-sublayer-norm"
    if not getattr(model.cfg, "parallel_attn_mlp", False):
        return "pre-norm"
    return "parallel" if "blocks.0.ln2.hook_out" in model.hook_dict else "parallel-one-norm"


def model_kinds(model) -> tuple[str, ...]:
    """The sub-module kinds this model has, in block order: those of its layout, without ``ln2`` and
    ``mlp`` in an attention-only model."""
    kinds = set(_PAIRS[block_layout(model)]) | {"block"}
    if getattr(model.cfg, "attn_only", False):
        kinds -= {"ln2", "mlp"}
    return tuple(k for k in SUBMODULE_KINDS if k in kinds)


def submodule_pair(model, kind: str, layer: int) -> tuple[str, str]:
    """``(input hook, output hook)`` of sub-module ``kind`` in block ``layer`` (0..L-1), for the
    model's :func:`block_layout`."""
    n_blocks = int(model.cfg.n_layers)
    if kind not in SUBMODULE_KINDS:
        raise ValueError(f"Unknown sub-module kind {kind!r}; valid kinds: {', '.join(SUBMODULE_KINDS)}.")
    if not 0 <= layer < n_blocks:
        raise IndexError(f"Block {layer} is out of range: this model has blocks 0..{n_blocks - 1}.")
    layout, kinds = block_layout(model), model_kinds(model)
    if kind not in kinds:
        why = ("it is attention-only" if getattr(model.cfg, "attn_only", False)
               else "its attention and MLP read the same norm (ln1.hook_out) in parallel")
        raise ValueError(f"{model.cfg.model_name} has no {kind} sub-module: {why}. Its kinds: {', '.join(kinds)}.")
    src, tgt = ("hook_resid_pre", "hook_resid_post") if kind == "block" else _PAIRS[layout][kind]
    pair = (f"blocks.{layer}.{src}", f"blocks.{layer}.{tgt}")
    missing = [h for h in pair if h not in model.hook_dict]
    if missing:
        raise ValueError(
            f"{model.cfg.model_name} has no hook {missing[0]!r}, so the {kind} sub-module of block {layer} cannot "
            f"be fitted or swapped (its blocks differ from the {layout} layout lensmat assumed from "
            f"cfg.architecture={getattr(model.cfg, 'architecture', None)!r}); use kinds "
            f"{', '.join(k for k in kinds if k != kind)}."
        )
    return pair


def expand_kinds(kinds: Iterable[str], model=None) -> list[str]:
    """Kinds in block order; ``"ln"`` stands for ``ln1`` and ``ln2`` together (only the norms the
    ``model`` has, when given: ``ln1`` alone with one norm per block)."""
    norms = {"ln1", "ln2"} if model is None else {"ln1", "ln2"} & set(model_kinds(model))
    wanted = set()
    for k in kinds:
        wanted |= norms if k == "ln" else {k}
    unknown = wanted - set(SUBMODULE_KINDS)
    if unknown:
        raise ValueError(f"Unknown sub-module kind(s) {sorted(unknown)}; valid: ln, {', '.join(SUBMODULE_KINDS)}.")
    return [k for k in SUBMODULE_KINDS if k in wanted]


@renamed(layers="blocks")
def swap_hooks(model, maps: MapSet, kinds: Iterable[str] = ("attn",), blocks: Iterable[int] | None = None) -> list:
    """Hooks that make the chosen sub-modules output their maps' predictions.

    Args:
        maps: sub-module maps (see :func:`lensmat.analyses.submodules.fit_submodule_maps`), checked
            against ``model``.
        kinds: among ``ln1, attn, ln2, mlp, block`` (``ln`` = both LayerNorms).
        blocks: block indices ``0..L-1`` to swap (default: all); ``layers=`` is the old name (a
            layer is a residual layer ``0..L`` everywhere else in lensmat).

    Returns ``[(hook name, fn), ...]`` in forward order, for ``model.run_with_hooks(...,
    fwd_hooks=...)`` or ``model.hooks(...)``.
    """
    maps.check_model(model)
    kinds = expand_kinds(kinds, model)
    if "block" in kinds and len(kinds) > 1:
        raise ValueError("Swap 'block' alone: it already replaces everything inside the block.")
    blocks = range(int(model.cfg.n_layers)) if blocks is None else sorted(set(blocks))
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


@renamed(layers="blocks")
@contextlib.contextmanager
def swap(model, maps: MapSet, kinds: Iterable[str] = ("attn",), blocks: Iterable[int] | None = None):
    """Within the block, the chosen sub-modules of ``model`` (in ``blocks``, default all; see
    :func:`swap_hooks`) output their linear maps.

    Example::

        with lensmat.swap(model, maps, kinds={"attn"}, blocks=range(5, 8)):
            logits = model(tokens)

    The hooks are removed on exit, also after an exception; hooks you added before stay.
    """
    with model.hooks(fwd_hooks=swap_hooks(model, maps, kinds, blocks)):
        yield model

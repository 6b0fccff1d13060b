"""Lenses: read residual layer ``l`` (0..L) as next-token logits.

Layer convention: residual layer ``l = 0..L`` is ``h_l``, the input of block ``l``
(``blocks.{l}.hook_resid_pre``; ``h_0`` = the embeddings) and ``h_L`` the output of the last block
(``blocks.{L-1}.hook_resid_post``), before the final norm. This is Hugging Face's
``hidden_states[l]`` for ``l < L``, the tuned-lens package's layer index, and the index
TransformerLens's ``logit_lens`` passes to its ``lens=`` callable (``incl_mid=False``).

Every lens is a :class:`Lens`, a ``torch.nn.Module`` with the tuned-lens package's interface:
``transform_hidden(h, layer)`` moves ``h_l`` (``[..., d_model]``) into the basis of ``h_L`` and
``lens(h, layer)`` (``forward``) reads the result as logits ``[..., d_vocab]`` through the model's
own final norm and unembedding (TransformerLens's ``logit_readout``: the norm is recomputed on the
vector itself, never a cached scale from another layer; logits are produced in row chunks). For a
masked LM (BERT family) the readout is the model's own masked-LM head
(:func:`~lensmat.models.bridge.mlm_head`: dense → activation → LayerNorm → decoder) and the logits
predict the token at the position itself; the logit lens is then the paper's ``id`` baseline.
Gradients flow through a lens (to ``h`` and to its own parameters); evaluation code disables them
(``torch.no_grad()`` / ``torch.inference_mode()``).

- :class:`LogitLens`: ``transform_hidden`` is the identity (nostalgebraist's logit lens).
- :class:`MatLens`: ``transform_hidden(h, l) = h @ A_{l→L} (+ b)``, the least-squares map of
  "Jump to Conclusions" (Yom Din et al., 2023); exactly the identity at ``l = L``.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from jaxtyping import Float, Int

from lensmat.stats.collect import check_layer, check_site, resid_hook, site_hooks
from lensmat.stats.fit import LinearMap, MapSet
from lensmat.lenses import engine
from lensmat.lenses.engine import readout
from lensmat.models import input_device, model_device


class Lens(torch.nn.Module):
    """Turns residual activations at layer ``l`` (0..L) into logits; a ``torch.nn.Module``.

    Subclasses define ``transform_hidden(h, layer)`` (``[..., d_model] -> [..., d_model]``, in
    ``h_L``'s basis); ``forward(h, layer)`` (``lens(h, layer)``) adds the model's readout. A subclass
    written before ``transform_hidden`` existed, defining ``transform`` instead, still works (``transform`` is a
    deprecated alias of ``transform_hidden``).

    The wrapped model (``lens.model``, a TransformerBridge) is *not* a submodule: it is stored
    outside ``nn.Module``'s registry, so its weights are not in ``lens.state_dict()`` or
    ``lens.parameters()``, and ``lens.to(device)`` moves only the lens's own tensors (its
    parameters and buffers), never the model. Inputs are moved to the model's device on the way in.
    """

    name: str = "lens"
    readout_chunk: int = 1024  # rows per unembedding chunk: [chunk, vocab] at a time
    site: str = "post"  # the residual site it reads: "post" (layers 0..L) or "mid" (blocks 0..L-1)

    def __init__(self, model) -> None:
        super().__init__()
        if type(self).transform_hidden is Lens.transform_hidden and type(self).transform is Lens.transform:
            raise TypeError(f"{type(self).__name__} must define transform_hidden(h, layer) (the lens's translation "
                            "of h_l into h_L's basis).")
        self.model = model

    def __setattr__(self, name: str, value) -> None:
        if name == "model":  # the bridge stays out of the module tree: not in state_dict(), not moved by .to()
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    def covers(self, layer: int) -> bool:
        """Whether the lens is defined at layer ``layer`` of its site (all unless overridden)."""
        check_layer(layer, self.n_layers)
        return self.site == "post" or layer < self.n_layers

    def transform_hidden(self, h: Float[torch.Tensor, "... d_model"], layer: int) -> Float[torch.Tensor, "... d_model"]:
        """``h_l`` (residual layer ``layer`` of the lens's site) mapped to the last residual layer
        ``h_L``'s basis (before the final norm). Subclasses override this."""
        return type(self).transform(self, h, layer)  # only reached by a subclass that defines transform itself

    def transform(self, h: Float[torch.Tensor, "... d_model"], layer: int) -> Float[torch.Tensor, "... d_model"]:
        """Deprecated alias of :meth:`transform_hidden`."""
        warnings.warn("Lens.transform is deprecated; call transform_hidden.", DeprecationWarning, stacklevel=2)
        return self.transform_hidden(h, layer)

    def forward(self, h: Float[torch.Tensor, "... d_model"], layer: int) -> Float[torch.Tensor, "... d_vocab"]:
        """Logits ``[..., d_vocab]`` of residual activations ``h`` (``[..., d_model]``) taken at layer
        ``layer`` (0..L) of the lens's site, on the model's device; differentiable unless the caller
        disables gradients."""
        layer = check_layer(layer, self.n_layers)
        h = h.to(model_device(self.model))  # a no-op unless the model is split across devices
        return readout(self.model, self.transform_hidden(h, layer), self.readout_chunk)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n_layers={self.n_layers}, site={self.site!r}"


def tl_translator(lens: Lens):
    """``lens`` as the ``lens=`` translator of TransformerLens's ``logit_lens`` (``f(entry, index) -> entry``).

    With ``incl_mid=False`` (its default) ``logit_lens`` passes the stack index ``0..L`` of
    ``[resid_pre_0, …, resid_pre_{L-1}, resid_post_{L-1}]``, which is lensmat's residual layer, so
    the translator is ``lens.transform_hidden`` itself; this adapter checks that the lens reads the
    ``post`` site (a ``mid`` lens has no counterpart in that stack). Use ``incl_mid=False``.
    """
    if lens.site != "post":
        raise ValueError(f"logit_lens's stack holds the residual layers 0..L; the {lens.name!r} lens reads the "
                         f"{lens.site!r} site. Pass a post-site lens.")
    return lens.transform_hidden


class LogitLens(Lens):
    """The logit lens: the final norm and unembedding applied to ``h_l`` itself; ``site="mid"``
    reads ``blocks.{l}.hook_resid_mid`` instead (TransformerLens's ``logit_lens(incl_mid=True)``)."""

    name = "logit"

    def __init__(self, model, site: str = "post") -> None:
        super().__init__(model)
        self.site = check_site(site)

    def transform_hidden(self, h, layer):
        return h


class MatLens(Lens):
    """The mat lens: the logit lens applied to ``h_l @ A_{l→L} (+ b)``.

    ``maps`` must hold the residual maps ``h_l -> h_L`` for every layer it is asked about
    (see :func:`lensmat.stats.fit.fit_layer_maps`); it is checked against the model on construction.
    ``site="mid"`` reads ``blocks.{l}.hook_resid_mid`` through the maps ``resid_mid_l -> h_L``
    (fitted with ``sites=("post", "mid")``), for blocks ``l = 0..L-1``.

    The maps the lens reads are its buffers ``W_{l}`` (``[d, d]``) and, with an intercept,
    ``b_{l}`` (``[d]``), so ``.to()``, ``state_dict()`` and ``load_state_dict()`` act on them. They
    share memory with ``maps`` (no copy; ``load_state_dict`` writes into them in place);
    ``lens.maps`` is the map set with the lens's current buffers in place of its maps.
    """

    def __init__(self, model, maps: MapSet, name: str | None = None, site: str = "post") -> None:
        super().__init__(model)
        maps.check_model(model)
        self.name = name or ("mat-affine" if maps.intercept else "mat")
        self.site = check_site(site)
        self._mapset = maps
        target = resid_hook(self.n_layers)
        for layer, source in enumerate(site_hooks(self.n_layers, self.site)[: self.n_layers]):
            m = maps.maps.get((source, target))
            if m is not None:
                self.register_buffer(f"W_{layer}", m.W)
                if m.b is not None:
                    self.register_buffer(f"b_{layer}", m.b)

    @property
    def maps(self) -> MapSet:
        """The map set the lens was built from, its maps ``h_l -> h_L`` replaced by the lens's buffers."""
        target, current = resid_hook(self.n_layers), dict(self._mapset.maps)
        for layer, source in enumerate(site_hooks(self.n_layers, self.site)[: self.n_layers]):
            if hasattr(self, f"W_{layer}"):
                current[(source, target)] = LinearMap(getattr(self, f"W_{layer}"), getattr(self, f"b_{layer}", None),
                                                      source, target)
        return dataclasses.replace(self._mapset, maps=current)

    def transform_hidden(self, h, layer):
        layer = check_layer(layer, self.n_layers)
        if self.site == "post" and layer == self.n_layers:
            return h
        if not self.covers(layer):
            raise IndexError(f"Site {self.site!r} has blocks 0..{self.n_layers - 1}; layer {layer} is not one of them.")
        if not hasattr(self, f"W_{layer}"):
            self._mapset.get(site_hooks(self.n_layers, self.site)[layer], resid_hook(self.n_layers))  # raises, naming it
        y = h @ getattr(self, f"W_{layer}").to(h.device, h.dtype)
        b = getattr(self, f"b_{layer}", None)
        return y if b is None else y + b.to(h.device, h.dtype)


def encode_text(model, text: str) -> Int[torch.Tensor, "1 pos"]:
    """One text as the model reads it, on its input device: BOS + text (causal), ``[CLS] text [SEP]``
    (masked LM). Refuses an empty text and one longer than the model's context ``n_ctx`` (instead of
    cutting it)."""
    from lensmat.stats.pipeline import encode

    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"The text is empty ({text!r}); pass at least one word to read.")
    ids = encode(model, [text], 1 << 30)[0]  # no truncation: checked against n_ctx below
    n_ctx = int(model.cfg.n_ctx)
    if len(ids) > n_ctx:
        raise ValueError(f"The text is {len(ids)} tokens long (special tokens included), longer than the model's "
                         f"context of {n_ctx} tokens; shorten it.")
    return torch.tensor([ids]).to(input_device(model))


def read_point(name: str, n_layers: int) -> str:
    """Where a forward is read for the residual hook ``name``: ``h_l`` for ``1 ≤ l < L``
    (``blocks.{l-1}.hook_resid_post``, :func:`~lensmat.stats.collect.resid_hook`) at the input of block
    ``l``, ``blocks.{l}.hook_resid_pre``. In a plain forward the two are the same tensor; under a hook
    that replaces either, the block's input is the state the rest of the model reads, so lenses read it
    there. Every other hook is read where it is."""
    prefix, _, last = name.rpartition(".hook_resid_post")
    if last or not prefix.startswith("blocks."):
        return name
    block = prefix[len("blocks."):]
    return f"blocks.{int(block) + 1}.hook_resid_pre" if block.isdigit() and int(block) + 1 < n_layers else name


def lens_hooks(model, lenses: dict[str, Lens]) -> list[str]:
    """The hook names a forward must give to read every lens in ``lenses`` at every layer of its
    site, and ``h_L`` (the model's own output), sorted."""
    n_layers = int(model.cfg.n_layers)
    return sorted({h for lens in lenses.values() for h in site_hooks(n_layers, lens.site)} | {resid_hook(n_layers)})


def check_hook_names(model, hooks) -> None:
    """Refuse ``hooks`` (``[(hook name, fn)]``) naming a hook the model does not have."""
    unknown = [name for name, _ in hooks if isinstance(name, str) and name not in model.hook_dict]
    if unknown:
        raise ValueError(f"The model has no hook {unknown[0]!r}; its hook names are in model.hook_dict "
                         "(e.g. blocks.0.hook_resid_post).")


@torch.no_grad()
def capture_layers(model, names, ids: Int[torch.Tensor, "1 pos"], hooks=None, fired: list | None = None):
    """One forward of ``ids`` (one sequence) with ``hooks`` (``[(hook name, fn)]``, as TransformerLens's
    ``run_with_hooks``) active; returns ``(logits [pos, d_vocab], {name: [pos, d]})`` for the hook
    names ``names``, read after the hooks (:func:`read_point`). ``fired``: a list that receives, per
    hook, how many times it ran. A hook name the model does not have is refused."""
    hooks = list(hooks or [])
    check_hook_names(model, hooks)
    n_layers = int(model.cfg.n_layers)
    points = {name: read_point(name, n_layers) for name in names}
    captured: dict[str, torch.Tensor] = {}
    counts = [0] * len(hooks)

    def keep(point):
        def capture(act, hook=None):
            captured[point] = act
        return capture

    def counted(i, fn):
        def run(act, hook=None, **kwargs):
            counts[i] += 1
            return fn(act, hook=hook, **kwargs)
        return run

    fwd = [(name, counted(i, fn)) for i, (name, fn) in enumerate(hooks)]
    fwd += [(point, keep(point)) for point in dict.fromkeys(points.values())]
    logits = model.run_with_hooks(ids, fwd_hooks=fwd, return_type="logits")
    if fired is not None:
        fired[:] = counts
    return logits[0], {name: captured[point][0] for name, point in points.items()}


@torch.no_grad()
def read_layers(model, lenses: dict[str, Lens], ids: Int[torch.Tensor, "1 pos"], *, k: int = 5,
                pick: Int[torch.Tensor, "pos m"] | None = None, rank: bool = False, entropy: bool = False,
                hooks=None, cache: dict | None = None, reference: Float[torch.Tensor, "pos d_model"] | None = None):
    """One forward of ``ids`` (one sequence) and every lens's reading of every layer 0..L of its site,
    in one pass of the readout engine (:func:`lensmat.lenses.engine.read`, top-``k`` per cell).

    Returns ``(final, cells)``: ``final``, the model's own :class:`~lensmat.lenses.engine.Readout` at each
    position (tensors ``[pos, ...]``), and ``cells``, a list of ``(lens name, layer, covered, readout)``,
    lens by lens, layers 0..L, each ``readout`` one group (``[pos, ...]``) with ``kl`` against the model.
    ``picked`` holds the model's final top-1 token first, then the columns of ``pick``. Where a lens
    does not cover a layer (``covered`` False, e.g. the J-lens at ``L``, a ``mid``-site lens at ``L``)
    the cell is the model's own output (KL 0).

    ``hooks``: ``[(hook name, fn)]`` active during the forward (TransformerLens's ``run_with_hooks``):
    the lenses read the activations as the hooks left them (:func:`capture_layers`). ``cache``: the
    activations of a forward already run (``capture_layers``'s dict, holding every site hook of the
    lenses and ``h_L``) instead of running one. ``reference``: ``h_L`` (``[pos, d_model]``) of another
    forward of the same ids (a clean run) to score against: ``final``, the first picked column and every
    cell's ``kl`` are then that forward's.
    """
    n_layers = int(model.cfg.n_layers)
    hooks_of = {name: site_hooks(n_layers, lens.site) for name, lens in lenses.items()}
    last = resid_hook(n_layers)
    if cache is None:
        cache = capture_layers(model, lens_hooks(model, lenses), ids, hooks)[1]
    unembedding, device = engine.Unembedding(model), model_device(model)
    h_last = (cache[last] if reference is None else reference).to(device)
    options = dict(k=k, k_ref=k, rank=rank, entropy=entropy)
    final_top1 = engine.read(unembedding, h_last[None], k=1).top_ids[0]  # [pos, 1]
    pick = final_top1 if pick is None else torch.cat([final_top1, pick.to(device)], -1)
    where = [(name, layer) for name, lens in lenses.items() for layer in range(n_layers + 1) if lens.covers(layer)]
    rows = [lenses[name].transform_hidden(cache[hooks_of[name][layer]].to(device), layer) for name, layer in where]
    if rows:
        read = engine.read(unembedding, torch.stack(rows), h_last, pick=pick, **options)
        final = read.ref
    else:
        read, final = None, engine.read(unembedding, h_last[None], pick=pick, **options).group(0)
    final.kl = torch.zeros_like(final.lse)
    groups = {cell: read.group(j) for j, cell in enumerate(where)}
    return final, [(name, layer, (name, layer) in groups, groups.get((name, layer), final))
                   for name in lenses for layer in range(n_layers + 1)]


def top_predictions(model, lenses: dict[str, Lens], text: str, k: int = 5) -> dict:
    """Top-``k`` next-token predictions of every lens at every layer, for one text (BOS prepended;
    for a masked LM: predictions of the token at each position of ``[CLS] text [SEP]``, where
    ``text`` may hold ``[MASK]`` tokens). The same readout as :func:`lensmat.analyses.trajectory.trajectory`, whose
    :class:`~lensmat.analyses.trajectory.Trajectory` adds per-cell statistics, a table and a heatmap.

    Returns ``{"tokens": [str], "lenses": {name: {"ids": [L+1, pos, k], "probs": [L+1, pos, k]}}}``
    where ``pos`` counts the BOS; a lens that does not cover a layer (e.g. tuned at ``L``) shows
    the model's own output there.
    """
    ids = encode_text(model, text)
    _, cells = read_layers(model, lenses, ids, k=k)
    rows: dict[str, list] = {name: [] for name in lenses}
    for name, _, _, cell in cells:
        rows[name].append(cell)
    out = {name: {"ids": torch.stack([r.top_ids for r in rs]).cpu(),
                  "probs": torch.stack([r.top_probs for r in rs]).cpu()} for name, rs in rows.items()}
    return {"tokens": [model.tokenizer.decode([t]) for t in ids[0].tolist()], "lenses": out}


def predictions_table(model, predictions: dict, lens: str, position: int):
    """A pandas table of one lens's top-k at one position: one row per layer, cells ``token (p)``."""
    import pandas as pd

    p = predictions["lenses"][lens]
    rows = {f"layer {layer}": [f"{model.tokenizer.decode([int(i)])!r} ({float(q):.2f})"
                               for i, q in zip(p["ids"][layer, position], p["probs"][layer, position])]
            for layer in range(p["ids"].shape[0])}
    return pd.DataFrame.from_dict(rows, orient="index", columns=[f"top-{j + 1}" for j in range(p["ids"].shape[2])])

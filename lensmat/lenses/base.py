"""Lenses: read residual layer ``l`` (0..L) as next-token logits.

Every lens implements one interface, :class:`Lens`: ``transform(h, layer)`` moves ``h_l`` into
the basis of the last residual layer ``h_L`` and ``lens(h, layer)`` reads the result through
the model's own final norm and unembedding (TransformerLens's ``logit_readout``: the norm is
recomputed on the vector itself, never a cached scale from another layer; logits are produced
in row chunks). For a masked LM (BERT family) the readout is the model's own masked-LM head
(:func:`~lensmat.models.bridge.mlm_head`: dense → activation → LayerNorm → decoder) and the logits
predict the token at the position itself; the logit lens is then the paper's ``id`` baseline.

- :class:`LogitLens`: ``transform`` is the identity (nostalgebraist's logit lens).
- :class:`MatLens`: ``transform(h, l) = h @ A_{l→L} (+ b)``, the least-squares map of
  "Jump to Conclusions" (Yom Din et al., 2023); exactly the identity at ``l = L``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from jaxtyping import Float, Int

from lensmat.stats.collect import check_layer, check_site, resid_hook, site_hooks
from lensmat.stats.fit import MapSet
from lensmat.models import input_device, is_masked_lm, mlm_head, model_device


class Lens(ABC):
    """Turns residual activations at layer ``l`` into logits. Subclasses define ``transform``."""

    name: str = "lens"
    readout_chunk: int = 1024  # rows per unembedding chunk: [chunk, vocab] at a time
    site: str = "post"  # the residual site it reads: "post" (layers 0..L) or "mid" (blocks 0..L-1)

    def __init__(self, model) -> None:
        self.model = model

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    def covers(self, layer: int) -> bool:
        """Whether the lens is defined at layer ``layer`` of its site (all unless overridden)."""
        check_layer(layer, self.n_layers)
        return self.site == "post" or layer < self.n_layers

    @abstractmethod
    def transform(self, h: Float[torch.Tensor, "... d_model"], layer: int) -> Float[torch.Tensor, "... d_model"]:
        """``h_l`` mapped to the final residual layer's basis (before the final norm)."""

    def __call__(self, h: Float[torch.Tensor, "... d_model"], layer: int) -> Float[torch.Tensor, "... d_vocab"]:
        """Logits (``[..., d_vocab]``) of residual activations ``h`` taken at layer ``layer`` (0..L)."""
        layer = check_layer(layer, self.n_layers)
        h = h.to(model_device(self.model))  # a no-op unless the model is split across devices
        with torch.no_grad():
            return readout(self.model, self.transform(h, layer), self.readout_chunk)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_layers={self.n_layers})"


def readout(model, h: Float[torch.Tensor, "... d_model"], chunk_size: int = 1024) -> Float[torch.Tensor, "... d_vocab"]:
    """The model's own prediction from a last-layer residual vector: final norm and unembedding
    (``logit_readout``), or the masked-LM head for a masked LM; ``chunk_size`` rows at a time."""
    if not is_masked_lm(model):
        from transformer_lens.tools.analysis.logit_lens import logit_readout

        return logit_readout(model, h, return_type="logits", chunk_size=chunk_size).values
    head, rows = mlm_head(model), h.reshape(-1, h.shape[-1])
    out = torch.cat([head(rows[i: i + chunk_size]) for i in range(0, rows.shape[0], chunk_size)])
    return out.reshape(*h.shape[:-1], out.shape[-1])


class LogitLens(Lens):
    """The logit lens: the final norm and unembedding applied to ``h_l`` itself; ``site="mid"``
    reads ``blocks.{l}.hook_resid_mid`` instead (TransformerLens's ``logit_lens(incl_mid=True)``)."""

    name = "logit"

    def __init__(self, model, site: str = "post") -> None:
        super().__init__(model)
        self.site = check_site(site)

    def transform(self, h, layer):
        return h


class MatLens(Lens):
    """The mat lens: the logit lens applied to ``h_l @ A_{l→L} (+ b)``.

    ``maps`` must hold the residual maps ``h_l -> h_L`` for every layer it is asked about
    (see :func:`lensmat.stats.fit.fit_layer_maps`); it is checked against the model on construction.
    ``site="mid"`` reads ``blocks.{l}.hook_resid_mid`` through the maps ``resid_mid_l -> h_L``
    (fitted with ``sites=("post", "mid")``), for blocks ``l = 0..L-1``.
    """

    def __init__(self, model, maps: MapSet, name: str | None = None, site: str = "post") -> None:
        super().__init__(model)
        maps.check_model(model)
        self.maps = maps
        self.name = name or ("mat-affine" if maps.intercept else "mat")
        self.site = check_site(site)

    def transform(self, h, layer):
        layer = check_layer(layer, self.n_layers)
        if self.site == "post" and layer == self.n_layers:
            return h
        if not self.covers(layer):
            raise IndexError(f"Site {self.site!r} has blocks 0..{self.n_layers - 1}; layer {layer} is not one of them.")
        source = site_hooks(self.n_layers, self.site)[layer]
        return self.maps.get(source, resid_hook(self.n_layers))(h)


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


@torch.no_grad()
def layer_logits(model, lenses: dict[str, Lens], ids: Int[torch.Tensor, "1 pos"]):
    """One forward of ``ids`` (one sequence) and every lens's readout of every layer 0..L of its site.

    Returns ``(logits, readouts)``: the model's own logits ``[pos, d_vocab]`` and an iterator over
    ``(lens name, layer, covered, logits [pos, d_vocab])``, lens by lens, layers 0..L, computed one
    ``[pos, d_vocab]`` at a time; where a lens does not cover a layer (``covered`` False, e.g. the
    J-lens at ``L``, a ``mid``-site lens at ``L``) the logits are the model's own output.
    """
    n_layers = int(model.cfg.n_layers)
    hooks = {name: site_hooks(n_layers, lens.site) for name, lens in lenses.items()}
    wanted = {h for hs in hooks.values() for h in hs}
    logits, cache = model.run_with_cache(ids, names_filter=lambda name: name in wanted)

    @torch.no_grad()
    def readouts():
        for name, lens in lenses.items():
            for layer in range(n_layers + 1):
                covered = lens.covers(layer)
                yield name, layer, covered, (lens(cache[hooks[name][layer]][0], layer) if covered else logits[0])

    return logits[0], readouts()


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
    _, readouts = layer_logits(model, lenses, ids)
    rows: dict[str, list] = {name: [] for name in lenses}
    for name, _, _, logits in readouts:
        rows[name].append(torch.softmax(logits.float(), -1).topk(k))
    out = {name: {"ids": torch.stack([r.indices for r in rs]).cpu(), "probs": torch.stack([r.values for r in rs]).cpu()}
           for name, rs in rows.items()}
    return {"tokens": [model.tokenizer.decode([t]) for t in ids[0].tolist()], "lenses": out}


def predictions_table(model, predictions: dict, lens: str, position: int):
    """A pandas table of one lens's top-k at one position: one row per layer, cells ``token (p)``."""
    import pandas as pd

    p = predictions["lenses"][lens]
    rows = {f"layer {layer}": [f"{model.tokenizer.decode([int(i)])!r} ({float(q):.2f})"
                               for i, q in zip(p["ids"][layer, position], p["probs"][layer, position])]
            for layer in range(p["ids"].shape[0])}
    return pd.DataFrame.from_dict(rows, orient="index", columns=[f"top-{j + 1}" for j in range(p["ids"].shape[2])])

"""Lenses: read residual layer ``l`` (0..L) as next-token logits.

Every lens implements one interface, :class:`Lens`: ``transform(h, layer)`` moves ``h_l`` into
the basis of the last residual layer ``h_L`` and ``lens(h, layer)`` reads the result through
the model's own final norm and unembedding (TransformerLens's ``logit_readout``: the norm is
recomputed on the vector itself, never a cached scale from another layer; logits are produced
in row chunks). For a masked LM (BERT family) the readout is the model's own masked-LM head
(:func:`~lensmat.models.mlm_head`: dense → activation → LayerNorm → decoder) and the logits
predict the token at the position itself; the logit lens is then the paper's ``id`` baseline.

- :class:`LogitLens`: ``transform`` is the identity (nostalgebraist's logit lens).
- :class:`MatLens`: ``transform(h, l) = h @ A_{l→L} (+ b)``, the least-squares map of
  "Jump to Conclusions" (Yom Din et al., 2023); exactly the identity at ``l = L``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from jaxtyping import Float

from lensmat.collect import check_layer, resid_hook
from lensmat.fit import MapSet
from lensmat.models import input_device, is_masked_lm, mlm_head, model_device


class Lens(ABC):
    """Turns residual activations at layer ``l`` into logits. Subclasses define ``transform``."""

    name: str = "lens"
    readout_chunk: int = 1024  # rows per unembedding chunk: [chunk, vocab] at a time

    def __init__(self, model) -> None:
        self.model = model

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    def covers(self, layer: int) -> bool:
        """Whether the lens is defined at residual layer ``layer`` (all layers unless overridden)."""
        check_layer(layer, self.n_layers)
        return True

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
    """The logit lens: the final norm and unembedding applied to ``h_l`` itself."""

    name = "logit"

    def transform(self, h, layer):
        return h


class MatLens(Lens):
    """The mat lens: the logit lens applied to ``h_l @ A_{l→L} (+ b)``.

    ``maps`` must hold the residual maps ``h_l -> h_L`` for every layer it is asked about
    (see :func:`lensmat.fit.fit_layer_maps`); it is checked against the model on construction.
    """

    def __init__(self, model, maps: MapSet, name: str | None = None) -> None:
        super().__init__(model)
        maps.check_model(model)
        self.maps = maps
        self.name = name or ("mat-affine" if maps.intercept else "mat")

    def transform(self, h, layer):
        layer = check_layer(layer, self.n_layers)
        if layer == self.n_layers:
            return h
        return self.maps.get(resid_hook(layer), resid_hook(self.n_layers))(h)


@torch.no_grad()
def top_predictions(model, lenses: dict[str, Lens], text: str, k: int = 5) -> dict:
    """Top-``k`` next-token predictions of every lens at every layer, for one text (BOS prepended;
    for a masked LM: predictions of the token at each position of ``[CLS] text [SEP]``, where
    ``text`` may hold ``[MASK]`` tokens).

    Returns ``{"tokens": [str], "lenses": {name: {"ids": [L+1, pos, k], "probs": [L+1, pos, k]}}}``
    where ``pos`` counts the BOS; a lens that does not cover a layer (e.g. tuned at ``L``) shows
    the model's own output there.
    """
    from lensmat.pipeline import encode

    n_layers = int(model.cfg.n_layers)
    ids = torch.tensor(encode(model, [text], int(model.cfg.n_ctx))).to(input_device(model))
    hooks = [resid_hook(layer) for layer in range(n_layers + 1)]
    logits, cache = model.run_with_cache(ids, names_filter=lambda name: name in hooks)
    out = {}
    for name, lens in lenses.items():
        rows = [torch.softmax((lens(cache[h][0], layer) if lens.covers(layer) else logits[0]).float(), -1).topk(k)
                for layer, h in enumerate(hooks)]
        out[name] = {"ids": torch.stack([r.indices for r in rows]).cpu(), "probs": torch.stack([r.values for r in rows]).cpu()}
    return {"tokens": [model.tokenizer.decode([t]) for t in ids[0].tolist()], "lenses": out}


def predictions_table(model, predictions: dict, lens: str, position: int):
    """A pandas table of one lens's top-k at one position: one row per layer, cells ``token (p)``."""
    import pandas as pd

    p = predictions["lenses"][lens]
    rows = {f"layer {layer}": [f"{model.tokenizer.decode([int(i)])!r} ({float(q):.2f})"
                               for i, q in zip(p["ids"][layer, position], p["probs"][layer, position])]
            for layer in range(p["ids"].shape[0])}
    return pd.DataFrame.from_dict(rows, orient="index", columns=[f"top-{j + 1}" for j in range(p["ids"].shape[2])])

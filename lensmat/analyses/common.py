"""What every analysis does first: take the model (loading a spec) and say which positions were read."""

from __future__ import annotations

import os

from lensmat.models import is_seq2seq_model, load_model


def start_run(model, *, seq2seq: bool = False):
    """The common start of a reporting command (whose :func:`~lensmat.outputs.writes_output` has
    already checked and locked its ``out``): ``model`` as a bridge (a spec or ``None`` is loaded with
    :func:`load_model`). An encoder-decoder model (:mod:`lensmat.models.seq2seq`) is refused unless
    the analysis reads one (``seq2seq=True``: saturation)."""
    model = load_model(model) if model is None or isinstance(model, (str, os.PathLike)) else model
    if not seq2seq and is_seq2seq_model(model):
        raise ValueError(f"{model.cfg.model_name} is an encoder-decoder model ({model.cfg.architecture}); lensmat reads "
                         "its decoder with `lensmat saturation` (lensmat.saturation) only (docs/modalities.md).")
    return model


def protocol_fields(corpus) -> dict:
    """The report fields that say which positions were read: ``{"protocol": "masked", "masking":
    {n_mask, seed}}`` for a masked-protocol corpus (:class:`~lensmat.pipeline.Tokenized`), else
    ``{"protocol": "causal"}``."""
    if corpus.masking is None:
        return {"protocol": "causal"}
    return {"protocol": "masked", "masking": corpus.provenance()["masking"]}



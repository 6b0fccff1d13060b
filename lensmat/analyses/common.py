"""What every analysis does first: take the model (loading a spec) and say which positions were read."""

from __future__ import annotations

import os

from lensmat.models import load_model


def start_run(model):
    """The common start of a reporting command (whose :func:`~lensmat.outputs.writes_output` has
    already checked and locked its ``out``): ``model`` as a bridge (a spec or ``None`` is loaded with
    :func:`load_model`)."""
    return load_model(model) if model is None or isinstance(model, (str, os.PathLike)) else model


def protocol_fields(corpus) -> dict:
    """The report fields that say which positions were read: ``{"protocol": "masked", "masking":
    {n_mask, seed}}`` for a masked-protocol corpus (:class:`~lensmat.pipeline.Tokenized`), else
    ``{"protocol": "causal"}``."""
    if corpus.masking is None:
        return {"protocol": "causal"}
    return {"protocol": "masked", "masking": corpus.provenance()["masking"]}



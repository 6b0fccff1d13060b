"""Linearity across models: :func:`~lensmat.analyses.linearity.linearity` for each of several models
on the same text (training checkpoints, a model before and after fine-tuning), and their means side
by side, against the tokens each model has seen when its folder says."""

from __future__ import annotations

import os

from lensmat import data
from lensmat.analyses.linearity import linearity
from lensmat.models import describe


def tokens_seen(spec) -> int | None:
    """Training tokens a local model folder has seen, from the training script's
    ``training_state.json`` (checkpoints) or ``training_summary.json`` (a finished run); else None."""
    import json
    from pathlib import Path

    from lensmat.models import MASKED_REFERENCE, REFERENCE, reference_model_path

    spec = REFERENCE if spec is None else str(spec)
    folder = reference_model_path(spec) if spec in (REFERENCE, MASKED_REFERENCE) else Path(spec)
    for name, key in (("training_state.json", "tokens_seen"), ("training_summary.json", "train_tokens_seen")):
        if (folder / name).is_file():
            return int(json.loads((folder / name).read_text())[key])
    return None


def checkpoint_models(folder: str | os.PathLike) -> list[str]:
    """The model folders of a training run, in order of tokens seen: ``folder/checkpoints/*`` (as
    ``scripts/train_reference_model.py --checkpoints`` writes them), then ``folder`` itself when it
    holds the finished model."""
    from pathlib import Path

    folder = Path(folder)
    seen = {p: tokens_seen(p) for p in (folder / "checkpoints").glob("*") if (p / "config.json").is_file()}
    found = sorted(seen, key=lambda p: (seen[p] is None, seen[p] or 0, p.name))
    if (folder / "config.json").is_file():
        found.append(folder)
    if not found:
        raise ValueError(f"No model folders in {folder} or {folder}/checkpoints (each needs a config.json); train "
                         "with scripts/train_reference_model.py --checkpoints, or pass --model A,B,C.")
    return [str(p) for p in found]


def linearity_over_models(models: list, dataset: str | None = None, *, load=None, each=None, **kwargs) -> dict:
    """:func:`linearity` for each of ``models`` (specs or bridges; e.g. training checkpoints, or a
    model before and after fine-tuning) on the same text, and their means side by side.

    ``load(spec)`` loads a spec (default :func:`~lensmat.models.load_model`); ``kwargs`` go to
    :func:`linearity`; ``each(i, name, report)`` is called with each model's report as it is done
    (:func:`lensmat.reports.linearity_over_models` writes it to ``out/NN-name/``). Returns the
    summary ``{"dataset", "models": [{model, tokens_seen, mean_linearity, mean_linearity_no_residual,
    mean_heldout_linearity, mean_heldout_linearity_no_residual, linearity, linearity_no_residual,
    norm_ratio, cosine, ce}]}``, ``ce`` = the unpruned model's held-out CE.
    """
    from lensmat.models import load_model

    if len(models) < 1:
        raise ValueError("Pass at least one model to compare linearity across.")
    load = load or load_model
    rows = []
    for i, spec in enumerate(models):
        is_spec = spec is None or isinstance(spec, (str, os.PathLike))
        name = spec if is_spec else describe(spec).name
        r = linearity(load(spec) if is_spec else spec, dataset, **kwargs)
        if each is not None:
            each(i, str(name or "reference"), r)
        rows.append({"model": r["model"], "tokens_seen": tokens_seen(name),
                     **{k: r[k] for k in ("mean_linearity", "mean_linearity_no_residual", "mean_heldout_linearity",
                                          "mean_heldout_linearity_no_residual", "linearity", "linearity_no_residual",
                                          "norm_ratio", "cosine")},
                     "ce": r["pruning"]["identity"][0]["ce"]})
    return {"dataset": str(dataset or data.DEFAULT_CORPUS), "models": rows}

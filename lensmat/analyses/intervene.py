"""Score any intervention: your hooks and/or a sub-module swap, against the clean model, on a corpus.

:func:`score_intervention` runs every batch twice, clean and intervened, and scores the intervened
logits against the clean ones at the scored positions with the lens metrics
(:class:`~lensmat.lenses.metrics.LensScores`): the intervened model is read as one more "lens".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lensmat import data, plots
from lensmat.analyses.swap import swap_hooks
from lensmat.lenses.metrics import METRICS, LensScores, NonFiniteWarning, Reference
from lensmat.lenses.base import check_hook_names
from lensmat.stats.collect import run_capture
from lensmat.stats.pipeline import Tokenized, tokenized


@dataclass
class InterventionScores:
    """How far an intervention moves the model, over ``n_tokens`` scored positions (``non_finite`` of
    them left out: the intervened logits held NaN/Inf).

    ``scores``: ``precision@1/5/10`` (the intervened top-1 among the clean top-k), ``kl``
    (KL(clean ‖ intervened), nats per token), ``clean_top1_surprisal`` (−log q(clean top-1) under the
    intervened model, nats), ``surprisal`` (−log p(intervened top-1) under the clean model, nats, as
    in the reports) and ``ce`` (the intervened model's cross-entropy on the text, nats); ``None``
    when no position was scored. ``hooks``: the hook names intervened on, in order.
    """

    scores: dict[str, float | None]
    n_tokens: int
    non_finite: int
    hooks: list[str]

    def to_dataframe(self):
        """A pandas DataFrame, one row per metric: ``metric, value`` (NaN for ``None``)."""
        import pandas as pd

        return pd.DataFrame({"metric": list(self.scores), "value": list(self.scores.values())}).astype({"value": float})

    def _repr_html_(self) -> str:
        where = ", ".join(dict.fromkeys(self.hooks)) or "nothing"
        return plots.html_table(self.to_dataframe().set_index("metric"),
                                f"Intervention on {where[:200]}: {self.n_tokens} positions")


class NoEffectWarning(UserWarning):
    """An intervention changed nothing: a hook never ran in the forward (its name is a hook point the
    model does not compute), or every activation lensmat read equals the clean forward's (a hook that
    returns a modified copy without returning it, or modifies nothing). The silent failure of a patch
    that does nothing; the message names the hooks and the fix."""


def hook_label(name) -> str:
    """A hook's name for a message (a filter function by its ``__name__``)."""
    return name if isinstance(name, str) else f"<filter {getattr(name, '__name__', repr(name))}>"


def warn_not_run(hooks, fired: list[int], stacklevel: int = 3) -> list[str]:
    """Warn (:class:`NoEffectWarning`) about the hooks of ``hooks`` whose count in ``fired`` is 0;
    returns their names."""
    silent = list(dict.fromkeys(hook_label(name) for (name, _), n in zip(hooks or [], fired) if n == 0))
    if silent:
        warnings.warn(f"Hook(s) {', '.join(silent)} never ran in the forward: the model has these hook points but "
                      "does not compute them for this input, so they changed nothing. Hook a point that runs "
                      "(e.g. blocks.{l}.hook_resid_post, blocks.{l}.hook_attn_out; list them with "
                      "model.run_with_cache(text)[1].keys()).", NoEffectWarning, stacklevel=stacklevel)
    return silent


def _hooks(model, hooks, swap) -> list:
    """The user's ``[(hook name, fn)]`` followed by the swap's (``(maps, kinds, blocks)`` or a dict of
    :func:`~lensmat.analyses.swap.swap_hooks`'s arguments)."""
    out = list(hooks or [])
    if swap is not None:
        out += swap_hooks(model, **swap) if isinstance(swap, dict) else swap_hooks(model, *swap)
    check_hook_names(model, out)
    return out


@torch.no_grad()
def score_intervention(model, text=None, *, hooks=None, swap=None, split: str = "heldout",
                       batch_size: int = 16, max_eval_tokens: int | None = None,
                       max_length: int = data.DEFAULT_MAX_LENGTH) -> InterventionScores:
    """Score ``model`` run with ``hooks`` (``[(hook name, fn)]``, as for ``run_with_hooks``) and/or
    ``swap`` (``(maps, kinds, blocks)`` or ``{"maps", "kinds", "blocks"}``, see
    :func:`~lensmat.analyses.swap.swap_hooks`) against the clean model.

    ``text``: a :class:`~lensmat.stats.pipeline.Tokenized` or anything
    :func:`~lensmat.stats.pipeline.tokenized` takes (``None``: the bundled corpus), read at ``split``
    (lines cut to ``max_length`` tokens); ``max_eval_tokens``: stop after about that many scored positions. With neither hooks nor swap, KL is 0 and Precision@1 is 1.
    """
    fwd = _hooks(model, hooks, swap)
    corpus = text if isinstance(text, Tokenized) else tokenized(model, text, split, max_length)
    scores, top1 = LensScores(0), LensScores(0)  # one "layer": the intervened model's output
    n_tokens = 0
    for batch in corpus.batches(batch_size, max_eval_tokens):
        clean = Reference(run_capture(model, batch, (), logits=True)[1], batch)
        logits = run_capture(model, batch, (), logits=True, fwd_hooks=fwd)[1]
        scores.update(0, logits, clean)
        top1.update(0, logits, clean.against(clean.logits.argmax(-1)))
        n_tokens += batch.n_scored
    result = scores.result()
    with warnings.catch_warnings():  # the same positions, warned about once above
        warnings.simplefilter("ignore", NonFiniteWarning)
        surprisal = top1.result()["ce"][0]
    values = {m: result[m][0] for m in METRICS}
    return InterventionScores({**values, "clean_top1_surprisal": surprisal}, n_tokens, result["non_finite"][0],
                              [name for name, _ in fwd])

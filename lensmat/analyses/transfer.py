"""``lensmat transfer``: the lens transfer matrix, every fitted lens of layer ``i`` read at every layer ``j``.

The tuned-lens package's ``eval --layer_transfer``: the translator a lens learned for residual layer
``i`` applied to ``h_j`` (``lens.transform_hidden(h_j, i)``, the package's ``lens(h_j, idx=i)``),
read through the model's readout and scored on held-out text. Entry ``[i][j]`` of a matrix is lens
layer ``i`` (the translator's layer, the package's outer key) read at residual layer ``j`` (the
hidden state's layer, its inner key); the diagonal ``[l][l]`` is the lens itself, as ``compare``
scores it. Layers are residual layers ``0..L`` (``h_L`` before the final norm), so the matrices are
``(L+1)×(L+1)``; the package stops at ``L-1``. Row ``L`` of a ``mat`` or tuned lens is the identity
translator, i.e. the logit lens read at every layer.

The metrics are :mod:`lensmat.lenses.metrics`' (:data:`~lensmat.lenses.metrics.METRICS`), against the
full model's own distribution at the same position as everywhere in lensmat; ``ce`` is against the
actual next token, as the package's transfer ``ce``. The package's transfer ``kl`` compares with the
lens's own reading of layer ``j`` instead (the diagonal's distribution), which is not reported here.

Cost: every entry is one readout of the held-out tokens, so a lens costs ``L+1`` times its
``compare`` evaluation. The rows are read :data:`ROWS_PER_PASS` at a time, each pass one forward of
the model over the held-out tokens: a batch's readout stacks ``ROWS_PER_PASS·(L+1)+1`` rows of
``[tokens, d_model]`` (``compare`` with two lenses reads as many), whatever ``L`` and the number of
lenses, at the price of ``⌈rows/ROWS_PER_PASS⌉`` forwards instead of one.
"""

from __future__ import annotations

import os
import time

from tqdm.auto import tqdm

from lensmat import data
from lensmat.analyses.common import protocol_fields, start_run
from lensmat.lenses.base import Lens, LogitLens
from lensmat.stats.bootstrap import Bootstrap
from lensmat.lenses.metrics import METRICS, evaluate_lenses
from lensmat.lenses.registry import LENS_KINDS, fit_named_lenses, split_lenses
from lensmat.models import describe
from lensmat.stats.fit import MapSet
from lensmat.stats.pipeline import tokenized

ROWS_PER_PASS = 2  # matrix rows (a lens at one layer i) read per forward over the held-out tokens
PLAN = "transfer"  # the plan of compare with two lenses: the mat fit, one batch, 2·(L+1)+1 readout rows


class TransferredLens(Lens):
    """``lens`` with its layer-``source`` translator at every layer: ``transform_hidden(h, j) =
    lens.transform_hidden(h, source)`` (``[..., d_model] -> [..., d_model]``), defined at every
    residual layer ``j = 0..L``. Named ``{lens.name}@{source}``."""

    def __init__(self, lens: Lens, source: int) -> None:
        super().__init__(lens.model)
        self.lens, self.source, self.name = lens, source, f"{lens.name}@{source}"

    def transform_hidden(self, h, layer):
        return self.lens.transform_hidden(h, self.source)


def refuse_untransferable(lenses) -> None:
    """Refuse, before any work, a lens with no per-layer translator (the logit lens: read at any layer it
    is itself, and row ``L`` of every matrix already holds it) or one that reads another site than ``post``."""
    names, given = split_lenses(lenses)
    if ("logit" in names and "logit" not in given) or any(isinstance(v, LogitLens) for v in given.values()):
        raise ValueError("The logit lens has no per-layer translator to transfer (it is the identity at every layer, "
                         "the same as row L of any lens's matrix); name lenses among "
                         f"{', '.join(k for k in LENS_KINDS if k != 'logit')}.")
    bad = [k for k, v in given.items() if v.site != "post"]
    if bad:
        raise ValueError(f"Lens(es) {bad} read the {given[bad[0]].site!r} site; transfer reads residual layers 0..L: "
                         "pass post-site lenses.")


def transfer_rows(lens: Lens, n_layers: int) -> dict[int, TransferredLens]:
    """The rows of ``lens``'s matrix, by lens layer ``i``: the layers ``0..L`` the lens covers."""
    return {i: TransferredLens(lens, i) for i in range(n_layers + 1) if lens.covers(i)}


def adjacent(matrix: list[list[float | None]]) -> dict[str, list[float | None]]:
    """How much reading layer ``j`` with a neighbour's lens changes a metric (``(L+1)×(L+1)`` ``[i][j]``):
    ``from_previous[j] = M[j-1][j] − M[j][j]`` and ``from_next[j] = M[j+1][j] − M[j][j]`` (``None`` where
    either is missing). Near 0: adjacent layers could share one lens."""
    n = len(matrix)

    def at(i: int, j: int) -> float | None:
        return matrix[i][j] if 0 <= i < n and matrix[i] is not None else None

    def gap(i: int, j: int) -> float | None:
        a, b = at(i, j), at(j, j)
        return None if a is None or b is None else a - b

    return {"from_previous": [gap(j - 1, j) for j in range(n)], "from_next": [gap(j + 1, j) for j in range(n)]}


def transfer(
    model=None,
    dataset: str | None = None,
    *,
    lenses: str | list | dict = ("mat",),
    max_fit_tokens: int | None = None,
    max_eval_tokens: int | None = 20_000,
    batch_size: int = 16,
    max_length: int = data.DEFAULT_MAX_LENGTH,
    maps: MapSet | str | os.PathLike | None = None,
    tuned=None,
    tuned_config=None,
    stats_device: str | None = None,
    memory_limit: int | None = None,
    bootstrap: Bootstrap | None = None,
    progress: bool = True,
) -> dict:
    """The lens transfer matrix of every lens on held-out text; returns the report dict.

    Args:
        model: a bridge, a spec for :func:`~lensmat.models.load.load_model`, or ``None`` (bundled).
        dataset: corpus spec (default: the bundled Leipzig sentences); lenses fitted on ``train``,
            scored on ``heldout``.
        lenses: names among ``mat``, ``mat-affine``, ``tuned``, ``mat-tuned``, ``jacobian``, ``patchscope``
            (entry ``[i][j]``: ``h_j`` patched in at layer ``i``, a forward of ``L-i`` blocks per token and
            entry), or :class:`~lensmat.lenses.base.Lens` objects reading the ``post`` site (as for
            ``compare``). ``logit`` is refused: it has no per-layer translator. A masked LM takes the mat
            lenses only.
        max_fit_tokens / max_eval_tokens: caps on scored tokens of ``train`` / ``heldout`` (default
            20,000 held-out tokens: the matrix costs ``L+1`` times ``compare``'s readout).
        maps / tuned: saved mat maps / tuned lens to reuse instead of fitting; ``tuned_config``:
            :class:`~lensmat.lenses.tuned.TunedLensTraining`.
        stats_device / memory_limit: as for ``compare`` (the memory plan is checked before any work).
        bootstrap: the intervals of every entry, over held-out documents (as for ``compare``).

    Report: ``model``, ``model_info``, ``dataset``, ``n_layers``, ``layers`` (``0..L``),
    ``n_fit_tokens`` (the most train tokens a lens was fitted on; per lens in ``fit_cost``),
    ``n_eval_tokens``, ``transfer.{lens}.{metric}``: ``(L+1)×(L+1)`` nested lists indexed
    ``[lens layer i][read layer j]`` (metrics ``precision@1/5/10``, ``surprisal``, ``kl``, ``ce``,
    ``non_finite``; a row is ``None`` where the lens has no translator for layer ``i``, e.g. the
    J-lens at ``0``), ``transfer.{lens}.ci_low.{metric}`` / ``ci_high`` (the same matrices of 95% bounds),
    ``bootstrap``, ``adjacent.{lens}.{metric}.{from_previous, from_next}`` (:func:`adjacent`, L+1
    each), ``fit_cost``, ``eval_cost`` (``passes``, ``rows_per_pass``, ``seconds``), ``protocol``
    (and ``masking``), ``memory_plan``.
    """
    refuse_untransferable(lenses)
    model = start_run(model)
    n_layers = int(model.cfg.n_layers)
    built, fit_cost, train, memory = fit_named_lenses(
        model, lenses, dataset, command=PLAN, maps=maps, tuned=tuned, tuned_config=tuned_config,
        max_fit_tokens=max_fit_tokens, batch_size=batch_size, max_length=max_length, stats_device=stats_device,
        memory_limit=memory_limit, progress=progress)
    heldout = tokenized(model, dataset, "heldout", max_length)
    batches = list(heldout.batches(batch_size, max_eval_tokens))
    rows = {name: transfer_rows(lens, n_layers) for name, lens in built.items()}
    flat = [(name, i, row) for name, by_layer in rows.items() for i, row in by_layer.items()]
    scores: dict[str, dict] = {}
    n_eval, start = 0, time.perf_counter()
    with tqdm(total=len(flat), unit="row", desc="transfer", disable=not progress) as bar:
        for p in range(0, len(flat), ROWS_PER_PASS):
            part = flat[p: p + ROWS_PER_PASS]
            result = evaluate_lenses(model, {row.name: row for _, _, row in part}, batches, bootstrap=bootstrap,
                                     progress=False)
            n_eval = result.n_tokens
            for name, i, row in part:
                scores.setdefault(name, {})[i] = result.scores[row.name]
            bar.update(len(part))
    keys = (*METRICS, "non_finite")
    matrices = {name: {m: [scores.get(name, {}).get(i, {}).get(m) for i in range(n_layers + 1)] for m in keys}
                for name in built}  # a row the lens does not cover is None
    for name, matrix in matrices.items():
        for bound in ("ci_low", "ci_high"):
            matrix[bound] = {m: [(scores.get(name, {}).get(i) or {}).get(bound, {}).get(m) for i in range(n_layers + 1)]
                             for m in METRICS}
    info, cost = describe(model), {name: fit_cost[name] for name in built}
    return {
        "command": "transfer", "model": info.name, "model_info": info.to_dict(), "dataset": train.dataset,
        "n_layers": n_layers, "layers": list(range(n_layers + 1)),
        "n_fit_tokens": max(c["tokens"] for c in cost.values()), "n_eval_tokens": n_eval,
        "transfer": matrices,
        "adjacent": {name: {m: adjacent(matrix[m]) for m in METRICS} for name, matrix in matrices.items()},
        "fit_cost": cost,
        "eval_cost": {"passes": -(-len(flat) // ROWS_PER_PASS), "rows_per_pass": ROWS_PER_PASS,
                      "seconds": time.perf_counter() - start},
        **protocol_fields(heldout), "memory_plan": memory,
        "bootstrap": (bootstrap or Bootstrap()).to_dict(len({line for b in batches for line in b.lines})),
    }

"""Metrics on scored positions, streamed over batches.

Units: cross-entropy, surprisal and KL in nats per token. Positions follow
:mod:`lensmat.data.corpora`: lens-vs-model metrics use ``score_mask`` (non-padding, not BOS);
cross-entropy against the text uses the positions that have a next token.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Sequence

import torch
from jaxtyping import Float, Int

from lensmat.data import Batch
from lensmat.lenses import engine

LogitsFn = Callable[[Int[torch.Tensor, "batch pos"]], Float[torch.Tensor, "batch pos vocab"]]


def _quality(rows_and_targets: Iterable[tuple[torch.Tensor, torch.Tensor]], empty: str) -> dict:
    """``{"ce", "top1_accuracy", "tokens"}`` over ``(logits [n, vocab], targets [n])`` pairs
    (``ValueError(empty)`` when there is no row at all)."""
    loss_sum = correct = n = 0.0
    for rows, targets in rows_and_targets:
        rows = rows.float()
        loss_sum += float(torch.nn.functional.cross_entropy(rows, targets, reduction="sum"))
        correct += float((rows.argmax(-1) == targets).sum())
        n += targets.numel()
    if n == 0:
        raise ValueError(empty)
    return {"ce": loss_sum / n, "top1_accuracy": correct / n, "tokens": int(n)}


@torch.no_grad()
def next_token_quality(logits_fn: LogitsFn, batches: Iterable[Batch]) -> dict:
    """Language-model quality on a corpus: ``{"ce", "top1_accuracy", "tokens"}``.

    Every real token but the BOS is a target (the first word, predicted from BOS, counts). Right
    padding never changes a causal model's outputs at real positions, so no attention mask is
    passed to ``logits_fn``.
    """
    def rows():
        for batch in batches:
            logits = logits_fn(batch.tokens)[:, :-1]
            has_next = batch.attention_mask[:, 1:].to(logits.device)
            yield logits[has_next], batch.tokens[:, 1:].to(logits.device)[has_next]

    return _quality(rows(), "No target tokens to score: every line is empty after BOS.")


@torch.no_grad()
def masked_token_quality(logits_fn: Callable, batches: Iterable[Batch]) -> dict:
    """Masked-LM quality under the masked protocol: ``{"ce", "top1_accuracy", "tokens"}`` at the
    masked positions of masked batches (:class:`~lensmat.data.batches.Masking`), against the original tokens.

    ``logits_fn(tokens, attention_mask)`` returns ``[batch, pos, vocab]`` logits.
    """
    def rows():
        for batch in batches:
            if not batch.is_masked:
                raise ValueError("masked_token_quality needs masked batches: pass masking= to lensmat.data.batches.batches.")
            logits = logits_fn(batch.tokens, batch.attention_mask)
            masked = batch.score_mask.to(logits.device)
            yield logits[masked], batch.targets.to(logits.device)[masked]

    return _quality(rows(), "No masked tokens to score: no line has a maskable (non-special) token.")


METRICS = ("precision@1", "precision@5", "precision@10", "surprisal", "kl", "ce")
TOP_K = (1, 5, 10)


class Reference:
    """What every lens is scored against at one batch's scored positions: the ``targets`` (the next
    token; the original token at a masked position) with ``has_target`` (False at a line's last
    token), and the full model's own distribution there, as its ``logits`` ``[n, vocab]`` when they
    exist (a swapped model's scores, :meth:`LensScores.update`) or read from ``h_L`` by the engine
    with the lenses (:func:`evaluate_lenses`, ``logits=None``)."""

    def __init__(self, logits: Float[torch.Tensor, "n vocab"] | None, batch: Batch,
                 device: torch.device | str | None = None) -> None:
        device = logits.device if logits is not None else device
        self.logits = logits
        self.targets = batch.targets[batch.score_mask].to(device)
        self.has_target = batch.target_mask[batch.score_mask].to(device)

    def rows(self, keep: torch.Tensor) -> "Reference":
        """The same reference at the positions where ``keep`` is True."""
        out = object.__new__(Reference)
        out.logits = None if self.logits is None else self.logits[keep]
        out.targets, out.has_target = self.targets[keep], self.has_target[keep]
        return out

    def against(self, targets: Int[torch.Tensor, "n"]) -> "Reference":
        """The same reference with ``targets`` as every position's target (e.g. the model's own top-1):
        a lens's CE against it is then the surprisal of those tokens under the lens."""
        out = object.__new__(Reference)
        out.logits, out.targets, out.has_target = self.logits, targets, torch.ones_like(self.has_target)
        return out

    @property
    def pick(self) -> Int[torch.Tensor, "n 1"]:
        """The target ids as the engine's ``pick`` (a valid id where there is no target)."""
        return torch.where(self.has_target, self.targets, 0)[:, None]


class NonFiniteWarning(UserWarning):
    """Logits that held NaN/Inf (e.g. a composed swap that diverged); those positions are not scored."""


class LensScores:
    """Streaming per-layer sums for one lens: Precision@k, surprisal, KL(p‖q), CE.

    ``p`` is the full model's distribution at the same position and ``q`` the lens's.
    Precision@k = fraction of positions where the lens's top-1 token is in p's top-k;
    surprisal = mean −log p(lens top-1); KL(p‖q) in nats; CE = −log q(actual next token),
    over positions that have a next token. Every quantity comes from the readout engine
    (:mod:`lensmat.lenses.engine`); the sums stay on the device until :meth:`result`.

    Positions whose logits hold NaN/Inf are counted in ``non_finite`` and left out of every
    metric (a layer where all were non-finite scores ``None``), never counted as misses.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.sums: dict[str, torch.Tensor] = {}

    def _allocate(self, device) -> None:
        self.sums = {m: torch.zeros(self.n_layers + 1, dtype=torch.float64, device=device)
                     for m in (*METRICS, "n", "n_ce", "non_finite")}

    def update(self, layer: int, lens_logits: Float[torch.Tensor, "n vocab"], ref: Reference) -> None:
        """Add one batch at ``layer`` from logits that exist (``ref`` must hold the model's logits)."""
        if ref.logits is None:
            raise ValueError("LensScores.update needs a Reference built from the model's logits.")
        readout = engine.read_logits(lens_logits[None], ref.logits, pick=ref.pick, k_ref=max(TOP_K))
        self.add(layer, readout.group(0), ref)

    def add(self, layer: int, readout: engine.Readout, ref: Reference) -> None:
        """Add one batch at ``layer`` from one group of an engine readout (tensors ``[n]``, with ``readout.ref``
        the model's own distribution at the same positions)."""
        if not self.sums:
            self._allocate(readout.lse.device)
        keep = readout.finite & readout.ref.finite
        top1 = readout.top_ids[:, 0]
        values = {f"precision@{k}": (readout.ref.top_ids[:, :k] == top1[:, None]).any(-1) for k in TOP_K}
        values["surprisal"] = readout.ref.lse - readout.ref_at_top1
        values["kl"] = readout.kl
        with_target = keep & ref.has_target
        values["ce"] = readout.lse - readout.picked[:, 0]
        for m, v in values.items():
            self.sums[m][layer] += torch.where(with_target if m == "ce" else keep, v.double(), 0.0).sum()
        self.sums["n"][layer] += keep.sum()
        self.sums["n_ce"][layer] += with_target.sum()
        self.sums["non_finite"][layer] += (~keep).sum()

    def result(self) -> dict[str, list[float | None]]:
        """``{metric: [value at layer 0..L]}`` (``None`` where a layer was not scored) and
        ``non_finite``: positions per layer whose logits were NaN/Inf (a :class:`NonFiniteWarning`
        says where)."""
        if not self.sums:
            self._allocate("cpu")
        sums = {m: s.cpu() for m, s in self.sums.items()}  # the one transfer from the device
        out = {}
        for m in METRICS:
            denom = sums["n_ce" if m == "ce" else "n"]
            out[m] = [float(v / d) if d > 0 else None for v, d in zip(sums[m], denom)]
        out["non_finite"] = [int(c) for c in sums["non_finite"]]
        bad = [layer for layer, c in enumerate(out["non_finite"]) if c]
        if bad:
            import warnings

            warnings.warn(f"Non-finite (NaN/Inf) logits at {sum(out['non_finite'])} positions, at layers {bad}: those "
                          "positions are left out of the metrics (a layer with none left scores null); the report's "
                          "non_finite field counts them.", NonFiniteWarning, stacklevel=2)
        return out


class LensEvaluation(NamedTuple):
    """What :func:`evaluate_lenses` returns; unpacks as ``scores, stats, n_tokens``.

    ``scores``: ``{lens: {metric: [value per layer of its site]}}`` (:data:`METRICS` plus
    ``non_finite``; ``None`` where a layer was not scored); ``stats``: the accumulated
    :class:`~lensmat.stats.gram.GramStats` or ``None``; ``n_tokens``: the positions scored.
    """

    scores: dict[str, dict[str, list[float | None]]]
    stats: list | None
    n_tokens: int

    def to_dataframe(self):
        """A tidy pandas DataFrame, one row per lens, layer and metric: ``lens, layer, metric, value``
        (surprisal, KL and CE in nats; ``value`` NaN where a layer was not scored)."""
        import pandas as pd

        rows = [(lens, layer, metric, v) for lens, scores in self.scores.items() for metric, values in scores.items()
                for layer, v in enumerate(values)]
        return pd.DataFrame(rows, columns=["lens", "layer", "metric", "value"]).astype({"value": float})

    def plot(self, out=None) -> list:
        """Precision@1/5/10 and KL per layer, one line per lens (:func:`lensmat.plots.lens_plots`);
        ``out``: a folder to save ``precision.png`` and ``kl.png`` in. Returns the figures."""
        from lensmat import plots

        return plots.lens_plots({"lenses": self.scores}, out)

    def _repr_html_(self) -> str:
        from lensmat import plots

        table = self.to_dataframe().pivot(index=["lens", "metric"], columns="layer", values="value")
        return plots.html_table(table, f"Lens scores per layer ({self.n_tokens} positions)")


def _as_batches(model, batches, total_tokens: int | None) -> tuple[Iterable[Batch], int | None]:
    """``batches`` as given, or the text given instead tokenized (see :func:`evaluate_lenses`)."""
    import os

    from lensmat.stats.pipeline import tokenized

    texts = isinstance(batches, (list, tuple)) and len(batches) > 0 and all(isinstance(b, str) for b in batches)
    if texts or isinstance(batches, torch.Tensor) or hasattr(batches, "column_names"):
        corpus = tokenized(model, batches, "all")
    elif batches is None or isinstance(batches, (str, os.PathLike)):
        corpus = tokenized(model, batches, "heldout")
    else:
        return batches, total_tokens
    return corpus.batches(16), corpus.n_tokens() if total_tokens is None else total_tokens


@torch.no_grad()
def evaluate_lenses(
    model,
    lenses: dict,
    batches,
    *,
    layers: Sequence[int] | None = None,
    stats_groups: Sequence[Sequence[str]] | None = None,
    stats_pairs: Sequence | None = None,
    stats_device: str | None = None,
    total_tokens: int | None = None,
    progress: bool = True,
) -> LensEvaluation:
    """Score every lens at every layer on the same tokens, streaming over ``batches``.

    Args:
        batches: :class:`~lensmat.data.batches.Batch` objects, or the text itself: a list of strings, a
            ``datasets.Dataset`` or token ids (all of it is read), or a corpus spec (its ``heldout``
            split, as every reported number in lensmat), batched 16 at a time.
        lenses: ``{name: Lens}``; each reads its own site (``lens.site``: ``post`` = residual layers
            ``0..L``, ``mid`` = ``hook_resid_mid`` of blocks ``0..L-1``).
        layers: layers to score (default all of each lens's site).
        stats_groups: hook groups whose :class:`~lensmat.stats.gram.GramStats` are accumulated in
            the same forward passes (e.g. held-out statistics for R²), keeping the index pairs
            ``stats_pairs[g]`` of group ``g`` (:func:`~lensmat.stats.gram.pair_pattern`; default all).

    Returns a :class:`LensEvaluation` ``(scores, stats, n_tokens)``, ``scores`` = ``{lens: {metric:
    [values per layer of its site]}}``: L+1 values for a ``post`` lens, L for a ``mid`` one. Every layer and
    lens of a batch is read in one pass of the readout engine (:mod:`lensmat.lenses.engine`): no
    ``[tokens, vocab]`` array of a whole layer exists.
    """
    from tqdm.auto import tqdm

    from lensmat.lenses.base import Lens
    from lensmat.models import model_device
    from lensmat.stats.collect import resid_hook, run_capture, site_hooks, update_stats

    batches, total_tokens = _as_batches(model, batches, total_tokens)
    for name, lens in lenses.items():
        if isinstance(lens, Lens) and type(lens).forward is not Lens.forward:
            raise TypeError(f"The {name!r} lens overrides forward(); the readout engine reads a lens as the model's "
                            "readout of lens.transform_hidden(h, layer). Define transform_hidden instead.")
    n_layers = int(model.cfg.n_layers)
    unembedding, device = engine.Unembedding(model), model_device(model)
    sites = {name: getattr(lens, "site", "post") for name, lens in lenses.items()}
    wanted = range(n_layers + 1) if layers is None else layers
    site_layers = {site: [(layer, site_hooks(n_layers, site)[layer]) for layer in wanted
                          if site == "post" or layer < n_layers] for site in set(sites.values())}
    last = resid_hook(n_layers)  # h_L: the model's own distribution, read by the engine with the lenses
    hooks = [h for pairs in site_layers.values() for _, h in pairs] + [last]
    extra = [h for g in (stats_groups or []) for h in g]
    scores = {name: LensScores(n_layers - (sites[name] == "mid")) for name in lenses}
    stats, n_tokens = None, 0
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="evaluate", disable=not progress)
    for batch in batches:
        captured, _ = run_capture(model, batch, hooks + extra)
        if stats_groups:
            stats = update_stats(stats, stats_groups, captured, stats_device or "cpu", pairs=stats_pairs)
        ref = Reference(None, batch, device)
        rows, where = [], []
        for name, lens in lenses.items():
            for layer, hook in site_layers[sites[name]]:
                if lens.covers(layer):
                    rows.append(lens.transform_hidden(captured[hook].to(device), layer))
                    where.append((name, layer))
        if rows:
            readout = engine.read(unembedding, torch.stack(rows), captured[last].to(device), pick=ref.pick,
                                  k_ref=max(TOP_K))
            for j, (name, layer) in enumerate(where):
                scores[name].add(layer, readout.group(j), ref)
        n_tokens += batch.n_scored
        bar.update(batch.n_scored)
    bar.close()
    return LensEvaluation({name: s.result() for name, s in scores.items()}, stats, n_tokens)

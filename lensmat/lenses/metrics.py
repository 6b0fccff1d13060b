"""Metrics on scored positions, streamed over batches.

Units: cross-entropy, surprisal and KL in nats per token. Positions follow
:mod:`lensmat.data.corpora`: lens-vs-model metrics use ``score_mask`` (non-padding, not BOS);
cross-entropy against the text uses the positions that have a next token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from jaxtyping import Float, Int

from lensmat.data import Batch, numbered
from lensmat.lenses import engine
from lensmat.stats.bootstrap import Bootstrap, DocumentSums, holm, reported, with_intervals

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
    with the lenses (:func:`evaluate_lenses`, ``logits=None``); ``docs``: the document (corpus line,
    ``Batch.lines``) of each position, the unit the intervals resample."""

    def __init__(self, logits: Float[torch.Tensor, "n vocab"] | None, batch: Batch,
                 device: torch.device | str | None = None) -> None:
        device = logits.device if logits is not None else device
        docs = batch.scored_lines
        mask = batch.score_mask
        self.logits = logits
        self.targets = batch.targets[mask].to(device)
        self.has_target = batch.target_mask[mask].to(device)
        self.docs = docs.to(device)  # [n]: each position's document
        self.n_docs = max(batch.lines) + 1  # a bound on the document ids, known without reading the device

    def rows(self, keep: torch.Tensor) -> "Reference":
        """The same reference at the positions where ``keep`` is True."""
        out = object.__new__(Reference)
        out.logits = None if self.logits is None else self.logits[keep]
        out.targets, out.has_target, out.docs = self.targets[keep], self.has_target[keep], self.docs[keep]
        out.n_docs = self.n_docs
        return out

    def against(self, targets: Int[torch.Tensor, "n"]) -> "Reference":
        """The same reference with ``targets`` as every position's target (e.g. the model's own top-1):
        a lens's CE against it is then the surprisal of those tokens under the lens."""
        out = object.__new__(Reference)
        out.logits, out.targets, out.has_target = self.logits, targets, torch.ones_like(self.has_target)
        out.docs, out.n_docs = self.docs, self.n_docs
        return out

    @property
    def pick(self) -> Int[torch.Tensor, "n 1"]:
        """The target ids as the engine's ``pick`` (a valid id where there is no target)."""
        return torch.where(self.has_target, self.targets, 0)[:, None]


class NonFiniteWarning(UserWarning):
    """Logits that held NaN/Inf (e.g. a composed swap that diverged); those positions are not scored."""


class LensScores:
    """Streaming per-layer sums for one lens: Precision@k, surprisal, KL(p‖q), CE, each with a
    bootstrap interval over documents.

    ``p`` is the full model's distribution at the same position and ``q`` the lens's.
    Precision@k = fraction of positions where the lens's top-1 token is in p's top-k;
    surprisal = mean −log p(lens top-1); KL(p‖q) in nats; CE = −log q(actual next token),
    over positions that have a next token. Every quantity comes from the readout engine
    (:mod:`lensmat.lenses.engine`). The sums are kept per document (:class:`~lensmat.stats.bootstrap.DocumentSums`,
    ``[L+1, documents]``, on the device until :meth:`result`) so that :meth:`result` can resample documents.

    Positions whose logits hold NaN/Inf are counted in ``non_finite`` and left out of every
    metric (a layer where all were non-finite scores ``None``), never counted as misses.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.documents = DocumentSums((n_layers + 1,))

    def update(self, layer: int, lens_logits: Float[torch.Tensor, "n vocab"], ref: Reference) -> None:
        """Add one batch at ``layer`` from logits that exist (``ref`` must hold the model's logits)."""
        if ref.logits is None:
            raise ValueError("LensScores.update needs a Reference built from the model's logits.")
        readout = engine.read_logits(lens_logits[None], ref.logits, pick=ref.pick, k_ref=max(TOP_K))
        self.add(layer, readout.group(0), ref)

    def add(self, layer: int, readout: engine.Readout, ref: Reference) -> None:
        """Add one batch at ``layer`` from one group of an engine readout (tensors ``[n]``, with ``readout.ref``
        the model's own distribution at the same positions)."""
        keep = readout.finite & readout.ref.finite
        top1 = readout.top_ids[:, 0]
        values = {f"precision@{k}": (readout.ref.top_ids[:, :k] == top1[:, None]).any(-1) for k in TOP_K}
        values["surprisal"] = readout.ref.lse - readout.ref_at_top1
        values["kl"] = readout.kl
        with_target = keep & ref.has_target
        values["ce"] = readout.lse - readout.picked[:, 0]
        values = {m: torch.where(with_target if m == "ce" else keep, v.double(), 0.0) for m, v in values.items()}
        values.update(n=keep, n_ce=with_target, non_finite=~keep)
        for m, v in values.items():
            self.documents.add(m, layer, ref.docs, v, ref.n_docs)

    def seen(self) -> torch.Tensor:
        """``[columns]`` bool: the documents that had a scored position (the population resampled)."""
        return (self.documents.sums["n"] + self.documents.sums["non_finite"]).sum(0) > 0

    def metric_sums(self, metric: str, seen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(num, den)`` ``[L+1, documents]`` of ``metric`` over the documents ``seen`` (default: its own)."""
        seen = self.seen() if seen is None else seen
        sums = self.documents.sums
        num, den = sums[metric], sums["n_ce" if metric == "ce" else "n"]
        extra = seen.shape[0] - num.shape[-1]  # documents only another lens saw: zero sums here
        return tuple(torch.nn.functional.pad(t, (0, max(extra, 0)))[:, seen] for t in (num, den))

    def result(self, bootstrap: Bootstrap | None = None) -> dict:
        """``{metric: [value at layer 0..L]}`` (``None`` where a layer was not scored), ``ci_low`` /
        ``ci_high`` ``{metric: [bound per layer]}`` (``bootstrap``'s interval over documents; default
        :class:`~lensmat.stats.bootstrap.Bootstrap()`; ``None`` where not scored or with no resamples) and
        ``non_finite``: positions per layer whose logits were NaN/Inf (a :class:`NonFiniteWarning` says where), and
        ``n_documents``: the documents resampled."""
        bootstrap = Bootstrap() if bootstrap is None else bootstrap
        if not self.documents.sums:
            empty = [None] * (self.n_layers + 1)
            return {**{m: empty for m in METRICS}, "ci_low": {m: empty for m in METRICS},
                    "ci_high": {m: empty for m in METRICS}, "non_finite": [0] * (self.n_layers + 1), "n_documents": 0}
        seen = self.seen()
        out = with_intervals({m: bootstrap.ratio(*self.metric_sums(m, seen)) for m in METRICS})
        out["non_finite"] = [int(c) for c in self.documents.total("non_finite").cpu()]
        out["n_documents"] = int(seen.sum())
        bad = [layer for layer, c in enumerate(out["non_finite"]) if c]
        if bad:
            import warnings

            warnings.warn(f"Non-finite (NaN/Inf) logits at {sum(out['non_finite'])} positions, at layers {bad}: those "
                          "positions are left out of the metrics (a layer with none left scores null); the report's "
                          "non_finite field counts them.", NonFiniteWarning, stacklevel=2)
        return out


HIGHER_IS_BETTER = {"precision@1": True, "precision@5": True, "precision@10": True, "surprisal": False, "kl": False,
                    "ce": False}


def paired_comparisons(scores: dict[str, LensScores], bootstrap: Bootstrap | None = None,
                       metrics: Sequence[str] = ("precision@1", "kl")) -> dict:
    """Every pair of lenses ``a``, ``b`` (in the given order, ``a`` first) compared layer by layer on the
    same documents and resamples: ``{"a vs b": {metric: {...}}}`` with, per layer ``0..L``, ``difference``
    (a − b), ``ci_low``/``ci_high``, ``p_value`` (two-sided bootstrap), ``p_holm`` (Holm-adjusted over the
    layers) and ``ahead``: ``a`` or ``b`` where the adjusted p is below ``1 − confidence`` (the better
    lens: higher Precision@k, lower surprisal/KL/CE), else ``None``: the difference is within noise.
    Lenses of different sites or layer counts are not paired."""
    bootstrap = Bootstrap() if bootstrap is None else bootstrap
    names = list(scores)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = scores[a], scores[b]
            if sa.n_layers != sb.n_layers or not sa.documents.sums or not sb.documents.sums:
                continue
            width = max(sa.documents.n_columns, sb.documents.n_columns)
            seen = sum(torch.nn.functional.pad(s.seen(), (0, width - s.documents.n_columns)) for s in (sa, sb)) > 0
            pair = {}
            for m in metrics:
                d = bootstrap.paired(*sa.metric_sums(m, seen), *sb.metric_sums(m, seen))
                p_holm = holm(d.p_value)
                better = torch.where(d.value > 0, 0, 1) if HIGHER_IS_BETTER[m] else torch.where(d.value < 0, 0, 1)
                significant = p_holm < (1 - bootstrap.confidence)
                pair[m] = {"difference": reported(d.value), "ci_low": reported(d.low), "ci_high": reported(d.high),
                           "p_value": reported(d.p_value), "p_holm": reported(p_holm),
                           "ahead": [(a, b)[int(w)] if s else None for w, s in zip(better.tolist(), significant.tolist())]}
            out[f"{a} vs {b}"] = pair
    return out


@dataclass
class LensEvaluation:
    """What :func:`evaluate_lenses` returns; unpacks as ``scores, stats, n_tokens``.

    ``scores``: ``{lens: {metric: [value per layer of its site]}}`` (:data:`METRICS`, their ``ci_low`` /
    ``ci_high`` ``{metric: [...]}`` and ``non_finite``; ``None`` where a layer was not scored); ``stats``: the
    accumulated :class:`~lensmat.stats.gram.GramStats` or ``None``; ``n_tokens``: the positions scored;
    ``sums``: each lens's per-document :class:`LensScores`, which :meth:`paired` compares.
    """

    scores: dict[str, dict]
    stats: list | None
    n_tokens: int
    sums: dict[str, LensScores] = field(default_factory=dict, repr=False)
    bootstrap: Bootstrap = field(default_factory=Bootstrap)

    def __iter__(self):
        return iter((self.scores, self.stats, self.n_tokens))

    @property
    def n_documents(self) -> int:
        """The documents (corpus lines) scored: the population the intervals resample."""
        return max((s["n_documents"] for s in self.scores.values()), default=0)

    def paired(self, metrics: Sequence[str] = ("precision@1", "kl")) -> dict:
        """Every pair of lenses compared layer by layer (:func:`paired_comparisons`)."""
        return paired_comparisons(self.sums, self.bootstrap, metrics)

    def to_dataframe(self):
        """A tidy pandas DataFrame, one row per lens, layer and metric: ``lens, layer, metric, value, ci_low,
        ci_high`` (surprisal, KL and CE in nats; NaN where a layer was not scored)."""
        import pandas as pd

        rows = [(lens, layer, m, v, s["ci_low"][m][layer], s["ci_high"][m][layer])
                for lens, s in self.scores.items() for m in METRICS for layer, v in enumerate(s[m])]
        columns = ["lens", "layer", "metric", "value", "ci_low", "ci_high"]
        return pd.DataFrame(rows, columns=columns).astype({c: float for c in columns[3:]})

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
        return numbered(batches), total_tokens
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
    bootstrap: Bootstrap | None = None,
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
        bootstrap: the intervals' resampling over documents (default
            :class:`~lensmat.stats.bootstrap.Bootstrap()`: 1,000 resamples, seed 0, 95 %).

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
    bootstrap = Bootstrap() if bootstrap is None else bootstrap
    return LensEvaluation({name: s.result(bootstrap) for name, s in scores.items()}, stats, n_tokens, scores, bootstrap)

"""How linear is each block? ("Your Transformer is Secretly Linear", Razzhigaev et al. 2024, arXiv 2405.12250.)

Linearity score of block ``l`` (``l = 0..L-1``), for ``X = h_l`` and ``Y = h_{l+1}`` with one row
per token: centre each by its column mean, scale each to unit Frobenius norm, then

    LS = 1 − min_A ‖X̃A − Ỹ‖²_F = tr(C_xyᵀ C_xx⁺ C_xy) / tr(C_yy)

where ``C`` are the centred sums of products and ``⁺`` the pseudo-inverse over the directions ``X``
spans (:func:`least_squares`: a post-LN encoder's states lie in a hyperplane). It is computed from the core's streaming statistics
of ``h_0..h_L`` (no activation is stored); ``linearity_no_residual`` uses ``Y = h_{l+1} − h_l``
(the block's own contribution), whose centred blocks follow from the same statistics.

Held out (:func:`heldout_linearity_score`): the affine map ``y ≈ xW + b`` that attains the minimum
above on ``train`` is scored on ``heldout`` as ``1 − Σ‖y − xW − b‖² / Σ‖y − ȳ‖²`` (``ȳ`` the held-out
mean; with ``residual=True`` the target is ``y − x`` and the denominator its variance). On the
training statistics themselves it equals the in-sample score; it can be negative when the map
overfits (e.g. fewer train tokens than ``d_model``).

The paper's explanation for the gap between the two scores is that a block adds little to a large
residual stream. From the same statistics, per block (token-pooled, so large-norm tokens weigh more):
``norm_ratio = sqrt(Σ‖h_{l+1} − h_l‖² / Σ‖h_l‖²)`` (the block's output relative to its input) and
``cosine = Σ h_l·h_{l+1} / sqrt(Σ‖h_l‖² · Σ‖h_{l+1}‖²)`` (consecutive layers).

Depth pruning removes the ``k`` most linear blocks (highest ``linearity``), ``k = 0..L//2``, either
replacing each by the identity or by its least-squares whole-block map ``h_l -> h_{l+1}`` fitted on
``train`` (the swap hooks of :mod:`lensmat.analyses.swap`, kind ``block``), and scores the pruned model on
``heldout``: cross-entropy against the text (nats/token) and Precision@1 against the full model.

A masked LM (BERT family; encoders are the paper's open question) is read under the masked
protocol (:mod:`lensmat.data.corpora`): every statistic, and so every score, is over the ``[MASK]``
positions of ``[CLS] line [SEP]`` lines; pruning is scored there too, cross-entropy against the
original token. A pruned block is replaced at every position of the line, so its ``linear`` map is
fitted at every position of the ``train`` lines as the model reads them (``[MASK]``s in place).

The report also carries LLM-Microscope's anisotropy and intrinsic dimension of ``h_0..h_L``
(:mod:`lensmat.analyses.geometry`) on the held-out tokens, from passes already made: anisotropy from the
held-out statistics, the intrinsic dimension from the first ``max_id_tokens`` held-out tokens (default
:data:`~lensmat.analyses.geometry.MAX_ID_TOKENS`, 4096), stored during the unpruned pass of the pruning.
"""

from __future__ import annotations

import time
import warnings

import torch
from jaxtyping import Float

from lensmat import data
from lensmat.stats.collect import collect, resid_hook, resid_hooks, run_capture
from lensmat.stats.gram import GramStats, pair_pattern
from lensmat.stats.fit import IllConditionedWarning, LinearMap, MapSet, centred, fit_map, residual_sums
from lensmat.lenses.metrics import LensScores, Reference
from lensmat.models import describe
from lensmat.stats.bootstrap import Bootstrap, DocumentSums, reported
from lensmat.stats.pipeline import collect_layer_stats, tokenized
from lensmat.analyses.swap import submodule_pair, swap_hooks
from lensmat.analyses.geometry import MAX_ID_TOKENS, LayerSample, geometry_fields

# Eigenvalues of C_xx below this fraction of the largest are directions the source does not span: the float32
# rounding of a LayerNorm output leaves ~1e-14 in the direction its hyperplane excludes (the bundled BERT).
PINV_RTOL = 1e-10


Span = tuple[Float[torch.Tensor, "d rank"], Float[torch.Tensor, "rank"]]


def source_span(stats: GramStats, source: str) -> Span:
    """``(basis [d, r], eigenvalues [r])`` of the centred ``C_xx``: the directions the source spans
    (eigenvalues above :data:`PINV_RTOL` of the largest), the pseudo-inverse :func:`least_squares`
    takes. One eigendecomposition per source serves every target and score of it. With fewer than
    ``4·d`` tokens and fewer than ``d`` directions it warns (:class:`~lensmat.stats.fit.IllConditionedWarning`):
    a fit is then close to exact in sample."""
    evals, evecs = torch.linalg.eigh(centred(stats, source, source))
    keep = evals > PINV_RTOL * max(float(evals[-1]), 0.0)
    d, rank = evals.shape[0], int(keep.sum())
    if rank < d and stats.n < 4 * d:
        warnings.warn(f"The Gram matrix of {source} is singular or ill-conditioned: {stats.n} tokens span {rank} of "
                      f"{d} directions, so the least-squares fit is close to exact in sample. Fit on more tokens "
                      f"(several times {d}).", IllConditionedWarning, stacklevel=3)
    return evecs[:, keep], evals[keep]


def least_squares(stats: GramStats, source: str, target: str, *, residual: bool = False,
                  span: Span | None = None) -> Float[torch.Tensor, "d_source d_target"]:
    """``W = C_xx⁺ C_xy`` ``[d_source, d_target]``: the minimum-norm minimiser of
    ``Σ‖(y − ȳ) − (x − x̄)W‖²`` over the tokens of ``stats`` (``y − x`` for ``y`` with ``residual=True``),
    the pseudo-inverse taken over the directions the source spans (``span``: :func:`source_span`,
    computed here when not given), as the score's ``min_A`` is. A post-LN model's states (BERT:
    every ``h_l`` is a LayerNorm output) lie in a hyperplane, so ``C_xx`` is singular for any number
    of tokens, and a ridge there would lower the score."""
    basis, evals = source_span(stats, source) if span is None else span
    cxy = centred(stats, source, target)
    if residual:
        cxy = cxy - centred(stats, source, source)
    return basis @ ((basis.T @ cxy) / evals[:, None])


def linearity_score(stats: GramStats, source: str, target: str, *, residual: bool = False,
                    span: Span | None = None) -> float:
    """LS of ``target`` (``target − source`` with ``residual=True``) given ``source``, from statistics
    holding both hooks. In ``[0, 1]``; 1 when the target is an exact affine function of the source,
    including a constant target (e.g. a block that adds nothing, with ``residual=True``).
    The minimiser is :func:`least_squares` (no ridge, also where ``C_xx`` is singular; ``span``:
    the source's :func:`source_span`, when already computed)."""
    cxx = centred(stats, source, source)
    cxy = centred(stats, source, target)
    cyy = centred(stats, target, target)
    scale = float(torch.trace(cxx) + torch.trace(cyy))
    if residual:  # Y' = Y − X
        cyy = cyy - cxy - cxy.T + cxx
        cxy = cxy - cxx
    total = float(torch.trace(cyy))
    if total <= 1e-12 * scale:
        return 1.0
    return float((cxy * least_squares(stats, source, target, residual=residual, span=span)).sum()) / total


def heldout_linearity_score(train: GramStats, heldout: GramStats, source: str, target: str, *,
                            residual: bool = False, span: Span | None = None) -> float:
    """The in-sample minimiser's score on other tokens: ``1 − Σ‖y − xW − b‖² / Σ‖y − ȳ‖²`` over the
    tokens of ``heldout``, with ``W, b`` the affine least-squares map fitted on ``train``
    (:func:`least_squares`; target ``y − x`` with ``residual=True``: the same residual, the variance
    of ``y − x`` below; ``span``: the source's :func:`source_span` on ``train``). At most 1."""
    W = least_squares(train, source, target, span=span)
    m = LinearMap(W, train.mean(target) - train.mean(source) @ W, source, target)
    unexplained = float(residual_sums(heldout, m, source, target).sum())
    cxx, cyy = centred(heldout, source, source), centred(heldout, target, target)
    if residual:
        cxy = centred(heldout, source, target)
        cyy = cyy - cxy - cxy.T + cxx
    total = float(torch.trace(cyy))
    if total <= 1e-12 * float(torch.trace(cxx) + torch.trace(cyy)):
        return 1.0  # a constant target, as in linearity_score
    return 1.0 - unexplained / total


def _inner_products(stats: GramStats, x: str, y: str) -> tuple[float, float, float]:
    """``(Σ‖x‖², Σ x·y, Σ‖y‖²)`` over the tokens of ``stats``."""
    return tuple(float(torch.trace(stats.block(a, b))) for a, b in ((x, x), (x, y), (y, y)))


def norm_ratio(stats: GramStats, source: str, target: str) -> float:
    """``sqrt(Σ‖y − x‖² / Σ‖x‖²)`` over the tokens of ``stats``: what a block adds, relative to its input."""
    xx, xy, yy = _inner_products(stats, source, target)
    return max(yy - 2 * xy + xx, 0.0) ** 0.5 / xx ** 0.5


def pooled_cosine(stats: GramStats, source: str, target: str) -> float:
    """``Σ x·y / sqrt(Σ‖x‖² Σ‖y‖²)`` over the tokens of ``stats`` (in ``[-1, 1]``)."""
    xx, xy, yy = _inner_products(stats, source, target)
    return xy / (xx * yy) ** 0.5


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def linearity_profile(stats: GramStats, heldout: GramStats | None = None) -> dict[str, list[float] | float]:
    """Per-block scores from statistics of ``resid_hooks(L)`` with (at least) the adjacent pairs:
    ``{"linearity", "linearity_no_residual", "norm_ratio", "cosine": [L] each, "mean", "mean_no_residual"}``,
    plus ``"heldout_linearity"``, ``"heldout_linearity_no_residual"`` (``[L]``) and their means
    ``"heldout_mean"``, ``"heldout_mean_no_residual"`` when ``heldout`` statistics of the same hooks
    are given (the block ratios then come from ``heldout``)."""
    pairs = list(zip(stats.hooks[:-1], stats.hooks[1:]))
    spans = [source_span(stats, a) for a, _ in pairs]  # one eigendecomposition per block serves its four scores
    lin = [linearity_score(stats, a, b, span=sp) for (a, b), sp in zip(pairs, spans)]
    lin_nr = [linearity_score(stats, a, b, residual=True, span=sp) for (a, b), sp in zip(pairs, spans)]
    ratios = heldout if heldout is not None else stats
    out = {"linearity": lin, "linearity_no_residual": lin_nr, "mean": _mean(lin), "mean_no_residual": _mean(lin_nr),
           "norm_ratio": [norm_ratio(ratios, a, b) for a, b in pairs],
           "cosine": [pooled_cosine(ratios, a, b) for a, b in pairs]}
    if heldout is not None:
        if heldout.hooks != stats.hooks:
            raise ValueError(f"Held-out statistics of hooks {heldout.hooks} do not match the training ones {stats.hooks}.")
        h = [heldout_linearity_score(stats, heldout, a, b, span=sp) for (a, b), sp in zip(pairs, spans)]
        h_nr = [heldout_linearity_score(stats, heldout, a, b, residual=True, span=sp) for (a, b), sp in zip(pairs, spans)]
        out |= {"heldout_linearity": h, "heldout_linearity_no_residual": h_nr,
                "heldout_mean": _mean(h), "heldout_mean_no_residual": _mean(h_nr)}
    return out


@torch.no_grad()
def heldout_linearity_intervals(model, train: GramStats, heldout: GramStats, batches,
                                bootstrap: Bootstrap | None = None) -> dict:
    """Intervals over held-out documents of ``heldout_linearity`` and ``heldout_linearity_no_residual``:
    ``{"ci_low": {name: [L]}, "ci_high": {name: [L]}, "bootstrap": the report's field}``.

    Block ``l``'s held-out score is ``1 − Σ_t u_t / Σ_t v_t`` with ``u_t = ‖y_t − x_t W − b‖²`` (the
    train-fitted map of :func:`heldout_linearity_score`) and ``v_t = ‖y_t − ȳ‖²`` (``y − x`` and its mean
    with the residual removed), ``ȳ`` the held-out mean, held fixed. One forward over ``batches`` (the
    same held-out positions as ``heldout``) keeps ``Σ u`` and ``Σ v`` per document; the bootstrap resamples
    those (:mod:`lensmat.stats.bootstrap`)."""
    hooks = list(train.hooks)
    n_blocks = len(hooks) - 1
    maps = []
    for a, b in zip(hooks[:-1], hooks[1:]):
        W = least_squares(train, a, b)
        maps.append((W, train.mean(b) - train.mean(a) @ W, heldout.mean(b), heldout.mean(b) - heldout.mean(a)))
    sums = DocumentSums((2, 2, n_blocks))  # [with / without residual, u / v, block]
    for batch in batches:
        captured, _ = run_capture(model, batch, hooks)
        docs = batch.scored_lines
        states = [captured[h].double().cpu() for h in hooks]  # [n, d] at the scored positions, row-major
        for block, (W, b, y_mean, d_mean) in enumerate(maps):
            x, y = states[block], states[block + 1]
            u = (y - x @ W - b).pow(2).sum(-1)
            for r, v in enumerate(((y - y_mean).pow(2).sum(-1), (y - x - d_mean).pow(2).sum(-1))):
                sums.add("u", (r, 0, block), docs, u, max(batch.lines) + 1)
                sums.add("u", (r, 1, block), docs, v, max(batch.lines) + 1)
    u = sums.sums["u"]
    seen = u[0, 1].sum(0) > 0
    bootstrap = Bootstrap() if bootstrap is None else bootstrap
    ratio = bootstrap.ratio(u[:, 0][..., seen], u[:, 1][..., seen])  # [2, L]: Σu / Σv; the score is 1 − it
    names = ("heldout_linearity", "heldout_linearity_no_residual")
    return {"ci_low": {n: reported(1 - ratio.high[r]) for r, n in enumerate(names)},
            "ci_high": {n: reported(1 - ratio.low[r]) for r, n in enumerate(names)},
            "bootstrap": bootstrap.to_dict(int(seen.sum()))}


def block_maps(model, stats: GramStats, *, identity: bool = False, intercept: bool = False,
               provenance: dict | None = None) -> MapSet:
    """Whole-block maps ``h_l -> h_{l+1}`` keyed as swap kind ``block``, fitted from the residual
    statistics (or the identity for every block with ``identity=True``)."""
    n_blocks = int(model.cfg.n_layers)
    maps = {}
    for layer in range(n_blocks):
        pair = submodule_pair(model, "block", layer)
        if identity:
            maps[pair] = LinearMap(torch.eye(int(model.cfg.d_model)), None, *pair)
        else:
            m = fit_map(stats, resid_hook(layer), resid_hook(layer + 1), intercept=intercept)
            maps[pair] = LinearMap(m.W, m.b, *pair)
    return MapSet(maps, describe(model).to_dict(), intercept and not identity, 0.0, provenance)


def every_position_stats(model, corpus, *, max_tokens: int | None = None, batch_size: int = 16,
                         progress: bool = True, stats_device: str | None = None) -> GramStats:
    """Adjacent-layer statistics of ``h_0..h_L`` at the positions a pruned block's map replaces
    (:meth:`~lensmat.stats.pipeline.Tokenized.replaced_batches`): for a masked LM every real position of
    ``corpus``'s lines (those of its first ``max_tokens`` scored positions) as the model reads them,
    ``[MASK]`` tokens in place, ``[CLS]`` and ``[SEP]`` included. Fitted at the masked positions
    alone, the map of block 0 would see only the ``[MASK]`` embedding plus a position."""
    hooks = resid_hooks(int(model.cfg.n_layers))
    batches = corpus.replaced_batches(batch_size, max_tokens)
    return collect(model, batches, [hooks], pairs=[pair_pattern(len(hooks), "adjacent")], progress=progress,
                   stats_device=stats_device or "cpu")[0]


@torch.no_grad()
def evaluate_pruning(model, variants: dict[str, MapSet], order: list[int], batches, *, max_k: int,
                     total_tokens: int | None = None, progress: bool = True,
                     sample: LayerSample | None = None, bootstrap: Bootstrap | None = None) -> tuple[dict, int]:
    """Score the model with blocks ``order[:k]`` replaced, for ``k = 0..max_k`` and each variant, at
    the batches' scored positions (:func:`~lensmat.stats.collect.run_capture`: a masked LM also gets the
    attention mask).

    Args:
        variants: ``{name: MapSet of block maps}`` (see :func:`block_maps`).
        order: blocks from most to least linear.
        sample: filled, until full, with the unpruned model's states at its hooks and scored positions.

    Returns ``({variant: [{"k", "ce", "precision@1", "ci_low", "ci_high"}, ...]}, n_tokens)``; ``k = 0`` is the
    full model; ``ci_low``/``ci_high``: ``{ce, precision@1}``, ``bootstrap``'s intervals over documents.
    """
    from tqdm.auto import tqdm

    scores = {name: LensScores(max_k) for name in variants}
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="pruning", disable=not progress)
    n_tokens = 0
    for batch in batches:
        hooks = sample.hooks if sample is not None and not sample.full else ()
        captured, logits = run_capture(model, batch, hooks, logits=True)
        if hooks:
            sample.add(captured)
        ref = Reference(logits, batch)
        for name, maps in variants.items():
            scores[name].update(0, logits, ref)
            for k in range(1, max_k + 1):
                _, pruned = run_capture(model, batch, [], logits=True,
                                        fwd_hooks=swap_hooks(model, maps, ["block"], order[:k]))
                scores[name].update(k, pruned, ref)
        n_tokens += batch.n_scored
        bar.update(batch.n_scored)
    bar.close()
    out = {}
    for name, s in scores.items():
        r = s.result(bootstrap)
        out[name] = [{"k": k, "ce": r["ce"][k], "precision@1": r["precision@1"][k],
                      **{bound: {m: r[bound][m][k] for m in ("ce", "precision@1")} for bound in ("ci_low", "ci_high")}}
                     for k in range(max_k + 1)]
    return out, n_tokens


def linearity(model=None, dataset: str | None = None, *, max_fit_tokens: int | None = None,
              max_eval_tokens: int | None = 20_000, max_k: int | None = None, batch_size: int = 16,
              max_length: int = data.DEFAULT_MAX_LENGTH, n_mask: int = 1, mask_seed: int = 0,
              stats_device: str | None = None, memory_limit: int | None = None,
              bootstrap: Bootstrap | None = None, max_id_tokens: int = MAX_ID_TOKENS, progress: bool = True) -> dict:
    """Linearity profile (the paper's in-sample score on ``train``, and the same maps scored on
    ``heldout``), the blocks' norm ratios and consecutive cosines (``heldout``), and depth-pruning
    curves (on ``heldout``).

    Returns the report: ``linearity``, ``linearity_no_residual``,
    ``heldout_linearity``, ``heldout_linearity_no_residual``, ``norm_ratio`` and ``cosine`` (L floats
    each, block ``l`` = ``h_l -> h_{l+1}``), the scores' means, ``order`` (blocks, most linear on
    ``train`` first) and ``pruning`` → ``{variant: [{"k", "ce", "precision@1"}]}`` for
    ``k = 0..max_k`` (default ``L // 2``). ``max_eval_tokens`` caps the held-out tokens of both.
    A masked LM runs the masked protocol (``n_mask`` positions per line, ``mask_seed``): every score
    is at the masked positions, and ``protocol`` / ``masking`` say so; its ``linear`` pruning maps are
    fitted at every position (:func:`every_position_stats`; ``n_pruning_fit_tokens``).
    ``stats_device`` / ``memory_limit``: the memory plan, as in :func:`~lensmat.analyses.compare.compare`;
    ``bootstrap``: the intervals over held-out documents of every pruning point (``ci_low``/``ci_high``) and
    of the held-out scores (``ci_low.heldout_linearity``, ...; :func:`heldout_linearity_intervals`, one more
    forward over the held-out tokens).
    Also ``anisotropy`` and ``intrinsic_dimension`` (L+1 floats each, residual layer ``l`` = ``h_l``, on
    ``heldout``; :mod:`~lensmat.analyses.geometry`) and ``geometry`` (their settings and token counts); the
    intrinsic dimension reads the first ``max_id_tokens`` held-out tokens (stored; ``0``: not computed,
    ``null``s) and is computed on ``stats_device`` (default the CPU).
    """
    from lensmat.stats.plan import check_memory
    from lensmat.analyses.common import protocol_fields, start_run

    model = start_run(model)
    n_layers = int(model.cfg.n_layers)
    max_k = n_layers // 2 if max_k is None else max_k
    if not 0 <= max_k <= n_layers:
        raise ValueError(f"max_k={max_k} is out of range: prune between 0 and {n_layers} blocks.")
    train = tokenized(model, dataset, "train", max_length, n_mask=n_mask, mask_seed=mask_seed)
    memory = check_memory(model, "linearity", train, batch_size=batch_size, stats_device=stats_device,
                          memory_limit=memory_limit, progress=progress, id_tokens=max_id_tokens)
    start = time.perf_counter()
    stats = collect_layer_stats(model, train, max_tokens=max_fit_tokens, batch_size=batch_size, pairs="adjacent",
                                progress=progress, stats_device=stats_device)
    block_stats = stats if train.masking is None else every_position_stats(
        model, train, max_tokens=max_fit_tokens, batch_size=batch_size, progress=progress, stats_device=stats_device)
    provenance = {**train.provenance(), "n_tokens": block_stats.n, "fit_seconds": time.perf_counter() - start}
    variants = {"identity": block_maps(model, stats, identity=True),
                "linear": block_maps(model, block_stats, provenance=provenance)}
    n_block_tokens = block_stats.n
    del block_stats  # the maps are kept; the held-out statistics take its memory (the plan counts two sets)
    heldout = tokenized(model, dataset, "heldout", max_length, n_mask=n_mask, mask_seed=mask_seed)
    heldout_stats = collect_layer_stats(model, heldout, max_tokens=max_eval_tokens, batch_size=batch_size,
                                        pairs="adjacent", progress=progress, stats_device=stats_device)
    profile = linearity_profile(stats, heldout_stats)
    order = sorted(range(n_layers), key=lambda b: -profile["linearity"][b])
    sample = LayerSample(heldout_stats.hooks, max_id_tokens)
    pruning, n_eval = evaluate_pruning(model, variants, order, heldout.batches(batch_size, max_eval_tokens),
                                       max_k=max_k, total_tokens=heldout.n_tokens(max_eval_tokens), progress=progress,
                                       sample=sample, bootstrap=bootstrap)
    geometry = geometry_fields(heldout_stats, sample, split="heldout", device=stats_device, progress=progress)
    report = {
        "model": describe(model).name, "n_layers": n_layers, **protocol_fields(heldout), "n_fit_tokens": stats.n,
        "n_pruning_fit_tokens": n_block_tokens, "n_eval_tokens": n_eval,
        "linearity": profile["linearity"], "linearity_no_residual": profile["linearity_no_residual"],
        "mean_linearity": profile["mean"], "mean_linearity_no_residual": profile["mean_no_residual"],
        "heldout_linearity": profile["heldout_linearity"],
        "heldout_linearity_no_residual": profile["heldout_linearity_no_residual"],
        "mean_heldout_linearity": profile["heldout_mean"],
        "mean_heldout_linearity_no_residual": profile["heldout_mean_no_residual"],
        "norm_ratio": profile["norm_ratio"], "cosine": profile["cosine"],
        "order": order, "pruning": pruning, "memory_plan": memory, **geometry,
        **heldout_linearity_intervals(model, stats, heldout_stats, heldout.batches(batch_size, max_eval_tokens), bootstrap),
    }
    return report

"""Early exit with lenses: stop computing at the layer where a lens is confident enough.

Confidence exit ("Jump to Conclusions", Yom Din et al. 2023): at each residual layer ``l ≥ 1``
read the lens distribution; confidence = ``p(1) − p(2)`` (top-two gap); exit at the first layer
where confidence > ``θ(t) = 0.9·λ + 0.1·exp(−τ·t/N)``, ``t`` the 0-based position of the token in
its line (the first token after BOS is ``t = 0``), ``τ = 4``, ``N`` = mean of ``t + 1`` over the
evaluation tokens. Exiting at layer ``l`` costs ``l`` blocks and emits the lens's top-1 there; a
token that never exits costs ``L`` blocks and emits the model's top-1. Precision@1 compares the
emitted token with the full model's top-1; accuracy compares it with the actual next token. The
lens's own cost (a map and the unembedding per layer) is not counted in ``mean_layers``.

Saturation exit ("Looking Beyond the Top-1", Lioubashevski et al. 2024): ``s_1`` is the first
layer from which the lens's top-1 equals the model's final top-1 at every later layer. Exit rules,
each over layers ``l ≥ 1`` (``L`` if never): ``probe`` (a logistic regression on ``h_l``, trained on
``train``, predicting ``l ≥ s_1``; exit when P > threshold), ``gap`` (top-two gap > threshold),
``cosine`` (``cos(h_l, h_{l−1})`` > threshold) and ``oracle`` (exit at ``max(s_1, 1)``). Speed-up =
``L · tokens / blocks run``; each row reports Precision@1 (agreement with the model's top-1) and
accuracy (against the actual next token), as the confidence curves do.

Fixed exit, the baseline of the paper's figure: every token exits at the same layer ``l = 1..L``.

A masked LM (BERT family) is read under the masked protocol (:mod:`lensmat.data.corpora`), as in the
authors' BERT code (``bert_add_results.py``): every exit is simulated at the ``[MASK]`` positions,
Precision@1 compares with the full model's top-1 there and accuracy with the original token; the
threshold is evaluated at the constant ``t = 3`` (:data:`MASKED_T`; the paper's text says the token's
position) with ``N`` = mean of ``position + 1`` over the masked positions (``[CLS]`` at position 0).
Only the lenses of :data:`~lensmat.lenses.registry.MASKED_LM_LENSES` apply.

:func:`lensmat.analyses.generation.generate` is the real thing: greedy decoding that stops running blocks
at the exit layer and fills the skipped layers' key/value cache from the exit layer's hidden
state (CALM's state propagation, Schuster et al. 2022), on any causal architecture. An encoder
does not decode token by token, so it has no such loop: for a masked LM the exit stays simulated.
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float, Int

from lensmat import data
from lensmat.models import describe
from lensmat.stats.bootstrap import Bootstrap, with_intervals
from lensmat.analyses.saturation import SATURATION_LENSES
from lensmat.analyses.saturation_probes import balanced_probe, single_blas_thread
from lensmat.analyses.saturation_rankings import Rankings, collect_rankings, saturation_layers

MASKED_T = 3  # the authors' BERT code evaluates θ at t = 3 for every token: early_exit_threshold(layer, 3, params)
LAMBDAS = (-1.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.2)
TAU = 4.0
THRESHOLDS = {
    "gap": (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "cosine": (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.999),
    "probe": (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
}


def exit_threshold(lam: float, t: Int[torch.Tensor, "n"], n_mean: float, tau: float = TAU) -> Float[torch.Tensor, "n"]:
    """``θ(t) = 0.9·λ + 0.1·exp(−τ·t/N)``."""
    return 0.9 * lam + 0.1 * torch.exp(-tau * t.double() / n_mean)


def first_exit(signal: Float[torch.Tensor, "layers n"], threshold: Float[torch.Tensor, "n"] | float) -> Int[torch.Tensor, "n"]:
    """First layer ``l`` in ``1..L-1`` with ``signal[l] > threshold`` (``L`` = ``layers − 1`` if none)."""
    n_layers = signal.shape[0] - 1
    above = signal[1:n_layers] > torch.as_tensor(threshold, dtype=signal.dtype)
    exits = torch.full((signal.shape[1],), n_layers, dtype=torch.int64)
    hit = above.any(0)
    exits[hit] = above.to(torch.int64).argmax(0)[hit] + 1
    return exits


def emitted_tokens(top1: Int[torch.Tensor, "layers n"], exits: Int[torch.Tensor, "n"]) -> Int[torch.Tensor, "n"]:
    """The lens's top-1 at each token's exit layer."""
    return top1.gather(0, exits[None])[0]


def exit_scores(exits: Int[torch.Tensor, "n"], top1: Int[torch.Tensor, "layers n"], final_top1: Int[torch.Tensor, "n"],
                targets: Int[torch.Tensor, "n"], docs: Int[torch.Tensor, "n"] | None = None,
                bootstrap: Bootstrap | None = None) -> dict:
    """Mean blocks run, Precision@1 against the model and accuracy against the text (positions
    with a next token) for given exit layers, each with ``ci_low``/``ci_high``: ``bootstrap``'s interval
    over the documents ``docs`` (default: each token its own)."""
    emitted = emitted_tokens(top1, exits)
    has = targets >= 0
    bootstrap = Bootstrap() if bootstrap is None else bootstrap
    return with_intervals({"mean_layers": bootstrap.means(exits.double(), docs),
                           "precision@1": bootstrap.means((emitted == final_top1).double(), docs),
                           "accuracy": bootstrap.means((emitted == targets).double(), docs, has)})


def positions(rankings: Rankings) -> Int[torch.Tensor, "n"]:
    """0-based position ``t`` of each ranked token in its line (BOS excluded)."""
    return torch.tensor([pos - 1 for _, pos in rankings.origin])


def threshold_positions(rankings: Rankings, masked: bool = False,
                        masked_t: int | None = MASKED_T) -> tuple[Int[torch.Tensor, "n"], float]:
    """``(t [n], N)`` of ``θ(t)`` for each ranked token. Causal: ``t`` = :func:`positions`, ``N`` = mean
    of ``t + 1``. Masked (the authors' BERT code): ``t = masked_t`` for every token (``None``: its
    position in ``[CLS] line [SEP]``), ``N`` = mean of ``position + 1``."""
    if not masked:
        t = positions(rankings)
        return t, float((t + 1).double().mean())
    pos = torch.tensor([p for _, p in rankings.origin])
    return (pos if masked_t is None else torch.full_like(pos, masked_t)), float((pos + 1).double().mean())


def confidence_curve(rankings: Rankings, targets: Int[torch.Tensor, "n"], lambdas=LAMBDAS, tau: float = TAU, *,
                     masked: bool = False, masked_t: int | None = MASKED_T, bootstrap: Bootstrap | None = None) -> list[dict]:
    """The paper's confidence exit for each λ: ``[{lambda, mean_layers, precision@1, accuracy}]``;
    ``masked``: rankings of a masked-protocol corpus (``t`` and ``N`` from :func:`threshold_positions`)."""
    t, n_mean = threshold_positions(rankings, masked, masked_t)
    gap = rankings.top_two_gap
    top1, final = rankings.lens_topk[..., 0], rankings.final_topk[:, 0]
    return [{"lambda": lam, **exit_scores(first_exit(gap, exit_threshold(lam, t, n_mean, tau)), top1, final, targets,
                                          rankings.documents, bootstrap)}
            for lam in lambdas]


def layers_saved(curve: list[dict], n_layers: int, retention: float = 0.95) -> float:
    """``1 − cost/L`` at the lowest cost whose Precision@1 ≥ ``retention``, interpolating linearly
    between neighbouring points of the curve sorted by cost."""
    pts = sorted((p["mean_layers"], p["precision@1"]) for p in curve)
    if not 0 < retention <= 1:
        raise ValueError(f"retention={retention} is not a share of Precision@1: use 0 < retention <= 1.")
    costs = [c for c, p in pts if p >= retention]
    for (c0, p0), (c1, p1) in zip(pts, pts[1:]):
        if (p0 - retention) * (p1 - retention) < 0:
            costs.append(c0 + (retention - p0) * (c1 - c0) / (p1 - p0))
    if not costs:
        raise ValueError(f"No point of the curve reaches Precision@1 ≥ {retention}; include a λ that never exits.")
    return 1.0 - min(costs) / n_layers


def cosine_signal(resid: Float[torch.Tensor, "layers n d"]) -> Float[torch.Tensor, "layers n"]:
    """``cos(h_l, h_{l−1})`` per layer (0 at layer 0)."""
    cos = torch.nn.functional.cosine_similarity(resid[1:].double(), resid[:-1].double(), dim=-1)
    return torch.cat([torch.zeros_like(cos[:1]), cos])


class ProbeDataError(ValueError):
    """Probe training tokens whose (token, layer) pairs are all saturated, or none is."""


class SaturationProbe:
    """Logistic regression on ``h_l`` (standardised) predicting whether the top-1 has saturated
    (``l ≥ s_1``), pooled over layers ``1..L-1``, class-balanced."""

    def __init__(self, seed: int = 0) -> None:
        self.clf = balanced_probe(max_iter=2000, seed=seed)

    def fit(self, resid: Float[torch.Tensor, "layers n d"], s1: Int[torch.Tensor, "n"]) -> "SaturationProbe":
        n_layers = resid.shape[0] - 1
        layers = torch.arange(1, n_layers)[:, None]
        y = (layers >= s1[None]).reshape(-1).numpy()
        if y.all() or not y.any():
            raise ProbeDataError(f"The saturation probe needs saturated and unsaturated (token, layer) pairs, but at "
                                 f"layers 1..{n_layers - 1} {'every' if y.all() else 'no'} pair of its {len(s1)} "
                                 "tokens is saturated; give it more tokens (--max-probe-tokens).")
        with single_blas_thread():
            self.clf.fit(resid[1:n_layers].reshape(-1, resid.shape[-1]).numpy(), y)
        return self

    def signal(self, resid: Float[torch.Tensor, "layers n d"]) -> Float[torch.Tensor, "layers n"]:
        """P(saturated) per layer (0 at layers 0 and L, which the exit rule never reads)."""
        n_layers = resid.shape[0] - 1
        with single_blas_thread():
            p = self.clf.predict_proba(resid[1:n_layers].reshape(-1, resid.shape[-1]).numpy())[:, 1]
        out = torch.zeros(resid.shape[:2], dtype=torch.float64)
        out[1:n_layers] = torch.from_numpy(p).reshape(n_layers - 1, -1)
        return out


def fixed_exit(rankings: Rankings, targets: Int[torch.Tensor, "n"], bootstrap: Bootstrap | None = None) -> list[dict]:
    """Every token exits at layer ``l`` (``l = 1..L``): ``[{layer, mean_layers, precision@1, accuracy}]``."""
    n_layers = rankings.lens_topk.shape[0] - 1
    top1, final = rankings.lens_topk[..., 0], rankings.final_topk[:, 0]
    return [{"layer": layer, **exit_scores(torch.full_like(final, layer), top1, final, targets, rankings.documents,
                                           bootstrap)}
            for layer in range(1, n_layers + 1)]


def saturation_curves(rankings: Rankings, targets: Int[torch.Tensor, "n"], probe: SaturationProbe | None = None,
                      thresholds=THRESHOLDS, bootstrap: Bootstrap | None = None) -> dict:
    """``{method: [{threshold, mean_layers, precision@1, accuracy, speedup}]}``: Precision@1 = the
    emitted token is the model's final top-1, accuracy = it is ``targets`` (:meth:`Rankings.targets`:
    the actual next token, −1 where there is none, or the original token at a masked position)."""
    n_layers = rankings.lens_topk.shape[0] - 1
    top1, final = rankings.lens_topk[..., 0], rankings.final_topk[:, 0]
    s1 = saturation_layers(top1[..., None], final[:, None])[:, 0]

    def row(threshold, exits):
        return {"threshold": threshold, **exit_scores(exits, top1, final, targets, rankings.documents, bootstrap),
                "speedup": n_layers * len(exits) / max(int(exits.sum()), 1)}

    signals = {"gap": rankings.top_two_gap}
    if rankings.resid is not None:
        signals["cosine"] = cosine_signal(rankings.resid)
        if probe is not None:
            signals["probe"] = probe.signal(rankings.resid)
    out = {m: [row(th, first_exit(sig, th)) for th in thresholds[m]] for m, sig in signals.items()}
    out["oracle"] = [row(None, s1.clamp(min=1))]
    return out


def lens_probe(rankings: Rankings, name: str, seed: int = 0) -> SaturationProbe | None:
    """The saturation probe of lens ``name`` fitted on its ``rankings`` of the probe's train tokens; ``None``,
    with a warning, when they are all saturated or none is (:class:`ProbeDataError`)."""
    s1 = saturation_layers(rankings.lens_topk[..., :1], rankings.final_topk[:, :1])[:, 0]
    try:
        return SaturationProbe(seed).fit(rankings.resid, s1)
    except ProbeDataError as err:  # e.g. a few [MASK]s on a shallow model: the other curves still run
        warnings.warn(f"{err} The {name} lens's probe exit is left out.", RuntimeWarning, stacklevel=3)
        return None


def early_exit(model=None, dataset: str | None = None, *, lenses=("logit", "mat"), retention: float = 0.95,
               max_fit_tokens: int | None = None, max_eval_tokens: int | None = 10_000,
               max_probe_tokens: int = 5_000, lambdas=LAMBDAS, batch_size: int = 16,
               max_length: int = data.DEFAULT_MAX_LENGTH, n_mask: int = 1, mask_seed: int = 0,
               masked_t: int | None = MASKED_T, stats_device: str | None = None, memory_limit: int | None = None,
               bootstrap: Bootstrap | None = None, progress: bool = True, seed: int = 0) -> dict:
    """Confidence-exit curves and savings per lens, and saturation-exit curves per method and lens.

    Lenses are fitted on ``train`` (``mat`` maps on up to ``max_fit_tokens``; ``tuned`` trained
    with its defaults), the saturation probe on ``max_probe_tokens`` train tokens, everything is
    scored on ``heldout``. Returns the ``early-exit`` report; the
    top-level ``saturation`` holds the first lens's curves, ``saturation_by_lens`` all of them; a
    lens whose probe tokens are all saturated, or none is (:class:`ProbeDataError`), has no ``probe``
    curve (with a warning).
    A masked LM runs the masked protocol (``n_mask`` positions per line, ``mask_seed``; lenses among
    :data:`~lensmat.lenses.registry.MASKED_LM_LENSES`; ``θ`` at ``t = masked_t``, ``None`` for each token's
    position): the report says ``protocol``, ``masking`` and ``threshold_t``.
    ``stats_device`` / ``memory_limit``: the memory plan, and ``bootstrap``: the intervals (``ci_low`` /
    ``ci_high`` in every curve point, over held-out documents), as in :func:`~lensmat.analyses.compare.compare`.
    """
    from lensmat.stats.plan import check_memory
    from lensmat.lenses.registry import build_lenses, parse_lenses, refuse_causal_lenses_on_masked_lm
    from lensmat.analyses.common import protocol_fields, start_run
    from lensmat.stats.pipeline import tokenized

    names = parse_lenses(lenses)
    if set(names) - set(SATURATION_LENSES):
        raise ValueError(f"Early exit needs lenses defined at every layer: {', '.join(SATURATION_LENSES)} "
                         f"(not {', '.join(sorted(set(names) - set(SATURATION_LENSES)))}).")
    model = start_run(model)
    refuse_causal_lenses_on_masked_lm(model, names)
    n_layers = int(model.cfg.n_layers)
    train = tokenized(model, dataset, "train", max_length, n_mask=n_mask, mask_seed=mask_seed)
    memory = check_memory(model, "early-exit", train, batch_size=batch_size, stats_device=stats_device,
                          memory_limit=memory_limit, progress=progress, fits_maps=any(n.startswith("mat") for n in names))
    built, cost, _ = build_lenses(model, names, train, max_fit_tokens=max_fit_tokens, batch_size=batch_size,
                                  stats_device=stats_device, progress=progress)
    heldout = tokenized(model, dataset, "heldout", max_length, n_mask=n_mask, mask_seed=mask_seed)
    masked = heldout.masking is not None
    curves, savings, fixed, sat = {}, {}, {}, {}
    n_eval = 0
    for name in names:
        probe_data = collect_rankings(model, built[name], train, k=2, batch_size=batch_size,
                                      max_tokens=max_probe_tokens, progress=progress)
        probe = lens_probe(probe_data, name, seed)
        r = collect_rankings(model, built[name], heldout, k=2, batch_size=batch_size,
                             max_tokens=max_eval_tokens, progress=progress)
        n_eval, targets = len(r.origin), r.targets(heldout)
        curves[name] = confidence_curve(r, targets, lambdas, masked=masked, masked_t=masked_t, bootstrap=bootstrap)
        savings[name] = layers_saved(curves[name], n_layers, retention)
        fixed[name] = fixed_exit(r, targets, bootstrap)
        sat[name] = saturation_curves(r, targets, probe, bootstrap=bootstrap)
        n_documents = len(set(line for line, _ in r.origin))
    report = {
        "model": describe(model).name, "n_layers": n_layers, **protocol_fields(heldout), "n_eval_tokens": n_eval,
        "retention": retention, "tau": TAU, "threshold_t": masked_t if masked and masked_t is not None else "position",
        "curves": curves, "savings": savings, "fixed_exit": fixed, "saturation": sat[names[0]],
        "saturation_lens": names[0], "saturation_by_lens": sat, "fit_cost": cost, "memory_plan": memory,
        "bootstrap": (bootstrap or Bootstrap()).to_dict(n_documents),
    }
    return report

"""In which order do the top-k tokens settle? ("Looking Beyond the Top-1", Lioubashevski et al. 2024,
arXiv 2410.20210), under any lens.

Saturation layer ``s_k`` of a token (``k = 1..K``): the earliest residual layer ``l ≥ 1`` (a block
output, as in the authors' code: the embedding ``h_0`` is not read) from which the lens's rank-k
token equals the model's final rank-k token at every layer ``l..L``. Layer ``L`` is always read as
the model's own output (every lens agrees with it there), so ``s_k ≤ L``, and ``s_k = L`` means
"not saturated before the final layer".

The protocol, with the authors' definitions (daria-lioubashevski/beyond_top1): keep tokens whose
top-1 saturates by block output ``⌊0.85·L⌋`` (residual layer ``⌊0.85·L⌋ + 1``); the mean rank of
``s_k`` among ``s_1..s_K`` over the tokens whose rank k saturates before ``L`` (ties take the lowest
rank); the strict Kendall τ between ``(1..m)`` and ``(s_1..s_m)`` (ties count as discordant), ``m``
= the last rank saturated before ``L`` (tokens with ``m ≥ 3``; ranks inside that prefix that never
saturate count against the order), averaged over tokens, with a permutation test that shuffles all
``K`` layers of a token and then truncates to ``m``. ``order_rule="leading"`` is lensmat's earlier,
stricter rule: ``m`` = the number of *leading* ranks saturated before ``L``, shuffled among
themselves. Then a probe that reads the current "task" from the residual stream, and an
intervention that implants an early-saturating token's state into a late one.

A masked LM (BERT family) runs all of it under the masked protocol (:mod:`lensmat.data.corpora`): the
tokens ranked are the ``[MASK]`` positions of ``[CLS] line [SEP]`` lines, and an implant runs the
late token's whole line, every masked position as ``[MASK]``, exactly as it was ranked (attention
reads both directions, so a prefix would change every state).

Here: the protocol's statistics and :func:`saturation`; the rankings and ``s_k`` in
:mod:`~lensmat.analyses.saturation_rankings`, the probes in :mod:`~lensmat.analyses.saturation_probes`, the
implant in :mod:`~lensmat.analyses.saturation_implant`.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int

from lensmat import data
from lensmat.analyses.saturation_implant import implant
from lensmat.analyses.saturation_probes import pooled_probe, probe_accuracy, task_labels
from lensmat.analyses.saturation_rankings import collect_rankings, saturation_layers
from lensmat.models import describe
from lensmat.models.vision import is_vision_model
from lensmat.models.seq2seq import is_seq2seq_model
from lensmat.stats.bootstrap import Bootstrap, Interval, reported, with_intervals


def kept_tokens(s: Int[torch.Tensor, "n k"], n_layers: int, frac: float = 0.85) -> torch.Tensor:
    """Boolean mask of the tokens the paper keeps: top-1 saturated by block output ``⌊frac·L⌋``
    (0-based, the authors' numbering), i.e. ``s_1 ≤ ⌊frac·L⌋ + 1`` in residual layers."""
    return s[:, 0] <= int(frac * n_layers) + 1


def mean_ranks(s: Int[torch.Tensor, "n k"], n_layers: int) -> list[float | None]:
    """Per rank k, the mean over tokens whose ``s_k < L`` of the rank of ``s_k`` among the token's
    ``s_1..s_K`` (1 = earliest; tied layers take the lowest rank, as the authors' ``sorted.index``);
    ``None`` where no token's rank k saturates before ``L``."""
    return reported(rank_means(s, n_layers).value)


def rank_means(s: Int[torch.Tensor, "n k"], n_layers: int, docs: Int[torch.Tensor, "n"] | None = None,
               bootstrap: Bootstrap | None = None) -> Interval:
    """:func:`mean_ranks` (NaN for ``None``) with ``bootstrap``'s interval over the documents ``docs``
    (default: each token its own)."""
    rank = 1 + (s[:, None, :] < s[:, :, None]).sum(-1).double()  # [n, k]: values strictly below s_k
    return (bootstrap or Bootstrap()).means(rank.T, docs, s.T < n_layers)


ORDER_RULES = ("authors", "leading")
SATURATION_LENSES = ("logit", "mat", "mat-affine", "tuned", "mat-tuned")  # lenses defined at every layer


def order_prefix(s: Int[torch.Tensor, "n k"], n_layers: int, rule: str = "authors") -> Int[torch.Tensor, "n"]:
    """``m`` per token, the ranks ``1..m`` the order test compares: ``authors``, up to the last rank
    saturated before ``L``; ``leading``, the leading run of ranks saturated before ``L``."""
    saturated = s < n_layers
    if rule == "authors":
        return (saturated * torch.arange(1, s.shape[1] + 1)).amax(1)
    if rule == "leading":
        return saturated.to(torch.int64).cumprod(1).sum(1)
    raise ValueError(f"Unknown order rule {rule!r}; valid: {', '.join(ORDER_RULES)}.")


def strict_kendall_tau(s: Int[torch.Tensor, "n m"]) -> Float[torch.Tensor, "n"]:
    """Kendall τ between ``(1..m)`` and each row of ``s``: (concordant − discordant) / C(m, 2), a
    pair ``i < j`` concordant only when ``s_i < s_j`` strictly (ties are discordant)."""
    m = s.shape[1]
    i, j = torch.triu_indices(m, m, offset=1)
    concordant = (s[:, i] < s[:, j]).double().sum(1)
    pairs = m * (m - 1) / 2
    return (2 * concordant - pairs) / pairs


def order_test(s: Int[torch.Tensor, "n k"], n_layers: int, *, rule: str = "authors", min_k: int = 3,
               n_permutations: int = 1000, seed: int = 0, docs: Int[torch.Tensor, "n"] | None = None,
               bootstrap: Bootstrap | None = None) -> dict:
    """Mean strict τ over tokens with ``m ≥ min_k`` (each on its ranks ``1..m``, :func:`order_prefix`),
    with ``bootstrap``'s interval over the documents ``docs`` (``ci_low``/``ci_high``), and a
    one-sided permutation p-value, ``(1 + #{τ_perm ≥ τ}) / (1 + n_permutations)``. The null
    shuffles a token's layers, all ``K`` then truncated to ``m`` (``authors``) or its ``m`` (``leading``)."""
    if n_permutations < 1:
        raise ValueError(f"n_permutations={n_permutations}: the permutation test needs at least 1 shuffle.")
    m = order_prefix(s, n_layers, rule)
    groups = [(int(w), s[m == w]) for w in range(min_k, s.shape[1] + 1) if int((m == w).sum())]
    n = sum(len(g) for _, g in groups)
    if n == 0:
        return {"kendall_tau": None, "ci_low": {"kendall_tau": None}, "ci_high": {"kendall_tau": None},
                "p_value": None, "n_tokens": 0}
    tau = torch.zeros(len(s), dtype=torch.float64)
    for w, _ in groups:
        tau[m == w] = strict_kendall_tau(s[m == w][:, :w])
    interval = (bootstrap or Bootstrap()).means(tau, docs, m >= min_k)
    observed = float(interval.value)
    gen = torch.Generator().manual_seed(seed)
    as_large = 0
    for _ in range(n_permutations):
        total = 0.0
        for w, g in groups:
            width = g.shape[1] if rule == "authors" else w
            perm = torch.rand((g.shape[0], width), generator=gen).argsort(1)
            total += float(strict_kendall_tau(g[:, :width].gather(1, perm)[:, :w]).sum())
        as_large += total / n >= observed - 1e-12
    return {**with_intervals({"kendall_tau": interval}), "p_value": (1 + as_large) / (1 + n_permutations), "n_tokens": n}


def saturation(model=None, dataset: str | None = None, *, lens: str = "logit", k: int = 5,
               max_fit_tokens: int | None = None, max_eval_tokens: int | None = 5_000, frac: float = 0.85,
               n_permutations: int = 1000, order_rule: str = "authors", max_pairs: int = 100, batch_size: int = 16,
               max_length: int = data.DEFAULT_MAX_LENGTH, n_mask: int = 1, mask_seed: int = 0,
               stats_device: str | None = None, memory_limit: int | None = None,
               bootstrap: Bootstrap | None = None, progress: bool = True, seed: int = 0) -> dict:
    """The saturation protocol on ``heldout`` under one lens (one of :data:`SATURATION_LENSES`,
    fitted on ``train``); returns the ``saturation`` report.
    ``kendall_tau`` / ``p_value`` follow ``order_rule``; ``order_tests`` holds both rules.
    A masked LM runs the masked protocol (``n_mask`` positions per line, ``mask_seed``): the ranks,
    probes and implants are at its ``[MASK]`` positions, and the lens is one of
    :data:`~lensmat.lenses.registry.MASKED_LM_LENSES`; the report says which (``protocol``, ``masking``).
    ``stats_device`` / ``memory_limit``: the memory plan, as in :func:`~lensmat.analyses.compare.compare`.
    ``mean_layer``, ``mean_rank`` and ``kendall_tau`` carry ``bootstrap``'s intervals over held-out documents
    (``ci_low.{name}``, ``ci_high.{name}``; the permutation p-value stays the order test's).
    A ViT image classifier (:mod:`lensmat.models.vision`) runs the protocol at the CLS token of each held-out
    image of ``dataset`` (default ``"digits"``; ``max_fit_tokens`` / ``max_eval_tokens`` count images; lenses
    ``logit``, ``mat``, ``mat-affine``), without the implant (:mod:`~lensmat.analyses.saturation_vision`).
    An encoder-decoder model (Whisper, T5: :mod:`lensmat.models.seq2seq`) runs it at its decoder's positions
    under teacher forcing, on its own inputs (``dataset`` ``None``; the budgets count decoder positions; lenses
    ``logit``, ``mat``), without the implant (:mod:`~lensmat.analyses.saturation_seq2seq`)."""
    from lensmat.stats.plan import check_memory
    from lensmat.lenses.registry import build_lenses, refuse_causal_lenses_on_masked_lm
    from lensmat.analyses.common import protocol_fields, start_run
    from lensmat.stats.pipeline import tokenized

    if lens not in SATURATION_LENSES:
        raise ValueError(f"Unknown lens {lens!r} for saturation; valid: {', '.join(SATURATION_LENSES)}.")
    if order_rule not in ORDER_RULES:
        raise ValueError(f"Unknown order rule {order_rule!r}; valid: {', '.join(ORDER_RULES)}.")
    model = start_run(model, seq2seq=True)
    if not 1 <= k < int(model.cfg.d_vocab):
        raise ValueError(f"k={k} ranks cannot be followed in a vocabulary of {model.cfg.d_vocab} tokens; "
                         f"use 1 <= k < {model.cfg.d_vocab}.")
    if is_vision_model(model):  # a ViT: the CLS token of each held-out image (lensmat.analyses.saturation_vision)
        from lensmat.analyses.saturation_vision import image_saturation_layers

        s, docs, resid, fields = image_saturation_layers(model, dataset, lens=lens, k=k, max_fit_images=max_fit_tokens,
                                                         max_images=max_eval_tokens, batch_size=batch_size, progress=progress)
        return {**fields, **order_statistics(s, docs, resid, fields["n_layers"], frac=frac, n_permutations=n_permutations,
                                             order_rule=order_rule, seed=seed, bootstrap=bootstrap)}
    if is_seq2seq_model(model):  # Whisper / T5: the decoder's positions, teacher-forced (lensmat.analyses.saturation_seq2seq)
        from lensmat.analyses.saturation_seq2seq import saturation_seq2seq

        return saturation_seq2seq(model, dataset, lens=lens, k=k, max_fit_tokens=max_fit_tokens,
                                  max_eval_tokens=max_eval_tokens, frac=frac, n_permutations=n_permutations,
                                  order_rule=order_rule, batch_size=batch_size, bootstrap=bootstrap, seed=seed)
    refuse_causal_lenses_on_masked_lm(model, [lens])
    n_layers = int(model.cfg.n_layers)
    train = tokenized(model, dataset, "train", max_length, n_mask=n_mask, mask_seed=mask_seed)
    memory = check_memory(model, "saturation", train, batch_size=batch_size, stats_device=stats_device,
                          memory_limit=memory_limit, progress=progress, fits_maps=lens.startswith("mat"))
    lenses, _, _ = build_lenses(model, [lens], train, max_fit_tokens=max_fit_tokens, batch_size=batch_size,
                                stats_device=stats_device, progress=progress)
    heldout = tokenized(model, dataset, "heldout", max_length, n_mask=n_mask, mask_seed=mask_seed)
    rankings = collect_rankings(model, lenses[lens], heldout, k=k, batch_size=batch_size,
                                max_tokens=max_eval_tokens, progress=progress)
    s = saturation_layers(rankings.lens_topk, rankings.final_topk, start=1)
    keep = kept_tokens(s, n_layers, frac)
    report = {"model": describe(model).name, "n_layers": n_layers, "lens": lens, "k": k, **protocol_fields(heldout),
              **order_statistics(s, rankings.documents, rankings.resid, n_layers, frac=frac,
                                 n_permutations=n_permutations, order_rule=order_rule, seed=seed,
                                 bootstrap=bootstrap),
              "memory_plan": memory}
    result = implant(model, lenses[lens], rankings.select(keep), s[keep][:, 0], max_pairs=max_pairs, seed=seed)
    report.update(intervention_success=result["success"], intervention_trials=result["n_trials"],
                  intervention_sweep=result["by_offset"])
    return report


def order_statistics(s: Int[torch.Tensor, "n k"], docs: Int[torch.Tensor, "n"],
                     resid: Float[torch.Tensor, "layers n d"], n_layers: int, *, frac: float = 0.85,
                     n_permutations: int = 1000, order_rule: str = "authors", seed: int = 0,
                     bootstrap: Bootstrap | None = None) -> dict:
    """The protocol's report fields from the saturation layers ``s`` (``s_k``, residual layers, of
    every ranked token; :func:`~lensmat.analyses.saturation_rankings.saturation_layers` with
    ``start=1``), each token's document ``docs`` (the intervals' unit) and its residual stream
    ``resid`` at layers 0..L (for the probes), whatever the model reads (text, image, speech):
    the kept tokens (``frac``), ``mean_layer``, ``mean_rank`` and ``kendall_tau`` with intervals,
    ``p_value`` and ``order_tests`` (both rules), the per-layer and pooled task probes, ``bootstrap``."""
    keep = kept_tokens(s, n_layers, frac)
    sk, docs = s[keep], docs[keep]
    tests = {rule: order_test(sk, n_layers, rule=rule, n_permutations=n_permutations, seed=seed, docs=docs,
                              bootstrap=bootstrap) for rule in ORDER_RULES}
    order = tests[order_rule]
    labels = task_labels(sk, n_layers)
    resid = resid[:, keep]
    report = {
        "n_tokens": int(s.shape[0]), "n_kept": int(keep.sum()), "frac": frac, "max_s1": int(frac * n_layers) + 1,
        **with_intervals({"mean_layer": (bootstrap or Bootstrap()).means(sk.T.double(), docs),
                          "mean_rank": rank_means(sk, n_layers, docs, bootstrap)}),
        "kendall_tau": order["kendall_tau"], "p_value": order["p_value"], "n_order_tokens": order["n_tokens"],
        "order_rule": order_rule, "order_tests": tests,
        "probe_accuracy": probe_accuracy(resid, labels, seed=seed),
        "probe_control": probe_accuracy(resid, labels, seed=seed, control=True),
        "bootstrap": (bootstrap or Bootstrap()).to_dict(len(set(docs.tolist()))),
    }
    for bound in ("ci_low", "ci_high"):
        report[bound]["kendall_tau"] = order[bound]["kendall_tau"]
    report["pooled_probe"] = pooled_probe(resid, sk, n_layers, seed=seed)
    report["pooled_probe_control"] = pooled_probe(resid, sk, n_layers, seed=seed, control=True)
    return report

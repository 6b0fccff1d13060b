"""``lensmat compare``: fit maps on ``train``, score lenses per layer on ``heldout``, report.

The report (``report.json``) follows the project's report contract (``docs/reports.md``): ``model``, ``n_layers``,
``layers``, ``n_fit_tokens``, ``n_eval_tokens``, ``lenses.{name}.{metric}`` (L+1 floats
indexed by residual layer) and ``r2.{mat,id}`` ((L+1)×(L+1), ``null`` where ``l ≥ l'``), plus
``fit_cost.{lens}`` (seconds and tokens spent fitting), ``protocol`` (``"causal"`` or
``"masked"``) and, for a masked LM, ``masking`` (``n_mask`` per line, ``seed``).

A masked LM (BERT family) runs the masked protocol of "Jump to Conclusions": maps fitted on the
masked positions of ``train``, lenses read through the model's masked-LM head and scored at the
masked positions of ``heldout`` against the full model's distribution there (``ce``: against the
original token). The ``logit`` lens is then the paper's ``id`` baseline.

``sites=("post", "mid")`` also reads ``blocks.{l}.hook_resid_mid`` (after attention, before the
MLP) through the logit and mat lenses (TransformerLens's ``logit_lens(incl_mid=True)``): the maps
``resid_mid_l -> h_L`` are fitted in the same pass, and the report gains ``mid.{layers, hooks,
lenses.{name}.{metric}, r2.{mat,id}}`` with one value per block ``l = 0..L-1``.
"""

from __future__ import annotations

import copy
import os

from lensmat import data
from lensmat.stats.collect import parse_sites, resid_hook, resid_hooks, site_hooks
from lensmat.stats.fit import MapSet, r2, r2_matrices
from lensmat.lenses.base import LogitLens, MatLens
from lensmat.lenses.metrics import evaluate_lenses, paired_comparisons
from lensmat.stats.bootstrap import Bootstrap
from lensmat.lenses.patchscope import prompt_ids
from lensmat.models import describe, is_masked_lm
from lensmat.stats.pipeline import tokenized
from lensmat.stats.plan import check_memory
from lensmat.lenses.registry import build_lenses, refuse_causal_lenses_on_masked_lm, split_lenses
from lensmat.analyses.common import protocol_fields, start_run
from lensmat.stats.gram import pair_pattern


# Long for its 20 arguments and their docs; the body (~37 lines) is one pass: tokens, lenses, scores, report.
def compare(
    model=None,
    dataset: str | None = None,
    *,
    lenses: str | list | dict = ("logit", "mat"),
    max_fit_tokens: int | None = None,
    max_eval_tokens: int | None = None,
    batch_size: int = 16,
    max_length: int = data.DEFAULT_MAX_LENGTH,
    maps: MapSet | str | os.PathLike | None = None,
    tuned=None,
    jlens=None,
    tuned_config=None,
    jlens_prompts: int = 20,
    n_mask: int = 1,
    mask_seed: int = 0,
    scoring: data.Scoring | None = None,
    all_pairs: bool = False,
    sites: str | tuple[str, ...] = ("post",),
    patchscope_prompt: str | None = None,
    stats_device: str | None = None,
    memory_limit: int | None = None,
    bootstrap: Bootstrap | None = None,
    views=None,
    progress: bool = True,
) -> dict:
    """Compare lenses layer by layer on held-out text; returns the report dict.

    Args:
        model: a bridge, a spec for :func:`~lensmat.models.load.load_model`, or ``None`` (bundled).
        dataset: corpus spec (default: the bundled Leipzig sentences).
        lenses: names among ``logit``, ``mat`` (no intercept), ``mat-affine``, ``tuned``, ``mat-tuned``,
            ``jacobian``, ``patchscope`` (``"logit,mat"`` or a list), or :class:`~lensmat.lenses.base.Lens` objects, your
            own subclasses included: a ``{name: Lens}`` dict, or a list mixing names and lenses (a
            lens's key is its ``.name``). Given lenses are scored as they are (``fit_cost``:
            ``reused``) and read at the post site only.
        max_fit_tokens / max_eval_tokens: caps on scored tokens of ``train`` / ``heldout``.
        maps: saved no-intercept maps (folder or :class:`MapSet`) to reuse instead of fitting.
        all_pairs: fit and score every pair ``l < l'`` for the full R² heatmap (statistics grow
            as ``(L+1)²·d²``); by default only ``l -> L`` (``(L+1)·2·d²``).
        sites: ``("post",)`` (residual layers 0..L) or ``("post", "mid")`` to read ``hook_resid_mid``
            of every block too, with the ``logit``, ``mat`` and ``mat-affine`` lenses named.
        tuned / jlens: saved lenses to reuse; otherwise trained here (``tuned_config``:
            :class:`~lensmat.lenses.tuned.TunedLensTraining`; the J-lens on ``jlens_prompts`` train lines).
        patchscope_prompt: the patchscope's identity prompt (default: nnterp's,
            :data:`~lensmat.lenses.patchscope.IDENTITY_PROMPT`).
        n_mask / mask_seed: the masked protocol of a masked LM: positions masked per line and the
            seed that picks them (ignored for causal models).
        scoring: for a causal model, which positions are fitted and scored and whether lines get
            BOS (:class:`~lensmat.data.batches.Scoring`; ``Scoring("one-random", bos=False)`` is the paper's
            GPT-2 protocol). Default: every token after BOS.
        stats_device: where the float64 statistics accumulate (default ``cpu``; ``cuda`` keeps them
            beside a GPU model). memory_limit: bytes the plan may use per device (default: the free
            memory); the run is refused before any work when its plan exceeds it (:mod:`lensmat.stats.plan`).
        bootstrap: the intervals' resampling of held-out documents (default
            :class:`~lensmat.stats.bootstrap.Bootstrap()`: 1,000 resamples, seed 0, 95 %).
        views: ``views(model, lenses, heldout) -> dict``, data for ``report.html`` kept under
            ``report["views"]`` (:mod:`lensmat.reports` passes the trajectory view of a few held-out
            lines, :func:`lensmat.analyses.trajectory_view.sample_views`); ``None``: none.

    Every metric carries a bootstrap interval over documents (``lenses.{name}.ci_low.{metric}``,
    ``ci_high``), and ``paired`` compares every pair of post-site lenses layer by layer
    (:func:`~lensmat.lenses.metrics.paired_comparisons`): the difference of Precision@1 and KL with its
    interval, p-value, Holm-adjusted p over the layers and the lens ``ahead`` where that is significant.

    Every lens is scored on the same held-out tokens; ``fit_cost.{lens}`` records the seconds and
    tokens spent fitting it (``reused: true`` when it was loaded).
    """

    (names, given), sites = split_lenses(lenses), parse_sites(sites)
    mid = "mid" in sites
    if mid and all_pairs:
        raise ValueError("The mid site is fitted to the last layer only; drop all_pairs (--all-pairs) or the mid site.")
    model = start_run(model)
    if mid:
        require_mid_site(model)
    refuse_causal_lenses_on_masked_lm(model, lenses)
    n_layers = int(model.cfg.n_layers)
    info = describe(model)
    train = tokenized(model, dataset, "train", max_length, n_mask=n_mask, mask_seed=mask_seed, scoring=scoring)
    heldout = tokenized(model, dataset, "heldout", max_length, n_mask=n_mask, mask_seed=mask_seed, scoring=scoring)
    patchscope = "patchscope" in names and "patchscope" not in given
    memory = check_memory(model, "compare", train, all_pairs=all_pairs, batch_size=batch_size,
                          stats_device=stats_device, memory_limit=memory_limit, progress=progress, mid=mid,
                          patchscope_tokens=prompt_ids(model, patchscope_prompt).shape[1] if patchscope else None)
    lens_objs, fit_cost, mat_maps = build_lenses(
        model, lenses, train, maps=maps, tuned=tuned, jlens=jlens, max_fit_tokens=max_fit_tokens,
        batch_size=batch_size, tuned_config=tuned_config, jlens_prompts=jlens_prompts, all_pairs=all_pairs,
        with_maps=True, stats_device=stats_device, sites=sites, patchscope_prompt=patchscope_prompt, progress=progress)
    groups = [resid_hooks(n_layers)] + ([site_hooks(n_layers, "mid") + [resid_hook(n_layers)]] if mid else [])
    at_mid = mid_lenses(model, [n for n in names if n not in given], lens_objs) if mid else {}
    evaluation = evaluate_lenses(
        model, {**lens_objs, **at_mid}, heldout.batches(batch_size, max_eval_tokens), stats_groups=groups,
        stats_pairs=[pair_pattern(len(g), "all" if all_pairs else "to_last") for g in groups],
        stats_device=stats_device, total_tokens=heldout.n_tokens(max_eval_tokens), bootstrap=bootstrap,
        progress=progress)
    scores, held_stats, n_eval = evaluation
    report = {
        "model": info.name, "model_info": info.to_dict(), "dataset": train.dataset, "n_layers": n_layers,
        "layers": list(range(n_layers + 1)), "n_fit_tokens": int((mat_maps.provenance or {}).get("n_tokens", 0)), "n_eval_tokens": n_eval,
        "lenses": {n: scores[n] for n in lens_objs}, "r2": r2_matrices(held_stats[0], mat_maps.maps),
        # fit_cost as of now (a copy): the views below read the lenses again
        "fit_cost": copy.deepcopy({n: fit_cost[n] for n in names}), **protocol_fields(heldout), "memory_plan": memory,
        "bootstrap": evaluation.bootstrap.to_dict(evaluation.n_documents),
        "paired": paired_comparisons({n: evaluation.sums[n] for n in lens_objs}, evaluation.bootstrap),
    }
    if mid:
        report["mid"] = mid_report(scores, list(at_mid), held_stats[1], mat_maps, n_layers)
    report["sites"] = list(sites)
    if not is_masked_lm(model):
        report["scoring"] = heldout.scoring.to_dict()
    if views is not None:
        report["views"] = views(model, lens_objs, heldout)
    return report


def mid_lenses(model, names: list[str], lenses: dict) -> dict:
    """The lenses read at ``hook_resid_mid`` (``{name}@mid``): the logit lens, and the ``mat`` /
    ``mat-affine`` lenses with the maps ``resid_mid_l -> h_L`` fitted beside their residual ones."""
    out = {}
    for name in names:
        if name == "logit":
            out[f"{name}@mid"] = LogitLens(model, site="mid")
        elif name in ("mat", "mat-affine"):
            out[f"{name}@mid"] = MatLens(model, lenses[name].maps, name=name, site="mid")
    return out


def mid_report(scores: dict, mid_names: list[str], stats, mat_maps: MapSet, n_layers: int) -> dict:
    """The report's ``mid`` part: ``layers`` (blocks ``0..L-1``), ``hooks``, the scores of the
    ``mid_names`` lenses, and R² to ``h_L`` of the mat maps and the identity from the held-out
    statistics ``stats`` of ``(resid_mid_0..resid_mid_{L-1}, h_L)``."""
    mid_hooks, last = site_hooks(n_layers, "mid"), resid_hook(n_layers)
    return {
        "layers": list(range(n_layers)), "hooks": mid_hooks,
        "lenses": {n.removesuffix("@mid"): scores[n] for n in mid_names},
        "r2": {"mat": [r2(stats, mat_maps.get(h, last), h, last) for h in mid_hooks],
               "id": [r2(stats, None, h, last) for h in mid_hooks]},
    }


def require_mid_site(model) -> None:
    """Refuse the mid site on a model without ``hook_resid_mid`` (parallel attention and MLP, as in
    GPT-J, GPT-NeoX/Pythia, Phi-1/2, Falcon: there is no residual stream between them)."""
    missing = [h for h in site_hooks(int(model.cfg.n_layers), "mid") if h not in model.hook_dict]
    if missing:
        parallel = " its attention and MLP read the same input in parallel (cfg.parallel_attn_mlp), so" if getattr(
            model.cfg, "parallel_attn_mlp", False) else ""
        raise ValueError(f"{model.cfg.model_name!r} has no {missing[0]}:{parallel} there is no residual stream between "
                         "attention and MLP to read; use the post site only (--sites post).")


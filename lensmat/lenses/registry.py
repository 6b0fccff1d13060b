"""The start-up every reporting command shares: load the model, build the named lenses, and publish
its output folder with a strict-JSON report (each command checks its memory plan,
:mod:`lensmat.stats.plan`, in between).

``compare``, ``linearity``, ``submodules``, ``saturation`` and ``early_exit`` build on it; it
imports none of them.
"""

from __future__ import annotations

import os
import time

from lensmat.stats.fit import MapSet
from lensmat.lenses.base import LogitLens, MatLens
from lensmat.models import is_masked_lm
from lensmat.stats.pipeline import collect_layer_stats, maps_from_stats

LENS_KINDS = ("logit", "mat", "mat-affine", "tuned", "mat-tuned", "jacobian")
MASKED_LM_LENSES = ("logit", "mat", "mat-affine")  # the tuned lenses and jacobian are trained on next-token prediction


def parse_lenses(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"logit,mat"`` -> ``["logit", "mat"]``, refusing unknown names with the valid list."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in LENS_KINDS]
    if unknown or not names:
        raise ValueError(f"Unknown lens name(s) {unknown or names}; valid lenses: {', '.join(LENS_KINDS)}.")
    return names


def refuse_causal_lenses_on_masked_lm(model, names: list[str]) -> None:
    """Refuse lenses trained on next-token prediction (tuned, mat-tuned, jacobian) for a masked LM."""
    wrong = sorted(set(names) - set(MASKED_LM_LENSES))
    if is_masked_lm(model) and wrong:
        raise ValueError(f"Lens(es) {wrong} are trained on next-token prediction and do not apply to the masked LM "
                         f"{model.cfg.model_name!r}; use {', '.join(MASKED_LM_LENSES)}.")


def _cost(provenance: dict | None, reused: bool, init: dict | None = None) -> dict:
    """Seconds and tokens spent on a lens; ``init``: the cost of the maps it started from (mat-tuned),
    added to its seconds and kept beside them."""
    provenance = provenance or {}
    cost = {"seconds": float(provenance.get("fit_seconds", 0.0)), "tokens": int(provenance.get("n_tokens", 0)),
            "reused": reused}
    if init is not None:
        cost["seconds"] += init["seconds"]
        cost["init"] = {"seconds": init["seconds"], "tokens": init["tokens"]}
    if "n_positions" in provenance:  # the J-lens averages fewer positions than the tokens it runs
        cost["positions"] = int(provenance["n_positions"])
    return cost


def build_lenses(model, names: list[str], train, *, maps: MapSet | None = None, tuned=None, jlens=None,
                 max_fit_tokens: int | None = None, batch_size: int = 16, tuned_config=None,
                 jlens_prompts: int = 20, all_pairs: bool = False, with_maps: bool = False,
                 stats_device: str | None = None, sites: tuple[str, ...] = ("post",),
                 progress: bool = True) -> tuple[dict, dict, MapSet | None]:
    """Fit (or take the given) lenses named in ``names``; returns ``(lenses, fit_cost, mat maps)``.

    The no-intercept mat maps are fitted (``h_l -> h_L``, and every pair ``l < l'`` for the R²
    heatmap with ``all_pairs``, which needs ``O(L²·d²)`` statistics instead of ``O(L·d²)``) when a
    mat lens is named or ``maps`` or ``all_pairs`` asks for them (compare always does, for R²);
    otherwise the third value is None.
    ``tuned`` / ``jlens`` are saved lens folders (or lens objects) to reuse instead of training.
    ``sites=("post", "mid")`` also fits the maps ``resid_mid_l -> h_L`` into the mat map sets
    (a given ``maps`` must then hold them).
    """
    from lensmat.stats import artifacts as io
    from lensmat.lenses.jacobian import JLens, fit_jlens
    from lensmat.lenses.tuned import TunedLens, train_tuned_lens

    lenses, cost = {}, {"logit": {"seconds": 0.0, "tokens": 0, "reused": False}}
    fitted: dict[str, MapSet] = {}
    if maps is not None:
        maps = io.load_maps(maps, model) if isinstance(maps, (str, os.PathLike)) else maps
        maps.check_model(model)
        fitted["mat"], cost["mat"] = maps, _cost(maps.provenance, True)
    wanted = ([n for n in names if n in ("mat", "mat-affine")] + (["mat-affine"] if "mat-tuned" in names else [])
              + (["mat"] if with_maps or all_pairs else []))
    to_fit = [n for n in dict.fromkeys(wanted) if n not in fitted]
    if to_fit:
        start = time.perf_counter()
        stats = collect_layer_stats(model, train, max_tokens=max_fit_tokens, batch_size=batch_size,
                                    pairs="all" if all_pairs else "to_last", progress=progress,
                                    stats_device=stats_device, sites=sites)
        seconds = time.perf_counter() - start
        for name in to_fit:
            fitted[name] = maps_from_stats(model, stats, train, intercept=name == "mat-affine",
                                           all_pairs=all_pairs and name == "mat", seconds=seconds)
            cost[name] = _cost(fitted[name].provenance, False)
    for name in names:
        if name == "logit":
            lenses[name] = LogitLens(model)
        elif name in ("mat", "mat-affine"):
            lenses[name] = MatLens(model, fitted[name], name=name)
        elif name == "mat-tuned":
            lenses[name] = train_tuned_lens(model, train, tuned_config, init=fitted["mat-affine"], progress=progress)
            cost[name] = _cost(lenses[name].meta.get("provenance"), False, init=cost["mat-affine"])
        elif name == "tuned":
            reused = tuned is not None
            if isinstance(tuned, (str, os.PathLike)):
                tuned = TunedLens.load(tuned, model)
            lenses[name] = tuned if reused else train_tuned_lens(model, train, tuned_config, progress=progress)
            cost[name] = _cost(lenses[name].meta.get("provenance"), reused)
        elif name == "jacobian":
            reused = jlens is not None
            if isinstance(jlens, (str, os.PathLike)):
                jlens = JLens.load(jlens, model)
            lenses[name] = jlens if reused else fit_jlens(model, train.dataset, n_prompts=jlens_prompts,
                                                          max_length=train.max_length, progress=progress)
            cost[name] = _cost(lenses[name].meta.get("provenance"), reused)
    return lenses, cost, fitted.get("mat")



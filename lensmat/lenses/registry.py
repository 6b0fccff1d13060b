"""The start-up every reporting command shares: load the model, build the named lenses, and publish
its output folder with a strict-JSON report (each command checks its memory plan,
:mod:`lensmat.stats.plan`, in between).

``compare``, ``linearity``, ``submodules``, ``saturation`` and ``early_exit`` build on it; it
imports none of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from lensmat.stats.fit import MapSet
from lensmat.lenses.base import Lens, LogitLens, MatLens
from lensmat.models import is_masked_lm
from lensmat.stats.pipeline import collect_layer_stats, maps_from_stats

LENS_KINDS = ("logit", "mat", "mat-affine", "tuned", "mat-tuned", "jacobian", "patchscope")
MASKED_LM_LENSES = ("logit", "mat", "mat-affine")  # the others are trained on, or read, next-token prediction


def split_lenses(spec) -> tuple[list[str], dict[str, Lens]]:
    """``(names, given)`` of a lens specification: ``names`` the lens keys in order, ``given`` the
    :class:`~lensmat.lenses.base.Lens` objects among them by key (the others are built by name).

    ``spec`` is ``"logit,mat"``, a list of names, a ``{name: Lens}`` dict, or a list mixing names
    and ``Lens`` objects (a ``Lens``'s key is its ``.name``). Names must be among
    :data:`LENS_KINDS`; a key given twice is refused."""
    if isinstance(spec, Lens):
        spec = [spec]
    if isinstance(spec, Mapping):
        items = list(spec.items())
        bad = [k for k, v in items if not isinstance(v, Lens)]
        if bad:
            raise TypeError(f"lenses={{...}} must map names to Lens objects; {bad} do not.")
    else:
        parts = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        bad = [p for p in parts if not isinstance(p, (str, Lens))]
        if bad:
            raise TypeError(f"lenses must be names or Lens objects; got {[type(p).__name__ for p in bad]}.")
        items = [(p.name, p) if isinstance(p, Lens) else (p, None) for p in parts if not isinstance(p, str) or p]
    names = [k for k, _ in items]
    unknown = [k for k, v in items if v is None and k not in LENS_KINDS]
    if unknown or not names:
        raise ValueError(f"Unknown lens name(s) {unknown or names}; valid lenses: {', '.join(LENS_KINDS)} "
                         "(or pass Lens objects).")
    twice = sorted({k for k in names if names.count(k) > 1})
    if twice:
        raise ValueError(f"Lens name(s) {twice} are given twice; give each lens a distinct name (Lens.name).")
    return names, {k: v for k, v in items if v is not None}


def parse_lenses(spec) -> list[str]:
    """The lens keys of ``spec`` in order (:func:`split_lenses`): ``"logit,mat"`` -> ``["logit", "mat"]``,
    refusing unknown names with the valid list; a ``Lens`` object counts under its name."""
    return split_lenses(spec)[0]


def refuse_causal_lenses_on_masked_lm(model, names) -> None:
    """Refuse, for a masked LM, the lenses trained on next-token prediction (tuned, mat-tuned, jacobian)
    and the patchscope, which reads the next token after its identity prompt (``names``: a lens
    specification; only the lenses to build by name are checked)."""
    keys, given = split_lenses(names)
    wrong = sorted(set(keys) - set(given) - set(MASKED_LM_LENSES))
    if not (is_masked_lm(model) and wrong):
        return
    name, trained = model.cfg.model_name, [n for n in wrong if n != "patchscope"]
    why = [f"Lens(es) {trained} are trained on next-token prediction and do not apply to the masked LM {name!r}"
           ] if trained else []
    if "patchscope" in wrong:
        why.append(f"The patchscope lens reads the next token after an identity prompt, and the masked LM {name!r} "
                   "predicts no next token (it fills in [MASK] positions), so it has no next-token identity prompt")
    raise ValueError(f"{'. '.join(why)}; use {', '.join(MASKED_LM_LENSES)}.")


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


def _mat_maps(model, wanted: list[str], train, maps, *, all_pairs: bool, max_fit_tokens: int | None,
              batch_size: int, stats_device: str | None, sites: tuple[str, ...],
              progress: bool) -> tuple[dict[str, MapSet], dict]:
    """The mat map sets ``wanted`` (``mat``, ``mat-affine``), all fitted from one collection pass on
    ``train``, ``mat`` taken from ``maps`` (a folder or a :class:`MapSet`) when given; returns them and
    their costs (with the logit lens's zero cost)."""
    from lensmat.stats import artifacts as io

    fitted: dict[str, MapSet] = {}
    cost = {"logit": {"seconds": 0.0, "tokens": 0, "reused": False}}
    if maps is not None:
        maps = io.load_maps(maps, model) if isinstance(maps, (str, os.PathLike)) else maps
        maps.check_model(model)
        fitted["mat"], cost["mat"] = maps, _cost(maps.provenance, True)
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
    return fitted, cost


def build_lenses(model, names, train, *, maps: MapSet | None = None, tuned=None, jlens=None,
                 max_fit_tokens: int | None = None, batch_size: int = 16, tuned_config=None,
                 jlens_prompts: int = 20, all_pairs: bool = False, with_maps: bool = False,
                 stats_device: str | None = None, sites: tuple[str, ...] = ("post",),
                 patchscope_prompt: str | None = None, progress: bool = True) -> tuple[dict, dict, MapSet | None]:
    """Fit (or take the given) lenses of ``names``; returns ``(lenses, fit_cost, mat maps)``.

    ``names``: a lens specification (:func:`split_lenses`): names to build, and ``Lens`` objects
    taken as they are (``fit_cost`` then ``reused``, with the seconds and tokens of their
    ``meta["provenance"]`` when they carry one).

    The no-intercept mat maps are fitted (``h_l -> h_L``, and every pair ``l < l'`` for the R²
    heatmap with ``all_pairs``, which needs ``O(L²·d²)`` statistics instead of ``O(L·d²)``) when a
    mat lens is named or ``maps`` or ``all_pairs`` asks for them (compare always does, for R²);
    otherwise the third value is None.
    ``tuned`` / ``jlens`` are saved lens folders (or lens objects) to reuse instead of training.
    ``sites=("post", "mid")`` also fits the maps ``resid_mid_l -> h_L`` into the mat map sets
    (a given ``maps`` must then hold them).
    ``patchscope_prompt``: the patchscope's identity prompt (``None``: nnterp's,
    :data:`~lensmat.lenses.patchscope.IDENTITY_PROMPT`); nothing is fitted, and ``fit_cost.patchscope``
    holds its ``settings`` and its ``usage`` (rows, forwards, positions, seconds), counted as it is read.
    """
    from lensmat.lenses.jacobian import JLens, fit_jlens
    from lensmat.lenses.patchscope import PatchscopeLens
    from lensmat.lenses.tuned import TunedLens, train_tuned_lens

    names, given = split_lenses(names)
    lenses = {}
    given_cost = {k: _cost(getattr(lens, "meta", {}).get("provenance"), True) for k, lens in given.items()}
    built = [n for n in names if n not in given]
    wanted = ([n for n in built if n in ("mat", "mat-affine")] + (["mat-affine"] if "mat-tuned" in built else [])
              + (["mat"] if with_maps or all_pairs else []))
    fitted, cost = _mat_maps(model, wanted, train, maps, all_pairs=all_pairs, max_fit_tokens=max_fit_tokens,
                             batch_size=batch_size, stats_device=stats_device, sites=sites, progress=progress)
    for name in names:
        if name in given:
            lenses[name] = given[name]
        elif name == "logit":
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
        elif name == "patchscope":
            lenses[name] = PatchscopeLens(model, patchscope_prompt)
            cost[name] = {**_cost(None, False), "settings": lenses[name].settings, "usage": lenses[name].usage}
    return lenses, {**cost, **given_cost}, fitted.get("mat")


def fit_named_lenses(model, lenses, dataset=None, *, command: str = "trajectory", maps=None, tuned=None, tuned_config=None,
                     max_fit_tokens: int | None = None, batch_size: int = 16, max_length: int | None = None,
                     stats_device: str | None = None, memory_limit: int | None = None, progress: bool = True):
    """The lenses of a specification (names and ``Lens`` objects, :func:`~lensmat.lenses.registry.split_lenses`)
    built on ``model`` (a bridge): those named are fitted on ``dataset``'s train split (``None``: the
    bundled corpus) after the memory plan of ``command`` is checked (:func:`~lensmat.stats.plan.check_memory`, printed
    with ``progress``), with :func:`~lensmat.lenses.registry.build_lenses`. Returns ``(lenses, fit_cost,
    train, memory_plan)``, ``train`` the tokenized split."""
    from lensmat import data
    from lensmat.stats.pipeline import tokenized
    from lensmat.stats.plan import check_memory

    names, given = split_lenses(lenses)
    refuse_causal_lenses_on_masked_lm(model, lenses)
    train = tokenized(model, dataset, "train", max_length or data.DEFAULT_MAX_LENGTH)
    fits = any(n.startswith("mat") and n not in given and not (n == "mat" and maps is not None) for n in names)
    memory = check_memory(model, command, train, batch_size=batch_size, stats_device=stats_device,
                          memory_limit=memory_limit, progress=progress, fits_maps=fits)
    built, cost, _ = build_lenses(model, lenses, train, maps=maps, tuned=tuned, tuned_config=tuned_config,
                                  max_fit_tokens=max_fit_tokens, batch_size=batch_size, stats_device=stats_device,
                                  progress=progress)
    return built, cost, train, memory

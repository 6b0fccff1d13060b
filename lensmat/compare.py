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
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from lensmat import data
from lensmat.collect import pair_pattern, resid_hooks
from lensmat.fit import MapSet, r2_matrices
from lensmat.lenses import LogitLens, MatLens
from lensmat.metrics import evaluate_lenses
from lensmat.models import describe, is_masked_lm, load_model, require_causal
from lensmat.pipeline import collect_layer_stats, maps_from_stats, tokenized

LENS_KINDS = ("logit", "mat", "mat-affine", "tuned", "jacobian")
MASKED_LM_LENSES = ("logit", "mat", "mat-affine")  # tuned and jacobian are trained on next-token prediction


def parse_lenses(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"logit,mat"`` -> ``["logit", "mat"]``, refusing unknown names with the valid list."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in LENS_KINDS]
    if unknown or not names:
        raise ValueError(f"Unknown lens name(s) {unknown or names}; valid lenses: {', '.join(LENS_KINDS)}.")
    return names


def _cost(provenance: dict | None, reused: bool) -> dict:
    provenance = provenance or {}
    cost = {"seconds": float(provenance.get("fit_seconds", 0.0)), "tokens": int(provenance.get("n_tokens", 0)),
            "reused": reused}
    if "n_positions" in provenance:  # the J-lens averages fewer positions than the tokens it runs
        cost["positions"] = int(provenance["n_positions"])
    return cost


def build_lenses(model, names: list[str], train, *, maps: MapSet | None = None, tuned=None, jlens=None,
                 max_fit_tokens: int | None = None, batch_size: int = 16, tuned_config=None,
                 jlens_prompts: int = 20, all_pairs: bool = False, with_maps: bool = False,
                 progress: bool = True) -> tuple[dict, dict, MapSet | None]:
    """Fit (or take the given) lenses named in ``names``; returns ``(lenses, fit_cost, mat maps)``.

    The no-intercept mat maps are fitted (``h_l -> h_L``, and every pair ``l < l'`` for the R²
    heatmap with ``all_pairs``, which needs ``O(L²·d²)`` statistics instead of ``O(L·d²)``) when a
    mat lens is named or ``maps`` or ``all_pairs`` asks for them (compare always does, for R²);
    otherwise the third value is None.
    ``tuned`` / ``jlens`` are saved lens folders (or lens objects) to reuse instead of training.
    """
    from lensmat import io
    from lensmat.jlens import JLens, fit_jlens
    from lensmat.tuned import TunedLens, train_tuned_lens

    lenses, cost = {}, {"logit": {"seconds": 0.0, "tokens": 0, "reused": False}}
    fitted: dict[str, MapSet] = {}
    if maps is not None:
        maps = io.load_maps(maps, model) if isinstance(maps, (str, os.PathLike)) else maps
        maps.check_model(model)
        fitted["mat"], cost["mat"] = maps, _cost(maps.provenance, True)
    wanted = [n for n in names if n.startswith("mat")] + (["mat"] if with_maps or all_pairs else [])
    to_fit = [n for n in dict.fromkeys(wanted) if n not in fitted]
    if to_fit:
        start = time.perf_counter()
        stats = collect_layer_stats(model, train, max_tokens=max_fit_tokens, batch_size=batch_size,
                                    pairs="all" if all_pairs else "to_last", progress=progress)
        seconds = time.perf_counter() - start
        for name in to_fit:
            fitted[name] = maps_from_stats(model, stats, train, intercept=name == "mat-affine",
                                           all_pairs=all_pairs and name == "mat", seconds=seconds)
            cost[name] = _cost(fitted[name].provenance, False)
    for name in names:
        if name == "logit":
            lenses[name] = LogitLens(model)
        elif name.startswith("mat"):
            lenses[name] = MatLens(model, fitted[name], name=name)
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


def compare(
    model=None,
    dataset: str | None = None,
    *,
    lenses: str | list[str] = ("logit", "mat"),
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
    out: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Compare lenses layer by layer on held-out text; returns the report dict.

    Args:
        model: a bridge, a spec for :func:`~lensmat.models.load_model`, or ``None`` (bundled).
        dataset: corpus spec (default: the bundled Leipzig sentences).
        lenses: names among ``logit``, ``mat`` (no intercept), ``mat-affine``, ``tuned``, ``jacobian``.
        max_fit_tokens / max_eval_tokens: caps on scored tokens of ``train`` / ``heldout``.
        maps: saved no-intercept maps (folder or :class:`MapSet`) to reuse instead of fitting.
        all_pairs: fit and score every pair ``l < l'`` for the full R² heatmap (statistics grow
            as ``(L+1)²·d²``); by default only ``l -> L`` (``(L+1)·2·d²``).
        tuned / jlens: saved lenses to reuse; otherwise trained here (``tuned_config``:
            :class:`~lensmat.tuned.TunedLensConfig`; the J-lens on ``jlens_prompts`` train lines).
        n_mask / mask_seed: the masked protocol of a masked LM: positions masked per line and the
            seed that picks them (ignored for causal models).
        scoring: for a causal model, which positions are fitted and scored and whether lines get
            BOS (:class:`~lensmat.data.Scoring`; ``Scoring("one-random", bos=False)`` is the paper's
            GPT-2 protocol). Default: every token after BOS.
        out: folder for ``report.json`` and plots (refused if it exists, unless ``force``).

    Every lens is scored on the same held-out tokens; ``fit_cost.{lens}`` records the seconds and
    tokens spent fitting it (``reused: true`` when it was loaded).
    """
    from lensmat import plots

    names = parse_lenses(lenses)
    model = start_run(model, out, force)
    masked = is_masked_lm(model)
    if masked and set(names) - set(MASKED_LM_LENSES):
        raise ValueError(f"Lens(es) {sorted(set(names) - set(MASKED_LM_LENSES))} are trained on next-token prediction "
                         f"and do not apply to the masked LM {model.cfg.model_name!r}; use {', '.join(MASKED_LM_LENSES)}.")
    n_layers = int(model.cfg.n_layers)
    info = describe(model)
    train = tokenized(model, dataset, "train", max_length, n_mask=n_mask, mask_seed=mask_seed, scoring=scoring)
    heldout = tokenized(model, dataset, "heldout", max_length, n_mask=n_mask, mask_seed=mask_seed, scoring=scoring)
    lens_objs, fit_cost, mat_maps = build_lenses(
        model, names, train, maps=maps, tuned=tuned, jlens=jlens, max_fit_tokens=max_fit_tokens,
        batch_size=batch_size, tuned_config=tuned_config, jlens_prompts=jlens_prompts, all_pairs=all_pairs,
        with_maps=True, progress=progress)
    hooks = resid_hooks(n_layers)
    scores, held_stats, n_eval = evaluate_lenses(
        model, lens_objs, heldout.batches(batch_size, max_eval_tokens), stats_groups=[hooks],
        stats_pairs=[pair_pattern(len(hooks), "all" if all_pairs else "to_last")],
        total_tokens=heldout.n_tokens(max_eval_tokens), progress=progress)
    report = {
        "model": info.name,
        "model_info": info.to_dict(),
        "dataset": train.dataset,
        "n_layers": n_layers,
        "layers": list(range(n_layers + 1)),
        "n_fit_tokens": fit_cost["mat"]["tokens"],
        "n_eval_tokens": n_eval,
        "lenses": scores,
        "r2": r2_matrices(held_stats[0], mat_maps.maps),
        "fit_cost": {n: fit_cost[n] for n in names},
        "protocol": "masked" if masked else "causal",
    }
    if masked:
        report["masking"] = heldout.provenance()["masking"]
    else:
        report["scoring"] = heldout.scoring.to_dict()
    if out is not None:
        write_report(report, out)
        plots.compare_plots(report, out)
    return report


def refuse_existing(out: str | os.PathLike | None, force: bool) -> None:
    """Refuse an existing output folder before any work starts (unless ``force``)."""
    if out is not None and Path(out).exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force to overwrite.")


def start_run(model, out: str | os.PathLike | None, force: bool, causal_only: str | None = None):
    """The common start of a reporting command: refuse an existing ``out`` (unless ``force``), then
    return ``model`` as a bridge (a spec or ``None`` is loaded with :func:`load_model`); a command
    named in ``causal_only`` refuses a masked LM."""
    refuse_existing(out, force)
    model = load_model(model) if model is None or isinstance(model, (str, os.PathLike)) else model
    if causal_only is not None:
        require_causal(model, causal_only)
    return model


def _finite_or_null(obj, path: str, bad: list[str]):
    """``obj`` with every NaN/Inf float replaced by None; the paths of those values go to ``bad``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(path)
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v, f"{path}.{k}" if path else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v, f"{path}[{i}]", bad) for i, v in enumerate(obj)]
    return obj


def write_report(report: dict, out: str | os.PathLike) -> Path:
    """Write ``out/report.json`` as strict JSON (atomically: temporary file, then rename). A NaN or
    Inf value is written as null, listed in ``non_finite_values`` and warned about."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bad: list[str] = []
    report = _finite_or_null(report, "", bad)
    if bad:
        import warnings

        report["non_finite_values"] = bad
        warnings.warn(f"{len(bad)} NaN/Inf values in the report (written as null, listed in non_finite_values), "
                      f"e.g. {bad[:3]}.", RuntimeWarning, stacklevel=2)
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, out / "report.json")
    return out / "report.json"


def format_table(report: dict, metric: str = "precision@1") -> str:
    """A compact per-layer table of one metric for every lens, plus R² of mat and id to the last layer."""
    names = list(report["lenses"])
    last = report["n_layers"]

    def cell(v, width):
        return f"{v:>{width}.4f}" if v is not None else f"{'-':>{width}}"

    rows = [f"{'layer':>5} " + " ".join(f"{n:>11}" for n in names) + f" {'R2 mat->L':>10} {'R2 id->L':>10}"
            + f"   ({metric})"]
    for layer in report["layers"]:
        vals = " ".join(cell(report["lenses"][n][metric][layer], 11) for n in names)
        rows.append(f"{layer:>5} {vals} {cell(report['r2']['mat'][layer][last], 10)} {cell(report['r2']['id'][layer][last], 10)}")
    return "\n".join(rows)

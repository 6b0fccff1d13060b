"""``lensmat compare``: fit maps on ``train``, score lenses per layer on ``heldout``, report.

The report (``report.json``) follows the contract in DESIGN.md: ``model``, ``n_layers``,
``layers``, ``n_fit_tokens``, ``n_eval_tokens``, ``lenses.{name}.{metric}`` (L+1 floats
indexed by residual layer) and ``r2.{mat,id}`` ((L+1)×(L+1), ``null`` where ``l ≥ l'``), plus
``fit_cost.{lens}`` (seconds and tokens spent fitting).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lensmat import data
from lensmat.collect import resid_hooks
from lensmat.fit import MapSet, r2_matrices
from lensmat.lenses import LogitLens, MatLens
from lensmat.models import describe, load_model
from lensmat.pipeline import collect_layer_stats, maps_from_stats, tokenized

LENS_KINDS = ("logit", "mat", "mat-affine")


def parse_lenses(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"logit,mat"`` -> ``["logit", "mat"]``, refusing unknown names with the valid list."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in LENS_KINDS]
    if unknown or not names:
        raise ValueError(f"Unknown lens name(s) {unknown or names}; valid lenses: {', '.join(LENS_KINDS)}.")
    return names


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
    out: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Compare lenses layer by layer on held-out text; returns the report dict.

    Args:
        model: a bridge, a spec for :func:`~lensmat.models.load_model`, or ``None`` (bundled).
        dataset: corpus spec (default: the bundled Leipzig sentences).
        lenses: names among ``logit``, ``mat`` (no intercept), ``mat-affine``.
        max_fit_tokens / max_eval_tokens: caps on scored tokens of ``train`` / ``heldout``.
        maps: saved no-intercept maps (folder or :class:`MapSet`) to reuse instead of fitting;
            they must hold every pair ``l < l'`` for the R² heatmap, else only ``l -> L`` is shown.
        out: folder for ``report.json`` and plots (refused if it exists, unless ``force``).
    """
    from lensmat import io, plots

    names = parse_lenses(lenses)
    if out is not None and Path(out).exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force to overwrite.")
    if model is None or isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    n_layers = int(model.cfg.n_layers)
    info = describe(model)
    train = tokenized(model, dataset, "train", max_length)
    heldout = tokenized(model, dataset, "heldout", max_length)

    if isinstance(maps, (str, os.PathLike)):
        maps = io.load_maps(maps, model)
    fitted: dict[str, MapSet] = {}
    fit_cost = {"logit": {"seconds": 0.0, "tokens": 0}}
    if maps is not None:
        maps.check_model(model)
        fitted["mat"] = maps
        fit_cost["mat"] = {"seconds": float(maps.provenance.get("fit_seconds", 0.0)) if maps.provenance else 0.0,
                           "tokens": int(maps.provenance.get("n_tokens", 0)) if maps.provenance else 0, "reused": True}
    need = [n for n in names if n.startswith("mat") and n not in fitted] + (["mat"] if "mat" not in fitted else [])
    if need:
        start = time.perf_counter()
        stats = collect_layer_stats(model, train, max_tokens=max_fit_tokens, batch_size=batch_size, progress=progress)
        collect_seconds = time.perf_counter() - start
        for name in dict.fromkeys(need):
            fitted[name] = maps_from_stats(model, stats, train, intercept=name == "mat-affine",
                                           all_pairs=name == "mat", seconds=collect_seconds)
            fit_cost[name] = {"seconds": fitted[name].provenance["fit_seconds"], "tokens": stats.n}

    lens_objs = {"logit": LogitLens(model)} | {n: MatLens(model, fitted[n], name=n) for n in names if n != "logit"}
    lens_objs = {n: lens_objs[n] for n in names}
    hooks = resid_hooks(n_layers)
    scores, held_stats, n_eval = evaluate(model, lens_objs, heldout, hooks, max_eval_tokens, batch_size, progress)
    r2 = r2_matrices(held_stats[0], fitted["mat"].maps)

    report = {
        "model": info.name,
        "model_info": info.to_dict(),
        "dataset": train.dataset,
        "n_layers": n_layers,
        "layers": list(range(n_layers + 1)),
        "n_fit_tokens": fit_cost.get("mat", {}).get("tokens", 0),
        "n_eval_tokens": n_eval,
        "lenses": scores,
        "r2": r2,
        "fit_cost": {n: fit_cost[n] for n in names if n in fit_cost},
    }
    if out is not None:
        write_report(report, out)
        plots.compare_plots(report, out)
    return report


def evaluate(model, lenses, corpus, hooks, max_tokens, batch_size, progress):
    from lensmat.metrics import evaluate_lenses

    return evaluate_lenses(model, lenses, corpus.batches(batch_size, max_tokens), stats_groups=[hooks],
                           total_tokens=corpus.n_tokens(max_tokens), progress=progress)


def write_report(report: dict, out: str | os.PathLike) -> Path:
    """Write ``out/report.json`` (atomically: temporary file, then rename)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "report.json")
    return out / "report.json"


def format_table(report: dict, metric: str = "precision@1") -> str:
    """A compact per-layer table of one metric for every lens, plus R² of mat and id to the last layer."""
    names = list(report["lenses"])
    last = report["n_layers"]
    head = f"{'layer':>5} " + " ".join(f"{n + ' ' + metric:>22}" for n in names) + f" {'R2 mat->L':>10} {'R2 id->L':>9}"
    rows = [head]
    for layer in report["layers"]:
        vals = " ".join(f"{report['lenses'][n][metric][layer]:>22.4f}" for n in names)
        r2m, r2i = report["r2"]["mat"][layer][last], report["r2"]["id"][layer][last]
        fmt = lambda v: f"{v:>10.4f}" if v is not None else f"{'-':>10}"  # noqa: E731
        rows.append(f"{layer:>5} {vals} {fmt(r2m)} {fmt(r2i)[1:]}")
    return "\n".join(rows)

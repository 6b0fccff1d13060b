"""Report folders: strict-JSON ``report.json`` and the figures beside it, published atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from lensmat.outputs import publish, writes_output


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


def published(analysis, *writers):
    """``analysis`` with two more keywords, ``out`` and ``force``. ``out`` is claimed before any work
    (:func:`lensmat.outputs.writes_output`: refused if it exists and ``force`` is not given, locked,
    the inputs kept out of it); after the analysis, the folder is built aside and renamed into place
    (:func:`lensmat.outputs.publish`) with what each ``writer(result, folder)`` writes."""
    import functools
    import inspect

    @functools.wraps(analysis)
    def run(*args, out: str | os.PathLike | None = None, force: bool = False, **kwargs):
        result = analysis(*args, **kwargs)
        if out is not None:
            with publish(out, force) as folder:
                for writer in writers:
                    writer(result, folder)
        return result

    sig = inspect.signature(analysis)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    extra = [inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | os.PathLike | None"),
             inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")]
    var = [p for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
    run.__signature__ = sig.replace(parameters=params + extra + var)
    run.__doc__ = (analysis.__doc__ or "").rstrip() + _OUT_DOC
    return writes_output(run)


_OUT_DOC = """

    out / force (added by :mod:`lensmat.reports`): a folder for ``report.json`` and the figures,
    checked and locked before any work and refused if it exists, unless ``force`` and lensmat wrote it."""


def strict(report: dict) -> dict:
    """``report`` with every NaN/Inf float replaced by None (JSON null: not measured or undefined),
    their paths listed under ``non_finite_values`` and warned about; a finite report comes back as is."""
    bad: list[str] = []
    report = _finite_or_null(report, "", bad)
    if bad:
        import warnings

        report["non_finite_values"] = bad
        warnings.warn(f"{len(bad)} NaN/Inf values in the report (written as null, listed in non_finite_values), "
                      f"e.g. {bad[:3]}.", RuntimeWarning, stacklevel=3)
    return report


def write_report(report: dict, out: str | os.PathLike) -> Path:
    """Write ``out/report.json`` as strict JSON (atomically: temporary file, then rename), through
    :func:`strict`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(strict(report), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, out / "report.json")
    return out / "report.json"

"""Markdown tables of the papers' measurements from the reports that scripts/real_model_findings.sh
writes (runs/findings/MODEL/CORPUS/COMMAND/report.json). Usage: python scripts/findings_table.py DIR"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(folder: Path, command: str) -> dict | None:
    path = folder / command / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def summary_rows(root: Path) -> list[str]:
    rows = ["| model | corpus | fit / eval tokens | mean P@1 id | mean P@1 mat | mat − id, smallest | mean R² mat→L | mean R² id→L "
            "| blocks saved at 95%: id / mat | swap protocol mean P@1: attn / mlp "
            "| linearity mean, with / without residual: train (held out) "
            "| saturation τ, authors' rule / leading rule (p, tokens) | implant success, offsets < 0 / ≥ 0 (trials) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for corpus_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            c, e, s = load(corpus_dir, "compare"), load(corpus_dir, "early-exit"), load(corpus_dir, "submodules")
            lin, sat = load(corpus_dir, "linearity"), load(corpus_dir, "saturation")
            if c is None:
                continue
            L = c["n_layers"]
            idp, mat = c["lenses"]["logit"]["precision@1"][:L], c["lenses"]["mat"]["precision@1"][:L]
            r2m = [row[L] for row in c["r2"]["mat"][:L]]
            r2i = [row[L] for row in c["r2"]["id"][:L]]
            swaps = "–"
            if s:
                v = s["variants"]
                swaps = f"{sum(v['attn']['precision@1']) / (L + 1):.3f} / {sum(v['mlp']['precision@1']) / (L + 1):.3f}"
            rows.append(
                f"| {model_dir.name} | {corpus_dir.name} | {c['n_fit_tokens']:,} / {c['n_eval_tokens']:,} "
                f"| {sum(idp) / L:.3f} | {sum(mat) / L:.3f} | {min(m - i for m, i in zip(mat, idp)):.3f} "
                f"| {sum(r2m) / L:.3f} | {sum(r2i) / L:.3f} "
                f"| {fmt(e and e['savings']['logit'])} / {fmt(e and e['savings']['mat'])} | {swaps} "
                f"| {linearity(lin)} | {order(sat)} | {sweep(sat)} |")
    return rows


def linearity(lin: dict | None) -> str:
    """Mean linearity with / without the residual on train, and held out when the report has it."""
    if lin is None:
        return "–"
    out = f"{fmt(lin['mean_linearity'])} / {fmt(lin['mean_linearity_no_residual'])}"
    if "mean_heldout_linearity" in lin:
        out += f" ({fmt(lin['mean_heldout_linearity'])} / {fmt(lin['mean_heldout_linearity_no_residual'])})"
    return out


def sweep(sat: dict | None) -> str:
    """Implant success pooled over negative and over non-negative offsets, with the trials of each."""
    rows = (sat or {}).get("intervention_sweep")
    if not rows:
        return "–"
    parts = []
    for side in ([r for r in rows if r["offset"] < 0], [r for r in rows if r["offset"] >= 0]):
        n = sum(r["n_trials"] for r in side)
        hits = sum(r["success"] * r["n_trials"] for r in side if r["success"] is not None)
        parts.append(f"{hits / n:.2f} ({n})" if n else "–")
    return " / ".join(parts)


def order(sat: dict | None) -> str:
    """τ (p, tokens) under both rules of the saturation order test (a report from before the rules: its one τ)."""
    if sat is None:
        return "–"
    tests = sat.get("order_tests") or {"leading": {k: sat[f] for k, f in
                                                   (("kendall_tau", "kendall_tau"), ("p_value", "p_value"),
                                                    ("n_tokens", "n_order_tokens"))}}
    return " / ".join(f"{fmt(t['kendall_tau'])} ({fmt(t['p_value'])}, {t['n_tokens']})" if rule in tests else "–"
                      for rule, t in ((r, tests.get(r)) for r in ("authors", "leading")))


def per_layer_rows(root: Path) -> list[str]:
    out = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for corpus_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            c, lin = load(corpus_dir, "compare"), load(corpus_dir, "linearity")
            if c is None:
                continue
            L = c["n_layers"]
            out.append(f"\n{model_dir.name}, {corpus_dir.name}: Precision@1 per residual layer 0..{L} (id / mat); "
                       "linearity per block (with / without residual, train), the block's output norm relative to its input "
                       "and the consecutive cosine (held out)\n")
            out.append("| layer | " + " | ".join(str(i) for i in range(L + 1)) + " |")
            out.append("| --- |" + " --- |" * (L + 1))
            for name, label in (("logit", "id"), ("mat", "mat")):
                out.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in c["lenses"][name]["precision@1"]) + " |")
            if lin:
                out.append("| lin. | " + " | ".join(f"{v:.2f}" for v in lin["linearity"]) + " | |")
                out.append("| lin. − res. | " + " | ".join(f"{v:.2f}" for v in lin["linearity_no_residual"]) + " | |")
                for key, label in (("norm_ratio", "‖Δh‖/‖h‖"), ("cosine", "cos(h_l, h_l+1)")):
                    if key in lin:
                        out.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in lin[key]) + " | |")
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/findings")
    print("\n".join(summary_rows(root) + per_layer_rows(root)))

"""Benchmark: lens quality against its cost, for mat, mat-affine, tuned and mat-tuned.

Every lens is scored on the same held-out tokens: mean KL(p_final ‖ p_lens) over residual layers
0..L-1 (nats/token) and Precision@1 per layer. Costs are wall-clock seconds on this machine and the
training tokens of each lens:

- ``mat`` / ``mat-affine``: least-squares maps ``h_l -> h_L`` from one pass over ``--fit-tokens``
  train tokens (one statistics pass serves both);
- ``tuned``: the tuned lens from the identity, trained on each of ``--tokens`` (0 = the logit lens);
- ``mat-tuned``: the same training started from the ``mat-affine`` maps (0 = ``mat-affine``
  itself); its seconds include the maps' fit.

Each budget is its own run (the learning rate decays to 0 over the run's tokens). Prints the
curves, the equal-cost comparisons and the issue's two targets, and writes ``curves.csv``,
``curves.json`` and ``curves.png`` to ``--out``.

    python benchmarks/bench_lenses.py --tokens 0 25000 50000 100000 200000 400000 --out runs/bench_lenses
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from machine import machine


def main() -> None:
    import torch

    import lensmat
    from lensmat.stats.pipeline import collect_layer_stats, maps_from_stats
    from lensmat.lenses.tuned import TunedLensTraining, train_tuned_lens

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--tokens", type=int, nargs="+", default=[0, 25_000, 50_000, 100_000, 200_000, 400_000])
    p.add_argument("--fit-tokens", type=int, default=None, help="train tokens for the maps (default: the whole split)")
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--lr", type=float, default=0.1, help="learning rate of both tuned lenses (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="runs/bench_lenses")
    args = p.parse_args()

    torch.manual_seed(0)
    model = lensmat.load_model(args.model, device="cpu")
    L = int(model.cfg.n_layers)
    print(f"{machine()}; model: {args.model or 'reference'} ({L} blocks)")
    train = lensmat.tokenized(model, split="train")
    heldout = lensmat.tokenized(model, split="heldout")
    batches = list(heldout.batches(args.batch_size, args.eval_tokens))

    start = time.perf_counter()
    stats = collect_layer_stats(model, train, max_tokens=args.fit_tokens, batch_size=args.batch_size, progress=False)
    fit_seconds = time.perf_counter() - start
    maps = {name: maps_from_stats(model, stats, train, intercept=name == "mat-affine", seconds=fit_seconds)
            for name in ("mat", "mat-affine")}
    fit_tokens = stats.n
    print(f"maps fitted on {fit_tokens} tokens in {fit_seconds:.1f} s")

    rows = []  # one per (lens, tokens): seconds and held-out metrics

    def score(lens, name, tokens, seconds):
        scores, _, n = lensmat.evaluate_lenses(model, {name: lens}, batches, progress=False)
        s = scores[name]
        rows.append({"lens": name, "tokens": tokens, "seconds": seconds, "mean_kl": sum(s["kl"][:L]) / L,
                     "mean_precision@1": sum(s["precision@1"][:L]) / L, "kl": s["kl"][:L],
                     "precision@1": s["precision@1"][:L], "eval_tokens": n})

    for name, m in maps.items():
        score(lensmat.MatLens(model, m, name=name), name, fit_tokens, m.provenance["fit_seconds"])
    for tokens in args.tokens:
        config = TunedLensTraining(tokens=tokens, batch_size=args.batch_size, lr=args.lr)
        for name, init in (("tuned", None), ("mat-tuned", maps["mat-affine"])):
            begin = time.perf_counter()
            lens = train_tuned_lens(model, train, config, init=init, progress=False)
            seconds = time.perf_counter() - begin + (maps["mat-affine"].provenance["fit_seconds"] if init else 0.0)
            score(lens, name, tokens, seconds)
            r = rows[-1]
            print(f"  {name:<10} {tokens:>7} tokens  {seconds:7.1f} s  mean KL {r['mean_kl']:.4f}  "
                  f"mean P@1 {r['mean_precision@1']:.4f}", flush=True)

    print(f"\nheld-out, {rows[0]['eval_tokens']} tokens; mean over layers 0..{L - 1}; seconds include the maps' fit "
          "for mat-tuned")
    print(f"{'lens':<11}{'tokens':>8}{'seconds':>9}{'mean KL':>9}{'mean P@1':>10}   KL per layer 0..L-1")
    for r in rows:
        print(f"{r['lens']:<11}{r['tokens']:>8}{r['seconds']:>9.1f}{r['mean_kl']:>9.4f}{r['mean_precision@1']:>10.4f}   "
              + " ".join(f"{v:.3f}" for v in r["kl"]))

    def row(lens, tokens):
        return next((r for r in rows if r["lens"] == lens and r["tokens"] == tokens), None)

    print("\ntargets")
    ref = row("tuned", 200_000)
    first = row("mat-tuned", 25_000)
    if ref and first:
        print(f"  mat-tuned at 25K tokens mean KL {first['mean_kl']:.4f} vs tuned at 200K {ref['mean_kl']:.4f}: "
              f"{'met' if first['mean_kl'] <= ref['mean_kl'] else 'MISSED'}")
    mat, affine = rows[0], rows[1]
    for tokens in args.tokens:
        mt, tu = row("mat-tuned", tokens), row("tuned", tokens)
        if tokens == 0:
            continue
        below = [layer for layer in range(L)
                 if mt["kl"][layer] < min(tu["kl"][layer], mat["kl"][layer], affine["kl"][layer])]
        print(f"  {tokens:>7} tokens: mat-tuned KL below tuned, mat and mat-affine at {len(below)}/{L} layers"
              + ("" if len(below) == L else f" (not at {sorted(set(range(L)) - set(below))})"))
    print("\nequal wall-clock (tuned interpolated linearly in seconds between its budgets)")
    tuned = sorted((r["seconds"], r["mean_kl"]) for r in rows if r["lens"] == "tuned")
    for r in (mat, affine, *[r for r in rows if r["lens"] == "mat-tuned"]):
        secs = r["seconds"]
        below = [t for t in tuned if t[0] <= secs]
        above = [t for t in tuned if t[0] >= secs]
        if not below or not above:
            print(f"  {r['lens']} {r['tokens']} ({secs:.1f} s): outside the tuned lens's measured range")
            continue
        (s0, k0), (s1, k1) = below[-1], above[0]
        k = k0 if s1 == s0 else k0 + (k1 - k0) * (secs - s0) / (s1 - s0)
        print(f"  {r['lens']:<10} {r['tokens']:>7} tokens, {secs:6.1f} s: mean KL {r['mean_kl']:.4f}; "
              f"tuned in the same time {k:.4f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps({"machine": machine(), "model": args.model or "reference",
                                                 "fit_tokens": fit_tokens, "rows": rows}, indent=1) + "\n")
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lens", "tokens", "seconds", "mean_kl", "mean_precision@1"]
                   + [f"kl_{layer}" for layer in range(L)] + [f"precision@1_{layer}" for layer in range(L)])
        for r in rows:
            w.writerow([r["lens"], r["tokens"], f"{r['seconds']:.2f}", f"{r['mean_kl']:.5f}",
                        f"{r['mean_precision@1']:.5f}", *(f"{v:.5f}" for v in r["kl"]),
                        *(f"{v:.5f}" for v in r["precision@1"])])
    plot(rows, out / "curves.png")
    print(f"\nwrote {out}/curves.csv, curves.json, curves.png")


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x, label in ((axes[0], "tokens", "training tokens (thousands)"), (axes[1], "seconds", "wall-clock seconds")):
        scale = 1e-3 if x == "tokens" else 1.0
        for lens, style in (("tuned", "o-"), ("mat-tuned", "s-")):
            pts = sorted((r[x] * scale, r["mean_kl"]) for r in rows if r["lens"] == lens)
            ax.plot([a for a, _ in pts], [b for _, b in pts], style, label=lens)
        for lens, colour in (("mat", "tab:green"), ("mat-affine", "tab:red")):
            r = next(r for r in rows if r["lens"] == lens)
            if x == "tokens":
                ax.axhline(r["mean_kl"], color=colour, ls="--", label=f"{lens} ({r['tokens']} fit tokens)")
            else:
                ax.plot([r["seconds"]], [r["mean_kl"]], "*", color=colour, ms=12, label=lens)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out mean KL over layers 0..L-1 (nats)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("quality against training tokens")
    axes[1].set_title("quality against cost on this machine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""Benchmark: fit all residual maps (every pair l < l') the lensmat way vs the paper's way.

For each token budget, in a fresh subprocess each (so peak memory is per job):
  forward   plain forward passes over the tokens (logits computed, nothing kept)
  lensmat   collect float64 statistics of h_0..h_L + solve every pair (streaming)
  baseline  stack every scored activation of h_0..h_L, then one lstsq per pair (the paper's way)
Prints wall time, peak RSS and the ratios lensmat/forward and baseline/lensmat, measured in one run.

    python benchmarks/bench_fit.py --tokens 20000 200000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from machine import machine


def job(kind: str, tokens: int, model_spec: str | None, batch_size: int) -> dict:
    import torch

    import lensmat
    from lensmat import data
    from lensmat.collect import collect, resid_hooks, run_capture
    from lensmat.fit import fit_layer_maps

    torch.manual_seed(0)
    model = lensmat.load_model(model_spec, device="cpu")
    lines = data.load_lines(split="all")
    seqs = data.tokenize(lines, model.tokenizer)
    while data.count_tokens(seqs) < tokens:  # repeat the corpus for large budgets (timing only)
        seqs = seqs + seqs
    hooks = resid_hooks(int(model.cfg.n_layers))
    batches = list(data.batches(seqs, batch_size, tokens))
    start = time.perf_counter()
    with torch.no_grad():
        if kind == "forward":
            for b in batches:
                model(b.tokens)
        elif kind == "lensmat":
            stats = collect(model, batches, [hooks], progress=False)[0]
            fit_layer_maps(stats, all_pairs=True)
        elif kind == "baseline":
            rows = {h: [] for h in hooks}
            for b in batches:
                captured, _ = run_capture(model, b, hooks)
                for h in hooks:
                    rows[h].append(captured[h])
            acts = {h: torch.cat(v) for h, v in rows.items()}
            for i, src in enumerate(hooks):
                for tgt in hooks[i + 1:]:
                    torch.linalg.lstsq(acts[src], acts[tgt])
    seconds = time.perf_counter() - start
    return {"kind": kind, "tokens": sum(b.n_scored for b in batches), "seconds": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[20_000, 200_000])
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--kinds", default="forward,lensmat,baseline")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job:
        kind, tokens = args.job.split(":")
        print(json.dumps(job(kind, int(tokens), args.model, args.batch_size)))
        return

    print(f"{machine()}; model: {args.model or 'reference'}")
    results = {}
    for tokens in args.tokens:
        for kind in args.kinds.split(","):
            cmd = [sys.executable, __file__, "--job", f"{kind}:{tokens}", "--batch-size", str(args.batch_size)]
            if args.model:
                cmd += ["--model", args.model]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[(tokens, kind)] = json.loads(out)
    print(f"{'tokens':>8} {'forward s':>10} {'lensmat s':>10} {'baseline s':>11} {'lensmat/fwd':>12} "
          f"{'baseline/lensmat':>17} {'RSS fwd MB':>11} {'RSS lensmat MB':>15} {'RSS baseline MB':>16}")
    for tokens in args.tokens:
        r = {k: results.get((tokens, k)) for k in ("forward", "lensmat", "baseline")}
        get = lambda k, f, r=r: r[k][f] if r[k] else float("nan")  # noqa: E731
        print(f"{tokens:>8} {get('forward', 'seconds'):>10.2f} {get('lensmat', 'seconds'):>10.2f} "
              f"{get('baseline', 'seconds'):>11.2f} {get('lensmat', 'seconds') / get('forward', 'seconds'):>12.2f} "
              f"{get('baseline', 'seconds') / get('lensmat', 'seconds'):>17.2f} {get('forward', 'peak_rss_mb'):>11.0f} "
              f"{get('lensmat', 'peak_rss_mb'):>15.0f} {get('baseline', 'peak_rss_mb'):>16.0f}")


if __name__ == "__main__":
    main()

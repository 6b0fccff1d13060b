"""Benchmark: fit residual maps the lensmat way vs plain forward passes and the paper's way (lens
evaluation against its measured floor is bench_readout.py).

For each token budget, in a fresh subprocess each (so peak memory is per job; model loading is
not timed):
  forward     plain forward passes through the bridge over the tokens (logits computed)
  hf_forward  the same through the bare Hugging Face model under the bridge (no hooks)
  to_last     collect the float64 statistics the maps h_l -> h_L need + solve them (streaming)
  lensmat     collect the statistics of every pair h_l, h_l' + solve every pair l < l'
  baseline    stack every scored activation of h_0..h_L, one lstsq per pair (the paper's way)
Prints wall time, peak RSS and the ratios, measured in one run.

    python benchmarks/bench_fit.py --tokens 20000 200000
    python benchmarks/bench_fit.py --model smollm2-135m --tokens 10000 --kinds hf_forward,forward,to_last
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
    from lensmat.stats.collect import collect, resid_hooks, run_capture
    from lensmat.stats.gram import pair_pattern
    from lensmat.stats.fit import fit_layer_maps

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
        elif kind == "hf_forward":
            for b in batches:
                model.original_model(input_ids=b.tokens)
        elif kind in ("lensmat", "to_last"):
            pairs = pair_pattern(len(hooks), "all" if kind == "lensmat" else "to_last")
            stats = collect(model, batches, [hooks], pairs=[pairs], progress=False)[0]
            fit_layer_maps(stats, all_pairs=kind == "lensmat")
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
    kinds = args.kinds.split(",")
    print(f"{'tokens':>8} " + " ".join(f"{k + ' s':>12}" for k in kinds) + " " + " ".join(f"{'RSS ' + k + ' MB':>18}" for k in kinds))
    for tokens in args.tokens:
        r = {k: results[(tokens, k)] for k in kinds}
        print(f"{tokens:>8} " + " ".join(f"{r[k]['seconds']:>12.2f}" for k in kinds) + " "
              + " ".join(f"{r[k]['peak_rss_mb']:>18.0f}" for k in kinds))
        for a, b in (("lensmat", "forward"), ("to_last", "forward"), ("to_last", "hf_forward"),
                     ("lensmat", "hf_forward"), ("baseline", "lensmat"), ("forward", "hf_forward")):
            if a in r and b in r:
                print(f"{'':>8} {a}/{b} = {r[a]['seconds'] / r[b]['seconds']:.2f}")


if __name__ == "__main__":
    main()

"""Benchmark: real early-exit greedy generation (lensmat.generate) vs the same loop without exits.

For each held-out prompt (the first --prompt-tokens tokens of a line), generate --new-tokens
greedily with the full model, then with confidence exit under each lens and λ. Prints, measured in
one run: wall-clock speed-up (full seconds / early-exit seconds), mean blocks run per generated
token, and agreement with the full model's tokens (same token at the same step; after the first
disagreement the prefixes differ, so "prefix" also gives the mean length of the identical prefix).

    python benchmarks/bench_early_exit.py --prompts 40 --lambdas 0.2 0.4 0.6 0.8
"""

from __future__ import annotations

import argparse

from machine import machine


def main() -> None:
    import torch

    import lensmat
    from lensmat.analyses.generation import generate
    from lensmat.stats.pipeline import tokenized

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    p.add_argument("--lenses", default="logit,mat")
    p.add_argument("--fit-tokens", type=int, default=200_000, help="train tokens for the mat maps")
    args = p.parse_args()

    torch.manual_seed(0)
    model = lensmat.load_model(args.model, device="cpu")
    n_layers = int(model.cfg.n_layers)
    print(f"{machine()}; model: {args.model or 'reference'} ({n_layers} blocks)")
    lenses = {}
    for name in args.lenses.split(","):
        lenses[name] = (lensmat.LogitLens(model) if name == "logit" else
                        lensmat.MatLens(model, lensmat.fit_maps(model, max_fit_tokens=args.fit_tokens, progress=False)))
    prompts = [s[: args.prompt_tokens] for s in tokenized(model, None, "heldout").seqs
               if len(s) >= args.prompt_tokens][: args.prompts]
    n_mean = args.prompt_tokens + args.new_tokens / 2
    generate(model, lenses["logit"] if "logit" in lenses else next(iter(lenses.values())), prompts[0], 4)  # warm-up
    full = [generate(model, None, pr, args.new_tokens) for pr in prompts]
    full_s = sum(r["seconds"] for r in full)
    print(f"full model: {full_s:.2f} s for {len(prompts)} × {args.new_tokens} tokens "
          f"({len(prompts) * args.new_tokens / full_s:.0f} tokens/s)")
    print(f"{'lens':<6} {'lambda':>6} {'seconds':>8} {'speed-up':>9} {'blocks/token':>13} {'agreement':>10} {'prefix':>7}")
    for name, lens in lenses.items():
        for lam in args.lambdas:
            runs = [generate(model, lens, pr, args.new_tokens, lam=lam, n_mean=n_mean) for pr in prompts]
            seconds = sum(r["seconds"] for r in runs)
            exits = [e for r in runs for e in r["exit_layers"][1:]]
            same = [a == b for r, f in zip(runs, full) for a, b in zip(r["tokens"], f["tokens"])]
            prefix = [next((i for i, (a, b) in enumerate(zip(r["tokens"], f["tokens"])) if a != b), args.new_tokens)
                      for r, f in zip(runs, full)]
            print(f"{name:<6} {lam:>6.2f} {seconds:>8.2f} {full_s / seconds:>9.2f} {sum(exits) / len(exits):>13.2f} "
                  f"{sum(same) / len(same):>10.3f} {sum(prefix) / len(prefix):>7.1f}")


if __name__ == "__main__":
    main()

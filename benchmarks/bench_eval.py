"""Benchmark: swapped forwards, as ratios measured in one run.

  (c) a forward with every block's attention (or MLP) swapped for its linear map ÷ a plain forward.

Lens evaluation against its measured floor and a plain loop is bench_readout.py; lens quality
against its cost (mat, tuned, mat-tuned at several budgets) is bench_lenses.py.

    python benchmarks/bench_eval.py --eval-tokens 10000 --fit-tokens 20000
"""

from __future__ import annotations

import argparse
import time

from machine import machine


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    import torch

    import lensmat

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--fit-tokens", type=int, default=20_000, help="train tokens for the maps")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()

    torch.manual_seed(0)
    model = lensmat.load_model(args.model, device="cpu")
    L = int(model.cfg.n_layers)
    print(f"{machine()}; model: {args.model or 'reference'} ({L} blocks, d_vocab {model.cfg.d_vocab})")
    heldout = lensmat.tokenized(model, split="heldout")
    batches = list(heldout.batches(args.batch_size, args.eval_tokens))
    n = sum(b.n_scored for b in batches)

    def forward():
        with torch.no_grad():
            for b in batches:
                model(b.tokens)

    forward()  # warm-up
    _, t_fwd = timed(forward)
    print(f"\n{n} held-out tokens: forward {t_fwd:.2f} s")
    sub = lensmat.fit_submodule_maps(model, kinds=["attn", "mlp"], max_fit_tokens=args.fit_tokens, progress=False)
    print("\n(c) swapped forward / plain forward")
    for kind in ("attn", "mlp"):
        hooks = lensmat.swap_hooks(model, sub, [kind])

        def swapped(hooks=hooks):
            with torch.no_grad():
                for b in batches:
                    model.run_with_hooks(b.tokens, fwd_hooks=hooks)

        _, t = timed(swapped)
        print(f"    {kind:<5} in all {L} blocks: {t:.2f} s, {t / t_fwd:.2f}x")


if __name__ == "__main__":
    main()

"""Benchmark: lensmat's statistics at the scale of the papers' largest models, on synthetic activations.

No weights are needed: random float32 activations shaped like the residual stream h_0..h_L of
GPT-2 small (12 blocks x 768), GPT-2 XL (48 x 1600, the largest model of "Jump to Conclusions")
and a 7B Llama-style model (32 x 4096) go through the real accumulation (``GramStats.update``,
the blocks the maps h_l -> h_L need) and the real solve (``fit_map``, one per map). Per shape it prints:

  stats to-L / all-pairs   bytes of the float64 statistics (``stats_nbytes``; to-L is allocated)
  accum s / 1K tok         accumulation time per 1,000 tokens, measured over --tokens tokens
  solve s (all maps)       solving the L maps; measured for --solves maps and scaled to L when fewer
  accum / forward FLOPs    2·(2L+1)·d² accumulation FLOPs per token against the model's forward,
                           2·(12·L·d² + V·d) (weights' multiply-adds, attention scores left out)

A shape whose statistics do not fit the free memory is not allocated: its times are extrapolated
from the largest measured shape by the d² and (2L+1) scaling of the FLOPs, and printed as such.

    python benchmarks/bench_scale.py
    python benchmarks/bench_scale.py --shapes gpt2-small --tokens 4096 --solves 12
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from machine import machine

from lensmat.stats.fit import fit_map
from lensmat.stats.plan import available_bytes
from lensmat.stats.gram import GramStats, pair_pattern, stats_nbytes

SHAPES = {  # name: (blocks L, d_model, vocabulary)
    "gpt2-small": (12, 768, 50257),
    "gpt2-xl": (48, 1600, 50257),
    "llama-7b": (32, 4096, 32000),
}


def flops(L: int, d: int, V: int) -> tuple[float, float]:
    """(accumulation, forward) FLOPs per token."""
    return 2.0 * (2 * L + 1) * d * d, 2.0 * (12 * L * d * d + V * d)


def measure(L: int, d: int, tokens: int, chunk: int, solves: int) -> dict:
    hooks = tuple(f"h{i}" for i in range(L + 1))
    torch.manual_seed(0)
    st = GramStats(hooks, (d,) * (L + 1), pairs=pair_pattern(L + 1, "to_last"))
    x = torch.randn(chunk, (L + 1) * d)  # one chunk, reused: generating activations is not accumulating them
    st.update(x[:8])  # warm-up, not timed
    start = time.perf_counter()
    for _ in range(tokens // chunk):
        st.update(x)
    accum = time.perf_counter() - start
    n = min(solves, L)
    with warnings.catch_warnings():  # fewer tokens than d: the ridge fallback, as on real data with few tokens
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        for layer in range(n):
            fit_map(st, hooks[layer], hooks[-1])
        solve = (time.perf_counter() - start) * L / n
    return {"accum_per_1k": accum * 1000 / ((tokens // chunk) * chunk), "solve": solve, "solved": n,
            "allocated": st.nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=1024, help="tokens accumulated per shape (timing)")
    parser.add_argument("--chunk", type=int, default=128, help="tokens per update (one batch's scored positions)")
    parser.add_argument("--solves", type=int, default=4, help="maps solved per shape, scaled to all L maps")
    args = parser.parse_args()
    print(machine())
    print(f"{'shape':<11} {'L x d':>10} {'stats to-L GB':>13} {'all-pairs GB':>12} {'accum s/1K tok':>14} "
          f"{'solve s (all)':>13} {'accum/fwd FLOPs':>15}  note")
    reference = None
    for name in args.shapes:
        L, d, V = SHAPES[name]
        to_l = stats_nbytes((d,) * (L + 1), pair_pattern(L + 1, "to_last"))
        every = stats_nbytes((d,) * (L + 1), None)
        acc_flops, fwd_flops = flops(L, d, V)
        chunk_bytes = args.chunk * (L + 1) * d * 12
        if to_l + chunk_bytes < 0.8 * available_bytes("cpu"):
            r = measure(L, d, args.tokens, args.chunk, args.solves)
            assert r["allocated"] == to_l
            note = f"measured: {args.tokens} tokens, {r['solved']} of {L} solves"
            reference = (L, d, r)
        elif reference is not None:
            rl, rd, rr = reference
            r = {"accum_per_1k": rr["accum_per_1k"] * (2 * L + 1) * d * d / ((2 * rl + 1) * rd * rd),
                 "solve": rr["solve"] * L * d ** 3 / (rl * rd ** 3)}
            note = f"extrapolated from {rl}x{rd} (statistics do not fit the free memory)"
        else:
            print(f"{name:<11} {f'{L}x{d}':>10} {to_l / 1e9:>13.3f} {every / 1e9:>12.2f}  (no room to measure)")
            continue
        print(f"{name:<11} {f'{L}x{d}':>10} {to_l / 1e9:>13.3f} {every / 1e9:>12.2f} {r['accum_per_1k']:>14.2f} "
              f"{r['solve']:>13.1f} {acc_flops / fwd_flops:>15.1%}  {note}")
        rate = acc_flops * 1000 / r["accum_per_1k"] / 1e9
        print(f"{'':<11} accumulation rate {rate:.1f} GFLOP/s (float64); forward {fwd_flops / 1e9:.2f} GFLOP/token")


if __name__ == "__main__":
    main()

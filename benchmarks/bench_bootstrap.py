"""The bootstrap over documents (lensmat.stats.bootstrap) against scipy.stats.bootstrap on the same
per-document sums: seconds for percentile intervals of S ratio statistics over D documents with B
resamples, and the ratio, measured in one run.

    python benchmarks/bench_bootstrap.py --statistics 800 --documents 300 --resamples 1000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.stats
import torch

from lensmat.stats.bootstrap import Bootstrap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--statistics", type=int, default=800, help="ratio statistics (lenses × metrics × layers)")
    p.add_argument("--documents", type=int, default=300)
    p.add_argument("--resamples", type=int, default=1000)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 40, size=args.documents).astype(float)
    sums = rng.random((args.statistics, args.documents)) * counts
    start = time.perf_counter()
    ours = Bootstrap(args.resamples).ratio(torch.tensor(sums), torch.tensor(counts).expand(args.statistics, -1))
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    theirs = scipy.stats.bootstrap((sums, np.broadcast_to(counts, sums.shape)), lambda s, c, axis: s.sum(axis) / c.sum(axis),
                                   paired=True, vectorized=True, n_resamples=args.resamples, method="percentile",
                                   rng=np.random.default_rng(0), axis=-1).confidence_interval
    t_scipy = time.perf_counter() - start
    width = np.abs(theirs.high - theirs.low).mean()
    gap = max(np.abs(ours.low.numpy() - theirs.low).max(), np.abs(ours.high.numpy() - theirs.high).max())
    print(f"{args.statistics} statistics × {args.documents} documents × {args.resamples} resamples: lensmat "
          f"{t_ours:.3f} s, scipy {t_scipy:.2f} s, scipy / lensmat = {t_scipy / t_ours:.0f}×; largest bound difference "
          f"{gap:.4f} (mean interval width {width:.4f}; different random draws)")


if __name__ == "__main__":
    main()

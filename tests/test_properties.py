"""Property tests (hypothesis): the fitter against lstsq, metric invariances."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_token_batches
from lensmat.stats.gram import GramStats
from lensmat.data import pad
from lensmat.stats.fit import fit_map, r2
from lensmat.lenses.base import LogitLens
from lensmat.lenses.metrics import METRICS, evaluate_lenses


@settings(max_examples=40, deadline=None)
@given(n=st.integers(30, 300), d_in=st.integers(1, 12), d_out=st.integers(1, 8), log_scale=st.floats(-6, 6),
       cond=st.floats(0, 4), intercept=st.booleans(), seed=st.integers(0, 2**16))
def test_fit_matches_lstsq(n, d_in, d_out, log_scale, cond, intercept, seed):
    g = torch.Generator().manual_seed(seed)
    # columns scaled over `cond` decades: condition numbers up to ~1e8 in the Gram matrix
    col_scale = torch.logspace(0, -cond, d_in, dtype=torch.float64)
    offset = 3.0 if intercept else 0.0  # a mean of 3 standard deviations per column
    X = (torch.randn(n, d_in, generator=g, dtype=torch.float64) + offset) * col_scale * 10.0 ** log_scale
    Y = X @ torch.randn(d_in, d_out, generator=g, dtype=torch.float64) + 0.1 * torch.randn(n, d_out, generator=g, dtype=torch.float64)
    stats = GramStats(("x", "y"), (d_in, d_out))
    for chunk in torch.split(torch.cat([X, Y], 1), 17):
        stats.update(chunk)
    m = fit_map(stats, "x", "y", intercept=intercept)
    A = torch.cat([X, torch.ones(n, 1, dtype=X.dtype)], 1) if intercept else X
    ref = torch.linalg.lstsq(A, Y, driver="gelsd").solution
    pred_ref = A @ ref
    pred = X @ m.W.double() + (m.b.double() if intercept else 0)
    # compare fitted values (well-defined even when W is not unique), relative to the data's scale
    assert (pred - pred_ref).norm() <= 1e-4 * Y.norm() + 1e-12
    assert r2(stats, m, "x", "y") <= 1.0 + 1e-9


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_size=st.integers(1, 9), seed=st.integers(0, 1000))
def test_metrics_do_not_depend_on_batching_or_line_order(tiny_model, batch_size, seed):
    seqs = [b.tokens[i, : int(b.attention_mask[i].sum())].tolist()
            for b in random_token_batches(2, 9, 12, 40, seed=7) for i in range(9)]
    perm = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()
    lens = {"logit": LogitLens(tiny_model)}
    ref, _, _ = evaluate_lenses(tiny_model, lens, [pad(seqs)], progress=False)
    shuffled = [seqs[i] for i in perm]
    got, _, _ = evaluate_lenses(tiny_model, lens, [pad(shuffled[i:i + batch_size])
                                                   for i in range(0, len(shuffled), batch_size)], progress=False)
    for metric in METRICS:  # the values (the intervals' resamples follow the documents' order, so they may not)
        for a, b in zip(ref["logit"][metric], got["logit"][metric]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), metric

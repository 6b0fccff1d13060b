"""Streaming least squares against independent computations on stacked activations."""

import pytest
import torch

from conftest import make_tiny_model, random_token_batches
from lensmat.stats.collect import ActivationError, collect, resid_hooks
from lensmat.stats.gram import GramStats
from lensmat.stats.fit import IllConditionedWarning, LinearMap, fit_layer_maps, fit_map, r2, r2_matrices


def stacked(model, batches, hooks):
    """Every scored row of every hook, float64: the paper's way, for reference only."""
    rows = {h: [] for h in hooks}
    for b in batches:
        _, cache = model.run_with_cache(b.tokens)
        for h in hooks:
            rows[h].append(cache[h][b.score_mask].double())
    return {h: torch.cat(v) for h, v in rows.items()}


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_model(n_layers=3, d_model=16)
    batches = random_token_batches(8, 6, 20, 40, seed=1)
    hooks = resid_hooks(3)
    stats = collect(model, batches, [hooks], progress=False)[0]
    return model, batches, hooks, stats, stacked(model, batches, hooks)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_counts_and_sums_match_stacked(setup):
    _, batches, hooks, stats, acts = setup
    assert stats.n == sum(b.n_scored for b in batches) == acts[hooks[0]].shape[0]
    z = torch.cat([acts[h] for h in hooks], dim=-1)
    assert rel_err(stats.gram, z.T @ z) < 1e-12
    assert rel_err(stats.gram, stats.gram.T) < 1e-14
    assert rel_err(stats.sum, z.sum(0)) < 1e-12


def test_gram_of_hooks_of_different_widths_is_the_full_product():
    z = torch.randn(37, 3 + 8 + 5, dtype=torch.float64)
    st = GramStats(("a", "b", "c"), (3, 8, 5))
    for chunk in z.split(10):
        st.update(chunk)
    assert rel_err(st.gram, z.T @ z) < 1e-12 and rel_err(st.gram, st.gram.T) < 1e-14


@pytest.mark.parametrize("intercept", [False, True])
def test_streaming_fit_equals_lstsq(setup, intercept):
    _, _, hooks, stats, acts = setup
    for src, tgt in [(hooks[0], hooks[3]), (hooks[1], hooks[2]), (hooks[2], hooks[3])]:
        X, Y = acts[src], acts[tgt]
        m = fit_map(stats, src, tgt, intercept=intercept)
        if intercept:
            X1 = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
            sol = torch.linalg.lstsq(X1, Y, driver="gelsd").solution
            W_ref, b_ref = sol[:-1], sol[-1]
        else:
            W_ref, b_ref = torch.linalg.lstsq(X, Y, driver="gelsd").solution, None
        # maps are stored in float32: compare the float64 solve through the stored map's predictions
        assert rel_err(m.W, W_ref) < 1e-6  # float32 storage
        if intercept:
            assert rel_err(m.b, b_ref) < 1e-5


def test_float64_solution_equals_lstsq_to_1e8(setup):
    from lensmat.stats.fit import solve_spd

    _, _, hooks, stats, acts = setup
    X, Y = acts[hooks[0]], acts[hooks[3]]
    W = solve_spd(stats.block(hooks[0], hooks[0]), stats.block(hooks[0], hooks[3]))
    W_ref = torch.linalg.lstsq(X, Y, driver="gelsd").solution
    assert rel_err(W, W_ref) <= 1e-8


def test_planted_map_is_recovered():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 12, generator=g, dtype=torch.float64)
    W_true = torch.randn(12, 7, generator=g, dtype=torch.float64)
    b_true = torch.randn(7, generator=g, dtype=torch.float64)
    stats = GramStats(("x", "y"), (12, 7))
    for chunk in torch.split(torch.cat([X, X @ W_true + b_true], 1), 64):  # streamed in pieces
        stats.update(chunk)
    m = fit_map(stats, "x", "y", intercept=True)
    assert rel_err(m.W, W_true) < 1e-6 and rel_err(m.b, b_true) < 1e-6
    assert r2(stats, m, "x", "y") == pytest.approx(1.0, abs=1e-6)
    m0 = fit_map(stats, "x", "y", intercept=False)  # wrong model: the intercept is missed
    assert r2(stats, m0, "x", "y") < 0.999


def test_layer_to_itself_is_identity(setup):
    _, _, hooks, stats, _ = setup
    for h in hooks:
        m = fit_map(stats, h, h)
        assert (m.W - torch.eye(16)).abs().max() < 1e-5
        assert r2(stats, None, h, h) == pytest.approx(1.0, abs=1e-12)


def test_statistics_add_like_one_run(setup):
    model, batches, hooks, stats, _ = setup
    a = collect(model, batches[:3], [hooks], progress=False)[0]
    b = collect(model, batches[3:], [hooks], progress=False)[0]
    both = a + b
    assert both.n == stats.n
    assert rel_err(both.gram, stats.gram) < 1e-12


def test_r2_from_statistics_equals_direct(setup):
    _, _, hooks, stats, acts = setup
    maps = fit_layer_maps(stats, all_pairs=True)
    grids = r2_matrices(stats, maps)
    for i in range(4):
        for j in range(4):
            if i >= j:
                assert grids["mat"][i][j] is None and grids["id"][i][j] is None
                continue
            X, Y = acts[hooks[i]], acts[hooks[j]]
            var = ((Y - Y.mean(0)) ** 2).sum(0)
            for pred, kind in ((X @ maps[(hooks[i], hooks[j])].W.double(), "mat"), (X, "id")):
                direct = float((1 - ((Y - pred) ** 2).sum(0) / var).mean())
                assert grids[kind][i][j] == pytest.approx(direct, abs=1e-6)


def test_rank_deficient_gram_falls_back_to_ridge_with_warning():
    X = torch.randn(5, 10, dtype=torch.float64)  # fewer tokens than dimensions
    stats = GramStats(("x", "y"), (10, 10))
    stats.update(torch.cat([X, X], 1))
    with pytest.warns(IllConditionedWarning, match="5 fit tokens"):
        m = fit_map(stats, "x", "y")
    assert torch.isfinite(m.W).all()
    assert (X @ m.W.double() - X).abs().max() < 1e-3  # still reproduces the data


def test_nan_activations_stop_with_the_hook_name(tiny_model):
    batches = random_token_batches(1, 2, 6, 40)

    def poison(act, hook):
        act[0, 1, 0] = float("nan")
        return act

    with tiny_model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", poison)]):
        with pytest.raises(ActivationError, match="blocks.1.hook_resid_post"):
            collect(tiny_model, batches, [resid_hooks(3)], progress=False)


def test_unknown_hook_is_named(tiny_model):
    with pytest.raises(KeyError, match="blocks.9.hook_resid_post"):
        collect(tiny_model, random_token_batches(1, 1, 4, 40), [("blocks.9.hook_resid_post",)], progress=False)


def test_linear_map_applies_in_input_dtype():
    m = LinearMap(torch.eye(3) * 2, torch.ones(3), "a", "b")
    x = torch.ones(2, 3, dtype=torch.bfloat16)
    assert m(x).dtype == torch.bfloat16 and m(x).tolist() == [[3.0] * 3] * 2


@pytest.mark.parametrize("pattern", ["to_last", "adjacent"])
def test_block_statistics_equal_the_joint_grams_blocks(pattern):
    from lensmat.stats.gram import pair_pattern

    g = torch.Generator().manual_seed(4)
    hooks, dims = ("h0", "h1", "h2", "h3"), (5, 5, 5, 5)
    z = torch.randn(300, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 20, generator=g, dtype=torch.float64)
    full = GramStats(hooks, dims)
    part = GramStats(hooks, dims, pairs=pair_pattern(4, pattern))
    for rows in z.split(70):
        full.update(rows)
        part.update(rows)
    kept = set(pair_pattern(4, pattern))
    for i, a in enumerate(hooks):
        for j, b in enumerate(hooks):
            if (min(i, j), max(i, j)) in kept:
                assert rel_err(part.block(a, b), full.block(a, b)) < 1e-12
            else:
                with pytest.raises(KeyError, match="all pairs"):
                    part.block(a, b)
    pairs = [("h0", "h3"), ("h2", "h3")] if pattern == "to_last" else [("h0", "h1"), ("h2", "h3")]
    for src, tgt in pairs:
        a, b = fit_map(part, src, tgt, intercept=True), fit_map(full, src, tgt, intercept=True)
        assert rel_err(a.W.double(), b.W.double()) < 1e-6 and r2(part, a, src, tgt) == pytest.approx(r2(full, b, src, tgt), rel=1e-10)
    n_blocks = len(kept)
    assert part.nbytes == 8 * (20 + 25 * n_blocks) == sum(t.numel() * 8 for t in [part.sum, *part.panels])
    assert full.nbytes == 8 * (20 + 20 * 20 - 3 * 4 // 2 * 25)  # the upper block triangle: 10 of 16 blocks

"""Linearity scores from streamed statistics against direct computations, and depth pruning."""

import pytest
import torch
from conftest import make_tiny_model, random_token_batches

from lensmat.stats.collect import collect, resid_hook, resid_hooks, run_capture
from lensmat.stats.gram import GramStats, pair_pattern
from lensmat.analyses.linearity import block_maps, evaluate_pruning, heldout_linearity_score, linearity_profile, linearity_score, norm_ratio, pooled_cosine


def stats_of(x: torch.Tensor, y: torch.Tensor, chunks: int = 3) -> GramStats:
    st = GramStats(("x", "y"), (x.shape[1], y.shape[1]))
    for z in torch.cat([x, y], 1).chunk(chunks):
        st.update(z)
    return st


def direct_ls(x: torch.Tensor, y: torch.Tensor, rcond: float | None = None) -> float:
    """The paper's definition on stacked activations, with a pseudo-inverse (singular values below
    ``rcond`` of the largest left out)."""
    xt = x - x.mean(0)
    yt = y - y.mean(0)
    xt, yt = xt / xt.norm(), yt / yt.norm()
    a = torch.linalg.pinv(xt, rtol=rcond) @ yt
    return float(1 - (xt @ a - yt).norm() ** 2)


@pytest.mark.parametrize("seed", range(3))
def test_streamed_score_equals_direct_pseudo_inverse(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5, 12, dtype=torch.float64) + 3
    y = torch.tanh(x @ torch.randn(12, 9, generator=g, dtype=torch.float64)) + 0.3 * torch.randn(500, 9, generator=g, dtype=torch.float64)
    assert abs(linearity_score(stats_of(x, y), "x", "y") - direct_ls(x, y)) <= 1e-8
    xs = x[:, :9]
    assert abs(linearity_score(stats_of(xs, y), "x", "y", residual=True) - direct_ls(xs, y - xs)) <= 1e-8
    assert 0.0 < direct_ls(x, y) < 1.0


@pytest.mark.parametrize("seed", range(3))
def test_score_of_an_invertible_linear_image_is_one(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 10, generator=g, dtype=torch.float64) + 1.5
    m = torch.randn(10, 10, generator=g, dtype=torch.float64) + 3 * torch.eye(10, dtype=torch.float64)
    assert abs(linearity_score(stats_of(x, x @ m), "x", "y") - 1.0) <= 1e-8
    assert abs(linearity_score(stats_of(x, x @ m + 7.0), "x", "y") - 1.0) <= 1e-8  # centring removes offsets


def test_a_layernorm_output_is_scored_on_the_directions_it_spans_without_a_ridge_or_warning():
    """Post-LN states (every BERT h_l) lie in a hyperplane, so C_xx is singular for any number of
    tokens: the score is the least-squares minimum on the other d − 1 directions, exactly."""
    import warnings

    g = torch.Generator().manual_seed(0)
    gain, bias = 1 + 0.3 * torch.randn(12, generator=g), 0.3 * torch.randn(12, generator=g)
    x = torch.nn.functional.layer_norm(torch.randn(2000, 12, generator=g) * torch.linspace(0.1, 3, 12), (12,))
    x = (x * gain + bias).double()  # float32 rounding leaves ~1e-7 in the excluded direction
    y = torch.tanh(x @ torch.randn(12, 12, generator=g, dtype=torch.float64)) + 0.1 * torch.randn(2000, 12, generator=g,
                                                                                                    dtype=torch.float64)
    assert torch.linalg.matrix_rank(x - x.mean(0), rtol=1e-5) == 11
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for target in (y, y - x):
            expected = direct_ls(x, target, rcond=1e-5)
            assert abs(linearity_score(stats_of(x, y), "x", "y", residual=target is not y) - expected) <= 1e-8
            assert abs(expected - direct_ls(x, target)) > 1e-6  # the rounding direction would be fitted otherwise


def test_a_constant_target_counts_as_perfectly_linear():
    x = torch.randn(50, 4, dtype=torch.float64)
    assert linearity_score(stats_of(x, torch.ones(50, 3, dtype=torch.float64)), "x", "y") == 1.0
    assert linearity_score(stats_of(x, x.clone()), "x", "y", residual=True) == 1.0


def test_profile_of_a_model_matches_stacked_activations(tiny_model):
    batches = random_token_batches(3, 6, 16, 40, seed=4)
    hooks = resid_hooks(3)
    stats = collect(tiny_model, batches, [tuple(hooks)], progress=False)[0]
    acts = {h: [] for h in hooks}
    for b in batches:
        cap, _ = run_capture(tiny_model, b, hooks)
        for h in hooks:
            acts[h].append(cap[h].double())
    acts = {h: torch.cat(v) for h, v in acts.items()}
    profile = linearity_profile(stats)
    for layer in range(3):
        x, y = acts[resid_hook(layer)], acts[resid_hook(layer + 1)]
        assert abs(profile["linearity"][layer] - direct_ls(x, y)) <= 1e-8
        assert abs(profile["linearity_no_residual"][layer] - direct_ls(x, y - x)) <= 1e-8
    assert len(profile["linearity"]) == 3 and profile["mean"] == pytest.approx(sum(profile["linearity"]) / 3)
    heldout_batches = random_token_batches(2, 6, 16, 40, seed=9)
    heldout = collect(tiny_model, heldout_batches, [tuple(hooks)], pairs=[pair_pattern(4, "adjacent")],
                      progress=False)[0]
    held = {h: torch.cat([run_capture(tiny_model, b, [h])[0][h].double() for b in heldout_batches]) for h in hooks}
    profile = linearity_profile(stats, heldout)
    for layer in range(3):
        x, y = acts[resid_hook(layer)], acts[resid_hook(layer + 1)]
        xh, yh = held[resid_hook(layer)], held[resid_hook(layer + 1)]
        assert abs(profile["heldout_linearity"][layer] - direct_heldout_ls(x, y, xh, yh)) <= 1e-8
        assert abs(profile["heldout_linearity_no_residual"][layer] - direct_heldout_ls(x, y - x, xh, yh - xh)) <= 1e-8
        assert profile["norm_ratio"][layer] == pytest.approx(float((yh - xh).norm() / xh.norm()), rel=1e-9)
        assert profile["cosine"][layer] == pytest.approx(float((xh * yh).sum() / (xh.norm() * yh.norm())), rel=1e-9)


def direct_heldout_ls(x, y, xh, yh) -> float:
    """Affine lstsq on (x, y), scored on (xh, yh): 1 − ‖resid‖² / ‖yh − mean(yh)‖²."""
    ones = torch.ones(len(x), 1, dtype=x.dtype)
    coef = torch.linalg.lstsq(torch.cat([x, ones], 1), y).solution
    pred = torch.cat([xh, torch.ones(len(xh), 1, dtype=x.dtype)], 1) @ coef
    return float(1 - (yh - pred).norm() ** 2 / (yh - yh.mean(0)).norm() ** 2)


def noisy_pair(seed: int, n: int, d: int = 12):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 1
    return x, x + torch.tanh(x @ m) + 0.2 * torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(3))
def test_heldout_score_equals_direct_lstsq_and_in_sample_on_the_training_tokens(seed):
    x, y = noisy_pair(seed, 400)
    xh, yh = noisy_pair(seed + 100, 300)
    train, heldout = stats_of(x, y), stats_of(xh, yh)
    assert abs(heldout_linearity_score(train, heldout, "x", "y") - direct_heldout_ls(x, y, xh, yh)) <= 1e-8
    assert abs(heldout_linearity_score(train, heldout, "x", "y", residual=True)
               - direct_heldout_ls(x, y - x, xh, yh - xh)) <= 1e-8
    for residual in (False, True):  # the held-out formula on the training tokens is the paper's in-sample score
        assert heldout_linearity_score(train, train, "x", "y", residual=residual) == pytest.approx(
            linearity_score(train, "x", "y", residual=residual), abs=1e-10)
    assert heldout_linearity_score(train, heldout, "x", "y") < linearity_score(train, "x", "y")


def test_too_few_training_tokens_look_perfectly_linear_in_sample_but_not_held_out():
    x, y = noisy_pair(0, 10)  # 10 tokens for 12 dimensions: any target is fitted exactly
    xh, yh = noisy_pair(1, 500)
    with pytest.warns(UserWarning, match="ill-conditioned"):
        assert linearity_score(stats_of(x, y), "x", "y", residual=True) == pytest.approx(1.0, abs=1e-9)  # fitted exactly
    with pytest.warns(UserWarning, match="ill-conditioned"):
        assert heldout_linearity_score(stats_of(x, y), stats_of(xh, yh), "x", "y", residual=True) < 0.5


@pytest.mark.parametrize("seed", range(2))
def test_norm_ratio_and_cosine_equal_their_token_pooled_definitions(seed):
    x, y = noisy_pair(seed, 200)
    st = stats_of(x, y)
    assert norm_ratio(st, "x", "y") == pytest.approx(float((y - x).norm() / x.norm()), rel=1e-10)
    assert pooled_cosine(st, "x", "y") == pytest.approx(float((x * y).sum() / (x.norm() * y.norm())), rel=1e-10)
    assert norm_ratio(stats_of(x, x.clone()), "x", "y") == pytest.approx(0.0, abs=1e-6)
    assert pooled_cosine(stats_of(x, -3 * x), "x", "y") == pytest.approx(-1.0, abs=1e-12)


def model_with_identity_block(block: int):
    """A tiny model whose block ``block`` adds nothing to the residual stream (zero output weights)."""
    model = make_tiny_model(seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(f"layers.{block}.") and (".o." in name or ".fc_out." in name):
                p.zero_()
    return model


def test_an_identity_block_is_perfectly_linear_and_pruning_it_changes_nothing():
    model = model_with_identity_block(1)
    batches = random_token_batches(2, 6, 16, 40, seed=5)
    stats = collect(model, batches, [tuple(resid_hooks(3))], progress=False)[0]
    profile = linearity_profile(stats)
    assert profile["linearity"][1] == pytest.approx(1.0, abs=1e-9)
    assert profile["linearity_no_residual"][1] == 1.0
    assert max(profile["linearity"][0], profile["linearity"][2]) < 1.0 - 1e-6
    variants = {"identity": block_maps(model, stats, identity=True), "linear": block_maps(model, stats)}
    pruning, n = evaluate_pruning(model, variants, [1, 0, 2], batches, max_k=2, progress=False)
    for rows in pruning.values():
        assert rows[0]["precision@1"] == 1.0
        assert rows[1]["precision@1"] == pytest.approx(1.0)  # pruning the identity block
        assert rows[1]["ce"] == pytest.approx(rows[0]["ce"], abs=1e-4)
    assert n == sum(b.n_scored for b in batches)


def test_pruning_matches_a_hand_made_skip(tiny_model):
    """Identity pruning of block 2 = feeding blocks.2.hook_resid_pre straight to the final norm."""
    batches = random_token_batches(1, 4, 12, 40, seed=6)
    stats = collect(tiny_model, batches, [tuple(resid_hooks(3))], progress=False)[0]
    pruning, _ = evaluate_pruning(tiny_model, {"identity": block_maps(tiny_model, stats, identity=True)}, [2],
                                  batches, max_k=1, progress=False)
    b = batches[0]
    cache = {}
    hooks = [("blocks.2.hook_resid_pre", lambda act, hook: cache.update(x=act)),
             ("blocks.2.hook_resid_post", lambda act, hook: cache["x"])]
    logits = tiny_model.run_with_hooks(b.tokens, fwd_hooks=hooks)[b.score_mask]
    full = tiny_model(b.tokens)[b.score_mask]
    p1 = float((logits.argmax(-1) == full.argmax(-1)).double().mean())
    assert pruning["identity"][1]["precision@1"] == pytest.approx(p1)
    assert p1 < 1.0  # a random block matters, so the check above is not vacuous


def test_checkpoint_models_are_ordered_by_tokens_seen(tmp_path):
    import json

    from lensmat.analyses.linearity_models import checkpoint_models, tokens_seen

    for n in (1000, 0, 250):
        folder = tmp_path / "checkpoints" / f"tokens-{n}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "training_state.json").write_text(json.dumps({"tokens_seen": n, "step": n // 10}))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "training_summary.json").write_text(json.dumps({"train_tokens_seen": 2000}))
    found = checkpoint_models(tmp_path)
    assert [tokens_seen(f) for f in found] == [0, 250, 1000, 2000] and found[-1] == str(tmp_path)
    assert tokens_seen("reference") == 8_003_584  # the bundled model's training summary
    with pytest.raises(ValueError, match="No model folders"):
        checkpoint_models(tmp_path / "checkpoints" / "tokens-0" / "nothing")


def test_linearity_over_models_equals_each_models_own_report(reference_model, tmp_path):
    import json

    import lensmat
    from lensmat.reports import linearity, linearity_over_models

    twin = lensmat.load_model(random_init=0, device="cpu")
    budget = dict(max_fit_tokens=1_500, max_eval_tokens=200, max_k=1, progress=False)
    summary = linearity_over_models([reference_model, twin], out=tmp_path / "lin", **budget)
    for row, model in zip(summary["models"], (reference_model, twin)):
        alone = linearity(model, **budget)
        assert row["linearity"] == alone["linearity"] and row["mean_heldout_linearity"] == alone["mean_heldout_linearity"]
        assert row["ce"] == alone["pruning"]["identity"][0]["ce"]
    assert [r["tokens_seen"] for r in summary["models"]] == [8_003_584, None]
    assert json.loads((tmp_path / "lin" / "report.json").read_text())["models"][1]["model"].endswith("seed 0)")
    assert (tmp_path / "lin" / "linearity_models.png").is_file()
    assert sorted(p.name for p in (tmp_path / "lin").iterdir() if p.is_dir())[0].startswith("00-")


def test_heldout_linearity_intervals_bracket_the_score_from_per_token_sums(tiny_model):
    """The per-document sums behind the intervals add up to the held-out score computed from the Gram
    statistics (independent: one token pass against the pooled statistics), and bracket it."""
    from conftest import random_token_batches
    from lensmat.analyses.linearity import heldout_linearity_intervals, linearity_profile
    from lensmat.stats.bootstrap import Bootstrap
    from lensmat.stats.collect import collect, resid_hooks
    from lensmat.stats.gram import pair_pattern

    model = tiny_model
    hooks = resid_hooks(int(model.cfg.n_layers))
    train_b = random_token_batches(6, 8, 16, int(model.cfg.d_vocab), seed=11)
    held_b = random_token_batches(4, 8, 16, int(model.cfg.d_vocab), seed=12)
    adjacent = [pair_pattern(len(hooks), "adjacent")]
    train = collect(model, train_b, [hooks], pairs=adjacent, progress=False)[0]
    held = collect(model, held_b, [hooks], pairs=adjacent, progress=False)[0]
    profile = linearity_profile(train, held)
    got = heldout_linearity_intervals(model, train, held, held_b, Bootstrap(400))
    no_spread = heldout_linearity_intervals(model, train, held, held_b, Bootstrap(1, seed=3))
    for name in ("heldout_linearity", "heldout_linearity_no_residual"):
        for block, score in enumerate(profile[name]):
            assert got["ci_low"][name][block] <= score + 1e-9 <= got["ci_high"][name][block] + 2e-9
            # one resample: low = high = that resample's score, a real reweighting of the documents
            assert no_spread["ci_low"][name][block] == pytest.approx(no_spread["ci_high"][name][block])

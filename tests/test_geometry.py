"""Anisotropy and intrinsic dimension (LLM-Microscope's definitions) against known distributions, a
direct computation of the definitions, their invariances, and the linearity report that carries them."""

import math

import pytest
import torch
from conftest import random_token_batches

from lensmat.analyses.geometry import (LayerSample, anisotropy, anisotropy_profile, intrinsic_dimension,
                                       intrinsic_dimension_profile, layer_geometry)
from lensmat.stats.collect import resid_hooks, run_capture, update_stats
from lensmat.stats.gram import GramStats

F64 = dict(dtype=torch.float64)


def embedded(z: torch.Tensor, d: int = 40, seed: int = 0) -> torch.Tensor:
    """``z [n, k]`` placed in ``R^d`` by a random orthonormal map, shifted off the origin."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, **F64))
    return z @ q[: z.shape[1]] + 3.0


def twonn_by_definition(x: torch.Tensor, reduction_factor: int = 5) -> float:
    """The package's ``intrinsic_dimension``, written out with the full distance matrix and Python floats."""
    x = x.double() - x.double().mean(0)
    x = x / x.norm(dim=1).mean()
    dist = (x[:, None] - x[None]).norm(dim=-1)
    dist.fill_diagonal_(math.inf)
    r = dist.sort(dim=1).values
    mu = sorted(float(b / a) for a, b in zip(r[:, 0], r[:, 1]) if a >= 1e-8 and b / a > 1 + 1e-8)
    n, u = len(x), len(x) - len(mu)
    m = min(len(mu) // reduction_factor, len(mu) - 1)
    logs = [(math.log(mu[i]), -math.log(1 - (u + i + 1) / n)) for i in range(m)]
    return sum(a * b for a, b in logs) / sum(a * a for a, _ in logs)


def test_anisotropy_of_known_distributions():
    g = torch.Generator().manual_seed(0)
    n, d = 20_000, 10
    iso = torch.randn(n, d, generator=g, **F64) + 5
    assert 1 / d < anisotropy(iso) < (1 + 2 * math.sqrt(d / n)) ** 2 / d  # ≈ (1 + sqrt(d/n))² / d
    scales = torch.tensor([2.0, 1, 1, 1, 1], **F64)  # variances 4, 1, 1, 1, 1: λ_max / Σλ = 4/8
    assert anisotropy(torch.randn(n, 5, generator=g, **F64) * scales) == pytest.approx(0.5, abs=0.01)
    line = torch.randn(500, 1, generator=g, **F64) * torch.randn(1, 12, generator=g, **F64) + torch.randn(12, generator=g, **F64)
    assert anisotropy(line) == pytest.approx(1.0, abs=1e-12)  # one direction once centred


def test_streamed_anisotropy_equals_the_stacked_one():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(700, 6, generator=g, **F64) * torch.linspace(0.2, 3, 6, **F64) + 2
    b = torch.tanh(a @ torch.randn(6, 9, generator=g, **F64))
    stats = GramStats(("a", "b"), (6, 9), pairs=())
    for z in torch.cat([a, b], 1).chunk(4):
        stats.update(z)
    assert anisotropy_profile(stats) == pytest.approx([anisotropy(a), anisotropy(b)], abs=1e-12)


@pytest.mark.parametrize("k, kind", [(1, "cube"), (2, "cube"), (3, "cube"), (2, "gauss"), (5, "gauss")])
def test_intrinsic_dimension_of_a_linear_subspace(k, kind):
    g = torch.Generator().manual_seed(k)
    z = torch.rand(2000, k, generator=g, **F64) if kind == "cube" else torch.randn(2000, k, generator=g, **F64)
    assert intrinsic_dimension(embedded(z)) == pytest.approx(k, rel=0.1)  # the estimator's spread at 2000 points


def test_intrinsic_dimension_of_curved_manifolds():
    g = torch.Generator().manual_seed(2)
    t = torch.rand(1500, generator=g, **F64) * 2 * math.pi
    assert intrinsic_dimension(embedded(torch.stack([t.cos(), t.sin()], 1))) == pytest.approx(1.0, abs=0.1)
    u, v = (torch.rand(1500, generator=g, **F64) * 2 * math.pi for _ in range(2))
    torus = torch.stack([(2 + u.cos()) * v.cos(), (2 + u.cos()) * v.sin(), u.sin()], 1)
    assert intrinsic_dimension(embedded(torus)) == pytest.approx(2.0, abs=0.25)


def test_intrinsic_dimension_equals_the_definition_with_duplicates_and_ties():
    g = torch.Generator().manual_seed(3)
    cloud = torch.randn(250, 6, generator=g, **F64)
    grid = torch.cartesian_prod(torch.arange(5.0, **F64), torch.arange(5.0, **F64))  # equidistant neighbours: μ = 1
    grid = torch.cat([grid + 40, torch.zeros(25, 4, **F64)], 1)
    x = torch.cat([cloud, cloud[:20], grid]).float()  # 20 duplicated points; float32 as a model gives them
    assert intrinsic_dimension(x) == pytest.approx(twonn_by_definition(x), rel=1e-9)
    assert intrinsic_dimension(x, reduction_factor=2) == pytest.approx(twonn_by_definition(x, 2), rel=1e-9)


def test_both_are_invariant_to_scale_translation_and_rotation():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(800, 3, generator=g, **F64) @ torch.randn(3, 16, generator=g, **F64) + 0.05 * torch.randn(800, 16, generator=g, **F64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, **F64))
    moved = 37.0 * x @ q - 5.0
    assert anisotropy(moved) == pytest.approx(anisotropy(x), rel=1e-9)
    assert intrinsic_dimension(moved) == pytest.approx(intrinsic_dimension(x), rel=1e-9)


def test_undefined_values_are_none_and_bad_input_is_refused():
    assert intrinsic_dimension(torch.randn(2, 4)) is None and anisotropy(torch.randn(1, 4)) is None
    assert intrinsic_dimension(torch.ones(30, 4)) is None and anisotropy(torch.ones(30, 4)) is None
    assert intrinsic_dimension(torch.randn(4, 4)) is None  # no point left to fit: 4 // 5 = 0
    with pytest.raises(ValueError, match="2-D"):
        anisotropy(torch.randn(10))
    with pytest.raises(ValueError, match="NaN"):
        intrinsic_dimension(torch.full((10, 3), float("nan")))
    with pytest.raises(ValueError, match="reduction_factor"):
        intrinsic_dimension(torch.randn(10, 3), reduction_factor=0)
    with pytest.raises(ValueError, match="non-negative"):
        LayerSample(["a"], -1)


def test_a_layer_sample_keeps_the_first_tokens_of_each_hook(tiny_model):
    hooks = resid_hooks(3)
    batches = random_token_batches(3, 5, 12, 40, seed=7)
    sample, stats, rows = LayerSample(hooks, 40), None, {h: [] for h in hooks}
    for b in batches:
        captured, _ = run_capture(tiny_model, b, hooks)
        sample.add(captured)
        stats = update_stats(stats, [hooks], captured, pairs=[()])
        for h in hooks:
            rows[h].append(captured[h])
    assert sample.n == 40 and sample.full and stats[0].n > 40
    for h in hooks:
        assert torch.equal(sample.states(h), torch.cat(rows[h])[:40])
    assert intrinsic_dimension_profile(sample) == [intrinsic_dimension(torch.cat(rows[h])[:40]) for h in hooks]
    assert intrinsic_dimension_profile(LayerSample(hooks, 0)) == [None] * 4


def test_the_linearity_report_carries_both_per_residual_layer(reference_model, tmp_path):
    """From the passes linearity already makes: anisotropy over the held-out tokens, the intrinsic
    dimension over the first ``max_id_tokens`` of them; both equal the functions on the states captured directly."""
    from lensmat.reports import linearity
    from lensmat.stats.pipeline import tokenized

    n_layers = int(reference_model.cfg.n_layers)
    report = linearity(reference_model, max_fit_tokens=1_000, max_eval_tokens=300, max_k=0, max_id_tokens=200,
                       progress=False, out=tmp_path / "lin")
    assert len(report["anisotropy"]) == len(report["intrinsic_dimension"]) == n_layers + 1
    settings = report["geometry"]
    assert (settings["split"], settings["n_tokens"], settings["n_id_tokens"], settings["max_id_tokens"]) == ("heldout", 300, 200, 200)
    hooks = resid_hooks(n_layers)
    acts = {h: [] for h in hooks}
    for batch in tokenized(reference_model, split="heldout").batches(16, 300):
        captured, _ = run_capture(reference_model, batch, hooks)
        for h in hooks:
            acts[h].append(captured[h])
    acts = {h: torch.cat(v) for h, v in acts.items()}
    assert report["anisotropy"] == pytest.approx([anisotropy(acts[h]) for h in hooks], abs=1e-9)
    assert report["intrinsic_dimension"] == pytest.approx([intrinsic_dimension(acts[h][:200]) for h in hooks], rel=1e-9)
    assert all(0 < a <= 1 for a in report["anisotropy"]) and all(d > 0 for d in report["intrinsic_dimension"])
    assert (tmp_path / "lin" / "geometry.png").is_file() and (tmp_path / "lin" / "linearity.png").is_file()


def test_a_masked_lm_is_read_at_its_mask_positions(tiny_bert):
    from lensmat.stats.pipeline import tokenized

    model, _, corpus = tiny_bert
    out = layer_geometry(model, str(corpus), max_length=64, n_mask=2, mask_seed=1, max_id_tokens=50, progress=False)
    heldout = tokenized(model, str(corpus), "heldout", 64, n_mask=2, mask_seed=1)
    hooks = resid_hooks(int(model.cfg.n_layers))
    acts = {h: [] for h in hooks}
    for batch in heldout.batches(16):
        assert torch.equal(batch.score_mask, batch.tokens == model.tokenizer.mask_token_id)
        captured, _ = run_capture(model, batch, hooks)
        for h in hooks:
            acts[h].append(captured[h])
    acts = {h: torch.cat(v) for h, v in acts.items()}
    assert out["geometry"]["n_tokens"] == 2 * len(heldout.seqs) == len(acts[hooks[0]])
    assert out["anisotropy"] == pytest.approx([anisotropy(acts[h]) for h in hooks], abs=1e-9)
    expected = [intrinsic_dimension(acts[h][:50]) for h in hooks]
    assert expected[0] is None  # h_0 at a [MASK] depends on its position alone: too many duplicates to fit
    assert out["intrinsic_dimension"][0] is None
    assert out["intrinsic_dimension"][1:] == pytest.approx(expected[1:], rel=1e-9)

"""The bootstrap over documents (lensmat.stats.bootstrap) and the intervals and paired tests built on it."""

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from conftest import random_token_batches
from lensmat.lenses.base import Lens, LogitLens
from lensmat.lenses.metrics import METRICS, evaluate_lenses, paired_comparisons
from lensmat.stats.bootstrap import Bootstrap, holm


def test_the_interval_of_a_mean_matches_its_closed_form():
    """One value per document (counts 1): the statistic is the sample mean, whose bootstrap interval is
    close to mean ± 1.96·s/√D (s with divisor D, the bootstrap's plug-in variance)."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(400, generator=g, dtype=torch.float64) * 2 + 5
    interval = Bootstrap(n_resamples=20_000, seed=3).ratio(values[None], torch.ones(1, 400))
    mean, half = float(values.mean()), 1.959964 * float(values.std(unbiased=False)) / math.sqrt(400)
    assert float(interval.value[0]) == pytest.approx(mean)
    assert float(interval.low[0]) == pytest.approx(mean - half, abs=0.03 * half)
    assert float(interval.high[0]) == pytest.approx(mean + half, abs=0.03 * half)


def test_a_ratio_interval_matches_scipy_on_the_same_documents():
    """Per-document sums with unequal counts (a ratio estimator): the same percentile interval as
    scipy.stats.bootstrap resampling the documents (paired) with the same statistic."""
    rng = np.random.default_rng(1)
    counts = rng.integers(3, 40, size=150).astype(float)
    sums = counts * rng.beta(2, 5, size=150) + rng.normal(0, 0.5, size=150)
    ours = Bootstrap(n_resamples=10_000, seed=0).ratio(torch.tensor(sums)[None], torch.tensor(counts)[None])
    theirs = scipy.stats.bootstrap((sums, counts), lambda s, c, axis: s.sum(axis) / c.sum(axis), paired=True,
                                   vectorized=True, n_resamples=10_000, method="percentile",
                                   rng=np.random.default_rng(0)).confidence_interval
    width = theirs.high - theirs.low
    assert float(ours.value[0]) == pytest.approx(sums.sum() / counts.sum())
    assert float(ours.low[0]) == pytest.approx(theirs.low, abs=0.04 * width)
    assert float(ours.high[0]) == pytest.approx(theirs.high, abs=0.04 * width)


def test_resamples_are_fixed_by_the_seed_and_draw_every_document_count():
    b = Bootstrap(n_resamples=50, seed=7)
    w = b.counts(30)
    assert torch.equal(w, b.counts(30)) and not torch.equal(w, Bootstrap(50, seed=8).counts(30))
    assert (w.sum(1) == 30).all() and w.shape == (50, 30)
    none = Bootstrap(n_resamples=0).ratio(torch.ones(2, 5), torch.ones(2, 5))
    assert none.value.tolist() == [1.0, 1.0] and torch.isnan(none.low).all() and torch.isnan(none.high).all()
    with pytest.raises(ValueError, match="n_resamples"):
        Bootstrap(n_resamples=-1)


def test_holm_against_a_hand_computation():
    p = torch.tensor([0.01, 0.04, 0.03, 0.005, float("nan")])
    # sorted 0.005, 0.01, 0.03, 0.04 over m = 4: ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 -> running max
    want = [0.03, 0.06, 0.06, 0.02]
    got = holm(p)
    assert got[:4].tolist() == pytest.approx(want) and math.isnan(got[4])


def test_a_paired_difference_rejects_a_real_effect_and_not_its_absence():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(5, 30, (1, 200), generator=g).double()
    a = counts * 0.6 + torch.randn(1, 200, generator=g, dtype=torch.float64)
    b = a - 0.05 * counts  # b is a with 0.05 less per position
    boot = Bootstrap(2000, seed=1)
    effect = boot.paired(a, counts, b, counts)
    assert float(effect.value) == pytest.approx(0.05) and float(effect.p_value) < 0.01 and effect.low > 0
    same = boot.paired(a, counts, a, counts)
    assert float(same.value) == 0 and float(same.p_value) == 1.0 and same.low == same.high == 0


def test_the_paired_p_value_matches_a_t_test_and_survives_holm_over_many_layers():
    """One value per document: the p-value is the normal test of the mean difference with the bootstrap's
    standard error, close to a one-sample t-test's on the per-document differences; and it is not floored at
    2/(B + 1), so Holm over 40 layers still finds a clear effect at every layer with 1,000 resamples."""
    g = torch.Generator().manual_seed(5)
    d = 0.15 + torch.randn(80, generator=g, dtype=torch.float64)  # per-document differences
    ones = torch.ones(1, 80, dtype=torch.float64)
    got = Bootstrap(4000, seed=2).paired(d[None], ones, torch.zeros(1, 80, dtype=torch.float64), ones)
    t_test = scipy.stats.ttest_1samp(d.numpy(), 0.0).pvalue
    assert float(got.p_value[0]) == pytest.approx(t_test, rel=0.15)
    strong = 0.5 + torch.randn(40, 200, generator=g, dtype=torch.float64)
    many = Bootstrap(1000, seed=0).paired(strong, torch.ones(40, 200), torch.zeros(40, 200), torch.ones(40, 200))
    assert (holm(many.p_value) < 0.05).all()


class Noisy(Lens):
    """The logit lens on ``h`` plus fixed Gaussian noise of ``scale`` times h's RMS: a strict copy, degraded."""

    name = "noisy"

    def __init__(self, model, scale: float) -> None:
        super().__init__(model)
        self.scale = scale

    def transform_hidden(self, h, layer):
        g = torch.Generator().manual_seed(layer)
        noise = torch.randn(h.shape, generator=g, dtype=h.dtype)
        return h + self.scale * h.pow(2).mean(-1, keepdim=True).sqrt() * noise


def test_evaluate_lenses_intervals_and_the_paired_test_on_a_noisy_copy(tiny_model):
    """The logit lens against a copy of itself with noise added: the paired test puts the clean lens
    ahead on KL at every layer (Holm-adjusted), and a lens against an exact copy is never ahead."""
    model = tiny_model
    L = int(model.cfg.n_layers)
    batches = random_token_batches(6, 8, 12, int(model.cfg.d_vocab), seed=2)
    lenses = {"logit": LogitLens(model), "copy": LogitLens(model), "noisy": Noisy(model, 1.0)}
    ev = evaluate_lenses(model, lenses, batches, bootstrap=Bootstrap(500, seed=0), progress=False)
    assert ev.n_documents == 48
    for name, s in ev.scores.items():
        for m in METRICS:
            for layer in range(L + 1):
                assert s["ci_low"][m][layer] <= s[m][layer] + 1e-12 <= s["ci_high"][m][layer] + 2e-12, (name, m)
    assert ev.scores["logit"]["ci_low"]["kl"][L] == ev.scores["logit"]["ci_high"]["kl"][L] == 0.0
    paired = ev.paired(("precision@1", "kl"))
    assert paired == paired_comparisons(ev.sums, ev.bootstrap, ("precision@1", "kl"))
    assert paired["logit vs noisy"]["kl"]["ahead"] == ["logit"] * (L + 1)
    assert all(d < 0 for d in paired["logit vs noisy"]["kl"]["difference"])
    same = paired["logit vs copy"]
    assert same["kl"]["ahead"] == [None] * (L + 1) and same["kl"]["p_value"] == [1.0] * (L + 1)
    assert same["precision@1"]["difference"] == [0.0] * (L + 1)


def test_documents_not_tokens_are_resampled(tiny_model):
    """Per-document sums add up to the totals, and one long document counts once: the same positions
    split over more documents give a narrower interval."""
    model = tiny_model
    batches = random_token_batches(2, 4, 30, int(model.cfg.d_vocab), seed=4)
    lenses = {"logit": LogitLens(model)}
    ev = evaluate_lenses(model, lenses, batches, progress=False)
    sums = ev.sums["logit"].documents
    assert int(sums.total("n")[0]) == ev.n_tokens and ev.n_documents == 8
    one_doc = [type(b)(**{**b.__dict__, "lines": (0,) * len(b.lines)}) for b in batches]  # every row: document 0
    ev1 = evaluate_lenses(model, lenses, one_doc, progress=False)
    assert ev1.n_documents == 1 and ev1.scores["logit"]["kl"] == pytest.approx(ev.scores["logit"]["kl"])
    assert ev1.scores["logit"]["ci_low"]["kl"][0] == ev1.scores["logit"]["ci_high"]["kl"][0]  # one document: no spread


def test_few_documents_are_warned_about():
    from lensmat.data import pad
    from lensmat.lenses.metrics import Reference
    from lensmat.stats.bootstrap import FewDocumentsWarning

    with pytest.warns(FewDocumentsWarning, match="only 4 held-out documents.*--max-eval-tokens"):
        Bootstrap().to_dict(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Bootstrap().to_dict(20)["n_documents"] == 20 and Bootstrap(0).to_dict(3)["n_resamples"] == 0
    with pytest.raises(ValueError, match="numbered"):
        Reference(torch.zeros(2, 5), pad([[0, 1, 2]]))

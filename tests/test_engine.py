"""The readout engine (lensmat.lenses.engine) against the full-vocabulary computation it replaced.

The reference here is the pre-engine implementation, written out in full: every lens's logits
``[n, V]`` through the model's own readout, ``log_softmax``, then each metric. Random models with
vocabularies several chunks wide; NaN rows included.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model, random_token_batches
from lensmat.lenses import engine
from lensmat.lenses.base import Lens, LogitLens
from lensmat.lenses.metrics import TOP_K, LensScores, Reference, evaluate_lenses
from lensmat.stats.collect import resid_hooks, run_capture

V = 5000  # three vocabulary chunks of 2,048


class RandomLens(Lens):
    """A lens whose translation is a fixed random affine map (a stand-in for a fitted one)."""

    name = "random"

    def __init__(self, model, seed: int = 0) -> None:
        super().__init__(model)
        g = torch.Generator().manual_seed(seed)
        d = int(model.cfg.d_model)
        self.register_buffer("W", torch.eye(d) + 0.3 * torch.randn(d, d, generator=g))

    def transform_hidden(self, h, layer):
        return h @ self.W.to(h.dtype)


@pytest.fixture(scope="module")
def big_vocab():
    return make_tiny_model(n_layers=2, d_model=16, d_vocab=V, n_ctx=32, seed=3)


@torch.no_grad()
def full_vocabulary_scores(model, lenses, batches) -> dict:
    """The pre-engine metrics: full logits per layer and lens, log-softmax, then each metric (float64 sums)."""
    L = int(model.cfg.n_layers)
    sums = {name: {m: [0.0] * (L + 1) for m in ("precision@1", "precision@5", "precision@10", "surprisal", "kl", "ce",
                                               "n", "n_ce")} for name in lenses}
    for batch in batches:
        captured, logits = run_capture(model, batch, resid_hooks(L), logits=True)
        logp = torch.log_softmax(logits.float(), -1)
        p, ref_top = logp.exp(), logp.topk(10, -1).indices
        ref = Reference(logits, batch)
        for name, lens in lenses.items():
            for layer, hook in enumerate(resid_hooks(L)):
                logq = torch.log_softmax(lens(captured[hook], layer).float(), -1)
                top1 = logq.argmax(-1)
                s = sums[name]
                for k in TOP_K:
                    s[f"precision@{k}"][layer] += float((ref_top[:, :k] == top1[:, None]).any(-1).sum())
                s["surprisal"][layer] += float(-logp.gather(-1, top1[:, None]).double().sum())
                s["kl"][layer] += float((p * (logp - logq)).sum(-1).double().sum())
                hit = ref.has_target
                s["ce"][layer] += float(-logq[hit].gather(-1, ref.targets[hit][:, None]).double().sum())
                s["n"][layer] += logq.shape[0]
                s["n_ce"][layer] += float(hit.sum())
    return {name: {m: [v / s["n_ce" if m == "ce" else "n"][i] for i, v in enumerate(vals)]
                   for m, vals in s.items() if m not in ("n", "n_ce")} for name, s in sums.items()}


def test_evaluate_lenses_equals_the_full_vocabulary_computation(big_vocab):
    model = big_vocab
    lenses = {"logit": LogitLens(model), "random": RandomLens(model)}
    batches = random_token_batches(3, 6, 12, V, seed=1)
    got = evaluate_lenses(model, lenses, batches, progress=False).scores
    want = full_vocabulary_scores(model, lenses, batches)
    for name in lenses:
        assert got[name]["non_finite"] == [0, 0, 0]
        for metric, values in want[name].items():
            assert got[name][metric] == pytest.approx(values, rel=1e-5, abs=1e-6), (name, metric)
    L = int(model.cfg.n_layers)
    assert got["logit"]["precision@1"][L] == 1.0 and got["logit"]["kl"][L] < 1e-6  # the model itself at L


def _full(model, rows):
    return engine.readout(model, rows).float()


def test_read_matches_the_full_readout_row_by_row_nan_rows_included(big_vocab):
    model = big_vocab
    g = torch.Generator().manual_seed(0)
    rows, ref = 3 * torch.randn(4, 37, 16, generator=g), 3 * torch.randn(37, 16, generator=g)
    rows[1, 5] = float("nan")
    rows[2, 7, 3] = float("inf")
    pick = torch.randint(0, V, (37, 2), generator=g)
    unembedding = engine.Unembedding(model)
    out = engine.read(unembedding, rows, ref, pick=pick, rank=True, entropy=True, chunk_elements=4096)
    z, zr = _full(model, rows), _full(model, ref)
    finite = torch.isfinite(z).all(-1)
    assert finite.sum() == 4 * 37 - 2 and torch.equal(out.finite, finite)
    logq, logp = z.log_softmax(-1), zr.log_softmax(-1)
    f = finite
    torch.testing.assert_close(out.lse[f], z.logsumexp(-1)[f], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.top_ids[..., 0][f], z.argmax(-1)[f])
    kl = (logp.exp() * (logp - logq)).sum(-1)
    torch.testing.assert_close(out.kl[f], kl[f], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ref_at_top1[f], zr.gather(-1, z.argmax(-1).T).T[f], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.ref.top_ids, zr.topk(10).indices)
    picked = z.gather(-1, pick[None].expand(4, -1, -1))
    torch.testing.assert_close(out.picked[f], picked[f], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.rank[f], (z[..., None, :] > picked[..., None])[f].sum(-1))
    torch.testing.assert_close(out.entropy[f], -(logq.exp() * logq).sum(-1)[f], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ref.entropy, -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5)


def test_top_k_is_exact_and_breaks_ties_by_the_lowest_id(big_vocab):
    model = big_vocab
    rows = 3 * torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    out = engine.read(engine.Unembedding(model), rows, k=7, chunk_elements=2048)
    want = _full(model, rows).topk(7)
    assert torch.equal(out.top_ids, want.indices)
    torch.testing.assert_close(out.top_probs, (want.values - _full(model, rows).logsumexp(-1)[..., None]).exp())
    tied = torch.zeros(1, 3, 3 * 2048)  # every logit equal: the lowest ids win, in order
    tied[0, 1, 5000] = 1.0  # one clear winner in the last chunk
    got = engine.read_logits(tied, k=3)
    assert got.top_ids[0, 0].tolist() == [0, 1, 2] and got.top_ids[0, 1].tolist() == [5000, 0, 1]


def test_read_logits_gives_the_same_numbers_as_read(big_vocab):
    model = big_vocab
    rows, ref = 2 * torch.randn(3, 11, 16), 2 * torch.randn(11, 16)
    unembedding = engine.Unembedding(model)
    from_states = engine.read(unembedding, rows, ref, pick=torch.zeros(11, 1, dtype=torch.int64))
    from_logits = engine.read_logits(_full(model, rows), _full(model, ref), pick=torch.zeros(11, 1, dtype=torch.int64))
    for name in ("lse", "kl", "picked", "ref_at_top1"):
        torch.testing.assert_close(getattr(from_states, name), getattr(from_logits, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(from_states.top_ids, from_logits.top_ids)


def test_no_chunk_holds_a_whole_layer(big_vocab):
    """Peak memory is set by the chunk: every logits block the engine asks for is at most one chunk."""
    model = big_vocab
    unembedding = engine.Unembedding(model)
    sizes = []
    logits = unembedding.logits

    def spy(x, start, stop):
        sizes.append(x.shape[0] * (stop - start))
        return logits(x, start, stop)

    unembedding.logits = spy
    n, groups = 200, 6
    engine.read(unembedding, torch.randn(groups - 1, n, 16), torch.randn(n, 16), chunk_elements=1 << 16)
    assert max(sizes) <= 1 << 16 < n * V
    assert sum(sizes) == groups * n * V  # every logit computed exactly once


def test_scores_from_logits_leave_non_finite_rows_out(big_vocab):
    """LensScores.update (logits that exist, e.g. a diverged swap) through the engine: NaN/Inf rows are
    counted and left out, the rest equal the full computation."""
    from lensmat.data import numbered, pad

    g = torch.Generator().manual_seed(0)
    batch, = numbered([pad([[0] + torch.randint(1, V, (9,), generator=g).tolist() for _ in range(2)])])
    n = int(batch.score_mask.sum())
    model_logits, lens_logits = torch.randn(n, V, generator=g), torch.randn(n, V, generator=g)
    lens_logits[3] = float("nan")
    scores = LensScores(0)
    scores.update(0, lens_logits, Reference(model_logits, batch))
    with pytest.warns(UserWarning, match="Non-finite"):
        got = scores.result()
    keep = torch.arange(n) != 3
    logp, logq = model_logits.log_softmax(-1)[keep], lens_logits.log_softmax(-1)[keep]
    assert got["non_finite"] == [1]
    assert got["kl"][0] == pytest.approx(float((logp.exp() * (logp - logq)).sum(-1).mean()), rel=1e-5)
    assert got["surprisal"][0] == pytest.approx(float(-logp.gather(-1, logq.argmax(-1)[:, None]).mean()), rel=1e-5)


def test_a_lens_that_overrides_forward_is_refused_by_the_engine(big_vocab):
    class Forwarding(RandomLens):
        def forward(self, h, layer):
            return super().forward(h, layer) * 2

    with pytest.raises(TypeError, match="overrides forward.*transform_hidden"):
        evaluate_lenses(big_vocab, {"odd": Forwarding(big_vocab)}, random_token_batches(1, 2, 6, V), progress=False)


def test_the_engine_never_asks_the_device_for_a_python_value(big_vocab, monkeypatch):
    """Device-ready: no .item(), float(), int() or bool() on a tensor anywhere in a read (each would
    wait for a GPU), so the sums stay on the device until the caller reads them."""
    unembedding = engine.Unembedding(big_vocab)  # its one-time check compares on the host, before the loop
    rows, ref = torch.randn(3, 20, 16), torch.randn(20, 16)

    def refuse(*args, **kwargs):
        raise AssertionError("a host synchronisation inside the engine")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    out = engine.read(unembedding, rows, ref, k=3, pick=torch.zeros(20, 1, dtype=torch.int64), rank=True,
                      entropy=True, chunk_elements=4096)
    scores = LensScores(0)
    batch_ref = Reference.__new__(Reference)
    batch_ref.logits, batch_ref.targets = None, torch.zeros(20, dtype=torch.int64)
    batch_ref.has_target = torch.ones(20, dtype=torch.bool)
    batch_ref.docs, batch_ref.n_docs = torch.arange(20) // 5, 4
    scores.add(0, engine.read(unembedding, rows[:1], ref, pick=batch_ref.pick).group(0), batch_ref)
    monkeypatch.undo()
    assert out.kl.shape == (3, 20) and scores.documents.sums["n"][0, :4].tolist() == [5] * 4

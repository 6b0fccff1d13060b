"""Lenses and streamed metrics against direct computations on the tiny model."""

import pytest
import torch

from conftest import make_tiny_model, random_token_batches
from lensmat.stats import artifacts as io
from lensmat.stats.collect import collect, resid_hooks
from lensmat.data import pad
from lensmat.stats.fit import MapSet, fit_layer_maps
from lensmat.lenses.base import LogitLens, MatLens
from lensmat.lenses.metrics import METRICS, evaluate_lenses
from lensmat.models import ModelMismatchError, describe


@pytest.fixture(scope="module")
def fitted():
    model = make_tiny_model(n_layers=3, d_model=16)
    train = random_token_batches(10, 8, 24, 40, seed=2)
    stats = collect(model, train, [resid_hooks(3)], progress=False)[0]
    maps = MapSet(fit_layer_maps(stats, all_pairs=True), describe(model).to_dict())
    return model, maps


def direct_logit_lens(model, h):
    """LayerNorm recomputed on h with ln_final's own weight and bias, then W_U and b_U, by hand."""
    params = dict(model.ln_final.named_parameters())
    w, b = params["_original_component.weight"], params["_original_component.bias"]
    normed = torch.nn.functional.layer_norm(h, (h.shape[-1],), w, b, model.cfg.eps)
    return normed @ model.W_U + model.b_U


@torch.no_grad()
def test_logit_lens_at_last_layer_is_the_model(fitted):
    model, maps = fitted
    batch = random_token_batches(1, 3, 10, 40, seed=5)[0]
    logits, cache = model.run_with_cache(batch.tokens)
    h = cache["blocks.2.hook_resid_post"]
    for lens in (LogitLens(model), MatLens(model, maps)):
        assert (lens(h, 3) - logits).abs().max() < 1e-4
    assert (LogitLens(model)(cache["blocks.0.hook_resid_post"], 1)
            - direct_logit_lens(model, cache["blocks.0.hook_resid_post"])).abs().max() < 1e-4


def test_mat_lens_applies_the_map(fitted):
    model, maps = fitted
    h = torch.randn(5, 16)
    A = maps.get("blocks.0.hook_resid_post", "blocks.2.hook_resid_post")
    assert torch.allclose(MatLens(model, maps)(h, 1), LogitLens(model)(h @ A.W, 3), atol=1e-5)
    with pytest.raises(IndexError, match="0..3"):
        LogitLens(model)(h, 4)


@torch.no_grad()
def test_metrics_at_layer_L_are_exact_and_match_direct(fitted):
    model, maps = fitted
    batches = random_token_batches(3, 5, 12, 40, seed=7)
    lenses = {"logit": LogitLens(model), "mat": MatLens(model, maps)}
    scores, _, n = evaluate_lenses(model, lenses, batches, progress=False)
    assert n == sum(b.n_scored for b in batches)
    for name in lenses:
        s = scores[name]
        assert s["precision@1"][3] == s["precision@5"][3] == s["precision@10"][3] == 1.0
        assert abs(s["kl"][3]) < 1e-5
    # direct computation of the logit lens metrics at layer 1
    p1 = p5 = sur = kl = ce = 0.0
    count = count_ce = 0
    for b in batches:
        logits, cache = model.run_with_cache(b.tokens)
        q = direct_logit_lens(model, cache["blocks.0.hook_resid_post"])
        logp, logq = logits.log_softmax(-1), q.log_softmax(-1)
        for i in range(b.tokens.shape[0]):
            for t in range(b.tokens.shape[1]):
                if not b.score_mask[i, t]:
                    continue
                top1 = int(logq[i, t].argmax())
                order = logp[i, t].argsort(descending=True)
                p1 += top1 == int(order[0])
                p5 += top1 in order[:5].tolist()
                sur -= float(logp[i, t, top1])
                kl += float((logp[i, t].exp() * (logp[i, t] - logq[i, t])).sum())
                count += 1
                if b.target_mask[i, t]:
                    ce -= float(logq[i, t, b.tokens[i, t + 1]])
                    count_ce += 1
    s = scores["logit"]
    assert s["precision@1"][1] == pytest.approx(p1 / count, abs=1e-9)
    assert s["precision@5"][1] == pytest.approx(p5 / count, abs=1e-9)
    assert s["surprisal"][1] == pytest.approx(sur / count, rel=1e-5)
    assert s["kl"][1] == pytest.approx(kl / count, rel=1e-4)
    assert s["ce"][1] == pytest.approx(ce / count_ce, rel=1e-5)


def test_results_do_not_depend_on_batch_size_or_padding(fitted):
    model, maps = fitted
    seqs = [b.tokens[i, : int(b.attention_mask[i].sum())].tolist()
            for b in random_token_batches(2, 8, 16, 40, seed=9) for i in range(8)]
    lenses = {"logit": LogitLens(model), "mat": MatLens(model, maps)}
    one, _, _ = evaluate_lenses(model, lenses, [pad([s]) for s in seqs], progress=False)
    all16, _, _ = evaluate_lenses(model, lenses, [pad(seqs)], progress=False)
    for name in lenses:  # the same documents (one per line) whatever the batching: the same intervals too
        for metric in METRICS:
            for got, want in ((one[name], all16[name]), (one[name]["ci_low"], all16[name]["ci_low"]),
                              (one[name]["ci_high"], all16[name]["ci_high"])):
                assert got[metric] == pytest.approx(want[metric], abs=1e-5), (name, metric)


def test_save_load_round_trip_and_mismatch(fitted, tmp_path):
    model, maps = fitted
    path = io.save_maps(maps, tmp_path / "maps")
    loaded = io.load_maps(path, model)
    assert set(loaded.maps) == set(maps.maps)
    for key, m in maps.maps.items():
        assert torch.equal(loaded.maps[key].W, m.W)
    with pytest.raises(FileExistsError, match="--force"):
        io.save_maps(maps, path)
    io.save_maps(maps, path, force=True)
    other = make_tiny_model(n_layers=3, d_model=16, seed=1)
    with pytest.raises(ModelMismatchError, match="unembed_hash"):
        io.load_maps(path, other)
    wider = make_tiny_model(n_layers=2, d_model=20)
    with pytest.raises(ModelMismatchError, match="d_model: fitted on 16, model has 20") as err:
        MatLens(wider, loaded)
    assert "n_layers" in str(err.value)


@torch.no_grad()
def test_length_one_lines_are_scored_without_next_token(fitted):
    """[BOS, x]: position 1 is scored against the model; it has no next token, so CE is undefined."""
    model, maps = fitted
    batch = pad([[0, 7], [0, 3], [0, 12]])
    scores, _, n = evaluate_lenses(model, {"logit": LogitLens(model), "mat": MatLens(model, maps)}, [batch],
                                   progress=False)
    assert n == 3
    assert scores["mat"]["precision@1"][3] == 1.0 and scores["logit"]["kl"][3] == pytest.approx(0, abs=1e-5)
    assert all(v is None for v in scores["logit"]["ce"])
    assert all(v is not None and v == v for v in scores["logit"]["surprisal"])


def test_top_predictions_and_table(tiny_gpt2):
    import torch

    from lensmat.lenses.base import LogitLens, predictions_table, top_predictions

    model, _, _ = tiny_gpt2
    preds = top_predictions(model, {"logit": LogitLens(model)}, "w1 w4 w7", k=5)
    assert preds["tokens"] == ["<|endoftext|>", "w1", "w4", "w7"]
    ids = preds["lenses"]["logit"]["ids"]
    assert ids.shape == (4, 4, 5)
    full = model(torch.tensor([[48, 1, 4, 7]]))[0].topk(5).indices
    assert torch.equal(ids[-1], full)
    table = predictions_table(model, preds, "logit", position=2)
    assert table.shape == (4, 5) and list(table.index)[0] == "layer 0"
    assert table.iloc[-1, 0].startswith(repr(model.tokenizer.decode([int(full[2, 0])])))


def test_non_finite_logits_are_counted_not_scored_as_misses():
    """A diverged swap gives Inf/NaN logits: those positions are counted in non_finite and left out,
    so the metrics equal those of the finite positions alone, and a layer with none left is null."""
    import warnings

    from lensmat.data import numbered, pad
    from lensmat.lenses.metrics import LensScores, NonFiniteWarning, Reference

    g = torch.Generator().manual_seed(0)
    batch, = numbered([pad([[0] + torch.randint(1, 20, (7,), generator=g).tolist() for _ in range(3)])])
    n = int(batch.score_mask.sum())
    model_logits = torch.randn(n, 20, generator=g)
    lens_logits = torch.randn(n, 20, generator=g)
    broken = lens_logits.clone()
    broken[[1, 4]] = float("nan")
    broken[7, 3] = float("inf")
    keep = torch.ones(n, dtype=torch.bool)
    keep[[1, 4, 7]] = False
    scores, clean = LensScores(1), LensScores(1)
    ref = Reference(model_logits, batch)
    scores.update(0, broken, ref)
    scores.update(1, torch.full_like(broken, float("nan")), ref)
    clean.update(0, lens_logits[keep], ref.rows(keep))
    with pytest.warns(NonFiniteWarning, match="layers \\[0, 1\\]"):
        got = scores.result()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = clean.result()
    assert got["non_finite"] == [3, n] and want["non_finite"] == [0, 0]
    for metric in ("precision@1", "precision@5", "surprisal", "kl", "ce"):
        assert got[metric][0] == pytest.approx(want[metric][0]) and got[metric][1] is None


def test_reports_are_strict_json_with_non_finite_values_listed(tmp_path):
    import json

    from lensmat.reports.writing import write_report

    with pytest.warns(RuntimeWarning, match="2 NaN/Inf"):
        write_report({"a": [1.0, float("nan")], "b": {"c": float("inf")}, "d": "x"}, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda t: pytest.fail(t))
    assert saved["a"] == [1.0, None] and saved["b"]["c"] is None and saved["non_finite_values"] == ["a[1]", "b.c"]

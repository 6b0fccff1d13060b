"""The lens transfer matrix (``lensmat transfer``): entry ``[i][j]`` is lens layer ``i``'s translator read
at residual layer ``j``. Checked against independent computations: its diagonal is ``compare``'s per-layer
scores, entries of the mat lens are ``h_j @ A_i`` read through the model's own final norm and unembedding
by hand, row ``L`` of the mat lens is the logit lens, and the rows read per pass do not change a value."""

import json

import pytest
import torch

import lensmat
from lensmat.analyses import transfer as transfer_module
from lensmat.lenses.base import LogitLens, MatLens
from lensmat.lenses.metrics import METRICS
from lensmat.lenses.tuned import TunedLens, TunedLensTraining
from lensmat.stats.collect import resid_hook, resid_hooks
from lensmat.stats.pipeline import tokenized

TINY = dict(max_fit_tokens=600, max_eval_tokens=200, progress=False)


def square(report: dict, name: str, metric: str = "precision@1") -> list:
    return report["transfer"][name][metric]


def random_tuned(model, seed: int = 0) -> TunedLens:
    g = torch.Generator().manual_seed(seed)
    L, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    return TunedLens(model, 0.1 * torch.randn(L, d, d, generator=g), 0.1 * torch.randn(L, d, generator=g))


def test_the_diagonal_is_compare(tiny_gpt2):
    model, _, corpus = tiny_gpt2
    L = int(model.cfg.n_layers)
    tuned = random_tuned(model)
    lenses = ["mat", "mat-affine", tuned]
    r = lensmat.transfer(model, str(corpus), lenses=lenses, **TINY)
    c = lensmat.compare(model, str(corpus), lenses=lenses, **TINY)
    assert r["layers"] == list(range(L + 1)) and r["n_eval_tokens"] == c["n_eval_tokens"] == 200
    assert r["n_fit_tokens"] == c["n_fit_tokens"] > 0 and r["command"] == "transfer"
    for name in ("mat", "mat-affine", "tuned"):
        for metric in METRICS:
            matrix = square(r, name, metric)
            assert len(matrix) == L + 1 and all(len(row) == L + 1 for row in matrix)
            assert [matrix[i][i] for i in range(L + 1)] == pytest.approx(c["lenses"][name][metric], rel=1e-5, abs=1e-6)
    # row L is the identity translator of every lens: the same readings
    assert square(r, "mat", "kl")[L] == pytest.approx(square(r, "tuned", "kl")[L], rel=1e-5, abs=1e-6)
    assert square(r, "mat")[L][L] == 1.0 and square(r, "mat", "kl")[L][L] == pytest.approx(0.0, abs=1e-5)


def hand_scores(model, maps, corpus: str, i: int, j: int, max_tokens: int) -> dict:
    """Precision@1/5, KL(p_model ‖ q) and CE of ``q = unembed(ln_final(h_j @ A_i))`` on the held-out
    tokens, from full logits (``run_with_cache`` and the model's own output as ``p``)."""
    L = int(model.cfg.n_layers)
    A = torch.eye(int(model.cfg.d_model)) if i == L else maps.get(resid_hook(i), resid_hook(L)).W
    hits1 = hits5 = kl = ce = n = n_ce = 0.0
    for batch in tokenized(model, corpus, "heldout").batches(16, max_tokens):
        with torch.no_grad():
            logits, cache = model.run_with_cache(batch.tokens, names_filter=lambda h: h in resid_hooks(L))
            q = model.unembed(model.ln_final(cache[resid_hook(j)] @ A))
        keep = batch.score_mask
        p_log, q_log = logits[keep].log_softmax(-1), q[keep].log_softmax(-1)
        top1 = q_log.argmax(-1)
        hits1 += float((p_log.argmax(-1) == top1).sum())
        hits5 += float((p_log.topk(5, -1).indices == top1[:, None]).any(-1).sum())
        kl += float((p_log.exp() * (p_log - q_log)).sum())
        has = batch.target_mask[keep]
        ce -= float(q_log[has].gather(-1, batch.targets[keep][has][:, None]).sum())
        n, n_ce = n + int(keep.sum()), n_ce + int(has.sum())
    return {"precision@1": hits1 / n, "precision@5": hits5 / n, "kl": kl / n, "ce": ce / n_ce}


def test_entries_are_the_mat_map_of_layer_i_read_at_layer_j(tiny_gpt2):
    model, _, corpus = tiny_gpt2
    L = int(model.cfg.n_layers)
    maps = lensmat.fit_maps(model, str(corpus), max_fit_tokens=600, progress=False)
    r = lensmat.transfer(model, str(corpus), lenses="mat", maps=maps, **TINY)
    assert r["fit_cost"]["mat"]["reused"] is True
    for i, j in ((0, 2), (2, 0), (1, L), (L, 1)):  # (L, j): the identity translator, the logit lens
        want = hand_scores(model, maps, str(corpus), i, j, 200)
        for metric, value in want.items():
            assert square(r, "mat", metric)[i][j] == pytest.approx(value, rel=1e-4, abs=1e-5), (i, j, metric)


def test_row_L_of_the_mat_lens_is_the_logit_lens(tiny_gpt2):
    model, _, corpus = tiny_gpt2
    L = int(model.cfg.n_layers)
    r = lensmat.transfer(model, str(corpus), lenses="mat", **TINY)
    heldout = tokenized(model, str(corpus), "heldout")
    logit = lensmat.evaluate_lenses(model, {"logit": LogitLens(model)}, heldout.batches(16, 200), progress=False)
    for metric in METRICS:
        assert square(r, "mat", metric)[L] == pytest.approx(logit.scores["logit"][metric], rel=1e-5, abs=1e-6)


def test_rows_per_pass_changes_no_value(tiny_gpt2, monkeypatch):
    model, _, corpus = tiny_gpt2
    L = int(model.cfg.n_layers)
    kwargs = dict(lenses=["mat", random_tuned(model, 1)], **TINY)
    two = transfer_module.transfer(model, str(corpus), **kwargs)
    assert two["eval_cost"] == {**two["eval_cost"], "passes": L + 1, "rows_per_pass": 2}  # 2(L+1) rows, 2 a pass
    monkeypatch.setattr(transfer_module, "ROWS_PER_PASS", 3)
    three = transfer_module.transfer(model, str(corpus), **kwargs)
    assert three["eval_cost"]["passes"] == -(-2 * (L + 1) // 3)
    for name in ("mat", "tuned"):
        for metric in ("precision@1", "kl", "ce"):
            for a, b in zip(square(two, name, metric), square(three, name, metric)):
                assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_adjacent_gaps_and_uncovered_rows():
    matrix = [[0.5, 0.4, 0.1], None, [0.2, 0.3, 1.0]]
    gaps = transfer_module.adjacent(matrix)
    assert gaps["from_previous"] == [None, None, None]  # row 1 is missing: no diagonal at 1, no lens of 1 at 2
    assert gaps["from_next"] == [None, None, None]
    full = transfer_module.adjacent([[0.5, 0.4], [0.2, 1.0]])
    assert full["from_previous"] == [None, pytest.approx(0.4 - 1.0)]
    assert full["from_next"] == [pytest.approx(0.2 - 0.5), None]


def test_transferred_lens_reads_the_source_translator(tiny_model):
    tuned = random_tuned(tiny_model, 2)
    row = transfer_module.TransferredLens(tuned, 1)
    h = torch.randn(5, int(tiny_model.cfg.d_model))
    assert row.name == "tuned@1" and all(row.covers(j) for j in range(4))
    for j in range(4):
        torch.testing.assert_close(row.transform_hidden(h, j), tuned.transform_hidden(h, 1))


def test_refusals_before_any_work(tiny_gpt2, tiny_bert):
    model, _, corpus = tiny_gpt2
    for lenses in ("logit", "mat,logit", [LogitLens(model)]):
        with pytest.raises(ValueError, match="no per-layer translator"):
            lensmat.transfer(model, str(corpus), lenses=lenses, **TINY)
    with pytest.raises(ValueError, match="Unknown lens"):
        lensmat.transfer(model, str(corpus), lenses="mat,bogus", **TINY)
    bert, _, bert_corpus = tiny_bert
    with pytest.raises(ValueError, match="masked LM"):
        lensmat.transfer(bert, str(bert_corpus), lenses="mat,tuned", **TINY)


def test_a_mid_site_lens_is_refused(tiny_gpt2):
    from lensmat.stats.pipeline import collect_layer_stats, maps_from_stats

    model, _, corpus = tiny_gpt2
    train = tokenized(model, str(corpus), "train")
    maps = maps_from_stats(model, collect_layer_stats(model, train, max_tokens=300, sites=("post", "mid"),
                                                      progress=False), train)
    with pytest.raises(ValueError, match="'mid' site"):
        lensmat.transfer(model, str(corpus), lenses=[MatLens(model, maps, site="mid")], **TINY)


@pytest.mark.filterwarnings("ignore::lensmat.stats.fit.IllConditionedWarning")  # 84 masked train tokens, d = 32
def test_masked_lm_mat_transfer(tiny_bert):
    model, _, corpus = tiny_bert
    L = int(model.cfg.n_layers)
    r = lensmat.transfer(model, str(corpus), lenses="mat", **TINY)
    c = lensmat.compare(model, str(corpus), lenses="mat", **TINY)
    assert r["protocol"] == "masked" and r["n_eval_tokens"] == c["n_eval_tokens"]
    assert [square(r, "mat")[i][i] for i in range(L + 1)] == pytest.approx(c["lenses"]["mat"]["precision@1"], rel=1e-5)


def test_cli_transfer(tiny_gpt2, tmp_path, capsys):
    from lensmat import cli

    model, folder, corpus = tiny_gpt2
    out = tmp_path / "transfer"
    assert cli.main(["transfer", "--model", str(folder), "--dataset", str(corpus), "--lenses", "mat,mat-tuned",
                     "--max-fit-tokens", "600", "--max-eval-tokens", "200", "--tuned-tokens", "300", "--out", str(out),
                     "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mat-tuned" in printed and "P@1 i=j" in printed and str(out) in printed
    report = json.loads((out / "report.json").read_text())
    L = int(model.cfg.n_layers)
    assert set(report["transfer"]) == {"mat", "mat-tuned"} and report["command"] == "transfer"
    assert len(report["transfer"]["mat-tuned"]["kl"]) == L + 1
    assert len(report["adjacent"]["mat"]["precision@1"]["from_next"]) == L + 1
    assert report["fit_cost"]["mat-tuned"]["tokens"] >= 300
    assert (out / "transfer_mat.png").stat().st_size > 0 and (out / "transfer_mat-tuned.png").stat().st_size > 0
    assert cli.main(["transfer", "--model", str(folder), "--dataset", str(corpus), "--lenses", "logit",
                     "--out", str(tmp_path / "no"), "--quiet"]) != 0
    assert not (tmp_path / "no").exists()


@pytest.mark.slow
def test_bundled_model_mat_and_tuned(reference_model, tmp_path):
    L = int(reference_model.cfg.n_layers)
    r = lensmat.transfer(reference_model, lenses="mat,tuned", max_fit_tokens=5_000, max_eval_tokens=300,
                         tuned_config=TunedLensTraining(tokens=2_000), out=tmp_path / "t", progress=False)
    for name in ("mat", "tuned"):
        p1 = square(r, name)
        assert p1[L][L] == 1.0 and all(0.0 <= v <= 1.0 for row in p1 for v in row)
        assert (tmp_path / "t" / f"transfer_{name}.png").exists()
    assert square(r, "mat", "kl")[L] == pytest.approx(square(r, "tuned", "kl")[L], rel=1e-5, abs=1e-6)

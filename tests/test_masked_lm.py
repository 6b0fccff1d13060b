"""Masked language models (BERT family): the masked protocol on a tiny random local BERT, checked
against the Hugging Face model itself and against lstsq on independently gathered activations."""

import pytest
import torch

from lensmat import data
from lensmat.collect import resid_hook, resid_hooks
from lensmat.compare import compare
from lensmat.fit import IllConditionedWarning
from lensmat.lenses import LogitLens, MatLens, top_predictions
from lensmat.metrics import evaluate_lenses
from lensmat.models import is_masked_lm, mlm_head
from lensmat.pipeline import collect_layer_stats, fit_maps, maps_from_stats, tokenized


@pytest.fixture(scope="module")
def hf_bert(tiny_bert):
    from transformers import BertForMaskedLM

    return BertForMaskedLM.from_pretrained(tiny_bert[1]).eval()


def test_tiny_bert_is_a_masked_lm(tiny_bert, tiny_gpt2):
    assert is_masked_lm(tiny_bert[0]) and not is_masked_lm(tiny_gpt2[0])
    with pytest.raises(ValueError, match="no masked-LM head"):
        mlm_head(tiny_gpt2[0])


def test_masking_is_reproducible_and_never_masks_special_tokens(tiny_bert):
    model, _, corpus = tiny_bert
    tok = model.tokenizer
    seqs = data.tokenize_with_specials(data.load_lines(corpus, "all"), tok, 64)
    assert all(s[0] == tok.cls_token_id and s[-1] == tok.sep_token_id for s in seqs)
    masking = data.Masking.for_tokenizer(tok, n_mask=2, seed=3)
    positions = [masking.positions(s) for s in seqs]
    assert all(len(p) == 2 and 0 not in p and len(s) - 1 not in p for s, p in zip(seqs, positions))
    assert positions == [data.Masking.for_tokenizer(tok, n_mask=2, seed=3).positions(s) for s in seqs]
    assert positions != [data.Masking.for_tokenizer(tok, n_mask=2, seed=4).positions(s) for s in seqs]
    for batch_size in (1, 7):  # the same masked tokens whatever the batching
        got = [(tuple(b.tokens[i][b.score_mask[i]].tolist()), tuple(b.targets[i][b.score_mask[i]].tolist()))
               for b in data.batches(seqs, batch_size, masking=masking, pad_id=tok.pad_token_id)
               for i in range(b.tokens.shape[0])]
        assert got == [((tok.mask_token_id,) * 2, tuple(s[t] for t in p)) for s, p in zip(seqs, positions)]
    capped = list(data.batches(seqs, 4, max_tokens=9, masking=masking))
    assert sum(b.n_scored for b in capped) == 9 and data.count_tokens(seqs, masking) == 2 * len(seqs)
    with pytest.raises(data.CorpusError, match="n_mask"):
        data.Masking(tok.mask_token_id, frozenset(), n_mask=0)
    only_specials = [tok.cls_token_id, tok.sep_token_id]  # nothing to mask: the line is skipped
    assert [b.tokens.shape[0] for b in data.batches([only_specials, seqs[0]], 4, masking=masking)] == [1]


def test_tokenizers_without_mask_or_cls_tokens_are_refused(tiny_gpt2):
    tok = tiny_gpt2[0].tokenizer
    with pytest.raises(data.CorpusError, match="no mask token"):
        data.Masking.for_tokenizer(tok)
    with pytest.raises(data.CorpusError, match=r"\[CLS\] and \[SEP\]"):
        data.tokenize_with_specials(["w1 w2"], tok)


def test_masked_batch_masks():
    batch = data.pad([[9, 5, 6, 7, 8], [9, 3, 8]], pad_id=1, masked=[[1, 3], [2]], mask_id=4)
    assert batch.tokens.tolist() == [[9, 4, 6, 4, 8], [9, 3, 4, 1, 1]]
    assert batch.score_mask.tolist() == batch.target_mask.tolist() == [[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]]
    assert batch.targets[batch.score_mask].tolist() == [5, 7, 8]


@torch.no_grad()
def test_mlm_head_on_last_layer_reproduces_the_models_logits(tiny_bert, hf_bert):
    model, _, corpus = tiny_bert
    heldout = tokenized(model, str(corpus), "heldout", 64)
    batch = next(iter(heldout.batches(6)))
    assert (~batch.attention_mask).any(), "the test needs a padded batch"
    expected = hf_bert(input_ids=batch.tokens, attention_mask=batch.attention_mask.long()).logits
    _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    L = model.cfg.n_layers
    got = LogitLens(model)(cache[resid_hook(L)], L)
    real = batch.attention_mask
    assert (got[real] - expected[real]).abs().max() < 1e-4


@torch.no_grad()
def test_metrics_are_exact_at_L_and_independent_of_padding(tiny_bert):
    model, _, corpus = tiny_bert
    heldout = tokenized(model, str(corpus), "heldout", 64, n_mask=2)
    L = int(model.cfg.n_layers)
    results = []
    for batch_size in (1, 8):
        scores, _, n = evaluate_lenses(model, {"logit": LogitLens(model)}, heldout.batches(batch_size), progress=False)
        assert n == heldout.n_tokens() == 2 * len(heldout.seqs)
        results.append(scores["logit"])
    assert results[0]["precision@1"][L] == 1.0 and results[0]["kl"][L] < 1e-5
    for metric in ("precision@1", "kl", "ce", "surprisal"):  # padding must not leak into real positions
        assert results[0][metric] == pytest.approx(results[1][metric], rel=1e-4, abs=1e-6)


@torch.no_grad()
def test_maps_are_fitted_on_masked_positions_only(tiny_bert, hf_bert):
    """The streamed fit equals lstsq on hidden states gathered at the masked positions by the HF model."""
    model, _, corpus = tiny_bert
    train = tokenized(model, str(corpus), "train", 64, n_mask=2, mask_seed=5)
    stats = collect_layer_stats(model, train, batch_size=8, progress=False)
    with pytest.warns(IllConditionedWarning, match="span only about .* more tokens will not help"):
        maps = maps_from_stats(model, stats, train)  # h_0 at [MASK] = mask embedding + position: low rank
    rows = {layer: [] for layer in (1, 3)}
    n_masked = 0
    for seq in train.seqs:  # one unpadded line at a time, masked by hand
        positions = train.masking.positions(seq)
        ids = torch.tensor([seq])
        ids[0, positions] = model.tokenizer.mask_token_id
        hidden = hf_bert(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in rows:
            rows[layer].append(hidden[layer][0, positions].double())
        n_masked += len(positions)
    assert stats.n == n_masked == 2 * len(train.seqs)
    X, Y = torch.cat(rows[1]), torch.cat(rows[3])
    expected = torch.linalg.lstsq(X, Y).solution
    got = maps.get(resid_hook(1), resid_hook(3)).W.double()
    assert (got - expected).norm() / expected.norm() < 1e-4
    assert maps.provenance["masking"] == {"n_mask": 2, "seed": 5}


def test_compare_runs_the_masked_protocol(tiny_bert, tmp_path):
    model, _, corpus = tiny_bert
    report = compare(model, str(corpus), lenses="logit,mat", out=tmp_path / "cmp", progress=False)
    L = report["n_layers"]
    assert report["protocol"] == "masked" and report["masking"] == {"n_mask": 1, "seed": 0}
    assert report["n_eval_tokens"] == len(tokenized(model, str(corpus), "heldout").seqs)
    for name in ("logit", "mat"):
        assert set(report["lenses"][name]) == {"precision@1", "precision@5", "precision@10", "surprisal", "kl", "ce",
                                               "non_finite"}
        assert report["lenses"][name]["precision@1"][L] == 1.0
    assert len(report["r2"]["mat"]) == L + 1 and (tmp_path / "cmp" / "report.json").is_file()
    for lenses in ("logit,tuned", "mat-tuned"):
        with pytest.raises(ValueError, match="next-token prediction"):
            compare(model, str(corpus), lenses=lenses, progress=False)
    from lensmat.trajectory import trajectory_report

    with pytest.raises(ValueError, match=r"\['mat-tuned'\] are trained on next-token prediction"):
        trajectory_report(model, "w1 w4 w7", str(corpus), lenses="logit,mat-tuned", progress=False)


def test_causal_only_analyses_refuse_a_masked_lm(tiny_bert):
    from lensmat.linearity import linearity
    from lensmat.submodules import submodules
    from lensmat.tuned import train_tuned_lens

    model, _, corpus = tiny_bert
    for run in (lambda: submodules(model, str(corpus), progress=False),
                lambda: linearity(model, str(corpus), progress=False),
                lambda: train_tuned_lens(model, str(corpus), progress=False)):
        with pytest.raises(ValueError, match="masked LM"):
            run()


def test_top_predictions_read_masked_positions(tiny_bert):
    model, _, corpus = tiny_bert
    maps = fit_maps(model, str(corpus), progress=False)
    pred = top_predictions(model, {"logit": LogitLens(model), "mat": MatLens(model, maps)}, "w3 w6 [MASK] w12", k=3)
    assert pred["tokens"] == ["[CLS]", "w3", "w6", "[MASK]", "w12", "[SEP]"]
    L = int(model.cfg.n_layers)
    assert torch.equal(pred["lenses"]["logit"]["ids"][L], pred["lenses"]["mat"]["ids"][L])
    assert len(resid_hooks(L)) == pred["lenses"]["mat"]["ids"].shape[0]


@pytest.mark.slow
def test_bundled_masked_lm_matches_hf_and_its_model_card():
    """The bundled BERT: bridge logits = HF logits, and the held-out masked-token accuracy in its
    training summary is what lensmat's masked protocol measures through the bridge."""
    import json

    from transformers import BertForMaskedLM

    import lensmat
    from lensmat.metrics import masked_token_quality
    from lensmat.models import reference_model_path

    model = lensmat.load_model("masked-lm", device="cpu")
    folder = reference_model_path("masked-lm")
    hf = BertForMaskedLM.from_pretrained(folder).eval()
    heldout = tokenized(model, None, "heldout")
    batch = next(iter(heldout.batches(16)))
    with torch.no_grad():
        expected = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask.long()).logits
        got = model(batch.tokens, attention_mask=batch.attention_mask)
    assert (got - expected)[batch.attention_mask].abs().max() < 1e-4
    summary = json.loads((folder / "training_summary.json").read_text())
    quality = masked_token_quality(lambda t, m: model(t, attention_mask=m), heldout.batches(64))
    assert quality["tokens"] == summary["heldout_tokens"] == 3000
    assert quality["top1_accuracy"] == pytest.approx(summary["heldout_top1_accuracy"], abs=2e-3)
    assert quality["top1_accuracy"] > 10 * summary["majority_baseline_accuracy"]


@pytest.mark.slow
def test_cli_compare_on_the_bundled_masked_lm(tmp_path):
    """`lensmat compare --model masked-lm` offline: mat beats id (the logit lens) at every layer < L."""
    import json

    from lensmat.cli import main

    assert main(["compare", "--model", "masked-lm", "--out", str(tmp_path / "mlm"), "--quiet"]) == 0
    report = json.loads((tmp_path / "mlm" / "report.json").read_text())
    L, p1 = report["n_layers"], {n: report["lenses"][n]["precision@1"] for n in ("logit", "mat")}
    assert report["protocol"] == "masked" and report["n_eval_tokens"] == 3000
    assert p1["logit"][L] == p1["mat"][L] == 1.0
    assert all(p1["mat"][layer] > p1["logit"][layer] for layer in range(L))
    assert (tmp_path / "mlm" / "precision.png").is_file()

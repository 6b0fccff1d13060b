"""Masked language models (BERT family): the masked protocol on a tiny random local BERT, checked
against the Hugging Face model itself and against lstsq on independently gathered activations."""

import pytest
import torch

from lensmat import data
from lensmat.stats.collect import resid_hook, resid_hooks
from lensmat.reports import compare
from lensmat.stats.fit import IllConditionedWarning
from lensmat.lenses.base import LogitLens, MatLens, top_predictions
from lensmat.lenses.metrics import evaluate_lenses
from lensmat.models import is_masked_lm, mlm_head
from lensmat.stats.pipeline import collect_layer_stats, fit_maps, maps_from_stats, tokenized


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
                                               "non_finite", "ci_low", "ci_high", "n_documents"}
        assert report["lenses"][name]["n_documents"] == report["bootstrap"]["n_documents"] > 0  # one [MASK] line each
        assert report["lenses"][name]["precision@1"][L] == 1.0
    assert len(report["r2"]["mat"]) == L + 1 and (tmp_path / "cmp" / "report.json").is_file()
    for lenses in ("logit,tuned", "mat-tuned"):
        with pytest.raises(ValueError, match="next-token prediction"):
            compare(model, str(corpus), lenses=lenses, progress=False)
    from lensmat.reports import trajectory_report

    with pytest.raises(ValueError, match=r"\['mat-tuned'\] are trained on next-token prediction"):
        trajectory_report(model, "w1 w4 w7", str(corpus), lenses="logit,mat-tuned", progress=False)


def test_the_tuned_lens_refuses_a_masked_lm(tiny_bert):
    from lensmat.lenses.tuned import train_tuned_lens

    model, _, corpus = tiny_bert
    with pytest.raises(ValueError, match="masked LM"):
        train_tuned_lens(model, str(corpus), progress=False)


def test_early_exit_and_saturation_refuse_next_token_lenses_on_a_masked_lm(tiny_bert):
    from lensmat.reports import early_exit
    from lensmat.reports import saturation

    model, _, corpus = tiny_bert
    for run, wrong in ((lambda: early_exit(model, str(corpus), lenses="logit,tuned", progress=False), "tuned"),
                       (lambda: early_exit(model, str(corpus), lenses="mat-tuned", progress=False), "mat-tuned"),
                       (lambda: saturation(model, str(corpus), lens="tuned", progress=False), "tuned")):
        with pytest.raises(ValueError, match=rf"\['{wrong}'\] are trained on next-token prediction .* use logit, mat"):
            run()
    with pytest.raises(ValueError, match="defined at every layer"):  # the J-lens is refused for every model
        early_exit(model, str(corpus), lenses="jacobian", progress=False)


def masked_line(corpus, seq: list[int]) -> list[int]:
    """``seq`` with its masked positions (the corpus's masking) replaced by ``[MASK]``, by hand."""
    return [corpus.masking.mask_id if t in corpus.masking.positions(seq) else tok for t, tok in enumerate(seq)]


@pytest.fixture(scope="module")
def masked_heldout(tiny_bert):
    """Held-out lines with 3 masked positions each, and two lines with nothing to mask (``[CLS] [SEP]``)
    inserted, which batching skips."""
    from dataclasses import replace

    model, _, corpus = tiny_bert
    heldout = tokenized(model, str(corpus), "heldout", 64, n_mask=3)
    specials = [model.tokenizer.cls_token_id, model.tokenizer.sep_token_id]
    return replace(heldout, seqs=[specials] + heldout.seqs[:10] + [specials] + heldout.seqs[10:])


@pytest.fixture(scope="module")
def tiny_bert_maps(tiny_bert):
    model, _, corpus = tiny_bert
    with pytest.warns(IllConditionedWarning):  # h_0 at [MASK]: see test_maps_are_fitted_on_masked_positions_only
        return fit_maps(model, str(corpus), max_length=64, n_mask=3, progress=False)


@torch.no_grad()
def hf_masked_top1(hf_bert, corpus) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """``(origin, top-1, original token)`` at every masked position, line by line through the HF model."""
    origin, top1, original = [], [], []
    for line, seq in enumerate(corpus.seqs):
        positions = corpus.masking.positions(seq)
        if positions:
            logits = hf_bert(input_ids=torch.tensor([masked_line(corpus, seq)])).logits[0]
            origin += [(line, p) for p in positions]
            top1 += logits[positions].argmax(-1).tolist()
            original += [seq[p] for p in positions]
    return origin, top1, original


def test_rankings_are_at_the_masked_positions_and_target_the_original_tokens(tiny_bert, masked_heldout):
    from lensmat.analyses.saturation_rankings import collect_rankings

    model, _, _ = tiny_bert
    c = masked_heldout
    r = collect_rankings(model, LogitLens(model), c, k=2, batch_size=4, progress=False)
    expected = [(line, p) for line, seq in enumerate(c.seqs) for p in c.masking.positions(seq)]
    assert r.origin == expected and 0 not in {line for line, _ in r.origin} and 11 not in {line for line, _ in r.origin}
    labels = torch.cat([b.labels[b.score_mask] for b in c.batches(4)])
    assert r.targets(c).tolist() == labels.tolist() == [c.seqs[line][p] for line, p in expected]
    assert all(r.inputs[line] == masked_line(c, c.seqs[line]) for line, _ in expected)
    capped = collect_rankings(model, LogitLens(model), c, k=2, batch_size=4, max_tokens=7, progress=False)
    last = c.masking.positions(c.seqs[3], 1)  # the cap leaves one masked position for the third line
    assert capped.origin == expected[:6] + [(3, last[0])] and capped.targets(c).tolist() == labels[:6].tolist() + [
        c.seqs[3][last[0]]]
    assert capped.inputs[3] == [c.masking.mask_id if t in last else tok for t, tok in enumerate(c.seqs[3])]


def test_the_oracle_exit_emits_the_models_own_top1_at_the_masked_positions(tiny_bert, hf_bert, masked_heldout,
                                                                           tiny_bert_maps):
    from lensmat.analyses.early_exit import emitted_tokens, saturation_curves
    from lensmat.analyses.saturation_rankings import collect_rankings, saturation_layers

    model, _, _ = tiny_bert
    L = int(model.cfg.n_layers)
    r = collect_rankings(model, MatLens(model, tiny_bert_maps), masked_heldout, k=2, batch_size=4, progress=False)
    origin, top1, original = hf_masked_top1(hf_bert, masked_heldout)
    assert r.origin == origin and r.final_topk[:, 0].tolist() == top1
    targets = r.targets(masked_heldout)
    oracle = saturation_curves(r, targets)["oracle"][0]
    s1 = saturation_layers(r.lens_topk[..., :1], r.final_topk[:, :1])[:, 0].clamp(min=1)
    assert bool((s1 < L).any()), "no token exits before L: the check below would be vacuous"
    assert emitted_tokens(r.lens_topk[..., 0], s1).tolist() == top1
    assert oracle["precision@1"] == 1.0 and oracle["mean_layers"] == pytest.approx(float(s1.double().mean()))
    assert oracle["accuracy"] == pytest.approx(sum(a == b for a, b in zip(top1, original)) / len(top1))


def test_confidence_exit_on_a_masked_lm_uses_t_3_and_never_exiting_costs_L(tiny_bert, masked_heldout, tiny_bert_maps):
    import math

    from lensmat.analyses.early_exit import LAMBDAS, confidence_curve
    from lensmat.analyses.saturation_rankings import collect_rankings

    model, _, _ = tiny_bert
    L = int(model.cfg.n_layers)
    r = collect_rankings(model, MatLens(model, tiny_bert_maps), masked_heldout, k=2, batch_size=4, progress=False)
    targets = r.targets(masked_heldout)
    curve = confidence_curve(r, targets, masked=True)
    never = curve[LAMBDAS.index(max(LAMBDAS))]
    assert never["mean_layers"] == L and never["precision@1"] == 1.0
    assert never["accuracy"] == pytest.approx(float((r.final_topk[:, 0] == targets).double().mean()))
    n_mean = sum(p + 1 for _, p in r.origin) / len(r.origin)  # bert_add_results.py: N = mean(token_positions + 1)
    gap = r.top_two_gap
    for row in curve:  # the authors' loop: layers 1..L-1 against θ(3), else L
        theta = 0.9 * row["lambda"] + 0.1 * math.exp(-4 * 3 / n_mean)
        exits = [next((layer for layer in range(1, L) if gap[layer, i] > theta), L) for i in range(len(r.origin))]
        assert row["mean_layers"] == pytest.approx(sum(exits) / len(exits))
    assert any(1 < row["mean_layers"] < L for row in curve)
    by_position = confidence_curve(r, targets, masked=True, masked_t=None)  # t = the token's position
    assert [row["mean_layers"] for row in by_position] != [row["mean_layers"] for row in curve]


@torch.no_grad()
def test_implants_run_the_whole_masked_line(tiny_bert, masked_heldout, monkeypatch):
    from lensmat.analyses import saturation_implant as implants
    from lensmat.analyses.saturation_rankings import collect_rankings

    model, _, _ = tiny_bert
    c, lens, L = masked_heldout, LogitLens(model), int(model.cfg.n_layers)
    r = collect_rankings(model, lens, c, k=1, batch_size=4, progress=False)
    i, j = 4, 20  # a masked token, and one of another line whose state is implanted into it
    (line, pos), (other, _) = r.origin[i], r.origin[j]
    assert line != other and sum(o[0] == line for o in r.origin) == 3
    tokens = masked_line(c, c.seqs[line])
    own = implants.implanted_top1(model, lens, tokens, pos, 1, r.resid[1, i])
    assert own.tolist() == r.lens_topk[:, i, 0].tolist()
    captured = {}

    def put(act, hook):
        act[0, pos] = r.resid[2, j]
        return act

    hooks = [(resid_hook(2), put)] + [(resid_hook(layer), lambda act, hook, layer=layer: captured.__setitem__(layer, act[0, pos]))
                                      for layer in range(L + 1)]
    logits = model.run_with_hooks(torch.tensor([tokens]), fwd_hooks=hooks)[0, pos]
    expected = [int(lens(captured[layer], layer).argmax()) for layer in range(L)] + [int(logits.argmax())]
    assert implants.implanted_top1(model, lens, tokens, pos, 2, r.resid[2, j]).tolist() == expected
    seen = []
    real = implants.implanted_top1
    monkeypatch.setattr(implants, "implanted_top1", lambda m, le, toks, p, *a: seen.append((toks, p)) or real(m, le, toks, p, *a))
    s1 = torch.full((len(r.origin),), 3)
    s1[j] = 1
    implants.implant(model, lens, r, s1, min_gap=1, offsets=(0, 1), pairs=[(j, i)])
    assert seen == [(tokens, pos)]


def test_linearity_of_a_masked_lm_is_scored_at_the_masked_positions(tiny_bert, hf_bert):
    from lensmat.reports import linearity
    from lensmat.lenses.metrics import masked_token_quality

    model, _, corpus = tiny_bert
    L = int(model.cfg.n_layers)
    report = linearity(model, str(corpus), max_length=64, n_mask=2, mask_seed=1, max_k=1, progress=False)
    assert report["protocol"] == "masked" and report["masking"] == {"n_mask": 2, "seed": 1}
    train = tokenized(model, str(corpus), "train", 64, n_mask=2, mask_seed=1)
    rows = {layer: [] for layer in range(L + 1)}
    with torch.no_grad():
        for seq in train.seqs:  # one unpadded line at a time, masked by hand, through the HF model
            hidden = hf_bert(input_ids=torch.tensor([masked_line(train, seq)]), output_hidden_states=True).hidden_states
            for layer in rows:
                rows[layer].append(hidden[layer][0, train.masking.positions(seq)].double())
    acts = {layer: torch.cat(v) for layer, v in rows.items()}
    assert report["n_fit_tokens"] == len(acts[0]) == 2 * len(train.seqs)
    assert report["n_pruning_fit_tokens"] == sum(map(len, train.seqs))  # block maps: every position they replace

    def score(x, y):  # rcond: h_l is a LayerNorm output, exactly in a hyperplane but for float32 rounding (~1e-7)
        x, y = x - x.mean(0), y - y.mean(0)
        x, y = x / x.norm(), y / y.norm()
        return float(1 - (x @ torch.linalg.lstsq(x, y, rcond=1e-5, driver="gelsd").solution - y).norm() ** 2)

    for block in range(L):
        x, y = acts[block], acts[block + 1]
        assert report["linearity"][block] == pytest.approx(score(x, y), abs=1e-6)
        assert report["linearity_no_residual"][block] == pytest.approx(score(x, y - x), abs=1e-6)
    heldout = tokenized(model, str(corpus), "heldout", 64, n_mask=2, mask_seed=1)
    quality = masked_token_quality(lambda t, m: hf_bert(input_ids=t, attention_mask=m.long()).logits,
                                   heldout.batches(8))
    for rows in report["pruning"].values():
        assert rows[0]["precision@1"] == 1.0 and rows[0]["ce"] == pytest.approx(quality["ce"], rel=1e-5)
        assert rows[1]["precision@1"] < 1.0
    assert report["n_eval_tokens"] == quality["tokens"]


def test_submodule_maps_are_fitted_at_every_position_of_the_masked_lines(tiny_bert):
    """A swapped module replaces every position, so its map is fitted on all of them (the masked
    lines as the model reads them); the scores and the mat lens stay at the masked positions."""
    from lensmat.reports import submodules

    model, _, corpus = tiny_bert
    with pytest.warns(IllConditionedWarning):  # h_0 at [MASK], in the mat fits
        report = submodules(model, str(corpus), max_fit_tokens=50, max_eval_tokens=30, max_length=64, progress=False)
    train = tokenized(model, str(corpus), "train", 64)
    lines = list(train.batches(16, 50))
    assert report["protocol"] == "masked" and report["n_fit_tokens"] == 50 == sum(b.n_scored for b in lines)
    assert report["n_submodule_fit_tokens"] == sum(int(b.attention_mask.sum()) for b in lines)
    assert report["n_eval_tokens"] == 30 and report["layout"] == "post-norm"
    for scores in report["variants"].values():
        assert scores["precision@1"][-1] == 1.0


@pytest.mark.parametrize("command", ["early-exit", "saturation", "linearity", "submodules"])
def test_cli_analyses_run_the_masked_protocol(command, tiny_bert, tmp_path):
    import json
    import warnings

    from lensmat.cli import main

    _, folder, corpus = tiny_bert
    extra = {"early-exit": ["--masked-t", "position"], "saturation": ["--permutations", "20", "--pairs", "5"],
             "linearity": [], "submodules": ["--max-eval-tokens", "40"]}[command]
    out = tmp_path / command
    args = [command, "--model", str(folder), "--dataset", str(corpus), "--device", "cpu", "--max-length", "64",
            "--n-mask", "2", "--mask-seed", "4", "--out", str(out), "--quiet", *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)  # h_0 at [MASK], in the mat fits
        assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"] == "masked" and report["masking"] == {"n_mask": 2, "seed": 4}
    if command == "early-exit":
        assert report["threshold_t"] == "position" and set(report["savings"]) == {"logit", "mat"}
        assert report["curves"]["mat"][-1]["precision@1"] == 1.0


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
    from lensmat.lenses.metrics import masked_token_quality
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

"""The "Jump to Conclusions" causal protocol: lines without BOS and one random position per line
(data.Scoring), for fitting and scoring alike."""

import json

import pytest
import torch

from lensmat import data
from lensmat.stats.collect import resid_hook
from lensmat.reports import compare
from lensmat.stats.pipeline import collect_layer_stats, maps_from_stats, tokenized

PAPER = data.Scoring("one-random", bos=False, seed=3)


def test_one_random_position_per_line_depends_only_on_the_seed_and_tokens():
    seqs = [[5, 6, 7, 8], [9], [1, 2, 3, 4, 5, 6], [5, 6, 7, 8]]
    for scoring in (PAPER, data.Scoring("one-random")):
        first = int(scoring.bos)
        chosen = [scoring.chosen(s) for s in seqs]
        assert all(len(c) == 1 and first <= c[0] < len(s) for c, s in zip(chosen, seqs) if len(s) > first)
        assert chosen[0] == chosen[3]  # the same line gets the same position
        assert scoring.count(seqs) == sum(len(s) > first for s in seqs)
        for size in (1, 3):  # batching does not move the positions
            got = [b.score_mask[i].nonzero()[:, 0].tolist() for b in data.batches(seqs, size, scoring=scoring)
                   for i in range(b.tokens.shape[0])]
            assert [g for g in got if g] == [c for c in chosen if c]
    seeds = {tuple(data.Scoring("one-random", seed=s).chosen(list(range(40)))) for s in range(20)}
    assert len(seeds) > 5  # different seeds pick different positions


def test_without_bos_position_zero_is_a_scored_token():
    batch = data.pad([[4, 5, 6], [7]], has_bos=False)
    assert batch.score_mask.tolist() == [[True, True, True], [True, False, False]]
    assert data.count_tokens([[4, 5, 6], [7]], scoring=data.Scoring(bos=False)) == 4
    assert sum(b.n_scored for b in data.batches([[4, 5, 6], [7]], 1, max_tokens=2, scoring=data.Scoring(bos=False))) == 2
    with pytest.raises(data.CorpusError, match="Unknown positions"):
        data.Scoring("random")


@torch.no_grad()
def test_maps_are_fitted_at_the_chosen_positions_without_bos(tiny_gpt2):
    """The streamed fit equals lstsq on HF hidden states at each line's chosen position, no BOS."""
    from transformers import AutoModelForCausalLM

    model, folder, corpus = tiny_gpt2
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    train = tokenized(model, str(corpus), "train", 32, scoring=PAPER)
    assert all(s[0] != data.bos_token_id(model.tokenizer) for s in train.seqs)
    stats = collect_layer_stats(model, train, batch_size=8, pairs="all", progress=False)
    maps = maps_from_stats(model, stats, train, all_pairs=True)  # HF's last hidden state is after ln_f: use 0 -> 2
    rows = {0: [], 2: []}
    for seq in train.seqs:
        (pos,) = PAPER.chosen(seq)
        hidden = hf(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
        for layer in rows:
            rows[layer].append(hidden[layer][0, pos : pos + 1].double())
    assert stats.n == len(train.seqs) == train.n_tokens()
    X, Y = torch.cat(rows[0]), torch.cat(rows[2])
    expected = torch.linalg.lstsq(X, Y).solution
    got = maps.get(resid_hook(0), resid_hook(2)).W.double()
    assert (got - expected).norm() / expected.norm() < 1e-4
    assert maps.provenance["scoring"] == {"positions": "one-random", "bos": False, "seed": 3}


def test_compare_reports_its_scoring_and_the_masked_lm_refuses_it(tiny_gpt2, tiny_bert, tmp_path):
    model, _, corpus = tiny_gpt2
    report = compare(model, str(corpus), lenses="logit,mat", scoring=PAPER, out=tmp_path / "cmp", progress=False)
    saved = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert saved["scoring"] == {"positions": "one-random", "bos": False, "seed": 3}
    assert report["n_eval_tokens"] == len(tokenized(model, str(corpus), "heldout").seqs)  # one per line
    assert report["lenses"]["mat"]["precision@1"][-1] == 1.0
    default = compare(model, str(corpus), lenses="logit", progress=False)
    assert default["scoring"] == {"positions": "all", "bos": True, "seed": 0}
    bert, _, bert_corpus = tiny_bert
    with pytest.raises(ValueError, match="causal models only"):
        compare(bert, str(bert_corpus), lenses="logit", scoring=PAPER, progress=False)

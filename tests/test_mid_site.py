"""Lenses at resid_mid (after attention, before the MLP): maps, readout and ``compare --sites post,mid``."""

import json

import pytest
import torch

from lensmat.stats.collect import parse_sites, resid_hook, site_hooks
from lensmat.reports.tables import format_table
from lensmat.reports import compare
from lensmat.lenses.base import LogitLens, MatLens
from lensmat.lenses.metrics import METRICS, evaluate_lenses
from lensmat.stats.pipeline import collect_layer_stats, maps_from_stats, tokenized


def test_sites_parse_and_refuse_unknown_names():
    assert parse_sites("mid") == ("post", "mid") and parse_sites("post") == ("post",)
    with pytest.raises(ValueError, match="valid sites: post, mid"):
        parse_sites("post,pre")
    assert site_hooks(2, "mid") == ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"]


def test_mid_maps_equal_lstsq_and_the_mid_logit_lens_equals_transformer_lens(tiny_gpt2):
    model, _, corpus = tiny_gpt2
    L = int(model.cfg.n_layers)
    train = tokenized(model, str(corpus), "train")
    stats = collect_layer_stats(model, train, max_tokens=1500, batch_size=8, sites=("post", "mid"), progress=False)
    maps = maps_from_stats(model, stats, train)
    mid, last = site_hooks(L, "mid"), resid_hook(L)
    xs, ys = {h: [] for h in mid}, []
    for batch in train.batches(8, 1500):  # the same tokens, stacked, solved independently
        _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n in mid or n == last)
        for h in mid:
            xs[h].append(cache[h][batch.score_mask].double())
        ys.append(cache[last][batch.score_mask].double())
    Y = torch.cat(ys)
    for h in mid:
        expected = torch.linalg.lstsq(torch.cat(xs[h]), Y).solution
        torch.testing.assert_close(maps.get(h, last).W.double(), expected, atol=2e-4, rtol=1e-3)

    from transformer_lens.tools.analysis.logit_lens import logit_lens

    ids = torch.tensor([train.seqs[0]])
    stack = logit_lens(model, ids, incl_mid=True, positions=None, return_type="logits").values  # [2L+1, 1, pos, V]
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n in mid)
    lens = LogitLens(model, site="mid")
    for block, h in enumerate(mid):
        torch.testing.assert_close(lens(cache[h][0], block), stack[2 * block + 1, 0], atol=1e-4, rtol=1e-4)
    mat = MatLens(model, maps, site="mid")
    assert not mat.covers(L) and mat.covers(L - 1)
    with pytest.raises(IndexError, match="blocks 0..2"):
        mat(cache[mid[0]][0], L)


def test_compare_with_the_mid_site(tiny_gpt2, tmp_path):
    model, _, corpus = tiny_gpt2
    L = int(model.cfg.n_layers)
    kwargs = dict(lenses="logit,mat", max_fit_tokens=1500, max_eval_tokens=600, progress=False)
    plain = compare(model, str(corpus), **kwargs)
    report = compare(model, str(corpus), sites="post,mid", out=tmp_path / "cmp", **kwargs)
    assert report["mid"]["layers"] == list(range(L))
    saved = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert saved["sites"] == ["post", "mid"] and plain["sites"] == ["post"] and "mid" not in plain
    for name, scores in plain["lenses"].items():  # the post site is unchanged by mid (to float32 rounding: the
        for metric in METRICS:                    # engine reads every layer and lens of a batch in one stack)
            for got, want in ((saved["lenses"][name], scores), (saved["lenses"][name]["ci_low"], scores["ci_low"])):
                assert got[metric] == pytest.approx(want[metric], rel=1e-6, abs=1e-7), (name, metric)
    part = saved["mid"]
    assert part["layers"] == list(range(L)) and set(part["lenses"]) == {"logit", "mat"}
    for name in ("logit", "mat"):
        assert len(part["lenses"][name]["precision@1"]) == L
    assert len(part["r2"]["mat"]) == L and all(m >= i - 1e-9 for m, i in zip(part["r2"]["mat"], part["r2"]["id"]))
    # scored independently: the mid lenses alone through evaluate_lenses on the same held-out tokens
    heldout = tokenized(model, str(corpus), "heldout")
    maps = maps_from_stats(model, collect_layer_stats(model, tokenized(model, str(corpus), "train"), max_tokens=1500,
                                                      sites=("post", "mid"), progress=False),
                           tokenized(model, str(corpus), "train"))
    alone, _, _ = evaluate_lenses(model, {"mat": MatLens(model, maps, site="mid")}, heldout.batches(16, 600),
                                  progress=False)
    assert alone["mat"]["kl"] == pytest.approx(part["lenses"]["mat"]["kl"], rel=1e-5)
    assert "block" in format_table(saved, site="mid") and "mat@mid" in format_table(saved, site="mid")
    assert (tmp_path / "cmp" / "precision.png").exists()
    with pytest.raises(ValueError, match="last layer only"):
        compare(model, str(corpus), sites="post,mid", all_pairs=True, **kwargs)


def test_cli_compare_with_mat_tuned_and_the_mid_site(tiny_gpt2, tmp_path, capsys):
    from lensmat import cli

    _, folder, corpus = tiny_gpt2
    out = tmp_path / "cli"
    assert cli.main(["compare", "--model", str(folder), "--dataset", str(corpus), "--lenses", "logit,mat,mat-tuned",
                     "--sites", "post,mid", "--max-fit-tokens", "1500", "--max-eval-tokens", "300",
                     "--tuned-tokens", "1000", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mat-tuned" in printed and "mat@mid" in printed and "logit@mid" in printed
    report = json.loads((out / "report.json").read_text())
    cost = report["fit_cost"]["mat-tuned"]
    assert cost["tokens"] >= 1000 and cost["init"]["tokens"] == report["n_fit_tokens"] > 0
    assert cost["seconds"] >= cost["init"]["seconds"] > 0
    assert set(report["mid"]["lenses"]) == {"logit", "mat"}  # the tuned lenses are not read at mid
    assert report["lenses"]["mat-tuned"]["kl"][-1] == pytest.approx(0.0, abs=1e-6)


def test_the_mid_site_is_refused_on_parallel_attention(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from conftest import save_tiny_causal_lm
    import lensmat

    save_tiny_causal_lm(tmp_path, "gpt2")  # its tokenizer; the weights are replaced by a parallel-attention model
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=49, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, bos_token_id=48,
                                     eos_token_id=48)).eval().save_pretrained(tmp_path)
    model = lensmat.load_model(str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="no blocks.0.hook_resid_mid: its attention and MLP read the same input"):
        compare(model, None, sites="post,mid", progress=False)

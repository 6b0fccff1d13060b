"""The prediction trajectory of one text, checked against an independent readout: the Hugging Face
model's own hidden states through its own ``ln_f`` and ``lm_head`` (tiny random GPT-2), and the
statistics recomputed here from those logits."""

import math

import numpy as np
import pytest
import torch

import lensmat
from lensmat.lenses.base import LogitLens, MatLens, top_predictions
from lensmat.stats.pipeline import fit_maps
from lensmat.analyses.trajectory import STATISTICS, Trajectory, trajectory

from conftest import strict_json

TEXT = "w1 w4 w7 w10 w13"
IDS = [48, 1, 4, 7, 10, 13]  # BOS = 48


@pytest.fixture(scope="module")
def gpt2_lenses(tiny_gpt2):
    model, _, corpus = tiny_gpt2
    return model, {"logit": LogitLens(model), "mat": MatLens(model, fit_maps(model, str(corpus), progress=False))}


@pytest.fixture(scope="module")
def traj(gpt2_lenses) -> Trajectory:
    model, lenses = gpt2_lenses
    return trajectory(model, lenses, TEXT, k=3)


@pytest.fixture(scope="module")
def hf_logits(tiny_gpt2):
    """``[L+1, pos, vocab]`` logit-lens logits from the HF model alone: ``lm_head(ln_f(h_l))`` for
    ``l < L``; HF's last hidden state already has ``ln_f`` applied."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2[1]).eval()
    with torch.no_grad():
        out = hf(torch.tensor([IDS]), output_hidden_states=True)
        hs = out.hidden_states
        rows = [hf.lm_head(hf.transformer.ln_f(h[0])) for h in hs[:-1]] + [hf.lm_head(hs[-1][0])]
    assert torch.allclose(rows[-1], out.logits[0], atol=1e-5)
    return torch.stack(rows).double()


def ranks_of(logits: torch.Tensor, targets: list[int]) -> list[float]:
    """Rank (0 = top-1) of each row's target by sorting the row; NaN where the target is -1."""
    order = logits.argsort(-1, descending=True)
    return [float("nan") if t < 0 else float((order[i] == t).nonzero()[0, 0]) for i, t in enumerate(targets)]


def test_logit_lens_statistics_match_the_hf_readout(traj, hf_logits):
    L = hf_logits.shape[0] - 1
    assert traj.tokens == ["<|endoftext|>", "w1", "w4", "w7", "w10", "w13"] and traj.ids.tolist() == IDS
    assert traj.target_ids.tolist() == IDS[1:] + [-1]
    i = traj.lenses.index("logit")
    final = torch.softmax(hf_logits[L], -1)
    assert traj.final_top1.tolist() == final.argmax(-1).tolist()
    for layer in range(L + 1):
        p = torch.softmax(hf_logits[layer], -1)
        np.testing.assert_allclose(traj.entropy[i, layer], -(p * p.log()).sum(-1), atol=1e-4)
        np.testing.assert_allclose(traj.kl[i, layer], (final * (final.log() - p.log())).sum(-1), atol=1e-4)
        np.testing.assert_allclose(traj.p_final_top1[i, layer], p[range(len(IDS)), final.argmax(-1)], atol=1e-5)
        np.testing.assert_array_equal(traj.target_rank[i, layer], ranks_of(hf_logits[layer], IDS[1:] + [-1]))
        np.testing.assert_array_equal(traj.top_ids[i, layer], p.topk(3).indices)
        np.testing.assert_allclose(traj.top_probs[i, layer], p.topk(3).values, atol=1e-5)
    assert np.isnan(traj.target_rank[:, :, -1]).all() and not np.isnan(traj.target_rank[:, :, :-1]).any()


def test_the_last_layer_is_the_model_for_every_lens(traj, tiny_gpt2):
    model = tiny_gpt2[0]
    L = traj.n_layers
    logits = model(torch.tensor([IDS]))[0]
    np.testing.assert_allclose(traj.kl[:, L], 0.0, atol=1e-6)
    for i in range(len(traj.lenses)):
        np.testing.assert_allclose(traj.p_final_top1[i, L], torch.softmax(logits, -1).max(-1).values.detach(), atol=1e-5)
    assert traj.summary()["logit"]["settles_at_layer"][0] is not None


def test_mat_lens_ranks_and_entropy_from_run_with_cache(traj, gpt2_lenses):
    """The mat lens's cells recomputed from activations captured by run_with_cache on the same ids."""
    from lensmat.stats.collect import resid_hook

    model, lenses = gpt2_lenses
    _, cache = model.run_with_cache(torch.tensor([IDS]))
    i = traj.lenses.index("mat")
    for layer in range(traj.n_layers + 1):
        with torch.no_grad():  # a lens passes gradients on unless the caller turns them off
            logits = lenses["mat"](cache[resid_hook(layer)][0], layer).double()
        p = torch.softmax(logits, -1)
        assert traj.target_rank[i, layer, :-1].tolist() == ranks_of(logits, IDS[1:])[:]
        np.testing.assert_allclose(traj.entropy[i, layer], -(p * p.log()).sum(-1), atol=1e-4)


def test_top_predictions_is_the_same_readout(traj, gpt2_lenses):
    model, lenses = gpt2_lenses
    preds = top_predictions(model, lenses, TEXT, k=3)
    assert preds["tokens"] == traj.tokens
    for i, name in enumerate(traj.lenses):
        assert preds["lenses"][name]["ids"].tolist() == traj.top_ids[i].tolist()
        np.testing.assert_allclose(preds["lenses"][name]["probs"], traj.top_probs[i], atol=1e-6)


def test_frame_and_csv_round_trip(traj, tmp_path):
    import pandas as pd

    df = traj.frame()
    n_pos = len(IDS)
    assert len(df) == 2 * (traj.n_layers + 1) * n_pos
    for col in ("lens", "layer", "position", "token", "target", "final_top1", "covered", "top1_token", "top1_prob",
                "top3_token", "top3_prob", *STATISTICS):
        assert col in df.columns
    row = df[(df.lens == "mat") & (df.layer == 1) & (df.position == 2)].iloc[0]
    i = traj.lenses.index("mat")
    assert row.token == "w4" and row.target == "w7" and row.top1_token == traj.vocab[int(traj.top_ids[i, 1, 2, 0])]
    assert row.kl == pytest.approx(traj.kl[i, 1, 2]) and row.target_rank == traj.target_rank[i, 1, 2]
    assert df[df.position == n_pos - 1].target_rank.isna().all() and df[df.position == n_pos - 1].target.isna().all()
    back = pd.read_csv(traj.to_csv(tmp_path / "t.csv"))
    assert back.shape == df.shape and list(back.columns) == list(df.columns)
    assert back.token.tolist() == df.token.tolist() and back.top2_token.tolist() == df.top2_token.tolist()
    np.testing.assert_allclose(back.kl, df.kl, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(back.target_rank.to_numpy(float), df.target_rank.to_numpy(float, na_value=np.nan))


@pytest.mark.parametrize("statistic", list(STATISTICS))
def test_plot_has_one_panel_per_lens_and_a_labelled_colourbar(traj, statistic):
    import matplotlib.pyplot as plt

    fig = traj.plot(statistic)
    panels, bars = fig.axes[:2], fig.axes[2:]
    assert len(fig.axes) == 3 and len(bars) == 1
    assert [a.get_title() for a in panels] == ["logit lens", "mat lens"]
    assert STATISTICS[statistic].split(" [")[0] in bars[0].get_ylabel()
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["<|endofte…", "w1", "w4", "w7", "w10", "w13"]
    cells = [t.get_text() for t in panels[1].texts]
    assert len(cells) == (traj.n_layers + 1) * len(IDS)
    assert cells[0] == traj.top1_tokens("mat")[0][0].strip()
    assert panels[0].get_ylim()[0] < panels[0].get_ylim()[1]  # layer 0 at the bottom
    plt.close(fig)
    fig = traj.plot(statistic, lenses=["mat"])
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "mat lens"
    plt.close(fig)


def test_bad_input_is_refused_with_the_valid_choices(traj, gpt2_lenses):
    model, lenses = gpt2_lenses
    with pytest.raises(ValueError, match="valid statistics: p_final_top1, entropy, kl, target_rank"):
        traj.plot("surprisal")
    with pytest.raises(ValueError, match="holds logit, mat"):
        traj.plot("kl", lenses=["tuned"])
    with pytest.raises(ValueError, match="empty"):
        trajectory(model, lenses, "  ")
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        trajectory(model, lenses, " ".join(["w1"] * 64))
    with pytest.raises(ValueError, match="k must be"):
        trajectory(model, lenses, TEXT, k=0)
    with pytest.raises(ValueError, match="at least one lens"):
        trajectory(model, {}, TEXT)


def test_an_uncovered_layer_shows_the_model(tiny_gpt2):
    import matplotlib.pyplot as plt

    class FirstLayersOnly(LogitLens):
        def covers(self, layer):
            return layer < 2

    model = tiny_gpt2[0]
    t = trajectory(model, {"logit": LogitLens(model), "early": FirstLayersOnly(model)}, TEXT, k=2)
    assert t.covered[0].all() and t.covered[1].tolist() == [True, True, False, False]
    np.testing.assert_allclose(t.kl[1, 2:], 0.0, atol=1e-9)
    np.testing.assert_array_equal(t.top_ids[1, 2], t.top_ids[0, t.n_layers])
    np.testing.assert_array_equal(t.entropy[1, :2], t.entropy[0, :2])
    assert not t.frame().query("lens == 'early' and layer >= 2").covered.any()
    fig = t.plot("entropy")
    assert fig.axes[1].texts[2 * len(IDS)].get_text().endswith("*") and "undefined" in fig._suptitle.get_text()
    plt.close(fig)


def test_a_mid_site_lens_reads_resid_mid(tiny_gpt2):
    """A lens of site ``mid`` reads ``blocks.{l}.hook_resid_mid`` at l < L and shows the model at L."""
    from lensmat.lenses.base import readout

    model = tiny_gpt2[0]
    t = trajectory(model, {"mid": LogitLens(model, site="mid")}, TEXT, k=2)
    L = t.n_layers
    assert t.covered[0].tolist() == [True] * L + [False]
    _, cache = model.run_with_cache(torch.tensor([IDS]))
    for block in range(L):
        with torch.no_grad():
            p = torch.softmax(readout(model, cache[f"blocks.{block}.hook_resid_mid"][0]).double(), -1)
        np.testing.assert_allclose(t.entropy[0, block], -(p * p.log()).sum(-1), atol=1e-4)
    np.testing.assert_allclose(t.kl[0, L], 0.0, atol=1e-9)


@pytest.mark.filterwarnings("ignore::lensmat.stats.fit.IllConditionedWarning")  # 84 fit tokens, d = 32
def test_masked_lm_target_is_the_token_itself(tiny_bert):
    from transformers import BertForMaskedLM

    model, folder, corpus = tiny_bert
    lenses = {"logit": LogitLens(model), "mat": MatLens(model, fit_maps(model, str(corpus), progress=False))}
    t = trajectory(model, lenses, "w3 w6 [MASK] w12", k=3)
    assert t.masked and t.tokens == ["[CLS]", "w3", "w6", "[MASK]", "w12", "[SEP]"]
    ids = t.ids.tolist()
    assert t.target_ids.tolist() == [ids[0], ids[1], ids[2], -1, ids[4], ids[5]]
    with torch.no_grad():
        logits = BertForMaskedLM.from_pretrained(folder).eval()(torch.tensor([ids])).logits[0].double()
    L = t.n_layers
    np.testing.assert_array_equal(t.target_rank[0, L], ranks_of(logits, t.target_ids.tolist()))
    assert np.isnan(t.target_rank[:, :, 3]).all()
    np.testing.assert_allclose(t.kl[:, L], 0.0, atol=1e-6)
    assert t.frame().query("position == 1").target.eq("w3").all()
    assert "token at the position" in t.plot("target_rank")._suptitle.get_text()


def test_trajectory_is_in_the_plan():
    from lensmat.stats.plan import COMMANDS, ModelShape, plan

    shape = ModelShape("m", 4, 16, 40)
    assert "trajectory" in COMMANDS
    assert any("train statistics" in item for item in plan("trajectory", shape).items)
    assert not any("train statistics" in item for item in plan("trajectory", shape, fits_maps=False).items)


def test_cli_trajectory_on_a_tiny_model(tiny_gpt2, tmp_path, capsys):
    import pandas as pd

    from lensmat import cli

    _, folder, corpus = tiny_gpt2
    out = tmp_path / "traj"
    args = ["trajectory", "--model", str(folder), "--dataset", str(corpus), "--text", TEXT, "--lenses", "logit,mat",
            "--statistic", "p_final_top1", "--k", "2", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "trajectory.png" in printed and "trajectory.csv" in printed and "mat" in printed
    assert (out / "trajectory.png").stat().st_size > 10_000
    df = pd.read_csv(out / "trajectory.csv")
    assert len(df) == 2 * 4 * len(IDS) and "top2_token" in df.columns and "top3_token" not in df.columns
    report = strict_json(out / "report.json")
    assert report["text"] == TEXT and report["tokens"][1] == "w1" and report["statistic"] == "p_final_top1"
    assert report["lenses"] == ["logit", "mat"] and report["fit_cost"]["mat"]["tokens"] > 0
    assert cli.main(args) == 2 and "already exists" in capsys.readouterr().err
    assert cli.main([*args, "--force", "--text", ""]) == 2 and "empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*args, "--force", "--statistic", "surprisal"])


@pytest.mark.slow
def test_cli_trajectory_on_the_bundled_model(tmp_path):
    from lensmat import cli

    out = tmp_path / "traj"
    text = "The capital of France is Paris, and the capital of Germany is"
    assert cli.main(["trajectory", "--text", text, "--lenses", "logit,mat", "--out", str(out), "--max-fit-tokens",
                     "2000", "--quiet"]) == 0
    report = strict_json(out / "report.json")
    n = len(report["tokens"])
    assert (out / "trajectory.png").is_file()
    assert sum(1 for _ in (out / "trajectory.csv").open()) == 1 + 2 * (report["n_layers"] + 1) * n
    assert report["summary"]["mat"]["mean_kl"][-1] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(report["summary"]["logit"]["mean_kl"][0])
    assert lensmat.trajectory is trajectory


# A batch of prompts, a followed token (targets=) and lenses given by name (issue 35).

OTHER = "w2 w5 w8"


@pytest.fixture(scope="module")
def followed(gpt2_lenses) -> list[Trajectory]:
    model, lenses = gpt2_lenses
    return trajectory(model, lenses, [TEXT, OTHER], k=3, targets=["w7", 9])


def test_followed_token_matches_run_with_cache_and_readout(followed, gpt2_lenses):
    from lensmat.lenses.base import readout
    from lensmat.stats.collect import resid_hook

    model, lenses = gpt2_lenses
    t = followed[0]
    assert isinstance(followed, list) and len(followed) == 2 and [f.follow_id for f in followed] == [7, 9]
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([IDS]))
        for i, name in enumerate(t.lenses):
            for layer in range(t.n_layers + 1):
                h = cache[resid_hook(layer)][0]
                logits = readout(model, h if name == "logit" else lenses[name].transform_hidden(h, layer)).double()
                logp = torch.log_softmax(logits, -1)[:, 7]
                assert t.follow_rank[i, layer].tolist() == ranks_of(logits, [7] * len(IDS))
                np.testing.assert_allclose(t.follow_logprob[i, layer], logp, atol=1e-5)
                np.testing.assert_allclose(t.follow_prob[i, layer], logp.exp(), atol=1e-6)
    np.testing.assert_array_equal(t.follow_rank[:, :, 2], t.target_rank[:, :, 2])  # w4 -> w7: the same token
    assert t.rank_trajectory("mat").tolist() == t.follow_rank[1].tolist()
    assert t.rank_trajectory().shape == (2, t.n_layers + 1, len(IDS)) and t.rank_trajectory().dtype == np.int64


def test_a_batch_reads_like_each_prompt_alone(followed, gpt2_lenses):
    model, lenses = gpt2_lenses
    assert followed[1].tokens == ["<|endoftext|>", "w2", "w5", "w8"] and followed[1].text == OTHER
    for t, text, target in zip(followed, [TEXT, OTHER], [" w7", 9]):
        alone = trajectory(model, lenses, text, k=3, targets=target)
        assert alone.tokens == t.tokens and alone.follow_id == t.follow_id
        for name in ("top_ids", "top_probs", *STATISTICS, "follow_rank", "follow_prob", "follow_logprob"):
            np.testing.assert_array_equal(getattr(alone, name), getattr(t, name))
    same = trajectory(model, lenses, (TEXT, OTHER), k=3, targets=7)
    assert [s.follow_id for s in same] == [7, 7]
    plain = trajectory(model, lenses, [TEXT], k=3)
    assert len(plain) == 1 and plain[0].follow_id is None and plain[0].follow_rank is None
    assert "follow_rank" not in plain[0].frame().columns


def test_frame_has_the_follow_columns(followed):
    t = followed[0]
    df = t.frame()
    assert list(df.columns[-4:]) == ["follow_token", "follow_rank", "follow_prob", "follow_logprob"]
    assert (df.follow_token == "w7").all() and len(df) == 2 * (t.n_layers + 1) * len(IDS)
    row = df[(df.lens == "mat") & (df.layer == 1) & (df.position == 3)].iloc[0]
    assert row.follow_rank == t.follow_rank[1, 1, 3] and row.follow_prob == pytest.approx(t.follow_prob[1, 1, 3])
    assert row.follow_logprob == pytest.approx(math.log(row.follow_prob))


def test_bad_targets_are_refused(traj, gpt2_lenses):
    model, lenses = gpt2_lenses
    with pytest.raises(ValueError, match=r"targets='w1 w2' is 2 tokens, not one.*\[1, 2\].*targets=1"):
        trajectory(model, lenses, TEXT, targets="w1 w2")
    with pytest.raises(ValueError, match=r"2 target\(s\) for 1 prompt"):
        trajectory(model, lenses, TEXT, targets=[1, 2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trajectory(model, lenses, [TEXT, OTHER], targets=int(model.cfg.d_vocab))
    with pytest.raises(TypeError, match="token string or a token id"):
        trajectory(model, lenses, TEXT, targets=1.5)
    with pytest.raises(ValueError, match="follows no token"):
        traj.rank_trajectory()
    with pytest.raises(ValueError, match="no prompt"):
        trajectory(model, lenses, [])
    with pytest.raises(ValueError, match="empty"):
        trajectory(model, lenses, [TEXT, " "])


def test_lens_names_build_the_same_lenses(tiny_gpt2, gpt2_lenses, traj):
    from lensmat.lenses.registry import fit_named_lenses

    model, _, corpus = tiny_gpt2
    named = trajectory(model, "logit,mat", TEXT, k=3, dataset=str(corpus), progress=False)
    built, cost, _, _ = fit_named_lenses(model, ["logit", "mat"], str(corpus), progress=False)
    direct = trajectory(model, built, TEXT, k=3)
    mixed = trajectory(model, ["logit", gpt2_lenses[1]["mat"]], TEXT, k=3, dataset=str(corpus), progress=False)
    assert named.lenses == direct.lenses == mixed.lenses == ["logit", "mat"] and cost["mat"]["tokens"] > 0
    for name in named.lenses:
        assert named.top1_tokens(name) == direct.top1_tokens(name) == traj.top1_tokens(name)
        assert mixed.top1_tokens(name) == traj.top1_tokens(name)
    np.testing.assert_allclose(named.kl, direct.kl, atol=1e-9)
    with pytest.raises(ValueError, match="valid lenses"):
        trajectory(model, "logit,nope", TEXT, dataset=str(corpus), progress=False)

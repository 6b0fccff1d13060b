"""Results as tables and pictures (issue 35, items 4 and 5): reports as :class:`lensmat.Report`, their
frames, figures and notebook views, :func:`lensmat.load_report`, the result objects of
``evaluate_lenses`` and ``Trajectory``, and :func:`lensmat.score_intervention`."""

import json
import math

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

import lensmat
from conftest import make_tiny_model, random_token_batches, strict_json
from lensmat.analyses.submodules import submodule_pairs
from lensmat.analyses.swap import submodule_pair
from lensmat.lenses.base import LogitLens, MatLens
from lensmat.lenses.metrics import LensEvaluation, evaluate_lenses
from lensmat.reports.results import COLUMNS, COMMANDS, Report
from lensmat.stats.pipeline import Tokenized, fit_maps
from test_swap import fitted

TINY = dict(max_length=32, progress=False)


def report_calls(model, corpus) -> dict:
    """Every reporting command on a tiny model and its corpus, small budgets: ``{command: run(out)}``."""
    return {
        "compare": lambda out: lensmat.compare(model, str(corpus), lenses="logit,mat", sites="post,mid",
                                               max_fit_tokens=800, max_eval_tokens=300, out=out, **TINY),
        "submodules": lambda out: lensmat.submodules(model, str(corpus), max_fit_tokens=800, max_eval_tokens=60,
                                                     out=out, **TINY),
        "linearity": lambda out: lensmat.linearity(model, str(corpus), max_fit_tokens=800, max_eval_tokens=60,
                                                   out=out, **TINY),
        "saturation": lambda out: lensmat.saturation(model, str(corpus), k=3, max_fit_tokens=600, max_eval_tokens=300,
                                                     n_permutations=50, max_pairs=10, out=out, **TINY),
        "early-exit": lambda out: lensmat.early_exit(model, str(corpus), lenses="logit,mat", max_fit_tokens=600,
                                                     max_eval_tokens=200, max_probe_tokens=300, out=out, **TINY),
        "trajectory": lambda out: lensmat.reports.trajectory_report(model, "w1 w4 w7 w10", str(corpus),
                                                                    max_fit_tokens=800, out=out, **TINY)[1],
    }


@pytest.fixture(scope="module")
def runs(tiny_gpt2, tmp_path_factory):
    """Every reporting command on the tiny GPT-2, each written to its folder: ``{command: (report, folder)}``."""
    model, _, corpus = tiny_gpt2
    root = tmp_path_factory.mktemp("runs")
    calls = report_calls(model, corpus)
    return {command: (run(root / command), root / command) for command, run in calls.items()}


def value(frame, **where) -> float:
    rows = frame
    for column, wanted in where.items():
        rows = rows[rows[column] == wanted]
    assert len(rows) == 1, where
    return float(rows["value"].iloc[0])


def test_every_command_returns_a_report_whose_frame_holds_its_numbers(runs, tiny_gpt2):
    L = int(tiny_gpt2[0].cfg.n_layers)
    for command, (report, _) in runs.items():
        assert isinstance(report, Report) and isinstance(report, dict) and report.command == command
        frame = report.to_dataframe()
        assert list(frame.columns) == COLUMNS and len(frame) > 0, command
    compare = runs["compare"][0]
    frame = compare.to_dataframe()
    assert value(frame, lens="mat", site="post", layer=1, metric="kl") == compare["lenses"]["mat"]["kl"][1]
    assert value(frame, lens="logit", site="mid", layer=0, metric="precision@1") == \
        compare["mid"]["lenses"]["logit"]["precision@1"][0]
    assert len(frame[(frame.site == "post") & (frame.lens == "logit") & (frame.metric == "ce")]) == L + 1
    sub = runs["submodules"][0]
    assert value(sub.to_dataframe(), lens="attn", site="block", layer=L - 1, metric="surprisal") == \
        sub["single_block"]["attn"]["surprisal"][L - 1]
    lin = runs["linearity"][0]
    frame = lin.to_dataframe()
    assert value(frame, lens="model", site="block", layer=0, metric="heldout_linearity") == lin["heldout_linearity"][0]
    row = lin["pruning"]["linear"][1]
    assert value(frame, lens="linear", site="pruned", layer=row["k"], metric="ce") == row["ce"]
    sat = runs["saturation"][0]
    frame = sat.to_dataframe()
    assert value(frame, lens=sat["lens"], site="rank", layer=1, metric="mean_layer") == sat["mean_layer"][0]
    exit_ = runs["early-exit"][0]
    row = exit_["fixed_exit"]["mat"][0]
    assert value(exit_.to_dataframe(), lens="mat", site="post", layer=row["layer"], metric="precision@1") == \
        row["precision@1"]
    traj = runs["trajectory"][0]
    assert value(traj.to_dataframe(), lens="logit", site="post", layer=L, metric="mean_kl") == \
        pytest.approx(traj["summary"]["logit"]["mean_kl"][L])


def test_null_is_nan_in_the_frame_and_nan_never_stays_in_a_report():
    report = Report({"model": "m", "lenses": {"a": {"kl": [float("nan"), 0.5, None]}}, "r2": {}})
    assert report.command == "compare" and report["lenses"]["a"]["kl"] == [None, 0.5, None]
    assert report["non_finite_values"] == ["lenses.a.kl[0]"]
    frame = report.to_dataframe()
    assert len(frame) == 3 and math.isnan(value(frame, layer=2))


def test_plots_are_figures_and_nothing_is_written_without_out(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command, (report, _) in runs.items():
        figs = report.plot()
        assert figs and all(isinstance(f, Figure) for f in figs), command
        for f in figs:
            plt.close(f)
    assert list(tmp_path.iterdir()) == []


def test_notebook_views_are_html_tables(runs):
    for command, (report, _) in runs.items():
        assert "<table" in report._repr_html_(), command


def test_load_report_round_trips_and_infers_the_command_of_older_reports(runs, tmp_path):
    for command, (report, folder) in runs.items():
        saved = strict_json(folder / "report.json")
        assert saved["command"] == command
        loaded = lensmat.load_report(folder)
        assert isinstance(loaded, Report) and loaded.command == command
        assert loaded == json.loads(json.dumps(report)), command
        older = tmp_path / command
        older.mkdir()
        (older / "report.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "command"}))
        assert lensmat.load_report(older / "report.json").command == command
    copy = lensmat.load_report(runs["compare"][1]).save(tmp_path / "again")
    assert lensmat.load_report(copy) == lensmat.load_report(runs["compare"][1])
    assert (copy / "precision.png").is_file()
    with pytest.raises(Exception, match="exists"):
        runs["compare"][0].save(tmp_path / "again")


def test_load_report_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--out"):
        lensmat.load_report(tmp_path / "nowhere")
    (tmp_path / "report.json").write_text('{"lenses": ')
    with pytest.raises(ValueError, match="not a JSON report.*run the command again"):
        lensmat.load_report(tmp_path)
    (tmp_path / "report.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="pass command= one of " + ", ".join(COMMANDS)):
        lensmat.load_report(tmp_path)
    assert lensmat.load_report(tmp_path, command="compare").command == "compare"


def test_evaluate_lenses_unpacks_and_has_views(tiny_gpt2):
    model, _, corpus = tiny_gpt2
    lenses = {"logit": LogitLens(model), "mat": MatLens(model, fit_maps(model, str(corpus), max_fit_tokens=600,
                                                                        progress=False))}
    corpus_tokens = lensmat.tokenized(model, str(corpus), "heldout", 32)
    result = evaluate_lenses(model, lenses, corpus_tokens.batches(8, 200), progress=False)
    scores, stats, n = result
    assert isinstance(result, LensEvaluation) and stats is None and n == result.n_tokens > 0
    frame = result.to_dataframe()
    assert list(frame.columns) == ["lens", "layer", "metric", "value", "ci_low", "ci_high"]
    assert value(frame, lens="mat", layer=2, metric="kl") == scores["mat"]["kl"][2]
    row = frame[(frame.lens == "mat") & (frame.layer == 1) & (frame.metric == "kl")].iloc[0]
    assert row.ci_low == scores["mat"]["ci_low"]["kl"][1] < row.value < row.ci_high == scores["mat"]["ci_high"]["kl"][1]
    figs = result.plot()
    assert len(figs) == 2 and all(isinstance(f, Figure) for f in figs)
    plt.close("all")
    assert "<table" in result._repr_html_()


def test_trajectory_frame_html_and_a_cut_plot(tiny_gpt2):
    model = tiny_gpt2[0]
    traj = lensmat.trajectory(model, {"logit": LogitLens(model)}, "w1 w4 w7 w10 w13 w16", k=2)
    assert traj.frame().equals(traj.to_dataframe())
    assert "<table" in traj._repr_html_()
    fig = traj.plot("kl", positions=slice(1, 4), layer_stride=2)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "2", "3"]
    assert len(ax.get_xticklabels()) == 3
    plt.close(fig)
    fig = traj.plot("entropy", positions=[0, 5])
    assert len(fig.axes[0].get_xticklabels()) == 2 and len(fig.axes[0].get_yticklabels()) == traj.n_layers + 1
    plt.close(fig)
    with pytest.raises(ValueError, match="layer_stride"):
        traj.plot(layer_stride=0)


@pytest.fixture(scope="module")
def identity_block_model():
    """Block 1's attention and MLP outputs zeroed: the block is exactly the identity (see test_swap)."""
    model = make_tiny_model(n_layers=3, d_model=16, seed=3)
    with torch.no_grad():
        for name, p in model.blocks[1].named_parameters():
            if ".o." in name or "fc_out" in name:
                p.zero_()
    return model


def random_corpus(d_vocab: int = 40) -> Tokenized:
    seqs = [b.tokens[i][b.attention_mask[i]].tolist() for b in random_token_batches(4, 8, 16, d_vocab, seed=12)
            for i in range(b.tokens.shape[0])]
    return Tokenized(seqs, "random", "heldout", 16)


def test_score_intervention_no_hooks_an_exact_swap_and_a_zeroed_residual(identity_block_model):
    model, corpus = identity_block_model, random_corpus()
    clean = lensmat.score_intervention(model, corpus, batch_size=8)
    assert clean.scores["kl"] == pytest.approx(0, abs=1e-6) and clean.scores["precision@1"] == 1.0
    assert clean.n_tokens == corpus.n_tokens() and clean.hooks == []
    maps = fitted(model, corpus.batches(8), submodule_pairs(model, ["block"], blocks=[1]), intercept=True)
    exact = lensmat.score_intervention(model, corpus, swap=(maps, ["block"], [1]), batch_size=8)
    assert exact.scores["kl"] < 1e-6 and exact.scores["precision@1"] == 1.0
    assert exact.hooks == list(submodule_pair(model, "block", 1))
    assert lensmat.score_intervention(model, corpus, swap={"maps": maps, "kinds": ["block"], "blocks": [1]},
                                      batch_size=8).scores == exact.scores
    zero = lensmat.score_intervention(model, corpus, hooks=[("blocks.0.hook_resid_post", lambda act, hook: act * 0)],
                                      batch_size=8, max_eval_tokens=40)
    assert zero.scores["kl"] > 1e-3 and zero.scores["clean_top1_surprisal"] > 0 and zero.n_tokens <= 60
    frame = zero.to_dataframe()
    assert value(frame, metric="kl") == zero.scores["kl"]
    assert "<table" in zero._repr_html_()
    with pytest.raises(ValueError, match="no hook 'blocks.9.hook_resid_post'"):
        lensmat.score_intervention(model, corpus, hooks=[("blocks.9.hook_resid_post", lambda act, hook: act)])

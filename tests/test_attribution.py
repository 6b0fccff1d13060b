"""Which sub-block moved a prediction (issue 32, part 3): the lens attribution of every attention and MLP
checked against readouts recomputed here from ``run_with_cache`` (final norm and unembedding by hand,
the mat lens from its map), the telescoping sum, the ablation effects against ``run_with_hooks`` with
hooks written here, a swap with an exact map, the refusals, and the ``lensmat attribute`` command."""

import math

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

import lensmat
from conftest import make_tiny_model, strict_json
from lensmat.analyses.attribution import EFFECTS, Attribution, attribute
from lensmat.lenses.base import LogitLens, MatLens
from lensmat.stats.collect import resid_hook
from lensmat.reports.results import COLUMNS, Report, infer_command

IDS = [0, 3, 5, 7, 9, 11]  # the text, as token ids (BOS 0 first)
N_LINES, N_TRAIN = 60, 42  # the corpus's rows; tokenized() keeps the first 70% for train
ATOL = 2e-5
# LayerNorm outputs span d - 1 directions: the sub-module maps of a random model fall back to a tiny ridge
pytestmark = pytest.mark.filterwarnings("ignore::lensmat.stats.fit.IllConditionedWarning")


@pytest.fixture(scope="module")
def tiny():
    """A random 3-block boot_native model and a corpus of random token rows (BOS 0, 12 tokens each)."""
    model = make_tiny_model(n_layers=3, d_model=16)
    g = torch.Generator().manual_seed(0)
    corpus = torch.cat([torch.zeros(N_LINES, 1, dtype=torch.long), torch.randint(1, 40, (N_LINES, 11), generator=g)], 1)
    return model, corpus


@pytest.fixture(scope="module")
def result(tiny) -> Attribution:
    model, corpus = tiny
    return attribute(model, "logit,mat", IDS, dataset=corpus, top=2, all_effects=True, progress=False)


@torch.no_grad()
def by_hand(model, h: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of one residual vector: the final LayerNorm and unembedding written out."""
    ln = dict(model.ln_final.named_parameters())
    x = torch.nn.functional.layer_norm(h.double(), (h.shape[-1],), ln["_original_component.weight"].double(),
                                       ln["_original_component.bias"].double(), model.cfg.eps)
    return torch.log_softmax(x @ model.W_U.double() + model.b_U.double(), -1)


def final_logprob(model, position: int, token: int, hooks=()) -> float:
    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([IDS]), fwd_hooks=list(hooks))[0, position].double()
    return float(torch.log_softmax(logits, -1)[token])


def test_contributions_equal_an_independent_readout(tiny, result):
    model, _ = tiny
    L, p, t = 3, len(IDS) - 1, result.token_id
    with torch.no_grad():
        logits, cache = model.run_with_cache(torch.tensor([IDS]))
    assert t == int(logits[0, p].argmax()) and result.position == p and result.tokens == [str(i) for i in IDS]
    torch.testing.assert_close(by_hand(model, cache["blocks.2.hook_resid_post"][0, p]),
                               torch.log_softmax(logits[0, p].double(), -1), atol=1e-5, rtol=0)  # the readout is right
    last = resid_hook(L)
    maps = result.maps

    def mat(hook, h):
        return h if hook == last else h.double() @ maps.get(hook, last).W.double()

    for block in range(L):
        points = {"pre": f"blocks.{block}.hook_resid_pre", "mid": f"blocks.{block}.hook_resid_mid",
                  "post": f"blocks.{block}.hook_resid_post"}
        for site, hook in points.items():
            h = cache[hook][0, p]
            map_hook = {"pre": resid_hook(block), "mid": hook, "post": resid_hook(block + 1)}[site]
            assert result.logprob["logit"][site][block] == pytest.approx(float(by_hand(model, h)[t]), abs=ATOL)
            assert result.logprob["mat"][site][block] == pytest.approx(float(by_hand(model, mat(map_hook, h))[t]),
                                                                       abs=ATOL)
        for lens in ("logit", "mat"):
            lp = result.logprob[lens]
            assert result.attn[lens][block] == pytest.approx(lp["mid"][block] - lp["pre"][block], abs=1e-12)
            assert result.mlp[lens][block] == pytest.approx(lp["post"][block] - lp["mid"][block], abs=1e-12)
    assert result.attn["mat"] != pytest.approx(result.attn["logit"], abs=1e-3)  # two lenses, two readings


def test_contributions_telescope_to_the_last_reading_less_the_first(result):
    for lens in ("logit", "mat"):
        lp = result.logprob[lens]
        summed = sum(result.attn[lens]) + sum(result.mlp[lens])
        assert summed == pytest.approx(result.total[lens], abs=ATOL)
        assert result.total[lens] == pytest.approx(lp["post"][-1] - lp["pre"][0], abs=1e-12)
        assert lp["post"][-1] == pytest.approx(result.clean_logprob, abs=ATOL)  # both lenses read h_L as the model
        for block in range(2):  # post_l and pre_{l+1} are the same vector at the same layer
            assert lp["post"][block] == pytest.approx(lp["pre"][block + 1], abs=1e-9)
    assert result.total["logit"] != pytest.approx(result.total["mat"], abs=1e-3)


def test_ablation_effects_equal_run_with_hooks(tiny, result):
    model, corpus = tiny
    p, t = result.position, result.token_id
    clean = final_logprob(model, p, t)
    assert result.clean_logprob == pytest.approx(clean, abs=1e-9)
    with torch.no_grad():  # the mean output over every train position (BOS excluded), computed here
        _, cache = model.run_with_cache(corpus[:N_TRAIN])
    for kind, hook_name in (("attn", "hook_attn_out"), ("mlp", "hook_mlp_out")):
        for block in range(3):
            hook = f"blocks.{block}.{hook_name}"
            mean = cache[hook][:, 1:].reshape(-1, 16).double().mean(0)
            zero = final_logprob(model, p, t, [(hook, lambda act, hook: act * 0)])
            meaned = final_logprob(model, p, t, [(hook, lambda act, hook, m=mean: m.to(act.dtype).expand_as(act))])
            assert result.effects[kind]["zero"][block] == pytest.approx(zero - clean, abs=ATOL), (kind, block)
            assert result.effects[kind]["mean"][block] == pytest.approx(meaned - clean, abs=ATOL), (kind, block)
            assert abs(zero - meaned) > 1e-4  # the two ablations differ: the mean is not zero
    # removing the last MLP leaves the model's output as the logit lens reads resid_mid: the one exact match
    assert result.effects["mlp"]["zero"][2] == pytest.approx(-result.mlp["logit"][2], abs=ATOL)


def test_interventions_at_the_position_only(tiny, result):
    """``ablate_at="position"``: the sub-module is zeroed, mean-ablated or swapped at the attributed position
    alone, checked against hooks written here; the other positions run clean."""
    model, corpus = tiny
    att = attribute(model, "logit", IDS, dataset=corpus, position=3, top=0, all_effects=True, ablate_at="position",
                    progress=False)
    p, t = 3, att.token_id
    clean = final_logprob(model, p, t)
    with torch.no_grad():
        _, cache = model.run_with_cache(corpus[:N_TRAIN])

    def at_p(value):
        def hook(act, hook):
            act = act.clone()
            act[:, p] = value(act)[:, p] if callable(value) else value.to(act.dtype)
            return act
        return hook

    for kind, src, out in (("attn", "ln1.hook_out", "hook_attn_out"), ("mlp", "ln2.hook_out", "hook_mlp_out")):
        for block in range(3):
            hook = f"blocks.{block}.{out}"
            mean = cache[hook][:, 1:].reshape(-1, 16).double().mean(0)
            assert att.effects[kind]["zero"][block] == pytest.approx(
                final_logprob(model, p, t, [(hook, at_p(torch.zeros(16)))]) - clean, abs=ATOL)
            assert att.effects[kind]["mean"][block] == pytest.approx(
                final_logprob(model, p, t, [(hook, at_p(mean))]) - clean, abs=ATOL)
            W, slot = att.sub_maps.get(f"blocks.{block}.{src}", hook).W, {}
            swap = [(f"blocks.{block}.{src}", lambda act, hook, slot=slot: slot.update(x=act)),
                    (hook, at_p(lambda act, slot=slot, W=W: slot["x"] @ W.to(act.dtype)))]
            assert att.effects[kind]["swap"][block] == pytest.approx(final_logprob(model, p, t, swap) - clean, abs=ATOL)
    # later positions no longer see the change, so the effects differ from ablating everywhere
    everywhere = attribute(model, "logit", IDS, dataset=corpus, position=3, top=0, all_effects=True, progress=False)
    assert att.effects["attn"]["zero"] != pytest.approx(everywhere.effects["attn"]["zero"], abs=1e-3)
    # the last MLP at the position is all that reaches the output there: both match the logit lens
    assert att.effects["mlp"]["zero"][2] == pytest.approx(-att.mlp["logit"][2], abs=ATOL)
    assert everywhere.effects["mlp"]["zero"][2] == pytest.approx(-att.mlp["logit"][2], abs=ATOL)
    assert att.to_dict()["ablate_at"] == "position"
    with pytest.raises(ValueError, match="ablate_at='last'"):
        attribute(model, "logit", IDS, dataset=corpus, ablate_at="last")


def test_swap_effects_equal_hand_written_hooks(tiny, result):
    model, _ = tiny
    p, t = result.position, result.token_id
    clean = final_logprob(model, p, t)
    for kind, src, tgt in (("attn", "ln1.hook_out", "hook_attn_out"), ("mlp", "ln2.hook_out", "hook_mlp_out")):
        for block in range(3):
            linear = result.sub_maps.get(f"blocks.{block}.{src}", f"blocks.{block}.{tgt}")
            slot = {}
            hooks = [(f"blocks.{block}.{src}", lambda act, hook, slot=slot: slot.update(x=act)),
                     (f"blocks.{block}.{tgt}", lambda act, hook, slot=slot, W=linear.W: slot["x"] @ W.to(act.dtype))]
            assert result.effects[kind]["swap"][block] == pytest.approx(
                final_logprob(model, p, t, hooks) - clean, abs=ATOL), (kind, block)


def test_a_swap_with_a_map_that_reproduces_the_submodule_has_no_effect(tiny):
    """At position 0 attention reads one key, so it is affine in its input: its map fitted on one-token
    inputs reproduces it there exactly, and swapping it in changes nothing; at the last position it does."""
    from lensmat import data
    from lensmat.analyses.submodules import groups_for, submodule_pairs
    from lensmat.stats.collect import collect
    from lensmat.stats.fit import MapSet, fit_pairs

    model, corpus = tiny
    pairs = submodule_pairs(model, ["attn"])
    batches = list(data.numbered([data.pad([[i] for i in range(40)], has_bos=False)]))
    exact = MapSet(fit_pairs(collect(model, batches, groups_for(pairs), progress=False), pairs, intercept=True),
                   lensmat.describe(model).to_dict(), True)
    kwargs = dict(dataset=corpus, sub_maps=exact, all_effects=True, progress=False)
    first = attribute(model, "logit", IDS, position=0, **kwargs)
    assert first.effects["attn"]["swap"] == pytest.approx([0.0, 0.0, 0.0], abs=1e-5)
    assert first.info["fit_cost"]["submodules"]["pairs"] == 3  # only the MLP maps were fitted
    assert first.effects["mlp"]["swap"] != pytest.approx([0.0, 0.0, 0.0], abs=1e-3)
    last = attribute(model, "logit", IDS, **kwargs)
    assert max(abs(v) for v in last.effects["attn"]["swap"]) > 1e-3


def test_largest_are_the_largest_and_carry_their_effects(result):
    assert [r["lens"] for r in result.largest] == ["logit", "logit", "mat", "mat"]
    for lens in ("logit", "mat"):
        cells = sorted((abs(v) for k in ("attn", "mlp") for v in getattr(result, k)[lens]), reverse=True)
        rows = [r for r in result.largest if r["lens"] == lens]
        assert [abs(r["attribution"]) for r in rows] == pytest.approx(cells[:2])
        for r in rows:
            assert r["attribution"] == getattr(result, r["kind"])[lens][r["block"]]
            for e in EFFECTS:
                assert r[f"{e}_effect"] == result.effects[r["kind"]][e][r["block"]]


def test_only_the_largest_are_measured_by_default(tiny):
    model, corpus = tiny
    att = attribute(model, [LogitLens(model)], IDS, dataset=corpus, top=1, progress=False)
    measured = [(k, b) for k in ("attn", "mlp") for b in range(3) if att.effects[k]["zero"][b] is not None]
    assert measured == [(att.largest[0]["kind"], att.largest[0]["block"])]
    assert att.info["fit_cost"]["logit"]["seconds"] == 0 and att.maps is None
    none = attribute(model, {"logit": LogitLens(model)}, IDS, top=0)  # nothing causal: no train split needed
    assert none.largest == [] and none.info["dataset"] is None


def test_saved_maps_are_reused_with_the_same_numbers(tiny, result, tmp_path):
    model, corpus = tiny
    lensmat.save_maps(result.maps, tmp_path / "maps")
    again = attribute(model, "mat", IDS, dataset=corpus, maps=tmp_path / "maps", top=0, progress=False)
    assert again.info["fit_cost"]["mat"]["reused"] is True
    assert again.mlp["mat"] == pytest.approx(result.mlp["mat"], abs=1e-5)
    mid_lens = MatLens(model, result.maps, site="mid")  # a (post, mid) pair given as lenses
    pair = attribute(model, {"m": (MatLens(model, result.maps), mid_lens)}, IDS, top=0)
    assert pair.attn["m"] == pytest.approx(result.attn["mat"], abs=1e-9)


def test_a_point_the_lens_does_not_cover_is_null(tiny, result, tmp_path):
    model, corpus = tiny

    class Late(LogitLens):  # defined at residual layers 2..L only, as a J-lens is undefined at some layers
        name = "late"

        def covers(self, layer):
            return super().covers(layer) and layer >= 2

    att = attribute(model, {"late": (Late(model), LogitLens(model, site="mid"))}, IDS, top=4, dataset=corpus,
                    progress=False)
    lp = att.logprob["late"]
    assert lp["pre"][:2] == [None, None] and lp["post"][0] is None and None not in lp["mid"]
    assert att.attn["late"][:2] == [None, None] and att.mlp["late"][0] is None and att.total["late"] is None
    assert att.mlp["late"][1:] == pytest.approx(result.mlp["logit"][1:], abs=1e-9)  # covered cells: the logit lens
    assert all(r["attribution"] is not None for r in att.largest) and len(att.largest) == 3
    Report(att.to_dict()).save(tmp_path / "late")
    assert strict_json(tmp_path / "late" / "report.json")["attn"]["late"][0] is None


def test_bad_input_is_refused_before_any_fitting(tiny, tiny_gpt2, tiny_gpt_neox):
    model, corpus = tiny
    kw = dict(dataset=corpus, progress=False)
    with pytest.raises(IndexError, match=r"position 6 is out of range: the text is 6 tokens .*0..5, or -6..-1"):
        attribute(model, "logit", IDS, position=6, **kw)
    with pytest.raises(IndexError, match="out of range"):
        attribute(model, "logit", IDS, position=-7, **kw)
    with pytest.raises(TypeError, match="position must be an integer"):
        attribute(model, "logit", IDS, position=1.0, **kw)
    with pytest.raises(ValueError, match="outside the vocabulary 0..39"):
        attribute(model, "logit", IDS, token=40, **kw)
    with pytest.raises(ValueError, match="cannot read resid_mid by name"):
        attribute(model, "logit,tuned", IDS, **kw)
    with pytest.raises(ValueError, match="top must be a non-negative integer"):
        attribute(model, "logit", IDS, top=-1, **kw)
    with pytest.raises(ValueError, match="text must be a string or token ids"):
        attribute(model, "logit", [[0, 1]], **kw)
    post_only = lensmat.fit_maps(model, corpus, progress=False)
    with pytest.raises(ValueError, match="resid_mid maps missing"):
        attribute(model, "logit,mat", IDS, maps=post_only, **kw)
    with pytest.raises(ValueError, match="'mat' lens's maps hold no blocks.0.hook_resid_mid.*3 resid_mid maps missing"):
        attribute(model, [MatLens(model, post_only)], IDS, **kw)

    class Doubled(lensmat.Lens):
        name = "doubled"

        def transform_hidden(self, h, layer):
            return 2 * h

    with pytest.raises(ValueError, match="'doubled' lens .Doubled. has no reading of resid_mid"):
        attribute(model, [Doubled(model)], IDS, **kw)
    gpt2, _, words = tiny_gpt2
    with pytest.raises(ValueError, match="is 2 tokens, not one"):
        attribute(gpt2, "logit", "w1 w4 w7", token="w1 w2", dataset=str(words), progress=False)
    with pytest.raises(ValueError, match="empty"):
        attribute(gpt2, "logit", "", dataset=str(words), progress=False)
    neox = tiny_gpt_neox[0]
    with pytest.raises(ValueError, match="'parallel' block layout.*no blocks.{l}.hook_resid_mid"):
        attribute(neox, "logit", "w1 w4 w7", progress=False)


def test_result_views_and_the_report(result, tmp_path, monkeypatch):
    frame = result.to_dataframe()
    assert list(frame.columns) == ["lens", "block", "kind", "attribution", "logprob_before", "logprob_after",
                                   "swap_effect", "zero_effect", "mean_effect"]
    assert len(frame) == 2 * 3 * 2
    row = frame[(frame.lens == "mat") & (frame.block == 1) & (frame.kind == "mlp")].iloc[0]
    assert row.attribution == result.mlp["mat"][1] and row.zero_effect == result.effects["mlp"]["zero"][1]
    monkeypatch.chdir(tmp_path)
    fig = result.plot()
    assert isinstance(fig, Figure) and len(fig.axes) == 2 and len(fig.axes[0].patches) == 2 * 3
    plt.close(fig)
    assert list(tmp_path.iterdir()) == []
    assert "<table" in result._repr_html_() and "largest" in result._repr_html_()
    report = Report(result.to_dict())
    assert report.command == "attribution" and infer_command(result.to_dict()) == "attribution"
    tidy = report.to_dataframe()
    assert list(tidy.columns) == COLUMNS
    pick = tidy[(tidy.lens == "logit") & (tidy.layer == 2) & (tidy.metric == "mlp")]
    assert float(pick.value.iloc[0]) == result.mlp["logit"][2]
    pick = tidy[(tidy.lens == "model") & (tidy.layer == 0) & (tidy.metric == "attn_mean_effect")]
    assert float(pick.value.iloc[0]) == result.effects["attn"]["mean"][0]
    for f in report.plot():
        plt.close(f)


def test_cli_attribute_writes_the_documented_report(tiny_gpt2, tmp_path, capsys):
    from lensmat import cli

    _, folder, corpus = tiny_gpt2
    out = tmp_path / "attr"
    args = ["attribute", "--model", str(folder), "--dataset", str(corpus), "--text", "w1 w4 w7 w10",
            "--max-fit-tokens", "600", "--top", "2", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "largest |attribution|" in printed and "attribution.png" in printed
    assert (out / "attribution.png").stat().st_size > 10_000
    report = strict_json(out / "report.json")
    L = report["n_layers"]
    assert report["command"] == "attribution" and report["text"] == "w1 w4 w7 w10" and report["position"] == 4
    assert report["tokens"] == ["<|endoftext|>", "w1", "w4", "w7", "w10"] and report["lenses"] == ["logit", "mat"]
    assert set(report["token"]) == {"id", "text"} and isinstance(report["token"]["id"], int)
    for lens in ("logit", "mat"):
        assert {k: len(v) for k, v in report["logprob"][lens].items()} == {"pre": L, "mid": L, "post": L}
        assert len(report["attn"][lens]) == len(report["mlp"][lens]) == L
        assert sum(report["attn"][lens]) + sum(report["mlp"][lens]) == pytest.approx(report["total"][lens], abs=ATOL)
    assert len(report["largest"]) == 4
    assert set(report["largest"][0]) == {"kind", "block", "lens", "attribution", "swap_effect", "zero_effect",
                                         "mean_effect"}
    assert all(r["zero_effect"] is not None for r in report["largest"])
    assert math.isfinite(report["clean_logprob"]) and report["clean_logprob"] <= 0
    assert report["fit_cost"]["mat"]["tokens"] > 0 and report["fit_cost"]["submodules"]["tokens"] > 0
    assert {"effects", "layout", "memory_plan", "model_info", "dataset"} <= set(report)
    assert lensmat.load_report(out).command == "attribution"
    assert cli.main([*args, "--force", "--token", "w13"]) == 0
    report = strict_json(out / "report.json")
    assert report["token"] == {"id": 13, "text": "w13"}
    assert cli.main([*args, "--force", "--token", "w1 w2"]) == 2 and "not one" in capsys.readouterr().err
    assert cli.main([*args, "--force", "--position", "9"]) == 2 and "out of range" in capsys.readouterr().err

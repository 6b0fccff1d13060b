"""Lens views of interventions (issue 32, part 2): every lens read in a clean and an intervened forward,
checked against independent computations on a tiny random GPT-2 (a Hugging Face model loaded through
the bridge, with a word tokenizer: :func:`conftest.save_tiny_causal_lm`). The independent side is the
plain Hugging Face model with a PyTorch forward hook, or TransformerLens's ``run_with_cache`` under
``model.hooks`` with the lens applied by hand."""

import json
import warnings

import numpy as np
import pytest
import torch

import lensmat
from conftest import strict_json
from lensmat.analyses.generation import greedy_reference
from lensmat.analyses.intervene import NoEffectWarning
from lensmat.analyses.intervene_view import Ablate, Steer, intervene, steering_vector
from lensmat.analyses.trajectory import trajectory
from lensmat.lenses.base import LogitLens, MatLens, encode_text
from lensmat.stats.pipeline import fit_maps

TEXT = "w1 w4 w7 w10 w13"
IDS = [48, 1, 4, 7, 10, 13]


@pytest.fixture(scope="module")
def setup(tiny_gpt2):
    model, folder, corpus = tiny_gpt2
    lenses = {"logit": LogitLens(model), "mat": MatLens(model, fit_maps(model, str(corpus), progress=False))}
    return model, lenses, folder, corpus


def zero(act, hook=None):
    return torch.zeros_like(act)


def quiet(**kwargs):
    """``intervene`` with warnings turned into errors except the ones a test expects."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoEffectWarning)
        return intervene(**kwargs)


def test_a_hook_that_changes_nothing_warns_and_every_delta_is_exactly_zero(setup):
    model, lenses, _, _ = setup

    def copies(act, hook):  # the silent failure: modifies a copy and returns nothing
        act = act * 0

    with pytest.warns(NoEffectWarning, match=r"blocks\.1\.hook_attn_out.*changed nothing"):
        view = intervene(model, lenses, TEXT, hooks=[("blocks.1.hook_attn_out", copies)], k=3)
    assert not view.changed and view.max_abs_change == 0.0 and view.changed_from_layer is None
    for metric in ("precision@1", "kl", "rank"):
        values = view.values(metric)
        assert np.array_equal(values["clean"], values["intervened"], equal_nan=True), metric
        assert np.all(np.nan_to_num(values["delta"]) == 0.0), metric
    assert np.array_equal(view.clean.top_ids, view.intervened.top_ids)
    assert view.summary()["changed"] is False


def test_a_hook_that_never_runs_is_named(setup):
    """GPT-2's fused projection ``attn.qkv.hook_out`` is a hook point of the bridge (in
    ``model.hook_dict``, accepted by ``run_with_hooks``) that never runs: the bridge computes q, k and v
    apart. Zeroing it does nothing, silently in TransformerLens; lensmat names it as never run."""
    model, lenses, _, _ = setup
    with pytest.warns(NoEffectWarning, match=r"blocks\.1\.attn\.qkv\.hook_out never ran"):
        view = intervene(model, lenses, TEXT, hooks=[("blocks.1.attn.qkv.hook_out", zero)])
    assert view.hooks_not_run == ["blocks.1.attn.qkv.hook_out"] and not view.changed
    with pytest.warns(NoEffectWarning, match="never ran"):  # trajectory(hooks=) says it too
        trajectory(model, lenses, TEXT, hooks=[("blocks.1.attn.qkv.hook_out", zero)])
    with pytest.warns(NoEffectWarning, match=r"qkv\.hook_out never ran") as record:  # one that ran, one that did not
        view = intervene(model, lenses, TEXT, hooks=[("blocks.1.attn.qkv.hook_out", zero),
                                                       ("blocks.1.hook_attn_out", zero)])
    assert view.changed and len(record) == 1
    with pytest.raises(ValueError, match="no hook 'blocks.9.hook_attn_out'"):
        intervene(model, lenses, TEXT, hooks=[("blocks.9.hook_attn_out", zero)])
    with pytest.raises(ValueError, match="needs an intervention"):
        intervene(model, lenses, TEXT)


@pytest.fixture(scope="module")
def zeroed(setup):
    """Block 1's attention output zeroed: the view, and the Hugging Face model's logit-lens logits
    ``[L+1, pos, vocab]`` with the same attention zeroed by a PyTorch forward hook, and without."""
    from transformers import GPT2LMHeadModel

    model, lenses, folder, _ = setup
    view = quiet(model=model, lenses=lenses, text=TEXT, hooks=[("blocks.1.hook_attn_out", zero)], k=3)
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()

    def lens_logits():
        with torch.no_grad():
            out = hf(torch.tensor([IDS]), output_hidden_states=True)
            hs = out.hidden_states
            return torch.stack([hf.lm_head(hf.transformer.ln_f(h[0])) for h in hs[:-1]] + [out.logits[0]]).double()

    clean = lens_logits()
    handle = hf.transformer.h[1].attn.register_forward_hook(lambda mod, inp, out: (torch.zeros_like(out[0]), *out[1:]))
    try:
        hooked = lens_logits()
    finally:
        handle.remove()
    return view, clean, hooked


def test_zeroed_attention_leaves_earlier_layers_and_matches_the_hf_model(zeroed):
    view, clean, hooked = zeroed
    L = view.n_layers
    i = view.lenses.index("logit")
    assert view.changed and view.changed_from_layer == 2  # h_2 is block 1's output
    for metric in ("precision@1", "kl", "rank"):
        delta = np.nan_to_num(view.delta(metric))
        assert np.all(delta[:, :2] == 0.0), metric  # layers <= block 1: read before the zeroed attention
    assert np.abs(view.delta("kl")[:, 2:]).max() > 1e-3
    p_clean = torch.softmax(clean[L], -1)
    clean_top1 = p_clean.argmax(-1)
    assert view.clean.final_top1.tolist() == clean_top1.tolist()
    assert view.intervened_top1.tolist() == hooked[L].argmax(-1).tolist()
    for layer in range(L + 1):
        q = torch.softmax(hooked[layer], -1)
        kl = (p_clean * (p_clean.log() - q.log())).sum(-1)
        np.testing.assert_allclose(view.intervened.kl[i, layer], kl, atol=1e-4)
        np.testing.assert_array_equal(view.intervened.top_ids[i, layer], q.topk(3).indices)
        np.testing.assert_array_equal(view.values("precision@1")["intervened"][i, layer],
                                      (q.argmax(-1) == clean_top1).double())
        ranks = [(hooked[layer, p] > hooked[layer, p, t]).sum().item() for p, t in enumerate(IDS[1:])]
        np.testing.assert_array_equal(view.values("rank")["intervened"][i, layer, :-1], ranks)
    output_kl = (p_clean * (p_clean.log() - torch.log_softmax(hooked[L], -1))).sum(-1)
    np.testing.assert_allclose(view.output_kl, output_kl, atol=1e-4)


def test_the_ablation_zero_is_the_hook(setup, zeroed):
    model, lenses, _, _ = setup
    ablated = quiet(model=model, lenses=lenses, text=TEXT, ablate=Ablate("attn", 1), k=3)
    assert np.array_equal(ablated.delta("kl"), zeroed[0].delta("kl"), equal_nan=True)
    assert ablated.intervention["ablate"] == [{"kind": "attn", "block": 1, "how": "zero"}]
    mean = torch.randn(int(model.cfg.d_model))
    by_mean = quiet(model=model, lenses=lenses, text=TEXT, ablate=Ablate("attn", 1, "mean", mean=mean), k=3)
    by_hook = quiet(model=model, lenses=lenses, text=TEXT, k=3,
                    hooks=[("blocks.1.hook_attn_out", lambda act, hook: mean.expand_as(act).clone())])
    np.testing.assert_array_equal(by_mean.intervened.kl, by_hook.intervened.kl)
    with pytest.raises(ValueError, match="ablate one of attn, mlp"):
        intervene(model, lenses, TEXT, ablate=Ablate("ln1", 1))


def test_a_mean_ablation_uses_the_mean_over_train_tokens(setup):
    from lensmat.analyses.intervene_view import ablation_mean
    from lensmat.stats.pipeline import tokenized

    model, lenses, _, corpus = setup
    rows = []
    with torch.no_grad():
        for batch in tokenized(model, str(corpus), "train").batches(16, 200):
            _, cache = model.run_with_cache(batch.tokens)
            rows.append(cache["blocks.0.hook_mlp_out"][batch.score_mask])
    by_hand = torch.cat(rows).double().mean(0).float()
    mean = ablation_mean(model, "blocks.0.hook_mlp_out", str(corpus), 200)
    torch.testing.assert_close(mean, by_hand, rtol=0, atol=1e-5)
    ablated = quiet(model=model, lenses=lenses, text=TEXT, ablate=("mlp", 0, "mean"), dataset=str(corpus),
                    ablation_tokens=200)
    given = quiet(model=model, lenses=lenses, text=TEXT, ablate=Ablate("mlp", 0, "mean", mean=by_hand))
    np.testing.assert_allclose(ablated.intervened.kl, given.intervened.kl, atol=1e-5)
    assert ablated.changed_from_layer == 1


def test_trajectory_with_hooks_equals_a_hand_lens_on_the_hooked_cache(setup):
    """``trajectory(hooks=)`` against ``run_with_cache`` under ``model.hooks`` with each lens applied by
    hand (``Lens.forward``: TransformerLens's ``logit_readout``), including a hook on a block's input."""
    model, lenses, _, _ = setup
    L = int(model.cfg.n_layers)
    shift = 0.7 * torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(1))
    hooks = [("blocks.0.hook_attn_out", zero), ("blocks.2.hook_resid_pre", lambda act, hook: act + shift)]
    traj = trajectory(model, lenses, TEXT, k=3, hooks=hooks)
    plain = trajectory(model, lenses, TEXT, k=3)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits, cache = model.run_with_cache(torch.tensor([IDS]))
    stack = [cache[f"blocks.{layer}.hook_resid_pre"][0] for layer in range(L)] + [cache[f"blocks.{L - 1}.hook_resid_post"][0]]
    final = torch.softmax(logits[0].double(), -1)
    assert traj.final_top1.tolist() == final.argmax(-1).tolist()
    for i, name in enumerate(traj.lenses):
        for layer in range(L + 1):
            with torch.no_grad():
                q = torch.softmax(lenses[name](stack[layer], layer).double(), -1)
            np.testing.assert_array_equal(traj.top_ids[i, layer], q.topk(3).indices)
            np.testing.assert_allclose(traj.kl[i, layer], (final * (final.log() - q.log())).sum(-1), atol=1e-4)
    assert not np.allclose(traj.kl[:, 2], plain.kl[:, 2])  # the hook on block 2's input reaches the lens at 2


def test_steering_equals_adding_the_vector_by_hand(setup):
    model, lenses, _, _ = setup
    hook = "blocks.2.hook_resid_pre"
    with torch.no_grad():
        _, a = model.run_with_cache(encode_text(model, "w2 w5 w8"))
        _, b = model.run_with_cache(encode_text(model, "w30 w33"))
    by_hand = a[hook][0, 1:].mean(0) - b[hook][0, 1:].mean(0)  # BOS left out
    vector = steering_vector(model, 2, "w2 w5 w8", "w30 w33")
    torch.testing.assert_close(vector, by_hand, rtol=0, atol=1e-6)
    steered = quiet(model=model, lenses=lenses, text=TEXT, steer=Steer(2, vector, 3.0), k=3, targets="w16")
    added = quiet(model=model, lenses=lenses, text=TEXT, k=3, targets="w16",
                  hooks=[(hook, lambda act, hook: act + 3.0 * vector)])
    assert steered.changed_from_layer == added.changed_from_layer == 2
    for metric in ("precision@1", "kl", "rank"):
        np.testing.assert_allclose(steered.values(metric)["intervened"], added.values(metric)["intervened"],
                                   atol=1e-5, equal_nan=True)
    assert steered.rank_of == "w16" and steered.intervention["steer"][0]["scale"] == 3.0
    with pytest.raises(ValueError, match="d_model = 32"):
        intervene(model, lenses, TEXT, steer=Steer(2, torch.zeros(5)))
    with pytest.raises(IndexError, match="0..3"):
        intervene(model, lenses, TEXT, steer=(4, vector))


@pytest.mark.filterwarnings("ignore::lensmat.stats.fit.IllConditionedWarning")  # ln1's output spans d - 1 directions
def test_swapping_a_block_for_a_map_that_reproduces_it_changes_nothing(tiny_gpt2):
    """Block 1 with its attention and MLP outputs zeroed is the identity; its fitted block map is I, and
    swapping it in changes no activation beyond float rounding: NoEffectWarning, every Δ about 0."""
    from lensmat.analyses.submodules import fit_submodule_maps

    _, folder, corpus = tiny_gpt2
    model = lensmat.load_model(str(folder), device="cpu")  # a copy to edit
    with torch.no_grad():
        edited = [p for name, p in model.blocks[1].named_parameters() if ".attn.o." in name or ".c_proj." in name]
        assert len(edited) == 4  # the attention's and the MLP's output weights and biases
        for p in edited:
            p.zero_()
    maps = fit_submodule_maps(model, str(corpus), kinds=["block", "attn"], blocks=[1], intercept=True, progress=False)
    lenses = {"logit": LogitLens(model)}
    for kind in ("block", "attn"):
        with pytest.warns(NoEffectWarning, match="changed nothing"):
            view = intervene(model, lenses, TEXT, swap=(maps, [kind], [1]), tol=1e-4)
        assert view.relative_change < 1e-4 and not view.changed
        assert np.abs(view.delta("kl")).max() < 1e-5 and np.nan_to_num(view.delta("precision@1")).max() == 0
        assert view.intervention["swap"] == [{"kinds": [kind], "blocks": [1]}]
    fitted = fit_submodule_maps(tiny_gpt2[0], str(corpus), kinds=["attn"], blocks=[1], progress=False)
    view = quiet(model=tiny_gpt2[0], lenses={"logit": LogitLens(tiny_gpt2[0])}, text=TEXT, swap=(fitted, ["attn"], [1]))
    assert view.changed and view.changed_from_layer == 2  # on the unedited model the map is not exact


def test_generation_under_hooks_matches_greedy_reference(setup):
    model, lenses, _, _ = setup
    steer = Steer(1, steering_vector(model, 1, "w20 w23 w26", "w1 w4 w7"), 4.0)
    view = quiet(model=model, lenses=lenses, text=TEXT, steer=steer, generate=5, k=3)
    gen = view.generation
    assert gen.prompt_ids == IDS and gen.clean_ids == greedy_reference(model, TEXT, 5)
    with model.hooks(fwd_hooks=steer.hooks(model)):
        assert gen.intervened_ids == greedy_reference(model, TEXT, 5)
    assert gen.first_difference is not None  # the steering changed the continuation
    P = len(IDS)
    assert gen.intervened.ids.tolist() == IDS + gen.intervened_ids
    assert gen.intervened.final_top1[P - 1:-1].tolist() == gen.intervened_ids  # its own output: the tokens it chose
    assert gen.clean.final_top1[P - 1:-1].tolist() == gen.clean_ids
    summary = view.summary()["generation"]
    assert summary["intervened"]["ids"] == gen.intervened_ids and summary["clean"]["text"] == gen.clean_text
    with pytest.raises(ValueError, match="context"):
        intervene(model, lenses, TEXT, steer=steer, generate=100)


def test_the_view_as_tables_and_figures(setup, zeroed):
    from matplotlib.figure import Figure

    view = zeroed[0]
    frame = view.to_dataframe()
    assert len(frame) == 2 * (view.n_layers + 1) * len(IDS)
    assert {"clean_top1", "intervened_top1", "kl_delta", "precision@1_clean", "rank_intervened"} <= set(frame.columns)
    row = frame[(frame.lens == "mat") & (frame.layer == 3) & (frame.position == 2)].iloc[0]
    assert row["kl_delta"] == pytest.approx(view.delta("kl")[1, 3, 2])
    figs = view.plot()
    assert len(figs) == 2 and all(isinstance(f, Figure) for f in figs)
    assert "<table" in view._repr_html_() and "changed from layer 2" in view._repr_html_()
    summary = view.summary()
    json.dumps(summary, allow_nan=False)
    assert summary["per_layer"]["logit"]["kl"]["delta"][0] == 0.0
    assert len(summary["cells"]["mat"]["rank"]["delta"]) == view.n_layers + 1
    assert summary["cells"]["mat"]["rank"]["delta"][0][-1] is None  # no next token at the last position


FIELDS = {"command", "model", "model_info", "dataset", "text", "tokens", "n_layers", "lenses", "k", "protocol",
          "fit_cost", "memory_plan", "intervention", "changed", "max_abs_change", "relative_change",
          "max_abs_change_per_layer", "changed_from_layer", "max_abs_logit_change", "tolerance", "hooks_not_run",
          "rank_of", "clean_final_top1", "intervened_final_top1", "output", "per_layer", "cells", "generation"}


def test_cli_intervene_writes_the_documented_report(tiny_gpt2, tmp_path, capsys):
    import pandas as pd

    from lensmat import cli
    from lensmat.reports.results import Report

    _, folder, corpus = tiny_gpt2
    out = tmp_path / "iv"
    args = ["intervene", "--model", str(folder), "--dataset", str(corpus), "--text", TEXT, "--lenses", "logit,mat",
            "--swap", "attn@1", "--steer", "1", "--steer-from", "w1 w4", "--steer-to", "w20 w23", "--scale", "2",
            "--target", "w16", "--generate", "3", "--k", "3", "--max-fit-tokens", "600", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "changed from residual layer 1" in printed and "intervene_delta.png" in printed
    report = strict_json(out / "report.json")
    assert set(report) >= FIELDS and report["command"] == "intervene"
    assert report["intervention"]["kinds"] == ["swap", "steer"]
    assert report["intervention"]["swap"] == [{"kinds": ["attn"], "blocks": [1]}]
    assert report["intervention"]["steer"][0]["layer"] == 1 and report["intervention"]["steer"][0]["scale"] == 2.0
    assert report["changed"] is True and report["changed_from_layer"] == 1 and report["rank_of"] == "w16"
    L = report["n_layers"]
    assert len(report["per_layer"]["mat"]["kl"]["delta"]) == L + 1
    assert np.array(report["cells"]["logit"]["precision@1"]["delta"], dtype=float).shape == (L + 1, len(IDS))
    assert report["fit_cost"]["swap"]["tokens"] > 0 and report["generation"]["max_new_tokens"] == 3
    for name in ("intervene_delta.png", "intervene_layers.png", "generation_clean.png", "generation_intervened.png"):
        assert (out / name).stat().st_size > 5_000, name
    assert len(pd.read_csv(out / "intervene.csv")) == 2 * (L + 1) * len(IDS)
    loaded = lensmat.load_report(out)
    assert loaded.command == "intervene"
    frame = loaded.to_dataframe()
    assert set(frame.metric) >= {"delta_kl", "clean_precision@1", "intervened_rank"}
    older = {k: v for k, v in report.items() if k != "command"}
    assert Report(older).command == "intervene"
    vector = tmp_path / "v.npy"
    np.save(vector, np.ones(32, dtype=np.float32))
    assert cli.main([*args[:9], "--steer", "2", "--steer-vector", str(vector), "--ablate", "mlp@0", "--max-fit-tokens",
                     "300", "--out", str(tmp_path / "v"), "--quiet"]) == 0
    report = strict_json(tmp_path / "v" / "report.json")
    assert report["intervention"]["kinds"] == ["steer", "ablate"] and report["changed_from_layer"] == 1
    assert report["intervention"]["steer"][0]["vector_norm"] == pytest.approx(32 ** 0.5)
    assert cli.main([*args[:9], "--steer", "2", "--out", str(tmp_path / "w"), "--quiet"]) == 2
    assert "needs one vector" in capsys.readouterr().err
    assert cli.main([*args[:9], "--swap", "ffn@1", "--out", str(tmp_path / "w"), "--quiet"]) == 2
    assert "valid kinds" in capsys.readouterr().err
    assert cli.main([*args[:9], "--out", str(tmp_path / "w"), "--quiet"]) == 2
    assert "No intervention" in capsys.readouterr().err

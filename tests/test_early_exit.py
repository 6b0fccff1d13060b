"""Early exit: the paper's confidence protocol on hand-built rankings, saturation exits, the
real generation loop against the full model, and the report on a tiny GPT-2."""

import json

import pytest
import torch

from lensmat.analyses.early_exit import LAMBDAS, SaturationProbe, confidence_curve, exit_threshold, first_exit, fixed_exit, layers_saved, saturation_curves

from lensmat.reports import early_exit
from lensmat.analyses.generation import generate, greedy_reference
from lensmat.lenses.base import LogitLens
from lensmat.stats.pipeline import Tokenized
from lensmat.analyses.saturation_rankings import Rankings, collect_rankings


def random_rankings(n_layers=4, n=300, seed=0) -> tuple[Rankings, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    topk = torch.randint(0, 6, (n_layers + 1, n, 2), generator=g)
    p1 = torch.rand(n_layers + 1, n, generator=g)
    topp = torch.stack([p1, p1 * torch.rand(n_layers + 1, n, generator=g)], -1)
    origin = [(i // 10, 1 + i % 10) for i in range(n)]
    targets = torch.randint(-1, 6, (n,), generator=g)
    return Rankings(topk, topp, torch.randn(n_layers + 1, n, 5, generator=g), origin, {}), targets


def test_threshold_follows_the_paper():
    t = torch.tensor([0, 5, 10])
    assert exit_threshold(0.5, t, 10.0).tolist() == pytest.approx([0.45 + 0.1, 0.45 + 0.1 * torch.exp(torch.tensor(-2.0)).item(),
                                                                   0.45 + 0.1 * torch.exp(torch.tensor(-4.0)).item()])


def test_first_exit_skips_layer_zero_and_defaults_to_the_last_layer():
    signal = torch.tensor([[0.9, 0.9, 0.0], [0.1, 0.8, 0.2], [0.6, 0.1, 0.3], [1.0, 1.0, 1.0]])
    assert first_exit(signal, 0.5).tolist() == [2, 1, 3]


def test_never_and_always_exiting_lambdas():
    r, targets = random_rankings()
    curve = {row["lambda"]: row for row in confidence_curve(r, targets)}
    never, always = curve[max(LAMBDAS)], curve[min(LAMBDAS)]
    assert never["mean_layers"] == 4 and never["precision@1"] == 1.0
    has = targets >= 0
    assert never["accuracy"] == pytest.approx(float((r.final_topk[has, 0] == targets[has]).double().mean()))
    layer1 = r.lens_topk[1, :, 0]
    assert always["mean_layers"] == 1
    assert always["precision@1"] == pytest.approx(float((layer1 == r.final_topk[:, 0]).double().mean()))
    assert always["accuracy"] == pytest.approx(float((layer1[has] == targets[has]).double().mean()))


def test_layers_saved_interpolates_the_retention_crossing():
    curve = [{"mean_layers": 8, "precision@1": 1.0}, {"mean_layers": 4, "precision@1": 0.9},
             {"mean_layers": 6, "precision@1": 0.96}, {"mean_layers": 1, "precision@1": 0.2}]
    assert layers_saved(curve, 8, 0.95) == pytest.approx(1 - (4 + 2 * 0.05 / 0.06) / 8)
    with pytest.raises(ValueError, match="never exits"):
        layers_saved(curve[1:], 8, 0.99)


def test_oracle_saturation_exit_reproduces_the_model_top1(tiny_model):
    from conftest import random_token_batches

    b = random_token_batches(1, 6, 14, 40, seed=3)[0]
    seqs = [b.tokens[i, : int(b.attention_mask[i].sum())].tolist() for i in range(6)]
    corpus = Tokenized(seqs, "random", "all", 32)
    r = collect_rankings(tiny_model, LogitLens(tiny_model), corpus, k=2, progress=False)
    s1 = torch.randint(0, 4, (len(r.origin),))
    s1[:3] = torch.tensor([0, 3, 1])
    probe = SaturationProbe().fit(r.resid, s1)
    targets = r.targets(corpus)
    assert targets.tolist() == [seqs[line][pos + 1] if pos + 1 < len(seqs[line]) else -1 for line, pos in r.origin]
    curves = saturation_curves(r, targets, probe)
    assert set(curves) == {"gap", "cosine", "probe", "oracle"}
    oracle = curves["oracle"][0]
    assert oracle["precision@1"] == 1.0 and oracle["speedup"] >= 1.0
    has = targets >= 0  # the oracle emits the model's own top-1, so its accuracy is the model's
    assert oracle["accuracy"] == pytest.approx(float((r.final_topk[has, 0] == targets[has]).double().mean()))
    for rows in curves.values():
        for row in rows:
            assert 0 <= row["precision@1"] <= 1 and 0 <= row["accuracy"] <= 1 and 1 <= row["mean_layers"] <= 3


def test_fixed_exit_reads_each_layer_and_matches_the_always_exiting_lambda():
    r, targets = random_rankings()
    rows = fixed_exit(r, targets)
    top1, final, has = r.lens_topk[..., 0], r.final_topk[:, 0], targets >= 0
    assert [row["layer"] for row in rows] == [1, 2, 3, 4] and rows[-1]["precision@1"] == 1.0
    for row in rows:
        layer = row["layer"]
        assert row["mean_layers"] == layer
        assert row["precision@1"] == pytest.approx(float((top1[layer] == final).double().mean()))
        assert row["accuracy"] == pytest.approx(float((top1[layer][has] == targets[has]).double().mean()))
    always = {row["lambda"]: row for row in confidence_curve(r, targets)}[min(LAMBDAS)]
    assert {k: always[k] for k in ("mean_layers", "precision@1", "accuracy")} == {
        k: rows[0][k] for k in ("mean_layers", "precision@1", "accuracy")}


FAMILIES = ["tiny_gpt2", "tiny_gpt_neox", "tiny_opt", "tiny_llama", "tiny_gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_without_exit_is_the_full_models_greedy_decoding(family, request):
    from transformers import AutoModelForCausalLM

    model, folder, _ = request.getfixturevalue(family)
    prompt = [48, 3, 6, 9, 12, 15, 18, 21, 24, 27]  # longer than Gemma's 6-position window
    full = generate(model, LogitLens(model), prompt, 16)
    assert full["tokens"] == greedy_reference(model, prompt, 16)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()  # Hugging Face's own cached greedy decoding
    ids = torch.tensor([prompt])
    assert full["tokens"] == hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)[0, len(prompt):].tolist()
    assert full["exit_layers"] == [3] * 16
    assert len(set(full["tokens"])) > 1  # a model that repeats one token would make this vacuous


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["logit", "mat"])
def test_always_exiting_after_block_0_is_the_one_block_models_greedy_decoding(family, kind, request):
    import lensmat

    model, _, corpus = request.getfixturevalue(family)
    prompt = [48, 1, 4, 7, 10, 13, 16]
    lens = LogitLens(model) if kind == "logit" else lensmat.MatLens(model, lensmat.fit_maps(model, str(corpus), progress=False))
    out = generate(model, lens, prompt, 8, lam=-1.0)
    assert out["exit_layers"] == [3] + [1] * 7  # the first token comes from the full prefill
    ids = list(prompt) + out["tokens"][:1]
    for _ in range(7):  # independent: recompute h_1 for the whole prefix, read it with the lens
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter="blocks.1.hook_resid_pre")
        ids.append(int(lens(cache["blocks.1.hook_resid_pre"][0, -1], 1).argmax()))
    assert out["tokens"] == ids[len(prompt):]
    assert len(set(out["kv_lengths"])) == 1 and out["kv_lengths"][0] == len(prompt) + 7


def mixed_run(model, prompt, n):
    """Generation whose tokens exit after block 0 and run in full, interleaved (the first λ of a
    few that gives such a mix: random models differ in how confident their layers are)."""
    for lam in (0.05, 0.0, -0.05, -0.1):
        out = generate(model, LogitLens(model), prompt, n, lam=lam, n_mean=8)
        if {1, model.cfg.n_layers} <= set(out["exit_layers"][1:]):
            return out
    raise AssertionError(f"no λ mixes exits and full runs on {model.cfg.model_name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_exits_keep_every_layers_cache_complete(family, request):
    model, _, _ = request.getfixturevalue(family)
    out = mixed_run(model, [48, 2, 5, 8, 11], 24)
    assert out["kv_lengths"] == [5 + 23] * 3  # skipped layers got the exited positions' K/V too


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_exits_equal_a_no_cache_forward_with_the_exit_states_propagated(family, request):
    """Independent check of state propagation: one forward over the whole generated sequence, no
    cache, in which every block after a position's exit layer sees that position's exit state as its
    input. The values each block cached during generation must equal that forward's, and each
    emitted token must be its lens top-1 at the exit layer (or its final top-1 without an exit)."""
    model, _, _ = request.getfixturevalue(family)
    prompt, n = [48, 2, 5, 8, 11, 14, 17], 20
    n_layers = model.cfg.n_layers
    cached = {b: [] for b in range(n_layers)}

    def keep(v, hook):
        cached[int(hook.name.split(".")[1])].append(v[0].clone())

    spies = [(f"blocks.{b}.attn.hook_v", keep) for b in range(n_layers)]
    with model.hooks(fwd_hooks=spies):
        out = mixed_run(model, prompt, n)
    cached = {b: torch.cat(vs[-n:], 0) for b, vs in cached.items()}  # the last run's values, every position
    ids = prompt + out["tokens"][:-1]
    exit_at = {len(prompt) - 1 + i: e for i, e in enumerate(out["exit_layers"]) if e < n_layers}
    states, values = {}, {}

    def propagate(h, hook):
        block = int(hook.name.split(".")[1])
        h = h.clone()
        for q, e in exit_at.items():
            if e == block:
                states[q] = h[0, q].clone()
            elif e < block:
                h[0, q] = states[q]
        return h

    def value(v, hook):
        values[int(hook.name.split(".")[1])] = v[0]

    hooks = [(f"blocks.{b}.hook_resid_pre", propagate) for b in range(n_layers)] + [
        (f"blocks.{b}.attn.hook_v", value) for b in range(n_layers)]
    logits = model.run_with_hooks(torch.tensor([ids]), fwd_hooks=hooks)[0]
    for b in range(n_layers):
        torch.testing.assert_close(cached[b], values[b], atol=1e-5, rtol=1e-4)
    lens = LogitLens(model)
    expected = [int(lens(states[q], exit_at[q]).argmax()) if q in exit_at else int(logits[q].argmax())
                for q in range(len(prompt) - 1, len(ids))]
    assert out["tokens"] == expected


def test_generation_refuses_a_bridge_without_a_hugging_face_decoder(tiny_model):
    with pytest.raises(NotImplementedError, match="decoder stack"):
        generate(tiny_model, LogitLens(tiny_model), [0, 1], 2)


def test_generation_refuses_a_masked_lm(tiny_bert):
    model, _, _ = tiny_bert
    with pytest.raises(ValueError, match="masked LM.*`early-exit`.*simulated at the \\[MASK\\] positions"):
        generate(model, LogitLens(model), [48, 1], 2)


def test_report_on_a_tiny_gpt2(tiny_gpt2, tmp_path):
    model, _, corpus = tiny_gpt2
    report = early_exit(model, str(corpus), lenses="logit,mat", max_eval_tokens=400, max_probe_tokens=400,
                        out=tmp_path / "ee", progress=False)
    saved = json.loads((tmp_path / "ee" / "report.json").read_text())
    assert (tmp_path / "ee" / "early_exit.png").is_file()
    for lens in ("logit", "mat"):
        rows = saved["curves"][lens]
        assert [r["lambda"] for r in rows] == list(LAMBDAS)
        assert set(rows[0]) == {"lambda", "mean_layers", "precision@1", "accuracy", "ci_low", "ci_high"}
        for r in rows:  # each point with its interval over held-out documents
            for m in ("mean_layers", "precision@1", "accuracy"):
                assert r["ci_low"][m] - 1e-12 <= r[m] <= r["ci_high"][m] + 1e-12
        assert rows[-1]["mean_layers"] == 3 and rows[-1]["precision@1"] == 1.0
        assert 0.0 <= saved["savings"][lens] < 1.0
    assert set(saved["saturation"]) == {"gap", "cosine", "probe", "oracle"}
    assert set(saved["saturation"]["gap"][0]) >= {"threshold", "precision@1", "accuracy", "speedup"}
    assert [row["layer"] for row in saved["fixed_exit"]["mat"]] == [1, 2, 3]
    from lensmat.stats.pipeline import tokenized

    assert report["n_eval_tokens"] == tokenized(model, str(corpus), "heldout").n_tokens(400)


def test_blocks_after_an_exit_do_not_run_their_mlp(tiny_llama):
    model, _, _ = tiny_llama
    calls = {b: 0 for b in range(3)}

    def count(x, hook):
        calls[int(hook.name.split(".")[1])] += 1

    with model.hooks(fwd_hooks=[(f"blocks.{b}.mlp.hook_in", count) for b in range(3)]):
        out = generate(model, LogitLens(model), [48, 1, 4, 7], 6, lam=-1.0)
    assert out["exit_layers"] == [3] + [1] * 5
    assert calls == {0: 6, 1: 1, 2: 1}  # the prefill runs every MLP; exited steps only block 0's
    assert "forward" not in vars(model.blocks[1].mlp)  # the instance override is gone afterwards


@pytest.mark.parametrize("family", FAMILIES)
def test_the_generation_readout_is_the_lens_readout(family, request):
    from lensmat.analyses.generation import top_tokens
    from lensmat.lenses import engine
    from lensmat.lenses.base import readout

    model, _, _ = request.getfixturevalue(family)
    unembedding = engine.Unembedding(model)
    for h in torch.randn(5, model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 3:
        ids, probs = top_tokens(unembedding, h, 2)
        want = torch.softmax(readout(model, h).float(), -1).topk(2)
        assert torch.equal(ids, want.indices)
        torch.testing.assert_close(probs, want.values, atol=1e-5, rtol=1e-5)


def test_generation_thresholds_use_the_simulated_curves_positions(tiny_gpt2, monkeypatch):
    """θ(t) with t = the input token's position after BOS (the first token after BOS is t = 0), as
    :func:`lensmat.analyses.early_exit.positions` numbers the simulated curves' tokens."""
    import lensmat.analyses.generation as generation

    model, _, _ = tiny_gpt2
    seen = []
    real = generation.exit_threshold

    def spy(lam, t, n_mean, tau=4.0):
        seen.append(int(t[0]))
        return real(lam, t, n_mean, tau)

    monkeypatch.setattr(generation, "exit_threshold", spy)
    prompt = [48, 3, 6, 9]  # BOS + 3 tokens: the first generated token sits at t = 3
    generate(model, LogitLens(model), prompt, 4, lam=0.5)
    assert seen == [3, 4, 5, 6]  # the last one is computed but unused


def test_a_probe_without_both_classes_is_left_out_with_a_warning(tiny_bert):
    from lensmat.analyses.early_exit import ProbeDataError

    with pytest.raises(ProbeDataError, match="no pair of its 4 tokens is saturated"):
        SaturationProbe().fit(torch.randn(4, 4, 3), torch.full((4,), 3))
    model, _, corpus = tiny_bert  # a few [MASK]s, read by the logit lens, saturate at L only
    with pytest.warns(RuntimeWarning, match="logit lens's probe exit is left out"):
        r = early_exit(model, str(corpus), lenses="logit", max_probe_tokens=3, max_eval_tokens=30, progress=False)
    assert set(r["saturation"]) == {"gap", "cosine", "oracle"} and r["protocol"] == "masked"


# Cheap exit checks: the exit probe (lensmat.analyses.exit_probe) and generate(check="gated" | "probe")

def constant_probe(model, lens, bias):
    """An exit probe whose logit at layer ``l`` is ``bias[l-1]`` whatever ``h_l`` holds (W = 0)."""
    from lensmat.analyses.exit_probe import ExitProbe, lens_fingerprint
    from lensmat.models import describe

    n_layers = model.cfg.n_layers
    meta = {"model": describe(model).to_dict(), "label": "top1",
            "lens": {"name": lens.name, "fingerprint": lens_fingerprint(lens, n_layers)}}
    return ExitProbe(torch.zeros(n_layers - 1, model.cfg.d_model), torch.tensor(bias, dtype=torch.float32), meta)


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
def test_an_always_confident_probe_exits_at_layer_1_and_emits_the_lens_top1_there(family, request):
    model, _, _ = request.getfixturevalue(family)
    lens = LogitLens(model)
    prompt = [48, 1, 4, 7, 10, 13, 16]
    out = generate(model, lens, prompt, 8, check="probe", probe=constant_probe(model, lens, [30.0, 30.0]), gate=0.5)
    assert out["exit_layers"] == [3] + [1] * 7
    assert out["readouts"] == [1] * 8 and out["probe_checks"] == [0] + [1] * 7  # one probe, one readout per token
    exact = generate(model, lens, prompt, 8, lam=-1.0)  # the exact rule exiting at layer 1 emits the same tokens
    assert out["tokens"] == exact["tokens"] and exact["exit_layers"] == out["exit_layers"]
    assert exact["readouts"] == [1] * 8  # the exit check is the emitting readout
    assert len(set(out["kv_lengths"])) == 1


@pytest.mark.parametrize("check", ["gated", "probe"])
def test_a_gate_that_never_opens_never_exits_and_is_the_full_model(check, tiny_gpt2):
    model, _, _ = tiny_gpt2
    lens = LogitLens(model)
    prompt = [48, 3, 6, 9, 12]
    full = generate(model, None, prompt, 12)
    assert full["readouts"] == [1] * 12 and full["probe_checks"] == [0] * 12
    lam = -1.0 if check == "gated" else None  # gated: the exact rule would exit at every layer if asked
    for probe, gate in ((constant_probe(model, lens, [5.0, 5.0]), 1.0), (constant_probe(model, lens, [-30.0, -30.0]), 0.5)):
        out = generate(model, lens, prompt, 12, lam=lam, check=check, probe=probe, gate=gate)
        assert out["tokens"] == full["tokens"] and out["exit_layers"] == [3] * 12
        assert out["readouts"] == [1] * 12 and out["probe_checks"] == [0] + [2] * 11


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
def test_gated_with_gate_0_is_exact_and_a_closed_layer_saves_its_readouts(family, request):
    model, _, _ = request.getfixturevalue(family)
    lens, prompt = LogitLens(model), [48, 2, 5, 8, 11]
    exact = mixed_run(model, prompt, 24)
    lam = next(lam for lam in (0.05, 0.0, -0.05, -0.1)
               if generate(model, lens, prompt, 24, lam=lam, n_mean=8)["exit_layers"] == exact["exit_layers"])
    rng_probe = constant_probe(model, lens, [0.0, 0.0])
    rng_probe.W = torch.randn(rng_probe.W.shape, generator=torch.Generator().manual_seed(0))
    gated = generate(model, lens, prompt, 24, lam=lam, n_mean=8, check="gated", probe=rng_probe, gate=0.0)
    assert gated["tokens"] == exact["tokens"] and gated["exit_layers"] == exact["exit_layers"]
    assert gated["readouts"] == exact["readouts"] and sum(exact["readouts"]) > 24
    assert gated["probe_checks"][1:] == [r - (e == 3) for r, e in zip(exact["readouts"][1:], exact["exit_layers"][1:])]
    shut = generate(model, lens, prompt, 24, lam=lam, n_mean=8, check="gated",  # layer 1 open, layer 2 shut
                    probe=constant_probe(model, lens, [30.0, -30.0]), gate=0.5)
    assert set(shut["exit_layers"][1:]) <= {1, 3} and shut["readouts"][1:] == [1 + (e == 3) for e in shut["exit_layers"][1:]]
    assert max(shut["readouts"]) == 2 < max(exact["readouts"])  # layer 2 is never read
    same = exact["exit_layers"].index(2) if 2 in exact["exit_layers"] else 24  # identical until exact exits at 2
    assert shut["tokens"][:same] == exact["tokens"][:same] and shut["exit_layers"][:same] == exact["exit_layers"][:same]
    assert all(a <= b for a, b in zip(shut["readouts"][:same], exact["readouts"][:same]))
    assert len(set(shut["kv_lengths"])) == 1


def test_the_exit_probe_folds_its_scaler_and_reloads_identical(tiny_gpt2, tiny_llama, tmp_path):
    import lensmat
    from lensmat.analyses.exit_probe import ExitProbe, train_exit_probe
    from lensmat.models import ModelMismatchError
    from lensmat.stats.artifacts import ArtifactError
    from lensmat.stats.pipeline import tokenized

    model, _, corpus = tiny_gpt2
    lens = LogitLens(model)
    probe = train_exit_probe(model, lens, str(corpus), max_tokens=600, progress=False)
    assert probe.W.shape == (2, model.cfg.d_model) and probe.meta["label"] == "top1" and probe.meta["n_tokens"] == 600
    assert probe.meta["data"]["split"] == "train"
    train = tokenized(model, str(corpus), "train")
    r = collect_rankings(model, lens, train, k=1, max_tokens=600, progress=False)
    p = probe.probability(r.resid)
    assert p.shape == (4, 600) and bool((p[0] == 0).all()) and bool((p[-1] == 0).all())
    layer1 = (r.lens_topk[1, :, 0] == r.final_topk[:, 0]).numpy()
    from sklearn.metrics import balanced_accuracy_score

    assert balanced_accuracy_score(layer1, (p[1] > 0.5).numpy()) == pytest.approx(probe.meta["train_balanced_accuracy"][0])
    probe.save(tmp_path / "probe")
    back = ExitProbe.load(tmp_path / "probe", model, lens)
    assert torch.equal(back.W, probe.W) and torch.equal(back.b, probe.b) and back.meta["label"] == "top1"
    llama = tiny_llama[0]
    with pytest.raises(ModelMismatchError, match="exit probe"):
        ExitProbe.load(tmp_path / "probe", llama)
    mat = lensmat.MatLens(model, lensmat.fit_maps(model, str(corpus), progress=False))
    with pytest.raises(ModelMismatchError, match="fitted with the 'logit' lens, not the 'mat' lens"):
        ExitProbe.load(tmp_path / "probe", model, mat)
    with pytest.raises(ArtifactError, match="not a saved lensmat exit_probe"):
        ExitProbe.load(tmp_path, model)
    with pytest.raises(ValueError, match="train split"):
        train_exit_probe(model, lens, tokenized(model, str(corpus), "heldout"), progress=False)
    with pytest.raises(ValueError, match="label="):
        train_exit_probe(model, lens, str(corpus), label="gap", progress=False)


def test_cheap_checks_refuse_what_they_cannot_use(tiny_gpt2, tiny_llama):
    from lensmat.analyses.exit_probe import ExitProbe
    from lensmat.models import ModelMismatchError

    model, _, _ = tiny_gpt2
    lens, prompt = LogitLens(model), [48, 1, 2]
    probe = constant_probe(model, lens, [0.0, 0.0])
    for check in ("gated", "probe"):
        with pytest.raises(ValueError, match=f"check='{check}' needs an exit probe"):
            generate(model, lens, prompt, 2, lam=0.5 if check == "gated" else None, check=check)
    with pytest.raises(ValueError, match="check='fast'"):
        generate(model, lens, prompt, 2, check="fast", probe=probe)
    with pytest.raises(ValueError, match="an exit probe is used by check='gated'"):
        generate(model, lens, prompt, 2, lam=0.5, probe=probe)
    for gate in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="gate="):
            generate(model, lens, prompt, 2, lam=0.5, check="gated", probe=probe, gate=gate)
    with pytest.raises(ValueError, match="pass lam=None"):
        generate(model, lens, prompt, 2, lam=0.5, check="probe", probe=probe)
    llama = tiny_llama[0]
    with pytest.raises(ModelMismatchError, match="different model"):
        generate(llama, LogitLens(llama), prompt, 2, check="probe", probe=probe)
    short = ExitProbe(torch.zeros(1, model.cfg.d_model), torch.zeros(1), probe.meta)
    with pytest.raises(ModelMismatchError, match="n_layers=2"):
        generate(model, lens, prompt, 2, check="probe", probe=short)
    other = constant_probe(model, lens, [0.0, 0.0])
    other.meta["lens"]["fingerprint"] = [x + 1 for x in other.meta["lens"]["fingerprint"]]
    with pytest.raises(ModelMismatchError, match="another 'logit' lens"):
        generate(model, lens, prompt, 2, check="gated", lam=0.5, probe=other)


@pytest.mark.slow
def test_the_exit_probe_predicts_held_out_exits_on_the_reference_model(reference_model):
    from sklearn.metrics import balanced_accuracy_score

    from lensmat.analyses.exit_probe import exit_labels, train_exit_probe
    from lensmat.stats.pipeline import tokenized

    model = reference_model
    lens = LogitLens(model)
    probe = train_exit_probe(model, lens, None, max_tokens=3000, progress=False)
    r = collect_rankings(model, lens, tokenized(model, None, "heldout"), k=1, max_tokens=2000, progress=False)
    labels, p = exit_labels(r), probe.probability(r.resid)
    scores = [balanced_accuracy_score(labels[layer].numpy(), (p[layer] > 0.5).numpy())
              for layer in range(1, model.cfg.n_layers) if 0 < int(labels[layer].sum()) < labels.shape[1]]
    assert len(scores) >= model.cfg.n_layers - 2
    assert sum(scores) / len(scores) > 0.65 and min(scores) > 0.55  # chance is 0.5

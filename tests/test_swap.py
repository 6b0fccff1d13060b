"""Swapping sub-modules for linear maps: invariants on the tiny model."""

import pytest
import torch

from conftest import make_tiny_model, random_token_batches
from lensmat.stats.collect import collect, resid_hooks
from lensmat.data import pad
from lensmat.stats.fit import MapSet, fit_pairs
from lensmat.models import describe
from lensmat.analyses.submodules import evaluate_swaps, groups_for, submodule_pairs
from lensmat.analyses.swap import submodule_pair, swap, swap_hooks


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(n_layers=3, d_model=16)


def fitted(model, batches, pairs, intercept):
    stats = collect(model, batches, groups_for(pairs), progress=False)
    return MapSet(fit_pairs(stats, pairs, intercept=intercept), describe(model).to_dict(), intercept)


@torch.no_grad()
def test_affine_attention_map_on_length_one_sequences_reproduces_the_model(model):
    """At a single position attention is affine in its input, so the fitted map is exact there."""
    pairs = submodule_pairs(model, ["attn"])
    maps = fitted(model, [pad([[t] for t in range(40)], has_bos=False)], pairs, intercept=True)
    tokens = torch.arange(40)[:, None]
    full = model(tokens)
    with swap(model, maps, kinds={"attn"}):
        swapped = model(tokens)
    assert (swapped - full).abs().max().item() <= 1e-4
    # on longer sequences attention mixes positions, so the same map is no longer exact
    longer = random_token_batches(1, 4, 12, 40, seed=2)[0].tokens
    exact = model(longer)
    with swap(model, maps, kinds={"attn"}):
        assert (model(longer) - exact).abs().max().item() > 1e-2


@torch.no_grad()
def test_identity_map_where_the_block_is_the_identity_changes_nothing():
    """Zero block 1's attention and MLP outputs: the block is then exactly the identity, its fitted
    map is I, and swapping the block (or its attention) for its map leaves the logits unchanged."""
    model = make_tiny_model(n_layers=3, d_model=16, seed=3)
    for name, p in model.blocks[1].named_parameters():
        if ".o." in name or "fc_out" in name:
            p.zero_()
    batches = random_token_batches(4, 8, 16, 40, seed=12)
    pairs = submodule_pairs(model, ["block", "attn"], blocks=[1])
    maps = fitted(model, batches, pairs, intercept=True)
    block = maps.get(*submodule_pair(model, "block", 1))
    assert (block.W - torch.eye(16)).abs().max() < 1e-4 and block.b.abs().max() < 1e-4
    tokens = batches[0].tokens
    full = model(tokens)
    for kind in ("block", "attn"):
        with swap(model, maps, kinds={kind}, blocks=[1]):
            assert (model(tokens) - full).abs().max().item() <= 1e-4, kind


@torch.no_grad()
def test_swap_leaves_earlier_blocks_untouched_and_cleans_up(model):
    batches = random_token_batches(4, 8, 16, 40, seed=6)
    maps = fitted(model, batches, submodule_pairs(model, ["attn", "mlp"]), intercept=False)
    tokens = batches[0].tokens
    _, ref = model.run_with_cache(tokens)
    n_hooks = sum(len(hp.fwd_hooks) for hp in model.hook_dict.values())
    with swap(model, maps, kinds={"attn"}, layers=[2]):  # the old keyword still works
        _, cache = model.run_with_cache(tokens)
    for name in ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_mid"]:
        same = torch.equal(cache[name], ref[name])
        assert same == (name != "blocks.2.hook_resid_mid"), name
    with pytest.raises(RuntimeError, match="boom"):
        with swap(model, maps, kinds={"mlp"}):
            raise RuntimeError("boom")
    assert sum(len(hp.fwd_hooks) for hp in model.hook_dict.values()) == n_hooks
    _, after = model.run_with_cache(tokens)
    assert torch.equal(after["blocks.2.hook_resid_post"], ref["blocks.2.hook_resid_post"])


@torch.no_grad()
def test_swap_hooks_compose_with_user_hooks(model):
    batches = random_token_batches(3, 8, 16, 40, seed=8)
    maps = fitted(model, batches, submodule_pairs(model, ["mlp"]), intercept=False)
    seen = []
    user = [("blocks.1.hook_mlp_out", lambda act, hook: seen.append(act.clone()))]
    tokens = batches[0].tokens
    model.run_with_hooks(tokens, fwd_hooks=swap_hooks(model, maps, ["mlp"], [1]) + user)
    _, cache = model.run_with_cache(tokens)
    expected = maps.get(*submodule_pair(model, "mlp", 1))(cache["blocks.1.ln2.hook_out"])
    assert torch.allclose(seen[0], expected, atol=1e-5)


@torch.no_grad()
def test_protocol_at_L_is_the_full_model(model):
    batches = random_token_batches(3, 8, 16, 40, seed=10)
    pairs = submodule_pairs(model, ["attn", "mlp", "ln"])
    sub = fitted(model, batches, pairs, intercept=False)
    stats = collect(model, batches, [resid_hooks(3)], progress=False)[0]
    layer = MapSet(fit_pairs([stats], [(h, resid_hooks(3)[-1]) for h in resid_hooks(3)[:-1]]), describe(model).to_dict())
    variants, single, n = evaluate_swaps(model, sub, layer, batches[:1], progress=False)
    assert set(variants) == {"attn", "mlp", "ln", "mat", "id"}
    for v in variants.values():
        assert v["precision@1"][3] == 1.0 and len(v["precision@1"]) == 4
    assert all(len(s["precision@1"]) == 3 for s in single.values())
    # swapping nothing of block 2 from layer 2 on == swapping block 2 alone
    assert variants["attn"]["precision@1"][2] == pytest.approx(single["attn"]["precision@1"][2])


def test_bad_kinds_and_blocks(model):
    with pytest.raises(ValueError, match="valid kinds"):
        submodule_pair(model, "ffn", 0)
    with pytest.raises(IndexError, match="blocks 0..2"):
        submodule_pair(model, "attn", 3)


def test_parallel_and_attention_only_architectures_get_the_substitute_or_a_clear_error(monkeypatch):
    model = make_tiny_model()
    assert submodule_pair(model, "ln2", 1)[0] == "blocks.1.hook_resid_mid"
    monkeypatch.setattr(model.cfg, "parallel_attn_mlp", True, raising=False)
    assert submodule_pair(model, "ln2", 1) == ("blocks.1.hook_resid_pre", "blocks.1.ln2.hook_out")
    monkeypatch.setattr(model.cfg, "parallel_attn_mlp", False, raising=False)
    monkeypatch.setattr(model.cfg, "attn_only", True, raising=False)
    for kind in ("ln2", "mlp"):
        with pytest.raises(ValueError, match="attention-only"):
            submodule_pair(model, kind, 0)
    assert submodule_pair(model, "attn", 0) == ("blocks.0.ln1.hook_out", "blocks.0.hook_attn_out")

"""Every internal of transformers / TransformerLens that lensmat relies on, checked on the installed
versions. Each failure names the dependency and its version, so a release that changes one of
them fails here, loudly, instead of giving wrong numbers elsewhere (see lensmat/compat.py)."""

import inspect

import pytest
import torch

from lensmat.compat import bridge_cache_shim, cache_kwarg, versions


def need(ok: bool, what: str) -> None:
    assert ok, f"{what} (installed: {versions()})"


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama", "tiny_gemma3"])
def test_a_cached_forward_through_the_bridge_fills_the_cache(family, request):
    """The early-exit loop prefills and decodes through the bridge with a DynamicCache under the
    keyword the decoder takes; transformers 5.24 renamed it (past_key_values -> cache) and
    TransformerLens 4.3's attention bridges still read the old name, which the shim hands on."""
    from transformers import DynamicCache

    model, _, _ = request.getfixturevalue(family)
    decoder = model.original_model.base_model
    kwarg = cache_kwarg(decoder)
    layer = decoder.layers[0] if hasattr(decoder, "layers") else decoder.h[0]
    need(kwarg in inspect.signature(layer.forward).parameters or "kwargs" in inspect.signature(layer.forward).parameters,
         f"transformers: {type(layer).__name__}.forward no longer takes the cache as {kwarg!r}")
    ids = torch.tensor([[48, 1, 2, 3, 4]])
    cache = DynamicCache(config=model.original_model.config)
    with torch.no_grad(), bridge_cache_shim(model):
        decoder(input_ids=ids[:, :4], use_cache=True, **{kwarg: cache})
        need(cache.get_seq_length() == 4,
             "transformer-lens: a cached forward through the bridge left the key/value cache empty")
        last = decoder(input_ids=ids[:, 4:], use_cache=True, **{kwarg: cache}).last_hidden_state[0, -1]
    full = decoder(input_ids=ids).last_hidden_state[0, -1]
    need(torch.allclose(last, full, atol=1e-5), "a cached decoding step differs from the no-cache forward")


def test_legacy_hook_names_exist(tiny_gpt2, tiny_llama):
    """lensmat's layer convention and sub-module pairs are built on these TransformerLens names."""
    for model, _, _ in (tiny_gpt2, tiny_llama):
        for name in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                     "ln1.hook_out", "ln2.hook_out", "ln1.hook_in", "attn.hook_v", "mlp.hook_in"):
            need(f"blocks.1.{name}" in model.hook_dict, f"transformer-lens: hook blocks.1.{name} is gone")


def test_replacing_hook_resid_pre_feeds_the_block(tiny_llama):
    """generate's state propagation returns a new value from blocks.{j}.hook_resid_pre."""
    model, _, _ = tiny_llama
    seen = {}
    hooks = [("blocks.1.hook_resid_pre", lambda h, hook: torch.zeros_like(h)),
             ("blocks.1.ln1.hook_in", lambda h, hook: seen.setdefault("x", h.clone()))]
    model.run_with_hooks(torch.tensor([[48, 1, 2]]), fwd_hooks=hooks)
    need(bool((seen["x"] == 0).all()), "transformer-lens: a hook_resid_pre replacement did not reach the block")


def test_an_instance_forward_replaces_the_mlp_bridge(tiny_llama):
    """generate skips the MLPs of exited blocks by an instance-level forward on the MLP bridge."""
    model, _, _ = tiny_llama
    mlp = model.blocks[1].mlp
    object.__setattr__(mlp, "forward", lambda x, *a, **k: torch.zeros_like(x))
    try:
        _, cache = model.run_with_cache(torch.tensor([[48, 1, 2]]),
                                        names_filter=["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"])
    finally:
        object.__delattr__(mlp, "forward")
    need(torch.equal(cache["blocks.1.hook_resid_mid"], cache["blocks.1.hook_resid_post"]),
         "transformer-lens: the block no longer calls its MLP bridge's forward")


def test_masked_lm_head_lookup(tiny_bert):
    """mlm_head finds the head module through the bridge's unembed name."""
    from lensmat.models import mlm_head

    model, _, _ = tiny_bert
    need("." in str(getattr(model.unembed, "name", "")), "transformer-lens: unembed.name no longer names its HF path")
    ids = torch.tensor([[48, 1, 2, 49]])
    _, cache = model.run_with_cache(ids, names_filter="blocks.2.hook_resid_post")
    need(torch.allclose(mlm_head(model)(cache["blocks.2.hook_resid_post"]), model.original_model(ids).logits, atol=1e-4),
         "the masked-LM head does not reproduce the model's logits")


def test_hub_offline_switch():
    """_hub_offline flips huggingface_hub's module constant (the environment is read at import)."""
    import huggingface_hub.constants as hub

    from lensmat.models import _hub_offline

    need(hasattr(hub, "HF_HUB_OFFLINE"), "huggingface_hub: constants.HF_HUB_OFFLINE is gone")
    before = hub.HF_HUB_OFFLINE
    with _hub_offline():
        need(hub.HF_HUB_OFFLINE is True, "huggingface_hub: offline switch did not take")
    assert hub.HF_HUB_OFFLINE == before


def test_weights_processed_flag(tiny_model):
    """basis_of reads the bridge's private _weights_processed flag."""
    from lensmat.models import basis_of

    need(hasattr(tiny_model, "_weights_processed") or basis_of(tiny_model) == "raw",
         "transformer-lens: _weights_processed is gone")
    need(basis_of(tiny_model) == "raw", "transformer-lens: a fresh bridge reports processed weights")


# lensmat's modules in dependency order (docs/modules.md): each imports only modules of earlier rows
# (anywhere in the file, lazy imports included); models and gguf_models resolve each other's specs.
MODULE_ROWS = [
    ["outputs"], ["compat", "models", "gguf_models"], ["data"], ["statistics"], ["fit"], ["io"], ["collect"], ["distributed"],
    ["plan"], ["pipeline"], ["lenses"], ["metrics"], ["tuned", "jlens", "importers"], ["swap"], ["run"], ["plots"],
    ["trajectory"], ["saturation"], ["early_exit"], ["generation", "compare", "submodules", "linearity"], ["cli"],
    ["__init__", "__main__"],
]


def test_modules_import_only_upstream():
    import ast
    from pathlib import Path

    import lensmat

    folder = Path(lensmat.__file__).parent
    row = {m: i for i, names in enumerate(MODULE_ROWS) for m in names}
    assert set(row) == {p.stem for p in folder.glob("*.py")}, "a module is missing from MODULE_ROWS and docs/modules.md"
    bad = []
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lensmat"):
                names = [a.name for a in node.names] if node.module == "lensmat" else [node.module.split(".")[1]]
                for dep in (n for n in names if n in row):
                    allowed = row[dep] < row[path.stem] or {dep, path.stem} == {"models", "gguf_models"}
                    if not allowed:
                        bad.append(f"{path.stem} imports {dep}")
    assert not bad, bad

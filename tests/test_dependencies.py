"""Every internal of transformers / TransformerLens that lensmat relies on, checked on the installed
versions. Each failure names the dependency and its version, so a release that changes one of
them fails here, loudly, instead of giving wrong numbers elsewhere (see lensmat/compat.py)."""

import inspect

import os
import re
import subprocess
import sys
from pathlib import Path
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
    """hub_offline flips huggingface_hub's module constant (the environment is read at import)."""
    import huggingface_hub.constants as hub

    from lensmat.compat import hub_offline

    need(hasattr(hub, "HF_HUB_OFFLINE"), "huggingface_hub: constants.HF_HUB_OFFLINE is gone")
    before = hub.HF_HUB_OFFLINE
    with hub_offline():
        need(hub.HF_HUB_OFFLINE is True, "huggingface_hub: offline switch did not take")
    assert hub.HF_HUB_OFFLINE == before


def test_weights_processed_flag(tiny_model):
    """basis_of reads the bridge's private _weights_processed flag."""
    from lensmat.models import basis_of

    need(hasattr(tiny_model, "_weights_processed") or basis_of(tiny_model) == "raw",
         "transformer-lens: _weights_processed is gone")
    need(basis_of(tiny_model) == "raw", "transformer-lens: a fresh bridge reports processed weights")


def _lint_imports(root: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
                           str(config), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)})


def test_the_layering_holds_and_every_module_is_in_a_layer():
    """pyproject.toml's import-linter contracts (the layering of docs/modules.md) hold on lensmat, and name
    every top-level module and sub-package, so a new one must be placed in a layer."""
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    contracts = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layered = {m.strip().removeprefix("lensmat.") for row in contracts[0]["layers"] for m in row.split(":")}
    top = {p.stem for p in (repo / "lensmat").glob("*.py")} | {p.parent.name for p in (repo / "lensmat").glob("*/__init__.py")}
    assert layered | {"__init__"} == top, "a module or sub-package is in no layer"
    res = _lint_imports(repo, repo / "pyproject.toml")
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("module, wrong", [("stats/gram", "from lensmat.cli import main"),  # up the layers
                                           ("lenses/base", "from lensmat.lenses.tuned import TunedLens"),  # up inside one
                                           ("analyses/linearity", "from lensmat.analyses.compare import compare")])  # across analyses
def test_the_layering_contracts_fail_on_a_wrong_import(tmp_path, module, wrong):
    """The contracts are not vacuous: a copy of the package (renamed, so the installed one cannot answer) with
    one wrong import breaks them."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    probe = tmp_path / "lensmat_probe"
    shutil.copytree(repo / "lensmat", probe, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    for path in probe.rglob("*.py"):
        path.write_text(re.sub(r"\blensmat\b(?=[.\s])", "lensmat_probe", path.read_text()))
    res = _lint_imports(tmp_path, _probe_config(repo, tmp_path))
    assert res.returncode == 0, "the unchanged copy must keep the contracts: " + res.stdout + res.stderr
    target = probe / f"{module}.py"
    target.write_text(target.read_text() + "\n\ndef _wrong():\n    " + wrong.replace("lensmat", "lensmat_probe") + "\n")
    res = _lint_imports(tmp_path, _probe_config(repo, tmp_path))
    assert res.returncode != 0 and "BROKEN" in res.stdout, res.stdout + res.stderr


def _probe_config(repo: Path, tmp_path: Path) -> Path:
    config = tmp_path / "pyproject.toml"
    config.write_text(re.sub(r"\blensmat\b(?=[.\s\"])", "lensmat_probe", (repo / "pyproject.toml").read_text()))
    return config

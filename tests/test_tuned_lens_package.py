"""Lenses saved by the `tuned-lens` package load into lensmat's TunedLens and read the same logits.

The package is not a lensmat dependency; CI installs it (`.ci/run`). Elsewhere these tests skip
with the install line, and with ``CI`` set a missing package is a failure.
"""

import json
import os

import numpy as np
import pytest
import torch

from lensmat.stats.collect import resid_hooks
from lensmat.stats.artifacts import ArtifactError
from lensmat.lenses.base import LogitLens
from lensmat.models import ModelMismatchError
from lensmat.lenses.tuned import TunedLens
from lensmat.lenses.tuned_package import package_unembed_hash

INSTALL = "pip install --no-deps tuned-lens==0.2.0 simple-parsing flatten-dict docstring-parser"


@pytest.fixture(scope="module")
def package():
    try:
        import tuned_lens.model_surgery as surgery
        from tuned_lens.nn import TunedLens as PackageTunedLens
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the tuned-lens package is not installed: {INSTALL}")
    surgery._transformer_lens_available = False  # its TransformerLens path needs HookedTransformer (TL 3)
    return PackageTunedLens


@pytest.fixture(scope="module")
def saved(package, tiny_gpt2, tmp_path_factory):
    """A lens built and saved by the package for the tiny HF GPT-2, with random translators."""
    from transformers import AutoModelForCausalLM

    _, folder, _ = tiny_gpt2
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    theirs = package.from_model(hf)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.layer_translators.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("package") / "lens"
    theirs.save(path)
    return hf, theirs.eval(), path


def copy_package(path, folder, config=None, state=None):
    """``path``'s package lens copied to ``folder``, with its config and state dict edited."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config or json.loads((path / "config.json").read_text())))
    torch.save(torch.load(path / "params.pt", weights_only=True) if state is None else state, folder / "params.pt")
    return folder


@torch.no_grad()
def test_a_package_lens_reads_the_same_logits_in_lensmat(tiny_gpt2, saved, tmp_path):
    model = tiny_gpt2[0]
    hf, theirs, path = saved
    ours = TunedLens.load(path, model)  # dispatches on config.json + params.pt
    config = json.loads((path / "config.json").read_text())
    assert ours.meta["format"] == "tuned-lens package"
    assert ours.meta["provenance"] == {"source": str(path), "package_config": config}
    assert config["unembed_hash"] == package_unembed_hash(model)  # the package's hash, reproduced from the bridge
    with np.printoptions(threshold=10**9, precision=4):  # a user's print options do not change it
        assert package_unembed_hash(model) == config["unembed_hash"]
    ids = torch.tensor([[48, 5, 9, 3, 17, 8, 2]])
    hidden = hf(ids, output_hidden_states=True).hidden_states  # the package reads HF hidden_states[l]
    L = int(model.cfg.n_layers)
    hooks = resid_hooks(L)
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n in hooks)
    logit = LogitLens(model)
    for layer in range(L):
        h = cache[hooks[layer]][0]
        torch.testing.assert_close(h, hidden[layer][0], atol=1e-5, rtol=1e-5)  # lensmat's h_l is HF's hidden_states[l]
        torch.testing.assert_close(ours(h, layer), theirs(hidden[layer][0], layer), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(h, layer), logit(h, layer), atol=1e-2)  # the translators matter
    torch.testing.assert_close(ours(cache[hooks[L]][0], L), model(ids)[0], atol=1e-5, rtol=1e-5)  # identity at L
    again = TunedLens.load(ours.save(tmp_path / "lensmat"), model)  # saved by lensmat, it is a lensmat lens
    assert torch.equal(again.W, ours.W) and again.meta["format"] == "tuned-lens package"


def test_a_lens_without_bias_gets_a_zero_bias(tiny_gpt2, saved, tmp_path):
    _, theirs, path = saved
    config = {**json.loads((path / "config.json").read_text()), "bias": False}
    state = {k: v for k, v in theirs.layer_translators.state_dict().items() if k.endswith(".weight")}
    lens = TunedLens.load(copy_package(path, tmp_path / "nobias", config, state), tiny_gpt2[0])
    assert torch.equal(lens.b, torch.zeros_like(lens.b))
    assert torch.equal(lens.W[1], theirs[1].weight.T)  # nn.Linear's [out, in] -> lensmat's h @ W


class NotATensor:
    pass


def test_package_folders_that_do_not_fit_are_refused(tiny_gpt2, saved, tmp_path):
    from conftest import make_tiny_model

    model, hf_folder, _ = tiny_gpt2
    _, _, path = saved
    config = json.loads((path / "config.json").read_text())
    state = torch.load(path / "params.pt", weights_only=True)
    with pytest.raises(ModelMismatchError, match="3 layers, d_model 32.*this model has 2 layers, d_model 16"):
        TunedLens.load(path, make_tiny_model(n_layers=2, d_model=16))
    with pytest.raises(ModelMismatchError, match="unembedding hash"):
        TunedLens.load(copy_package(path, tmp_path / "hash", {**config, "unembed_hash": "0" * 64}), model)
    with pytest.raises(ArtifactError, match="is not a tuned-lens config .no d_model, num_hidden_layers.*not a model folder"):
        TunedLens.load(hf_folder, model)  # a Hugging Face model folder has a config.json too
    with pytest.raises(ArtifactError, match="'other_lens' lens"):
        TunedLens.load(copy_package(path, tmp_path / "type", {**config, "lens_type": "other_lens"}), model)
    missing = copy_package(path, tmp_path / "missing")
    (missing / "params.pt").unlink()
    with pytest.raises(ArtifactError, match="no params.pt"):
        TunedLens.load(missing, model)
    with pytest.raises(ArtifactError, match=r"missing \['0.bias'\]; unexpected \['0.extra'\]"):
        TunedLens.load(copy_package(path, tmp_path / "keys", state={**{k: v for k, v in state.items() if k != "0.bias"},
                                                                    "0.extra": torch.zeros(1)}), model)
    with pytest.raises(ArtifactError, match=r"2.weight is not a \[d, d\] tensor for d_model 32"):
        TunedLens.load(copy_package(path, tmp_path / "shape", state={**state, "2.weight": torch.zeros(32, 16)}), model)
    with pytest.raises(ArtifactError, match="weights_only=True"):  # an object is refused, never unpickled
        TunedLens.load(copy_package(path, tmp_path / "pickle", state={**state, "0.weight": NotATensor()}), model)
    with pytest.raises(ArtifactError, match="holds neither a lensmat tuned lens .* nor a tuned-lens package lens"):
        TunedLens.load(tmp_path, model)
    with pytest.raises(ArtifactError, match="is not a folder"):
        TunedLens.load(tmp_path / "absent", model)


def test_cli_compare_reads_a_package_lens(tiny_gpt2, saved, tmp_path, capsys):
    from lensmat import cli

    _, folder, corpus = tiny_gpt2
    out = tmp_path / "cli"
    assert cli.main(["compare", "--model", str(folder), "--dataset", str(corpus), "--lenses", "logit,tuned",
                     "--tuned", str(saved[2]), "--max-eval-tokens", "300", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["fit_cost"]["tuned"] == {"seconds": 0.0, "tokens": 0, "reused": True}
    assert report["lenses"]["tuned"]["kl"][0] != report["lenses"]["logit"]["kl"][0]  # the package's translators
    assert "tuned" in capsys.readouterr().out

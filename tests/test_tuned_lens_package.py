"""Lenses saved by the `tuned-lens` package load into lensmat's TunedLens and read the same logits.

The package is not a lensmat dependency; CI installs it (`.ci/run`). Elsewhere these tests skip
with the install line, and with ``CI`` set a missing package is a failure.
"""

import json
import os

import pytest
import torch

from lensmat.collect import resid_hooks
from lensmat.io import ArtifactError
from lensmat.models import ModelMismatchError
from lensmat.tuned import TunedLens, package_unembed_hash

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


@torch.no_grad()
def test_a_package_lens_reads_the_same_logits_in_lensmat(tiny_gpt2, saved):
    model = tiny_gpt2[0]
    hf, theirs, path = saved
    ours = TunedLens.load(path, model)  # dispatches on config.json + params.pt
    assert ours.meta["format"] == "tuned-lens package" and ours.meta["provenance"]["source"] == str(path)
    assert json.loads((path / "config.json").read_text())["unembed_hash"] == package_unembed_hash(model)
    ids = torch.tensor([[0, 5, 9, 3, 17, 8, 2]])
    hidden = hf(ids, output_hidden_states=True).hidden_states  # the package reads HF hidden_states[l]
    L = int(model.cfg.n_layers)
    hooks = resid_hooks(L)
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n in hooks)
    for layer in range(L):
        expected = theirs(hidden[layer][0], layer)
        torch.testing.assert_close(ours(cache[hooks[layer]][0], layer), expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(ours(cache[hooks[layer]][0], layer), model(ids)[0], atol=1e-2)  # not the identity


def test_package_folders_that_do_not_fit_are_refused(tiny_gpt2, saved, tmp_path):
    from conftest import make_tiny_model

    _, _, path = saved
    with pytest.raises(ModelMismatchError, match="3 layers, d_model"):
        TunedLens.load(path, make_tiny_model(n_layers=2, d_model=16))
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((path / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "unembed_hash": "0" * 64}))
    with pytest.raises(ModelMismatchError, match="unembedding hash"):
        TunedLens.load(other, tiny_gpt2[0])
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="no params.pt"):
        TunedLens.load(other, tiny_gpt2[0])
    torch.save({"0.weight": torch.zeros(2, 2)}, other / "params.pt")
    with pytest.raises(ArtifactError, match="not the state dict of 3 translators"):
        TunedLens.load(other, tiny_gpt2[0])
    with pytest.raises(ArtifactError):
        TunedLens.load(tmp_path, tiny_gpt2[0])  # neither a lensmat folder nor a package one

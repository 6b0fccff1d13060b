"""Inputs that are not what they claim: model folders and GGUF files whose weights do not fill their
architecture, paths that are links, pipes or unreadable, and text cut at characters other than line feeds.
Tiny models and tmp_path only."""

import builtins
import io
import os
import pathlib
import re
import shutil

import pytest
import torch

import lensmat
from conftest import save_tiny_causal_lm, write_tiny_llama_gguf
from lensmat import data
from lensmat.models import ModelLoadError


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny Hugging Face GPT-2 folder (its checkpoint has no ``lm_head.weight``: tied to the embeddings)."""
    return save_tiny_causal_lm(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LENSMAT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def rewritten(folder, tmp_path, change):
    """A copy of ``folder`` whose safetensors checkpoint is ``change(state dict)``."""
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(folder, tmp_path / "copy")
    tensors = change(load_file(copy / "model.safetensors"))
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_tied_weights_are_not_missing(gpt2_folder):
    from safetensors import safe_open

    with safe_open(str(gpt2_folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = lensmat.load_model(gpt2_folder, device="cpu")
    assert torch.equal(model.W_U, model.W_E.T)


CHECKPOINTS = {  # a change to the checkpoint, and what the refusal names
    "renamed": (lambda sd: {"x." + k: v for k, v in sd.items()},
                r"none of its 41 tensors is in the checkpoint \(missing: lm_head.weight, transformer.h.0.attn.c_attn.bias.*"
                r"unexpected: x.transformer.h.0"),
    "no tensors": (lambda sd: {}, r"none of its 41 tensors is in the checkpoint \(missing: lm_head.weight"),
    "a block short": (lambda sd: {k: v for k, v in sd.items() if ".h.1." not in k},
                      r"12 of its 41 tensors are not in the checkpoint and would be random \(missing: "
                      r"transformer.h.1.attn.c_attn.bias, .* and 7 more\)"),
    "a block more": (lambda sd: sd | {"transformer.h.3.ln_1.weight": torch.ones(32)},
                     r"the checkpoint holds 1 tensor it has no place for, which would be dropped \(unexpected: transformer.h.3.ln_1.weight\)"),
    "wrong shape": (lambda sd: sd | {"transformer.ln_f.weight": torch.ones(7)},
                    r"1 would be random because the checkpoint.s have another shape \(transformer.ln_f.weight: \(7,\) there, \(32,\) expected\)"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_a_folder_whose_weights_do_not_fill_the_architecture_is_refused(gpt2_folder, tmp_path, case):
    change, names = CHECKPOINTS[case]
    folder = rewritten(gpt2_folder, tmp_path, change)
    with pytest.raises(ModelLoadError, match="does not fill its architecture, GPT2LMHeadModel: " + names) as err:
        lensmat.load_model(folder, device="cpu")
    assert str(folder) in str(err.value) and "--random-init SEED" in str(err.value)
    assert lensmat.load_model(folder, device="cpu", random_init=0).cfg.model_name.endswith("(random init, seed 0)")


def test_a_folder_without_weights_is_refused(gpt2_folder, tmp_path):
    folder = shutil.copytree(gpt2_folder, tmp_path / "copy")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no file named model.safetensors.*--random-init SEED"):
        lensmat.load_model(folder, device="cpu")


@pytest.mark.parametrize("kept", ["all but block 1", "none"])
def test_a_gguf_file_whose_tensors_do_not_fill_the_architecture_is_refused(tmp_path, cache, monkeypatch, kept):
    from gguf import GGUFWriter

    drop = (lambda name: name.startswith("blk.1.")) if kept == "all but block 1" else (lambda name: True)
    real = GGUFWriter.add_tensor
    with monkeypatch.context() as m:
        m.setattr(GGUFWriter, "add_tensor", lambda self, name, *a, **k: None if drop(name) else real(self, name, *a, **k))
        path = write_tiny_llama_gguf(tmp_path / "part.gguf")
    names = ("9 of its 21 tensors are not in the checkpoint and would be random \\(missing: model.layers.1."
             if kept == "all but block 1" else "none of its 21 tensors is in the checkpoint")
    with pytest.raises(ModelLoadError, match="part.gguf \\(architecture 'llama'.* does not fill its architecture, "
                                             "LlamaForCausalLM: " + names):
        lensmat.load_model(path, device="cpu")
    assert not list((cache / "gguf").iterdir())  # nothing half random is cached


def test_a_folder_named_like_a_gguf_file_is_named_a_folder(tmp_path, cache):
    (tmp_path / "model.gguf").mkdir()
    with pytest.raises(ModelLoadError, match="model.gguf is a folder; pass the path of a .gguf file"):
        lensmat.load_model(tmp_path / "model.gguf", device="cpu")


def special_paths(tmp_path, suffix=""):
    """``{kind: (path, the defect it is named by)}``: a symbolic-link loop, a broken link and a FIFO."""
    loop, broken, fifo = (tmp_path / f"{kind}{suffix}" for kind in ("loop", "broken", "fifo"))
    loop.symlink_to(loop)
    broken.symlink_to(tmp_path / "gone")
    os.mkfifo(fifo)
    return {"loop": (loop, "is a symbolic-link loop"),
            "broken": (broken, f"is a broken symbolic link \\(to {re.escape(str(tmp_path / 'gone'))}, which does not exist\\)"),
            "fifo": (fifo, r"is a named pipe \(FIFO\)")}


def never_opened(monkeypatch, path):
    """Fail at once if ``path`` is opened (a FIFO would block the test)."""
    real = io.open

    def guarded(file, *args, **kwargs):
        assert str(file) != str(path), f"{path} was opened"
        return real(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", guarded)
    monkeypatch.setattr(builtins, "open", guarded)


@pytest.mark.parametrize("kind", ["loop", "broken", "fifo"])
@pytest.mark.parametrize("suffix", ["", ".gguf"])
def test_model_paths_that_cannot_hold_a_model_are_named_not_blamed_on_the_hub(tmp_path, monkeypatch, kind, suffix):
    path, defect = special_paths(tmp_path, suffix)[kind]
    never_opened(monkeypatch, path)
    with pytest.raises(ModelLoadError, match=f"{re.escape(str(path))} {defect}; pass a model folder, a .gguf file or a hub name"):
        lensmat.load_model(path, device="cpu")


def test_a_path_in_a_folder_that_may_not_be_entered_is_named(tmp_path, monkeypatch):
    path = tmp_path / "closed" / "model"
    real = os.stat

    def stat(p, *args, **kwargs):  # tests run as root, which may enter any folder
        if os.fspath(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    defect = r"is in a folder you may not enter \(permission denied; check the folders above it\)"
    with pytest.raises(ModelLoadError, match=f"{re.escape(str(path))} {defect}; pass a model folder"):
        lensmat.load_model(path, device="cpu")
    with pytest.raises(data.CorpusError, match=f"Corpus file {re.escape(str(path))} {defect}; pass a regular .txt file"):
        data.load_lines(path, "all")


@pytest.mark.parametrize("kind", ["folder", "gguf"])
def test_an_unreadable_model_folder_or_file_is_refused(gpt2_folder, tmp_path, monkeypatch, kind):
    path = gpt2_folder if kind == "folder" else write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    real = os.access  # tests run as root, which may read anything
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.fspath(p) != str(path) and real(p, mode, **kw))
    with pytest.raises(ModelLoadError, match=f"{re.escape(str(path))} cannot be read \\(permission denied\\); make it readable"):
        lensmat.load_model(path, device="cpu")


def test_documents_are_split_on_line_feeds_only(tmp_path):
    inside = ["a\u2028b", "c\u2029d", "e\x85f", "g\x0ch", "i\x0bj", "k\x1cl", "m\x1dn", "o\x1eo", "p\rq"]
    f = tmp_path / "c.txt"
    f.write_bytes(("\r\n".join(f"{i}\tdoc {text}" for i, text in enumerate(inside)) + "\nlast\r\n").encode())
    assert data.load_lines(f, "all") == [f"doc {text}" for text in inside] + ["last"]


@pytest.mark.parametrize("kind", ["folder", "loop", "broken", "fifo"])
def test_corpus_paths_that_are_not_files_get_their_own_message(tmp_path, monkeypatch, kind):
    if kind == "folder":
        path, message = tmp_path, f"Corpus path {re.escape(str(tmp_path))} is a folder, not a file; pass the path of a .txt file"
    else:
        path, defect = special_paths(tmp_path)[kind]
        message = f"Corpus file {re.escape(str(path))} {defect}; pass a regular .txt file"
    never_opened(monkeypatch, path)
    with pytest.raises(data.CorpusError, match=message):
        data.load_lines(path, "all")


def test_a_broken_link_named_like_a_dataset_is_a_broken_link(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pathlib.Path("corpus").symlink_to("gone.txt")
    with pytest.raises(data.CorpusError, match=r"Corpus file corpus is a broken symbolic link \(to gone.txt"):
        data.load_lines("corpus", "all")


def test_an_unreadable_corpus_file_is_refused(tmp_path, monkeypatch):
    f = tmp_path / "c.txt"
    f.write_text("one\ntwo\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    with pytest.raises(data.CorpusError, match=f"Corpus file {re.escape(str(f))} cannot be read \\(permission denied\\); make it readable"):
        data.load_lines(f, "all")

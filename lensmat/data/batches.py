"""Tokenization, padded batches and the positions that are scored (:class:`Scoring`, :class:`Masking`).

Tokenization prepends BOS and truncates to ``max_length`` tokens (BOS included). Batches are
right-padded; :class:`Batch` carries the masks that every later statistic and metric uses:

- ``attention_mask[b, t]``: the token is real (not padding).
- ``score_mask[b, t]``: real and not the BOS position (t ≥ 1; t ≥ 0 for a batch built with
  ``has_bos=False``). Lens-vs-model metrics and all fitted statistics use these positions.
- ``target_mask[b, t]``: ``score_mask`` and a next token exists, so cross-entropy against
  ``tokens[b, t + 1]`` is defined.

Causal models can be scored the way "Jump to Conclusions" scored GPT-2 (:class:`Scoring`):
without BOS (position 0 is then a real, scored token) and/or at one random position per line
instead of every position, for fitting and scoring alike. The position, like the masked one below,
depends only on the seed and the line's tokens.

Masked language models (BERT family) use the *masked protocol* instead (:class:`Masking`):
lines are tokenized with the tokenizer's own special tokens (``[CLS] … [SEP]``), ``n_mask``
random non-special positions per line are replaced by ``[MASK]``, and those positions alone
are scored: ``score_mask`` = ``target_mask`` = the masked positions, and the target there is
the original token (``Batch.labels``). The positions depend only on the seed and the line's
tokens, so they are the same whatever the batch size, order or sharding.
"""

from __future__ import annotations

import dataclasses
import math
import random
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from jaxtyping import Bool, Int

from lensmat.data.corpora import DEFAULT_MAX_LENGTH, CorpusError


@dataclass
class Batch:
    """A right-padded batch of tokenized lines (see module docstring for the masks).

    A masked-protocol batch also has ``labels``: the original tokens, ``-100`` everywhere but at
    the masked positions (whose ``tokens`` hold the ``[MASK]`` id). A batch from :func:`batches`
    has ``lines``: the index in its ``seqs`` of each row (lines with nothing to score are skipped).
    """

    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Bool[torch.Tensor, "batch pos"]
    has_bos: bool = True  # False: position 0 is a real token and is scored too
    labels: Int[torch.Tensor, "batch pos"] | None = None
    selected: Bool[torch.Tensor, "batch pos"] | None = None  # Scoring(positions="one-random"): the scored positions
    lines: tuple[int, ...] | None = None

    @property
    def is_masked(self) -> bool:
        return self.labels is not None

    @property
    def score_mask(self) -> Bool[torch.Tensor, "batch pos"]:
        if self.is_masked:
            return (self.labels != IGNORE) & self.attention_mask
        if self.selected is not None:
            return self.selected & self.attention_mask
        mask = self.attention_mask.clone()
        if self.has_bos:
            mask[:, 0] = False
        return mask

    @property
    def target_mask(self) -> Bool[torch.Tensor, "batch pos"]:
        if self.is_masked:
            return self.score_mask
        nxt = torch.zeros_like(self.attention_mask)
        nxt[:, :-1] = self.attention_mask[:, 1:]
        return self.score_mask & nxt

    @property
    def targets(self) -> Int[torch.Tensor, "batch pos"]:
        """The token each position is scored against: the original token at a masked position
        (masked protocol), else the next token (0 where there is none; see ``target_mask``)."""
        if self.is_masked:
            return self.labels.clamp_min(0)
        nxt = torch.zeros_like(self.tokens)
        nxt[:, :-1] = self.tokens[:, 1:]
        return nxt

    @property
    def n_scored(self) -> int:
        return int(self.score_mask.sum())

    @property
    def scored_lines(self) -> Int[torch.Tensor, "n"]:
        """The line (``lines``) of each scored position, in ``score_mask`` order: the document the
        intervals resample (``ValueError`` for a batch without ``lines``: see :func:`numbered`)."""
        if self.lines is None:
            raise ValueError("The batch does not say which document (corpus line) each row is (Batch.lines), which "
                             "the intervals resample; number your batches with lensmat.data.batches.numbered(batches).")
        mask = self.score_mask.cpu()
        return torch.tensor(self.lines, dtype=torch.long)[torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]]

    def every_position(self) -> "Batch":
        """The same inputs (a masked LM's ``[MASK]`` tokens in place) scored at every real position,
        ``[CLS]``/``[SEP]``/BOS included: the positions a swapped module or block map replaces, so
        the positions to fit such maps on."""
        return Batch(self.tokens, self.attention_mask, has_bos=False, lines=self.lines)

    def to(self, device: torch.device | str) -> "Batch":
        labels = None if self.labels is None else self.labels.to(device)
        selected = None if self.selected is None else self.selected.to(device)
        return Batch(self.tokens.to(device), self.attention_mask.to(device), self.has_bos, labels, selected, self.lines)


IGNORE = -100  # label of an unmasked position (the Hugging Face convention)


@dataclass(frozen=True)
class Masking:
    """The masked protocol: ``n_mask`` random non-special positions per line become ``mask_id``.

    ``special_ids`` are never masked (``[CLS]``, ``[SEP]``, ``[PAD]``, ...). A line with fewer
    maskable tokens than ``n_mask`` has all of them masked; one with none is skipped.
    """

    mask_id: int
    special_ids: frozenset[int]
    n_mask: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_mask < 1:
            raise CorpusError(f"n_mask must be at least 1 masked position per line, got {self.n_mask}.")

    @classmethod
    def for_tokenizer(cls, tokenizer, n_mask: int = 1, seed: int = 0) -> "Masking":
        """The masking of a Hugging Face tokenizer's ``[MASK]`` token and special tokens."""
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise CorpusError("The tokenizer has no mask token, so the masked protocol cannot run; "
                              "set tokenizer.mask_token (e.g. '[MASK]') or use a causal model.")
        return cls(int(tokenizer.mask_token_id), frozenset(int(i) for i in tokenizer.all_special_ids), n_mask, seed)

    def positions(self, seq: Sequence[int], limit: int | None = None) -> list[int]:
        """Sorted positions of ``seq`` to mask (at most ``limit``): a function of the seed and the tokens."""
        return _choose(seq, [t for t, tok in enumerate(seq) if tok not in self.special_ids], self.n_mask, self.seed,
                       limit)

    def count(self, seqs: Sequence[Sequence[int]]) -> int:
        """Scored (masked) positions over ``seqs``."""
        return sum(len(self.positions(s)) for s in seqs)


def _choose(seq: Sequence[int], candidates: list[int], k: int, seed: int, limit: int | None) -> list[int]:
    """``min(k, limit)`` sorted positions among ``candidates``, a function of ``seed`` and the tokens only."""
    k = min(k, len(candidates), k if limit is None else limit)
    rng = random.Random(f"{seed}:{' '.join(map(str, seq))}")  # str seeds go through SHA-512: same everywhere
    return sorted(rng.sample(candidates, k))


POSITIONS = ("all", "one-random")


@dataclass(frozen=True)
class Scoring:
    """Which positions of a causal model's lines are fitted and scored.

    ``positions="all"`` (default): every token after BOS; ``"one-random"``: one position per line,
    chosen from ``seed`` and the line's tokens (the "Jump to Conclusions" protocol). ``bos=False``
    feeds lines without BOS, so position 0 is a real token and can be scored (the paper's GPT-2
    inputs, and the released maps, have no BOS).
    """

    positions: str = "all"
    bos: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise CorpusError(f"Unknown positions {self.positions!r}; valid: {', '.join(POSITIONS)}.")

    @property
    def is_default(self) -> bool:
        return self == Scoring()

    def chosen(self, seq: Sequence[int], limit: int | None = None) -> list[int] | None:
        """The scored positions of ``seq`` under ``one-random`` (at most ``limit``); ``None`` for ``all``."""
        if self.positions == "all":
            return None
        return _choose(seq, list(range(int(self.bos), len(seq))), 1, self.seed, limit)

    def count(self, seqs: Sequence[Sequence[int]]) -> int:
        """Scored positions over tokenized ``seqs``."""
        if self.positions == "all":
            return sum(len(s) - int(self.bos) for s in seqs)
        return sum(len(self.chosen(s)) for s in seqs)

    def to_dict(self) -> dict:
        return {"positions": self.positions, "bos": self.bos, "seed": self.seed}


def bos_token_id(tokenizer) -> int:
    """The BOS id of a Hugging Face tokenizer (falls back to EOS, as GPT-2 shares one token)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise CorpusError("The tokenizer has neither a BOS nor an EOS token; set tokenizer.bos_token.")
    return int(tid)


def tokenize(lines: Sequence[str], tokenizer, max_length: int = DEFAULT_MAX_LENGTH, bos: bool = True) -> list[list[int]]:
    """Token ids per line: BOS (unless ``bos=False``), then the line's tokens, truncated to
    ``max_length`` in all.

    Lines longer than that are truncated, with one warning that counts them.
    """
    if max_length < 1 + int(bos):
        raise CorpusError(f"max_length must be at least {1 + int(bos)} ({'BOS and ' if bos else ''}one token), "
                          f"got {max_length}.")
    return _framed(lines, tokenizer, max_length, [bos_token_id(tokenizer)] if bos else [], [])


def tokenize_with_specials(lines: Sequence[str], tokenizer, max_length: int = DEFAULT_MAX_LENGTH) -> list[list[int]]:
    """Token ids per line in the masked-LM layout ``[CLS] line [SEP]`` (``<s> … </s>`` for RoBERTa),
    at most ``max_length`` in all: the masked protocol's tokenization (:func:`tokenize` is the
    causal one). The ids come from ``tokenizer.cls_token_id`` / ``sep_token_id``, not from the
    tokenizer's post-processor, which TransformerBridge may have changed."""
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is None or sep is None:
        raise CorpusError("The masked protocol needs the tokenizer's [CLS] and [SEP] tokens, but "
                          f"cls_token_id={cls} and sep_token_id={sep}; set tokenizer.cls_token / sep_token.")
    if max_length < 3:
        raise CorpusError(f"max_length must be at least 3 ([CLS], one token, [SEP]), got {max_length}.")
    return _framed(lines, tokenizer, max_length, [int(cls)], [int(sep)])


def _framed(lines: Sequence[str], tokenizer, max_length: int, head: list[int], tail: list[int]) -> list[list[int]]:
    """``head + line's tokens + tail`` per line, the tokens cut so that each is at most ``max_length``;
    one warning (pointing at the caller's caller) counts the lines that were cut."""
    body = max_length - len(head) - len(tail)
    out, n_cut = [], 0
    for ids in tokenizer(list(lines), add_special_tokens=False)["input_ids"]:
        n_cut += len(ids) > body
        out.append(head + list(ids[:body]) + tail)
    if n_cut:
        warnings.warn(f"{n_cut} of {len(out)} lines were longer than max_length={max_length} tokens and were "
                      "truncated.", stacklevel=3)
    return out


def pad(seqs: Sequence[Sequence[int]], pad_id: int = 0, has_bos: bool = True,
        masked: Sequence[Sequence[int]] | None = None, mask_id: int | None = None,
        selected: Sequence[Sequence[int]] | None = None) -> Batch:
    """Right-pad token sequences into a :class:`Batch` (``has_bos=False``: position 0 is scored too).

    ``masked[i]`` lists positions of line ``i`` to replace by ``mask_id`` (the masked protocol;
    the batch then carries ``labels``); ``selected[i]``, the only positions of line ``i`` to score.
    """
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    if masked is None:
        chosen = None
        if selected is not None:
            chosen = torch.zeros_like(mask)
            for i, positions in enumerate(selected):
                chosen[i, list(positions)] = True
        return Batch(tokens, mask, has_bos, selected=chosen)
    labels = torch.full_like(tokens, IGNORE)
    for i, positions in enumerate(masked):
        labels[i, positions] = tokens[i, positions]
        tokens[i, positions] = mask_id
    return Batch(tokens, mask, False, labels)


def batches(
    seqs: Sequence[Sequence[int]],
    batch_size: int,
    max_tokens: int | None = None,
    masking: Masking | None = None,
    pad_id: int = 0,
    scoring: Scoring | None = None,
) -> Iterator[Batch]:
    """Batches of ``batch_size`` sequences in corpus order, stopping once ``max_tokens`` scored
    positions have been yielded: non-BOS, non-padding tokens (the last sequence may be cut to fit),
    with ``scoring`` its positions (:class:`Scoring`), or with ``masking`` the masked positions (the
    last line may get fewer of them). Each batch's ``lines`` are the indices of its rows in ``seqs``."""
    if batch_size < 1:
        raise CorpusError(f"batch_size must be at least 1, got {batch_size}.")
    scoring = scoring or Scoring()
    has_bos = scoring.bos and masking is None
    budget = math.inf if max_tokens is None else max_tokens
    chunk: list[Sequence[int]] = []
    chosen: list[list[int]] = []
    lines: list[int] = []
    for line, seq in enumerate(seqs):
        if budget <= 0:
            break
        limit = None if math.isinf(budget) else int(budget)
        positions = masking.positions(seq, limit) if masking is not None else scoring.chosen(seq, limit)
        if positions is not None:
            if not positions:
                continue
            chosen.append(positions)
            budget -= len(positions)
        else:
            if len(seq) - has_bos > budget:
                seq = seq[: int(budget) + has_bos]
            budget -= len(seq) - has_bos
        chunk.append(seq)
        lines.append(line)
        if len(chunk) == batch_size:
            yield _padded(chunk, chosen, lines, masking, scoring, pad_id)
            chunk, chosen, lines = [], [], []
    if chunk:
        yield _padded(chunk, chosen, lines, masking, scoring, pad_id)


def _padded(chunk, chosen, lines: list[int], masking: Masking | None, scoring: Scoring, pad_id: int) -> Batch:
    if masking is not None:
        batch = pad(chunk, pad_id, masked=chosen, mask_id=masking.mask_id)
    else:
        batch = pad(chunk, pad_id, has_bos=scoring.bos, selected=chosen if scoring.positions != "all" else None)
    batch.lines = tuple(lines)
    return batch


def numbered(batches: Iterable[Batch]) -> Iterator[Batch]:
    """``batches`` with ``lines`` set where missing (e.g. built with :func:`pad`): each row a document of
    its own, numbered on from the largest line index seen so far, so no two rows share a document."""
    next_line = 0
    for batch in batches:
        if batch.lines is None:
            batch = dataclasses.replace(batch, lines=tuple(range(next_line, next_line + batch.tokens.shape[0])))
        next_line = max(next_line, max(batch.lines, default=-1) + 1)
        yield batch


def count_tokens(seqs: Sequence[Sequence[int]], masking: Masking | None = None, scoring: Scoring | None = None) -> int:
    """Scored positions in tokenized lines: every token but the BOS, the positions of ``scoring``,
    or the masked positions."""
    return masking.count(seqs) if masking is not None else (scoring or Scoring()).count(seqs)

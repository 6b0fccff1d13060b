"""Text -> fitted maps in one call: the steps every command shares.

``fit_maps(model, dataset)`` tokenizes the ``train`` split, streams it through the model into
float64 statistics of the residual layers ``h_0..h_L`` and solves the maps; the result is a
:class:`~lensmat.stats.fit.MapSet` with its provenance, ready for :class:`~lensmat.lenses.base.MatLens`
or :func:`lensmat.stats.artifacts.save_maps`.

A masked LM (:func:`~lensmat.models.bridge.is_masked_lm`) gets the masked protocol throughout: lines
are ``[CLS] line [SEP]``, ``n_mask`` random positions per line become ``[MASK]``
(:class:`~lensmat.data.batches.Masking`) and only those positions are collected, fitted and scored.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lensmat import data
from lensmat.deprecation import renamed
from lensmat.stats.collect import collect, resid_hooks, site_hooks
from lensmat.stats.gram import GramStats, pair_pattern
from lensmat.stats.fit import MapSet, fit_pairs, layer_pairs
from lensmat.models.gguf import file_sha256
from lensmat.models import describe, is_masked_lm


@dataclass
class Tokenized:
    """Token sequences of one corpus split, with where they came from; ``masking`` is set for the
    masked protocol (then only masked positions are scored), ``scoring`` for a causal model read
    without BOS or at one random position per line (:class:`~lensmat.data.batches.Scoring`)."""

    seqs: list[list[int]]
    dataset: str
    split: str
    max_length: int
    masking: data.Masking | None = None
    pad_id: int = 0
    scoring: data.Scoring = data.Scoring()

    def batches(self, batch_size: int, max_tokens: int | None = None):
        return data.batches(self.seqs, batch_size, max_tokens, self.masking, self.pad_id, self.scoring)

    def replaced_batches(self, batch_size: int, max_tokens: int | None = None):
        """The batches to fit the maps of a swapped module or pruned block on: :meth:`batches` for a
        causal model; for a masked LM the lines holding the first ``max_tokens`` masked positions at
        every real position (:meth:`~lensmat.data.batches.Batch.every_position`), since a swap replaces them all."""
        batches = self.batches(batch_size, max_tokens)
        return batches if self.masking is None else (b.every_position() for b in batches)

    def shard(self, rank: int, world_size: int) -> "Tokenized":
        """Lines ``rank::world_size``: this rank's share of a data-parallel run."""
        return replace(self, seqs=self.seqs[rank::world_size])

    def n_tokens(self, max_tokens: int | None = None) -> int:
        total = data.count_tokens(self.seqs, self.masking, self.scoring)
        return total if max_tokens is None else min(total, max_tokens)

    def identity(self) -> dict:
        """What shapes statistics collected on these tokens: :meth:`provenance`, the corpus file's
        path, size and SHA-256 when the dataset is a local file, and the SHA-256 of the token ids."""
        out = self.provenance()
        path = Path(self.dataset)
        if path.is_file():
            out["file"] = {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": file_sha256(path)}
        digest = hashlib.sha256()
        for seq in self.seqs:
            digest.update(np.asarray(seq, dtype=np.int64).tobytes() + b"|")
        out["tokens_sha256"] = digest.hexdigest()
        return out

    def max_batch_tokens(self, batch_size: int) -> int:
        """An upper bound on the positions one batch captures: the ``batch_size`` longest lines."""
        return sum(sorted((len(s) for s in self.seqs), reverse=True)[:batch_size])

    def provenance(self) -> dict:
        """Where the tokens came from, for artifacts and reports (the masking too, when used)."""
        out = {"dataset": self.dataset, "split": self.split, "max_length": self.max_length}
        if self.masking is not None:
            out["masking"] = {"n_mask": self.masking.n_mask, "seed": self.masking.seed}
        if not self.scoring.is_default:
            out["scoring"] = self.scoring.to_dict()
        return out


def encode(model, lines, max_length: int, bos: bool = True) -> list[list[int]]:
    """Token ids of ``lines`` as the model reads them: BOS + line (causal; no BOS with ``bos=False``),
    ``[CLS] line [SEP]`` (masked LM)."""
    if getattr(model, "tokenizer", None) is None:
        if getattr(getattr(model, "cfg", None), "modality", None) == "vision":  # lensmat.models.vision
            raise ValueError(f"{model.cfg.model_name} is a ViT image classifier: lensmat reads it with `lensmat saturation` "
                             "(lensmat.saturation) only, on images (docs/modalities.md).")
        raise ValueError("The model has no tokenizer; pass token batches to the lower-level API instead.")
    if is_masked_lm(model):
        return data.tokenize_with_specials(lines, model.tokenizer, max_length)
    return data.tokenize(lines, model.tokenizer, max_length, bos=bos)


def _split(rows: list, split: str) -> list:
    """The ``split`` of rows given in memory, by the same 70/30 rule as a corpus's lines."""
    n_train = math.floor(data.TRAIN_FRACTION * len(rows))
    chosen = {"train": rows[:n_train], "heldout": rows[n_train:], "all": rows}[split]
    if not chosen:
        raise data.CorpusError(f"Split {split!r} of the {len(rows)} sequences given is empty; give more or use "
                               "split='all'.")
    return chosen


def _token_rows(ids: torch.Tensor, model) -> list[list[int]]:
    """Rows of a token-id tensor (``[pos]`` or ``[batch, pos]``, as the model reads them), checked."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() not in (1, 2) or ids.numel() == 0:
        raise ValueError(f"Token ids must be a non-empty integer tensor [pos] or [batch, pos]; got {ids.dtype} "
                         f"{list(ids.shape)}.")
    vocab = int(model.cfg.d_vocab)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"Token ids must lie in [0, {vocab}) for {model.cfg.model_name!r}; got "
                         f"[{int(ids.min())}, {int(ids.max())}].")
    return [row.tolist() for row in ids.reshape(-1, ids.shape[-1]).cpu()]


def tokenized(model, dataset=None, split: str = "train",
              max_length: int = data.DEFAULT_MAX_LENGTH, *, n_mask: int = 1, mask_seed: int = 0,
              scoring: data.Scoring | None = None) -> Tokenized:
    """Lines of ``dataset``'s ``split`` tokenized with the model's tokenizer (BOS prepended unless
    ``scoring`` says otherwise); for a masked LM, with the masked protocol (``n_mask`` positions
    per line, chosen with ``mask_seed``).

    ``dataset``: a corpus spec (``None``: the bundled corpus; see :mod:`lensmat.data.corpora`), a
    list of strings, a ``datasets.Dataset``, or token ids (``[pos]`` or ``[batch, pos]``, as the
    model reads them: BOS included, no padding). Text given in memory is split 70/30 like a file's
    lines; pass ``split="all"`` to use every row."""
    scoring = scoring or data.Scoring()
    if is_masked_lm(model) and not scoring.is_default:
        raise ValueError("A masked LM is scored at its [MASK] positions (the masked protocol); --positions and "
                         "--no-bos apply to causal models only.")
    max_length = min(max_length, int(model.cfg.n_ctx))
    if isinstance(dataset, torch.Tensor):
        rows = _token_rows(dataset, model)
        seqs, spec = [r[:max_length] for r in _split(rows, split)], f"<{len(rows)} token sequences>"
    else:
        seqs = encode(model, data.load_lines(dataset, split), max_length, bos=scoring.bos)
        spec = data.describe_spec(dataset)
    if not is_masked_lm(model):
        return Tokenized(seqs, spec, split, max_length, scoring=scoring)
    masking = data.Masking.for_tokenizer(model.tokenizer, n_mask, mask_seed)
    return Tokenized(seqs, spec, split, max_length, masking, int(model.tokenizer.pad_token_id or 0))


def checkpoint_path(checkpoint, rank: int = 0, world_size: int = 1):
    """The exact checkpoint folder of one rank: ``checkpoint`` itself, or ``checkpoint.rank{r}`` in a
    data-parallel run (``None`` stays ``None``)."""
    return checkpoint if checkpoint is None or world_size == 1 else f"{checkpoint}.rank{rank}"


def collect_layer_stats(model, corpus: Tokenized, *, max_tokens: int | None = None, batch_size: int = 16,
                        pairs: str = "to_last", progress: bool = True, checkpoint=None, checkpoint_every: int = 50,
                        resume: bool = False, stats_device: str | None = None,
                        sites: tuple[str, ...] = ("post",)) -> GramStats:
    """Statistics of ``h_0..h_L`` over (up to ``max_tokens`` scored tokens of) ``corpus``, keeping the
    layer pairs of ``pairs`` (``"to_last"``, ``"adjacent"`` or ``"all"``: :func:`~lensmat.stats.gram.pair_pattern`;
    see :func:`~lensmat.stats.collect.collect` for checkpoints and resuming). With ``"mid"`` in ``sites``
    the group is ``[resid_mid_0..resid_mid_{L-1}, h_0..h_L]`` (maps to ``h_L`` only: ``pairs="to_last"``)."""
    from lensmat.stats.distributed import all_reduce_stats, rank_and_world

    hooks = resid_hooks(int(model.cfg.n_layers))
    if "mid" in sites:
        if pairs != "to_last":
            raise ValueError(f"The mid site is fitted to the last layer only (pairs='to_last', not {pairs!r}); "
                             "drop --all-pairs or the mid site.")
        hooks = site_hooks(int(model.cfg.n_layers), "mid") + hooks
    rank, world = rank_and_world()
    if world > 1:  # each rank its share of lines (and of the token cap), then sum the statistics
        corpus = corpus.shard(rank, world)
        max_tokens = None if max_tokens is None else max_tokens // world + (rank < max_tokens % world)
        checkpoint = checkpoint_path(checkpoint, rank, world)
    identity = None if checkpoint is None else {
        "model": describe(model).to_dict(), "corpus": corpus.identity(), "batch_size": batch_size,
        "max_tokens": max_tokens, "sites": list(sites), "pairs": pairs, "rank": rank, "world_size": world}
    stats = collect(model, corpus.batches(batch_size, max_tokens), [hooks], pairs=[pair_pattern(len(hooks), pairs)],
                    total_tokens=corpus.n_tokens(max_tokens),
                    progress=progress and rank == 0, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                    resume=resume, stats_device=stats_device or "cpu", identity=identity)
    return all_reduce_stats(stats)[0]


def maps_from_stats(model, stats: GramStats | list[GramStats], corpus: Tokenized, *, pairs=None,
                    intercept: bool = False, ridge: float = 0.0, all_pairs: bool = False,
                    seconds: float | None = None) -> MapSet:
    """Solve maps from statistics and attach the model identity and provenance.

    ``pairs`` defaults to the residual pairs of a single ``resid_hooks(L)`` group
    (:func:`~lensmat.stats.fit.layer_pairs` with ``all_pairs``).
    """
    stats = [stats] if isinstance(stats, GramStats) else list(stats)
    pairs = layer_pairs(stats[0].hooks, all_pairs) if pairs is None else list(pairs)
    start = time.perf_counter()
    maps = fit_pairs(stats, pairs, intercept=intercept, ridge=ridge)
    provenance = {
        **corpus.provenance(),
        "n_tokens": stats[0].n, "groups": [list(st.hooks) for st in stats], "all_pairs": all_pairs,
        "fit_seconds": (seconds or 0.0) + time.perf_counter() - start,
    }
    return MapSet(maps, describe(model).to_dict(), intercept, ridge, provenance)


@renamed(max_tokens="max_fit_tokens")
def fit_maps(model, dataset=None, *, split: str = "train", max_fit_tokens: int | None = None,
             batch_size: int = 16, max_length: int = data.DEFAULT_MAX_LENGTH, intercept: bool = False,
             ridge: float = 0.0, all_pairs: bool = False, progress: bool = True, checkpoint=None,
             checkpoint_every: int = 50, resume: bool = False, n_mask: int = 1, mask_seed: int = 0,
             scoring: data.Scoring | None = None, stats_device: str | None = None,
             memory_limit: int | None = None) -> MapSet:
    """Fit the residual maps ``h_l -> h_L`` (and every ``l < l'`` with ``all_pairs``) on a corpus split,
    from at most ``max_fit_tokens`` scored tokens (the name every command uses; ``max_tokens`` still works).
    ``dataset``: anything :func:`tokenized` takes (a spec, a list of strings, a ``datasets.Dataset``,
    token ids).

    A masked LM is fitted on its masked positions only (``n_mask`` per line, ``mask_seed``); a
    causal model on the positions of ``scoring`` (default: every token after BOS).
    With ``checkpoint`` (a folder) the statistics are saved every ``checkpoint_every`` batches;
    ``resume=True`` continues from it (same maps as an uninterrupted run). The memory plan
    (:mod:`lensmat.stats.plan`) is printed with ``progress`` and checked first: ``stats_device`` holds the
    statistics, ``memory_limit`` (bytes) replaces the free memory in that check.

    Example::

        model = lensmat.load_model()
        maps = lensmat.fit_maps(model, max_fit_tokens=50_000)
        lens = lensmat.MatLens(model, maps)
    """
    from lensmat.stats.plan import check_memory

    corpus = tokenized(model, dataset, split, max_length, n_mask=n_mask, mask_seed=mask_seed, scoring=scoring)
    check_memory(model, "fit", corpus, all_pairs=all_pairs, batch_size=batch_size, stats_device=stats_device,
                 memory_limit=memory_limit, progress=progress)
    start = time.perf_counter()
    stats = collect_layer_stats(model, corpus, max_tokens=max_fit_tokens, batch_size=batch_size,
                                pairs="all" if all_pairs else "to_last", progress=progress, checkpoint=checkpoint,
                                checkpoint_every=checkpoint_every, resume=resume, stats_device=stats_device)
    return maps_from_stats(model, stats, corpus, intercept=intercept, ridge=ridge, all_pairs=all_pairs,
                           seconds=time.perf_counter() - start)

"""Data: text -> lines -> tokens -> padded batches, and which positions are scored.

The bottom layer with :mod:`lensmat.models` (it imports only ``lensmat.models.load.path_defect``,
to name what is wrong with a path). :mod:`lensmat.data.corpora`: corpus specs and the train /
heldout splits (:func:`load_lines`); :mod:`lensmat.data.batches`: tokenization, :class:`Batch`
and its masks, :class:`Scoring` (the paper's GPT-2 protocol) and :class:`Masking` (the masked-LM
protocol). The map of the layers: ``docs/modules.md``.
"""

from lensmat.data.batches import (IGNORE, POSITIONS, Batch, Masking, Scoring, batches, bos_token_id, count_tokens,
                                  numbered, pad, tokenize, tokenize_with_specials)
from lensmat.data.corpora import DEFAULT_CORPUS, DEFAULT_MAX_LENGTH, SPLITS, TRAIN_FRACTION, CorpusError, bundled_corpus_path, describe_spec, is_in_memory, load_lines

__all__ = ["DEFAULT_CORPUS", "DEFAULT_MAX_LENGTH", "IGNORE", "POSITIONS", "SPLITS", "TRAIN_FRACTION", "Batch",
           "CorpusError", "Masking", "Scoring", "batches", "bos_token_id", "bundled_corpus_path", "count_tokens", "describe_spec", "is_in_memory",
           "load_lines", "numbered", "pad", "tokenize", "tokenize_with_specials"]

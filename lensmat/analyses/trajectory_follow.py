"""The followed token of a :func:`~lensmat.analyses.trajectory.trajectory` (``targets=``): which token
each prompt follows, and its rank, probability and log-probability in one lens's distribution.

A target is a token string (encoded with the model's tokenizer, no special tokens; it must be
exactly one token) or a token id; :func:`resolve_targets` takes one for every prompt or one per
prompt.
"""

from __future__ import annotations

import numpy as np

FOLLOW = ("follow_rank", "follow_prob", "follow_logprob")


def encode_target(model, target) -> int:
    """The token id of one target: a token id in ``0..d_vocab-1``, or a string that the model's
    tokenizer encodes (without BOS or other special tokens) as exactly one token."""
    d_vocab = int(model.cfg.d_vocab)
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if not 0 <= int(target) < d_vocab:
            raise ValueError(f"Target token id {int(target)} is outside the vocabulary 0..{d_vocab - 1}.")
        return int(target)
    if not isinstance(target, str):
        raise TypeError(f"A target is a token string or a token id, got {type(target).__name__} ({target!r}).")
    ids = [int(i) for i in model.tokenizer.encode(target, add_special_tokens=False)]
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        hint = (f" ids {ids} = {pieces}; follow one of them by its id, e.g. targets={ids[0]}" if ids
                else "; pass a word of the vocabulary (with its leading space) or a token id")
        raise ValueError(f"targets={target!r} is {len(ids)} tokens, not one: the model's tokenizer reads it as"
                         f"{hint}.")
    return ids[0]


def resolve_targets(model, targets, n_prompts: int) -> list[int | None]:
    """One followed token id per prompt (``None`` each when ``targets`` is None): ``targets`` is one
    target for every prompt, or a list or tuple of one target per prompt."""
    if targets is None:
        return [None] * n_prompts
    if isinstance(targets, (list, tuple)):
        if len(targets) != n_prompts:
            raise ValueError(f"targets= lists {len(targets)} target(s) for {n_prompts} prompt(s); pass one per "
                             "prompt, or one token string or id for all of them.")
        return [encode_target(model, t) for t in targets]
    return [encode_target(model, targets)] * n_prompts

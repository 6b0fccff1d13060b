"""Metrics on scored positions, streamed over batches.

Units: cross-entropy, surprisal and KL in nats per token. Positions follow
:mod:`lensmat.data`: lens-vs-model metrics use ``score_mask`` (non-padding, not BOS);
cross-entropy against the text uses the positions that have a next token.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from jaxtyping import Float, Int

from lensmat.data import Batch

LogitsFn = Callable[[Int[torch.Tensor, "batch pos"]], Float[torch.Tensor, "batch pos vocab"]]


@torch.no_grad()
def next_token_quality(logits_fn: LogitsFn, batches: Iterable[Batch]) -> dict:
    """Language-model quality on a corpus: ``{"ce", "top1_accuracy", "tokens"}``.

    Every real token but the BOS is a target (the first word, predicted from BOS, counts). Right
    padding never changes a causal model's outputs at real positions, so no attention mask is
    passed to ``logits_fn``.
    """
    loss_sum = correct = n = 0.0
    for batch in batches:
        logits = logits_fn(batch.tokens)[:, :-1].float()
        targets = batch.tokens[:, 1:].to(logits.device)
        mask = batch.attention_mask[:, 1:].to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        loss_sum += float(loss[mask].sum())
        correct += float((logits.argmax(-1) == targets)[mask].sum())
        n += float(mask.sum())
    if n == 0:
        raise ValueError("No target tokens to score: every line is empty after BOS.")
    return {"ce": loss_sum / n, "top1_accuracy": correct / n, "tokens": int(n)}

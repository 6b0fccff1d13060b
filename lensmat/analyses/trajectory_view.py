"""The data behind ``report.html``'s trajectory view: a few texts read by every lens at every layer,
as plain JSON (:func:`trajectory_views`, :func:`views_of`).

Per text: the tokens, each lens's top-``k`` tokens and probabilities per (layer, position), the
four :data:`~lensmat.analyses.trajectory.STATISTICS` per cell, and, so that a token can be pinned
and followed through the layers, the rank (0 = top-1) under every lens at every layer of each
*candidate* of a position: every token that is in some lens's top-``k`` at some layer there.
Layers are residual layers ``0..L``; arrays are ``[lens][layer][position]``.
"""

from __future__ import annotations

import math

import torch

from lensmat.analyses.trajectory import STATISTICS, Trajectory, _read
from lensmat.lenses import engine
from lensmat.lenses.base import Lens, capture_layers, encode_text, lens_hooks
from lensmat.models import model_device
from lensmat.stats.collect import resid_hook, site_hooks


def _rounded(values, digits: int = 4):
    """Nested lists of floats with ``digits`` significant digits, ``None`` for NaN."""
    if isinstance(values, list):
        return [_rounded(v, digits) for v in values]
    v = float(values)
    return None if math.isnan(v) else float(f"{v:.{digits}g}")


@torch.no_grad()
def candidate_ranks(model, lenses: dict[str, Lens], cache: dict, candidates: list[list[int]]) -> list:
    """``[lens][layer][position][j]``: the rank (tokens with a strictly higher logit) of
    ``candidates[position][j]`` in each lens's reading of each layer of one forward's activations
    ``cache`` (:func:`~lensmat.lenses.base.capture_layers`'s dict over
    :func:`~lensmat.lenses.base.lens_hooks`); a lens that does not cover a layer reads the model's own
    output there, as in the trajectory."""
    n_layers = int(model.cfg.n_layers)
    unembedding, device = engine.Unembedding(model), model_device(model)
    width = max(len(c) for c in candidates)
    cand = torch.tensor([c + [c[0]] * (width - len(c)) for c in candidates], device=device)  # [pos, width]

    def ranks(h):
        logits = unembedding.logits(unembedding.normalise(h), 0, unembedding.d_vocab).float()  # [pos, vocab]
        ascending = logits.sort(-1).values
        picked = logits.gather(-1, cand)
        above = logits.shape[-1] - torch.searchsorted(ascending, picked.contiguous(), right=True)
        return [row[: len(c)] for row, c in zip(above.tolist(), candidates)]

    own = ranks(cache[resid_hook(n_layers)].to(device))
    return [[ranks(lens.transform_hidden(cache[site_hooks(n_layers, lens.site)[layer]].to(device), layer))
             if lens.covers(layer) else own for layer in range(n_layers + 1)] for lens in lenses.values()]


def view_of(model, lenses: dict[str, Lens], traj: Trajectory, cache: dict | None = None) -> dict:
    """One :class:`~lensmat.analyses.trajectory.Trajectory` as the view's JSON (see the module docstring);
    ``cache``: the activations it was read from (else its text is run again for the candidates' ranks)."""
    if cache is None:
        cache = capture_layers(model, lens_hooks(model, lenses), encode_text(model, traj.text))[1]
    top = traj.top_ids  # [lens, layer, pos, k]
    candidates = [sorted({int(t) for t in top[:, :, p, :].ravel()}) for p in range(top.shape[2])]
    return {
        "text": traj.text, "tokens": traj.tokens, "ids": traj.ids.tolist(), "masked": traj.masked,
        "targets": traj.target_ids.tolist(), "final_top1": traj.final_top1.tolist(),
        "covered": traj.covered.tolist(),
        "top_ids": top.tolist(), "top_probs": _rounded(traj.top_probs.tolist()),
        "statistics": {s: _rounded(traj.statistic(s).tolist()) for s in STATISTICS},
        "candidates": candidates, "candidate_ranks": candidate_ranks(model, lenses, cache, candidates),
    }


def views_of(model, lenses: dict[str, Lens], read: list[tuple[Trajectory, dict | None]], k: int, **about) -> dict:
    """``{"trajectories": ...}`` of trajectories already read with top-``k`` (each with its activations, or
    ``None``; none at all when no line was long enough):
    ``{"k", "lenses", "statistics" (name: description), "n_layers", "lines": [one :func:`view_of` each],
    "vocab" (id: decoded text of every token shown), **about}``."""
    lines = [view_of(model, lenses, traj, cache) for traj, cache in read]
    vocab = {t: text for traj, _ in read for t, text in traj.vocab.items()}
    vocab.update({c: model.tokenizer.decode([c]) for line in lines for cs in line["candidates"] for c in cs
                  if c not in vocab})
    return {"trajectories": {"k": k, "lenses": list(lenses), "statistics": dict(STATISTICS),
                             "n_layers": int(model.cfg.n_layers), "lines": lines,
                             "vocab": {str(i): t for i, t in sorted(vocab.items())}, **about}}


def trajectory_views(model, lenses: dict[str, Lens], texts: list[str], *, k: int = 10, **about) -> dict:
    """:func:`views_of` the trajectories of ``texts`` under ``lenses`` (``{name: Lens}``), each read in
    one forward that also gives its candidates' ranks."""
    read = []
    for text in texts:
        ids = encode_text(model, text)
        cache = capture_layers(model, lens_hooks(model, lenses), ids)[1]
        read.append((_read(model, lenses, text, ids, k, None, cache=cache), cache))
    return views_of(model, lenses, read, k, **about)


def text_views(model, lenses: dict[str, Lens], traj: Trajectory) -> dict:
    """The view of one read text (``lensmat trajectory``'s ``views``)."""
    return views_of(model, lenses, [(traj, None)], traj.k, sampled_from="the text given")


def sample_views(model, lenses: dict[str, Lens], corpus, *, n_lines: int = 6, max_tokens: int = 32, k: int = 10,
                 seed: int = 0) -> dict:
    """``{"trajectories": ...}``: the trajectory view (:func:`trajectory_views`) of ``n_lines`` lines of
    ``corpus`` (a :class:`~lensmat.stats.pipeline.Tokenized` split, :func:`sample_texts`); the ``views``
    an analysis keeps for ``report.html``. ``n_lines=0``: ``{}``."""
    if n_lines <= 0:
        return {}
    return trajectory_views(model, lenses, sample_texts(model, corpus.seqs, n_lines, max_tokens, seed), k=k,
                            sampled_from=f"{corpus.split} split of {corpus.dataset}", seed=seed, max_tokens=max_tokens)


def sample_texts(model, seqs: list[list[int]], n_lines: int = 6, max_tokens: int = 32, seed: int = 0) -> list[str]:
    """``n_lines`` lines of a tokenized split (``seqs``), chosen at random with ``seed`` among those with at
    least 8 tokens, each cut to its first ``max_tokens`` tokens and decoded without special tokens."""
    import random

    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    pool = [[t for t in s if t not in special] for s in seqs]
    pool = [s for s in pool if len(s) >= 8]
    chosen = random.Random(seed).sample(range(len(pool)), min(n_lines, len(pool)))
    return [model.tokenizer.decode(pool[i][:max_tokens]) for i in sorted(chosen)]

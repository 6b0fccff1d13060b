"""The data behind ``report.html``'s trajectory view: a few texts read by every lens at every layer,
as plain JSON (:func:`trajectory_views`).

Per text: the tokens, each lens's top-``k`` tokens and probabilities per (layer, position), the
four :data:`~lensmat.analyses.trajectory.STATISTICS` per cell, and, so that a token can be pinned
and followed through the layers, the rank (0 = top-1) under every lens at every layer of each
*candidate* of a position: every token that is in some lens's top-``k`` at some layer there.
Layers are residual layers ``0..L``; arrays are ``[lens][layer][position]``.
"""

from __future__ import annotations

import math

import torch

from lensmat.analyses.trajectory import STATISTICS, Trajectory, trajectory
from lensmat.lenses import engine
from lensmat.lenses.base import Lens, encode_text
from lensmat.models import model_device
from lensmat.stats.collect import resid_hook, site_hooks


def _rounded(values, digits: int = 4):
    """Nested lists of floats with ``digits`` significant digits, ``None`` for NaN."""
    if isinstance(values, list):
        return [_rounded(v, digits) for v in values]
    v = float(values)
    return None if math.isnan(v) else float(f"{v:.{digits}g}")


@torch.no_grad()
def candidate_ranks(model, lenses: dict[str, Lens], ids, candidates: list[list[int]]) -> list:
    """``[lens][layer][position][j]``: the rank (tokens with a strictly higher logit) of
    ``candidates[position][j]`` in each lens's reading of each layer of ``ids`` (``[1, pos]``); a lens
    that does not cover a layer reads the model's own output there, as in the trajectory."""
    n_layers = int(model.cfg.n_layers)
    hooks = {name: site_hooks(n_layers, lens.site) for name, lens in lenses.items()}
    last = resid_hook(n_layers)
    wanted = {h for hs in hooks.values() for h in hs} | {last}
    _, cache = model.run_with_cache(ids, names_filter=lambda name: name in wanted)
    unembedding, device = engine.Unembedding(model), model_device(model)
    width = max(len(c) for c in candidates)
    cand = torch.tensor([c + [c[0]] * (width - len(c)) for c in candidates], device=device)  # [pos, width]

    def ranks(h):
        logits = unembedding.logits(unembedding.normalise(h), 0, unembedding.d_vocab).float()  # [pos, vocab]
        ascending = logits.sort(-1).values
        picked = logits.gather(-1, cand)
        above = logits.shape[-1] - torch.searchsorted(ascending, picked.contiguous(), right=True)
        return [row[: len(c)] for row, c in zip(above.tolist(), candidates)]

    h_last = cache[last][0].to(device)
    own = ranks(h_last)
    return [[ranks(lens.transform_hidden(cache[hooks[name][layer]][0].to(device), layer)) if lens.covers(layer)
             else own for layer in range(n_layers + 1)] for name, lens in lenses.items()]


def view_of(model, lenses: dict[str, Lens], traj: Trajectory) -> dict:
    """One :class:`~lensmat.analyses.trajectory.Trajectory` as the view's JSON (see the module docstring)."""
    top = traj.top_ids  # [lens, layer, pos, k]
    candidates = [sorted({int(t) for t in top[:, :, p, :].ravel()}) for p in range(top.shape[2])]
    ranks = candidate_ranks(model, lenses, encode_text(model, traj.text), candidates)
    return {
        "text": traj.text, "tokens": traj.tokens, "ids": traj.ids.tolist(), "masked": traj.masked,
        "targets": traj.target_ids.tolist(), "final_top1": traj.final_top1.tolist(),
        "covered": traj.covered.tolist(),
        "top_ids": top.tolist(), "top_probs": _rounded(traj.top_probs.tolist()),
        "statistics": {s: _rounded(traj.statistic(s).tolist()) for s in STATISTICS},
        "candidates": candidates, "candidate_ranks": ranks,
    }


def trajectory_views(model, lenses: dict[str, Lens], texts: list[str], *, k: int = 10) -> dict:
    """The trajectory view of ``texts`` under ``lenses`` (``{name: Lens}``): ``{"k", "lenses",
    "statistics" (name: description), "n_layers", "lines": [one :func:`view_of` per text], "vocab"
    (id: decoded text of every token shown)}``."""
    lines, vocab = [], {}
    for text in texts:
        traj = trajectory(model, lenses, text, k=k)
        lines.append(view_of(model, lenses, traj))
        vocab.update(traj.vocab)
        vocab.update({c: model.tokenizer.decode([c]) for cs in lines[-1]["candidates"] for c in cs if c not in vocab})
    return {"k": k, "lenses": list(lenses), "statistics": dict(STATISTICS), "n_layers": int(model.cfg.n_layers),
            "lines": lines, "vocab": {str(i): t for i, t in sorted(vocab.items())}}


def text_views(model, lenses: dict[str, Lens], traj: Trajectory) -> dict:
    """``{"trajectories": ...}`` of one read text (``lensmat trajectory``): its view with the candidates' ranks."""
    view = {"k": traj.k, "lenses": list(lenses), "statistics": dict(STATISTICS), "n_layers": traj.n_layers,
            "lines": [view_of(model, lenses, traj)], "sampled_from": "the text given", "vocab": dict(traj.vocab)}
    view["vocab"].update({c: model.tokenizer.decode([c]) for cs in view["lines"][0]["candidates"] for c in cs
                          if c not in view["vocab"]})
    view["vocab"] = {str(i): t for i, t in sorted(view["vocab"].items())}
    return {"trajectories": view}


def sample_views(model, lenses: dict[str, Lens], corpus, *, n_lines: int = 6, max_tokens: int = 32, k: int = 10,
                 seed: int = 0) -> dict:
    """``{"trajectories": ...}``: the trajectory view (:func:`trajectory_views`) of ``n_lines`` lines of
    ``corpus`` (a :class:`~lensmat.stats.pipeline.Tokenized` split, :func:`sample_texts`); the ``views``
    an analysis keeps for ``report.html``. ``n_lines=0``: ``{}``."""
    if n_lines <= 0:
        return {}
    view = trajectory_views(model, lenses, sample_texts(model, corpus.seqs, n_lines, max_tokens, seed), k=k)
    view.update(sampled_from=f"{corpus.split} split of {corpus.dataset}", seed=seed, max_tokens=max_tokens)
    return {"trajectories": view}


def sample_texts(model, seqs: list[list[int]], n_lines: int = 6, max_tokens: int = 32, seed: int = 0) -> list[str]:
    """``n_lines`` lines of a tokenized split (``seqs``), chosen at random with ``seed`` among those with at
    least 8 tokens, each cut to its first ``max_tokens`` tokens and decoded without special tokens."""
    import random

    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    pool = [[t for t in s if t not in special] for s in seqs]
    pool = [s for s in pool if len(s) >= 8]
    chosen = random.Random(seed).sample(range(len(pool)), min(n_lines, len(pool)))
    return [model.tokenizer.decode(pool[i][:max_tokens]) for i in sorted(chosen)]

"""The prediction trajectory of one text: what every lens reads at every layer and position.

:func:`trajectory` runs one text through the model once (:func:`~lensmat.lenses.base.read_layers`, the
readout :func:`~lensmat.lenses.base.top_predictions` shares) and keeps, per (lens, layer ``l`` = 0..L,
position), the lens's top-``k`` tokens and probabilities and four statistics (:data:`STATISTICS`):

- ``p_final_top1``: the probability the lens gives to the model's own final top-1 token there;
- ``entropy``: the entropy of the lens's distribution [nats];
- ``kl``: ``KL(p_final ‖ p_lens)`` [nats], ``p_final`` the model's output distribution there;
- ``target_rank``: the rank of the target token in the lens's distribution (0 = its top-1): the
  next token for a causal model (none at the last position), the token at the position itself for
  a masked LM, as in lensmat's masked protocol (none at a ``[MASK]``, whose original the text hides).
  Missing values are NaN.

With ``targets=`` (a token string or id, or one per prompt), it also follows that token:
``follow_rank``, ``follow_prob`` and ``follow_logprob`` per (lens, layer, position)
(:mod:`~lensmat.analyses.trajectory_follow`). ``text`` may be a list of prompts (one
:class:`Trajectory` each) and ``lenses`` names to build (``"logit,mat"``).

A lens that does not cover a layer (``lens.covers(layer)`` False, e.g. the J-lens at ``L``) shows
the model's own output there, and :attr:`Trajectory.covered` says so. :class:`Trajectory` turns into
a per-cell table (:meth:`~Trajectory.to_dataframe`, :meth:`~Trajectory.to_csv`) and a layer × position
heatmap per lens (:meth:`~Trajectory.plot`). :func:`trajectory_report` is the ``lensmat trajectory``
command: fit the lenses on the train split, read the text, write ``trajectory.png``,
``trajectory.csv`` and ``report.json``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool, Float, Int

from lensmat.analyses.trajectory_follow import FOLLOW, resolve_targets
from lensmat.lenses.registry import fit_named_lenses
from lensmat.lenses.base import Lens, capture_layers, encode_text, lens_hooks, read_layers
from lensmat.models import describe, is_masked_lm

STATISTICS = {
    "p_final_top1": "probability of the model's final top-1 token",
    "entropy": "entropy of the lens distribution [nats]",
    "kl": "KL(p_final ‖ p_lens) [nats]",
    "target_rank": "rank of the target token (0 = top-1)",
}


def check_statistic(statistic: str) -> str:
    if statistic not in STATISTICS:
        raise ValueError(f"Unknown statistic {statistic!r}; valid statistics: {', '.join(STATISTICS)}.")
    return statistic


@dataclass
class Trajectory:
    """Every lens's readout of one text at every layer and position (see the module docstring).

    Arrays are indexed ``[lens, layer, position]`` in the order of :attr:`lenses`, layers 0..L,
    positions over :attr:`tokens` (BOS or ``[CLS]``/``[SEP]`` included); statistics are float64.
    """

    model: str
    text: str
    masked: bool  # a masked LM: the lens predicts the token at each position itself
    lenses: list[str]
    ids: Int[np.ndarray, "pos"]
    tokens: list[str]  # decoded input tokens
    target_ids: Int[np.ndarray, "pos"]  # -1 where there is no target
    final_top1: Int[np.ndarray, "pos"]  # the model's own top-1 token
    top_ids: Int[np.ndarray, "lens layer pos k"]
    top_probs: Float[np.ndarray, "lens layer pos k"]
    p_final_top1: Float[np.ndarray, "lens layer pos"]
    entropy: Float[np.ndarray, "lens layer pos"]  # nats
    kl: Float[np.ndarray, "lens layer pos"]  # nats
    target_rank: Float[np.ndarray, "lens layer pos"]  # 0 = top-1; NaN where there is no target
    covered: Bool[np.ndarray, "lens layer"]  # False: the model's own output is shown there
    vocab: dict[int, str]  # decoded text of every token id in ids, target_ids, final_top1, top_ids, follow_id
    follow_id: int | None = None  # the token followed (trajectory(..., targets=)); None: none
    follow_rank: Float[np.ndarray, "lens layer pos"] | None = None  # its rank, 0 = top-1
    follow_prob: Float[np.ndarray, "lens layer pos"] | None = None
    follow_logprob: Float[np.ndarray, "lens layer pos"] | None = None  # nats

    @property
    def n_layers(self) -> int:
        return self.top_ids.shape[1] - 1

    @property
    def k(self) -> int:
        return self.top_ids.shape[3]

    def statistic(self, name: str) -> Float[np.ndarray, "lens layer pos"]:
        """The array of the statistic ``name`` (one of :data:`STATISTICS`)."""
        return getattr(self, check_statistic(name))

    def _lens_index(self, lenses: list[str] | None) -> list[int]:
        names = list(self.lenses) if lenses is None else [lenses] if isinstance(lenses, str) else list(lenses)
        unknown = [n for n in names if n not in self.lenses]
        if unknown or not names:
            raise ValueError(f"Lens(es) {unknown or names} are not in this trajectory; it holds {', '.join(self.lenses)}.")
        return [self.lenses.index(n) for n in names]

    def top1_tokens(self, lens: str) -> list[list[str]]:
        """The lens's top-1 token text per cell, ``[layer][position]``."""
        i = self._lens_index([lens])[0]
        return [[self.vocab[int(t)] for t in row] for row in self.top_ids[i, :, :, 0]]

    def to_dataframe(self):
        """A pandas DataFrame, one row per (lens, layer, position), lens-major: ``lens, layer, position,
        token`` (the input token), ``target`` (None where there is none), ``final_top1`` (the model's),
        ``covered``, ``top1_token, top1_prob, ..., top{k}_token, top{k}_prob``, then the statistics
        ``p_final_top1, entropy, kl`` (nats) and ``target_rank`` (nullable integer, 0 = top-1); with a
        followed token (``targets=``), ``follow_token, follow_rank, follow_prob, follow_logprob``."""
        import pandas as pd

        n_lens, n_layer, n_pos, k = self.top_ids.shape
        lens_i, layer, pos = (a.ravel() for a in np.meshgrid(np.arange(n_lens), np.arange(n_layer), np.arange(n_pos),
                                                              indexing="ij"))
        columns = {
            "lens": [self.lenses[i] for i in lens_i], "layer": layer, "position": pos,
            "token": [self.tokens[p] for p in pos],
            "target": [self.vocab[int(self.target_ids[p])] if self.target_ids[p] >= 0 else None for p in pos],
            "final_top1": [self.vocab[int(self.final_top1[p])] for p in pos],
            "covered": self.covered[lens_i, layer],
        }
        ids, probs = self.top_ids.reshape(-1, k), self.top_probs.reshape(-1, k)
        for j in range(k):
            columns[f"top{j + 1}_token"] = [self.vocab[int(t)] for t in ids[:, j]]
            columns[f"top{j + 1}_prob"] = probs[:, j]
        for name in ("p_final_top1", "entropy", "kl"):
            columns[name] = getattr(self, name).ravel()
        columns["target_rank"] = pd.array([None if math.isnan(r) else int(r) for r in self.target_rank.ravel()],
                                          dtype="Int64")
        if self.follow_id is not None:
            columns["follow_token"] = self.vocab[self.follow_id]
            columns["follow_rank"] = pd.array(self.follow_rank.ravel().astype(np.int64), dtype="Int64")
            columns["follow_prob"], columns["follow_logprob"] = self.follow_prob.ravel(), self.follow_logprob.ravel()
        return pd.DataFrame(columns)

    frame = to_dataframe  # its earlier name, kept

    def rank_trajectory(self, lens: str | None = None) -> Int[np.ndarray, "..."]:
        """The followed token's rank (0 = top-1) at every layer 0..L and position, as integers:
        ``[layer, pos]`` under ``lens``, ``[lens, layer, pos]`` under every lens (``None``), the peer
        of TransformerLens's ``logit_lens(...).rank_trajectory(target)``. Its probabilities are
        :attr:`follow_prob` and :attr:`follow_logprob`."""
        if self.follow_id is None:
            raise ValueError("This trajectory follows no token; read it with targets=, e.g. "
                             "lensmat.trajectory(model, lenses, text, targets=' Paris').")
        ranks = self.follow_rank.astype(np.int64)
        return ranks if lens is None else ranks[self._lens_index([lens])[0]]

    def _repr_html_(self) -> str:
        """Each lens's top-1 token per layer (rows, ``L`` first) and position (columns), truncated."""
        import pandas as pd

        from lensmat import plots

        grids = {name: pd.DataFrame(self.top1_tokens(name), columns=self.tokens)[::-1] for name in self.lenses}
        table = pd.concat(grids, names=["lens", "layer"])
        return plots.html_table(table, f"Trajectory of {self.text!r} ({plots.model_label(self.model)}): top-1 tokens")

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dataframe` to ``path`` (UTF-8, no index); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_dataframe().to_csv(path, index=False, float_format="%.6g")
        return path

    def plot(self, statistic: str = "kl", lenses: list[str] | None = None, out: str | os.PathLike | None = None, *,
             positions: slice | list[int] | None = None, layer_stride: int = 1):
        """A matplotlib Figure: one heatmap per lens side by side, rows = layers (layer 0 at the bottom,
        ``L`` at the top), columns = positions labelled with the input tokens; each cell shows the lens's
        top-1 token and is coloured by ``statistic`` (one shared colour scale and colourbar, with its
        unit). Cells where a lens is undefined (showing the model's output) are marked ``*``; missing
        values (no target) are grey. For long prompts, ``positions`` (a slice or a list of indices into
        :attr:`tokens`) keeps some columns and ``layer_stride`` every k-th layer (``L`` always kept).
        ``out``: a folder to save ``trajectory.png`` in."""

        from lensmat import plots

        if int(layer_stride) < 1:
            raise ValueError(f"layer_stride must be a positive integer (every k-th layer), got {layer_stride}.")
        cols = np.arange(len(self.tokens))[positions if positions is not None else slice(None)]
        if cols.size == 0:
            raise ValueError(f"positions={positions!r} selects none of the {len(self.tokens)} positions.")
        rows = sorted(set(range(0, self.n_layers + 1, int(layer_stride))) | {self.n_layers})
        values = self.statistic(statistic)
        chosen = self._lens_index(lenses)
        cells = {}
        for i in chosen:
            text = self.top1_tokens(self.lenses[i])
            cells[self.lenses[i]] = [[text[layer][p] if self.covered[i, layer] else f"{text[layer][p]}*" for p in cols]
                                     for layer in rows]
        what = "token at the position" if self.masked else "next token"
        title = (f"{plots.model_label(self.model)}: each lens's top-1 {what} per layer, coloured by "
                 f"{STATISTICS[statistic]}")
        if any(not self.covered[i, rows].all() for i in chosen):
            title += "\n* the lens is undefined at this layer: the model's own output is shown"
        return plots.trajectory_figure([self.tokens[p] for p in cols],
                                       {self.lenses[i]: values[i][np.ix_(rows, cols)] for i in chosen}, cells,
                                       label=STATISTICS[statistic], title=title, bounded=statistic == "p_final_top1",
                                       log_scale=statistic == "target_rank", layers=rows, out=out)

    def summary(self) -> dict:
        """Per lens: the first layer from which its top-1 equals the model's final top-1 at every
        later layer, per position (None if only at no layer), and its mean statistics at each layer."""
        agree = self.top_ids[..., 0] == self.final_top1[None, None, :]  # [lens, layer, pos]
        out = {}
        for i, name in enumerate(self.lenses):
            settled = np.flip(np.logical_and.accumulate(np.flip(agree[i], 0), 0), 0)  # agrees here and above
            first = [int(np.argmax(col)) if col.any() else None for col in settled.T]
            out[name] = {"settles_at_layer": first,
                         **{f"mean_{s}": [float(np.nanmean(row)) if np.isfinite(row).any() else None
                                          for row in getattr(self, s)[i]] for s in STATISTICS}}
        return out


@torch.no_grad()
def trajectory(model, lenses, text: str | list[str], k: int = 5, *, targets=None, hooks=None,
               dataset: str | None = None, max_fit_tokens: int | None = None,
               progress: bool = True) -> Trajectory | list[Trajectory]:
    """The prediction trajectory of ``text`` through every lens in ``lenses``: one forward pass, then
    every lens at every residual layer 0..L (see the module docstring).

    ``text`` gets BOS (causal) or ``[CLS] … [SEP]`` (masked LM, where it may hold ``[MASK]``); an empty
    text or one longer than the model's context is refused. ``k``: top tokens kept per cell. A list
    of texts (a batch of prompts) returns a list of :class:`Trajectory`, one per prompt, each read
    by its own forward pass (no padding, so each is exactly the one-text result).

    ``lenses``: ``{name: Lens}``, or names and ``Lens`` objects (``"logit,mat"``, a list; see
    :func:`~lensmat.lenses.registry.split_lenses`): those named are built once for the whole batch
    (:func:`~lensmat.lenses.registry.fit_named_lenses`: the mat maps are fitted on ``dataset``'s train split, the bundled
    corpus by default, at most ``max_fit_tokens`` tokens; ``progress`` prints the plan).

    ``targets``: a token to follow, a token string (``" Paris"``, exactly one token of the model's
    tokenizer, no BOS) or id, for every prompt, or a list of one per prompt. The trajectory then
    holds its rank, probability and log-probability under every lens at every layer and position
    (:attr:`Trajectory.follow_rank` …, :meth:`Trajectory.rank_trajectory`).

    ``hooks``: ``[(hook name, fn)]``, as TransformerLens's ``run_with_hooks`` takes them: the text is
    read in a forward with those hooks active, so every lens reads the activations as the hooks left
    them (``h_l`` at the input of block ``l``, :func:`~lensmat.lenses.base.read_point`) and the model's
    final top-1 is the intervened model's. A hook name the model does not have is refused; a hook that
    never runs in the forward is warned about (:class:`~lensmat.analyses.intervene.NoEffectWarning`).
    :func:`lensmat.analyses.intervene_view.intervene` compares such a reading with the clean one.
    """
    if not lenses:
        raise ValueError("trajectory needs at least one lens, e.g. {'logit': lensmat.LogitLens(model)}.")
    d_vocab = int(model.cfg.d_vocab)
    if not 1 <= int(k) <= d_vocab:
        raise ValueError(f"k must be in 1..{d_vocab} (the vocabulary), got {k}.")
    texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else [text]
    if not texts:
        raise ValueError("text=[] holds no prompt; pass a text or a list of texts.")
    ids = [encode_text(model, t) for t in texts]  # refuse a bad text before fitting anything
    follow = resolve_targets(model, targets, len(texts))
    if isinstance(lenses, Mapping):
        built = dict(lenses)
    else:
        built = fit_named_lenses(model, lenses, dataset, max_fit_tokens=max_fit_tokens, progress=progress)[0]
    out = [_read(model, built, t, i, int(k), f, hooks=hooks) for t, i, f in zip(texts, ids, follow)]
    return out[0] if isinstance(text, str) else out


def _read(model, lenses: dict[str, Lens], text: str, ids, k: int, follow: int | None, *, hooks=None,
          cache: dict | None = None, reference=None) -> Trajectory:
    """One text's :class:`Trajectory` (``ids``: its encoding; ``follow``: the followed token or None),
    read in a forward with ``hooks`` (a hook that never runs is warned about), or from ``cache``
    (:func:`~lensmat.lenses.base.capture_layers`'s activations); ``reference``: the ``h_L`` of another
    forward that ``final_top1``, ``p_final_top1`` and ``kl`` are taken against (see
    :func:`~lensmat.lenses.base.read_layers`)."""
    tokens = ids[0]
    masked = is_masked_lm(model)
    if masked:  # the lens predicts the token at the position; a [MASK] hides it
        mask_id = getattr(model.tokenizer, "mask_token_id", None)
        targets = torch.where(tokens == mask_id, -1, tokens) if mask_id is not None else tokens.clone()
    else:
        targets = torch.cat([tokens[1:], tokens.new_full((1,), -1)])
    has_target = (targets >= 0).cpu().numpy()
    pick = [targets.clamp(min=0)] + ([torch.full_like(targets, follow)] if follow is not None else [])
    if cache is None and hooks:
        cache = _capture(model, lenses, ids, hooks)
    final, cells = read_layers(model, lenses, ids, k=k, pick=torch.stack(pick, -1), rank=True, entropy=True,
                               cache=cache, reference=reference)
    final_top1 = final.top_ids[:, 0]
    shape = (len(lenses), int(model.cfg.n_layers) + 1, tokens.numel())
    out = {name: np.full(shape, np.nan) for name in (*STATISTICS, *(FOLLOW if follow is not None else ()))}
    top_ids = np.zeros((*shape, k), dtype=np.int64)
    top_probs = np.zeros((*shape, k))
    covered = np.ones(shape[:2], dtype=bool)
    names = list(lenses)
    for name, layer, cov, r in cells:  # picked / rank columns: final top-1, target, followed token
        i = names.index(name)
        logp = (r.picked - r.lse[:, None]).double().cpu().numpy()
        top_ids[i, layer], top_probs[i, layer] = r.top_ids.cpu().numpy(), r.top_probs.double().cpu().numpy()
        out["p_final_top1"][i, layer] = np.exp(logp[:, 0])
        out["entropy"][i, layer] = r.entropy.double().cpu().numpy()
        out["kl"][i, layer] = r.kl.double().cpu().numpy()
        out["target_rank"][i, layer] = np.where(has_target, r.rank[:, 1].double().cpu().numpy(), np.nan)
        if follow is not None:
            out["follow_rank"][i, layer], out["follow_logprob"][i, layer] = r.rank[:, 2].double().cpu().numpy(), logp[:, 2]
        covered[i, layer] = cov
    if follow is not None:
        out["follow_prob"] = np.exp(out["follow_logprob"])
    ids_np, targets_np, final_np = tokens.cpu().numpy(), targets.cpu().numpy(), final_top1.cpu().numpy()
    seen = np.unique(np.concatenate([ids_np, targets_np[targets_np >= 0], final_np, top_ids.ravel(),
                                     [] if follow is None else [follow]]).astype(np.int64))
    vocab = {int(t): model.tokenizer.decode([int(t)]) for t in seen}
    return Trajectory(model=describe(model).name, text=text, masked=masked, lenses=names, ids=ids_np,
                      tokens=[vocab[int(t)] for t in ids_np], target_ids=targets_np, final_top1=final_np,
                      top_ids=top_ids, top_probs=top_probs, covered=covered, vocab=vocab, follow_id=follow, **out)


def _capture(model, lenses: dict[str, Lens], ids, hooks) -> dict:
    """The activations every lens reads (and ``h_L``) in one forward with ``hooks``, warning with
    :class:`~lensmat.analyses.intervene.NoEffectWarning` about hooks that never ran."""
    from lensmat.analyses.intervene import warn_not_run

    fired: list[int] = []
    cache = capture_layers(model, lens_hooks(model, lenses), ids, hooks, fired)[1]
    warn_not_run(hooks, fired)
    return cache


def trajectory_report(model, text: str, dataset: str | None = None, *,
                      lenses: str | list[str] = ("logit", "mat"), statistic: str = "kl", k: int = 5,
                      maps=None, tuned=None, tuned_config=None, max_fit_tokens: int | None = None,
                      batch_size: int = 16, max_length: int | None = None, stats_device: str | None = None,
                      memory_limit: int | None = None,
                      views=None, progress: bool = True) -> tuple[Trajectory, dict]:
    """The ``lensmat trajectory`` command on ``model`` (a bridge, a spec for :func:`~lensmat.models.load.load_model`,
    or ``None``: the bundled model): fit the lenses named in ``lenses`` on ``dataset``'s train
    split (:func:`~lensmat.lenses.registry.build_lenses`; ``maps`` / ``tuned``: saved ones to reuse), read ``text``
    through them (:func:`trajectory`). Returns ``(trajectory, report)``; :func:`lensmat.reports.trajectory_report`
    also writes ``trajectory.png`` (coloured by ``statistic``), ``trajectory.csv`` and ``report.json``.
    ``stats_device`` / ``memory_limit``: the memory plan, as in :func:`~lensmat.analyses.compare.compare`.
    ``views``: ``views(model, lenses, trajectory) -> dict``, data for ``report.html`` kept under
    ``report["views"]`` (:mod:`lensmat.reports` passes the text's trajectory view); ``None``: none."""
    from lensmat.analyses.common import start_run
    from lensmat.lenses.registry import parse_lenses

    names = parse_lenses(lenses)
    check_statistic(statistic)
    model = start_run(model)
    if not 1 <= k <= int(model.cfg.d_vocab):
        raise ValueError(f"k={k} top tokens per cell: the vocabulary has {model.cfg.d_vocab}; use 1 <= k <= {model.cfg.d_vocab}.")
    encode_text(model, text)  # refuse a bad text before fitting anything
    built, cost, train, memory = fit_named_lenses(
        model, lenses, dataset, maps=maps, tuned=tuned, tuned_config=tuned_config, max_fit_tokens=max_fit_tokens,
        batch_size=batch_size, max_length=max_length, stats_device=stats_device, memory_limit=memory_limit,
        progress=progress)
    traj = trajectory(model, built, text, k=k)
    report = {"model": traj.model, "model_info": describe(model).to_dict(), "dataset": train.dataset,
              "text": text, "tokens": traj.tokens, "n_layers": traj.n_layers, "lenses": names, "statistic": statistic,
              "k": k, "protocol": "masked" if traj.masked else "causal", "fit_cost": {n: cost[n] for n in names},
              "final_top1": [traj.vocab[int(t)] for t in traj.final_top1], "summary": traj.summary(),
              "memory_plan": memory}
    if views is not None:
        report["views"] = views(model, built, traj)
    return traj, report

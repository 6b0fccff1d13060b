"""Lens views of an intervention: every lens at every layer, read in a clean and an intervened forward
of the same text, and what changed.

:func:`intervene` runs one text twice, clean and with the intervention's hooks active, reads every
lens at every residual layer ``0..L`` in both forwards (:func:`~lensmat.lenses.base.read_layers`; in
the intervened one the lenses read the activations as the hooks left them) and reports, per (lens,
layer, position), three measures against the CLEAN model's output (:data:`METRICS`):

- ``precision@1``: 1 where the lens's top-1 is the clean model's final top-1 there, else 0;
- ``kl``: ``KL(p_clean ‖ q_lens)`` [nats], ``p_clean`` the clean model's output distribution;
- ``rank``: the rank (0 = top-1) of the followed token (``targets=``), or else of the next token
  (none at the last position);

each in the clean reading, the intervened reading and their difference ``delta`` = intervened −
clean (:class:`InterventionView`). The interventions compose; their hooks run in this order:

- ``hooks``: your ``[(hook name, fn)]``, as for TransformerLens's ``run_with_hooks``;
- ``swap``: sub-modules replaced by their fitted linear maps (:func:`~lensmat.analyses.swap.swap_hooks`);
- ``steer``: a :class:`Steer`, a vector added to the residual stream ``h_l`` (ActAdd, Turner et al.
  2023; :func:`steering_vector` builds one from contrast prompts);
- ``ablate``: an :class:`Ablate`, an attention or MLP output zeroed or replaced by its mean.

An intervention that changes nothing is the silent failure of a patch that does nothing (nnsight
issue 502): :func:`intervene` warns :class:`~lensmat.analyses.intervene.NoEffectWarning` when a hook
never ran in the forward, or when every residual activation ``h_0..h_L`` and the output logits equal
the clean forward's to within ``tol`` (relative to the largest clean value at that layer), naming the
hooks and the fix. ``generate=N`` also decodes ``N`` tokens greedily with and without the hooks
(:class:`Generation`). :func:`intervene_report` is the ``lensmat intervene`` command.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int

from lensmat.analyses.intervene import NoEffectWarning, _hooks, hook_label, warn_not_run
from lensmat.analyses.swap import expand_kinds, submodule_pair
from lensmat.analyses.trajectory import Trajectory, _read
from lensmat.analyses.trajectory_follow import resolve_targets
from lensmat.lenses.base import capture_layers, encode_text, lens_hooks
from lensmat.lenses.registry import fit_named_lenses
from lensmat.models import describe, input_device, is_masked_lm, require_causal
from lensmat.stats.collect import resid_hook

METRICS = {
    "precision@1": "Precision@1: the lens's top-1 is the clean model's final top-1",
    "kl": "KL(p_clean ‖ q_lens) [nats]",
    "rank": "rank of the followed (or next) token, 0 = top-1",
}
PARTS = ("clean", "intervened", "delta")
DEFAULT_TOL = 1e-5  # relative change below which an activation counts as unchanged
ABLATION_TOKENS = 2_000  # train tokens a mean ablation averages over, by default
ABLATION_KINDS = ("attn", "mlp")


# the interventions: steering and ablation (hooks and swaps are TransformerLens's and lensmat's own)

@dataclass
class Steer:
    """A steering vector added to the residual stream: ``h_layer += scale · vector`` (ActAdd) at
    ``positions`` (indices into the tokens; ``None``: every position) in every forward, at residual
    layer ``layer`` (0..L, hook :func:`~lensmat.stats.collect.resid_hook`), where both the lens at
    ``layer`` and block ``layer`` read it. ``source``: where the vector came from, for the report."""

    layer: int
    vector: torch.Tensor | np.ndarray | list
    scale: float = 1.0
    positions: list[int] | slice | None = None
    source: str | None = None

    def check(self, model) -> torch.Tensor:
        """The vector as a float32 tensor ``[d_model]``, after checking the layer, shape and values."""
        n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)) or \
                not 0 <= int(self.layer) <= n_layers:
            raise IndexError(f"Steering layer {self.layer!r} is out of range: residual layers are 0..{n_layers} "
                             "(0 = the embeddings).")
        v = torch.as_tensor(np.asarray(self.vector.detach().cpu() if isinstance(self.vector, torch.Tensor)
                                       else self.vector, dtype=np.float32))
        v = v.reshape(-1) if v.dim() == 2 and 1 in v.shape else v
        if tuple(v.shape) != (d_model,):
            raise ValueError(f"A steering vector has d_model = {d_model} entries for this model; got shape "
                             f"{tuple(v.shape)}.")
        if not torch.isfinite(v).all():
            raise ValueError("The steering vector holds NaN or Inf; build it again (lensmat.steering_vector).")
        if not math.isfinite(float(self.scale)):
            raise ValueError(f"Steering scale {self.scale!r} is not a finite number.")
        return v

    def hooks(self, model) -> list:
        """``[(resid_hook(layer), fn)]``: ``fn`` adds ``scale · vector`` to the chosen positions."""
        v = self.check(model) * float(self.scale)
        positions = self.positions

        def add(act, hook=None):
            delta = v.to(act.device, act.dtype)
            if positions is None:
                return act + delta
            out = act.clone()
            out[:, positions] += delta
            return out

        return [(resid_hook(int(self.layer)), add)]

    def describe(self) -> dict:
        v = torch.as_tensor(np.asarray(self.vector.detach().cpu() if isinstance(self.vector, torch.Tensor)
                                       else self.vector, dtype=np.float32)).reshape(-1)
        positions = self.positions
        if isinstance(positions, slice):
            positions = f"{positions.start}:{positions.stop}:{positions.step}"
        return {"layer": int(self.layer), "hook": resid_hook(int(self.layer)), "scale": float(self.scale),
                "vector_norm": float(v.norm()), "positions": positions, "source": self.source}


@dataclass
class Ablate:
    """An attention or MLP output replaced in block ``block``: by zeros (``how="zero"``), or by its mean
    output (``how="mean"``): ``mean`` if given (``[d]``), else the mean over the scored positions of up
    to :data:`ABLATION_TOKENS` tokens of the train split (:func:`ablation_mean`). The hook is the
    sub-module's output hook (:func:`~lensmat.analyses.swap.submodule_pair`), before the residual add."""

    kind: str
    block: int
    how: str = "zero"
    mean: torch.Tensor | None = None

    def hook_name(self, model) -> str:
        if self.kind not in ABLATION_KINDS:
            raise ValueError(f"Ablation kind {self.kind!r}: ablate one of {', '.join(ABLATION_KINDS)} (a sub-layer whose "
                             "output is added to the residual stream); to replace a norm or a block, swap it "
                             "(swap=) for its linear map.")
        if self.how not in ("zero", "mean"):
            raise ValueError(f"Ablation {self.how!r}: use 'zero' or 'mean'.")
        return submodule_pair(model, self.kind, int(self.block))[1]

    def hooks(self, model, dataset=None, max_tokens: int = ABLATION_TOKENS) -> list:
        """``[(output hook, fn)]``; a mean not given is computed here (:func:`ablation_mean`)."""
        name = self.hook_name(model)
        if self.how == "zero":
            return [(name, lambda act, hook=None: torch.zeros_like(act))]
        mean = torch.as_tensor(ablation_mean(model, name, dataset, max_tokens) if self.mean is None else self.mean).float()

        def replace(act, hook=None):
            return mean.to(act.device, act.dtype).expand_as(act).clone()

        return [(name, replace)]

    def describe(self) -> dict:
        return {"kind": self.kind, "block": int(self.block), "how": self.how}


@torch.no_grad()
def ablation_mean(model, hook: str, dataset=None, max_tokens: int = ABLATION_TOKENS, *, batch_size: int = 16,
                  max_length: int | None = None) -> Float[torch.Tensor, "d"]:
    """The mean activation at ``hook`` over the scored positions (BOS excluded) of up to ``max_tokens``
    tokens of ``dataset``'s train split (``None``: the bundled corpus), float32."""
    from lensmat import data
    from lensmat.stats.collect import run_capture
    from lensmat.stats.pipeline import tokenized

    corpus = tokenized(model, dataset, "train", max_length or data.DEFAULT_MAX_LENGTH)
    total, n = None, 0
    for batch in corpus.replaced_batches(batch_size, max_tokens):
        rows = run_capture(model, batch, [hook])[0][hook].double()
        total = rows.sum(0) if total is None else total + rows.sum(0)
        n += rows.shape[0]
    if not n:
        raise ValueError(f"No train tokens to average {hook} over; pass a dataset with text.")
    return (total / n).float().cpu()


def _content_positions(model, ids) -> slice:
    """The positions of a text's own tokens: without BOS (causal), without [CLS] and [SEP] (masked LM)."""
    n = ids.shape[-1]
    if is_masked_lm(model):
        return slice(1, n - 1) if n > 2 else slice(0, n)
    bos = getattr(model.tokenizer, "bos_token_id", None)
    return slice(1, n) if n > 1 and bos is not None and int(ids[0, 0]) == int(bos) else slice(0, n)


@torch.no_grad()
def steering_vector(model, layer: int, positive: str | list[str], negative: str | list[str]) -> Float[torch.Tensor, "d_model"]:
    """A steering vector from contrast prompts (ActAdd, Turner et al. 2023, as a difference of means):
    the mean of ``h_layer`` over the positions of the ``positive`` text(s) minus its mean over those of
    the ``negative`` text(s), BOS (``[CLS]``/``[SEP]``) left out, float32 ``[d_model]``. Add it with
    ``Steer(layer, vector, scale)``: the intervened model moves from the negative towards the positive."""
    n_layers = int(model.cfg.n_layers)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) <= n_layers:
        raise IndexError(f"Steering layer {layer!r} is out of range: residual layers are 0..{n_layers}.")
    hook = resid_hook(int(layer))

    def mean(texts, which):
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError(f"The {which} contrast prompts are empty; pass a text or a list of texts.")
        rows = []
        for text in texts:
            ids = encode_text(model, text)
            rows.append(capture_layers(model, [hook], ids)[1][hook][_content_positions(model, ids)])
        return torch.cat(rows).float().mean(0)

    return (mean(positive, "positive") - mean(negative, "negative")).cpu()


def load_vector(path: str | os.PathLike) -> torch.Tensor:
    """A steering vector saved as ``.npy`` or ``.safetensors`` (one tensor, or the one named ``vector``),
    as a float32 tensor."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No steering vector at {path}: pass a .npy or .safetensors file holding one "
                                "vector of d_model numbers.")
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{path} holds {array.dtype} values; a steering vector is floating point.")
        return torch.from_numpy(np.asarray(array, dtype=np.float32))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1 and "vector" not in tensors:
            raise ValueError(f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:5])}); save one, or "
                             "name the steering vector 'vector'.")
        vector = tensors["vector"] if "vector" in tensors else next(iter(tensors.values()))
        if not vector.dtype.is_floating_point:
            raise ValueError(f"{path} holds a {vector.dtype} tensor; a steering vector is floating point.")
        return vector.float()
    raise ValueError(f"{path}: a steering vector file is .npy or .safetensors, not {path.suffix or 'without suffix'!r}.")


def _listed(value, kind: type) -> list:
    """``value`` as a list of ``kind``: one, a tuple of its arguments, or a list of either."""
    if value is None:
        return []
    if isinstance(value, kind) or (isinstance(value, tuple) and value and not isinstance(value[0], (kind, tuple))):
        value = [value]
    return [v if isinstance(v, kind) else kind(*v) for v in value]


def _swap_specs(swap) -> list:
    """``swap`` as a list of specifications (``(maps, kinds, blocks)`` tuples or dicts)."""
    if swap is None:
        return []
    if isinstance(swap, list):
        return swap
    return [swap]


def _swap_description(model, spec) -> dict:
    if isinstance(spec, dict):
        kinds, blocks = spec.get("kinds", ("attn",)), spec.get("blocks")
    else:
        kinds = spec[1] if len(spec) > 1 else ("attn",)
        blocks = spec[2] if len(spec) > 2 else None
    blocks = list(range(int(model.cfg.n_layers))) if blocks is None else sorted(set(int(b) for b in blocks))
    return {"kinds": expand_kinds(kinds, model), "blocks": blocks}


def intervention_hooks(model, *, hooks=None, swap=None, steer=None, ablate=None, dataset=None,
                       ablation_tokens: int = ABLATION_TOKENS) -> tuple[list, dict]:
    """The forward hooks of an intervention, in order (yours, the swaps', the steering's, the
    ablations'), and its description for the report: ``kinds`` (which of ``hooks, swap, steer,
    ablate``), ``hooks`` (every hook name), ``label`` (one line) and one entry per kind. ``swap``:
    ``(maps, kinds, blocks)`` or ``{"maps", "kinds", "blocks"}`` (:func:`~lensmat.analyses.swap.swap_hooks`),
    or a list of them; ``steer``: a :class:`Steer`, a ``(layer, vector, scale)`` tuple or a list; ``ablate``:
    an :class:`Ablate`, a ``(kind, block, how)`` tuple or a list. Hook names the model lacks are refused."""
    swaps, steers, ablations = _swap_specs(swap), _listed(steer, Steer), _listed(ablate, Ablate)
    for s in steers:
        s.check(model)
    for a in ablations:
        a.hook_name(model)
    fwd = _hooks(model, hooks, None)
    description: dict = {"kinds": [], "hooks": []}
    labels = []
    if hooks:
        description["kinds"].append("hooks")
        description["user_hooks"] = [hook_label(name) for name, _ in hooks]
        labels.append("hooks " + ", ".join(dict.fromkeys(description["user_hooks"])))
    if swaps:
        description["kinds"].append("swap")
        description["swap"] = [_swap_description(model, s) for s in swaps]
        for s in swaps:
            fwd += _hooks(model, None, s)
        labels.append("swap " + ", ".join(f"{k}@{','.join(map(str, d['blocks']))}" for d in description["swap"]
                                          for k in d["kinds"]))
    if steers:
        description["kinds"].append("steer")
        description["steer"] = [s.describe() for s in steers]
        for s in steers:
            fwd += s.hooks(model)
        labels.append("steer " + ", ".join(f"h_{s.layer} + {float(s.scale):g}·v" for s in steers))
    if ablations:
        description["kinds"].append("ablate")
        description["ablate"] = [a.describe() for a in ablations]
        for a in ablations:
            fwd += a.hooks(model, dataset, ablation_tokens)
        labels.append("ablate " + ", ".join(f"{a.how} {a.kind}@{a.block}" for a in ablations))
    description["hooks"] = [hook_label(name) for name, _ in fwd]
    description["label"] = "; ".join(labels)
    return fwd, description


# the view

@dataclass(repr=False)
class Generation:
    """Greedy continuations of a prompt by the clean and the intervened model (hooks active at every
    step; each step recomputes the whole sequence, no key/value cache), and the trajectory of each
    model over the prompt and its own continuation (:attr:`clean`, :attr:`intervened`: each scored
    against its own model's output, so ``final_top1`` at the positions before a generated token is
    that token)."""

    prompt_ids: list[int]
    clean_ids: list[int]  # the clean model's continuation
    intervened_ids: list[int]  # the intervened model's continuation
    clean_text: str  # the continuations, decoded
    intervened_text: str
    clean: Trajectory
    intervened: Trajectory

    def __repr__(self) -> str:
        return (f"Generation({len(self.clean_ids)} tokens: clean {self.clean_text!r}, intervened "
                f"{self.intervened_text!r}, first difference {self.first_difference})")

    @property
    def first_difference(self) -> int | None:
        """The index of the first generated token where the two continuations differ (None: none)."""
        return next((i for i, (a, b) in enumerate(zip(self.clean_ids, self.intervened_ids)) if a != b), None)

    def summary(self) -> dict:
        def side(ids, text, traj):
            return {"ids": [int(t) for t in ids], "tokens": [traj.vocab[int(t)] for t in ids], "text": text,
                    "summary": traj.summary()}

        return {"max_new_tokens": len(self.clean_ids), "prompt_tokens": len(self.prompt_ids),
                "clean": side(self.clean_ids, self.clean_text, self.clean),
                "intervened": side(self.intervened_ids, self.intervened_text, self.intervened),
                "first_difference": self.first_difference}


def _none(values):
    """Nested lists with NaN as None."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if isinstance(values, list):
        return [_none(v) for v in values]
    return None if values is None or (isinstance(values, float) and math.isnan(values)) else float(values)


def _nanmean(rows: np.ndarray) -> list[float | None]:
    """Mean over the last axis ignoring NaN, None where a row has none."""
    return [float(np.nanmean(r)) if np.isfinite(r).any() else None for r in rows]


@dataclass(repr=False)
class InterventionView:
    """Every lens at every layer in a clean and an intervened forward of one text (module docstring).

    :attr:`clean` is the clean model's :class:`~lensmat.analyses.trajectory.Trajectory`; :attr:`intervened`
    is read in the intervened forward but scored against the CLEAN model's output (its ``final_top1``,
    ``p_final_top1``, ``kl`` and ``settles_at_layer`` refer to the clean model), so the two compare like
    for like; the intervened model's own top-1 is :attr:`intervened_top1` (for its own trajectory, call
    ``lensmat.trajectory(model, lenses, text, hooks=)``). :meth:`values` and :meth:`delta` give the
    :data:`METRICS` per ``[lens, layer, position]`` (NaN where a lens does not cover a layer, or a rank
    has no token). :attr:`change` is ``max |h_l (intervened) − h_l (clean)|`` per residual layer ``0..L``.
    """

    intervention: dict
    clean: Trajectory
    intervened: Trajectory
    intervened_top1: Int[np.ndarray, "pos"]  # the intervened model's own top-1 (its logits)
    output_kl: Float[np.ndarray, "pos"]  # KL(p_clean ‖ p_intervened) of the model outputs [nats]
    change: Float[np.ndarray, "layer"]  # max |Δh_l| per residual layer 0..L
    scale: Float[np.ndarray, "layer"]  # max |h_l| of the clean forward
    logit_change: float  # max |Δ logits|
    logit_scale: float  # max |logits| of the clean forward
    tol: float
    hooks_not_run: list[str]
    vocab: dict[int, str]  # decoded text of intervened_top1's tokens
    generation: Generation | None = None

    def __repr__(self) -> str:
        state = ("nothing changed" if not self.changed else "changed the output only"
                 if self.changed_from_layer is None else f"changed from layer {self.changed_from_layer}")
        return (f"InterventionView({self.intervention.get('label', '')!r} on {self.clean.text!r}: lenses "
                f"{', '.join(self.lenses)}, layers 0..{self.n_layers}, {len(self.tokens)} positions; {state}, "
                f"max |Δh| {self.max_abs_change:.4g}{'; generation' if self.generation is not None else ''})")

    @property
    def lenses(self) -> list[str]:
        return self.clean.lenses

    @property
    def tokens(self) -> list[str]:
        return self.clean.tokens

    @property
    def n_layers(self) -> int:
        return self.clean.n_layers

    @property
    def max_abs_change(self) -> float:
        """The largest absolute change of a residual activation ``h_0..h_L``."""
        return float(self.change.max())

    @property
    def relative_change(self) -> float:
        """The largest per-layer change relative to that layer's largest clean value."""
        return float((self.change / np.maximum(self.scale, 1e-30)).max())

    @property
    def changed_from_layer(self) -> int | None:
        """The first residual layer whose activations changed by more than ``tol`` (relative)."""
        moved = np.nonzero(self.change > self.tol * self.scale)[0]
        return int(moved[0]) if moved.size else None

    @property
    def changed(self) -> bool:
        """Whether the intervention changed any residual activation or the output logits beyond ``tol``."""
        return self.changed_from_layer is not None or self.logit_change > self.tol * self.logit_scale

    @property
    def rank_of(self) -> str | None:
        """The token whose rank ``rank`` measures; None: the next token at each position."""
        return None if self.clean.follow_id is None else self.clean.vocab[self.clean.follow_id]

    def values(self, metric: str) -> dict[str, Float[np.ndarray, "lens layer pos"]]:
        """``{"clean", "intervened", "delta"}`` arrays ``[lens, layer, pos]`` of ``metric`` (:data:`METRICS`)."""
        if metric not in METRICS:
            raise ValueError(f"Unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}.")
        out = {}
        for part, traj in (("clean", self.clean), ("intervened", self.intervened)):
            if metric == "precision@1":
                v = (traj.top_ids[..., 0] == self.clean.final_top1[None, None, :]).astype(float)
            elif metric == "kl":
                v = traj.kl.copy()
            else:
                v = (traj.follow_rank if traj.follow_id is not None else traj.target_rank).copy()
            v[~traj.covered] = np.nan
            out[part] = v
        out["delta"] = out["intervened"] - out["clean"]
        return out

    def delta(self, metric: str) -> Float[np.ndarray, "lens layer pos"]:
        """Intervened − clean of ``metric`` per ``[lens, layer, pos]``."""
        return self.values(metric)["delta"]

    def per_layer(self) -> dict:
        """``{lens: {metric: {"clean", "intervened", "delta": L+1 means over positions}}}`` (None where no
        position has a value)."""
        values = {m: self.values(m) for m in METRICS}
        return {name: {m: {part: _nanmean(values[m][part][i]) for part in PARTS} for m in METRICS}
                for i, name in enumerate(self.lenses)}

    def summary(self) -> dict:
        """The view's fields of the ``intervene`` report (docs/reports.md): strict-JSON values."""
        values = {m: self.values(m) for m in METRICS}
        clean_top1 = [self.clean.vocab[int(t)] for t in self.clean.final_top1]
        int_top1 = [self.vocab[int(t)] for t in self.intervened_top1]
        out = {
            "model": self.clean.model, "text": self.clean.text, "tokens": self.tokens, "n_layers": self.n_layers,
            "lenses": self.lenses, "intervention": self.intervention, "changed": bool(self.changed),
            "max_abs_change": self.max_abs_change, "relative_change": self.relative_change,
            "max_abs_change_per_layer": [float(c) for c in self.change], "changed_from_layer": self.changed_from_layer,
            "max_abs_logit_change": float(self.logit_change), "tolerance": self.tol, "hooks_not_run": self.hooks_not_run,
            "rank_of": self.rank_of, "clean_final_top1": clean_top1, "intervened_final_top1": int_top1,
            "output": {"kl": _none(self.output_kl), "mean_kl": float(np.mean(self.output_kl)),
                       "precision@1": float(np.mean(self.intervened_top1 == self.clean.final_top1))},
            "per_layer": self.per_layer(),
            "cells": {name: {m: {part: _none(values[m][part][i]) for part in PARTS} for m in METRICS}
                      for i, name in enumerate(self.lenses)},
        }
        if self.generation is not None:
            out["generation"] = self.generation.summary()
        return out

    def to_dataframe(self):
        """A pandas DataFrame, one row per (lens, layer, position), lens-major: ``lens, layer, position,
        token``, ``clean_top1`` and ``intervened_top1`` (the lens's top-1 token in each forward), then
        ``{metric}_{clean, intervened, delta}`` for ``precision@1``, ``kl`` (nats) and ``rank``."""
        import pandas as pd

        n_lens, n_layer, n_pos = self.clean.kl.shape
        lens_i, layer, pos = (a.ravel() for a in np.meshgrid(np.arange(n_lens), np.arange(n_layer), np.arange(n_pos),
                                                              indexing="ij"))
        columns = {"lens": [self.lenses[i] for i in lens_i], "layer": layer, "position": pos,
                   "token": [self.tokens[p] for p in pos],
                   "clean_top1": [self.clean.vocab[int(t)] for t in self.clean.top_ids[..., 0].ravel()],
                   "intervened_top1": [self.intervened.vocab[int(t)] for t in self.intervened.top_ids[..., 0].ravel()]}
        for metric in METRICS:
            for part, v in self.values(metric).items():
                columns[f"{metric}_{part}"] = v.ravel()
        return pd.DataFrame(columns)

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dataframe` to ``path`` (UTF-8, no index); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_dataframe().to_csv(path, index=False, float_format="%.6g")
        return path

    def plot(self, out: str | os.PathLike | None = None) -> list:
        """The figures of :func:`lensmat.plots.intervene_plots`: Δ heatmaps (layer × position, per lens
        and metric) and the mean Δ per layer; ``out``: a folder to save their PNGs in."""
        from lensmat import plots

        return plots.intervene_plots(self.summary(), out)

    def _repr_html_(self) -> str:
        import pandas as pd

        from lensmat import plots

        rows = {(name, f"Δ {m}"): per[m]["delta"] for name, per in self.per_layer().items() for m in METRICS}
        table = pd.DataFrame(list(rows.values()), index=pd.MultiIndex.from_tuples(rows, names=["lens", "mean Δ"]),
                             dtype=float)
        table.columns.name = "layer"
        state = ("NOTHING CHANGED (NoEffectWarning)" if not self.changed else "changed the output only"
                 if self.changed_from_layer is None else f"changed from layer {self.changed_from_layer}")
        title = (f"Intervention {self.intervention.get('label', '')} on {self.clean.text!r} "
                 f"({plots.model_label(self.clean.model)}): {state}, max |Δh| {self.max_abs_change:.3g}")
        return plots.html_table(table, title)


def _check_no_effect(view: InterventionView, fwd: list) -> None:
    """The warnings of :func:`intervene`: nothing changed, or some hooks never ran."""
    if not view.changed:
        names = ", ".join(dict.fromkeys(hook_label(name) for name, _ in fwd))
        never = (f" Hook(s) {', '.join(view.hooks_not_run)} never ran in the forward (hook points the model has "
                 "but does not compute): hook a point that runs." if view.hooks_not_run else "")
        warnings.warn(
            f"The intervention ({names}) changed nothing: every residual activation h_0..h_{view.n_layers} and the "
            f"logits equal the clean forward's (largest change {view.max_abs_change:.3g}, relative "
            f"{view.relative_change:.3g} <= tol {view.tol:g}).{never} A hook must return the modified activation "
            "(return act * 0, not act = act * 0) or change it in place (act[:] = ...), and the change must reach the "
            "residual stream; check the names with model.run_with_cache(text)[1].keys().",
            NoEffectWarning, stacklevel=3)
    elif view.hooks_not_run:
        warn_not_run([(h, None) for h in view.hooks_not_run], [0] * len(view.hooks_not_run), stacklevel=3)


def _view(model, lenses: dict, text: str, ids, k: int, follow: int | None, fwd: list, description: dict,
          tol: float) -> InterventionView:
    n_layers = int(model.cfg.n_layers)
    resid = [resid_hook(layer) for layer in range(n_layers + 1)]
    names = sorted(set(lens_hooks(model, lenses)) | set(resid))
    clean_logits, clean_cache = capture_layers(model, names, ids)
    fired: list[int] = []
    logits, cache = capture_layers(model, names, ids, fwd, fired)
    change = np.array([float((cache[h].float() - clean_cache[h].float()).abs().max()) for h in resid])
    scale = np.array([float(clean_cache[h].float().abs().max()) for h in resid])
    logit_change = float((logits.float() - clean_logits.float()).abs().max())
    clean = _read(model, lenses, text, ids, k, follow, cache=clean_cache)
    intervened = _read(model, lenses, text, ids, k, follow, cache=cache, reference=clean_cache[resid[-1]])
    p = torch.log_softmax(clean_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    output_kl = (p.exp() * (p - q)).sum(-1).clamp_min(0).cpu().numpy()
    top1 = logits.argmax(-1).cpu().numpy()
    view = InterventionView(
        intervention=description, clean=clean, intervened=intervened, intervened_top1=top1, output_kl=output_kl,
        change=change, scale=scale, logit_change=logit_change,
        logit_scale=float(clean_logits.float().abs().max()), tol=float(tol),
        hooks_not_run=list(dict.fromkeys(hook_label(name) for (name, _), n in zip(fwd, fired) if n == 0)),
        vocab={int(t): model.tokenizer.decode([int(t)]) for t in np.unique(top1)})
    return view


@torch.no_grad()
def _greedy(model, ids: list[int], n: int, hooks: list) -> list[int]:
    """``n`` greedy tokens after ``ids``, recomputing the whole sequence each step with ``hooks`` active."""
    ids, device = list(ids), input_device(model)
    for _ in range(n):
        logits = model.run_with_hooks(torch.tensor([ids], device=device), fwd_hooks=list(hooks), return_type="logits")
        ids.append(int(logits[0, -1].argmax()))
    return ids


def _generation(model, lenses: dict, text: str, ids, n: int, k: int, follow: int | None, fwd: list) -> Generation:
    prompt = ids[0].tolist()
    clean_ids, int_ids = _greedy(model, prompt, n, []), _greedy(model, prompt, n, fwd)
    clean_text, int_text = (model.tokenizer.decode(s[len(prompt):]) for s in (clean_ids, int_ids))
    device = input_device(model)
    with warnings.catch_warnings():  # already said of the prompt
        warnings.simplefilter("ignore", NoEffectWarning)
        clean = _read(model, lenses, text + clean_text, torch.tensor([clean_ids], device=device), k, follow)
        intervened = _read(model, lenses, text + int_text, torch.tensor([int_ids], device=device), k, follow, hooks=fwd)
    return Generation(prompt, clean_ids[len(prompt):], int_ids[len(prompt):], clean_text, int_text, clean, intervened)


@torch.no_grad()
def intervene(model, lenses, text: str, *, hooks=None, swap=None, steer=None, ablate=None, targets=None,
              k: int = 10, generate: int | None = None, tol: float = DEFAULT_TOL, dataset=None,
              max_fit_tokens: int | None = None, ablation_tokens: int = ABLATION_TOKENS,
              progress: bool = True) -> InterventionView:
    """Every lens in ``lenses`` at every layer in a clean and an intervened forward of ``text``, and the
    change per (lens, layer, position) against the clean model's output (the module docstring).

    ``hooks``: ``[(hook name, fn)]`` (TransformerLens's ``run_with_hooks`` format); ``swap``:
    ``(maps, kinds, blocks)`` or ``{"maps", "kinds", "blocks"}`` (sub-module maps,
    :func:`~lensmat.analyses.submodules.fit_submodule_maps`), or a list of them; ``steer``: a
    :class:`Steer` (or ``(layer, vector, scale)``, or a list); ``ablate``: an :class:`Ablate` (or
    ``(kind, block, "zero" | "mean")``, or a list; a mean is taken over ``ablation_tokens`` tokens of
    ``dataset``'s train split). At least one is needed; they compose.

    ``lenses``: as :func:`~lensmat.analyses.trajectory.trajectory`'s (names are fitted on ``dataset``'s
    train split, at most ``max_fit_tokens`` tokens). ``targets``: a token (string or id) whose rank the
    ``rank`` measure follows; without it, the next token's. ``k``: top tokens kept per cell.
    ``generate=N``: also greedy-decode ``N`` tokens with and without the intervention
    (:attr:`InterventionView.generation`, a :class:`Generation`; causal models only).
    ``tol``: the relative change below which an activation counts as unchanged; an intervention that
    changes nothing, or a hook that never runs, warns :class:`~lensmat.analyses.intervene.NoEffectWarning`.
    """
    if not lenses:
        raise ValueError("intervene needs at least one lens, e.g. {'logit': lensmat.LogitLens(model)}.")
    if not isinstance(text, str):
        raise TypeError(f"intervene reads one text (a str), got {type(text).__name__}; call it once per text.")
    d_vocab = int(model.cfg.d_vocab)
    if not 1 <= int(k) <= d_vocab:
        raise ValueError(f"k must be in 1..{d_vocab} (the vocabulary), got {k}.")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol={tol!r}: a relative tolerance is a finite number >= 0.")
    ids = encode_text(model, text)
    if generate is not None:
        _check_generate(model, ids, generate)
    follow = resolve_targets(model, targets, 1)[0]
    fwd, description = intervention_hooks(model, hooks=hooks, swap=swap, steer=steer, ablate=ablate, dataset=dataset,
                                          ablation_tokens=ablation_tokens)
    if not fwd:
        raise ValueError("intervene needs an intervention: hooks=[(hook name, fn)], swap=(maps, kinds, blocks), "
                         "steer=Steer(layer, vector, scale) or ablate=Ablate(kind, block).")
    built = dict(lenses) if isinstance(lenses, Mapping) else fit_named_lenses(
        model, lenses, dataset, max_fit_tokens=max_fit_tokens, progress=progress)[0]
    view = _view(model, built, text, ids, int(k), follow, fwd, description, tol)
    _check_no_effect(view, fwd)
    if generate:
        view.generation = _generation(model, built, text, ids, int(generate), int(k), follow, fwd)
    return view


def _check_generate(model, ids, generate) -> None:
    require_causal(model, "Generation under an intervention")
    if isinstance(generate, bool) or not isinstance(generate, (int, np.integer)) or generate < 1:
        raise ValueError(f"generate={generate!r}: the number of tokens to generate is an integer >= 1.")
    n_ctx = int(model.cfg.n_ctx)
    if ids.shape[-1] + int(generate) > n_ctx:
        raise ValueError(f"The text is {ids.shape[-1]} tokens; {generate} more exceed the model's context of {n_ctx} "
                         "tokens. Generate fewer, or shorten the text.")


# the command

def parse_sites(specs, what: str) -> list[tuple[str, int]]:
    """``["attn@3", "mlp@5"]`` or ``"attn@3,mlp@5"`` (or ``(kind, block)`` pairs) as ``[(kind, block)]``."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    out = []
    for spec in specs or []:
        if isinstance(spec, tuple):
            out.append((str(spec[0]), int(spec[1])))
            continue
        kind, at, block = str(spec).strip().partition("@")
        if not at or not block.strip().lstrip("-").isdigit():
            raise ValueError(f"{what} {spec!r}: write KIND@BLOCK, e.g. attn@3 (block 0..L-1).")
        out.append((kind.strip(), int(block)))
    return out


def intervene_report(model, text: str, dataset: str | None = None, *, lenses: str | list[str] = ("logit", "mat"),
                     hooks=None, swap=None, swap_maps=None, intercept: bool = False, steer_layer: int | None = None,
                     steer_vector=None, steer_from: str | list[str] | None = None,
                     steer_to: str | list[str] | None = None, scale: float = 1.0, ablate=None,
                     ablation: str = "zero", targets=None, k: int = 10, generate: int | None = None,
                     tol: float = DEFAULT_TOL, maps=None, tuned=None, tuned_config=None,
                     max_fit_tokens: int | None = None, ablation_tokens: int = ABLATION_TOKENS, batch_size: int = 16,
                     max_length: int | None = None, stats_device: str | None = None, memory_limit: int | None = None,
                     progress: bool = True) -> tuple[InterventionView, dict]:
    """The ``lensmat intervene`` command on ``model`` (a bridge, a spec for
    :func:`~lensmat.models.load.load_model`, or ``None``: the bundled model): fit the lenses on
    ``dataset``'s train split (``maps`` / ``tuned``: saved ones to reuse), build the intervention and read
    ``text`` through :func:`intervene`. Returns ``(view, report)``; :func:`lensmat.reports.intervene_report`
    also writes ``report.json``, the figures and ``intervene.csv``.

    The intervention: ``hooks`` (your ``[(hook name, fn)]``); ``swap``: sub-modules ``"KIND@BLOCK"``
    (a list or comma-separated), swapped for maps fitted on the train split (``intercept``: affine) or
    taken from ``swap_maps`` (a :class:`~lensmat.stats.fit.MapSet` or a folder saved by
    :func:`~lensmat.stats.artifacts.save_maps`); ``steer_layer`` with ``steer_vector`` (a tensor, or a
    ``.npy`` / ``.safetensors`` file) or the contrast prompts ``steer_from`` → ``steer_to``
    (:func:`steering_vector`), times ``scale``; ``ablate``: ``"KIND@BLOCK"`` (attn, mlp) with
    ``ablation`` ``"zero"`` or ``"mean"``. ``stats_device`` / ``memory_limit``: the memory plan."""
    from lensmat.analyses.common import start_run
    from lensmat.lenses.registry import parse_lenses

    names = parse_lenses(lenses)
    model = start_run(model)
    swaps, ablations = parse_sites(swap, "--swap"), parse_sites(ablate, "--ablate")
    for kind, block in swaps:
        submodule_pair(model, kind, block)  # refuse a bad kind or block before any work
    steer = None
    if steer_layer is None and (steer_vector is not None or steer_from is not None or steer_to is not None):
        raise ValueError("A steering vector needs its layer: steer_layer= (--steer LAYER).")
    if steer_layer is not None:
        if (steer_vector is None) == (steer_from is None and steer_to is None):
            raise ValueError("Steering at a layer needs one vector: steer_vector= (--steer-vector FILE) or both contrast "
                             "prompts steer_from= and steer_to= (--steer-from TEXT --steer-to TEXT).")
        if steer_vector is None and (steer_from is None or steer_to is None):
            raise ValueError("Steering from contrast prompts needs both steer_from= and steer_to= "
                             "(--steer-from TEXT --steer-to TEXT).")
    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation={ablation!r}: use 'zero' or 'mean'.")
    ablations = [Ablate(kind, block, ablation) for kind, block in ablations]
    for a in ablations:
        a.hook_name(model)
    encode_text(model, text)  # refuse a bad text before fitting anything
    if generate is not None:
        _check_generate(model, encode_text(model, text), generate)
    resolve_targets(model, targets, 1)
    if steer_layer is not None:
        if steer_vector is not None:
            source = str(steer_vector) if isinstance(steer_vector, (str, os.PathLike)) else "given vector"
            vector = load_vector(steer_vector) if isinstance(steer_vector, (str, os.PathLike)) else steer_vector
        else:
            source = f"contrast: mean h_{steer_layer}({steer_to!r}) - mean h_{steer_layer}({steer_from!r})"
            vector = steering_vector(model, steer_layer, steer_to, steer_from)
        steer = Steer(steer_layer, vector, scale, source=source)
        steer.check(model)
    if not (hooks or swaps or steer or ablations):
        raise ValueError("No intervention given: pass hooks=, swap='KIND@BLOCK', steer_layer= with a vector, or "
                         "ablate='KIND@BLOCK' (on the command line --swap, --steer, --ablate).")
    built, cost, train, memory = fit_named_lenses(
        model, lenses, dataset, maps=maps, tuned=tuned, tuned_config=tuned_config, max_fit_tokens=max_fit_tokens,
        batch_size=batch_size, max_length=max_length, stats_device=stats_device, memory_limit=memory_limit,
        progress=progress)
    swap_specs, swap_cost = [], None
    if swaps:
        import time

        from lensmat.stats import artifacts

        start = time.perf_counter()
        if swap_maps is None:
            from lensmat.analyses.submodules import fit_submodule_maps

            sub = fit_submodule_maps(model, dataset, kinds=sorted({k for k, _ in swaps}),
                                     blocks=sorted({b for _, b in swaps}), intercept=intercept,
                                     max_fit_tokens=max_fit_tokens, batch_size=batch_size,
                                     max_length=max_length or train.max_length, progress=progress)
        else:
            sub = artifacts.load_maps(swap_maps, model) if isinstance(swap_maps, (str, os.PathLike)) else swap_maps
        swap_cost = {"seconds": time.perf_counter() - start, "tokens": int(sub.provenance.get("n_tokens", 0)),
                     "reused": swap_maps is not None, "intercept": bool(sub.intercept)}
        swap_specs = [(sub, [kind], [block]) for kind, block in swaps]
    view = intervene(model, built, text, hooks=hooks, swap=swap_specs or None, steer=steer, ablate=ablations or None,
                     targets=targets, k=k, generate=generate, tol=tol, dataset=dataset,
                     ablation_tokens=ablation_tokens, progress=progress)
    report = {**view.summary(), "model_info": describe(model).to_dict(), "dataset": train.dataset, "k": k,
              "protocol": "masked" if view.clean.masked else "causal",
              "fit_cost": {**{n: cost[n] for n in names}, **({"swap": swap_cost} if swap_cost else {})},
              "memory_plan": memory}
    return view, report

"""Hook activations -> streaming sufficient statistics (float64, additive).

A *group* is a tuple of hook names whose activations at the same token are concatenated into
one vector ``z = [a_1, ..., a_k]`` (each ``a_i`` of width ``d_i``). For each group the
collector keeps, over every scored position (non-padding, not BOS):

    n = number of tokens,   s = Σ z   (float64, [D]),   G = Σ z zᵀ   (float64, [D, D])

with ``D = Σ d_i``. These are all a least-squares fit, an R² or a linearity score needs
(see :mod:`lensmat.fit`); activations are never stored, so memory is ``O(D²)`` whatever the
number of tokens. Statistics add: ``a + b`` merges runs (or processes: ``all_reduce``).

Residual layers: ``resid_hooks(L)`` = ``[h_0, ..., h_L]`` with
``h_0 = blocks.0.hook_resid_pre`` and ``h_l = blocks.{l-1}.hook_resid_post``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from lensmat.data import Batch
from lensmat.models import input_device, is_masked_lm


class ActivationError(RuntimeError):
    """Activations that cannot enter the statistics (NaN/Inf)."""


def resid_hook(layer: int) -> str:
    """Hook name of residual layer ``layer`` (0..L): ``h_0`` is ``blocks.0.hook_resid_pre``."""
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def resid_hooks(n_layers: int) -> list[str]:
    """``[h_0, ..., h_L]`` for an ``L``-block model."""
    return [resid_hook(layer) for layer in range(n_layers + 1)]


def check_layer(layer: int, n_layers: int, what: str = "layer") -> int:
    """``layer`` as a residual index 0..L, negative values counting from L (``-1`` = L)."""
    resolved = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= resolved <= n_layers:
        raise IndexError(
            f"{what} {layer} is out of range: this model has residual layers 0..{n_layers} "
            f"({n_layers} blocks); pass a value in 0..{n_layers} (or -1 for the last)."
        )
    return resolved


@dataclass
class GramStats:
    """Sufficient statistics of one hook group (see module docstring).

    ``n`` counts tokens; ``sum`` is ``[D]`` and ``gram`` ``[D, D]``, both float64.
    """

    hooks: tuple[str, ...]
    dims: tuple[int, ...]
    n: int = 0
    sum: Float[torch.Tensor, "D"] | None = None
    gram: Float[torch.Tensor, "D D"] | None = None
    device: str = field(default="cpu", compare=False)

    def __post_init__(self) -> None:
        size = sum(self.dims)
        if self.sum is None:
            self.sum = torch.zeros(size, dtype=torch.float64, device=self.device)
        if self.gram is None:
            self.gram = torch.zeros(size, size, dtype=torch.float64, device=self.device)

    @property
    def offsets(self) -> dict[str, slice]:
        out, start = {}, 0
        for hook, d in zip(self.hooks, self.dims):
            out[hook] = slice(start, start + d)
            start += d
        return out

    def update(self, z: Float[torch.Tensor, "n D"]) -> None:
        """Add the rows of ``z`` (one token per row, the group's hooks concatenated)."""
        z = z.to(self.gram.device, torch.float64)
        self.n += z.shape[0]
        self.sum += z.sum(0)
        # The upper block triangle only (hook i with hooks i..k), then mirrored: ~0.6x the flops of zᵀz.
        for part in self.offsets.values():
            self.gram[part, part.start:].addmm_(z[:, part].T, z[:, part.start:])
            self.gram[part.stop:, part] = self.gram[part, part.stop:].T

    def mean(self, hook: str) -> torch.Tensor:
        return self.sum[self.offsets[hook]] / self.n

    def block(self, hook_a: str, hook_b: str) -> torch.Tensor:
        """``Σ a bᵀ`` over tokens: ``[d_a, d_b]`` (float64)."""
        return self.gram[self.offsets[hook_a], self.offsets[hook_b]]

    def __add__(self, other: "GramStats") -> "GramStats":
        if (self.hooks, self.dims) != (other.hooks, other.dims):
            raise ValueError(f"Cannot add statistics of different hook groups: {self.hooks} vs {other.hooks}.")
        return GramStats(self.hooks, self.dims, self.n + other.n, self.sum + other.sum.to(self.sum.device),
                         self.gram + other.gram.to(self.gram.device), self.device)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for saving (safetensors)."""
        return {f"{prefix}.sum": self.sum.cpu(), f"{prefix}.gram": self.gram.cpu(),
                f"{prefix}.n": torch.tensor([self.n], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, hooks, dims, tensors: dict[str, torch.Tensor], prefix: str) -> "GramStats":
        return cls(tuple(hooks), tuple(dims), int(tensors[f"{prefix}.n"][0]), tensors[f"{prefix}.sum"].double(),
                   tensors[f"{prefix}.gram"].double())


def _check_finite(name: str, act: torch.Tensor) -> None:
    if not torch.isfinite(act).all():
        bad = int((~torch.isfinite(act)).sum())
        raise ActivationError(
            f"{bad} NaN/Inf values in activations at hook {name!r}; statistics would be corrupted. "
            "Check the model's dtype (float16 overflows: try bfloat16 or float32) and its inputs."
        )


def check_hooks(model, hooks: Iterable[str]) -> None:
    """Raise ``KeyError`` naming hook names the model does not have."""
    unknown = sorted(h for h in set(hooks) if h not in model.hook_dict)
    if unknown:
        raise KeyError(
            f"Unknown hook name(s) {unknown}; this model has e.g. {list(model.hook_dict)[:6]} ... "
            "(see model.hook_dict for all)."
        )


@torch.no_grad()
def run_capture(
    model, batch: Batch, hooks: Sequence[str], *, logits: bool = False,
) -> tuple[dict[str, Float[torch.Tensor, "n d"]], Float[torch.Tensor, "n vocab"] | None]:
    """One forward pass; returns the activations at ``hooks`` and (optionally) the model's logits,
    each restricted to the batch's scored positions (rows in ``batch.score_mask`` order). A masked
    LM also gets the batch's attention mask, so padding never leaks into real positions.

    Raises :class:`ActivationError` when a captured activation holds NaN/Inf.
    """
    mask = batch.score_mask
    captured: dict[str, torch.Tensor] = {}

    def capture_into(name: str):
        def capture(act: torch.Tensor, hook) -> None:
            rows = act[mask.to(act.device)]  # blocks may sit on different devices (device_map)
            _check_finite(name, rows)
            captured[name] = rows

        return capture

    device = input_device(model)
    extra = {"attention_mask": batch.attention_mask.to(device)} if is_masked_lm(model) else {}
    out = model.run_with_hooks(batch.tokens.to(device), fwd_hooks=[(h, capture_into(h)) for h in dict.fromkeys(hooks)],
                               return_type="logits" if logits else None, **extra)
    return captured, (out[mask.to(out.device)] if logits else None)


@torch.no_grad()
def collect(
    model,
    batches: Iterable[Batch],
    groups: Sequence[Sequence[str]],
    *,
    stats: list[GramStats] | None = None,
    total_tokens: int | None = None,
    progress: bool = True,
    stats_device: str | torch.device = "cpu",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
) -> list[GramStats]:
    """Run ``batches`` through ``model`` and accumulate one :class:`GramStats` per group.

    Args:
        model: a ``TransformerBridge`` (any module with ``run_with_hooks`` and ``hook_dict``).
        batches: padded batches; only ``score_mask`` positions enter the statistics.
        groups: hook-name tuples, e.g. ``[resid_hooks(L)]`` for all layer pairs, or
            ``[("blocks.3.ln1.hook_out", "blocks.3.hook_attn_out")]`` for one sub-module.
        stats: statistics to continue from (e.g. another run's); new ones otherwise.
        total_tokens: scored tokens expected, for the progress bar.
        progress: show a progress bar with tokens/s.
        stats_device: where the float64 statistics live.
        checkpoint: a folder where the statistics are saved atomically every ``checkpoint_every``
            batches. With ``resume=True`` an existing checkpoint is loaded and its
            batches are skipped, so the result is bit-identical to an uninterrupted run over the
            same (deterministic) batches.

    Raises :class:`ActivationError` on NaN/Inf and ``KeyError`` on an unknown hook name.
    """
    groups = [tuple(g) for g in groups]
    needed = [h for g in groups for h in g]
    check_hooks(model, needed)
    done = 0
    if resume:
        if checkpoint is None:
            raise ValueError("resume=True needs the checkpoint folder to resume from.")
        if Path(checkpoint).exists():
            stats, done = load_checkpoint(checkpoint, groups)
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="collect", disable=not progress)
    start, seen = time.perf_counter(), 0
    try:
        for i, batch in enumerate(batches):
            if i < done:  # already in the resumed statistics
                bar.update(batch.n_scored)
                continue
            captured, _ = run_capture(model, batch, needed)
            stats = update_stats(stats, groups, captured, stats_device)
            seen += batch.n_scored
            bar.update(batch.n_scored)
            bar.set_postfix(tok_s=f"{seen / (time.perf_counter() - start):.0f}")
            if checkpoint is not None and (i + 1) % checkpoint_every == 0:
                save_checkpoint(checkpoint, stats, i + 1)
    finally:
        bar.close()
    if stats is None:
        raise ValueError("No batches were given to collect(); check the corpus split and max_tokens.")
    return stats


def save_checkpoint(path: str | os.PathLike, stats: list[GramStats], n_batches: int) -> None:
    """Atomically save statistics after ``n_batches`` batches (a lensmat ``stats`` folder)."""
    from lensmat import io

    tensors = {k: v for i, st in enumerate(stats) for k, v in st.tensors(str(i)).items()}
    meta = {"model": {}, "n_batches": n_batches, "groups": [list(st.hooks) for st in stats],
            "dims": [list(st.dims) for st in stats]}
    io.save_artifact(path, "stats", tensors, meta, force=True)


def load_checkpoint(path: str | os.PathLike, groups: Sequence[Sequence[str]]) -> tuple[list[GramStats], int]:
    """``(statistics, batches done)`` from a checkpoint, refusing one made for other hook groups."""
    from lensmat import io

    tensors, meta = io.load_artifact(path, "stats")
    if [list(g) for g in groups] != meta["groups"]:
        raise io.ArtifactError(f"The checkpoint in {path} was made for other hook groups ({meta['groups']}); "
                               "delete it or fit with the same settings.")
    stats = [GramStats.from_tensors(g, d, tensors, str(i)) for i, (g, d) in enumerate(zip(meta["groups"], meta["dims"]))]
    return stats, int(meta["n_batches"])


def update_stats(
    stats: list[GramStats] | None, groups: Sequence[Sequence[str]], captured: dict[str, torch.Tensor],
    stats_device: str | torch.device = "cpu",
) -> list[GramStats]:
    """Add one batch of captured rows to the statistics of each group (creating them if ``None``)."""
    if stats is None:
        stats = [GramStats(tuple(g), tuple(captured[h].shape[-1] for h in g), device=str(stats_device)) for g in groups]
    for st, g in zip(stats, groups):
        st.update(torch.cat([captured[h].to(st.gram.device) for h in g], dim=-1))
    return stats

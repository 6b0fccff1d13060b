"""Hook activations -> streaming sufficient statistics (:class:`~lensmat.stats.gram.GramStats`).

The collector runs batches through the model, captures the hooks of each group at every scored
position (non-padding, not BOS) and adds them to that group's float64 statistics; activations
are never stored. It checkpoints and resumes those statistics.

Residual layers: ``resid_hooks(L)`` = ``[h_0, ..., h_L]`` with
``h_0 = blocks.0.hook_resid_pre`` and ``h_l = blocks.{l-1}.hook_resid_post`` (site ``post``);
site ``mid`` is ``blocks.{l}.hook_resid_mid`` for blocks ``l = 0..L-1`` (after attention, before the
MLP, between ``h_l`` and ``h_{l+1}``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from lensmat.data import Batch
from lensmat.stats.gram import GramStats
from lensmat.models import input_device, is_masked_lm
from lensmat.outputs import check_interrupted


class ActivationError(RuntimeError):
    """Activations that cannot enter the statistics (NaN/Inf)."""


def resid_hook(layer: int) -> str:
    """Hook name of residual layer ``layer`` (0..L): ``h_0`` is ``blocks.0.hook_resid_pre``."""
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def resid_hooks(n_layers: int) -> list[str]:
    """``[h_0, ..., h_L]`` for an ``L``-block model."""
    return [resid_hook(layer) for layer in range(n_layers + 1)]


SITES = ("post", "mid")


def check_site(site: str) -> str:
    """``site`` if it is one of :data:`SITES`, else a ``ValueError`` naming them."""
    if site not in SITES:
        raise ValueError(f"Unknown residual site {site!r}; valid sites: {', '.join(SITES)}.")
    return site


def site_hooks(n_layers: int, site: str) -> list[str]:
    """The hooks of a residual site: ``post`` = ``resid_hooks(L)`` (L+1), ``mid`` = the ``L`` blocks'
    ``hook_resid_mid``."""
    if check_site(site) == "post":
        return resid_hooks(n_layers)
    return [f"blocks.{block}.hook_resid_mid" for block in range(n_layers)]


def parse_sites(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"post,mid"`` -> ``("post", "mid")``: known sites in :data:`SITES` order, ``post`` always first."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    for name in names:
        if name:
            check_site(name)
    return tuple(n for n in SITES if n == "post" or n in names)


def check_layer(layer: int, n_layers: int, what: str = "layer") -> int:
    """``layer`` as a residual index 0..L, negative values counting from L (``-1`` = L)."""
    resolved = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= resolved <= n_layers:
        raise IndexError(
            f"{what} {layer} is out of range: this model has residual layers 0..{n_layers} "
            f"({n_layers} blocks); pass a value in 0..{n_layers} (or -1 for the last)."
        )
    return resolved


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


class _Captured(Exception):
    """Raised by the last capture of a forward that need not go on (no logits wanted)."""


@torch.no_grad()
def run_capture(
    model, batch: Batch, hooks: Sequence[str], *, logits: bool = False, fwd_hooks: Sequence = (),
) -> tuple[dict[str, Float[torch.Tensor, "n d"]], Float[torch.Tensor, "n vocab"] | None]:
    """One forward pass; returns the activations at ``hooks`` and (optionally) the model's logits,
    each restricted to the batch's scored positions (rows in ``batch.score_mask`` order). A masked
    LM also gets the batch's attention mask, so padding never leaks into real positions.
    ``fwd_hooks`` (``[(name, fn)]``, e.g. :func:`lensmat.analyses.swap.swap_hooks`) run before the captures.
    Without ``logits`` the forward stops once every hook is captured (no final norm, no unembedding).

    Raises :class:`ActivationError` when a captured activation holds NaN/Inf.
    """
    mask = batch.score_mask
    captured: dict[str, torch.Tensor] = {}

    def capture_into(name: str):
        def capture(act: torch.Tensor, hook) -> None:
            rows = act[mask.to(act.device)]  # blocks may sit on different devices (device_map)
            _check_finite(name, rows)
            captured[name] = rows
            if not logits and len(captured) == len(wanted):
                raise _Captured

        return capture

    device = input_device(model)
    wanted = dict.fromkeys(hooks)
    extra = {"attention_mask": batch.attention_mask.to(device)} if is_masked_lm(model) else {}
    try:
        out = model.run_with_hooks(batch.tokens.to(device), fwd_hooks=[*fwd_hooks, *((h, capture_into(h)) for h in wanted)],
                                   return_type="logits" if logits else None, **extra)
    except _Captured:
        return captured, None
    return captured, (out[mask.to(out.device)] if logits else None)


# Long for its 12 arguments and their docs; the body (~30 lines) is one resumable loop, clearer whole.
@torch.no_grad()
def collect(
    model,
    batches: Iterable[Batch],
    groups: Sequence[Sequence[str]],
    *,
    pairs: Sequence[tuple[tuple[int, int], ...] | None] | None = None,
    stats: list[GramStats] | None = None,
    total_tokens: int | None = None,
    progress: bool = True,
    stats_device: str | torch.device = "cpu",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    identity: dict | None = None,
) -> list[GramStats]:
    """Run ``batches`` through ``model`` and accumulate one :class:`GramStats` per group.

    Args:
        model: a ``TransformerBridge`` (any module with ``run_with_hooks`` and ``hook_dict``).
        batches: padded batches; only ``score_mask`` positions enter the statistics.
        groups: hook-name tuples, e.g. ``[resid_hooks(L)]`` for all layer pairs, or
            ``[("blocks.3.ln1.hook_out", "blocks.3.hook_attn_out")]`` for one sub-module.
        pairs: per group, the index pairs whose cross-products to keep (:func:`pair_pattern`;
            ``None`` = all pairs, the default).
        stats: statistics to continue from (e.g. another run's); new ones otherwise.
        total_tokens: scored tokens expected, for the progress bar.
        progress: show a progress bar with tokens/s.
        stats_device: where the float64 statistics live.
        checkpoint: a folder where the statistics are saved atomically every ``checkpoint_every``
            batches. With ``resume=True`` an existing checkpoint is loaded and its
            batches are skipped, so the result is bit-identical to an uninterrupted run over the
            same (deterministic) batches.
        identity: what shapes the statistics beyond the hook groups (model, corpus, batch size, token
            budget, ...; JSON-able), saved in the checkpoint; a resume whose identity differs is
            refused with every difference named, so tokens are never mixed or counted twice.

    Raises :class:`ActivationError` on NaN/Inf and ``KeyError`` on an unknown hook name.
    """
    if checkpoint is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every}: save the checkpoint every N >= 1 batches.")
    groups = [tuple(g) for g in groups]
    pairs = [None] * len(groups) if pairs is None else list(pairs)
    needed = [h for g in groups for h in g]
    check_hooks(model, needed)
    done = 0
    if resume:
        if checkpoint is None:
            raise ValueError("resume=True needs the checkpoint folder to resume from.")
        if Path(checkpoint).exists():
            stats, done = load_checkpoint(checkpoint, groups, pairs, identity)
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="collect", disable=not progress)
    start, seen = time.perf_counter(), 0
    try:
        for i, batch in enumerate(batches):
            check_interrupted()  # a Ctrl-C is never lost, even one that landed where exceptions are ignored
            if i < done:  # already in the resumed statistics
                bar.update(batch.n_scored)
                continue
            captured, _ = run_capture(model, batch, needed)
            stats = update_stats(stats, groups, captured, stats_device, pairs)
            seen += batch.n_scored
            bar.update(batch.n_scored)
            bar.set_postfix(tok_s=f"{seen / (time.perf_counter() - start):.0f}")
            if checkpoint is not None and (i + 1) % checkpoint_every == 0:
                save_checkpoint(checkpoint, stats, i + 1, identity)
    finally:
        bar.close()
    if stats is None:
        raise ValueError("No batches were given to collect(); check the corpus split and max_tokens.")
    return stats


def save_checkpoint(path: str | os.PathLike, stats: list[GramStats], n_batches: int,
                    identity: dict | None = None) -> None:
    """Atomically save statistics after ``n_batches`` batches (a lensmat ``stats`` folder) with the
    run's ``identity`` (see :func:`collect`)."""
    from lensmat.stats import artifacts as io

    tensors = {k: v for i, st in enumerate(stats) for k, v in st.tensors(str(i)).items()}
    identity = json.loads(json.dumps(identity or {}))
    meta = {"model": identity.get("model", {}), "run": identity, "n_batches": n_batches, "groups": [list(st.hooks) for st in stats],
            "dims": [list(st.dims) for st in stats],
            "pairs": [None if st.pairs is None else [list(p) for p in st.pairs] for st in stats]}
    io.save_artifact(path, "stats", tensors, meta, force=True)


def _differences(saved, now, key: str = "") -> list[str]:
    """``key: checkpoint X, now Y`` for every leaf where two JSON-like values differ."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now), key=str)
                for d in _differences(saved.get(k), now.get(k), f"{key}.{k}" if key else str(k))]
    return [] if saved == now else [f"{key}: checkpoint {saved!r}, now {now!r}"]


def load_checkpoint(path: str | os.PathLike, groups: Sequence[Sequence[str]],
                    pairs: Sequence | None = None, identity: dict | None = None) -> tuple[list[GramStats], int]:
    """``(statistics, batches done)`` from a checkpoint, refusing one made for other hook groups or
    pairs, or (given ``identity``) for another run: each difference is named."""
    from lensmat.stats import artifacts as io

    tensors, meta = io.load_artifact(path, "stats")
    if identity is not None:
        if "run" not in meta:
            raise io.ArtifactError(f"The checkpoint in {path} does not record the run it belongs to (an older lensmat "
                                   "wrote it); delete it and fit again.")
        diffs = _differences(meta["run"], json.loads(json.dumps(identity)))
        if diffs:
            shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            raise io.ArtifactError(f"The checkpoint in {path} belongs to another fit: {shown}. Resume with the same "
                                   "model, data and settings, or delete the checkpoint to start over.")
    saved_pairs = meta.get("pairs") or [None] * len(meta["groups"])
    stats = [GramStats.from_tensors(g, d, tensors, str(i), p)
             for i, (g, d, p) in enumerate(zip(meta["groups"], meta["dims"], saved_pairs))]
    same = [list(g) for g in groups] == meta["groups"] and [
        GramStats(tuple(g), tuple(st.dims), pairs=p).pairs == st.pairs
        for g, st, p in zip(groups, stats, pairs or [None] * len(groups))] == [True] * len(stats)
    if not same:
        raise io.ArtifactError(f"The checkpoint in {path} was made for other hook groups or pairs ({meta['groups']}); "
                               "delete it or fit with the same settings.")
    return stats, int(meta["n_batches"])


def update_stats(
    stats: list[GramStats] | None, groups: Sequence[Sequence[str]], captured: dict[str, torch.Tensor],
    stats_device: str | torch.device = "cpu", pairs: Sequence | None = None,
) -> list[GramStats]:
    """Add one batch of captured rows to the statistics of each group (creating them if ``None``,
    keeping ``pairs[g]`` of group ``g``: see :func:`pair_pattern`)."""
    if stats is None:
        pairs = [None] * len(groups) if pairs is None else pairs
        stats = [GramStats(tuple(g), tuple(captured[h].shape[-1] for h in g), pairs=p, device=str(stats_device))
                 for g, p in zip(groups, pairs)]
    for st, g in zip(stats, groups):
        st.update(torch.cat([captured[h].to(st.sum.device) for h in g], dim=-1))
    return stats

"""Anisotropy and intrinsic dimension of the residual layers ``h_0..h_L``, as LLM-Microscope defines
them (Razzhigaev et al.; PyPI ``llm-microscope`` 0.0.7, ``llm_microscope/functions.py``:
``calculate_anisotropy_torch`` and ``intrinsic_dimension``; layer-wise use in the repository's
``LLM_microscope.ipynb``).

Both take one layer's states at a set of tokens, ``X [n, d]`` (one row per token), and are
invariant to translating, scaling or rotating them.

Anisotropy (``calculate_anisotropy_torch``): centre ``X`` by its column mean; with ``λ`` the
eigenvalues of its covariance, ``λ_max / Σλ``, dimensionless, in ``[1/d, 1]``: 1 when every centred
state lies on one line, ``≈ 1/d`` for an isotropic cloud (about ``(1 + sqrt(d/n))² / d`` for ``n``
Gaussian samples). It needs the centred second moments only, so :func:`anisotropy_profile` reads it
from streaming statistics over every token (none stored).

Intrinsic dimension (``intrinsic_dimension``): the TwoNN estimator (Facco et al. 2017) with the
package's choices. ``X`` is centred and divided by its mean row norm (float64); each point's
distances ``r_1 ≤ r_2`` to its two nearest other points give ``μ = r_2 / r_1``. Of the ``N`` points,
the ``u`` with ``r_1 < 1e-8`` (duplicates) or ``μ ≤ 1 + 1e-8`` are set aside; the others, sorted,
get the empirical CDF ``F_i = (u + i) / N`` (``i = 1..``), and the smallest
``m = min(⌊(N − u) / reduction_factor⌋, N − u − 1)`` of them (default ``reduction_factor = 5``: the
lowest fifth) are fitted through the origin, ``−log(1 − F) = D · log μ``:
``D = Σ log μ_i · (−log(1 − F_i)) / Σ (log μ_i)²`` (``F`` in float64; the package's float32 ``F`` moves
``D`` by ~3e-9 relative). It needs the states themselves (nearest
neighbours), so it reads the first ``max_id_tokens`` tokens (default 4096, the notebook's
``embs_dict[layer][:4096]``), stored as a :class:`LayerSample`; ``O(n² d)`` time per layer.

Undefined values are ``None`` (``null`` in a report): fewer than 2 tokens (anisotropy) or 3
(intrinsic dimension), a layer with no variance, or fewer than ``reduction_factor`` points left to fit.
:func:`lensmat.analyses.linearity.linearity` reports both per residual layer from the passes it
already makes (its held-out statistics; the unpruned pass of its pruning fills the sample);
:func:`layer_geometry` computes them alone on any corpus split. A masked LM is read at its ``[MASK]``
positions, like every other statistic of the masked protocol.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float

from lensmat import data
from lensmat.stats.collect import resid_hooks, run_capture, update_stats
from lensmat.stats.fit import centred
from lensmat.stats.gram import GramStats
from lensmat.stats.pipeline import tokenized

MAX_ID_TOKENS = 4096  # tokens the intrinsic dimension reads: the notebook's embs_dict[layer][:4096]
REDUCTION_FACTOR = 5  # the package's default: fit the lowest fifth of the sorted μ
EPS = 1e-8  # the package's eps: r_1 below it is a duplicate, μ at most 1 + eps a tie
_CANDIDATES = 8  # neighbours ranked by the fast (matmul) distances, then measured exactly


def _rows(x: torch.Tensor, what: str) -> Float[torch.Tensor, "n d"]:
    """``x`` as float64 rows, or a ``ValueError`` saying what is wrong with it."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{what} takes a 2-D tensor [n tokens, d] of one layer's states; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: the states hold {int((~torch.isfinite(x)).sum())} NaN/Inf values.")
    return x.double()


def anisotropy_of_covariance(c: Float[torch.Tensor, "d d"]) -> float | None:
    """``λ_max / Σλ`` of a covariance matrix (at any scale, e.g. the centred sum of products); ``None``
    when it is zero."""
    evals = torch.linalg.eigvalsh(c.double())
    total = float(evals.sum())
    return float(evals[-1]) / total if total > 0 else None


def anisotropy(x: Float[torch.Tensor, "n d"]) -> float | None:
    """Anisotropy of ``n`` states of one layer (``calculate_anisotropy_torch``): ``λ_max / Σλ`` of
    their covariance, in ``[1/d, 1]``; ``None`` for fewer than 2 rows or no variance."""
    x = _rows(x, "anisotropy")
    if x.shape[0] < 2:
        return None
    x = x - x.mean(0)
    return anisotropy_of_covariance(x.T @ x)


def anisotropy_profile(stats: GramStats) -> list[float | None]:
    """Anisotropy of each hook of ``stats`` (e.g. ``resid_hooks(L)``: ``L + 1`` values, index = residual
    layer) over its ``stats.n`` tokens, from the centred sums ``Σ (x − x̄)(x − x̄)ᵀ``."""
    return [anisotropy_of_covariance(centred(stats, h, h)) if stats.n >= 2 else None for h in stats.hooks]


def _two_nearest(x: Float[torch.Tensor, "n d"], chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_1, r_2)`` ``[n]`` each: each row's distances to its nearest and second-nearest other row.
    Candidates come from ``‖a‖² + ‖b‖² − 2 a·b``; their distances are then taken exactly, ``‖a − b‖``
    (as ``pairwise_distance`` does), so duplicates are at 0."""
    n = x.shape[0]
    sq = (x * x).sum(1)
    k = min(_CANDIDATES, n - 1)
    r1, r2 = torch.empty(n, dtype=x.dtype, device=x.device), torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        rows = x[start:start + chunk]
        d2 = sq[start:start + chunk, None] + sq[None, :] - 2 * rows @ x.T
        own = torch.arange(rows.shape[0], device=x.device)
        d2[own, own + start] = float("inf")  # not itself
        nearest = d2.topk(k, dim=1, largest=False).indices
        two = torch.linalg.vector_norm(rows[:, None, :] - x[nearest], dim=-1).topk(2, dim=1, largest=False).values
        r1[start:start + chunk], r2[start:start + chunk] = two[:, 0], two[:, 1]
    return r1, r2


@torch.no_grad()
def intrinsic_dimension(x: Float[torch.Tensor, "n d"], *, reduction_factor: int = REDUCTION_FACTOR,
                        device: str | torch.device | None = None) -> float | None:
    """TwoNN intrinsic dimension of ``n`` states of one layer, as ``llm_microscope.intrinsic_dimension``
    (module docstring): dimensionless, ``≈ k`` for points spread over a ``k``-dimensional manifold.
    ``None`` for fewer than 3 rows, all rows equal, or fewer than ``reduction_factor`` points with
    distinct nearest neighbours. Computed in float64 on ``device`` (default: ``x``'s)."""
    if not isinstance(reduction_factor, int) or reduction_factor < 1:
        raise ValueError(f"reduction_factor={reduction_factor!r}: fit the lowest 1/k of the ratios, k a positive integer.")
    x = _rows(x, "intrinsic_dimension").to(device or x.device)
    n = x.shape[0]
    if n < 3:
        return None
    x = x - x.mean(0)
    scale = float(torch.linalg.vector_norm(x, dim=1).mean())
    if scale == 0:
        return None
    r1, r2 = _two_nearest(x / scale)
    mu = r2 / r1
    kept = torch.sort(mu[(r1 >= EPS) & (mu > 1 + EPS)]).values
    m = min(kept.numel() // reduction_factor, kept.numel() - 1)
    if m < 1:
        return None
    set_aside = n - kept.numel()
    log_mu = kept[:m].log()
    log_tail = -torch.log(1 - torch.arange(set_aside + 1, set_aside + m + 1, dtype=torch.float64, device=x.device) / n)
    return float((log_mu * log_tail).sum() / (log_mu * log_mu).sum())


class LayerSample:
    """The first ``max_tokens`` rows captured at each of ``hooks`` (per hook ``[n, d]``, on the CPU, in
    the model's dtype): the stored states :func:`intrinsic_dimension` needs. Memory
    ``max_tokens · Σ d`` values, e.g. ``h_0..h_L`` of SmolLM2-135M (31 × 576) at 4096 tokens: 292 MB
    in float32. ``max_tokens = 0`` stores nothing (every value ``None``)."""

    def __init__(self, hooks: Sequence[str], max_tokens: int = MAX_ID_TOKENS) -> None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens}: store a non-negative number of tokens.")
        self.hooks, self.max_tokens, self.n = tuple(hooks), int(max_tokens), 0
        self._rows: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}

    @property
    def full(self) -> bool:
        return self.n >= self.max_tokens

    def add(self, captured: dict[str, Float[torch.Tensor, "rows d"]]) -> None:
        """Keep the leading rows of one batch's captures (``run_capture``'s output), up to the cap."""
        take = self.max_tokens - self.n
        if take <= 0:
            return
        for h in self.hooks:
            self._rows[h].append(captured[h][:take].detach().cpu())
        self.n += self._rows[self.hooks[0]][-1].shape[0]

    def states(self, hook: str) -> Float[torch.Tensor, "n d"]:
        rows = self._rows[hook]
        return torch.cat(rows) if rows else torch.empty(0, 0)


def intrinsic_dimension_profile(sample: LayerSample, *, reduction_factor: int = REDUCTION_FACTOR,
                                device: str | torch.device | None = None, progress: bool = False) -> list[float | None]:
    """:func:`intrinsic_dimension` of each hook of ``sample`` (``resid_hooks(L)``: ``L + 1`` values)."""
    from tqdm.auto import tqdm

    return [intrinsic_dimension(sample.states(h), reduction_factor=reduction_factor, device=device)
            for h in tqdm(sample.hooks, desc="intrinsic dimension", unit="layer", disable=not progress)]


def geometry_fields(stats: GramStats, sample: LayerSample, *, split: str, reduction_factor: int = REDUCTION_FACTOR,
                    device: str | torch.device | None = None, progress: bool = False) -> dict:
    """The report fields: ``anisotropy`` (over the tokens of ``stats``) and ``intrinsic_dimension``
    (over ``sample``), one value per hook (residual layer ``0..L``), and ``geometry``: the settings
    (``split``, ``n_tokens``, ``n_id_tokens``, ``max_id_tokens``, ``estimator``, ``reduction_factor``)."""
    if tuple(stats.hooks) != sample.hooks:
        raise ValueError(f"The statistics' hooks {stats.hooks} and the sample's {sample.hooks} differ.")
    return {"anisotropy": anisotropy_profile(stats),
            "intrinsic_dimension": intrinsic_dimension_profile(sample, reduction_factor=reduction_factor,
                                                               device=device, progress=progress),
            "geometry": {"split": split, "n_tokens": stats.n, "n_id_tokens": sample.n,
                         "max_id_tokens": sample.max_tokens, "estimator": "twonn",
                         "reduction_factor": reduction_factor, "definitions": "llm-microscope 0.0.7"}}


@torch.no_grad()
def layer_geometry(model, dataset=None, *, split: str = "heldout", max_tokens: int | None = 20_000,
                   max_id_tokens: int = MAX_ID_TOKENS, reduction_factor: int = REDUCTION_FACTOR, batch_size: int = 16,
                   max_length: int = data.DEFAULT_MAX_LENGTH, n_mask: int = 1, mask_seed: int = 0,
                   device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Anisotropy (over up to ``max_tokens`` scored tokens of ``dataset``'s ``split``) and intrinsic
    dimension (over the first ``max_id_tokens`` of them) of ``h_0..h_L``, in one pass: the fields of
    :func:`geometry_fields` (``L + 1`` values each, index = residual layer). A causal model is read at
    every position after BOS, a masked LM at its ``[MASK]`` positions (``n_mask`` per line, ``mask_seed``).
    ``device``: where the intrinsic dimension is computed (default the CPU)."""
    from tqdm.auto import tqdm

    corpus = tokenized(model, dataset, split, max_length, n_mask=n_mask, mask_seed=mask_seed)
    hooks = resid_hooks(int(model.cfg.n_layers))
    sample, stats = LayerSample(hooks, max_id_tokens), None
    bar = tqdm(total=corpus.n_tokens(max_tokens), unit="tok", unit_scale=True, desc="geometry", disable=not progress)
    for batch in corpus.batches(batch_size, max_tokens):
        captured, _ = run_capture(model, batch, hooks)
        stats = update_stats(stats, [hooks], captured, pairs=[()])  # the diagonal blocks: one covariance per layer
        sample.add(captured)
        bar.update(batch.n_scored)
    bar.close()
    if stats is None:
        raise ValueError(f"No tokens to read in split {split!r} of {corpus.dataset}; check the corpus and max_tokens.")
    return geometry_fields(stats[0], sample, split=split, reduction_factor=reduction_factor, device=device,
                           progress=progress)

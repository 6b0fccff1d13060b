"""Sufficient statistics -> linear maps by least squares, and R².

Maps act on row vectors: ``y ≈ x @ W (+ b)`` with ``W`` of shape ``[d_in, d_out]``. They are
solved in float64 from :class:`~lensmat.stats.gram.GramStats` and stored in float32.

- no intercept (the paper's choice): ``W = (XᵀX + λI)⁻¹ XᵀY``
- affine: the same on centred statistics, ``b = ȳ − x̄ W``

Precision: the statistics are raw float64 moments, so the centred (affine) fit loses about
``log10((mean/std)²)`` of float64's 16 digits for a feature whose mean is far larger than its
spread; residual streams (mean/std ≲ 10³) keep ≳ 10 digits.

The solve is a Cholesky factorisation. When the Gram matrix is singular or its condition
number exceeds ``max_cond`` (e.g. fewer tokens than ``d_in``), a ridge of
``1e-6 × mean eigenvalue`` is added with a warning that names the token count.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float

from lensmat.stats.gram import GramStats, pair_pattern

MAX_COND = 1e12


class IllConditionedWarning(UserWarning):
    """The Gram matrix needed a ridge to be solved."""


@dataclass
class LinearMap:
    """``y = x @ W + b`` from hook ``source`` to hook ``target`` (``b`` is ``None`` without intercept).

    Orientation: ``W`` is ``[d_in, d_out]`` and multiplies row vectors from the right, the transpose
    of ``nn.Linear.weight`` and of the paper's ``A x``; :attr:`weight` is ``W.T`` (``[d_out, d_in]``),
    so ``nn.Linear(d_in, d_out).weight.copy_(m.weight)`` and ``.bias.copy_(m.b)`` give the same map."""

    W: Float[torch.Tensor, "d_in d_out"]
    b: Float[torch.Tensor, "d_out"] | None
    source: str
    target: str

    def __call__(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_out"]:
        W = self.W.to(x.device, x.dtype)
        y = x @ W
        return y if self.b is None else y + self.b.to(x.device, x.dtype)

    @property
    def weight(self) -> Float[torch.Tensor, "d_out d_in"]:
        """``W.T``: the ``nn.Linear``-style (and the paper's ``A``) orientation."""
        return self.W.T

    def to(self, device=None, dtype=None) -> "LinearMap":
        return LinearMap(self.W.to(device, dtype), None if self.b is None else self.b.to(device, dtype),
                         self.source, self.target)

    @classmethod
    def identity(cls, d: int, hook: str) -> "LinearMap":
        return cls(torch.eye(d), None, hook, hook)


def centred(stats: GramStats, a: str, b: str) -> Float[torch.Tensor, "d_a d_b"]:
    """Centred sum of products ``Σ (a − ā)(b − b̄)ᵀ`` over the tokens of ``stats`` (float64)."""
    return stats.block(a, b) - stats.n * torch.outer(stats.mean(a), stats.mean(b))


def solve_spd(
    A: Float[torch.Tensor, "d d"], B: Float[torch.Tensor, "d k"], ridge: float = 0.0,
    n_tokens: int | None = None, max_cond: float = MAX_COND, what: str = "map",
) -> Float[torch.Tensor, "d k"]:
    """Solve ``(A + ridge·I) X = B`` for symmetric positive (semi)definite ``A`` in float64.

    Falls back to a small ridge (``1e-6 × mean eigenvalue``) with an :class:`IllConditionedWarning`
    when ``A + ridge·I`` is singular or worse conditioned than ``max_cond``.
    """
    A = A.double()
    d = A.shape[0]
    eye = torch.eye(d, dtype=A.dtype, device=A.device)
    A_r = A + ridge * eye
    evals = torch.linalg.eigvalsh(A_r)
    lo, hi = float(evals[0]), float(evals[-1])
    if hi <= 0 or lo <= 0 or hi / lo > max_cond:
        extra = 1e-6 * max(float(evals.clamp(min=0).mean()), 1e-30)
        rank = int((evals > max(hi, 0.0) / max_cond).sum())
        if n_tokens is not None and n_tokens < 4 * d:
            advice = f"Fit on more tokens than d (at least several times {d}) or pass ridge > 0 explicitly."
        else:
            advice = (f"The inputs span only about {rank} of {d} directions, so more tokens will not help (e.g. h_0 at "
                      "[MASK] positions depends only on the position); the ridge gives the least-norm map on that span.")
        tokens = f"{n_tokens} fit tokens" if n_tokens is not None else "the data"
        warnings.warn(
            f"The Gram matrix of the inputs of {what} is singular or ill-conditioned (condition "
            f"{hi / lo if lo > 0 else float('inf'):.3g}, d={d}, {tokens}); added a ridge of {extra:.3g}. {advice}",
            IllConditionedWarning,
            stacklevel=3,
        )
        A_r = A_r + extra * eye
    L, info = torch.linalg.cholesky_ex(A_r)
    if int(info) != 0:  # pragma: no cover - guarded by the eigenvalue check
        return torch.linalg.lstsq(A_r, B.double()).solution
    return torch.cholesky_solve(B.double(), L)


def fit_map(stats: GramStats, source: str, target: str, *, intercept: bool = False, ridge: float = 0.0) -> LinearMap:
    """Least-squares map from hook ``source`` to hook ``target`` (both in ``stats.hooks``), stored in float32."""
    W, b = solve_map(stats, source, target, intercept=intercept, ridge=ridge)
    return LinearMap(W.float(), None if b is None else b.float(), source, target)


def solve_map(stats: GramStats, source: str, target: str, *, intercept: bool = False, ridge: float = 0.0
              ) -> tuple[Float[torch.Tensor, "d_in d_out"], Float[torch.Tensor, "d_out"] | None]:
    """``(W, b)`` of :func:`fit_map` in float64, as solved (``b`` is ``None`` without intercept)."""
    for hook in (source, target):
        if hook not in stats.offsets:
            raise KeyError(f"Hook {hook!r} is not in these statistics (they hold {list(stats.hooks)}).")
    if stats.n == 0:
        raise ValueError("These statistics hold no tokens; collect on a non-empty split first.")
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge={ridge} is not a penalty: use a finite ridge >= 0 (0 = plain least squares).")
    if intercept:
        A, B = centred(stats, source, source), centred(stats, source, target)
    else:
        A, B = stats.block(source, source), stats.block(source, target)
    W = solve_spd(A, B, ridge, n_tokens=stats.n, what=source)  # A depends on the source only: one warning per source
    return W, (stats.mean(target) - stats.mean(source) @ W if intercept else None)


def residual_sums(stats: GramStats, m: LinearMap | None, source: str, target: str) -> Float[torch.Tensor, "d_out"]:
    """Per-coordinate ``Σ (y − ŷ)²`` over the tokens of ``stats``; ``m=None`` means ``ŷ = x``."""
    yy = torch.diagonal(stats.block(target, target))
    if m is None:
        return yy - 2 * torch.diagonal(stats.block(source, target)) + torch.diagonal(stats.block(source, source))
    W = m.W.to(stats.sum.device, torch.float64)
    xy, xx = stats.block(source, target), stats.block(source, source)
    out = yy - 2 * (W * xy).sum(0) + (W * (xx @ W)).sum(0)
    if m.b is not None:
        b = m.b.to(stats.sum.device, torch.float64)
        resid_sum = stats.sum[stats.offsets[target]] - stats.sum[stats.offsets[source]] @ W  # Σ (y − xW)
        out = out - 2 * b * resid_sum + stats.n * b * b
    return out


def r2(stats: GramStats, m: LinearMap | None, source: str, target: str) -> float:
    """The paper's R²: per coordinate ``1 − Σ(y−ŷ)²/Σ(y−ȳ_d)²``, averaged uniformly over d."""
    total = torch.diagonal(stats.block(target, target)) - stats.n * stats.mean(target) ** 2
    return float((1 - residual_sums(stats, m, source, target) / total).mean())


@dataclass
class MapSet:
    """Fitted maps keyed by ``(source hook, target hook)``, with the provenance that travels with them.

    ``model`` is the :class:`~lensmat.models.identity.ModelInfo` (as a dict) of the model the maps were
    fitted on; ``provenance`` holds what was fitted and on which data (dataset spec, split, token
    count, ...). Save and load with :func:`lensmat.stats.artifacts.save_maps` / :func:`lensmat.stats.artifacts.load_maps`.
    """

    maps: dict[tuple[str, str], LinearMap]
    model: dict
    intercept: bool = False
    ridge: float = 0.0
    provenance: dict | None = None

    def get(self, source: str, target: str) -> LinearMap:
        try:
            return self.maps[(source, target)]
        except KeyError:
            raise KeyError(
                f"No map {source} -> {target} in this map set; it holds {len(self.maps)} maps, e.g. "
                f"{list(self.maps)[:3]}. Fit it (lensmat.fit_layer_maps / fit_submodule_maps)."
            ) from None

    def check_model(self, model) -> None:
        """Refuse a model that differs from the one these maps were fitted on."""
        from lensmat.models import check_same_model

        check_same_model(self.model, model, what="these maps")


def fit_pairs(
    stats: list[GramStats], pairs: list[tuple[str, str]], *, intercept: bool = False, ridge: float = 0.0,
) -> dict[tuple[str, str], LinearMap]:
    """Fit every ``(source, target)`` pair from whichever statistics group holds both hooks."""
    out = {}
    for src, tgt in pairs:
        group = next((st for st in stats if src in st.offsets and tgt in st.offsets), None)
        if group is None:
            raise KeyError(f"No statistics group holds both {src!r} and {tgt!r}; collect them in one group.")
        out[(src, tgt)] = fit_map(group, src, tgt, intercept=intercept, ridge=ridge)
    return out


def layer_pairs(hooks: tuple[str, ...] | list[str], all_pairs: bool = False) -> list[tuple[str, str]]:
    """Residual pairs ``h_l -> h_L`` (``l < L``), or every ``h_l -> h_l'`` with ``l < l'``.

    The layer-to-itself map is the identity by definition and is not fitted.
    """
    return [(src, tgt) for i, src in enumerate(hooks[:-1]) for tgt in (hooks[i + 1:] if all_pairs else hooks[-1:])]


def fit_layer_maps(
    stats: GramStats, *, intercept: bool = False, ridge: float = 0.0, all_pairs: bool = False,
) -> dict[tuple[str, str], LinearMap]:
    """Maps between residual layers from the joint statistics of ``resid_hooks(L)`` (see :func:`layer_pairs`)."""
    return fit_pairs([stats], layer_pairs(stats.hooks, all_pairs), intercept=intercept, ridge=ridge)


def fit_to_last(residuals, hooks: tuple[str, ...], *, intercept: bool = False, what: str = "positions"
                ) -> tuple[dict[tuple[str, str], LinearMap], int]:
    """Least-squares maps ``hooks[i] -> hooks[-1]`` from float64 statistics streamed over ``residuals``, an
    iterable of ``[len(hooks), n, d]`` tensors (the states at each hook of ``n`` positions), for models
    read outside the collector (an image classifier's CLS token, an encoder-decoder's decoder).
    Returns the maps (:func:`fit_layer_maps`) and the number of positions; none is refused, naming ``what``."""
    stats = None
    for resid in residuals:
        if stats is None:
            stats = GramStats(tuple(hooks), (int(resid.shape[-1]),) * len(hooks),
                              pairs=pair_pattern(len(hooks), "to_last"))
        stats.update(resid.permute(1, 0, 2).reshape(resid.shape[1], -1).cpu())
    if stats is None or stats.n == 0:
        raise ValueError(f"No {what} to fit the maps on.")
    return fit_layer_maps(stats, intercept=intercept), stats.n


def r2_matrices(
    heldout: GramStats, maps: dict[tuple[str, str], LinearMap],
) -> dict[str, list[list[float | None]]]:
    """R² of ``mat`` (the fitted map) and ``id`` (ŷ = x) for every residual pair ``l < l'``.

    ``(L+1)×(L+1)`` nested lists indexed ``[l][l']``, ``None`` where ``l ≥ l'`` (and where the
    held-out statistics keep no ``(l, l')`` block, e.g. ``l' < L`` without all pairs); computed
    from held-out statistics of the same hooks.
    """
    hooks = heldout.hooks
    size = len(hooks)
    mat = [[None] * size for _ in range(size)]
    ident = [[None] * size for _ in range(size)]
    for i in range(size):
        for j in range(i + 1, size):
            if not heldout.has_block(hooks[i], hooks[j]):  # statistics kept for maps to the last layer only
                continue
            ident[i][j] = r2(heldout, None, hooks[i], hooks[j])
            if (hooks[i], hooks[j]) in maps:
                mat[i][j] = r2(heldout, maps[(hooks[i], hooks[j])], hooks[i], hooks[j])
    return {"mat": mat, "id": ident}

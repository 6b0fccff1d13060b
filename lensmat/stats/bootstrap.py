"""Uncertainty over documents: per-document sums kept while streaming, then a bootstrap.

Tokens of one line are correlated, so the unit resampled is the document (a corpus line,
``Batch.lines``), never the token. Every mean lensmat streams is a ratio ``Σ values / Σ counts``
over positions; :class:`DocumentSums` keeps those two sums per document (memory: statistics ×
documents, never tokens), which is all a resample needs. Drawing ``D`` documents with replacement
is a count vector ``w`` (multinomial, ``Σ w = D``) and the resampled mean is ``(w·num) / (w·den)``:
:class:`Bootstrap` draws one ``[B, D]`` matrix of counts from its seed and every statistic of a run
is one matrix product with it, so paired differences (lens A − lens B at a layer) use the very same
resamples as the intervals.

- Interval: the percentile interval, the ``(1 − confidence)/2`` and ``(1 + confidence)/2``
  quantiles of the ``B`` resampled means.
- Paired test of ``a − b``: its percentile interval, and the two-sided p-value ``2·Φ(−|d̂| / se*)`` with
  ``se*`` the standard deviation of the ``B`` resampled differences ``d*`` (a Wald test with the
  bootstrap's standard error). Not the percentile p-value ``2·#{d* on the far side of 0} / B``: that
  one cannot go below ``2/(B + 1)``, which Holm over 31 layers multiplies past 0.05 at ``B = 1000``.
- :func:`holm`: Holm's step-down adjustment over a family of p-values (the layers).

This is a hand-written ratio bootstrap rather than ``scipy.stats.bootstrap``: on 800 statistics ×
300 documents × 1,000 resamples scipy's took 10.1 s and this 0.17 s (``benchmarks/bench_bootstrap.py``), and the shared
count matrix is what makes the comparisons paired. ``tests/test_bootstrap.py`` checks it against
scipy's on the same data.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
FEW_DOCUMENTS = 20


class FewDocumentsWarning(UserWarning):
    """The held-out text had too few documents for a bootstrap over documents to be reliable."""


class DocumentSums:
    """Named per-document sums, each ``[*shape, D]`` float64 (``D`` grows with the documents seen).

    ``add(name, index, docs, values)`` adds ``values[i]`` (one per position) to document ``docs[i]`` of
    entry ``index`` of ``name``; ``capacity`` (a host int, ``> docs.max()``) sizes the storage without
    reading the device."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.sums: dict[str, torch.Tensor] = {}

    @property
    def n_columns(self) -> int:
        return next(iter(self.sums.values())).shape[-1] if self.sums else 0

    def add(self, name: str, index, docs: Int[torch.Tensor, "n"], values: Float[torch.Tensor, "n"],
            capacity: int) -> None:
        if capacity > self.n_columns:  # grow every entry by doubling, to the same width
            width = max(capacity, 2 * self.n_columns, 64)
            for key, s in self.sums.items():
                self.sums[key] = torch.cat([s, s.new_zeros(*self.shape, width - s.shape[-1])], -1)
        if name not in self.sums:
            self.sums[name] = torch.zeros(*self.shape, max(capacity, self.n_columns, 64), dtype=torch.float64,
                                          device=values.device)
        self.sums[name][index].index_add_(-1, docs, values.double())

    def total(self, name: str) -> torch.Tensor:
        """``[*shape]``: the sum over documents."""
        return self.sums[name].sum(-1)


@dataclass(frozen=True)
class Interval:
    """A ratio of sums with its bootstrap interval, each ``[*shape]`` (NaN where the denominator is 0)."""

    value: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor


@dataclass(frozen=True)
class Difference(Interval):
    """A paired difference ``a − b`` with its interval and two-sided bootstrap ``p_value``."""

    p_value: torch.Tensor


@dataclass(frozen=True)
class Bootstrap:
    """A bootstrap over documents: ``n_resamples`` resamples drawn from ``seed``, ``confidence``
    intervals (see the module docstring). ``n_resamples=0`` gives no interval (``low``/``high`` NaN)."""

    n_resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    confidence: float = CONFIDENCE

    def __post_init__(self) -> None:
        if self.n_resamples < 0 or not 0 < self.confidence < 1:
            raise ValueError(f"A bootstrap needs n_resamples ≥ 0 (0: no intervals) and 0 < confidence < 1; got "
                             f"n_resamples={self.n_resamples}, confidence={self.confidence}.")

    def to_dict(self, n_documents: int) -> dict:
        """The report's ``bootstrap`` field; warns when ``n_documents`` is too few for the intervals to mean much."""
        if 0 < n_documents < FEW_DOCUMENTS and self.n_resamples:
            warnings.warn(f"The intervals resample only {n_documents} held-out documents (corpus lines), too few for them "
                          f"to be reliable (at least {FEW_DOCUMENTS} is better): score more tokens (--max-eval-tokens) or "
                          "use a corpus of more, shorter lines.", FewDocumentsWarning, stacklevel=2)
        return {"unit": "document", "method": "percentile", "n_resamples": self.n_resamples, "seed": self.seed,
                "confidence": self.confidence, "n_documents": int(n_documents)}

    def counts(self, n_documents: int, device=None) -> Float[torch.Tensor, "B D"]:
        """How often each of ``n_documents`` documents is drawn in each resample (rows sum to ``D``):
        the same matrix for the same ``(seed, n_resamples, D)``, on any device (drawn once, then reused)."""
        return _counts(self.seed, self.n_resamples, n_documents).to(device)

    def _resampled(self, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        if num.shape[-1] == 0:  # no document: nothing to resample
            return num.new_zeros(*num.shape[:-1], 0, dtype=torch.float64)
        w = self.counts(num.shape[-1], num.device)
        return (num.double() @ w.T) / (den.double() @ w.T)  # [..., B]

    def _quantiles(self, resampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n_resamples == 0 or resampled.shape[-1] == 0:
            nan = torch.full(resampled.shape[:-1], float("nan"), dtype=torch.float64, device=resampled.device)
            return nan, nan
        tail = (1 - self.confidence) / 2
        q = torch.tensor([tail, 1 - tail], dtype=torch.float64, device=resampled.device)
        low, high = torch.nanquantile(resampled, q, dim=-1)
        return low, high

    def ratio(self, num: Float[torch.Tensor, "... D"], den: Float[torch.Tensor, "... D"]) -> Interval:
        """``Σ num / Σ den`` over the documents (last axis) with its interval."""
        value = num.double().sum(-1) / den.double().sum(-1)
        return Interval(value, *self._quantiles(self._resampled(num, den)))

    def means(self, values: Float[torch.Tensor, "... n"], docs: Int[torch.Tensor, "n"] | None = None,
              keep: torch.Tensor | None = None) -> Interval:
        """Means over positions (last axis) of ``values`` (those where ``keep``, broadcast to ``values``;
        default all), resampling the documents ``docs`` (any ids, one per position; default: each position
        its own) they came from."""
        docs = torch.arange(values.shape[-1]) if docs is None else docs
        _, column = torch.unique(docs, return_inverse=True)
        n_docs = int(column.max()) + 1 if column.numel() else 0
        weight = (torch.ones(()) if keep is None else keep).double().expand(values.shape)
        den = torch.zeros(*values.shape[:-1], n_docs, dtype=torch.float64).index_add_(-1, column, weight)
        num = torch.zeros_like(den).index_add_(-1, column, torch.where(weight > 0, values.double(), 0.0))
        return self.ratio(num, den)

    def paired(self, num_a: Float[torch.Tensor, "... D"], den_a: Float[torch.Tensor, "... D"],
               num_b: Float[torch.Tensor, "... D"], den_b: Float[torch.Tensor, "... D"]) -> Difference:
        """``Σ num_a / Σ den_a − Σ num_b / Σ den_b`` on the same documents, with its interval and p-value
        (NaN without resamples; 1 where the difference is 0)."""
        value = num_a.double().sum(-1) / den_a.double().sum(-1) - num_b.double().sum(-1) / den_b.double().sum(-1)
        d = self._resampled(num_a, den_a) - self._resampled(num_b, den_b)
        low, high = self._quantiles(d)
        se = d.std(-1) if d.shape[-1] > 1 else torch.full_like(value, float("nan"))
        z = value.abs() / se
        p = torch.where(value == 0, 1.0, torch.erfc(z / math.sqrt(2)))  # 2·Φ(−|z|); se = 0, value ≠ 0: p = 0
        return Difference(value, low, high, torch.where(torch.isnan(value) | torch.isnan(se), float("nan"), p))


@functools.lru_cache(maxsize=8)
def _counts(seed: int, n_resamples: int, n_documents: int) -> torch.Tensor:
    """:meth:`Bootstrap.counts` on the CPU: every ratio, mean and paired difference of a run reuses it."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_documents, (n_resamples, n_documents), generator=gen)
    counts = torch.zeros(n_resamples, n_documents, dtype=torch.float64)
    return counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def reported(t: torch.Tensor) -> float | None | list[float | None]:
    """A statistic as a report holds it: a float (0-d) or a list of floats, ``None`` for NaN (not scored,
    no resamples)."""
    values = [None if v != v else float(v) for v in t.reshape(-1).tolist()]
    return values if t.dim() else values[0]


def with_intervals(statistics: dict[str, Interval]) -> dict:
    """``{name: value, ..., "ci_low": {name: low}, "ci_high": {name: high}}`` of named intervals
    (:func:`reported` values): the layout of every report's intervals."""
    return {**{n: reported(i.value) for n, i in statistics.items()},
            "ci_low": {n: reported(i.low) for n, i in statistics.items()},
            "ci_high": {n: reported(i.high) for n, i in statistics.items()}}


def holm(p_values: Float[torch.Tensor, "m"]) -> Float[torch.Tensor, "m"]:
    """Holm's step-down adjusted p-values of one family (NaN entries are left out of it and stay NaN):
    the ``i``-th smallest of ``m`` becomes ``max_{j ≤ i} min(1, (m − j + 1)·p_(j))``."""
    p = p_values.double()
    out = torch.full_like(p, float("nan"))
    ok = ~torch.isnan(p)
    m = int(ok.sum())
    if m:
        sorted_p, order = torch.sort(p[ok])
        scaled = (sorted_p * torch.arange(m, 0, -1, dtype=torch.float64)).clamp(max=1.0)
        adjusted = torch.cummax(scaled, 0).values
        out[ok.nonzero()[:, 0][order]] = adjusted
    return out

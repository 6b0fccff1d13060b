"""Streaming sufficient statistics of hook activations (float64, additive).

A *group* is a tuple of hook names whose activations at the same token are concatenated into
one vector ``z = [a_1, ..., a_k]`` (each ``a_i`` of width ``d_i``). For each group the
statistics are, over every scored position:

    n = number of tokens,   s = Σ z   (float64, [D]),   G = Σ z zᵀ   (float64, [D, D])

with ``D = Σ d_i``. These are all a least-squares fit, an R² or a linearity score needs
(see :mod:`lensmat.stats.fit`); activations are never stored, so memory is ``O(D²)`` whatever the
number of tokens. Statistics add: ``a + b`` merges runs (or processes: ``all_reduce``).
A group may keep only the cross-products a computation needs (:func:`pair_pattern`): maps to the
last layer need the ``(l, l)`` and ``(l, L)`` blocks, ``O(L·d²)`` floats instead of ``O(L²·d²)``;
:func:`stats_nbytes` gives the bytes before anything is allocated (the memory plan uses it).

This module depends on torch only; collecting (:mod:`lensmat.stats.collect`), fitting
(:mod:`lensmat.stats.fit`) and saving (:mod:`lensmat.stats.artifacts`) build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float

PAIR_PATTERNS = ("to_last", "adjacent", "all")


def pair_pattern(n_hooks: int, pattern: str) -> tuple[tuple[int, int], ...] | None:
    """Index pairs ``(i, j)``, ``i ≤ j``, of a group of ``n_hooks`` hooks whose cross-products a
    computation needs: ``"to_last"`` (maps ``h_l -> h_L``: ``(l, l)``, ``(l, L)``), ``"adjacent"``
    (``h_l -> h_{l+1}``: ``(l, l)``, ``(l, l+1)``) or ``"all"`` (every pair; ``None``)."""
    if pattern == "all":
        return None
    last = n_hooks - 1
    if pattern == "to_last":
        return tuple(sorted({(i, i) for i in range(n_hooks)} | {(i, last) for i in range(n_hooks)}))
    if pattern == "adjacent":
        return tuple(sorted({(i, i) for i in range(n_hooks)} | {(i, i + 1) for i in range(last)}))
    raise ValueError(f"Unknown pair pattern {pattern!r}; use one of {', '.join(PAIR_PATTERNS)}.")


def kept_pairs(n_hooks: int, pairs: tuple[tuple[int, int], ...] | None) -> tuple[tuple[int, int], ...]:
    """The blocks ``(i, j)``, ``i ≤ j``, that statistics of ``n_hooks`` hooks keep for ``pairs``
    (every diagonal block always; ``None`` = all pairs)."""
    if pairs is None:
        return tuple((i, j) for i in range(n_hooks) for j in range(i, n_hooks))
    return tuple(sorted({(min(p), max(p)) for p in pairs} | {(i, i) for i in range(n_hooks)}))


def stats_nbytes(dims: tuple[int, ...] | list[int], pairs: tuple[tuple[int, int], ...] | None = None) -> int:
    """Bytes that :class:`GramStats` of hooks of widths ``dims`` keeping ``pairs`` allocate (float64
    sum and panels), computed without allocating them."""
    kept = kept_pairs(len(dims), pairs)
    return 8 * (sum(dims) + sum(dims[i] * dims[j] for i, j in kept))


@dataclass
class GramStats:
    """Sufficient statistics of one hook group (see module docstring), keeping only the blocks
    ``Σ a_i a_jᵀ`` of the index pairs ``pairs`` (``i ≤ j``; every diagonal block is always kept;
    ``None`` = all pairs, the joint Gram).

    ``n`` counts tokens; ``sum`` is ``[D]``; ``panels[i]`` is ``[d_i, Σ_{j ∈ targets[i]} d_j]``,
    the kept blocks of hook ``i`` side by side, all float64. Maps to the last layer need
    ``O(L·d²)`` memory this way instead of the joint Gram's ``O(L²·d²)``.
    """

    hooks: tuple[str, ...]
    dims: tuple[int, ...]
    n: int = 0
    sum: Float[torch.Tensor, "D"] | None = None
    panels: list[torch.Tensor] | None = None
    pairs: tuple[tuple[int, int], ...] | None = None
    device: str = field(default="cpu", compare=False)

    def __post_init__(self) -> None:
        k = len(self.hooks)
        if len(self.dims) != k:
            raise ValueError(f"{k} hooks but {len(self.dims)} widths.")
        if self.pairs is not None:
            bad = [p for p in self.pairs if not (0 <= min(p) and max(p) < k)]
            if bad:
                raise ValueError(f"Pairs {bad} are out of range for a group of {k} hooks.")
            kept = kept_pairs(k, self.pairs)
            self.pairs = None if len(kept) == k * (k + 1) // 2 else kept
        kept = kept_pairs(k, self.pairs)
        self.targets = [tuple(j for a, j in kept if a == i) for i in range(k)]
        if self.sum is None:
            self.sum = torch.zeros(sum(self.dims), dtype=torch.float64, device=self.device)
        if self.panels is None:
            self.panels = [torch.zeros(d, sum(self.dims[j] for j in t), dtype=torch.float64, device=self.device)
                           for d, t in zip(self.dims, self.targets)]

    @property
    def offsets(self) -> dict[str, slice]:
        out, start = {}, 0
        for hook, d in zip(self.hooks, self.dims):
            out[hook] = slice(start, start + d)
            start += d
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the float64 tensors (sum and panels)."""
        return 8 * (self.sum.numel() + sum(p.numel() for p in self.panels))

    def _columns(self, z: torch.Tensor, i: int) -> torch.Tensor:
        parts = list(self.offsets.values())
        t = self.targets[i]
        if list(t) == list(range(t[0], t[-1] + 1)):  # consecutive hooks: a view, no copy
            return z[:, parts[t[0]].start: parts[t[-1]].stop]
        return torch.cat([z[:, parts[j]] for j in t], dim=1)

    def update(self, z: Float[torch.Tensor, "n D"]) -> None:
        """Add the rows of ``z`` (one token per row, the group's hooks concatenated)."""
        z = z.to(self.sum.device, torch.float64)
        self.n += z.shape[0]
        self.sum += z.sum(0)
        for i, part in enumerate(self.offsets.values()):
            self.panels[i].addmm_(z[:, part].T, self._columns(z, i))

    def mean(self, hook: str) -> torch.Tensor:
        return self.sum[self.offsets[hook]] / self.n

    def has_block(self, hook_a: str, hook_b: str) -> bool:
        i, j = sorted((self.hooks.index(hook_a), self.hooks.index(hook_b)))
        return j in self.targets[i]

    def block(self, hook_a: str, hook_b: str) -> torch.Tensor:
        """``Σ a bᵀ`` over tokens: ``[d_a, d_b]`` (float64)."""
        i, j = self.hooks.index(hook_a), self.hooks.index(hook_b)
        if i > j:
            return self.block(hook_b, hook_a).T
        if j not in self.targets[i]:
            raise KeyError(f"These statistics keep no cross-products of {hook_a!r} and {hook_b!r} (they were collected "
                           "for fewer pairs, e.g. maps to the last layer only); collect them with all pairs "
                           "(--all-pairs) to fit or score that map.")
        start = sum(self.dims[t] for t in self.targets[i][: self.targets[i].index(j)])
        return self.panels[i][:, start: start + self.dims[j]]

    @property
    def gram(self) -> Float[torch.Tensor, "D D"]:
        """The joint Gram ``Σ z zᵀ`` (``[D, D]``), assembled; needs statistics of all pairs."""
        return torch.cat([torch.cat([self.block(a, b) for b in self.hooks], 1) for a in self.hooks], 0)

    def __add__(self, other: "GramStats") -> "GramStats":
        if (self.hooks, self.dims, self.pairs) != (other.hooks, other.dims, other.pairs):
            raise ValueError(f"Cannot add statistics of different hook groups or pairs: {self.hooks} vs {other.hooks}.")
        return GramStats(self.hooks, self.dims, self.n + other.n, self.sum + other.sum.to(self.sum.device),
                         [a + b.to(a.device) for a, b in zip(self.panels, other.panels)], self.pairs, self.device)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for saving (safetensors); the pairs go in the metadata."""
        out = {f"{prefix}.sum": self.sum.cpu(), f"{prefix}.n": torch.tensor([self.n], dtype=torch.int64)}
        return out | {f"{prefix}.panel.{i}": p.cpu() for i, p in enumerate(self.panels)}

    @classmethod
    def from_tensors(cls, hooks, dims, tensors: dict[str, torch.Tensor], prefix: str, pairs=None) -> "GramStats":
        pairs = None if pairs is None else tuple(tuple(p) for p in pairs)
        return cls(tuple(hooks), tuple(dims), int(tensors[f"{prefix}.n"][0]), tensors[f"{prefix}.sum"].double(),
                   [tensors[f"{prefix}.panel.{i}"].double() for i in range(len(hooks))], pairs)

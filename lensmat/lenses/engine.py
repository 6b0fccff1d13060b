"""The readout engine: every lens reading's last step, fused and walked over the vocabulary in chunks.

A reading ends in the model's readout (final norm, ``[rows, d] × [d, V]`` unembedding, the
adapter's elementwise output transform such as soft-capping; for a masked LM its masked-LM head)
and metrics over the whole vocabulary. :func:`read` stacks the rows of every layer and lens of a
batch (``[groups, n, d_model]``: group ``g``, position ``i``), normalises them once, and walks the
unembedding in vocabulary chunks of :attr:`Unembedding.chunk` columns. Per chunk: one GEMM, then
single-pass accumulators (online log-sum-exp as in flash attention's softmax):

- ``lse`` = log Σ exp z (nats);
- running top-``k`` ids and logits (ties: the lowest id, as ``torch.argmax``);
- with a reference (the model's own distribution ``p`` at the same positions, read through the same
  engine, once per batch): ``kl`` = KL(p ‖ q) = Σ p (z_ref − z) − lse_ref + lse, and the reference's
  logit at each row's top-1 (surprisal = lse_ref − that logit);
- ``picked``: the logits at given ids per position (next token, a followed token), and with
  ``rank=True`` how many tokens score strictly above each;
- with ``entropy=True``: −Σ q log q;
- ``finite``: rows whose normalised state and logits are finite (NaN/Inf rows are left out of
  every metric by the callers, and counted).

No ``[n, V]`` array of a whole layer exists: the peak is a few chunks of :data:`CHUNK_ELEMENTS`
float32 logits (the memory plan's readout line, :mod:`lensmat.stats.plan`). Nothing in the loop leaves the device: the
sums stay tensors until the caller reads them. Logits are computed in the model's dtype and reduced
in float32.

Reference semantics match the full-vocabulary computation (``log_softmax`` then metrics) to float32
rounding; ``tests/test_engine.py`` checks them against it on random models with large
vocabularies, NaN rows included. The one documented difference: where the reference's top-k has
ties, ``torch.topk`` over the full vocabulary may order them differently from the chunked merge
(which keeps the lowest ids), so Precision@k can differ where the k-th and (k+1)-th logits are equal.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int

from lensmat.models import is_masked_lm, mlm_head
from lensmat.stats.plan import READOUT_CHUNK_ELEMENTS

CHUNK_ELEMENTS = READOUT_CHUNK_ELEMENTS  # logits per chunk (8 MB of float32): an efficient GEMM, reductions in cache
CHUNK_WIDTH = 2048  # vocabulary columns per chunk (at least; fewer rows than CHUNK_ELEMENTS // 2048 get wider ones)


def readout(model, h: Float[torch.Tensor, "... d_model"], chunk_size: int = 1024) -> Float[torch.Tensor, "... d_vocab"]:
    """The model's own prediction from a last-layer residual vector: final norm and unembedding
    (``logit_readout``), or the masked-LM head for a masked LM; ``chunk_size`` rows at a time.
    Differentiable when gradients are enabled (``torch.is_grad_enabled()``)."""
    if not is_masked_lm(model):
        from transformer_lens.tools.analysis.logit_lens import logit_readout

        return logit_readout(model, h, return_type="logits", chunk_size=chunk_size,
                             enable_grad=torch.is_grad_enabled()).values
    head, rows = mlm_head(model), h.reshape(-1, h.shape[-1])
    out = torch.cat([head(rows[i: i + chunk_size]) for i in range(0, rows.shape[0], chunk_size)])
    return out.reshape(*h.shape[:-1], out.shape[-1])


class Unembedding:
    """A model's readout split at the vocabulary: ``normalise(h)`` (final norm, or the masked-LM head
    up to its decoder) and ``logits(x, start, stop)`` = ``transform(x @ W[:, start:stop] + b[start:stop])``.

    Checked once against the model's own readout (:func:`lensmat.lenses.base.readout`) on the
    embedding of token 0; a model whose readout is not of this form is refused."""

    def __init__(self, model) -> None:
        self.model = model
        self.W, self.b = model.W_U, model.b_U
        self._head = mlm_head(model) if is_masked_lm(model) else None
        adapter_transform = getattr(getattr(model, "adapter", None), "apply_output_logits_transform", None)
        self.transform = adapter_transform if callable(adapter_transform) and self._head is None else None
        self.d_vocab = int(self.W.shape[1])
        self._check()

    def _check(self) -> None:
        probe = self.model.W_E[:2].detach().to(self.W.dtype) * 3  # two vectors of the residual stream's scale
        with torch.no_grad():
            want = readout(self.model, probe).float()
            got = self.logits(self.normalise(probe), 0, self.d_vocab).float()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
            raise NotImplementedError(
                f"{getattr(self.model.cfg, 'model_name', 'This model')}'s readout is not final norm -> unembedding "
                "(-> an elementwise output transform), or a masked-LM head ending in its decoder; the readout "
                "engine cannot read it.")

    def normalise(self, h: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_x"]:
        """The vector the unembedding multiplies: the final norm of ``h`` (each row on its own), or the
        masked-LM head's dense → activation → LayerNorm."""
        h = h.to(self.W.device, self.W.dtype)
        if self._head is None:
            norm = getattr(self.model, "ln_final", None) if getattr(self.model.cfg, "normalization_type", None) else None
            return h if norm is None else norm(h.reshape(1, -1, h.shape[-1])).reshape(h.shape)
        with _decoder_as_identity(self._head):
            return self._head(h)

    def logits(self, x: Float[torch.Tensor, "rows d_x"], start: int, stop: int) -> Float[torch.Tensor, "rows chunk"]:
        """Logits of the vocabulary slice ``start:stop`` for normalised rows ``x``."""
        w = self.W[:, start:stop]  # a strided view: no copy of the unembedding
        z = x @ w if self.b is None else torch.addmm(self.b[start:stop], x, w)
        return z if self.transform is None else self.transform(z)


@contextlib.contextmanager
def _decoder_as_identity(head):
    decoder = head.decoder
    head.decoder = torch.nn.Identity()
    try:
        yield
    finally:
        head.decoder = decoder


@dataclass
class Readout:
    """What :func:`read` returns for ``groups × n`` rows (float32 sums, on the model's device).

    ``lse``, ``top_ids``/``top_logits`` (``[g, n, k]``, best first), ``finite``; with a reference,
    ``kl`` (nats) and ``ref_at_top1`` (the reference's logit at each row's top-1) and the reference's
    own :class:`Readout` as ``ref`` (one group); with ``pick``: ``picked`` ``[g, n, m]`` logits and,
    with ``rank=True``, ``rank`` (tokens strictly above); with ``entropy=True``, ``entropy`` (nats)."""

    lse: Float[torch.Tensor, "g n"]
    top_ids: Int[torch.Tensor, "g n k"]
    top_logits: Float[torch.Tensor, "g n k"]
    finite: Bool[torch.Tensor, "g n"]
    kl: Float[torch.Tensor, "g n"] | None = None
    ref_at_top1: Float[torch.Tensor, "g n"] | None = None
    picked: Float[torch.Tensor, "g n m"] | None = None
    rank: Int[torch.Tensor, "g n m"] | None = None
    entropy: Float[torch.Tensor, "g n"] | None = None
    ref: "Readout | None" = None

    @property
    def top_probs(self) -> Float[torch.Tensor, "g n k"]:
        return (self.top_logits - self.lse[..., None]).exp()

    def group(self, j: int) -> "Readout":
        """Group ``j``'s rows (tensors ``[n, ...]``), with the same ``ref``."""
        return Readout(**{f.name: value if f.name == "ref" or value is None else value[j]
                          for f in dataclasses.fields(self) for value in [getattr(self, f.name)]})


def _merge_top(vals, ids, new_vals, new_ids, k: int):
    """Top-``k`` of the running candidates and a chunk's; equal logits are ordered by id (lowest first)."""
    if k == 1:
        better = new_vals > vals  # strict: a later chunk (higher ids) never displaces an equal logit
        return torch.where(better, new_vals, vals), torch.where(better, new_ids, ids)
    cat_v, cat_i = torch.cat([vals, new_vals], -1), torch.cat([ids, new_ids], -1)
    by_id = cat_i.argsort(dim=-1)
    cat_v, cat_i = cat_v.gather(-1, by_id), cat_i.gather(-1, by_id)
    best = cat_v.argsort(dim=-1, descending=True, stable=True)[..., :k]
    return cat_v.gather(-1, best), cat_i.gather(-1, best)


@torch.no_grad()
def read(
    unembedding: Unembedding,
    rows: Float[torch.Tensor, "g n d_model"],
    reference: Float[torch.Tensor, "n d_model"] | None = None,
    **options,
) -> Readout:
    """Read ``rows`` (``h`` already in the last layer's basis, before the final norm: group ``g`` of
    ``n`` positions) through the model's readout, chunked over the vocabulary (see the module docstring).

    ``reference``: the last residual layer ``h_L`` at the same ``n`` positions; its distribution ``p``
    is what ``kl`` and ``ref_at_top1`` compare against, and ``readout.ref`` (tensors ``[n]`` / ``[n, k_ref]``)
    holds its own ``lse``, top-``k_ref``, ``picked`` and ``finite``. Options (:func:`reduce`): ``k`` (top-k
    per row, default 1), ``k_ref`` (default 10), ``pick`` (token ids per position, ``[n, m]``; any valid id
    where unused), ``rank`` (also count the tokens strictly above each picked one: a second pass),
    ``entropy``.
    """
    states = rows if reference is None else torch.cat([reference[None], rows])
    x = unembedding.normalise(states).transpose(0, 1).contiguous()  # [n, G1, d_x], position-major
    finite = torch.isfinite(x.sum(-1))  # a NaN/Inf anywhere in h makes its normalised row NaN

    def chunk(p0, p1, start, stop):
        return unembedding.logits(x[p0:p1].reshape(-1, x.shape[-1]), start, stop).float().view(p1 - p0, x.shape[1], -1)

    weighted = None
    if unembedding.transform is None:  # logits linear in x: Σ_v e_v z_v = x · (W e) + b · e, one small GEMM
        def weighted(p0, p1, start, stop, e):
            w = unembedding.W[:, start:stop]
            u = (e.to(w.dtype) @ w.T).float()  # [nb, d_x]
            bias = 0 if unembedding.b is None else (e * unembedding.b[start:stop].float()).sum(-1, keepdim=True)
            return torch.bmm(x[p0:p1].float(), u[..., None])[..., 0] + bias

    return reduce(chunk, finite, unembedding.d_vocab, reference is not None, weighted=weighted, **options)


@torch.no_grad()
def read_logits(logits: Float[torch.Tensor, "g n vocab"], reference: Float[torch.Tensor, "n vocab"] | None = None,
                **options) -> Readout:
    """:func:`read` for logits that already exist (a swapped or intervened model's output): the same
    reductions, chunked over their vocabulary; rows holding NaN/Inf are marked not ``finite``."""
    sources = ([] if reference is None else [reference[None]]) + [logits]  # [G1 groups, n, V], never copied whole
    finite = torch.cat([torch.isfinite(t).all(-1) for t in sources]).T  # [n, G1]

    def chunk(p0, p1, start, stop):  # a fresh float32 block: the engine overwrites its chunks
        return torch.cat([t[:, p0:p1, start:stop].float() for t in sources]).transpose(0, 1).contiguous()

    return reduce(chunk, finite, logits.shape[-1], reference is not None, **options)


def reduce(
    chunk,
    finite: Bool[torch.Tensor, "n G1"],
    d_vocab: int,
    has_ref: bool,
    *,
    k: int = 1,
    k_ref: int = 10,
    pick: Int[torch.Tensor, "n m"] | None = None,
    rank: bool = False,
    entropy: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
    weighted=None,
    _thresholds: torch.Tensor | None = None,
) -> Readout:
    """The single pass behind :func:`read`: ``chunk(p0, p1, start, stop)`` gives the float32 logits
    ``[p1 − p0, G1, stop − start]`` of positions ``p0:p1`` and vocabulary ``start:stop`` (group 0 the
    reference when ``has_ref``); ``weighted(p0, p1, start, stop, e)``, where given, gives
    ``Σ_v e[i, v] z[i, g, v]`` without reading the chunk (``[nb, G1]``)."""
    n, n_groups = finite.shape
    g = n_groups - has_ref
    if rank and pick is not None and _thresholds is None:
        options = dict(k=k, k_ref=k_ref, pick=pick, chunk_elements=chunk_elements, weighted=weighted)
        first = reduce(chunk, finite, d_vocab, has_ref, entropy=entropy, **options)
        thresholds = first.picked if not has_ref else torch.cat([first.ref.picked[None], first.picked])
        counted = reduce(chunk, finite, d_vocab, has_ref, _thresholds=thresholds.transpose(0, 1).contiguous(), **options)
        first.rank = counted.rank
        if has_ref:
            first.ref.rank = counted.ref.rank
        return first
    device = finite.device
    width = min(d_vocab, max(CHUNK_WIDTH, chunk_elements // (n * n_groups)))  # few rows: wider chunks
    block = max(1, min(n, chunk_elements // (width * n_groups)))
    f32 = dict(device=device, dtype=torch.float32)
    lens = slice(1, None) if has_ref else slice(None)
    pick = None if pick is None else pick.to(device)
    blocks = []  # (p0, p1, running state of positions p0:p1): no slice writes in the loop
    for p0 in range(0, n, block):
        nb = min(block, n - p0)
        st = {"m": torch.full((nb, n_groups), -torch.inf, **f32),  # running max of each row's logits
              "s": torch.zeros((nb, n_groups), **f32),  # running Σ exp(z − m)
              "top_v": torch.full((nb, g, k), -torch.inf, **f32),
              "top_i": torch.zeros((nb, g, k), dtype=torch.int64, device=device)}
        if has_ref:
            st |= {"ref_v": torch.full((nb, k_ref), -torch.inf, **f32),
                   "ref_i": torch.zeros((nb, k_ref), dtype=torch.int64, device=device),
                   "kl": torch.zeros((nb, g), **f32),  # Σ exp(z_ref − m_ref) (z_ref − z)
                   "at_top1": torch.zeros((nb, g), **f32)}
        if pick is not None:
            st |= {"picked": torch.zeros((nb, n_groups, pick.shape[1]), **f32),
                   "counts": torch.zeros((nb, n_groups, pick.shape[1]), dtype=torch.int64, device=device)}
        if entropy:
            st["self"] = torch.zeros((nb, n_groups), **f32)  # Σ exp(z − m) z
        blocks.append((p0, p0 + nb, st))
    for start in range(0, d_vocab, width):
        stop = min(start + width, d_vocab)
        for p0, p1, st in blocks:
            z = chunk(p0, p1, start, stop)  # [nb, G1, C], the engine's own: overwritten below
            v, i = z.max(-1)
            m_new = torch.maximum(st["m"], v)
            scale = torch.exp(st["m"] - m_new)
            if has_ref:
                zr = z[:, 0]
                e = torch.exp(zr - m_new[:, :1])
                # Σ e z of every row, the reference's first
                dot = weighted(p0, p1, start, stop, e) if weighted else torch.bmm(z, e[..., None])[..., 0]
                st["kl"] = st["kl"] * scale[:, :1] + (dot[:, :1] - dot[:, 1:])
                if k == 1:
                    better = v[:, 1:] > st["top_v"][..., 0]
                    st["at_top1"] = torch.where(better, zr.gather(-1, i[:, 1:]), st["at_top1"])
                rv, ri = zr.topk(min(k_ref, stop - start), -1)
                st["ref_v"], st["ref_i"] = _merge_top(st["ref_v"], st["ref_i"], rv, ri + start, k_ref)
            if k == 1:
                cv, ci = v[:, lens, None], i[:, lens, None]
            else:
                cv, ci = z[:, lens].topk(min(k, stop - start), -1)
            st["top_v"], st["top_i"] = _merge_top(st["top_v"], st["top_i"], cv, ci + start, k)
            if pick is not None:
                local = pick[p0:p1] - start
                inside = ((local >= 0) & (local < stop - start))[:, None]
                vals = z.gather(-1, local.clamp(0, stop - start - 1)[:, None].expand(-1, n_groups, -1))
                st["picked"] = torch.where(inside, vals, st["picked"])
                if _thresholds is not None:
                    st["counts"] = st["counts"] + (z[..., None, :] > _thresholds[p0:p1, ..., None]).sum(-1)
            if entropy:
                st["self"] = st["self"] * scale + (torch.exp(z - m_new[..., None]) * z).sum(-1)
            st["s"] = st["s"] * scale + z.sub_(m_new[..., None]).exp_().sum(-1)  # z is spent: in place
            st["m"] = m_new
    acc = {key: torch.cat([st[key] for _, _, st in blocks]) for key in blocks[0][2]}
    m, s = acc["m"], acc["s"]
    lse = m + s.log()
    finite = finite & torch.isfinite(lse)
    out = Readout(lse=lse[:, lens].T, top_ids=acc["top_i"].transpose(0, 1), top_logits=acc["top_v"].transpose(0, 1),
                  finite=finite[:, lens].T)
    if pick is not None:
        out.picked = acc["picked"][:, lens].transpose(0, 1)
        if _thresholds is not None:
            out.rank = acc["counts"][:, lens].transpose(0, 1)
    if entropy:
        out.entropy = (lse - acc["self"] / s).clamp_min(0)[:, lens].T
    if has_ref:
        lse_ref = lse[:, 0]
        kl = acc["kl"] / s[:, :1] - lse_ref[:, None] + lse[:, 1:]
        out.kl = kl.clamp_min(0).T  # ≥ 0; rounding can dip below at q = p
        out.ref_at_top1 = acc["at_top1"].T if k == 1 else None
        out.ref = Readout(lse=lse_ref, top_ids=acc["ref_i"], top_logits=acc["ref_v"], finite=finite[:, 0])
        if pick is not None:
            out.ref.picked = acc["picked"][:, 0]
            if _thresholds is not None:
                out.ref.rank = acc["counts"][:, 0]
        if entropy:
            out.ref.entropy = (lse_ref - acc["self"][:, 0] / s[:, 0]).clamp_min(0)
    return out

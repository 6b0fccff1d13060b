"""A cheap early-exit check: one linear classifier per residual layer on the raw residual ``h_l``.

The exact confidence check of :func:`lensmat.analyses.generation.generate` reads the lens's full
distribution at every layer it checks (final norm, the whole ``d_model × d_vocab`` unembedding,
softmax, top-2): on a small model with a large vocabulary one such readout moves more memory than
several blocks. An :class:`ExitProbe` predicts, from ``h_l`` alone, whether exiting at ``l`` would be
right, at the cost of one dot product (``d_model`` multiply-adds) per layer:
``P(exit ok | h_l) = σ(h_l · w_l + b_l)`` for ``l = 1..L−1``.

Label (:func:`exit_labels`, ``label="top1"``, the default): at ``(layer l, token)``, whether the lens's
top-1 at ``l`` is the model's final top-1, i.e. whether a token that exits at ``l`` emits what the
full model would have emitted. That is what agreement with the full model measures, and it is what
a first-exit rule needs: exiting at a layer where the top-1 is already the final one is right even
when a later layer flips away and back. ``label="saturated"`` is the stricter saturation event
``l ≥ s_1`` of "Looking Beyond the Top-1" (the top-1 is the final one at ``l`` and at every later
layer), which :class:`lensmat.analyses.early_exit.SaturationProbe` predicts with one pooled probe.

:func:`train_exit_probe` fits one standardised, class-balanced logistic regression per layer
(:func:`~lensmat.analyses.saturation_probes.balanced_probe`) on a corpus's ``train`` split, read by
:func:`~lensmat.analyses.saturation_rankings.collect_rankings`, and folds the scaler into the weights.
A probe is saved as a lensmat artifact folder (``exit_probe.safetensors`` + ``meta.json``,
:func:`lensmat.stats.artifacts.save_artifact`) recording the model's identity and the lens it was
labelled with; :meth:`ExitProbe.load` and :meth:`ExitProbe.check` refuse it for another model or lens.
"""

from __future__ import annotations

import os
import weakref

import numpy as np
import torch
from jaxtyping import Float, Int

from lensmat.analyses.saturation_probes import balanced_probe, single_blas_thread
from lensmat.analyses.saturation_rankings import Rankings, collect_rankings, saturation_layers
from lensmat.models import ModelMismatchError, check_same_model, describe

LABELS = ("top1", "saturated")
KIND = "exit_probe"
CONSTANT_LOGIT = 30.0  # the logit of a layer whose training tokens were all of one class: P = σ(±30)


def exit_labels(rankings: Rankings, label: str = "top1") -> Int[torch.Tensor, "layers n"]:
    """``[L+1, n]`` 0/1 labels (:data:`LABELS`): ``"top1"`` = the lens's top-1 at ``l`` is the model's
    final top-1; ``"saturated"`` = ``l ≥ s_1`` (it is, and stays so at every later layer)."""
    top1, final = rankings.lens_topk[..., 0], rankings.final_topk[:, 0]
    if label == "top1":
        return (top1 == final[None]).to(torch.int64)
    if label == "saturated":
        s1 = saturation_layers(top1[..., None], final[:, None])[:, 0]
        return (torch.arange(top1.shape[0])[:, None] >= s1[None]).to(torch.int64)
    raise ValueError(f"label={label!r}: an exit probe learns one of {', '.join(map(repr, LABELS))}.")


def lens_fingerprint(lens, n_layers: int) -> list[float]:
    """What identifies a lens's translation at layers ``1..L−1``: ``transform_hidden(x, l) · y / d`` for
    fixed random ``x``, ``y`` (6 decimals). The logit lens gives ``x · y / d`` at every layer; a map
    fitted on other data gives other numbers."""
    model = lens.model
    d = int(model.cfg.d_model)
    g = torch.Generator().manual_seed(1234)
    x, y = torch.randn(d, generator=g), torch.randn(d, generator=g)
    dtype, device = model.W_U.dtype, model.W_U.device
    with torch.no_grad():
        return [round(float(lens.transform_hidden(x.to(device, dtype), layer).float().cpu() @ y) / d, 6)
                for layer in range(1, n_layers)]


def _same_fingerprint(a, b) -> bool:
    return len(a) == len(b) and all(abs(p - q) <= 1e-3 * max(abs(p), abs(q)) + 1e-5 for p, q in zip(a, b))


class ExitProbe:
    """Per-layer linear exit classifiers: ``W`` ``[L−1, d_model]`` and ``b`` ``[L−1]`` (float32; row
    ``l − 1`` is residual layer ``l``), the standardisation folded in, so ``logit_l(h) = h · W[l−1] + b[l−1]``
    on the raw residual and ``P = σ(logit)``. ``meta`` records the model identity (``model``), the lens
    (``lens``: name and :func:`lens_fingerprint`), ``label``, ``n_tokens`` and the data it was trained on."""

    def __init__(self, W: Float[torch.Tensor, "layers d"], b: Float[torch.Tensor, "layers"], meta: dict) -> None:
        self.W = W.detach().float().cpu().contiguous()
        self.b = b.detach().float().cpu().contiguous()
        if self.W.dim() != 2 or self.b.shape != self.W.shape[:1]:
            raise ValueError(f"An exit probe's W is [L-1, d_model] and b [L-1]; got {tuple(self.W.shape)} and "
                             f"{tuple(self.b.shape)}.")
        self.meta = meta
        self._checked: list[tuple[weakref.ref, weakref.ref]] = []

    @property
    def n_layers(self) -> int:
        """``L`` of the model it was fitted for (it has a classifier at layers ``1..L−1``)."""
        return int(self.W.shape[0]) + 1

    def logits(self, resid: Float[torch.Tensor, "layers n d"]) -> Float[torch.Tensor, "layers n"]:
        """The classifiers' logits on ``resid`` ``[L+1, n, d]`` (every residual layer); ``−inf`` at layers
        0 and ``L``, which the exit rule never reads."""
        inner = torch.einsum("lnd,ld->ln", resid[1:self.n_layers].float(), self.W) + self.b[:, None]
        edge = torch.full_like(inner[:1], -torch.inf)
        return torch.cat([edge, inner, edge])

    def probability(self, resid: Float[torch.Tensor, "layers n d"]) -> Float[torch.Tensor, "layers n"]:
        """``P(exit ok)`` per layer (0 at layers 0 and ``L``)."""
        return torch.sigmoid(self.logits(resid))

    def check(self, model, lens) -> None:
        """Refuse the probe for a model or a lens other than those it was fitted with
        (:class:`~lensmat.models.ModelMismatchError`). A pair that passed once is remembered."""
        for m, ln in self._checked:
            if m() is model and ln() is lens:
                return
        n_layers = int(model.cfg.n_layers)
        if n_layers != self.n_layers or int(model.cfg.d_model) != int(self.W.shape[1]):
            raise ModelMismatchError(f"This exit probe was fitted for a model with n_layers={self.n_layers}, "
                                     f"d_model={self.W.shape[1]}, not n_layers={n_layers}, d_model={model.cfg.d_model}; "
                                     "train one for this model (lensmat.analyses.exit_probe.train_exit_probe).")
        check_same_model(self.meta["model"], model, what="this exit probe")
        saved = self.meta.get("lens") or {}
        name = getattr(lens, "name", type(lens).__name__)
        if saved.get("name") != name or not _same_fingerprint(saved.get("fingerprint") or [],
                                                               lens_fingerprint(lens, n_layers)):
            what = (f"the {saved.get('name')!r} lens" if saved.get("name") != name
                    else f"another {name!r} lens (its maps differ)")
            raise ModelMismatchError(f"This exit probe was fitted with {what}, not the {name!r} lens given: its labels "
                                     "are that lens's top-1; train one with this lens.")
        self._checked.append((weakref.ref(model), weakref.ref(lens)))

    def save(self, path: str | os.PathLike, force: bool = False):
        """Write ``path/exit_probe.safetensors`` + ``path/meta.json`` (:func:`~lensmat.stats.artifacts.save_artifact`)."""
        from lensmat.stats import artifacts as io

        return io.save_artifact(path, KIND, {"W": self.W, "b": self.b}, self.meta, force=force)

    @classmethod
    def load(cls, path: str | os.PathLike, model, lens=None) -> "ExitProbe":
        """A saved probe, refused (:class:`~lensmat.models.ModelMismatchError`) for a model other than the
        one it was fitted on, and, given ``lens``, for another lens; its tensors are checked
        (:func:`~lensmat.stats.artifacts.check_tensors`)."""
        from lensmat.stats import artifacts as io

        tensors, meta = io.load_artifact(path, KIND)
        if not isinstance(meta.get("model"), dict):
            raise io.ArtifactError(f"{path}/meta.json does not record the model; the folder is corrupted, retrain it.")
        check_same_model(meta["model"], model, what=f"the exit probe in {path}")
        L, d = int(model.cfg.n_layers), int(model.cfg.d_model)
        io.check_tensors(f"{path}/{KIND}.safetensors", tensors, {"W": (L - 1, d), "b": (L - 1,)},
                         "the file is corrupted; retrain the probe (train_exit_probe) or re-copy the folder.")
        probe = cls(tensors["W"], tensors["b"], meta)
        if lens is not None:
            probe.check(model, lens)
        return probe


def fold_scaler(pipeline) -> tuple[np.ndarray, float]:
    """``(w, b)`` on the raw features of a fitted ``StandardScaler → LogisticRegression`` pipeline
    (:func:`~lensmat.analyses.saturation_probes.balanced_probe`): ``logit = x · w + b``."""
    scaler, clf = pipeline[0], pipeline[-1]
    coef = clf.coef_[0] / scaler.scale_
    return coef, float(clf.intercept_[0] - coef @ scaler.mean_)


def fit_exit_probe(resid: Float[torch.Tensor, "layers n d"], labels: Int[torch.Tensor, "layers n"], meta: dict,
                   seed: int = 0) -> ExitProbe:
    """One :func:`~lensmat.analyses.saturation_probes.balanced_probe` per layer ``1..L−1`` on
    ``resid`` ``[L+1, n, d]`` against 0/1 ``labels`` ``[L+1, n]``; a layer whose tokens are all of one class
    gets the constant logit ``±``:data:`CONSTANT_LOGIT`. ``meta`` gains ``train_balanced_accuracy`` (per
    layer, on the training tokens; ``None`` at a constant layer) and ``positive_rate``."""
    from sklearn.metrics import balanced_accuracy_score

    n_layers, d = resid.shape[0] - 1, resid.shape[-1]
    W, b = torch.zeros(n_layers - 1, d), torch.zeros(n_layers - 1)
    accuracy, rate = [], []
    with single_blas_thread():
        for layer in range(1, n_layers):
            y = labels[layer].numpy()
            rate.append(float(y.mean()))
            if y.min() == y.max():
                b[layer - 1] = CONSTANT_LOGIT if y[0] else -CONSTANT_LOGIT
                accuracy.append(None)
                continue
            x = resid[layer].double().numpy()
            clf = balanced_probe(max_iter=2000, seed=seed).fit(x, y)
            w, bias = fold_scaler(clf)
            W[layer - 1], b[layer - 1] = torch.from_numpy(w).float(), bias
            accuracy.append(float(balanced_accuracy_score(y, (x @ w + bias) > 0)))
    return ExitProbe(W, b, {**meta, "train_balanced_accuracy": accuracy, "positive_rate": rate})


def train_exit_probe(model, lens, dataset=None, *, max_tokens: int = 20_000, label: str = "top1",
                     batch_size: int = 16, seed: int = 0, progress: bool = True) -> ExitProbe:
    """An :class:`ExitProbe` for ``model`` read through ``lens``, trained on up to ``max_tokens`` tokens of the
    ``train`` split of ``dataset`` (a corpus spec, ``None`` for the bundled corpus, or a
    :class:`~lensmat.stats.pipeline.Tokenized` that is not the held-out split): the lens's top-k and the
    residuals from :func:`~lensmat.analyses.saturation_rankings.collect_rankings`, labels from
    :func:`exit_labels`, one classifier per layer (:func:`fit_exit_probe`)."""
    from lensmat.stats.pipeline import Tokenized, tokenized

    if label not in LABELS:
        raise ValueError(f"label={label!r}: an exit probe learns one of {', '.join(map(repr, LABELS))}.")
    if int(model.cfg.n_layers) < 2:
        raise ValueError("An exit probe needs a model of at least 2 blocks (it reads layers 1..L-1).")
    corpus = dataset if isinstance(dataset, Tokenized) else tokenized(model, dataset, "train")
    if corpus.split == "heldout":
        raise ValueError("An exit probe is trained on the train split; the held-out split is for evaluating it.")
    r = collect_rankings(model, lens, corpus, k=1, batch_size=batch_size, max_tokens=max_tokens, keep_resid=True,
                         progress=progress)
    meta = {"model": describe(model).to_dict(),
            "lens": {"name": getattr(lens, "name", type(lens).__name__),
                     "fingerprint": lens_fingerprint(lens, int(model.cfg.n_layers))},
            "label": label, "n_tokens": len(r.origin), "data": {"dataset": corpus.dataset, "split": corpus.split},
            "seed": seed}
    return fit_exit_probe(r.resid, exit_labels(r, label), meta, seed)

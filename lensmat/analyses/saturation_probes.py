"""The saturation protocol's probes (:mod:`lensmat.analyses.saturation`): the "task" at each (layer, token), the
number of ranks settled so far (:func:`task_labels`), read from the residual stream by a probe per layer
(:func:`probe_accuracy`) and by one probe over the pooled layers, as the authors' code does (:func:`pooled_probe`).
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Int


def task_labels(s: Int[torch.Tensor, "n k"], n_layers: int) -> Int[torch.Tensor, "layers n"]:
    """Task at ``(layer, token)``: ``i`` (1-based) where ``s_{i−1} < l ≤ s_i`` (``s_0 = −1``), 0 after
    ``s_K`` (every rank settled; not used by the probe)."""
    layers = torch.arange(n_layers + 1)[:, None, None]
    return (layers > s[None]).sum(-1).add(1).masked_fill((layers > s[None]).all(-1), 0)


def single_blas_thread():
    """A context for scikit-learn's small solves: BLAS threads running beside torch's OpenMP pool
    made the probes here ~18× slower than one BLAS thread."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def probe_accuracy(resid: Float[torch.Tensor, "layers n d"], labels: Int[torch.Tensor, "layers n"], *,
                   folds: int = 5, seed: int = 0, control: bool = False) -> list[float | None]:
    """Balanced accuracy per layer of a standardised, class-balanced logistic regression predicting
    the task from ``h_l`` (``folds``-fold stratified cross-validation); ``control=True`` replaces
    the features by Gaussian noise. ``None`` at layers with fewer than two classes of ``folds`` tokens."""
    rng = np.random.default_rng(seed)
    out: list[float | None] = []
    with single_blas_thread():
        for layer in range(resid.shape[0]):
            out.append(_probe_layer(resid[layer], labels[layer], folds, seed, rng if control else None))
    return out


def balanced_probe(max_iter: int = 1000, seed: int | None = None):
    """The probe both papers' protocols use here: standardise, then a class-balanced logistic
    regression (scikit-learn pipeline)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=max_iter,
                                                              random_state=seed))


def _probe_layer(resid, labels, folds: int, seed: int, noise: np.random.Generator | None) -> float | None:
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    y = labels.numpy()
    classes, counts = np.unique(y[y > 0], return_counts=True)
    keep = np.isin(y, classes[counts >= folds])
    if len(classes[counts >= folds]) < 2:
        return None
    x = resid.numpy()[keep].astype(np.float64)
    if noise is not None:
        x = noise.standard_normal(x.shape)
    pred = cross_val_predict(balanced_probe(), x, y[keep], cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return float(balanced_accuracy_score(y[keep], pred))


def pooled_start_layer(n_layers: int) -> int:
    """The first residual layer the pooled probe reads: the authors read block outputs from index 5
    of GPT-2 XL's 48 (residual layer 6), i.e. the first eighth of the depth, here ``max(1, round(L/8))``."""
    return max(1, round(n_layers / 8))


def pooled_probe_data(resid: Float[torch.Tensor, "layers n d"], labels: Int[torch.Tensor, "layers n"], start: int,
                      min_per_task: int = 5) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The authors' training set for one probe over all layers: at each layer ``≥ start`` the first
    ``m`` states of every task (``m`` = the rarest task's count there; a layer where a task has fewer
    than ``min_per_task`` states is left out). Returns ``(features [N, d], task labels 1..K [N], layers used)``."""
    n_tasks = int(labels.max())
    xs, ys, used = [], [], []
    for layer in range(start, labels.shape[0]):
        idx = [torch.nonzero(labels[layer] == t)[:, 0] for t in range(1, n_tasks + 1)]
        m = min(len(i) for i in idx)
        if m < min_per_task:
            continue
        used.append(layer)
        for t, i in enumerate(idx, start=1):
            xs.append(resid[layer, i[:m]].double().numpy())
            ys.append(np.full(m, t))
    if not xs:
        return np.zeros((0, resid.shape[-1])), np.zeros(0, dtype=int), used
    return np.concatenate(xs), np.concatenate(ys), used


def class_matched_noise(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The authors' control: each task's features replaced by Gaussian noise with that task's
    scalar mean and standard deviation (over all its features)."""
    out = np.empty_like(x)
    for t in np.unique(y):
        rows = y == t
        out[rows] = rng.normal(x[rows].mean(), x[rows].std(), x[rows].shape)
    return out


def pooled_probe(resid: Float[torch.Tensor, "layers n d"], s: Int[torch.Tensor, "n k"], n_layers: int, *,
                 n_tasks: int = 3, start: int | None = None, folds: int = 5, seed: int = 0,
                 control: bool = False) -> dict:
    """One probe of tasks ``1..n_tasks`` over the pooled layers ``≥ start`` (default
    :func:`pooled_start_layer`), as in the authors' ``run_task_transition_probing.py`` (their
    ``--num_tasks``, "between 3 and 5"; states in later tasks are left out): class-balanced data (:func:`pooled_probe_data`),
    standardised one-vs-rest logistic regression, shuffled ``folds``-fold CV. ``control=True`` trains
    on :func:`class_matched_noise` instead. Returns ``{start_layer, layers, n_samples,
    balanced_accuracy, ste, roc_auc [K], accuracy_per_task [K]}`` (``None`` values without data)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score
    from sklearn.model_selection import KFold
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    start = pooled_start_layer(n_layers) if start is None else start
    s = s[:, :n_tasks]
    x, y, used = pooled_probe_data(resid, task_labels(s, n_layers), start)
    tasks = list(range(1, int(s.shape[1]) + 1))
    out = {"start_layer": start, "layers": used, "n_samples": int(len(y)), "balanced_accuracy": None, "ste": None,
           "roc_auc": [None] * len(tasks), "accuracy_per_task": [None] * len(tasks)}
    if len(np.unique(y)) < 2 or len(y) < 2 * folds:
        return out
    if control:
        x = class_matched_noise(x, y, np.random.default_rng(seed))
    present = sorted(np.unique(y).tolist())
    accs, aucs, per_task = [], [[] for _ in tasks], [[] for _ in tasks]
    with single_blas_thread():
        for train, test in KFold(folds, shuffle=True, random_state=seed).split(x):
            clf = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=1000)))
            clf.fit(x[train], y[train])
            pred, proba = clf.predict(x[test]), clf.predict_proba(x[test])
            accs.append(balanced_accuracy_score(y[test], pred))
            cm = confusion_matrix(y[test], pred, labels=present)
            for col, t in enumerate(clf.classes_):
                hit = y[test] == t
                if 0 < hit.sum() < len(hit):
                    aucs[t - 1].append(roc_auc_score(hit, proba[:, col]))
                if hit.any():
                    per_task[t - 1].append(cm[present.index(t), present.index(t)] / hit.sum())
    out.update(balanced_accuracy=float(np.mean(accs)), ste=float(np.std(accs) / np.sqrt(len(accs))),
               roc_auc=[float(np.mean(a)) if a else None for a in aucs],
               accuracy_per_task=[float(np.mean(a)) if a else None for a in per_task])
    return out

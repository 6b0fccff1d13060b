"""In which order do the top-k tokens settle? ("Looking Beyond the Top-1", Lioubashevski et al. 2024,
arXiv 2410.20210), under any lens.

Saturation layer ``s_k`` of a token (``k = 1..K``): the earliest residual layer ``l ≥ 1`` (a block
output, as in the authors' code: the embedding ``h_0`` is not read) from which the lens's rank-k
token equals the model's final rank-k token at every layer ``l..L``. Layer ``L`` is always read as
the model's own output (every lens agrees with it there), so ``s_k ≤ L``, and ``s_k = L`` means
"not saturated before the final layer".

The protocol, with the authors' definitions (daria-lioubashevski/beyond_top1): keep tokens whose
top-1 saturates by block output ``⌊0.85·L⌋`` (residual layer ``⌊0.85·L⌋ + 1``); the mean rank of
``s_k`` among ``s_1..s_K`` over the tokens whose rank k saturates before ``L`` (ties take the lowest
rank); the strict Kendall τ between ``(1..m)`` and ``(s_1..s_m)`` (ties count as discordant), ``m``
= the last rank saturated before ``L`` (tokens with ``m ≥ 3``; ranks inside that prefix that never
saturate count against the order), averaged over tokens, with a permutation test that shuffles all
``K`` layers of a token and then truncates to ``m``. ``order_rule="leading"`` is lensmat's earlier,
stricter rule: ``m`` = the number of *leading* ranks saturated before ``L``, shuffled among
themselves. Then a probe that reads the current "task" from the residual stream, and an
intervention that implants an early-saturating token's state into a late one.

A masked LM (BERT family) runs all of it under the masked protocol (:mod:`lensmat.data.corpora`): the
tokens ranked are the ``[MASK]`` positions of ``[CLS] line [SEP]`` lines, and an implant runs the
late token's whole line, every masked position as ``[MASK]``, exactly as it was ranked (attention
reads both directions, so a prefix would change every state).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int

from lensmat import data
from lensmat.stats.collect import resid_hook, resid_hooks, run_capture
from lensmat.models import describe, input_device
from lensmat.stats.pipeline import Tokenized


@dataclass
class Rankings:
    """Per-token top-K ids under a lens at every residual layer, on a corpus's scored positions.

    ``lens_topk`` is ``[L+1, n, K]`` (layer ``L`` = the model's output) and ``lens_topp`` their
    probabilities under the lens; ``resid`` ``[L+1, n, d_model]`` (float32, CPU) when kept;
    ``origin[i] = (line, position)``, ``line`` indexing the corpus's ``seqs``; ``inputs[line]`` the
    token ids that line was run with (under the masked protocol, every masked position holds
    ``[MASK]``; a causal line may be cut by ``max_tokens``).
    """

    lens_topk: Int[torch.Tensor, "layers n k"]
    lens_topp: Float[torch.Tensor, "layers n k"]
    resid: Float[torch.Tensor, "layers n d"] | None
    origin: list[tuple[int, int]]
    inputs: dict[int, list[int]]

    def select(self, keep: torch.Tensor) -> "Rankings":
        """The tokens where the boolean mask ``keep`` ``[n]`` is true."""
        return Rankings(self.lens_topk[:, keep], self.lens_topp[:, keep],
                        None if self.resid is None else self.resid[:, keep],
                        [o for o, m in zip(self.origin, keep.tolist()) if m], self.inputs)

    @property
    def final_topk(self) -> Int[torch.Tensor, "n k"]:
        """The model's own top-K (layer ``L``)."""
        return self.lens_topk[-1]

    @property
    def top_two_gap(self) -> Float[torch.Tensor, "layers n"]:
        """The lens's confidence ``p(1) − p(2)`` at every layer (float64)."""
        return (self.lens_topp[..., 0] - self.lens_topp[..., 1]).double()

    def targets(self, corpus: Tokenized) -> Int[torch.Tensor, "n"]:
        """The token each ranked position is scored against, from the ``corpus`` it was ranked on:
        the original token at a masked position (masked protocol), else the actual next token
        (−1 at the end of a line)."""
        shift = int(corpus.masking is None)
        seqs = corpus.seqs
        return torch.tensor([seqs[line][pos + shift] if pos + shift < len(seqs[line]) else -1
                             for line, pos in self.origin])


@torch.no_grad()
def collect_rankings(model, lens, corpus: Tokenized, *, k: int = 5, batch_size: int = 16,
                     max_tokens: int | None = None, keep_resid: bool = True, progress: bool = True) -> Rankings:
    """Run ``corpus`` (:meth:`~lensmat.stats.pipeline.Tokenized.batches`, so a masked LM reads its lines
    with their ``[MASK]`` positions) and record the lens's top-``k`` at every layer at its scored
    positions (up to ``max_tokens`` of them)."""
    from tqdm.auto import tqdm

    n_layers = int(model.cfg.n_layers)
    hooks = resid_hooks(n_layers)
    tops, probs, resids, origin, inputs = [], [], [], [], {}
    bar = tqdm(total=corpus.n_tokens(max_tokens), unit="tok", unit_scale=True, desc="rankings", disable=not progress)
    for batch in corpus.batches(batch_size, max_tokens):
        lines = batch.lines  # each row's index in corpus.seqs (batching skips lines with nothing to score)
        captured, logits = run_capture(model, batch, hooks, logits=True)
        per_layer = [torch.softmax((lens(captured[h], layer) if lens.covers(layer) else logits).float(), -1).topk(k, -1)
                     for layer, h in enumerate(hooks[:-1])]
        final = torch.softmax(logits.float(), -1).topk(k, -1)
        tops.append(torch.stack([t.indices.cpu() for t in (*per_layer, final)]))
        probs.append(torch.stack([t.values.cpu() for t in (*per_layer, final)]))
        if keep_resid:
            resids.append(torch.stack([captured[h].float().cpu() for h in hooks]))
        rows, cols = batch.score_mask.nonzero(as_tuple=True)
        origin += [(lines[int(r)], int(c)) for r, c in zip(rows, cols)]
        inputs |= {line: batch.tokens[r, : int(batch.attention_mask[r].sum())].tolist() for r, line in enumerate(lines)}
        bar.update(batch.n_scored)
    bar.close()
    if not tops:
        raise ValueError("No tokens to rank: the corpus split is empty.")
    return Rankings(torch.cat(tops, 1), torch.cat(probs, 1), torch.cat(resids, 1) if keep_resid else None, origin,
                    inputs)


def saturation_layers(lens_topk: Int[torch.Tensor, "layers n k"], final_topk: Int[torch.Tensor, "n k"],
                      start: int = 0) -> Int[torch.Tensor, "n k"]:
    """``s_k`` per token and rank: the first layer ``≥ start`` of the trailing run of layers whose
    rank-k token equals ``final_topk``; ``layers`` (one past the last) where even the last layer
    differs. The saturation protocol reads block outputs only (``start=1``)."""
    match = lens_topk == final_topk[None]
    trailing = match.flip(0).to(torch.int64).cumprod(0).sum(0)
    return (lens_topk.shape[0] - trailing).clamp_min(start)


def kept_tokens(s: Int[torch.Tensor, "n k"], n_layers: int, frac: float = 0.85) -> torch.Tensor:
    """Boolean mask of the tokens the paper keeps: top-1 saturated by block output ``⌊frac·L⌋``
    (0-based, the authors' numbering), i.e. ``s_1 ≤ ⌊frac·L⌋ + 1`` in residual layers."""
    return s[:, 0] <= int(frac * n_layers) + 1


def mean_ranks(s: Int[torch.Tensor, "n k"], n_layers: int) -> list[float | None]:
    """Per rank k, the mean over tokens whose ``s_k < L`` of the rank of ``s_k`` among the token's
    ``s_1..s_K`` (1 = earliest; tied layers take the lowest rank, as the authors' ``sorted.index``);
    ``None`` where no token's rank k saturates before ``L``."""
    rank = 1 + (s[:, None, :] < s[:, :, None]).sum(-1).double()  # [n, k]: values strictly below s_k
    saturated = s < n_layers
    count = saturated.sum(0)
    total = (rank * saturated).sum(0)
    return [float(t / c) if c else None for t, c in zip(total, count)]


ORDER_RULES = ("authors", "leading")
SATURATION_LENSES = ("logit", "mat", "mat-affine", "tuned", "mat-tuned")  # lenses defined at every layer


def order_prefix(s: Int[torch.Tensor, "n k"], n_layers: int, rule: str = "authors") -> Int[torch.Tensor, "n"]:
    """``m`` per token, the ranks ``1..m`` the order test compares: ``authors``, up to the last rank
    saturated before ``L``; ``leading``, the leading run of ranks saturated before ``L``."""
    saturated = s < n_layers
    if rule == "authors":
        return (saturated * torch.arange(1, s.shape[1] + 1)).amax(1)
    if rule == "leading":
        return saturated.to(torch.int64).cumprod(1).sum(1)
    raise ValueError(f"Unknown order rule {rule!r}; valid: {', '.join(ORDER_RULES)}.")


def strict_kendall_tau(s: Int[torch.Tensor, "n m"]) -> Float[torch.Tensor, "n"]:
    """Kendall τ between ``(1..m)`` and each row of ``s``: (concordant − discordant) / C(m, 2), a
    pair ``i < j`` concordant only when ``s_i < s_j`` strictly (ties are discordant)."""
    m = s.shape[1]
    i, j = torch.triu_indices(m, m, offset=1)
    concordant = (s[:, i] < s[:, j]).double().sum(1)
    pairs = m * (m - 1) / 2
    return (2 * concordant - pairs) / pairs


def order_test(s: Int[torch.Tensor, "n k"], n_layers: int, *, rule: str = "authors", min_k: int = 3,
               n_permutations: int = 1000, seed: int = 0) -> dict:
    """Mean strict τ over tokens with ``m ≥ min_k`` (each on its ranks ``1..m``, :func:`order_prefix`)
    and a one-sided permutation p-value, ``(1 + #{τ_perm ≥ τ}) / (1 + n_permutations)``. The null
    shuffles a token's layers, all ``K`` then truncated to ``m`` (``authors``) or its ``m`` (``leading``)."""
    if n_permutations < 1:
        raise ValueError(f"n_permutations={n_permutations}: the permutation test needs at least 1 shuffle.")
    m = order_prefix(s, n_layers, rule)
    groups = [(int(w), s[m == w]) for w in range(min_k, s.shape[1] + 1) if int((m == w).sum())]
    n = sum(len(g) for _, g in groups)
    if n == 0:
        return {"kendall_tau": None, "p_value": None, "n_tokens": 0}
    observed = float(sum(strict_kendall_tau(g[:, :w]).sum() for w, g in groups)) / n
    gen = torch.Generator().manual_seed(seed)
    as_large = 0
    for _ in range(n_permutations):
        total = 0.0
        for w, g in groups:
            width = g.shape[1] if rule == "authors" else w
            perm = torch.rand((g.shape[0], width), generator=gen).argsort(1)
            total += float(strict_kendall_tau(g[:, :width].gather(1, perm)[:, :w]).sum())
        as_large += total / n >= observed - 1e-12
    return {"kendall_tau": observed, "p_value": (1 + as_large) / (1 + n_permutations), "n_tokens": n}


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


@torch.no_grad()
def implanted_top1(model, lens, tokens: list[int], pos: int, layer: int | list[int],
                   state: Float[torch.Tensor, "... d"]) -> Int[torch.Tensor, "... layers"]:
    """The lens's top-1 at ``pos`` at every layer ``0..L`` (``L`` = the model) after replacing
    ``h_layer`` at ``pos`` by ``state`` (a hook at ``blocks.{layer}.hook_resid_pre``) in the line
    ``tokens``, as the model read it (:attr:`Rankings.inputs`: a masked LM's whole line with every
    masked position as ``[MASK]``).

    With a list of ``n`` layers and ``state`` ``[n, d]``, the ``n`` implants run as one batch of
    copies of ``tokens`` (row ``i`` gets ``state[i]`` at ``layer[i]``) and the result is ``[n, L+1]``."""
    single = isinstance(layer, int)
    layers, states = ([layer], state[None]) if single else (list(layer), state)
    n_layers = int(model.cfg.n_layers)
    hooks = resid_hooks(n_layers)

    def put(rows: list[int]):
        def hook(act, hook):
            act[rows, pos] = states[rows].to(act.device, act.dtype)
            return act
        return hook

    implants = [(resid_hook(j), put([i for i, x in enumerate(layers) if x == j])) for j in sorted(set(layers))]
    captured = {}
    capture = [(h, lambda act, hook, h=h: captured.__setitem__(h, act[:, pos].clone())) for h in hooks]
    batch = torch.tensor([tokens] * len(layers), device=input_device(model))
    logits = model.run_with_hooks(batch, fwd_hooks=[*implants, *capture])[:, pos]
    top1 = [lens(captured[h], i).argmax(-1) if lens.covers(i) else logits.argmax(-1)
            for i, h in enumerate(hooks[:-1])]
    out = torch.stack([*top1, logits.argmax(-1)], dim=-1).cpu()
    return out[0] if single else out


OFFSETS = tuple(range(-5, 6))  # the authors' sweep for GPT-2: 5 layers either side of s_1(early)


def implant_pairs(top1: Int[torch.Tensor, "n"], s1: Int[torch.Tensor, "n"], *, min_gap: int = 3,
                  max_pairs: int = 100, seed: int = 0) -> list[tuple[int, int]]:
    """Up to ``max_pairs`` ``(early, late)`` token pairs with the same final top-1 and
    ``s_1(late) − s_1(early) ≥ min_gap``: random late tokens, each with a random early partner."""
    rng = random.Random(seed)
    by_top1: dict[int, list[int]] = {}
    for i, t in enumerate(top1.tolist()):
        by_top1.setdefault(t, []).append(i)
    pairs = []
    for late in rng.sample(range(len(top1)), len(top1)):
        earlies = [e for e in by_top1[int(top1[late])] if int(s1[late] - s1[e]) >= min_gap]
        if earlies:
            pairs.append((rng.choice(earlies), late))
        if len(pairs) == max_pairs:
            break
    return pairs


@torch.no_grad()
def implant(model, lens, rankings: Rankings, s1: Int[torch.Tensor, "n"], *,
            min_gap: int = 3, offsets: tuple[int, ...] = OFFSETS, max_pairs: int = 100, seed: int = 0,
            pairs: list[tuple[int, int]] | None = None) -> dict:
    """Implant an early token's residual state into a late token's stream and re-measure ``s_1``.

    Pairs ``(early, late)`` (:func:`implant_pairs`, unless given) share the final top-1 and
    ``s_1(late) − s_1(early) ≥ min_gap``. For each implant layer ``j = s_1(early) + offset``
    (``0 ≤ j < s_1(late)``), ``h_j`` of the late token is replaced (hook at
    ``blocks.{j}.hook_resid_pre``) by the early token's ``h_j``, in the late token's line as it was
    ranked (:attr:`Rankings.inputs`; under the masked protocol the whole line, all its masked
    positions as ``[MASK]``). Success (the authors' criterion):
    the late token's new ``s_1`` equals ``j`` and its final top-1 is unchanged. Returns
    ``{"success", "n_trials", "n_pairs", "by_offset": [{"offset", "success", "n_trials"}]}``;
    ``success`` and ``n_trials`` are offset 0's (``None`` / 0 when no pair allows it).
    """
    if rankings.resid is None:
        raise ValueError("The intervention needs residual states: collect rankings with keep_resid=True.")
    n_layers = int(model.cfg.n_layers)
    top1 = rankings.final_topk[:, 0]
    if pairs is None:
        pairs = implant_pairs(top1, s1, min_gap=min_gap, max_pairs=max_pairs, seed=seed)
    successes, trials = dict.fromkeys(offsets, 0), dict.fromkeys(offsets, 0)
    for early, late in pairs:
        line, pos = rankings.origin[late]
        tried = [o for o in offsets if 0 <= int(s1[early]) + o < min(int(s1[late]), n_layers)]
        if not tried:
            continue
        layers = [int(s1[early]) + o for o in tried]  # one batch: every offset of this pair
        new_top1 = implanted_top1(model, lens, rankings.inputs[line], pos, layers, rankings.resid[layers, early])
        new_s1 = saturation_layers(new_top1.T[:, :, None], new_top1[:, -1:], start=1)[:, 0]
        for o, j, row, first in zip(tried, layers, new_top1, new_s1.tolist()):
            successes[o] += int(first == j and int(row[-1]) == int(top1[late]))
            trials[o] += 1
    by_offset = [{"offset": o, "success": successes[o] / trials[o] if trials[o] else None, "n_trials": trials[o]}
                 for o in offsets]
    zero = next((r for r in by_offset if r["offset"] == 0), {"success": None, "n_trials": 0})
    return {"success": zero["success"], "n_trials": zero["n_trials"], "n_pairs": len(pairs), "by_offset": by_offset}


def saturation(model=None, dataset: str | None = None, *, lens: str = "logit", k: int = 5,
               max_fit_tokens: int | None = None, max_eval_tokens: int | None = 5_000, frac: float = 0.85,
               n_permutations: int = 1000, order_rule: str = "authors", max_pairs: int = 100, batch_size: int = 16,
               max_length: int = data.DEFAULT_MAX_LENGTH, n_mask: int = 1, mask_seed: int = 0,
               stats_device: str | None = None, memory_limit: int | None = None,
               progress: bool = True, seed: int = 0) -> dict:
    """The saturation protocol on ``heldout`` under one lens (one of :data:`SATURATION_LENSES`,
    fitted on ``train``); returns the ``saturation`` report.
    ``kendall_tau`` / ``p_value`` follow ``order_rule``; ``order_tests`` holds both rules.
    A masked LM runs the masked protocol (``n_mask`` positions per line, ``mask_seed``): the ranks,
    probes and implants are at its ``[MASK]`` positions, and the lens is one of
    :data:`~lensmat.lenses.registry.MASKED_LM_LENSES`; the report says which (``protocol``, ``masking``).
    ``stats_device`` / ``memory_limit``: the memory plan, as in :func:`~lensmat.analyses.compare.compare`."""
    from lensmat.stats.plan import check_memory
    from lensmat.lenses.registry import build_lenses, refuse_causal_lenses_on_masked_lm
    from lensmat.analyses.common import protocol_fields, start_run
    from lensmat.stats.pipeline import tokenized

    if lens not in SATURATION_LENSES:
        raise ValueError(f"Unknown lens {lens!r} for saturation; valid: {', '.join(SATURATION_LENSES)}.")
    if order_rule not in ORDER_RULES:
        raise ValueError(f"Unknown order rule {order_rule!r}; valid: {', '.join(ORDER_RULES)}.")
    model = start_run(model)
    if not 1 <= k < int(model.cfg.d_vocab):
        raise ValueError(f"k={k} ranks cannot be followed in a vocabulary of {model.cfg.d_vocab} tokens; "
                         f"use 1 <= k < {model.cfg.d_vocab}.")
    refuse_causal_lenses_on_masked_lm(model, [lens])
    n_layers = int(model.cfg.n_layers)
    train = tokenized(model, dataset, "train", max_length, n_mask=n_mask, mask_seed=mask_seed)
    memory = check_memory(model, "saturation", train, batch_size=batch_size, stats_device=stats_device,
                          memory_limit=memory_limit, progress=progress, fits_maps=lens.startswith("mat"))
    lenses, _, _ = build_lenses(model, [lens], train, max_fit_tokens=max_fit_tokens, batch_size=batch_size,
                                stats_device=stats_device, progress=progress)
    heldout = tokenized(model, dataset, "heldout", max_length, n_mask=n_mask, mask_seed=mask_seed)
    rankings = collect_rankings(model, lenses[lens], heldout, k=k, batch_size=batch_size,
                                max_tokens=max_eval_tokens, progress=progress)
    s = saturation_layers(rankings.lens_topk, rankings.final_topk, start=1)
    keep = kept_tokens(s, n_layers, frac)
    sk = s[keep]
    tests = {rule: order_test(sk, n_layers, rule=rule, n_permutations=n_permutations, seed=seed) for rule in ORDER_RULES}
    order = tests[order_rule]
    kept = rankings.select(keep)
    labels = task_labels(sk, n_layers)
    resid = kept.resid
    report = {
        "model": describe(model).name, "n_layers": n_layers, "lens": lens, "k": k, **protocol_fields(heldout),
        "n_tokens": int(s.shape[0]), "n_kept": int(keep.sum()), "frac": frac, "max_s1": int(frac * n_layers) + 1,
        "mean_layer": sk.double().mean(0).tolist(), "mean_rank": mean_ranks(sk, n_layers),
        "kendall_tau": order["kendall_tau"], "p_value": order["p_value"], "n_order_tokens": order["n_tokens"],
        "order_rule": order_rule, "order_tests": tests,
        "probe_accuracy": probe_accuracy(resid, labels, seed=seed),
        "probe_control": probe_accuracy(resid, labels, seed=seed, control=True),
        "memory_plan": memory,
    }
    report["pooled_probe"] = pooled_probe(resid, sk, n_layers, seed=seed)
    report["pooled_probe_control"] = pooled_probe(resid, sk, n_layers, seed=seed, control=True)
    result = implant(model, lenses[lens], kept, sk[:, 0], max_pairs=max_pairs, seed=seed)
    report.update(intervention_success=result["success"], intervention_trials=result["n_trials"],
                  intervention_sweep=result["by_offset"])
    return report

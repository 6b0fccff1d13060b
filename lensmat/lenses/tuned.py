"""The tuned lens (Belrose et al. 2023, arXiv 2303.08112), native on the bridge.

Per residual layer ``l = 0..L-1`` an affine translator ``T_l(h) = h + h @ W_l + b_l`` with
``W_l = 0, b_l = 0`` at initialisation (so it starts as the logit lens), trained to minimise
``KL(p_final ‖ p_lens)`` averaged over scored tokens of the ``train`` split, then read through
the model's final norm and unembedding. At ``l = L`` the lens is the identity.

``mat-tuned`` is the same training started from the affine least-squares map of "Jump to
Conclusions" instead of the identity: ``W_l = A_{l→L} − I``, ``b_l = b_{l→L}`` (so at step 0 it is
the ``mat-affine`` lens). Weight decay then pulls ``W`` towards ``0`` (the identity translator),
as in the identity-started lens.

Default recipe as the reference implementation: SGD with Nesterov momentum 0.9, learning rate
0.1 decaying linearly to 0, weight decay 1e-3, gradient-norm clipping at 1.0; ``optimizer="adam"``
is an option. Memory is bounded: activations of one batch at a time, one layer's
``[tokens, vocab]`` logits at a time.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from lensmat import data
from lensmat.stats.collect import check_layer, resid_hook, resid_hooks, run_capture
from lensmat.stats.fit import MapSet
from lensmat.lenses.base import Lens
from lensmat.lenses.tuned_package import is_package_folder, read_package
from lensmat.models import check_same_model, describe, require_causal
from lensmat.stats.pipeline import Tokenized, tokenized


@dataclass
class TunedLensTraining:
    """Training recipe of a tuned lens (tokens = scored tokens of the train split)."""

    tokens: int = 200_000
    batch_size: int = 16
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 1.0
    optimizer: str = "sgd"  # "sgd" (Nesterov) or "adam"
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [f"{name}={value!r} (use {rule})" for name, value, ok, rule in (
            ("tokens", self.tokens, self.tokens >= 0, "tokens >= 0; 0 keeps a mat-tuned lens at its maps"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "at least 1"),
            ("lr", self.lr, math.isfinite(self.lr) and self.lr > 0, "a finite lr > 0"),
            ("momentum", self.momentum, 0 <= self.momentum < 1, "0 <= momentum < 1"),
            ("weight_decay", self.weight_decay, math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             "a finite weight decay >= 0"),
            ("clip", self.clip, self.clip > 0, "a clip norm > 0"),
            ("optimizer", self.optimizer, self.optimizer in ("sgd", "adam"), "'sgd' or 'adam'")) if not ok]
        if bad:
            raise ValueError(f"TunedLensTraining: {'; '.join(bad)}.")


class TunedLens(Lens):
    """A tuned lens: ``transform_hidden(h, l) = h + h @ W_l + b_l`` for ``l < L``, identity at ``L``.

    ``W`` (``[L, d, d]``) and ``b`` (``[L, d]``) are ``nn.Parameter`` s (float32, on the CPU until
    ``.to()`` moves them), so ``state_dict()`` holds ``{"W", "b"}`` and the lens trains as any module.
    """

    name = "tuned"

    def __init__(self, model, W: Float[torch.Tensor, "L d d"] | None = None, b: Float[torch.Tensor, "L d"] | None = None,
                 meta: dict | None = None, name: str = "tuned") -> None:
        super().__init__(model)
        self.name = name
        L, d = int(model.cfg.n_layers), int(model.cfg.d_model)
        self.W = torch.nn.Parameter(torch.zeros(L, d, d) if W is None else W.detach().float().cpu())
        self.b = torch.nn.Parameter(torch.zeros(L, d) if b is None else b.detach().float().cpu())
        if self.W.shape != (L, d, d) or self.b.shape != (L, d):
            raise ValueError(f"Tuned-lens weights of shape {tuple(self.W.shape)} do not fit this model (L={L}, d={d}).")
        self.meta = meta or {"model": describe(model).to_dict()}

    def transform_hidden(self, h, layer):
        layer = check_layer(layer, self.n_layers)
        if layer == self.n_layers:
            return h
        W = self.W[layer].to(h.device, h.dtype)
        return h + h @ W + self.b[layer].to(h.device, h.dtype)

    def save(self, path: str | os.PathLike, force: bool = False):
        from lensmat.stats import artifacts as io

        return io.save_artifact(path, "lens", {"W": self.W, "b": self.b}, {"lens": "tuned", "name": self.name, **self.meta},
                                force=force)

    @classmethod
    def load(cls, path: str | os.PathLike, model) -> "TunedLens":
        """Load a saved tuned lens, refusing it for a model that differs from the one it was trained on:
        a lensmat folder (``lens.safetensors`` + ``meta.json``) or a folder of the ``tuned-lens``
        package (``config.json`` + ``params.pt``, see :meth:`from_package`)."""
        from lensmat.stats import artifacts as io

        if is_package_folder(path):
            return cls.from_package(path, model)
        if not (Path(path) / "meta.json").is_file():
            what = "holds neither" if Path(path).is_dir() else "is not a folder; pass one that holds either"
            raise io.ArtifactError(f"{path} {what} a lensmat tuned lens (lens.safetensors + meta.json) "
                                   f"{'nor' if Path(path).is_dir() else 'or'} a tuned-lens package lens "
                                   "(config.json + params.pt).")
        tensors, meta = io.load_artifact(path, "lens")
        if meta.get("lens") != "tuned":
            raise io.ArtifactError(f"{path} does not hold a tuned lens (lens={meta.get('lens')!r}).")
        check_same_model(meta["model"], model, what=f"the tuned lens in {path}")
        L, d = int(model.cfg.n_layers), int(model.cfg.d_model)
        io.check_tensors(f"{path}/lens.safetensors", tensors, {"W": (L, d, d), "b": (L, d)},
                         "the file is corrupted; retrain the lens (lensmat.train_tuned_lens) or re-copy the folder.")
        return cls(model, tensors["W"], tensors["b"], meta, name=meta.get("name", "tuned"))

    @classmethod
    def from_package(cls, path: str | os.PathLike, model) -> "TunedLens":
        """A lens saved by the ``tuned-lens`` package (a ``config.json`` + ``params.pt`` folder, as its
        hub repository lays out ``lens/<model>/``); checks in :func:`read_package`."""
        return cls(model, *read_package(path, model))


def kl_backward(model, W, b, captured: dict, hooks: list[str], logp_final) -> float:
    """The loss ``Σ_l mean KL(p_final ‖ p_lens,l)`` (nats), with its gradient added to ``W.grad`` /
    ``b.grad``. Layer ``l``'s term depends on ``W[l], b[l]`` only, so each term is back-propagated
    on its own: one layer's ``[tokens, vocab]`` graph exists at a time (a 262K-token vocabulary
    times 18 layers would not fit in memory), and the gradient is that of the sum."""
    from transformer_lens.tools.analysis.logit_lens import logit_readout

    p_final = logp_final.exp()
    neg_entropy = (p_final * logp_final).sum(-1)
    total = 0.0
    for layer, hook in enumerate(hooks):
        h = captured[hook]
        z = h + h @ W[layer] + b[layer]
        logq = torch.log_softmax(logit_readout(model, z, return_type="logits", chunk_size=4096,
                                               enable_grad=True).values.float(), dim=-1)
        term = (neg_entropy - (p_final * logq).sum(-1)).mean()
        term.backward()
        total += float(term.detach())
    return total


def translator_init(model, maps: MapSet) -> tuple[Float[torch.Tensor, "L d d"], Float[torch.Tensor, "L d"]]:
    """``(W, b)`` of the tuned-lens translators that reproduce the maps ``h_l -> h_L`` of ``maps``:
    ``W_l = A_{l→L} − I`` and ``b_l`` the map's intercept (zero without one)."""
    maps.check_model(model)
    L, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    W, b = torch.zeros(L, d, d), torch.zeros(L, d)
    for layer in range(L):
        m = maps.get(resid_hook(layer), resid_hook(L))
        W[layer] = m.W.float().cpu() - torch.eye(d)
        if m.b is not None:
            b[layer] = m.b.float().cpu()
    return W, b


def recipe_optimizer(params: list[torch.Tensor], config: TunedLensTraining, corpus: Tokenized):
    """``(optimizer, scheduler)`` of the recipe: Nesterov SGD (or AdamW) on ``params``, its learning rate
    decaying linearly to 0 over the steps ``config.tokens`` takes at ``corpus``'s mean scored tokens per line."""
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=True,
                              weight_decay=config.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    tokens_per_batch = corpus.n_tokens() / len(corpus.seqs) * config.batch_size
    n_steps = max(1, math.ceil(config.tokens / tokens_per_batch))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / n_steps))


def train_tuned_lens(model, dataset: str | Tokenized | None = None, config: TunedLensTraining | None = None, *,
                     init: MapSet | None = None, max_length: int = data.DEFAULT_MAX_LENGTH,
                     progress: bool = True) -> TunedLens:
    """Train a tuned lens on the ``train`` split (or on a given :class:`~lensmat.stats.pipeline.Tokenized`);
    returns it with its provenance in ``lens.meta``.

    The loss is the sum over layers of the mean ``KL(p_final ‖ p_lens)`` per token (nats); the
    corpus is cycled until ``config.tokens`` scored tokens have been used. ``init``: residual maps
    ``h_l -> h_L`` (e.g. affine ones from :func:`~lensmat.stats.pipeline.fit_maps`) to start from instead
    of the identity; the lens is then named ``mat-tuned`` and ``config.tokens = 0`` returns the
    maps' lens itself.
    """
    require_causal(model, "The tuned lens")
    config = config or TunedLensTraining()
    if config.tokens == 0 and init is None:
        raise ValueError("A tuned lens trained on 0 tokens is the logit lens, not a tuned lens; give config.tokens >= 1 "
                         "(or init= maps, for the mat-tuned lens at its maps).")
    torch.manual_seed(config.seed)
    corpus = dataset if isinstance(dataset, Tokenized) else tokenized(model, dataset, "train", max_length)
    L, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    device = model.W_U.device
    W0, b0 = translator_init(model, init) if init is not None else (torch.zeros(L, d, d), torch.zeros(L, d))
    W, b = W0.to(device).requires_grad_(True), b0.to(device).requires_grad_(True)
    opt, sched = recipe_optimizer([W, b], config, corpus)
    hooks = resid_hooks(L)[:-1]
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    bar = tqdm(total=config.tokens, unit="tok", unit_scale=True, desc="tuned lens", disable=not progress)
    seen, losses, start = 0, [], time.perf_counter()
    try:
        while seen < config.tokens:
            for batch in corpus.batches(config.batch_size, config.tokens - seen):
                with torch.no_grad():
                    captured, logits = run_capture(model, batch, hooks, logits=True)
                    logp_final = torch.log_softmax(logits.float(), dim=-1)
                opt.zero_grad(set_to_none=True)
                loss = kl_backward(model, W, b, captured, hooks, logp_final)
                torch.nn.utils.clip_grad_norm_([W, b], config.clip)
                opt.step()
                sched.step()
                seen += batch.n_scored
                losses.append(loss / L)
                bar.update(batch.n_scored)
                bar.set_postfix(kl_per_layer=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    meta = {"model": describe(model).to_dict(), "config": asdict(config),
            "provenance": {"dataset": corpus.dataset, "split": "train", "max_length": corpus.max_length,
                           "n_tokens": seen, "fit_seconds": time.perf_counter() - start,
                           "final_train_kl_per_layer": sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None}}
    if init is not None:
        meta["init"] = {"intercept": init.intercept, "provenance": init.provenance}
    return TunedLens(model, W.detach().cpu(), b.detach().cpu(), meta, name="tuned" if init is None else "mat-tuned")


def __getattr__(name: str):
    if name == "TunedLensConfig":  # the tuned-lens package's TunedLensConfig is the lens architecture, not a recipe
        import warnings

        warnings.warn("TunedLensConfig is now TunedLensTraining (a training recipe; the tuned-lens package's "
                      "TunedLensConfig is the lens's architecture); the old name will be removed.",
                      DeprecationWarning, stacklevel=2)
        return TunedLensTraining
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

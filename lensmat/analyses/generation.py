"""Real early-exit generation: greedy decoding that stops at the layer where a lens is confident.

The loop runs the Hugging Face decoder under the bridge with a key/value cache, one new token
per step, and watches the residual stream through the bridge's own hook points, so it serves
every causal architecture the bridge loads (GPT-2, Llama-style RMSNorm + rotary models, Gemma-3
with its sliding-window layers, ...):

- ``blocks.{l-1}.hook_resid_post`` (residual layer ``l``, ``1 ≤ l < L``): the lens reads ``h_l``;
  if its top-two gap exceeds ``θ(t)`` (:func:`lensmat.analyses.early_exit.exit_threshold`) the step exits
  at ``l`` and emits the lens's top-1 there.
- ``blocks.{j}.hook_resid_pre`` for every later block ``j ≥ l``: the block's input is replaced by
  ``h_l``, so the key/value entries it writes for this position are computed from the exit
  state (CALM's state propagation, Schuster et al. 2022) and later tokens can attend to it.
  A skipped block's MLP is not run (its output would be discarded), and neither are the final
  norm and unembedding; its attention still runs on the single new position.

So a token that exits at ``l`` costs ``l`` full blocks plus ``L − l`` attention-only blocks.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from lensmat.compat import bridge_cache_shim, cache_kwarg
from lensmat.analyses.early_exit import TAU, exit_threshold
from lensmat.lenses.base import readout
from lensmat.models import describe, input_device, require_causal
from lensmat.stats.pipeline import encode


def _decoder(model) -> torch.nn.Module:
    """The Hugging Face decoder stack under the bridge (the model without its LM head)."""
    hf = getattr(model, "original_model", None)
    base = getattr(hf, "base_model", None)
    if base is None or base is hf:
        raise NotImplementedError(f"{describe(model).name}: real early-exit generation needs a Hugging Face "
                                  "causal LM with a separate decoder stack under the bridge (model.original_model).")
    return base


@contextlib.contextmanager
def _mlps_skipped_after_exit(model, state: dict):
    """While the block runs, an MLP of a block after the exit layer returns zeros without computing."""
    saved = []
    for block in model.blocks:
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            continue
        run = mlp.forward

        def forward(*args, _run=run, **kwargs):
            if state["exit"] is None:
                return _run(*args, **kwargs)
            return torch.zeros_like(args[0] if args else next(iter(kwargs.values())))

        saved.append(mlp)
        object.__setattr__(mlp, "forward", forward)  # on the instance: the bridge passes setattr on to HF
    try:
        yield
    finally:
        for mlp in saved:
            object.__delattr__(mlp, "forward")  # back to the class's forward


def fast_readout(model, probe: torch.Tensor):
    """``h -> logits`` through the bridge's own final norm and unembedding modules, without
    :func:`~lensmat.lenses.base.readout`'s per-call validation (milliseconds, more than a small block
    costs at batch 1). Checked once against ``readout`` on ``probe``; where they differ (an output
    transform such as logit soft-capping), ``readout`` itself is returned."""
    def direct(h):
        return model.unembed(model.ln_final(h))

    with torch.no_grad():
        same = torch.allclose(direct(probe).float(), readout(model, probe).float(), atol=1e-4, rtol=1e-4)
    return direct if same else (lambda h: readout(model, h))


def _exit_hooks(lens, read, state: dict, n_layers: int) -> list:
    """The hooks of a decoding step, sharing ``state``: after block ``l−1`` (``1 ≤ l < L``), the first layer whose
    top-two gap under ``lens`` (read by ``read``) exceeds ``state["theta"]`` is recorded as ``state["exit"] =
    (layer, top-1, h)`` (``h_L`` goes to ``state["h_last"]``); after an exit, every later block's input is ``h``."""
    def watch(h, hook):
        layer = int(hook.name.split(".")[1]) + 1
        if layer == n_layers:
            state["h_last"] = h[0, -1]
        elif state["exit"] is None and state["theta"] < 1:
            probs = torch.softmax(read(lens.transform_hidden(h[0, -1], layer)).float(), -1).topk(2)
            if float(probs.values[0] - probs.values[1]) > state["theta"]:
                state["exit"] = (layer, int(probs.indices[0]), h)

    def propagate(h, hook):
        return h if state["exit"] is None else state["exit"][2]

    hooks = [(f"blocks.{b}.hook_resid_post", watch) for b in range(n_layers)]
    return hooks + [(f"blocks.{b}.hook_resid_pre", propagate) for b in range(1, n_layers)]


def prompt_ids(model, prompt: str | list[int] | torch.Tensor) -> list[int]:
    """A prompt as token ids: a string is tokenized as every analysis reads a line (BOS first, if the
    model uses one); ids (a list, or a tensor ``[pos]`` / ``[1, pos]``) are taken as they are."""
    if isinstance(prompt, str):
        return encode(model, [prompt], int(model.cfg.n_ctx))[0]
    ids = prompt.reshape(-1).tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
    if not ids or not all(isinstance(i, int) and 0 <= i < int(model.cfg.d_vocab) for i in ids):
        raise ValueError(f"A prompt is a string or a non-empty list of token ids in [0, {model.cfg.d_vocab}).")
    return ids


@torch.no_grad()
def generate(model, lens, prompt: str | list[int] | torch.Tensor, max_new_tokens: int, *, lam: float | None = None,
             n_mean: float = 64.0, tau: float | None = None) -> dict:
    """Greedy decoding with confidence exit (``lam=None``: never exit, i.e. the full model; ``lens``
    may then be None).

    ``prompt``: a string, or token ids (BOS first, if the model uses one; :func:`prompt_ids`). The prompt is prefilled by
    the full model; each later token runs blocks with a key/value cache and may exit after block
    ``l−1`` (residual layer ``l``, ``1 ≤ l < L``), as the module docstring describes. The threshold
    ``θ(t)`` uses the input token's 0-based position ``t`` after BOS (the convention of the simulated
    curves) and ``n_mean`` as ``N``.

    Returns ``{"tokens": new token ids, "text": them decoded (with a tokenizer), "exit_layers": per
    token (``L`` = no exit), "seconds": wall time, "kv_lengths": cached positions per layer at the end
    (all equal when propagation is complete)}``.
    """
    require_causal(model, "Early-exit generation")
    prompt = prompt_ids(model, prompt)
    if lam is not None and lens is None:
        raise ValueError("An exit threshold (lam) needs a lens to read the intermediate layers with.")
    decoder = _decoder(model)
    from transformers import DynamicCache

    n_layers, device = int(model.cfg.n_layers), input_device(model)
    tau = TAU if tau is None else tau
    state: dict = {"theta": math.inf, "exit": None, "h_last": None}
    read = fast_readout(model, model.W_E[prompt[0]].float().to(model.W_U.dtype))
    hooks = _exit_hooks(lens, read, state, n_layers)
    cache = DynamicCache(config=model.original_model.config)
    kwarg = cache_kwarg(decoder)

    def step(ids):
        decoder(input_ids=torch.tensor([ids], device=device), use_cache=True, **{kwarg: cache})
        if state["exit"] is not None:
            return state["exit"][0], state["exit"][1]
        return n_layers, int(read(state["h_last"]).argmax(-1))

    start = time.perf_counter()
    tokens, exits = [], []
    with model.hooks(fwd_hooks=hooks), bridge_cache_shim(model), _mlps_skipped_after_exit(model, state):
        ids = list(prompt)
        for _ in range(max_new_tokens):
            layer, token = step(ids)
            tokens.append(token)
            exits.append(layer)
            ids = [token]
            t = len(prompt) + len(tokens) - 2  # the next input token's position in its line, BOS excluded, as in
            state["exit"] = None               # the simulated curves (lensmat.analyses.early_exit.positions)
            state["theta"] = math.inf if lam is None else float(exit_threshold(lam, torch.tensor([t]), n_mean, tau)[0])
    text = model.tokenizer.decode(tokens) if getattr(model, "tokenizer", None) is not None else None
    return {"tokens": tokens, "text": text, "exit_layers": exits, "seconds": time.perf_counter() - start,
            "kv_lengths": [cache.get_seq_length(i) for i in range(n_layers)]}


def greedy_reference(model, prompt: str | list[int] | torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy tokens of the full bridge, recomputing the whole prefix each step (no cache)."""
    prompt = prompt_ids(model, prompt)
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(model(torch.tensor([ids], device=input_device(model)))[0, -1].argmax()))
    return ids[len(prompt):]

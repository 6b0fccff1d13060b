"""Real early-exit generation: greedy decoding that stops at the layer where a lens is confident.

The loop runs the Hugging Face decoder under the bridge with a key/value cache, one new token
per step, and watches the residual stream through the bridge's own hook points, so it serves
every causal architecture the bridge loads (GPT-2, Llama-style RMSNorm + rotary models, Gemma-3
with its sliding-window layers, ...):

- ``blocks.{l-1}.hook_resid_post`` (residual layer ``l``, ``1 ≤ l < L``): a check decides whether the
  step exits at ``l``; the first layer that says yes is the exit layer, and the step emits the lens's
  top-1 there.
- ``blocks.{j}.hook_resid_pre`` for every later block ``j ≥ l``: the block's input is replaced by
  ``h_l``, so the key/value entries it writes for this position are computed from the exit
  state (CALM's state propagation, Schuster et al. 2022) and later tokens can attend to it.
  A skipped block's MLP is not run (its output would be discarded), and neither are the final
  norm and unembedding; its attention still runs on the single new position.

So a token that exits at ``l`` costs ``l`` full blocks plus ``L − l`` attention-only blocks, plus its checks.

The checks (``generate(check=...)``):

- ``"exact"`` (default): the confidence rule of :mod:`lensmat.analyses.early_exit`. The lens reads ``h_l``
  (final norm and the full unembedding of ``lens.transform_hidden(h, l)``, through the readout engine,
  :func:`_confident`) and the
  step exits if the top-two gap exceeds ``θ(t)`` (:func:`lensmat.analyses.early_exit.exit_threshold`).
  Each check is a full-vocabulary readout: on a small model with a large vocabulary (SmolLM2-135M:
  ``d_model`` 576, 49,152 tokens, a 113 MB float32 unembedding) one readout moves more memory than
  several blocks, so the checks eat much of what the skipped blocks save.
- ``"gated"``: an :class:`~lensmat.analyses.exit_probe.ExitProbe` (one linear classifier per layer on the
  raw ``h_l``: ``d_model`` multiply-adds) runs first, and the exact check only where the probe's
  probability exceeds ``gate``. The exits are the exact rule's, taken at fewer checked layers.
- ``"probe"``: the step exits where the probe's probability exceeds ``gate``; one full readout at the
  exit layer gives the emitted token (the full model pays one too, at the end). No confidence check.

``generate`` returns, per token, the exit layer and the number of full readouts it ran (``"readouts"``).
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from lensmat.compat import bridge_cache_shim, cache_kwarg
from lensmat.analyses.early_exit import TAU, exit_threshold
from lensmat.lenses import engine
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


def top_tokens(unembedding, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [k], probs [k])`` of one last-layer-basis vector ``h`` (``[d_model]``) through the model's readout,
    read by the engine (:func:`lensmat.lenses.engine.read`: one chunk at batch 1)."""
    r = engine.read(unembedding, h[None, None], k=k)
    return r.top_ids[0, 0], r.top_probs[0, 0]


CHECKS = ("exact", "gated", "probe")


def _confident(lens, read, state: dict, h, layer: int) -> int | None:
    """The exact confidence check: one full readout of ``lens`` at ``layer`` (``read``: the model's
    :class:`~lensmat.lenses.engine.Unembedding`); the lens's top-1 if its top-two gap exceeds
    ``state["theta"]``, else ``None``."""
    state["readouts"] += 1
    ids, probs = top_tokens(read, lens.transform_hidden(h, layer), 2)
    if float(probs[0] - probs[1]) > state["theta"]:
        return int(ids[0])
    return None


def _exit_hooks(lens, read, state: dict, n_layers: int, check: str = "exact", gate=None) -> list:
    """The hooks of a decoding step, sharing ``state``: after block ``l−1`` (``1 ≤ l < L``) the check
    decides whether to exit; the first layer that does is recorded as ``state["exit"] = (layer,
    top-1, h)`` (``h_L`` goes to ``state["h_last"]``); after an exit, every later block's input is ``h``.

    ``check``: ``"exact"`` runs :func:`_confident` at every layer while ``state["theta"] < 1``;
    ``"gated"`` runs it only where ``gate(h, layer)`` (the exit probe's one dot product) is true;
    ``"probe"`` exits where ``gate`` is true (while ``state["active"]``), the emitted token being the
    lens's top-1 there (one full readout). ``state["readouts"]`` and ``state["probes"]`` count the full
    readouts and probe evaluations."""
    def last(layer):
        def watch(h, hook):
            state["h_last"] = h[0, -1]
        return watch

    def confident(layer):  # "exact"; "gated" asks the probe first
        def watch(h, hook):
            if state["exit"] is None and state["theta"] < 1:
                if check == "gated":
                    state["probes"] += 1
                    if not gate(h[0, -1], layer):
                        return
                token = _confident(lens, read, state, h[0, -1], layer)
                if token is not None:
                    state["exit"] = (layer, token, h)
        return watch

    def probed(layer):
        def watch(h, hook):
            if state["exit"] is None and state["active"]:
                state["probes"] += 1
                if gate(h[0, -1], layer):
                    state["readouts"] += 1
                    state["exit"] = (layer, int(top_tokens(read, lens.transform_hidden(h[0, -1], layer), 1)[0][0]), h)
        return watch

    def propagate(h, hook):
        return h if state["exit"] is None else state["exit"][2]

    make = probed if check == "probe" else confident
    hooks = [(f"blocks.{b}.hook_resid_post", make(b + 1) if b + 1 < n_layers else last(b + 1))
             for b in range(n_layers)]
    return hooks + [(f"blocks.{b}.hook_resid_pre", propagate) for b in range(1, n_layers)]


def _probe_gate(probe, gate: float, device):
    """``(h, layer) -> bool``: the exit probe's ``P(exit ok | h_layer) > gate``, as ``h · w_l > logit(gate) − b_l``
    (one dot product and one scalar comparison). ``gate = 0`` always opens, ``gate = 1`` never does."""
    rows = list(probe.W.to(device))  # one [d_model] view per layer, made once
    logit = -math.inf if gate == 0 else math.inf if gate == 1 else math.log(gate / (1 - gate))
    cut = [logit - float(b) for b in probe.b]

    def opens(h, layer):
        return bool(torch.dot(h.float(), rows[layer - 1]) > cut[layer - 1])
    return opens


def _check_arguments(model, lens, check: str, lam, probe, gate) -> None:
    if check not in CHECKS:
        raise ValueError(f"check={check!r}: use one of {', '.join(map(repr, CHECKS))}.")
    if check == "exact":
        if probe is not None:
            raise ValueError("check='exact' reads the lens at every layer; an exit probe is used by check='gated' or "
                             "check='probe'.")
    else:
        if probe is None:
            raise ValueError(f"check={check!r} needs an exit probe (probe=ExitProbe, from "
                             "lensmat.analyses.exit_probe.train_exit_probe or ExitProbe.load).")
        if lens is None:
            raise ValueError(f"check={check!r} needs the lens the exit probe was trained with.")
        if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 <= gate <= 1:
            raise ValueError(f"gate={gate!r}: the probe's probability threshold is a number in [0, 1] "
                             "(0: always open, 1: never).")
        probe.check(model, lens)
    if check == "probe" and lam is not None:
        raise ValueError("check='probe' exits on the probe alone (P > gate), without the confidence threshold; "
                         "pass lam=None (lam is for check='exact' and 'gated').")


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
             n_mean: float = 64.0, tau: float | None = None, check: str = "exact", probe=None,
             gate: float = 0.5) -> dict:
    """Greedy decoding with early exit (``check="exact"`` and ``lam=None``: never exit, i.e. the full
    model; ``lens`` may then be None).

    ``prompt``: a string, or token ids (BOS first, if the model uses one; :func:`prompt_ids`). The prompt is prefilled by
    the full model; each later token runs blocks with a key/value cache and may exit after block
    ``l−1`` (residual layer ``l``, ``1 ≤ l < L``), as the module docstring describes. Where to exit:

    - ``check="exact"`` (the default): the confidence rule. At every layer one full readout of the lens
      (final norm, unembedding, softmax); exit where its top-two gap exceeds ``θ(t)``. ``θ(t)`` uses the
      input token's 0-based position ``t`` after BOS (the convention of the simulated curves),
      ``lam`` as λ, ``n_mean`` as ``N`` and ``tau`` as ``τ``.
    - ``check="gated"``: the same rule, run only at the layers where the exit probe
      (``probe``, an :class:`~lensmat.analyses.exit_probe.ExitProbe`: one dot product with ``h_l``) gives
      ``P > gate``. Every exit is one the exact rule would also take at that layer; layers the gate keeps
      shut are not checked, so a token may exit later than under ``"exact"`` (``gate=0`` checks every
      layer and gives exactly ``"exact"``'s tokens and exit layers).
    - ``check="probe"``: exit at the first layer where the probe gives ``P > gate``, emitting the lens's
      top-1 there (one full readout per token, as the full model pays one at the end); no confidence
      check and no λ (``lam`` must be None). ``gate=1`` never exits.

    The probe must have been trained for this model and lens (:meth:`ExitProbe.check
    <lensmat.analyses.exit_probe.ExitProbe.check>` refuses another; :class:`~lensmat.models.ModelMismatchError`).

    Returns ``{"tokens": new token ids, "text": them decoded (with a tokenizer), "exit_layers": per
    token (``L`` = no exit), "readouts": full-vocabulary readouts per token (every confidence check,
    plus the final one of a token that does not exit; the first token, from the prefill, has 1),
    "probe_checks": probe evaluations per token, "seconds": wall time, "kv_lengths": cached positions
    per layer at the end (all equal when propagation is complete)}``.
    """
    require_causal(model, "Early-exit generation")
    prompt = prompt_ids(model, prompt)
    if lam is not None and lens is None:
        raise ValueError("An exit threshold (lam) needs a lens to read the intermediate layers with.")
    _check_arguments(model, lens, check, lam, probe, gate)
    decoder = _decoder(model)
    from transformers import DynamicCache

    n_layers, device = int(model.cfg.n_layers), input_device(model)
    tau = TAU if tau is None else tau
    state: dict = {"theta": math.inf, "active": False, "exit": None, "h_last": None, "readouts": 0, "probes": 0}
    read = engine.Unembedding(model)
    opens = None if probe is None else _probe_gate(probe, float(gate), model.W_U.device)
    hooks = _exit_hooks(lens, read, state, n_layers, check, opens)
    cache = DynamicCache(config=model.original_model.config)
    kwarg = cache_kwarg(decoder)

    def step(ids):
        decoder(input_ids=torch.tensor([ids], device=device), use_cache=True, **{kwarg: cache})
        if state["exit"] is not None:
            return state["exit"][0], state["exit"][1]
        state["readouts"] += 1
        return n_layers, int(top_tokens(read, state["h_last"], 1)[0][0])

    start = time.perf_counter()
    tokens, exits, readouts, probes = [], [], [], []
    with model.hooks(fwd_hooks=hooks), bridge_cache_shim(model), _mlps_skipped_after_exit(model, state):
        ids = list(prompt)
        for _ in range(max_new_tokens):
            layer, token = step(ids)
            tokens.append(token)
            exits.append(layer)
            readouts.append(state["readouts"])
            probes.append(state["probes"])
            ids = [token]
            t = len(prompt) + len(tokens) - 2  # the next input token's position in its line, BOS excluded, as in
            state.update(exit=None, readouts=0, probes=0, active=True)  # the simulated curves (early_exit.positions)
            state["theta"] = math.inf if lam is None else float(exit_threshold(lam, torch.tensor([t]), n_mean, tau)[0])
    text = model.tokenizer.decode(tokens) if getattr(model, "tokenizer", None) is not None else None
    return {"tokens": tokens, "text": text, "exit_layers": exits, "readouts": readouts, "probe_checks": probes,
            "seconds": time.perf_counter() - start, "kv_lengths": [cache.get_seq_length(i) for i in range(n_layers)]}


def greedy_reference(model, prompt: str | list[int] | torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy tokens of the full bridge, recomputing the whole prefix each step (no cache)."""
    prompt = prompt_ids(model, prompt)
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(model(torch.tensor([ids], device=input_device(model)))[0, -1].argmax()))
    return ids[len(prompt):]

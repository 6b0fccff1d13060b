"""Inputs of encoder-decoder models (:mod:`lensmat.models.seq2seq`): examples made on this machine, batched
for teacher forcing.

An :class:`Example` is one document: an encoder input (log-mel features ``[mel bins, frames]`` for a
Whisper-style model, token ids for a T5-style one) and a reference output ``target`` (token ids ending
with the end token). Teacher forcing feeds ``[start] + target[:-1]`` to the decoder; decoder position
``i`` is scored against ``target[i]`` (every position that has a reference token: the first predicts the
first output token from the start token, the last predicts the end token).

What a model reads is its ``inputs`` dict (``task``):

- ``speech-numbers`` (``whisper-numbers``): numbers spoken by espeak-ng (:func:`speak`: several voices,
  speeds and pitches), their log-mel features from transformers' ``WhisperFeatureExtractor`` built with
  the model's own settings, and the number in words as the target. The bundled ``data.json`` lists the
  utterances (text, voice, speed, pitch) of each split, and they are synthesised again when read, so
  espeak-ng must be installed (``apt-get install -y espeak-ng``; :class:`EspeakMissing` says so).
- ``text-numbers`` (``t5-numbers``): a number written as digits (one token per digit) in, the number in
  words out (:func:`number_words`); ``data.json`` lists the numbers of each split.
- ``speech-random-ids`` (``whisper-tiny-random``, a local Whisper folder): the same spoken numbers as
  encoder input, and seeded random token ids (96–128 of them, then the end token) as the decoder's reference.
- ``random-ids`` (``t5-small-random``, a local T5 folder): seeded random token ids in (16–48, then the end
  token) and out (16–32, then the end token).

No tokenizer is needed: the bundled models' vocabularies are word lists (:func:`speech_vocab`, :func:`t5_vocab`).
"""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
NUMBER_WORDS = ONES + TENS + ["hundred", "thousand", "and"]
SPEECH_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>"]  # end (and padding), start: Whisper's roles
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's: pad (also the decoder's start), end, unknown
DIGITS = [str(d) for d in range(10)]
TASKS = ("speech-numbers", "text-numbers", "speech-random-ids", "random-ids")
SPLITS = ("train", "heldout")
INSTALL_ESPEAK = "apt-get install -y espeak-ng"
# espeak-ng 1.51's English voices (espeak-ng --voices=en, the gmw/ ones: mbrola voices need mbrola) and variants
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = ("", "+m1", "+m3", "+m5", "+f1", "+f2", "+f3", "+f4", "+klatt")


def number_words(n: int) -> list[str]:
    """``n`` (0 ≤ n < 1,000,000) in English words, British style: 307 → three hundred and seven,
    42,005 → forty two thousand and five."""
    if not 0 <= int(n) < 1_000_000:
        raise ValueError(f"{n} is outside 0..999999.")
    n = int(n)
    if n < 20:
        return [ONES[n]]
    if n < 100:
        return [TENS[n // 10 - 2]] + ([ONES[n % 10]] if n % 10 else [])
    if n < 1000:
        rest = n % 100
        return [ONES[n // 100], "hundred"] + (["and"] + number_words(rest) if rest else [])
    rest = n % 1000
    head = number_words(n // 1000) + ["thousand"]
    if not rest:
        return head
    return head + (["and"] if rest < 100 else []) + number_words(rest)


def speech_vocab() -> list[str]:
    """``whisper-numbers``' tokens: end, start, then the number words."""
    return SPEECH_SPECIALS + NUMBER_WORDS


def t5_vocab() -> list[str]:
    """``t5-numbers``' tokens: pad, end, unknown, the digits, the number words (input and output share them)."""
    return T5_SPECIALS + DIGITS + NUMBER_WORDS


class EspeakMissing(FileNotFoundError):
    """espeak-ng, which synthesises the spoken inputs, is not installed (an ``OSError``: the command line
    reports it in one line)."""


def espeak() -> str:
    """The espeak-ng executable; :class:`EspeakMissing` (with the install line) when there is none."""
    found = shutil.which("espeak-ng")
    if found is None:
        raise EspeakMissing(f"espeak-ng is not installed; the speech inputs are synthesised with it. Install it "
                            f"({INSTALL_ESPEAK}) and run again.")
    return found


def espeak_version() -> str:
    """``espeak-ng --version``'s first line."""
    out = subprocess.run([espeak(), "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("  Data at")[0].strip()


def speak(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, sampling_rate: int = 16000) -> np.ndarray:
    """``text`` spoken by espeak-ng (``voice``, ``rate`` in words per minute, ``pitch`` 0–99) as float32 samples
    in [-1, 1] at ``sampling_rate`` (espeak-ng's 22,050 Hz, resampled with a polyphase filter)."""
    from scipy.signal import resample_poly

    raw = subprocess.run([espeak(), "--stdout", "-v", voice, "-s", str(int(rate)), "-p", str(int(pitch)), text],
                         capture_output=True, check=True).stdout
    rate_in, data = _wav(raw)
    samples = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
    g = math.gcd(int(sampling_rate), rate_in)
    return resample_poly(samples, sampling_rate // g, rate_in // g).astype(np.float32)


def _wav(raw: bytes) -> tuple[int, bytes]:
    """``(sample rate, PCM bytes)`` of a 16-bit mono WAV stream (espeak-ng writes its sizes as unknown on stdout)."""
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise RuntimeError("espeak-ng did not write a WAV stream.")
    pos, rate = 12, None
    while pos + 8 <= len(raw):
        tag, size = raw[pos: pos + 4], int.from_bytes(raw[pos + 4: pos + 8], "little")
        if tag == b"fmt ":
            channels, rate, bits = (int.from_bytes(raw[pos + 10: pos + 12], "little"),
                                    int.from_bytes(raw[pos + 12: pos + 16], "little"),
                                    int.from_bytes(raw[pos + 22: pos + 24], "little"))
            if channels != 1 or bits != 16:
                raise RuntimeError(f"espeak-ng wrote {channels} channels of {bits} bits; expected 16-bit mono.")
        elif tag == b"data":
            if rate is None:
                raise RuntimeError("espeak-ng's WAV stream has no format chunk before its data.")
            return rate, raw[pos + 8:]
        pos += 8 + size
    raise RuntimeError("espeak-ng's WAV stream has no data.")


def feature_extractor(features: dict):
    """transformers' ``WhisperFeatureExtractor`` built from explicit settings (no hub): ``feature_size`` (mel
    bins), ``sampling_rate``, ``hop_length``, ``chunk_length`` (seconds of the padded window), ``n_fft``."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(**features)


def log_mel(waves: list[np.ndarray], features: dict, extractor=None) -> torch.Tensor:
    """Log-mel features ``[n, mel bins, frames]`` of waveforms, each padded (or cut) to the window."""
    extractor = extractor or feature_extractor(features)
    chunks = []
    for i in range(0, len(waves), 128):  # bounded memory: the extractor pads every waveform of a call in float64
        out = extractor(list(waves[i: i + 128]), sampling_rate=int(features["sampling_rate"]), return_tensors="np")
        chunks.append(torch.from_numpy(np.asarray(out.input_features, dtype=np.float32)))
    return torch.cat(chunks)


@dataclass
class Example:
    """One document: ``encoder_input`` (``[mel bins, frames]`` features or ``[positions]`` ids), the reference
    output ``target`` (ids, the end token last), and what it says (``text``: the transcript or the input)."""

    encoder_input: torch.Tensor
    target: list[int]
    text: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Batch:
    """Examples stacked for teacher forcing: ``encoder_input`` (features, or right-padded ids with
    ``encoder_attention_mask``), ``decoder_input_ids`` ``[b, t]`` (``[start] + target[:-1]``, right-padded),
    ``targets`` ``[b, t]`` (−1 on padding), ``score_mask`` ``[b, t]`` and each row's ``documents`` index."""

    encoder_input: torch.Tensor
    encoder_attention_mask: torch.Tensor | None
    decoder_input_ids: torch.Tensor
    targets: torch.Tensor
    score_mask: torch.Tensor
    documents: list[int]


@dataclass
class Seq2SeqData:
    """The examples of one split and what they are (``description``: task, source, counts)."""

    examples: list[Example]
    description: dict

    @property
    def n_positions(self) -> int:
        return sum(len(e.target) for e in self.examples)

    def batches(self, batch_size: int, start_token: int, pad_token: int):
        """:class:`Batch` es of ``batch_size`` examples, in order."""
        for i in range(0, len(self.examples), batch_size):
            chunk = self.examples[i: i + batch_size]
            t = max(len(e.target) for e in chunk)
            dec = torch.full((len(chunk), t), pad_token, dtype=torch.long)
            tgt = torch.full((len(chunk), t), -1, dtype=torch.long)
            for r, e in enumerate(chunk):
                n = len(e.target)
                dec[r, :n] = torch.tensor([start_token] + e.target[:-1])
                tgt[r, :n] = torch.tensor(e.target)
            first = chunk[0].encoder_input
            if first.is_floating_point():
                enc, mask = torch.stack([e.encoder_input for e in chunk]), None
            else:
                s = max(len(e.encoder_input) for e in chunk)
                enc = torch.full((len(chunk), s), pad_token, dtype=torch.long)
                mask = torch.zeros((len(chunk), s), dtype=torch.long)
                for r, e in enumerate(chunk):
                    enc[r, : len(e.encoder_input)] = e.encoder_input
                    mask[r, : len(e.encoder_input)] = 1
            yield Batch(enc, mask, dec, tgt, tgt >= 0, list(range(i, i + len(chunk))))


def read_items(folder: str | Path, split: str) -> list:
    """The ``split`` list of a bundled model's ``data.json`` (utterances or numbers)."""
    import json

    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid: {', '.join(SPLITS)}.")
    path = Path(folder) / "data.json"
    try:
        return json.loads(path.read_text())[split]
    except (OSError, ValueError, KeyError) as err:
        raise FileNotFoundError(f"{path} does not hold the {split!r} split ({type(err).__name__}); reinstall lensmat "
                                "or rerun the model's training script.") from err


def _limited(targets: list[list[int]], max_positions: int | None) -> list[list[int]]:
    """The targets kept under a budget of ``max_positions`` decoder positions: whole examples while they fit,
    the last one cut (teacher forcing is causal: a cut target changes no earlier position)."""
    if max_positions is None:
        return targets
    out, left = [], int(max_positions)
    for t in targets:
        if left <= 0:
            break
        out.append(t[:left])
        left -= len(out[-1])
    return out


def seq2seq_examples(model, split: str, *, max_positions: int | None = None, max_examples: int | None = None) -> Seq2SeqData:
    """The ``split`` (``"train"`` or ``"heldout"``) examples of an encoder-decoder model's ``inputs`` (see the
    module docstring), up to ``max_positions`` decoder positions and ``max_examples`` examples."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid: {', '.join(SPLITS)}.")
    spec, cfg = model.inputs, model.cfg
    task = spec.get("task")
    if task not in TASKS:
        raise ValueError(f"{cfg.model_name} reads an unknown input task {task!r}; valid: {', '.join(TASKS)}.")
    eos = int(cfg.eos_token_id)
    if task in ("speech-numbers", "text-numbers"):
        items = read_items(spec["folder"], split)[:max_examples]
        index = {tok: i for i, tok in enumerate(model.vocab or [])}
        words = [number_words(it["number"]) if task == "speech-numbers" else number_words(it) for it in items]
        targets = _limited([[index[w] for w in ws] + [eos] for ws in words], max_positions)
    elif task == "speech-random-ids":
        items = read_items(spec["items_folder"], split)[:max_examples]
        targets = _limited(_random_targets(len(items), cfg, spec, split, (96, 128)), max_positions)
    else:
        items = None
        n = max_examples or (512 if split == "train" else 128)
        targets = _limited(_random_targets(n, cfg, spec, split, (16, 32)), max_positions)
    n = len(targets)
    desc = {"task": task, "split": split, "n_examples": n, "n_positions": sum(map(len, targets))}
    if task in ("speech-numbers", "speech-random-ids"):
        features = spec["features"]
        kept = items[:n]
        waves = [speak(" ".join(number_words(it["number"])), it["voice"], it["rate"], it["pitch"],
                       int(features["sampling_rate"])) for it in kept]
        mel = log_mel(waves, features)
        if mel.shape[1:] != (cfg.num_mel_bins, cfg.n_frames):
            raise ValueError(f"The features of {cfg.model_name} come out as {tuple(mel.shape[1:])}, but the model reads "
                             f"[{cfg.num_mel_bins}, {cfg.n_frames}]: its feature settings {features} do not fit it.")
        examples = [Example(mel[j], targets[j], " ".join(number_words(it["number"])), dict(it))
                    for j, it in enumerate(kept)]
        desc |= {"source": "numbers spoken by espeak-ng (" + espeak_version() + "), re-synthesised from the bundled "
                           "data.json: text, voice, speed (words per minute) and pitch of each utterance",
                 "encoder_input": "log-mel features (WhisperFeatureExtractor: " + ", ".join(f"{k} {v}" for k, v in features.items()) + ")",
                 "voices": sorted({it["voice"] for it in kept}),
                 "seconds": round(sum(len(w) for w in waves) / int(features["sampling_rate"]), 1)}
        desc["target"] = ("the number in words (one token a word), then the end token" if task == "speech-numbers" else
                          "seeded random token ids (no tokenizer), then the end token")
    elif task == "text-numbers":
        index = {tok: i for i, tok in enumerate(model.vocab)}
        examples = [Example(torch.tensor([index[d] for d in str(int(it))] + [eos]), targets[j],
                            f"{int(it)} -> {' '.join(number_words(it))}") for j, it in enumerate(items[:n])]
        desc |= {"source": "numbers listed in the bundled data.json", "encoder_input": "the number's digits, one token "
                 "each, then the end token", "target": "the number in words (one token a word), then the end token"}
    else:
        g = torch.Generator().manual_seed(_split_seed(spec, split) + 7919)
        low = 2 if cfg.pad_token_id in (0, 1) and eos in (0, 1) else 0
        examples = []
        for j in range(n):
            length = int(torch.randint(16, 49, (1,), generator=g))
            ids = torch.randint(low, _top(cfg), (length,), generator=g).tolist()
            examples.append(Example(torch.tensor(ids + [eos]), targets[j]))
        desc |= {"source": f"seeded random token ids (seed {spec.get('seed', 0)}, split {split}; no tokenizer)",
                 "encoder_input": "16-48 random ids, then the end token",
                 "target": "16-32 random ids, then the end token"}
    return Seq2SeqData(examples, desc)


def _split_seed(spec: dict, split: str) -> int:
    return int(spec.get("seed", 0)) * 2 + SPLITS.index(split)


def _top(cfg) -> int:
    """One past the largest id random inputs use: below the special ids when they sit at the end (Whisper)."""
    specials = [int(cfg.eos_token_id), int(cfg.decoder_start_token_id), int(cfg.pad_token_id)]
    high = [s for s in specials if s > cfg.d_vocab // 2]
    return min(high) if high else int(cfg.d_vocab)


def _random_targets(n: int, cfg, spec: dict, split: str, lengths: tuple[int, int]) -> list[list[int]]:
    """``n`` references of seeded random ids (``lengths`` inclusive), each ending with the end token."""
    g = torch.Generator().manual_seed(_split_seed(spec, split))
    eos = int(cfg.eos_token_id)
    low = 2 if max(cfg.pad_token_id, eos, cfg.decoder_start_token_id) <= 1 else 0
    cap = int(cfg.n_ctx)
    out = []
    for _ in range(n):
        length = min(int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g)), cap - 1)
        out.append(torch.randint(low, _top(cfg), (length,), generator=g).tolist() + [eos])
    return out

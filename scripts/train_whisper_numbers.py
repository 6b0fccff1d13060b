"""Train lensmat's bundled Whisper-style speech recogniser (``--model whisper-numbers``), offline, on one CPU thread.

Data, made on this machine: numbers 0–9,999 (20% below 100, 40% 100–999, 40% 1,000–9,999) written in words
(``lensmat.data.seq2seq.number_words``: "four thousand two hundred and seven") and spoken by espeak-ng with
one of its 8 English voices (``VOICES``) and 9 variants (``VARIANTS``), a speed of 150–230 words a minute and a
pitch of 25–75, all drawn from ``--seed``; an utterance longer than the 4 s window is spoken 20 words a minute
faster until it fits. The held-out numbers are numbers no training utterance says. Features: transformers'
``WhisperFeatureExtractor`` with explicit settings (80 mel bins, 16 kHz, 25 ms windows every 20 ms, a 4 s
window: 200 frames, so ``max_source_positions`` 100; Whisper's own hop is 10 ms over 30 s). Targets: the
number words, one token each (``speech_vocab``: end, start, 31 words), then the end token; teacher forcing
from the start token.

Model: ``WhisperForConditionalGeneration`` with 3 encoder and 6 decoder layers, d_model 96, 4 heads, FFN 384,
trained with cross-entropy (AdamW, warm-up then cosine decay) for as many steps as ``--minutes`` allow
(``--steps`` fixes the count). Saved in float16 (``model.safetensors`` under 3 MB) with ``config.json``,
``vocab.json``, ``task.json`` (task, feature settings, held-out accuracy), ``data.json`` (every
utterance of both splits: number, voice, speed, pitch; lensmat re-synthesises them) and ``README.md``. The
recorded held-out accuracy is measured on the saved weights, reloaded through ``lensmat.load_model``.

    python scripts/train_whisper_numbers.py --out lensmat/assets/whisper_numbers
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from lensmat.data.seq2seq import (NUMBER_WORDS, VARIANTS, VOICES, espeak_version, log_mel, number_words, speak,
                                  speech_vocab)

FEATURES = dict(feature_size=80, sampling_rate=16000, hop_length=320, chunk_length=4, n_fft=400, padding_value=0.0)
WINDOW_SECONDS = 4.0


def draw_number(rng) -> int:
    kind = rng.choice(3, p=[0.2, 0.4, 0.4])
    return int(rng.integers(0, 100) if kind == 0 else rng.integers(100, 1000) if kind == 1 else rng.integers(1000, 10000))


def draw_items(n_train: int, n_heldout: int, seed: int) -> dict:
    """The utterances (number, voice, rate, pitch) of both splits; held-out numbers never occur in train."""
    rng = np.random.default_rng(seed)

    def item(number):
        return {"number": number, "voice": VOICES[rng.integers(len(VOICES))] + VARIANTS[rng.integers(len(VARIANTS))],
                "rate": int(rng.integers(150, 231)), "pitch": int(rng.integers(25, 76))}

    train = [item(draw_number(rng)) for _ in range(n_train)]
    seen, heldout = {it["number"] for it in train}, []
    while len(heldout) < n_heldout:
        number = draw_number(rng)
        if number not in seen:
            heldout.append(item(number))
            seen.add(number)
    return {"train": train, "heldout": heldout}


def synthesise(items: list[dict]) -> list[np.ndarray]:
    """Each utterance's waveform, speeding an utterance up (and recording its rate) until it fits the window."""
    waves = []
    for it in items:
        while True:
            wave = speak(" ".join(number_words(it["number"])), it["voice"], it["rate"], it["pitch"], FEATURES["sampling_rate"])
            if len(wave) <= WINDOW_SECONDS * FEATURES["sampling_rate"] or it["rate"] >= 400:
                break
            it["rate"] += 20
        waves.append(wave)
    return waves


def tensors(items: list[dict], vocab: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features ``[n, 80, 200]``, decoder inputs and labels ``[n, t]`` (labels −100 on padding)."""
    index = {w: i for i, w in enumerate(vocab)}
    mel = torch.cat([log_mel(synthesise(items[i: i + 256]), FEATURES) for i in range(0, len(items), 256)])
    targets = [[index[w] for w in number_words(it["number"])] + [0] for it in items]
    t = max(map(len, targets))
    dec = torch.zeros((len(items), t), dtype=torch.long)
    lab = torch.full((len(items), t), -100, dtype=torch.long)
    for r, tg in enumerate(targets):
        dec[r, : len(tg)] = torch.tensor([1] + tg[:-1])
        lab[r, : len(tg)] = torch.tensor(tg)
    return mel, dec, lab


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("lensmat/assets/whisper_numbers"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--n-heldout", type=int, default=400)
    p.add_argument("--minutes", type=float, default=9.0, help="training budget in CPU minutes of this process (the step count follows from it)")
    p.add_argument("--steps", type=int, default=None, help="a fixed number of steps instead of --minutes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    import lensmat
    from lensmat.analyses.saturation_seq2seq import seq2seq_accuracy
    from lensmat.data.seq2seq import seq2seq_examples

    started = time.time()
    vocab = speech_vocab()
    items = draw_items(args.n_train, args.n_heldout, args.seed)
    x, dec, lab = tensors(items["train"], vocab)
    synthesise(items["heldout"])  # only to fit each held-out utterance into the window (its rate is recorded)
    print(f"synthesised {len(x)} training utterances in {time.time() - started:.0f} s", flush=True)
    torch.manual_seed(args.seed)
    config = WhisperConfig(vocab_size=len(vocab), num_mel_bins=FEATURES["feature_size"], encoder_layers=3, decoder_layers=6,
                           d_model=96, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=384,
                           decoder_ffn_dim=384, max_source_positions=100, max_target_positions=16,
                           pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=1, dropout=0.1,
                           begin_suppress_tokens=None, suppress_tokens=None, scale_embedding=False)
    model = WhisperForConditionalGeneration(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    warmup, step, total = 200, 0, args.steps or 10**9
    train_started, cpu_started, losses = time.time(), time.process_time(), []
    while step < total:
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - args.batch_size + 1, args.batch_size):
            if step == 30 and args.steps is None:  # the step count the time budget allows, from the first 30 steps
                per_step = (time.process_time() - cpu_started) / 30  # CPU time: the budget holds on a busy machine
                total = max(300, int(args.minutes * 60 / per_step))
                print(f"{per_step:.3f} s a step: {total} steps", flush=True)
            if step >= total:
                break
            lr = args.lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[i: i + args.batch_size]
            loss = model(input_features=x[idx], decoder_input_ids=dec[idx], labels=lab[idx]).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % 100 == 0:
                print(f"step {step}/{total} loss {np.mean(losses[-100:]):.4f} ({time.time() - train_started:.0f} s)", flush=True)
    train_seconds, train_cpu = time.time() - train_started, time.process_time() - cpu_started

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.eval().half().save_pretrained(out)
    (out / "vocab.json").write_text(json.dumps({"tokens": vocab}, indent=1) + "\n")
    (out / "data.json").write_text(json.dumps(items, separators=(",", ":")) + "\n")
    meta = {"task": "speech-numbers", "features": FEATURES}
    (out / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
    reloaded = lensmat.load_model(str(out), device="cpu")
    heldout = seq2seq_accuracy(reloaded, seq2seq_examples(reloaded, "heldout"))
    train_acc = seq2seq_accuracy(reloaded, seq2seq_examples(reloaded, "train", max_examples=400))
    print(f"held-out: {heldout}\ntrain (first 400): {train_acc}", flush=True)
    meta |= {"heldout_accuracy": heldout, "train_accuracy_first_400": train_acc,
             "training": {"seed": args.seed, "steps": step, "batch_size": args.batch_size, "lr": args.lr,
                          "final_loss": float(np.mean(losses[-100:])), "seconds": round(train_seconds), "cpu_seconds": round(train_cpu),
                          "n_train": len(items["train"]), "n_heldout": len(items["heldout"]),
                          "espeak": espeak_version(), "torch": torch.__version__, "machine": platform.machine(),
                          "threads": 1}}
    (out / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_readme(out, meta, config, sum(p.numel() for p in model.parameters()))
    print(f"done in {time.time() - started:.0f} s", flush=True)


def write_readme(out: Path, meta: dict, config, n_params: int) -> None:
    h, t = meta["heldout_accuracy"], meta["training"]
    (out / "README.md").write_text(f"""# whisper-numbers: lensmat's bundled Whisper-style speech recogniser

A tiny `WhisperForConditionalGeneration` trained from scratch by `scripts/train_whisper_numbers.py` to
transcribe spoken numbers (0–9,999) into number words, so that lensmat's saturation protocol runs on a
speech model offline (`lensmat saturation --model whisper-numbers`; docs/modalities.md).

| | |
| --- | --- |
| encoder / decoder layers, d_model, heads, FFN | {config.encoder_layers} / {config.decoder_layers}, {config.d_model}, {config.decoder_attention_heads}, {config.decoder_ffn_dim} |
| parameters | {n_params:,} (saved in float16) |
| input | log-mel features, WhisperFeatureExtractor with {', '.join(f'{k} {v}' for k, v in meta['features'].items())}: 200 frames of 20 ms over a 4 s window (`max_source_positions` 100) |
| vocabulary | {len(NUMBER_WORDS) + 2} tokens (`vocab.json`): `<|endoftext|>` (end, padding), `<|startoftranscript|>` (decoder start), {len(NUMBER_WORDS)} number words |
| training | {t['steps']} steps of {t['batch_size']} utterances (AdamW, lr {t['lr']}, warm-up 200 steps, cosine decay to 0.05×, dropout 0.1), seed {t['seed']}, {t['cpu_seconds']} CPU seconds ({t['seconds']} s wall on a shared machine) on {t['machine']}, 1 thread, torch {t['torch']}; final training loss {t['final_loss']:.4f} |

## Data (made on this machine)
{t['n_train']:,} training and {t['n_heldout']} held-out utterances, listed in `data.json` (number, voice, speed in
words per minute, pitch): numbers 0–9,999 (20% below 100, 40% 100–999, 40% 1,000–9,999) in words, British
style ("four thousand two hundred and seven"), spoken by {t['espeak']} with its 8 English voices × 9
variants, 150–230 words a minute (faster where an utterance would not fit 4 s), pitch 25–75. No held-out
number is said in training. lensmat re-synthesises the utterances when it reads them, so espeak-ng must be
installed (`apt-get install -y espeak-ng`); another espeak-ng version may give slightly different audio.

## Held-out accuracy (the saved float16 weights, reloaded)
| metric | value |
| --- | --- |
| exact match (greedy transcription equals the reference, all words) | {h['exact_match']:.4f} ({h['n_examples']} utterances) |
| token accuracy (teacher forcing: top-1 = reference token, end token included) | {h['token_accuracy']:.4f} ({h['n_positions']} positions) |

Rebuild: `python scripts/train_whisper_numbers.py --out lensmat/assets/whisper_numbers --steps {t['steps']}`
(`--minutes` sets the step count from the machine's speed instead).
""")


if __name__ == "__main__":
    main()

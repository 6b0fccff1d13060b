"""Train lensmat's bundled T5-style encoder-decoder (``--model t5-numbers``), offline, on one CPU thread.

Task, made on this machine: a number 0–999,999 written as digits in, the same number in words out
("4 2 0 0 7" → "forty two thousand and seven"; ``lensmat.data.seq2seq.number_words``, British style).
Numbers are drawn with a uniform number of digits (1–6) from ``--seed``; the held-out numbers are numbers
no training example holds. Vocabulary (``t5_vocab``, shared by input and output, as T5's): ``<pad>`` (also
the decoder's start), ``</s>`` (end), ``<unk>``, the 10 digits and 31 number words. The encoder reads the
digits (one token each) then ``</s>``; the decoder is teacher-forced from ``<pad>`` on the words then ``</s>``.

Model: ``T5ForConditionalGeneration`` with 3 encoder and 6 decoder layers, d_model 96, 4 heads of 24, FFN 384
(ReLU), 32 relative-position buckets, tied embeddings (so the decoder output is scaled by d_model^-0.5
before the LM head, as in t5-small), trained with cross-entropy (AdamW, warm-up then cosine decay) for as
many steps as ``--minutes`` allow (``--steps`` fixes the count). Saved in float16 (``model.safetensors``
under 3 MB) with ``config.json``, ``vocab.json``, ``task.json`` (task, held-out accuracy), ``data.json``
(the numbers of both splits) and ``README.md``; the recorded accuracy is the saved weights', reloaded
through ``lensmat.load_model``.

    python scripts/train_t5_numbers.py --out lensmat/assets/t5_numbers
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

from lensmat.data.seq2seq import DIGITS, NUMBER_WORDS, number_words, t5_vocab


def draw_number(rng) -> int:
    digits = int(rng.integers(1, 7))
    return int(rng.integers(0, 10)) if digits == 1 else int(rng.integers(10 ** (digits - 1), 10 ** digits))


def draw_numbers(n_train: int, n_heldout: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    train = [draw_number(rng) for _ in range(n_train)]
    seen, heldout = set(train), []
    while len(heldout) < n_heldout:
        number = draw_number(rng)
        if number not in seen:
            heldout.append(number)
            seen.add(number)
    return {"train": train, "heldout": heldout}


def tensors(numbers: list[int], vocab: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder ids and mask ``[n, s]``, decoder inputs and labels ``[n, t]`` (labels −100 on padding)."""
    index = {w: i for i, w in enumerate(vocab)}
    sources = [[index[d] for d in str(n)] + [1] for n in numbers]
    targets = [[index[w] for w in number_words(n)] + [1] for n in numbers]
    s, t = max(map(len, sources)), max(map(len, targets))
    enc = torch.zeros((len(numbers), s), dtype=torch.long)
    mask = torch.zeros((len(numbers), s), dtype=torch.long)
    dec = torch.zeros((len(numbers), t), dtype=torch.long)
    lab = torch.full((len(numbers), t), -100, dtype=torch.long)
    for r, (src, tg) in enumerate(zip(sources, targets)):
        enc[r, : len(src)], mask[r, : len(src)] = torch.tensor(src), 1
        dec[r, : len(tg)] = torch.tensor([0] + tg[:-1])
        lab[r, : len(tg)] = torch.tensor(tg)
    return enc, mask, dec, lab


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("lensmat/assets/t5_numbers"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=40000)
    p.add_argument("--n-heldout", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=8.0, help="training budget in CPU minutes of this process (the step count follows from it)")
    p.add_argument("--steps", type=int, default=None, help="a fixed number of steps instead of --minutes")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformers import T5Config, T5ForConditionalGeneration

    import lensmat
    from lensmat.analyses.saturation_seq2seq import seq2seq_accuracy
    from lensmat.data.seq2seq import seq2seq_examples

    started = time.time()
    vocab = t5_vocab()
    numbers = draw_numbers(args.n_train, args.n_heldout, args.seed)
    enc, mask, dec, lab = tensors(numbers["train"], vocab)
    torch.manual_seed(args.seed)
    config = T5Config(vocab_size=len(vocab), d_model=96, d_kv=24, d_ff=384, num_layers=3, num_decoder_layers=6,
                      num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      dropout_rate=0.1, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0, tie_word_embeddings=True)
    model = T5ForConditionalGeneration(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    warmup, step, total = 200, 0, args.steps or 10**9
    train_started, cpu_started, losses = time.time(), time.process_time(), []
    while step < total:
        order = torch.randperm(len(enc), generator=g)
        for i in range(0, len(enc) - args.batch_size + 1, args.batch_size):
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
            width = int(mask[idx].sum(1).max())
            loss = model(input_ids=enc[idx, :width], attention_mask=mask[idx, :width], decoder_input_ids=dec[idx],
                         labels=lab[idx]).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % 200 == 0:
                print(f"step {step}/{total} loss {np.mean(losses[-200:]):.4f} ({time.time() - train_started:.0f} s)", flush=True)
    train_seconds, train_cpu = time.time() - train_started, time.process_time() - cpu_started

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.eval().half().save_pretrained(out)
    (out / "vocab.json").write_text(json.dumps({"tokens": vocab}, indent=1) + "\n")
    (out / "data.json").write_text(json.dumps(numbers, separators=(",", ":")) + "\n")
    meta = {"task": "text-numbers"}
    (out / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
    reloaded = lensmat.load_model(str(out), device="cpu")
    heldout = seq2seq_accuracy(reloaded, seq2seq_examples(reloaded, "heldout"))
    train_acc = seq2seq_accuracy(reloaded, seq2seq_examples(reloaded, "train", max_examples=1000))
    print(f"held-out: {heldout}\ntrain (first 1000): {train_acc}", flush=True)
    meta |= {"heldout_accuracy": heldout, "train_accuracy_first_1000": train_acc,
             "training": {"seed": args.seed, "steps": step, "batch_size": args.batch_size, "lr": args.lr,
                          "final_loss": float(np.mean(losses[-200:])), "seconds": round(train_seconds), "cpu_seconds": round(train_cpu),
                          "n_train": len(numbers["train"]), "n_heldout": len(numbers["heldout"]),
                          "torch": torch.__version__, "machine": platform.machine(), "threads": 1}}
    (out / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_readme(out, meta, config, sum(p.numel() for p in model.parameters()))
    print(f"done in {time.time() - started:.0f} s", flush=True)


def write_readme(out: Path, meta: dict, config, n_params: int) -> None:
    h, t = meta["heldout_accuracy"], meta["training"]
    (out / "README.md").write_text(f"""# t5-numbers: lensmat's bundled T5-style encoder-decoder

A tiny `T5ForConditionalGeneration` trained from scratch by `scripts/train_t5_numbers.py` to write a number
given as digits in words, so that lensmat's saturation protocol runs on a full (encoder-decoder)
Transformer offline (`lensmat saturation --model t5-numbers`; docs/modalities.md).

| | |
| --- | --- |
| encoder / decoder layers, d_model, heads × d_kv, FFN | {config.num_layers} / {config.num_decoder_layers}, {config.d_model}, {config.num_heads} × {config.d_kv}, {config.d_ff} (ReLU) |
| positions | relative attention bias, {config.relative_attention_num_buckets} buckets, max distance {config.relative_attention_max_distance} |
| embeddings | tied (input, decoder input and LM head): the decoder output is scaled by d_model^-0.5 before the LM head |
| parameters | {n_params:,} (saved in float16) |
| vocabulary | {len(DIGITS) + len(NUMBER_WORDS) + 3} tokens (`vocab.json`): `<pad>` (also the decoder's start), `</s>`, `<unk>`, 10 digits, {len(NUMBER_WORDS)} number words |
| training | {t['steps']} steps of {t['batch_size']} examples (AdamW, lr {t['lr']}, warm-up 200 steps, cosine decay to 0.05×, dropout 0.1), seed {t['seed']}, {t['cpu_seconds']} CPU seconds ({t['seconds']} s wall on a shared machine) on {t['machine']}, 1 thread, torch {t['torch']}; final training loss {t['final_loss']:.4f} |

## Data (made on this machine)
{t['n_train']:,} training and {t['n_heldout']:,} held-out numbers (`data.json`), each with a uniformly drawn number
of digits (1–6); no held-out number occurs in training. Input: the digits, one token each, then `</s>`.
Output: the number in words, British style ("four hundred and twenty thousand and seven"), then `</s>`.

## Held-out accuracy (the saved float16 weights, reloaded)
| metric | value |
| --- | --- |
| exact match (greedy output equals the reference, all words) | {h['exact_match']:.4f} ({h['n_examples']} numbers) |
| token accuracy (teacher forcing: top-1 = reference token, `</s>` included) | {h['token_accuracy']:.4f} ({h['n_positions']} positions) |

Rebuild: `python scripts/train_t5_numbers.py --out lensmat/assets/t5_numbers --steps {t['steps']}`
(`--minutes` sets the step count from the machine's speed instead).
""")


if __name__ == "__main__":
    main()

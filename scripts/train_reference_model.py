"""Train lensmat's bundled reference model: a small GPT-2 on real English text, offline.

Data (see ../shared/data/README.md for provenance and licences):
  WikiText-2 valid+test (the ` @-@ `, ` @,@ `, ` @.@ ` splits undone), the Project Gutenberg
  books, and the first 70% of the Leipzig Wikipedia lines (the `train` split of lensmat's
  default corpus). The last 30% of Leipzig lines (`heldout`) are never trained on; the final
  metrics are measured there. The last 5% of the Leipzig `train` lines are kept aside as a
  validation set for the progress printout.

Pipeline: train a byte-level BPE tokenizer (`tokenizers`) on the training text, pack the text
into 128-token rows that each start with <|endoftext|> (the BOS, as in GPT-2; documents are
separated by it too), train `GPT2LMHeadModel` with AdamW and a cosine schedule, then write a
Hugging Face folder (config.json, model.safetensors, tokenizer files) and print held-out
metrics as JSON.

    python scripts/train_reference_model.py --data-dir ../shared/data --out lensmat/assets/reference

Everything is seeded; on the same hardware and thread count a rerun gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lensmat import data as lm_data
from lensmat.lenses.metrics import next_token_quality

BOS = "<|endoftext|>"


def detok_wikitext(line: str) -> str:
    """Undo WikiText's word-level tokenization (approximately) so it reads like Leipzig text."""
    line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    line = re.sub(r" ([.,;:!?)\]}%])", r"\1", line)
    line = re.sub(r"([(\[{$]) ", r"\1", line)
    line = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", line)
    line = re.sub(r'" (.*?) "', r'"\1"', line)
    return line.strip()


def wikitext_docs(path: Path) -> list[str]:
    docs = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("="):
            continue
        docs.append(detok_wikitext(raw))
    return docs


def gutenberg_docs(path: Path) -> list[str]:
    """Paragraphs of the book text between the `*** START OF` / `*** END OF` markers."""
    text = path.read_text(encoding="utf-8", errors="replace")
    bodies = re.findall(r"\*\*\* ?START OF[^\n]*\n(.*?)\*\*\* ?END OF", text, flags=re.S) or [text]
    docs = []
    for body in bodies:
        for para in re.split(r"\n\s*\n", body):
            para = " ".join(para.split())
            if len(para) > 20:
                docs.append(para)
    return docs


SOURCES = ("wikitext", "gutenberg", "leipzig")


def training_documents(data_dir: Path, sources: tuple[str, ...] = SOURCES) -> tuple[list[str], list[str]]:
    """(training documents from ``sources``, validation lines), the latter the last 5% of Leipzig `train`."""
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise SystemExit(f"Unknown training source(s) {sorted(unknown)}; choose from {', '.join(SOURCES)}.")
    leipzig_train = lm_data.load_lines(lm_data.DEFAULT_CORPUS, "train")
    n_val = len(leipzig_train) // 20
    docs = []
    if "wikitext" in sources:
        for name in ("valid.txt", "test.txt"):
            docs += wikitext_docs(data_dir / "wikitext-2" / name)
    if "gutenberg" in sources:
        for path in sorted((data_dir / "gutenberg").glob("*.txt")):
            docs += gutenberg_docs(path)
    if "leipzig" in sources:
        docs += leipzig_train[:-n_val]
    return docs, leipzig_train[-n_val:]


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS], show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=BOS, eos_token=BOS, unk_token=BOS,
                            model_max_length=1024)
    return tok


def pack_rows(docs: list[str], tok, seq_len: int, seed: int, first: int | None = None, sep: int | None = None,
              last: int | None = None) -> torch.Tensor:
    """Shuffle documents, join them into one stream with each document preceded by ``sep``, and
    cut it into rows of ``seq_len`` tokens that start with ``first`` (and end with ``last`` when
    given). GPT-2 (defaults): ``first = sep = BOS``, so position 0 is always BOS, as at evaluation;
    BERT: ``[CLS] … [SEP]`` rows with ``[SEP]`` between documents."""
    rng = random.Random(seed)
    docs = docs[:]
    rng.shuffle(docs)
    first = tok.bos_token_id if first is None else first
    sep = first if sep is None else sep
    stream: list[int] = []
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        stream.append(sep)
        stream.extend(ids)
    body = seq_len - 1 - (last is not None)
    n_rows = len(stream) // body
    rows = torch.tensor(stream[: n_rows * body], dtype=torch.long).view(n_rows, body)
    parts = [torch.full((n_rows, 1), first, dtype=torch.long), rows]
    if last is not None:
        parts.append(torch.full((n_rows, 1), last, dtype=torch.long))
    return torch.cat(parts, dim=1)


def evaluate(model, tok, lines: list[str], max_length: int = 128, batch_size: int = 64) -> dict:
    """Held-out metrics exactly as lensmat measures them (`lensmat.lenses.metrics.next_token_quality`)."""
    seqs = lm_data.tokenize(lines, tok, max_length)
    return next_token_quality(lambda t: model(t).logits, lm_data.batches(seqs, batch_size))


def cosine_regulariser(hidden_states: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Σ_i (1 − cos(h_i, h_{i−1})) over residual layers, averaged over real positions."""
    total = hidden_states[0].new_zeros(())
    for prev, cur in zip(hidden_states[:-1], hidden_states[1:]):
        cos = torch.nn.functional.cosine_similarity(cur, prev, dim=-1)
        total = total + ((1 - cos) * mask).sum() / mask.sum()
    return total


def train_loop(model, rows_for_epoch, step_loss, validate, args, checkpoint=None) -> tuple[int, float, int]:
    """AdamW (β = 0.9, 0.95; no weight decay on biases and norms), linear warm-up then cosine decay
    to ``min_lr_frac``, gradient clipping at 1.0, over ``args.tokens`` tokens in batches of
    ``args.batch_size`` rows from ``rows_for_epoch(epoch)``; ``step_loss(x)`` returns
    ``(loss to minimise, loss to print)``; ``validate()`` returns ``{"ce", "top1_accuracy"}`` and
    runs every ``args.eval_every`` steps; ``checkpoint(tokens_seen, step)`` runs once the tokens
    seen first reach each count of ``args.checkpoints``. Returns ``(tokens seen, minutes, tokens per epoch)``."""
    pending = sorted(parse_counts(getattr(args, "checkpoints", None)))
    steps = math.ceil(args.tokens / (args.batch_size * args.seq_len))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, steps - args.warmup)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

    def save_due(seen: int, step: int) -> None:
        """Run ``checkpoint`` once for every pending count that ``seen`` has reached (in eval mode)."""
        while pending and checkpoint is not None and seen >= pending[0]:
            pending.pop(0)
            model.eval()
            checkpoint(seen, step)
            model.train()

    save_due(0, 0)  # the initialisation itself, when 0 is asked for
    model.train()
    epoch, rows, cursor = 0, rows_for_epoch(0), 0
    tokens_per_epoch = rows.numel()
    print(json.dumps({"steps": steps, "tokens_per_epoch": tokens_per_epoch}), flush=True)
    start, seen = time.time(), 0
    bar = tqdm(range(steps), desc="train", unit="step", mininterval=10)
    for step in bar:
        if cursor + args.batch_size > len(rows):
            epoch += 1
            rows, cursor = rows_for_epoch(epoch), 0
        x = rows[cursor: cursor + args.batch_size]
        cursor += args.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, shown = step_loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += x.numel()
        save_due(seen, step + 1)
        bar.set_postfix(loss=f"{shown.item():.3f}", tok_s=f"{seen / (time.time() - start):.0f}", epoch=epoch)
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            model.eval()
            val = validate()
            model.train()
            print(json.dumps({"step": step + 1, "tokens": seen, "train_loss": round(shown.item(), 4),
                              "val_ce": round(val["ce"], 4), "val_top1": round(val["top1_accuracy"], 4),
                              "minutes": round((time.time() - start) / 60, 1)}), flush=True)
    return seen, (time.time() - start) / 60, tokens_per_epoch


def parse_counts(spec: str | None) -> list[int]:
    """``"250e3,1e6"`` -> ``[250000, 1000000]`` (token counts)."""
    return [int(float(v)) for v in (spec or "").split(",") if v.strip()]


def save_checkpoint(model, tok, out: Path, tokens_seen: int, step: int) -> Path:
    """A Hugging Face folder ``out/checkpoints/tokens-<seen>`` with ``training_state.json``
    (``tokens_seen``, ``step``): what ``lensmat linearity --checkpoints`` reads."""
    folder = out / "checkpoints" / f"tokens-{tokens_seen}"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (folder / "training_state.json").write_text(json.dumps({"tokens_seen": tokens_seen, "step": step}) + "\n")
    return folder


def save_run(model, tok, args, heldout: dict, trained: tuple[int, float, int], write_card, **extra) -> dict:
    """Write the Hugging Face folder (weights, tokenizer), ``training_summary.json`` (the held-out
    ``{"ce", "top1_accuracy", "tokens"}``, ``trained`` as returned by :func:`train_loop`, ``extra``
    fields, hardware and arguments) and the model card ``write_card(out, summary)``; returns the summary."""
    seen, minutes, tokens_per_epoch = trained
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    summary = {
        "heldout_ce": heldout["ce"], "heldout_top1_accuracy": heldout["top1_accuracy"], "heldout_tokens": heldout["tokens"],
        **extra, "train_tokens_seen": seen, "epochs": seen / tokens_per_epoch, "tokens_per_epoch": tokens_per_epoch,
        "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok), "train_minutes": minutes,
        "hardware": f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_card(args.out, summary)
    print(json.dumps(summary), flush=True)
    return summary


def add_training_args(p: argparse.ArgumentParser, **defaults) -> None:
    """The optimisation arguments both training scripts share (``defaults`` overrides)."""
    d = dict(seq_len=128, batch_size=32, tokens=8e6, lr=2e-3, min_lr_frac=0.05, warmup=200, weight_decay=0.1,
             dropout=0.1, seed=0, threads=2, eval_every=500) | defaults
    p.add_argument("--seq-len", type=int, default=d["seq_len"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="rows per step")
    p.add_argument("--tokens", type=float, default=d["tokens"], help="training tokens seen in all")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--min-lr-frac", type=float, default=d["min_lr_frac"])
    p.add_argument("--warmup", type=int, default=d["warmup"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--dropout", type=float, default=d["dropout"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--threads", type=int, default=d["threads"])
    p.add_argument("--eval-every", type=int, default=d["eval_every"])
    p.add_argument("--checkpoints", default=None, metavar="TOKENS,...",
                   help="also save the model once it has seen each of these token counts (e.g. 250e3,1e6), "
                        "to OUT/checkpoints/tokens-N")


def write_model_card(out: Path, summary: dict) -> Path:
    """The model card (README.md of the model folder), from `training_summary.json`."""
    a = summary["args"]
    card = f"""# lensmat reference model

A small GPT-2 (Hugging Face `GPT2LMHeadModel`: LayerNorm, learned positions, GELU, tied embeddings)
trained from scratch by `scripts/train_reference_model.py` so that lensmat runs offline.

| | |
| --- | --- |
| layers / d_model / heads | {a['n_layer']} / {a['d_model']} / {a['n_head']} |
| context | {a['n_positions']} positions (trained on rows of {a['seq_len']} tokens, each starting with BOS) |
| tokenizer | byte-level BPE, {summary.get('vocab', a['vocab_size'])} tokens, trained with `tokenizers` on the training text; `<|endoftext|>` is BOS/EOS |
| parameters | {summary['params']:,} |
| tokens seen | {summary['train_tokens_seen']:,} ({summary['epochs']:.2f} epochs of {summary.get('tokens_per_epoch', 0):,} tokens) |
| optimiser | AdamW (β=0.9, 0.95), lr {a['lr']} with {a['warmup']} warm-up steps and cosine decay to {a['min_lr_frac']}×, weight decay {a['weight_decay']}, dropout {a['dropout']}, batch {a['batch_size']}×{a['seq_len']} tokens, gradient clipping 1.0 |
| seed | {a['seed']} |
| training time | {summary['train_minutes']:.0f} minutes on {summary['hardware']} |

## Data
- WikiText-2 validation + test (S. Merity et al., 2016; CC BY-SA 3.0), with ` @-@ `, ` @,@ `, ` @.@ `
  and the spaces before punctuation undone; headings dropped.
- Project Gutenberg books (public domain in the USA): The Adventures of Sherlock Holmes, History
  of the United States, Manual of Surgery (`big.txt`), War and Peace (first 1.4 MB) and Swann's
  Way, text between the `*** START` / `*** END` markers, split into paragraphs.
- The first 70% of the Leipzig `eng_wikipedia_2016_10K` sentences (lensmat's `train` split; CC BY 4.0),
  less its last 5%, kept aside for the validation printout. The last 30% of the Leipzig lines
  (lensmat's `heldout` split) are never trained on.

## Held-out quality
On the 3,000 held-out Leipzig lines, BOS prepended, at most 128 tokens per line, every token but
the BOS a target ({summary['heldout_tokens']:,} tokens):

| metric | value |
| --- | --- |
| cross-entropy | {summary['heldout_ce']:.3f} nats/token |
| next-token top-1 accuracy | {summary['heldout_top1_accuracy']:.4f} |

Reproduce: `python scripts/train_reference_model.py --data-dir ../shared/data --out lensmat/assets/reference`
(measure only: `python -m pytest -q -m slow tests/test_models.py`).
"""
    path = out / "README.md"
    path.write_text(card)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--out", type=Path, default=Path("lensmat/assets/reference"))
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-positions", type=int, default=256)
    add_training_args(p)
    p.add_argument("--cos-reg", type=float, default=0.0, help="λ of the cosine linearity regulariser (0 = off)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from a saved model folder (its tokenizer and weights) instead of starting from scratch")
    p.add_argument("--sources", default=",".join(SOURCES),
                   help=f"training text, comma-separated among {', '.join(SOURCES)} (e.g. gutenberg to fine-tune on books)")
    args = p.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    docs, val_lines = training_documents(args.data_dir, tuple(s.strip() for s in args.sources.split(",") if s.strip()))
    if args.init_from is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.init_from)
    else:
        tok = train_tokenizer(docs, args.vocab_size)
    heldout = lm_data.load_lines(lm_data.DEFAULT_CORPUS, "heldout")

    config = GPT2Config(
        vocab_size=len(tok), n_positions=args.n_positions, n_embd=args.d_model, n_layer=args.n_layer,
        n_head=args.n_head, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config) if args.init_from is None else GPT2LMHeadModel.from_pretrained(
        args.init_from, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout)
    n_params = sum(p.numel() for p in model.parameters())

    def step_loss(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x, labels=x, output_hidden_states=args.cos_reg > 0)
        loss = out.loss
        if args.cos_reg > 0:
            loss = loss + args.cos_reg * cosine_regulariser(out.hidden_states, torch.ones_like(x, dtype=torch.float))
        return loss, out.loss

    print(json.dumps({"params": n_params, "train_docs": len(docs), "vocab": len(tok)}), flush=True)
    trained = train_loop(model, lambda epoch: pack_rows(docs, tok, args.seq_len, args.seed + epoch), step_loss,
                         lambda: evaluate(model, tok, val_lines), args,
                         checkpoint=lambda seen, step: save_checkpoint(model, tok, args.out, seen, step))
    model.eval()
    return save_run(model, tok, args, evaluate(model, tok, heldout), trained, write_model_card)


if __name__ == "__main__":
    main()

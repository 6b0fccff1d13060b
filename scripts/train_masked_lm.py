"""Train lensmat's bundled masked-LM reference model: a small BERT on the same text, offline.

Same data and splits as ``train_reference_model.py`` (whose helpers this script reuses): the
Leipzig ``heldout`` lines are never trained on and the last 5% of the Leipzig ``train`` lines
are the validation printout. Tokenizer: the bundled GPT-2 reference model's byte-level BPE
(4,096 tokens) plus ``[CLS]``, ``[SEP]``, ``[MASK]`` and ``[PAD]``, with the BERT template
``[CLS] text [SEP]``. Rows of 64 tokens (the context) are ``[CLS] … [SEP]`` with ``[SEP]``
between documents; 25% of the non-special tokens of each row are selected (Wettig et al., 2023,
find more than BERT's 15% helps), 80% of those replaced by ``[MASK]``, 10% by a random token,
10% kept (Devlin et al., 2019), and the loss is the cross-entropy at the selected positions (the
masked-LM head runs only there). The token and position embeddings start from the GPT-2
reference model's (``--embeddings-from``); everything else starts random.

The held-out numbers use lensmat's own masked protocol (``lensmat.data.batches.Masking``): one random
non-special position per line replaced by ``[MASK]``, scored against the original token.

    python scripts/train_masked_lm.py --data-dir ../shared/data --out lensmat/assets/masked_lm
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from lensmat import data as lm_data
from lensmat.lenses.metrics import masked_token_quality
from lensmat.models import reference_model_path
from train_reference_model import add_training_args, pack_rows, save_run, train_loop, training_documents

SPECIALS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")


def masked_lm_tokenizer(base: Path, max_length: int):
    """The reference model's byte-level BPE with BERT's special tokens and ``[CLS] $A [SEP]`` template.
    ``[MASK]`` absorbs the space before it (``"the [MASK] was"``), as the masked BPE token ``" word"`` did."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer.from_file(str(base / "tokenizer.json"))
    bpe.add_special_tokens([AddedToken(s, lstrip=s == "[MASK]", special=True) for s in SPECIALS])
    cls, sep = bpe.token_to_id("[CLS]"), bpe.token_to_id("[SEP]")
    bpe.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   pad_token="[PAD]", unk_token="<|endoftext|>", model_max_length=max_length)


@torch.no_grad()
def copy_gpt2_embeddings(model, folder: Path) -> None:
    """Start from a GPT-2's token embeddings (its BPE tokens; the added special tokens keep their
    random initialisation) and position embeddings: from random embeddings, this BERT was still on
    the unigram plateau (validation masked-token CE 6.81 nats) after 4.1M tokens of this text."""
    from transformers import GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel.from_pretrained(folder)
    wte, wpe = gpt2.transformer.wte.weight, gpt2.transformer.wpe.weight
    emb = model.bert.embeddings
    if wte.shape[1] != emb.word_embeddings.weight.shape[1] or wpe.shape[0] < emb.position_embeddings.weight.shape[0]:
        raise ValueError(f"{folder} has d_model {wte.shape[1]} and {wpe.shape[0]} positions; the BERT needs "
                         f"d_model {emb.word_embeddings.weight.shape[1]} and {emb.position_embeddings.weight.shape[0]}.")
    emb.word_embeddings.weight[: wte.shape[0]] = wte
    emb.position_embeddings.weight.copy_(wpe[: emb.position_embeddings.weight.shape[0]])


def mask_rows(x: torch.Tensor, tok, fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption of a batch of rows: ``(inputs, labels)`` with labels -100 where not selected."""
    special = torch.isin(x, torch.tensor(tok.all_special_ids))
    selected = (torch.rand(x.shape, generator=gen) < fraction) & ~special
    labels = torch.where(selected, x, torch.full_like(x, lm_data.IGNORE))
    roll = torch.rand(x.shape, generator=gen)
    inputs = x.clone()
    inputs[selected & (roll < 0.8)] = tok.mask_token_id
    swap = selected & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(0, len(tok), (int(swap.sum()),), generator=gen)
    return inputs, labels


def evaluate(model, tok, lines: list[str], max_length: int = 128, batch_size: int = 64, n_mask: int = 1) -> dict:
    """Masked-token metrics with lensmat's protocol (`lensmat.lenses.metrics.masked_token_quality`)."""
    seqs = lm_data.tokenize_with_specials(lines, tok, max_length)
    masking = lm_data.Masking.for_tokenizer(tok, n_mask=n_mask)
    return masked_token_quality(lambda t, m: model(input_ids=t, attention_mask=m).logits,
                                lm_data.batches(seqs, batch_size, masking=masking, pad_id=tok.pad_token_id))


def write_model_card(out: Path, summary: dict) -> Path:
    """The model card (README.md of the model folder), from `training_summary.json`."""
    a = summary["args"]
    card = f"""# lensmat masked-LM reference model

A small BERT (Hugging Face `BertForMaskedLM`: post-LayerNorm blocks, learned positions, GELU, tied
embeddings, the masked-LM head dense → GELU → LayerNorm → decoder) trained by
`scripts/train_masked_lm.py` so that lensmat's masked protocol runs offline. Its token and
position embeddings start from the bundled GPT-2 reference model's (same BPE, same d_model); every
other weight starts random. With random embeddings and everything else the same, the run stayed
on the unigram plateau: validation masked-token CE 6.81 nats, top-1 0.060 after 4.1M tokens,
against 4.44 and 0.237 for this model at the same point.

| | |
| --- | --- |
| layers / d_model / heads / d_mlp | {a['n_layer']} / {a['d_model']} / {a['n_head']} / {4 * int(a['d_model'])} |
| context | {a['n_positions']} positions (trained on rows of {a['seq_len']} tokens: `[CLS] … [SEP]`, `[SEP]` between documents); lensmat truncates longer lines to it |
| tokenizer | the GPT-2 reference model's byte-level BPE (4,096 tokens) + `[CLS]` `[SEP]` `[MASK]` `[PAD]` = {summary['vocab']} tokens; template `[CLS] text [SEP]` |
| parameters | {summary['params']:,} |
| objective | masked LM only (no next-sentence prediction): {a['mask_fraction']} of non-special tokens selected, 80% `[MASK]` / 10% random / 10% kept |
| tokens seen | {summary['train_tokens_seen']:,} ({summary['epochs']:.2f} epochs of {summary['tokens_per_epoch']:,} tokens) |
| optimiser | AdamW (β=0.9, 0.95), lr {a['lr']} with {a['warmup']} warm-up steps and cosine decay to {a['min_lr_frac']}×, weight decay {a['weight_decay']}, dropout {a['dropout']}, batch {a['batch_size']}×{a['seq_len']} tokens, gradient clipping 1.0 |
| seed | {a['seed']} |
| training time | {summary['train_minutes']:.0f} minutes on {summary['hardware']} |

## Data
The same text as the GPT-2 reference model (`lensmat/assets/reference/README.md`): WikiText-2
validation + test (CC BY-SA 3.0), five Project Gutenberg books (public domain in the USA) and the
first 70% of the Leipzig `eng_wikipedia_2016_10K` sentences (CC BY 4.0) less its last 5%. The last
30% of the Leipzig lines (lensmat's `heldout` split) are never trained on.

## Held-out quality
lensmat's masked protocol on the 3,000 held-out Leipzig lines (`[CLS] line [SEP]`, at most
{a['n_positions']} tokens): one random non-special position per line replaced by `[MASK]` (seed 0), the prediction
there scored against the original token ({summary['heldout_tokens']:,} masked tokens):

| metric | value |
| --- | --- |
| masked-token cross-entropy | {summary['heldout_ce']:.3f} nats/token |
| masked-token top-1 accuracy | {summary['heldout_top1_accuracy']:.4f} |
| the same, always predicting the most frequent training token | {summary['majority_baseline_accuracy']:.4f} |
| chance (uniform over the vocabulary) | {1 / summary['vocab']:.5f} |

Reproduce: `python scripts/train_masked_lm.py --data-dir ../shared/data --out lensmat/assets/masked_lm`.
"""
    path = out / "README.md"
    path.write_text(card)
    return path


def majority_baseline(rows: torch.Tensor, tok, lines: list[str], max_length: int) -> float:
    """Masked-token accuracy of always answering the most frequent non-special training token."""
    counts = torch.bincount(rows.flatten(), minlength=len(tok))
    counts[tok.all_special_ids] = 0
    top = int(counts.argmax())
    masking = lm_data.Masking.for_tokenizer(tok)
    hits = n = 0
    for batch in lm_data.batches(lm_data.tokenize_with_specials(lines, tok, max_length), 256, masking=masking):
        targets = batch.targets[batch.score_mask]
        hits, n = hits + int((targets == top).sum()), n + targets.numel()
    return hits / n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--out", type=Path, default=Path("lensmat/assets/masked_lm"))
    p.add_argument("--tokenizer-from", type=Path, default=reference_model_path(),
                   help="model folder whose byte-level BPE tokenizer.json is extended with BERT's special tokens")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-positions", type=int, default=64, help="the context: rows are this long too")
    p.add_argument("--mask-fraction", type=float, default=0.25)
    p.add_argument("--embeddings-from", type=lambda text: Path(text) if text else None, default=reference_model_path(),
                   help="GPT-2 folder whose token and position embeddings initialise the BERT's (same BPE and "
                        "d_model); '' starts from random embeddings")
    add_training_args(p, seq_len=64, tokens=9e6, lr=1e-3, warmup=200, dropout=0.0, eval_every=250)
    args = p.parse_args(argv)
    if args.seq_len > args.n_positions:
        p.error(f"--seq-len {args.seq_len} is longer than the context --n-positions {args.n_positions}.")

    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    docs, val_lines = training_documents(args.data_dir)
    tok = masked_lm_tokenizer(args.tokenizer_from, args.n_positions)
    heldout = lm_data.load_lines(lm_data.DEFAULT_CORPUS, "heldout")
    config = BertConfig(
        vocab_size=len(tok), hidden_size=args.d_model, num_hidden_layers=args.n_layer,
        num_attention_heads=args.n_head, intermediate_size=4 * args.d_model, max_position_embeddings=args.n_positions,
        hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout, type_vocab_size=1,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    model = BertForMaskedLM(config)
    if args.embeddings_from is not None:
        copy_gpt2_embeddings(model, args.embeddings_from)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(args.seed)

    def step_loss(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = mask_rows(x, tok, args.mask_fraction, gen)
        hidden = model.bert(input_ids=inputs).last_hidden_state
        selected = labels != lm_data.IGNORE
        loss = torch.nn.functional.cross_entropy(model.cls(hidden[selected]), labels[selected])
        return loss, loss

    def rows_for_epoch(epoch: int) -> torch.Tensor:
        return pack_rows(docs, tok, args.seq_len, args.seed + epoch, first=tok.cls_token_id, sep=tok.sep_token_id,
                         last=tok.sep_token_id)

    print(json.dumps({"params": n_params, "train_docs": len(docs), "vocab": len(tok)}), flush=True)
    trained = train_loop(model, rows_for_epoch, step_loss, lambda: evaluate(model, tok, val_lines, args.n_positions), args)
    model.eval()
    return save_run(model, tok, args, evaluate(model, tok, heldout, args.n_positions), trained, write_model_card,
                    majority_baseline_accuracy=majority_baseline(rows_for_epoch(0), tok, heldout, args.n_positions))

if __name__ == "__main__":
    main()

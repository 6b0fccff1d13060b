"""Train lensmat's bundled vision model, ``vit-digits``: a small ViT on scikit-learn's digits, offline.

A Hugging Face ``ViTForImageClassification`` (pre-LayerNorm blocks, a CLS token, learned positions,
the final LayerNorm and a linear head on the CLS vector), 8×8 grey images cut into 2×2 patches (16
patches + CLS = 17 positions). It is trained on lensmat's ``train`` split of the digits
(:func:`lensmat.data.images.load_images`: 1,257 images) with random shifts of up to one pixel, and
scored on the ``heldout`` split (540 images, never trained on); the held-out accuracy is printed and
recorded in ``training_summary.json`` and the model card. One torch thread; about two minutes on a
2-core x86_64 CPU.

    python scripts/train_vit_digits.py --out lensmat/assets/vit_digits
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from lensmat.data.images import SOURCES, load_images
from lensmat.models.vision import IMAGE_MEAN, IMAGE_STD, to_pixels


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="lensmat/assets/vit_digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-mlp", type=int, default=128)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument("--shift", type=int, default=1, help="random shifts of up to this many pixels (augmentation)")
    return p.parse_args(argv)


def shifted(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by a random offset in ``[-shift, shift]²`` (zero padding)."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, n), generator=gen)).tolist()
    return torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(n)])


@torch.no_grad()
def correct(model, pixels: torch.Tensor, labels: torch.Tensor) -> int:
    model.eval()
    return int((model(pixel_values=pixels).logits.argmax(-1) == labels).sum())


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from transformers import ViTConfig, ViTForImageClassification

    train, heldout = load_images("digits", "train"), load_images("digits", "heldout")
    size = int(train.images.shape[-1])
    config = ViTConfig(hidden_size=args.d_model, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       intermediate_size=args.d_mlp, hidden_act="gelu", hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, initializer_range=0.02, layer_norm_eps=1e-12, image_size=size,
                       patch_size=args.patch, num_channels=1, qkv_bias=True, num_labels=train.n_classes,
                       id2label={i: str(i) for i in range(train.n_classes)},
                       label2id={str(i): i for i in range(train.n_classes)})
    torch.manual_seed(args.seed)
    model = ViTForImageClassification(config)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(args.seed)
    heldout_pixels = to_pixels(heldout.images, size, 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "position" not in n and "cls" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "position" not in n and "cls" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(train), args.batch_size):
            idx = order[i: i + args.batch_size]
            x = to_pixels(shifted(train.images[idx], args.shift, gen), size, 1)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, train.labels[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_sum += float(loss) * len(idx)
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            acc = correct(model, heldout_pixels, heldout.labels) / len(heldout)
            print(f"epoch {epoch + 1:>4}  train loss {loss_sum / len(train):.4f}  held-out accuracy {acc:.4f}  "
                  f"({time.time() - start:.0f} s)", flush=True)
    seconds = time.time() - start
    model.eval()
    n_correct = correct(model, heldout_pixels, heldout.labels)
    train_correct = correct(model, to_pixels(train.images, size, 1), train.labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "do_resize": False, "do_rescale": False, "do_normalize": True,
         "image_mean": [IMAGE_MEAN], "image_std": [IMAGE_STD], "size": {"height": size, "width": size}}, indent=2) + "\n")
    data = {k: v for k, v in heldout.provenance().items() if k not in ("split", "n_images")}
    summary = {"data": {**data, "n_train": len(train), "n_heldout": len(heldout), "source": SOURCES["digits"]},
               "heldout_accuracy": n_correct / len(heldout), "heldout_correct": n_correct, "n_heldout": len(heldout),
               "train_accuracy": train_correct / len(train), "parameters": n_params, "seed": args.seed,
               "hyperparameters": {k: v for k, v in vars(args).items() if k != "out"},
               "command": "python scripts/train_vit_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "training_seconds": round(seconds, 1), "threads": 1, "torch": torch.__version__,
               "machine": platform.machine()}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for path in out.iterdir():  # save_pretrained writes the weights owner-only; package data is read by all
        path.chmod(0o644)
    print(f"held-out accuracy {n_correct}/{len(heldout)} = {n_correct / len(heldout):.4f}; train accuracy "
          f"{train_correct / len(train):.4f}; {n_params:,} parameters; {seconds:.0f} s; saved to {out}")


if __name__ == "__main__":
    main()

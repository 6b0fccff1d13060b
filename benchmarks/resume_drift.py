"""Resumed versus uninterrupted statistics: the largest difference, with the loaders as shipped and
with the tensors left where safetensors puts them (the state before issue 37's fix).

Collects ``h_0..h_L`` statistics (maps to the last layer) over the first ``--batches`` batches of the
``train`` split, checkpointing after ``--checkpoint-at`` of them, then resumes from that checkpoint:
  owned   the shipped loader (``lensmat.stats.artifacts.owned``: every loaded tensor in PyTorch-allocated memory)
  views   the same checkpoint read without it (tensors view the file buffer, as safetensors returns them)
and prints the largest absolute difference of the Gram panels and of the sums from an uninterrupted
run, and each loaded panel's address modulo 64 bytes. On CPUs whose BLAS adds into a misaligned
buffer in another order (MKL on AMD EPYC: 4.3e-14 in the issue), ``views`` differs and ``owned`` does not.

    python benchmarks/resume_drift.py
    python benchmarks/resume_drift.py --model smollm2-135m --batches 12 --checkpoint-at 4
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from machine import machine


def largest_difference(a, b) -> float:
    diffs = [(x - y).abs().max().item() for x, y in zip((a.sum, *a.panels), (b.sum, *b.panels))]
    return max(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model spec (default: the bundled reference model)")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--checkpoint-at", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import lensmat
    from lensmat.stats import artifacts as io
    from lensmat.stats.collect import collect, load_checkpoint, resid_hooks
    from lensmat.stats.gram import pair_pattern

    model = lensmat.load_model(args.model)
    corpus = lensmat.tokenized(model, split="train")
    batches = list(corpus.batches(args.batch_size))[: args.batches]
    hooks = resid_hooks(int(model.cfg.n_layers))
    kw = dict(pairs=[pair_pattern(len(hooks), "to_last")], progress=False)
    print(machine())
    print(f"model {args.model or 'bundled reference'}, {len(hooks)} residual layers, "
          f"{sum(b.n_scored for b in batches)} tokens in {len(batches)} batches, checkpoint after {args.checkpoint_at}")
    straight = collect(model, batches, [hooks], **kw)[0]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        collect(model, batches[: args.checkpoint_at], [hooks], checkpoint=ckpt, checkpoint_every=args.checkpoint_at, **kw)
        shipped = io.owned
        for name, loader in (("owned", shipped), ("views", lambda t: t)):
            io.owned = loader
            try:
                loaded, _ = load_checkpoint(ckpt, [hooks], kw["pairs"])
                offsets = sorted({p.data_ptr() % io.ALIGNMENT for p in loaded[0].panels})
                resumed = collect(model, batches, [hooks], checkpoint=ckpt, resume=True, **kw)[0]
            finally:
                io.owned = shipped
            print(f"{name:6s} panel address mod 64: {offsets}; largest |resumed - uninterrupted| = "
                  f"{largest_difference(resumed, straight):.3e}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

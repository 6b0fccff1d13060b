"""Check the sub-module hook pairs of a model: the one-token attention swap
(:func:`lensmat.analyses.submodules.one_token_attention_swap`). At one position attention is affine in its
input, so swapping every block's attention for the affine map fitted on the same one-token inputs
changes nothing when the ``attn`` pair is the attention module. Prints the largest logit change
relative to the largest logit, and the share of top-1 tokens kept, under the model's own layout
and, with ``--as-layout``, under another layout's pairs (e.g. the pre-norm pairs Gemma-3 used
before its sandwich layout):

    python benchmarks/crosscheck_attention_pairs.py --model gemma3-270m --as-layout pre-norm
    python benchmarks/crosscheck_attention_pairs.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch

import lensmat
from lensmat.analyses.submodules import one_token_attention_swap


def measure(model, ids: list[int]) -> tuple[float, float]:
    """``(largest |Δlogit| / largest |logit|, fraction of top-1 kept)``."""
    plain, swapped = one_token_attention_swap(model, ids)
    return (float((swapped - plain).abs().max() / plain.abs().max()),
            float((swapped.argmax(-1) == plain.argmax(-1)).double().mean()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="reference", help="any lensmat model spec (default: the bundled reference)")
    p.add_argument("--tokens", type=int, default=1024, help="random one-token inputs (default 1024)")
    p.add_argument("--as-layout", default=None, help="also measure with this layout's pairs (see lensmat.analyses.swap.LAYOUTS)")
    args = p.parse_args()
    swap = importlib.import_module("lensmat.analyses.swap")  # the module; `lensmat.analyses.swap` itself is the context manager
    model = lensmat.load_model(args.model, device="cpu")
    ids = torch.randperm(int(model.cfg.d_vocab), generator=torch.Generator().manual_seed(0))[:args.tokens].tolist()
    own = swap.block_layout(model)
    runs = [own] + ([args.as_layout] if args.as_layout else [])
    print(f"{args.model}: layout {own}, {model.cfg.n_layers} blocks, {len(ids)} one-token inputs")
    for layout in runs:
        saved = swap._PAIRS[own]
        swap._PAIRS[own] = swap._PAIRS[layout]  # read the model with `layout`'s pairs
        try:
            start = time.perf_counter()
            rel, kept = measure(model, ids)
        finally:
            swap._PAIRS[own] = saved
        print(f"  {layout:<20} attn {swap._PAIRS[layout]['attn']}: largest |dlogit| / largest |logit| {rel:.2e}, "
              f"top-1 kept {kept:.3f} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()

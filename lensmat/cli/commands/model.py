"""``lensmat info`` (the model and the corpus) and ``lensmat plan`` (the memory each command will take)."""

from __future__ import annotations

import argparse

from lensmat import data, models
from lensmat.cli.options import (Command, add_all_pairs, add_batch_size, add_max_length, add_model, add_model_options,
                                 add_stats_device, load)
from lensmat.stats import pipeline
from lensmat.stats.plan import COMMANDS


def cmd_info(args: argparse.Namespace) -> int:
    model = load(args)
    info = models.describe(model)
    print(f"model       {info.name}")
    print(f"layers      {info.n_layers} blocks (residual layers 0..{info.n_layers})")
    print(f"d_model     {info.d_model}")
    print(f"vocabulary  {info.d_vocab}")
    print(f"context     {info.n_ctx}")
    print(f"basis       {info.basis} ({'HF weights, no LayerNorm folding' if info.basis == 'raw' else 'folded/centred'})")
    print(f"dtype       {models.model_dtype(model)}   device {models.model_device(model)}")
    masked = models.is_masked_lm(model)
    print(f"protocol    {'masked (one [MASK] per line by default; --n-mask)' if masked else 'causal (next token)'}")
    spec = args.dataset or data.DEFAULT_CORPUS
    print(f"corpus      {spec}")
    for split in ("train", "heldout"):
        corpus = pipeline.tokenized(model, spec, split, args.max_length)
        what = "masked tokens" if masked else "tokens (BOS excluded)"
        print(f"  {split:<9} {len(corpus.seqs):>7} lines {corpus.n_tokens():>9} {what}")
    return 0


def add_plan_options(p: argparse.ArgumentParser) -> None:
    add_model(p, help="as for the other commands; only its config is read")
    p.add_argument("--command", dest="command_name", default="all", choices=("all", *COMMANDS))
    add_all_pairs(p, help="plan statistics of every layer pair")
    add_batch_size(p)
    add_max_length(p)
    add_stats_device(p, planned=True)


def cmd_plan(args: argparse.Namespace) -> int:
    from lensmat.stats.plan import GB, available_bytes, plan, shape_from_config

    shape = shape_from_config(args.model)
    commands = COMMANDS if args.command_name == "all" else [args.command_name]
    for name in commands:
        print(plan(name, shape, all_pairs=args.all_pairs, batch_size=args.batch_size, max_length=args.max_length,
                   stats_device=args.stats_device or "cpu").format())
    print(f"free memory now: {available_bytes('cpu') / GB:.2f} GB (cpu); the commands check their plan against "
          "the device's free memory after loading the model (--memory-limit GB to set it)")
    return 0


INFO = Command("info", "describe the model and the corpus", add_model_options, cmd_info)
PLAN = Command("plan", "the memory each command's statistics and chunks will take, from the model's config",
               add_plan_options, cmd_plan)

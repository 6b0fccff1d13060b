"""``lensmat fit`` (residual maps fitted on the train split, resumable, data-parallel under torchrun)
and ``lensmat import-maps`` (the paper's released matrices): the commands that write a maps folder."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lensmat.cli.options import (COUNT, NONNEGATIVE, Command, add_all_pairs, add_fit_budget, add_intercept,
                                 add_model_options,
                                 add_out_options, add_run_options, add_scoring_options, load, masking, memory, scoring)
from lensmat.stats import pipeline


def add_fit_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_run_options(p)
    add_fit_budget(p, "cap on fit tokens; --max-tokens is the old spelling", "--max-tokens")
    add_intercept(p, help="fit affine maps (y = xW + b)")
    p.add_argument("--ridge", type=NONNEGATIVE, default=0.0, help="ridge penalty λ added to XᵀX")
    add_all_pairs(p, help="also fit every h_l -> h_l' with l < l'")
    p.add_argument("--checkpoint-every", type=COUNT, default=50,
                   help="save the statistics to OUT.checkpoint every N batches (default 50)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fit from OUT.checkpoint")
    add_scoring_options(p)
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over torchrun's ranks (implied when WORLD_SIZE > 1); rank 0 writes")


def cmd_fit(args: argparse.Namespace) -> int:
    from lensmat.outputs import remove_owned
    from lensmat.stats import distributed

    if args.distributed and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise ValueError("--distributed needs a launcher that starts the ranks: torchrun --nproc_per_node=N -m lensmat fit ...")
    rank, world = 0, 1
    if distributed.init_from_env():
        rank, world = distributed.rank_and_world()
    try:
        code = _fit(args, rank, world)
    except BaseException:
        distributed.shutdown(barrier=False)
        raise
    distributed.shutdown()  # every rank is past it, so rank 0 has saved the maps
    remove_owned(pipeline.checkpoint_path(fit_checkpoint(args), rank, world))
    return code


def fit_checkpoint(args: argparse.Namespace) -> Path:
    """``OUT.checkpoint``: the one checkpoint folder of ``lensmat fit --out OUT``."""
    return Path(str(args.out).rstrip("/") + ".checkpoint")


def _fit(args: argparse.Namespace, rank: int, world: int) -> int:
    from lensmat.stats import artifacts as io

    checkpoint = fit_checkpoint(args)
    if args.resume and not Path(pipeline.checkpoint_path(checkpoint, rank, world)).exists():
        print(f"lensmat fit: no checkpoint at {checkpoint}; starting from the first batch", file=sys.stderr)
    model = load(args)
    maps = pipeline.fit_maps(model, args.dataset, max_fit_tokens=args.max_fit_tokens, batch_size=args.batch_size,
                             max_length=args.max_length, intercept=args.intercept, ridge=args.ridge,
                             all_pairs=args.all_pairs, progress=not args.quiet, checkpoint=checkpoint,
                             checkpoint_every=args.checkpoint_every, resume=args.resume, scoring=scoring(args),
                             **masking(args), **memory(args))
    if rank == 0:
        path = io.save_maps(maps, args.out, force=args.force)
        print(f"saved {len(maps.maps)} maps fitted on {maps.provenance['n_tokens']} tokens to {path}")
    return 0


def add_import_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("source", help="folder with i_j.pickle files")
    add_out_options(p)
    p.add_argument("--no-transpose", action="store_true", help="the files hold W for y = x W (row vectors)")


def cmd_import_maps(args: argparse.Namespace) -> int:
    from lensmat.lenses.importers import import_paper_maps
    from lensmat.stats import artifacts as io

    model = load(args)
    maps = import_paper_maps(args.source, model, transpose=not args.no_transpose)
    path = io.save_maps(maps, args.out, force=args.force)
    print(f"imported {len(maps.maps)} maps from {args.source} to {path}")
    print("the authors fitted them without BOS, at one random position per sentence: compare them with "
          "`lensmat compare --maps DIR --positions one-random --no-bos`")
    return 0


FIT = Command("fit", "fit residual maps h_l -> h_L on the train split and save them", add_fit_options, cmd_fit,
              {"needs_out": True})
IMPORT_MAPS = Command("import-maps", "convert the paper's released i_j.pickle matrices (safely) to lensmat maps",
                      add_import_options, cmd_import_maps, {"needs_out": True})

"""``lensmat transfer``: every fitted lens of layer i read at every layer j (the lens transfer matrix)."""

from __future__ import annotations

import argparse

from lensmat.cli.options import (Command, add_eval_budget, add_fit_budget, add_lenses, add_maps, add_model_options,
                                 add_run_options, add_tuned, load, run_keywords, shown, add_interval_options, interval_keywords)
from lensmat.lenses.registry import LENS_KINDS

TRANSFERABLE = tuple(k for k in LENS_KINDS if k != "logit")  # the logit lens has no per-layer translator


def add_transfer_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_run_options(p)
    add_lenses(p, TRANSFERABLE)
    p.set_defaults(lenses="mat")
    add_fit_budget(p)
    add_eval_budget(p, 20_000, "cap on heldout tokens (default: 20000; each lens costs L+1 times its compare "
                               "evaluation)")
    add_maps(p)
    add_tuned(p)
    add_interval_options(p)


def cmd_transfer(args: argparse.Namespace) -> int:
    from lensmat.lenses.tuned import TunedLensTraining
    from lensmat.reports import transfer
    from lensmat.reports.tables import format_transfer

    report = transfer(load(args), args.dataset, lenses=args.lenses, max_fit_tokens=args.max_fit_tokens,
                      max_eval_tokens=args.max_eval_tokens, maps=args.maps, tuned=args.tuned,
                      tuned_config=TunedLensTraining(tokens=args.tuned_tokens), **interval_keywords(args),
                      **run_keywords(args))
    return shown(format_transfer(report), args)


TRANSFER = Command("transfer", "the lens transfer matrix: each lens of layer i read at every layer j, on heldout",
                   add_transfer_options, cmd_transfer, {"default_out": "runs/transfer"})

"""``lensmat saturation`` (the order in which the top-k tokens saturate across layers, probe,
intervention) and ``lensmat early-exit`` (confidence exit per lens and saturation-based exit)."""

from __future__ import annotations

import argparse

from lensmat.analyses.early_exit import MASKED_T
from lensmat.analyses.saturation import SATURATION_LENSES
from lensmat.cli.options import (COUNT, FRACTION, _masked_t, add_eval_budget, add_fit_budget, add_interval_options,
                                 add_k, add_lenses, add_masking_options, add_model_options, add_run_options, Command,
                                 interval_keywords, load, masking, run_keywords, shown)


def add_saturation_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_run_options(p)
    p.add_argument("--lens", default="logit", choices=SATURATION_LENSES)
    add_k(p, help="ranks followed (default 5)")
    add_fit_budget(p, "train tokens for mat/tuned (train images for a vision model; train decoder positions for an encoder-decoder model, default 10000)")
    add_eval_budget(p, 5_000, help="heldout tokens (default 5000; held-out images for a vision model, decoder positions for an encoder-decoder model)")
    p.add_argument("--permutations", type=COUNT, default=1000, help="shuffles in the permutation test")
    p.add_argument("--order-rule", default="authors", choices=("authors", "leading"),
                   help="ranks the Kendall tau compares: up to the last saturated rank (authors, default) or "
                        "the leading run of saturated ranks (leading); the report holds both")
    p.add_argument("--pairs", type=COUNT, default=100, help="token pairs in the intervention")
    add_masking_options(p)
    add_interval_options(p)


def cmd_saturation(args: argparse.Namespace) -> int:
    from lensmat.reports import saturation
    from lensmat.reports.tables import format_saturation

    report = saturation(load(args), args.dataset, lens=args.lens, k=args.k, max_fit_tokens=args.max_fit_tokens,
                        max_eval_tokens=args.max_eval_tokens, n_permutations=args.permutations,
                        order_rule=args.order_rule, max_pairs=args.pairs, **masking(args), **interval_keywords(args),
                        **run_keywords(args))
    return shown(format_saturation(report), args)


def add_early_exit_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_run_options(p)
    add_lenses(p, SATURATION_LENSES)
    p.add_argument("--retention", type=FRACTION, default=0.95, help="Precision@1 kept when counting layers saved")
    add_fit_budget(p, "train tokens for mat/tuned")
    add_eval_budget(p, 10_000, help="heldout tokens (default 10000)")
    p.add_argument("--max-probe-tokens", type=COUNT, default=5_000, help="train tokens for the saturation probe")
    add_masking_options(p)
    add_interval_options(p)
    p.add_argument("--masked-t", type=_masked_t, default=MASKED_T, metavar="T",
                   help=f"masked LMs: t of the threshold theta(t): {MASKED_T} for every token (default, the authors' BERT code) "
                        "or 'position' (each masked token's position, as the paper's text)")


def cmd_early_exit(args: argparse.Namespace) -> int:
    from lensmat.reports import early_exit
    from lensmat.reports.tables import format_early_exit

    report = early_exit(load(args), args.dataset, lenses=args.lenses, retention=args.retention,
                        max_fit_tokens=args.max_fit_tokens, max_eval_tokens=args.max_eval_tokens,
                        max_probe_tokens=args.max_probe_tokens, masked_t=args.masked_t, **masking(args),
                        **interval_keywords(args), **run_keywords(args))
    return shown(format_early_exit(report), args)


SATURATION = Command("saturation", "order in which the top-k tokens saturate across layers, probe, intervention",
                     add_saturation_options, cmd_saturation, {"default_out": "runs/saturation"})
EARLY_EXIT = Command("early-exit", "confidence exit per lens (layers saved) and saturation-based exit",
                     add_early_exit_options, cmd_early_exit, {"default_out": "runs/early_exit"})

"""``lensmat compare``: fit maps on train, compare lenses per layer on heldout (the main job)."""

from __future__ import annotations

import argparse
import functools

from lensmat.cli.options import (COUNT, POSITIVE, Command, add_all_pairs, add_eval_budget, add_fit_budget,
                                 add_interval_options, add_lenses, add_maps, add_model_options, add_patchscope,
                                 add_run_options, add_scoring_options, add_tuned, interval_keywords, load, masking,
                                 run_keywords, scoring, shown)
from lensmat.lenses.registry import LENS_KINDS


def add_compare_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_run_options(p)
    add_lenses(p, LENS_KINDS)
    add_patchscope(p)
    add_fit_budget(p)
    add_eval_budget(p)
    add_maps(p)
    add_all_pairs(p, help="fit and score every h_l -> h_l' (the full R2 heatmap; statistics grow as (L+1)^2 d^2)")
    p.add_argument("--sites", default="post",
                   help="residual sites read: post (layers 0..L) or post,mid (also hook_resid_mid of every block, "
                        "logit and mat lenses)")
    add_tuned(p)
    p.add_argument("--tuned-optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--tuned-lr", type=POSITIVE, default=None, help="default 0.1 (sgd) or 1e-3 (adam)")
    p.add_argument("--jlens", default=None, help="reuse a saved J-lens (lensmat folder or TransformerLens .pt)")
    p.add_argument("--jlens-prompts", type=COUNT, default=20, help="train lines the J-lens is fitted on")
    add_scoring_options(p)
    add_interval_options(p)
    p.add_argument("--view-lines", type=COUNT, default=6,
                   help="held-out lines (first 32 tokens each) read for report.html's trajectory view (0: none; default 6)")


def cmd_compare(args: argparse.Namespace) -> int:
    from lensmat.lenses.registry import parse_lenses
    from lensmat.lenses.tuned import TunedLensTraining
    from lensmat.analyses.trajectory_view import sample_views
    from lensmat.reports import compare
    from lensmat.reports.tables import format_compare

    names = parse_lenses(args.lenses)
    lr = args.tuned_lr if args.tuned_lr is not None else (0.1 if args.tuned_optimizer == "sgd" else 1e-3)
    tuned_config = TunedLensTraining(tokens=args.tuned_tokens, optimizer=args.tuned_optimizer, lr=lr)
    report = compare(load(args), args.dataset, lenses=names, max_fit_tokens=args.max_fit_tokens,
                     max_eval_tokens=args.max_eval_tokens, maps=args.maps, tuned=args.tuned, jlens=args.jlens,
                     tuned_config=tuned_config, jlens_prompts=args.jlens_prompts, scoring=scoring(args),
                     all_pairs=args.all_pairs, sites=args.sites, patchscope_prompt=args.patchscope_prompt,
                     views=functools.partial(sample_views, n_lines=args.view_lines) if args.view_lines else None,
                     **masking(args), **interval_keywords(args), **run_keywords(args))
    return shown(format_compare(report), args)


COMPARE = Command("compare", "fit maps on train, compare lenses per layer on heldout (the main job)",
                  add_compare_options, cmd_compare, {"default_out": "runs/compare"})

"""``lensmat submodules``: swap attn/mlp/ln for linear maps (the paper's protocol and single-block swaps)."""

from __future__ import annotations

import argparse

from lensmat.cli.options import (add_eval_budget, add_fit_budget, add_intercept, add_interval_options,
                                 add_masking_options, add_model_options, add_run_options, Command, interval_keywords,
                                 load, masking, run_keywords, shown)


def add_submodules_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_run_options(p)
    p.add_argument("--kinds", default="attn,mlp,ln", help="comma-separated: attn, mlp, ln")
    add_fit_budget(p)
    add_eval_budget(p, 20_000)
    add_intercept(p, help="affine maps")
    add_masking_options(p)
    add_interval_options(p)


def cmd_submodules(args: argparse.Namespace) -> int:
    from lensmat.analyses.submodules import PROTOCOL_KINDS
    from lensmat.reports import submodules
    from lensmat.reports.tables import format_submodules

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in PROTOCOL_KINDS]
    if bad or not kinds:
        raise ValueError(f"Unknown sub-module kind(s) {bad or kinds}; valid kinds: {', '.join(PROTOCOL_KINDS)}.")
    report = submodules(load(args), args.dataset, kinds=kinds, max_fit_tokens=args.max_fit_tokens,
                        max_eval_tokens=args.max_eval_tokens, intercept=args.intercept, **masking(args),
                        **interval_keywords(args), **run_keywords(args))
    return shown(format_submodules(report), args)


SUBMODULES = Command("submodules", "swap attn/mlp/ln for linear maps: the paper's protocol and single-block swaps",
                     add_submodules_options, cmd_submodules, {"default_out": "runs/submodules"})

"""``lensmat attribute``: which attention and MLP moved one token's log-probability, read through the
lenses, the largest contributions checked by swapping and ablating the sub-module."""

from __future__ import annotations

import argparse

from lensmat.analyses.attribution import ABLATE_AT, ATTRIBUTION_LENSES
from lensmat.cli.options import (NATURAL, Command, add_fit_budget, add_lenses, add_maps, add_model_options,
                                 add_run_options, load, number, run_keywords)


def add_attribute_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_run_options(p)
    p.add_argument("--text", required=True, help="the text to read (BOS is prepended)")
    p.add_argument("--position", type=number(int, name="integer"), default=-1,
                   help="the token index whose next-token prediction is attributed (BOS is 0; negative counts from "
                        "the end; default -1, the last)")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", default=None,
                       help="the token followed, as text (exactly one token, with its leading space, e.g. ' Paris'; "
                            "default: the model's own top-1 at the position)")
    token.add_argument("--token-id", type=NATURAL, default=None, help="the token followed, as a token id")
    add_lenses(p, ATTRIBUTION_LENSES)
    p.add_argument("--top", type=NATURAL, default=3,
                   help="contributions per lens checked causally (largest |attribution|; default 3, 0: none)")
    p.add_argument("--all-effects", action="store_true",
                   help="measure the causal effects of every attention and MLP, not only the largest")
    p.add_argument("--ablate-at", choices=ABLATE_AT, default="all",
                   help="intervene on the sub-module at every position of the text (default) or at --position only, "
                        "where the lens reads it")
    add_fit_budget(p, "train tokens for the mat maps, the sub-module maps and the mean outputs")
    add_maps(p, help="reuse saved mat maps that hold the resid_mid_l -> h_L maps too (lensmat.save_maps(result.maps, "
                     "DIR) after an attribution; maps from `lensmat fit` read the post site only)")


def cmd_attribute(args: argparse.Namespace) -> int:
    from lensmat.reports import attribute
    from lensmat.reports.tables import format_attribution

    token = args.token if args.token_id is None else args.token_id
    result = attribute(load(args), args.lenses, args.text, position=args.position, token=token, top=args.top,
                       all_effects=args.all_effects, ablate_at=args.ablate_at, maps=args.maps, dataset=args.dataset,
                       max_fit_tokens=args.max_fit_tokens, **run_keywords(args))
    print(format_attribution(result.to_dict()))
    print(f"figure {args.out}/attribution.png, report {args.out}/report.json")
    return 0


ATTRIBUTE = Command("attribute", "which attention and MLP moved one token's log-probability, read through lenses "
                                 "and checked by ablation and swaps", add_attribute_options, cmd_attribute,
                    {"default_out": "runs/attribute"})

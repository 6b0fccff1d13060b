"""``lensmat trajectory``: one text, each lens's top-1 per layer and position as a heatmap and a table."""

from __future__ import annotations

import argparse

from lensmat.analyses.trajectory import STATISTICS
from lensmat.cli.options import (Command, add_fit_budget, add_k, add_lenses, add_maps, add_model_options,
                                 add_run_options, add_tuned, load, run_keywords)
from lensmat.lenses.registry import LENS_KINDS


def add_trajectory_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_run_options(p)
    p.add_argument("--text", required=True, help="the text to read (BOS is prepended; [MASK] allowed for a masked LM)")
    add_lenses(p, LENS_KINDS)
    p.add_argument("--statistic", default="kl", choices=tuple(STATISTICS),
                   help="the heatmap's colour: the probability of the model's final top-1, entropy (nats), "
                        "KL(p_final || p_lens) (nats) or the rank of the target token (default kl)")
    add_k(p, help="top tokens per cell in the table (default 5)")
    add_fit_budget(p, "train tokens for the mat maps")
    add_maps(p, help="reuse maps saved by `lensmat fit` for the mat lens")
    add_tuned(p)


def cmd_trajectory(args: argparse.Namespace) -> int:
    from lensmat.lenses.tuned import TunedLensTraining
    from lensmat.reports import trajectory_report
    from lensmat.reports.tables import format_trajectory

    _, report = trajectory_report(
        load(args), args.text, args.dataset, lenses=args.lenses, statistic=args.statistic, k=args.k, maps=args.maps,
        tuned=args.tuned, tuned_config=TunedLensTraining(tokens=args.tuned_tokens), max_fit_tokens=args.max_fit_tokens,
        **run_keywords(args))
    out = args.out
    print(format_trajectory(report))
    print(f"heatmap ({args.statistic}) {out}/trajectory.png, table {out}/trajectory.csv, report {out}/report.json")
    return 0


TRAJECTORY = Command("trajectory", "one text: each lens's top-1 per layer and position as a heatmap and a table",
                     add_trajectory_options, cmd_trajectory, {"default_out": "runs/trajectory"})

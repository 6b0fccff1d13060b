"""``lensmat intervene``: one text read by every lens at every layer, clean and under an intervention
(a sub-module swap, a steering vector, an ablation), and what changed."""

from __future__ import annotations

import argparse

from lensmat.cli.options import (COUNT, NATURAL, NONNEGATIVE, Command, add_fit_budget, add_intercept, add_k, add_lenses,
                                 add_maps, add_model_options, add_run_options, add_tuned, load, number, run_keywords)
from lensmat.lenses.registry import LENS_KINDS


def add_intervene_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_run_options(p)
    p.add_argument("--text", required=True, help="the text to read (BOS is prepended)")
    add_lenses(p, LENS_KINDS)
    g = p.add_argument_group("the intervention (one or more)")
    g.add_argument("--swap", action="append", default=None, metavar="KIND@BLOCK",
                   help="swap a sub-module (ln1, attn, ln2, mlp, block) of a block for its linear map fitted on train, "
                        "e.g. attn@3; repeat or comma-separate for several")
    g.add_argument("--swap-maps", default=None, metavar="DIR",
                   help="sub-module maps saved with lensmat.save_maps (instead of fitting them)")
    add_intercept(g, help="fit the swapped sub-modules' maps with an intercept (affine)")
    g.add_argument("--steer", type=NATURAL, default=None, metavar="LAYER",
                   help="add a steering vector to the residual stream h_LAYER (0..L) at every position")
    g.add_argument("--steer-from", default=None, metavar="TEXT",
                   help="contrast prompt the vector steers away from (vector = mean h(--steer-to) - mean h(--steer-from))")
    g.add_argument("--steer-to", default=None, metavar="TEXT", help="contrast prompt the vector steers towards")
    g.add_argument("--steer-vector", default=None, metavar="FILE",
                   help="the steering vector as .npy or .safetensors (d_model numbers), instead of contrast prompts")
    g.add_argument("--scale", type=number(float, name="number"), default=1.0,
                   help="multiplies the steering vector (default 1)")
    g.add_argument("--ablate", action="append", default=None, metavar="KIND@BLOCK",
                   help="ablate an attention or MLP output (attn@2, mlp@5); repeat or comma-separate for several")
    g.add_argument("--ablation", choices=("zero", "mean"), default="zero",
                   help="replace the ablated output by zeros (default) or by its mean over train tokens")
    p.add_argument("--target", default=None, metavar="TOKEN",
                   help="follow this token's rank (one token of the tokenizer, e.g. ' Paris'); default: the next token")
    p.add_argument("--generate", type=COUNT, default=None, metavar="N",
                   help="also generate N tokens greedily, clean and intervened, and read both continuations")
    add_k(p, help="top tokens per cell in intervene.csv's lens readings (default 10)")
    p.set_defaults(k=10)
    p.add_argument("--tol", type=NONNEGATIVE, default=1e-5,
                   help="relative change below which an activation counts as unchanged (default 1e-5)")
    add_fit_budget(p, "train tokens for the mat maps and the swapped sub-modules' maps")
    add_maps(p, help="reuse maps saved by `lensmat fit` for the mat lens")
    add_tuned(p)


def _joined(values: list[str] | None) -> str | None:
    return None if values is None else ",".join(values)


def cmd_intervene(args: argparse.Namespace) -> int:
    from lensmat.lenses.tuned import TunedLensTraining
    from lensmat.reports import intervene_report
    from lensmat.reports.tables import format_intervene

    view, report = intervene_report(
        load(args), args.text, args.dataset, lenses=args.lenses, swap=_joined(args.swap), swap_maps=args.swap_maps,
        intercept=args.intercept, steer_layer=args.steer, steer_vector=args.steer_vector, steer_from=args.steer_from,
        steer_to=args.steer_to, scale=args.scale, ablate=_joined(args.ablate), ablation=args.ablation,
        targets=args.target, k=args.k, generate=args.generate, tol=args.tol, maps=args.maps, tuned=args.tuned,
        tuned_config=TunedLensTraining(tokens=args.tuned_tokens), max_fit_tokens=args.max_fit_tokens,
        **run_keywords(args))
    out = args.out
    print(format_intervene(report))
    print(f"figures {out}/intervene_delta.png and {out}/intervene_layers.png, table {out}/intervene.csv, "
          f"report {out}/report.json")
    return 0


INTERVENE = Command("intervene", "one text, clean and under a swap, steering vector or ablation: every lens at every "
                    "layer and what changed", add_intervene_options, cmd_intervene, {"default_out": "runs/intervene"})

"""``lensmat linearity``: per-block linearity scores and depth pruning of the most linear blocks, with
the anisotropy and intrinsic dimension of every residual layer (LLM-Microscope's; on the held-out tokens,
the intrinsic dimension on the first ``--max-id-tokens`` of them), of one model or of every model of a training run
(``--checkpoints``) or a list (``--model A,B,C``)."""

from __future__ import annotations

import argparse

from lensmat.cli.options import (NATURAL, Command, add_eval_budget, add_fit_budget, add_interval_options,
                                 add_masking_options, add_model_options, add_run_options, interval_keywords, load,
                                 load_spec, masking, run_keywords, shown)


def add_linearity_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_run_options(p)
    add_fit_budget(p)
    add_eval_budget(p, 20_000, "cap on heldout tokens (default: 20000): held-out scores, pruning and anisotropy")
    p.add_argument("--max-k", type=NATURAL, default=None, help="prune up to K blocks (default: half of them)")
    p.add_argument("--max-id-tokens", type=NATURAL, default=4096, metavar="N",
                   help="intrinsic dimension: the first N held-out tokens, stored (default 4096, LLM-Microscope's; 0 skips it)")
    p.add_argument("--checkpoints", default=None, metavar="DIR",
                   help="score every model of a training run (DIR/checkpoints/*, then DIR; see "
                        "scripts/train_reference_model.py --checkpoints) and plot linearity against tokens seen; "
                        "--model A,B,C compares the models listed")
    add_masking_options(p)
    add_interval_options(p)


def cmd_linearity(args: argparse.Namespace) -> int:
    from lensmat.analyses.linearity_models import checkpoint_models
    from lensmat.reports import linearity, linearity_over_models
    from lensmat.reports.tables import format_linearity, format_linearity_over_models

    specs = checkpoint_models(args.checkpoints) if args.checkpoints else (
        [m.strip() for m in args.model.split(",")] if args.model and "," in args.model else None)
    keywords = {"max_fit_tokens": args.max_fit_tokens, "max_eval_tokens": args.max_eval_tokens, "max_k": args.max_k,
                "max_id_tokens": args.max_id_tokens,
                **masking(args), **interval_keywords(args), **run_keywords(args)}
    if specs is not None:
        summary = linearity_over_models(specs, args.dataset, load=lambda spec: load_spec(args, spec), **keywords)
        print(format_linearity_over_models(summary))
        print(f"report and plots in {args.out}/ (one folder per model)")
        return 0
    return shown(format_linearity(linearity(load(args), args.dataset, **keywords)), args)


LINEARITY = Command("linearity", "per-block linearity scores and depth pruning of the most linear blocks; "
                    "anisotropy and intrinsic dimension per layer",
                    add_linearity_options, cmd_linearity, {"default_out": "runs/linearity"})

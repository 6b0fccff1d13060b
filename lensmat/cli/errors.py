"""The one error surface of ``lensmat``: every expected failure is one line on stderr and an exit
code (2: bad input, 1: the machine refused: disk, permissions, memory running out; 130: Ctrl-C,
with the ``--resume`` line of an interrupted fit), the traceback only under ``--debug`` or
``LENSMAT_DEBUG=1``; anything else is a bug, shown with its traceback and exit code 1."""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import traceback
from contextlib import contextmanager

from lensmat import models
from lensmat.cli.commands.maps import fit_checkpoint


def _expected_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """``(bad input, the machine refused)``: the failures :func:`run` reports in one line, with exit
    code 2 and 1. Bad input: lensmat's own errors (all ``ValueError`` or load errors), unknown names,
    refused pickles, a memory plan over its limit. The machine: files and folders (``OSError``), running
    out of memory midway."""
    import torch

    from lensmat.models.gguf import GGUFError
    from lensmat.stats.collect import ActivationError
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


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the parsed command with its output folder claimed (rank 0 writes); returns its exit code,
    or the code of the failure it raised (printed here)."""
    from lensmat.outputs import catch_interrupts, claim

    debug = args.debug or os.environ.get("LENSMAT_DEBUG", "") not in ("", "0")
    inputs = [getattr(args, k, None) for k in ("dataset", "model", "maps", "tuned", "jlens", "source", "checkpoints")]
    out = getattr(args, "out", None) if int(os.environ.get("RANK", "0")) == 0 else None  # rank 0 writes
    bad_input, refused = _expected_errors()
    catch_interrupts()
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

"""The ``lensmat`` command: :func:`build_parser` (one subparser per row of
:data:`lensmat.cli.commands.COMMANDS`) and :func:`main`, which parses, settles ``--out`` and hands
the command to the error surface (:func:`lensmat.cli.errors.run`)."""

from __future__ import annotations

import argparse
import sys

from lensmat._version import __version__
from lensmat.cli.commands import COMMANDS
from lensmat.cli.errors import run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lensmat",
        description="Fit linear maps between transformer layers and read them through lenses.",
    )
    parser.add_argument("--version", action="version", version=f"lensmat {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected failure too (or set LENSMAT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        command.add_options(p)
        p.set_defaults(func=command.handler, **command.defaults)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 done, 1 the machine refused, 2 bad input, 130 Ctrl-C)."""
    from lensmat.outputs import COMMAND_LINE

    argv = sys.argv[1:] if argv is None else list(argv)
    COMMAND_LINE[:] = ["lensmat", *argv]  # the reports' provenance
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if getattr(args, "out", None) is None and getattr(args, "default_out", None):
        args.out = args.default_out
    if getattr(args, "needs_out", False) and args.out is None:
        parser.error(f"lensmat {args.command} needs --out DIR for what it writes")
    return run(args, argv)

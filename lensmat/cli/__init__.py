"""The ``lensmat`` command line: parses arguments, calls the Python API, prints the report's tables
(:mod:`lensmat.reports.tables`) and writes its folder (:mod:`lensmat.reports`).

The top layer: it may import every layer below it (reports, analyses, lenses, stats, data, models);
nothing in lensmat imports it but ``lensmat.__main__``. Entry point: :func:`main` (``lensmat`` and
``python -m lensmat``). The map of the layers: ``docs/modules.md``.

- :mod:`~lensmat.cli.options`: the shared argparse types every numeric option goes through (finite,
  in range, the range named on refusal: :data:`COUNT`, :data:`NATURAL`, :data:`SEED`,
  :data:`NONNEGATIVE`, :data:`POSITIVE`, :data:`FRACTION`) and the options several commands share,
  each declared once;
- :mod:`~lensmat.cli.commands`: one module per command (or closely related pair), its options beside
  its handler, and the table of commands;
- :mod:`~lensmat.cli.app`: :func:`build_parser` and :func:`main`;
- :mod:`~lensmat.cli.errors`: the one error surface: every expected failure is one line on stderr and
  a non-zero exit (2: bad input, 1: the machine refused: disk, permissions, memory running out; 130:
  Ctrl-C), with the traceback only under ``--debug`` or ``LENSMAT_DEBUG=1``.
"""

from lensmat.cli.app import build_parser, main
from lensmat.cli.options import COUNT, FRACTION, NATURAL, NONNEGATIVE, POSITIVE, SEED, number

__all__ = ["main", "build_parser", "number", "COUNT", "NATURAL", "SEED", "NONNEGATIVE", "POSITIVE", "FRACTION"]

"""``lensmat view RUN_DIR``: (re)build a run folder's ``report.html`` and print its path."""

from __future__ import annotations

import argparse

from lensmat.cli.options import Command


def add_view_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a folder a lensmat command wrote (it holds report.json; views.json when it "
                                   "kept a trajectory view)")


def cmd_view(args: argparse.Namespace) -> int:
    from lensmat.reports.html import rebuild

    path = rebuild(args.run_dir)
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB; open it in a browser, no server or network needed)")
    return 0


VIEW = Command("view", "(re)build a run folder's report.html (offline, one file) and print its path",
               add_view_options, cmd_view)

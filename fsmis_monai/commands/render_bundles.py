"""``fsmis render-bundles``: write every ``bundles/<method>/`` from its source in ``bundles/_source``
(:mod:`fsmis_monai.bundles`); ``--check`` lists stale files and fails without writing (what CI runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "render bundles/<method>/configs, LICENSE and shared README sections from bundles/_source"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundles", type=Path, default=Path("bundles"), help="folder holding _source/ (default: bundles)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a rendered file is stale")


def run(args: argparse.Namespace) -> int:
    from fsmis_monai.bundles import SOURCE, render_all, stale_files

    if not (args.bundles / SOURCE).is_dir():
        print(f"error: {args.bundles / SOURCE}: no bundle source folder", file=sys.stderr)
        return 1
    if args.check:
        stale = stale_files(args.bundles)
        for f in stale:
            print(f"stale: {args.bundles / f}")
        if stale:
            print(f"run: fsmis render-bundles --bundles {args.bundles}", file=sys.stderr)
        return 1 if stale else 0
    for f in render_all(args.bundles):
        print(f"wrote {args.bundles / f}")
    return 0

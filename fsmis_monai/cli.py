"""The ``fsmis`` command line: one subcommand per module in :mod:`fsmis_monai.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported lazily so that ``fsmis --help`` stays fast and a command's heavy imports
(torch, ITK) are paid only when that command runs. Bad input (a :class:`~fsmis_monai.io.FsmisInputError`
anywhere in the error's chain, or an ``OSError`` naming a file) is reported here, once for every
command, as one line ``error: <file>: <problem>`` with exit code 1; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Sequence

# Subcommand name -> module in fsmis_monai.commands. Listed here so the order of --help is stable.
COMMANDS = (
    "preprocess",
    "datalist",
    "supervoxels",
    "superpixels",
    "evaluate",
    "demo",
    "quickstart",
    "reproduce",
    "freeze",
    "import-checkpoint",
    "render-bundles",
)


def _module_name(command: str) -> str:
    return "fsmis_monai.commands." + command.replace("-", "_")


def available_commands() -> list[str]:
    """Commands whose module exists in this installation."""
    return [c for c in COMMANDS if importlib.util.find_spec(_module_name(c)) is not None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsmis", description="Few-shot medical image segmentation on MONAI.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in available_commands():
        module = importlib.import_module(_module_name(command))
        p = sub.add_parser(command, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from fsmis_monai import __version__

    return f"fsmis-monai {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except Exception as e:
        from fsmis_monai.io import input_error_line

        line = input_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

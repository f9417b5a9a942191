"""``fsmis import-checkpoint``: turn a checkpoint released with an original repository into a bundle's
``models/model.pt``.

The file is read with ``weights_only=True`` (plain state dict, ``{"model": ...}`` or DataParallel
``module.`` keys), renamed by :mod:`fsmis_monai.networks.checkpoint_import` and written atomically. A line
per group of dropped reference tensors (with the reason) and any note about the layout is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert a checkpoint released with a method's original repository into bundles/<method>/models/model.pt"

IMPORTABLE = ("ssl_alpnet", "adnet", "qnet", "lslpn", "gmrd", "pami", "difd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the released .pth file (read with weights_only=True)")
    parser.add_argument("--method", required=True, choices=IMPORTABLE, help="the method the checkpoint belongs to")
    parser.add_argument("--output", default=None, help="output file (default: bundles/<method>/models/model.pt)")
    parser.add_argument("--faithful", action="store_true",
                        help="map onto the faithful=True layout (use it with a bundle run with faithful=true)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on any unknown checkpoint tensor or any project tensor the checkpoint does not fill")


def run(args: argparse.Namespace) -> int:
    from fsmis_monai.networks.checkpoint_import import convert_checkpoint

    output = Path(args.output) if args.output else Path("bundles") / args.method / "models" / "model.pt"
    _, report = convert_checkpoint(args.checkpoint, args.method, output, faithful=args.faithful, strict=args.strict)
    for line in report.lines():
        print(line)
    print(f"wrote {output}")
    return 0

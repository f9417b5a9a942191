"""``fsmis superpixels``: SSL-ALPNet 2D superpixels (per axial slice) for every ``image_<id>`` of a folder.

The work is :func:`fsmis_monai.data.pseudolabel_folder.superpixel_folder`; same pairing, parallelism,
atomic writes and summary as ``fsmis supervoxels`` (the summary counts superpixels over all slices).
"""

from __future__ import annotations

import argparse

from fsmis_monai.commands.supervoxels import add_common_arguments, report

HELP = "Compute 2D superpixel pseudolabels (SSL-ALPNet) for every image_<id> in a folder."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--min-size", type=int, default=400, help="skimage felzenszwalb min_size (default 400)")
    parser.add_argument("--sigma", type=float, default=1.0, help="skimage felzenszwalb sigma (default 1)")
    parser.add_argument("--body-threshold", type=float, default=None,
                        help="body mask threshold on the stored intensities (default: 1e-4 + 50 CHAOS, 1e-4 otherwise)")
    parser.add_argument("--faithful", action="store_true",
                        help="reproduce the reference relabelling (drops superpixel 0, leaves a gap in the ids)")


def run(args: argparse.Namespace) -> int:
    from fsmis_monai.data.pseudolabel_folder import superpixel_folder

    return report(superpixel_folder(args.src, args.dst, dataset=args.dataset, min_size=args.min_size, sigma=args.sigma,
                                    body_threshold=args.body_threshold, faithful=args.faithful, workers=args.workers,
                                    overwrite=args.overwrite))

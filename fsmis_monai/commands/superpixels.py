"""``fsmis superpixels``: SSL-ALPNet 2D superpixels (per axial slice) for every ``image_<id>`` of a folder.

Same pairing, parallelism, atomic writes and summary as ``fsmis supervoxels``
(:func:`fsmis_monai.commands.supervoxels.run_folder`); the summary counts superpixels over all slices.
"""

from __future__ import annotations

import argparse
import functools

from fsmis_monai.commands.supervoxels import add_common_arguments, run_folder

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
    from fsmis_monai.data.registry import get_dataset

    threshold = args.body_threshold
    if threshold is None:
        threshold = get_dataset(args.dataset).superpixel_body_threshold if args.dataset else 1e-4
    params = {"min_size": args.min_size, "sigma": args.sigma, "scale": 1.0, "body_threshold": threshold,
              "faithful": bool(args.faithful), "dataset": args.dataset}
    compute = functools.partial(_superpixels, min_size=args.min_size, sigma=args.sigma, body_threshold=threshold,
                                faithful=bool(args.faithful))
    return run_folder(args.src, args.dst, compute, kind="superpixels", parameters=params, workers=args.workers,
                      overwrite=args.overwrite, per_slice=True)


def _superpixels(image, spacing, **kwargs):
    """``compute(image, spacing)`` form of :func:`make_superpixels` (2D superpixels ignore the spacing)."""
    from fsmis_monai.pseudolabels import make_superpixels

    return make_superpixels(image, **kwargs)

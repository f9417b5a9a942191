"""``fsmis datalist``: a MONAI-style JSON datalist with the cross-validation folds of a preprocessed folder.

Keys (each a list for ``monai.data.load_decathlon_datalist(path, data_list_key=...)``):
``training`` (every scan), and per fold ``fold<k>_training``, ``fold<k>_validation`` (query scans) and
``fold<k>_support``. Items are ``{"image", "label", ("pseudolabel"), "id"}`` with paths relative to the
datalist file (``--absolute`` for absolute paths). Files are paired by id, never by position
(:func:`fsmis_monai.data.datalist.build_datalist`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write a MONAI-style JSON datalist (with folds) for a folder of image_<id>/label_<id> files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="folder holding image_<id>.nii.gz and label_<id>.nii.gz")
    parser.add_argument("--dataset", default=None, help="registry dataset (chaos, sabs, cmr...) to add its folds")
    parser.add_argument("--pseudolabels", default=None, help="folder holding superpix-*_<id>.nii.gz files")
    parser.add_argument("--family", default="qnet", choices=("qnet", "adnet", "alp"), help="fold convention")
    parser.add_argument("--subset", action="store_true",
                        help="build folds over the scans present instead of requiring all of the dataset's scans")
    parser.add_argument("--absolute", action="store_true", help="write absolute paths")
    parser.add_argument("--output", default=None, help="output file (default: DIR/datalist.json)")


def run(args: argparse.Namespace) -> int:
    from fsmis_monai.data.datalist import build_datalist
    from fsmis_monai.io import write_json

    output = Path(args.output) if args.output else Path(args.dir) / "datalist.json"
    datalist = build_datalist(args.dir, args.dataset, args.pseudolabels, args.family, args.subset,
                              relative_to=None if args.absolute else output.resolve().parent)
    write_json(output, datalist)
    print(f"{len(datalist['training'])} scans -> {output}")
    return 0

"""``fsmis datalist``: a MONAI-style JSON datalist with the cross-validation folds of a preprocessed folder.

Keys (each a list for ``monai.data.load_decathlon_datalist(path, data_list_key=...)``):
``training`` (every scan), and per fold ``fold<k>_training``, ``fold<k>_validation`` (query scans) and
``fold<k>_support``. Items are ``{"image", "label", ("pseudolabel"), "id"}`` with paths relative to the
datalist file (``--absolute`` for absolute paths). Files are paired by id, never by position.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

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


def build_datalist(folder: str | os.PathLike[str], dataset: str | None = None, pseudolabels: str | None = None,
                   family: str = "qnet", subset: bool = False, relative_to: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The datalist as a dict; raises ``FsmisInputError`` naming any unpaired or missing file."""
    from fsmis_monai.data.datalist import pair_scans
    from fsmis_monai.data.registry import NUM_FOLDS, get_dataset, get_fold
    from fsmis_monai.io import FsmisInputError

    scans = pair_scans(folder, pseudolabel_dir=pseudolabels)

    def item(s) -> dict[str, Any]:
        d = s.as_dict()
        if relative_to is not None:
            for k in ("image", "label", "pseudolabel"):
                if k in d:
                    d[k] = os.path.relpath(d[k], relative_to)
        return d

    by_id = {s.scan_id: item(s) for s in scans}
    out: dict[str, Any] = {"name": Path(folder).name, "training": [by_id[i] for i in sorted(by_id)]}
    if dataset is None:
        return out
    desc = get_dataset(dataset)
    ids = None
    if subset:
        ids = sorted(by_id)
    else:
        missing = [i for i in desc.known_ids if i not in by_id]
        if missing:
            raise FsmisInputError(
                f"{folder}: the {desc.key} folds need image_<id>/label_<id> for ids {missing} (missing); "
                "use --subset to build folds over the scans present")
    out.update({"dataset": desc.key, "family": family, "folds": {}})
    for k in range(NUM_FOLDS):
        f = get_fold(desc, k, family, ids=ids)
        out["folds"][str(k)] = {"support_id": f.support_id, "query_ids": list(f.query_ids), "train_ids": list(f.train_ids)}
        out[f"fold{k}_training"] = [by_id[i] for i in f.train_ids if i in by_id]
        out[f"fold{k}_validation"] = [by_id[i] for i in f.query_ids if i in by_id]
        out[f"fold{k}_support"] = [by_id[f.support_id]]
    return out


def run(args: argparse.Namespace) -> int:
    from fsmis_monai.io import FsmisInputError, write_json

    output = Path(args.output) if args.output else Path(args.dir) / "datalist.json"
    try:
        datalist = build_datalist(args.dir, args.dataset, args.pseudolabels, args.family, args.subset,
                                  relative_to=None if args.absolute else output.resolve().parent)
    except (FsmisInputError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(output, datalist)
    print(f"{len(datalist['training'])} scans -> {output}")
    return 0

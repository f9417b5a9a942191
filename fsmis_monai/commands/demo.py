"""``fsmis demo``: segment a held-out sample scan with a bundle's shipped weights, through its ``inference.json``.

The out-of-the-box path of the README: no training, no download. The bundle's ``inference.json`` (MONAI's
``ConfigWorkflow``, exactly what ``python -m monai.bundle run`` runs) segments the sample CHAOS-T2 scan 2 (a
held-out query of fold 0, never seen in training) from the labelled sample scan 20 as the support, writes the
prediction NIfTI and prints its Dice against the sample label and the shipped weights' recorded figure.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from fsmis_monai.resources import shipped_dir

HELP = "segment a held-out sample scan with a bundle's shipped weights (inference.json) and print the Dice"
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_data" / "chaos_mr_t2"
#: fold 0 of CHAOS-T2 (Q-Net folds) holds scan 2 out of training; scan 20 (a training scan) is the support:
#: with scan 15 as the support the shipped Q-Net finds the liver of scan 2 poorly (EP1 0.21 against 0.72)
SUPPORT_ID, QUERY_ID = 20, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", default="qnet", help="bundle name (bundles/<name>) or a bundle folder")
    parser.add_argument("--class", dest="support_class", default="liver", help="organ: name or label value")
    parser.add_argument("--output", type=Path, default=Path("fsmis_demo"), help="prediction folder")
    parser.add_argument("--sample-dir", type=Path, default=SAMPLE_DIR,
                        help="folder with image_/label_<id>.nii.gz of the support and query scans")
    parser.add_argument("--support-id", type=int, default=SUPPORT_ID)
    parser.add_argument("--query-id", type=int, default=QUERY_ID)
    parser.add_argument("--threads", type=int, default=2)


def bundle_folder(name: str) -> Path:
    """``name`` as a folder, else the shipped bundle of that name; error naming the known bundles."""
    from fsmis_monai.io import FsmisInputError

    path = Path(name)
    if (path / "configs" / "inference.json").is_file():
        return path
    bundles = shipped_dir("bundles")
    if (bundles / name / "configs" / "inference.json").is_file():
        return bundles / name
    known = sorted(p.parent.name for p in bundles.glob("*/configs"))
    raise FsmisInputError(f"{name}: no such bundle (known: {known}, or a bundle folder)")


def run(args: argparse.Namespace) -> int:
    import nibabel as nib
    import numpy as np
    import torch
    from monai.bundle import ConfigWorkflow

    from fsmis_monai.data.contract import resolve_support_class
    from fsmis_monai.io import FsmisInputError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(max(1, args.threads))
    bundle = bundle_folder(args.bundle)
    model = bundle / "models" / "model.pt"
    if not model.is_file():
        raise FsmisInputError(f"{model}: this bundle ships no weights; train it (train.json) or pass a bundle that does")
    sample, out = args.sample_dir.resolve(), args.output.resolve()
    query = sample / f"image_{args.query_id}.nii.gz"
    configs = bundle / "configs"
    start = time.perf_counter()
    workflow = ConfigWorkflow(
        config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"), workflow_type="infer", bundle_root=str(bundle),
        dataset_dir=str(sample), query_glob=query.name, output_dir=str(out), device="$torch.device('cpu')",
        support_image=str(sample / f"image_{args.support_id}.nii.gz"),
        support_label=str(sample / f"label_{args.support_id}.nii.gz"), support_class=args.support_class,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    seconds = time.perf_counter() - start
    pred_file = out / f"image_{args.query_id}_seg.nii.gz"
    contract = workflow.parser.get_parsed_content("contract")
    labels = np.asarray(nib.load(sample / f"label_{args.query_id}.nii.gz").dataobj)
    key, value = resolve_support_class(contract, args.support_class, sample / f"label_{args.query_id}.nii.gz",
                                       np.unique(labels))
    raw = [v for v, c in contract.label_map.items() if c == value] if key == "label" else [value]
    truth = np.isin(labels, raw)
    pred = np.asarray(nib.load(pred_file).dataobj) > 0
    dice = 2.0 * (pred & truth).sum() / max(1, pred.sum() + truth.sum())
    print(f"{bundle.name}: {args.support_class} in scan {args.query_id} from support scan {args.support_id}, "
          f"whole scan, {seconds:.1f} s on CPU -> {pred_file}")
    print(f"Dice against the sample label: {dice:.3f}")
    return 0

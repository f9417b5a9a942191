"""Does ``KeepLargestConnectedComponentd`` help the few-shot predictions? (issue 12: the default of
``inference.json``'s ``keep_largest_component`` is chosen by this measurement)

Evaluates trained weights with their data contract on the ``whole`` protocol (every slice of each query
volume, per-volume Dice 2TP / (2TP + FP + FN)) through the project's evaluator, then scores each written
prediction again after MONAI's ``KeepLargestConnectedComponent`` (the transform ``inference.json`` applies,
full 3D connectivity) against the label prepared by the same contract. The Dice without it is recomputed
here too and must equal the evaluator's (a check of this bench's scoring).

Command (see bench/RESULTS.md; weights from ``fsmis quickstart --output /tmp/qs``, trained on scans 2 and 15):

    python bench/keep_largest_component.py --ckpt /tmp/qs/model.pt --queries 1 3 20 21 22
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

from fsmis_monai.data.contract import load_contract
from fsmis_monai.data.datalist import pair_scans
from fsmis_monai.data.registry import get_dataset
from fsmis_monai.evaluation.evaluator import load_scan
from fsmis_monai.evaluation.runner import run_evaluation

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chaos_mr_t2"


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    denom = pred.sum() + truth.sum()
    return float("nan") if denom == 0 else 2.0 * float((pred & truth).sum()) / float(denom)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="trained weights with data_contract.json beside")
    parser.add_argument("--method", default="adnet")
    parser.add_argument("--encoder", default="small")
    parser.add_argument("--support", type=int, default=15)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 3, 20, 21, 22])
    parser.add_argument("--dataset-dir", type=Path, default=DATA)
    args = parser.parse_args()
    torch.set_num_threads(2)
    desc = get_dataset("chaos")
    contract = load_contract(args.ckpt)
    files = {f.scan_id: f for f in pair_scans(args.dataset_dir, require_pseudolabels=False)}
    klcc = KeepLargestConnectedComponent(applied_labels=[1])
    with tempfile.TemporaryDirectory() as tmp:
        run_evaluation(args.dataset_dir, tmp, method=args.method, ckpt_path=args.ckpt,
                       method_kwargs={"encoder": args.encoder}, dataset="chaos", protocols=["whole"],
                       query_ids=args.queries, support_id=args.support, progress=False, overlay_slices=0)
        rows = list(csv.DictReader(open(Path(tmp) / "per_case.csv", encoding="utf-8")))
        results = []
        for qid in args.queries:
            label = load_scan(files[qid], desc, contract=contract).label
            for row in (r for r in rows if int(r["query_id"]) == qid):
                c = int(row["class_id"]) if "class_id" in row else desc.class_id(row["class"])
                pred = np.asarray(nib.load(Path(tmp) / "predictions" / "whole" / str(qid) / f"class_{c}.nii.gz")
                                  .dataobj) > 0
                truth = label == c
                kept = np.asarray(klcc(torch.as_tensor(pred[None].astype(np.uint8)))[0]) > 0
                before, after = dice(pred, truth), dice(kept, truth)
                assert abs(before - float(row["dice"])) < 1e-6, (qid, c, before, row["dice"])
                results.append((qid, desc.label_names[c], before, after, int(pred.sum()), int(kept.sum())))
    print(f"{args.method} ({args.encoder}) {args.ckpt}, support {args.support}, protocol whole")
    print("| query | class | Dice | Dice with largest component | voxels | kept |")
    print("|---|---|---|---|---|---|")
    for qid, name, before, after, n, k in results:
        print(f"| {qid} | {name} | {before:.4f} | {after:.4f} | {n} | {k} |")
    before = [r[2] for r in results if not np.isnan(r[2])]
    after = [r[3] for r in results if not np.isnan(r[3])]
    wins = sum(r[3] > r[2] + 1e-9 for r in results)
    losses = sum(r[3] < r[2] - 1e-9 for r in results)
    print(f"mean Dice {statistics.mean(before):.4f} -> {statistics.mean(after):.4f} "
          f"({len(results)} cases: {wins} better, {losses} worse)")
    for name in dict.fromkeys(r[1] for r in results):
        b = [r[2] for r in results if r[1] == name]
        a = [r[3] for r in results if r[1] == name]
        print(f"  {name}: {statistics.mean(b):.4f} -> {statistics.mean(a):.4f}")


if __name__ == "__main__":
    main()

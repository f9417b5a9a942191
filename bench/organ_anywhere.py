"""The organ wherever it is: oracle-free whole-scan segmentation beside EP1 (issue 23).

Trained weights (with the ``data_contract.json`` saved beside them) are evaluated on the held-out query
scans of each fold: EP1 (the query's labelled slices only: an oracle) and ``whole`` (every slice) without
any step, with each step of :mod:`fsmis_monai.transforms.whole_scan` alone and with their combinations.
All variants read the same predictions (one shared pass per query scan through the evaluator's own
functions: :func:`fsmis_monai.evaluation.evaluator.predict_query` and ``assemble``), so the table compares
the steps and nothing else. Dice is per volume (2TP / (2TP + FP + FN) over the scored slices), averaged per
class over the query scans; "FP slices" counts the slices holding a prediction but no label (summed over
scans and classes); "x EP1" is the mean Dice over the EP1 mean Dice of the same weights.

    python bench/organ_anywhere.py --ckpt runs/qnet/model.pt --method qnet --encoder small --folds 0
    python bench/organ_anywhere.py --ckpt cmr.pt --dataset cmr --dataset-dir ../shared/data/cmr_bssfp --folds 0 1 2

Prints a Markdown table (bench/RESULTS.md "organ anywhere").
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from fsmis_monai.data.contract import load_contract
from fsmis_monai.data.datalist import pair_scans
from fsmis_monai.evaluation.evaluator import (FewShotEvaluator, assemble, load_scan, predict_query,
                                              to_channels)
from fsmis_monai.evaluation.metrics import confusion_counts, dice_from_counts
from fsmis_monai.evaluation.protocols import make_plan, merge_requests
from fsmis_monai.evaluation.runner import build_model
from fsmis_monai.transforms.whole_scan import SupportPrior, WholeScanSteps

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chaos_mr_t2"
#: the whole-scan variants measured, by the steps they use
VARIANTS: dict[str, tuple[str, ...]] = {
    "whole": (),
    "whole + range": ("range",),
    "whole + presence": ("presence",),
    "whole + consistency": ("consistency",),
    "whole + range + presence": ("range", "presence"),
    "whole + range + consistency": ("range", "consistency"),
    "whole + all three": ("range", "presence", "consistency"),
}


def fp_slices(pred: np.ndarray, truth: np.ndarray) -> int:
    """Slices with a prediction and no label."""
    return int((pred.any(axis=(0, 1)) & ~truth.any(axis=(0, 1))).sum())


def measure(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """{row: {class name: [Dice per query]}} and FP slice counts under the key ``"_fp"``; the class names."""
    model = build_model(args.method, args.ckpt, {"encoder": args.encoder}).eval()
    contract = load_contract(args.ckpt)
    ev = FewShotEvaluator(model, args.dataset_dir, dataset=args.dataset, family=args.family,
                          protocols=("ep1", "whole"), contract=contract, device="cpu", progress=False)
    files = {f.scan_id: f for f in pair_scans(args.dataset_dir, require_pseudolabels=False)}
    options = dict(margin=args.margin, min_confidence=args.min_confidence, area_factor=args.area_factor,
                   relative_confidence=args.relative_confidence)
    variants = {"EP1 (oracle)": None, **{k: WholeScanSteps(v, **options) for k, v in VARIANTS.items()}}
    dice: dict = defaultdict(lambda: defaultdict(list))
    fps: dict = defaultdict(int)
    for fold in args.folds:
        support_id, query_ids, _ = ev._fold_setup(fold)
        support = load_scan(files[support_id], ev.desc, contract=ev.contract)
        support_image, states = to_channels(support.image), {}
        priors = {c: SupportPrior.from_volume(support.image, support.label == c) for c in ev.classes}
        for qid in (args.queries or query_ids):
            query = load_scan(files[qid], ev.desc, contract=ev.contract)
            plans = {c: {p: make_plan(p, query.label == c, support.label == c) for p in ("ep1", "whole")}
                     for c in ev.classes}
            requests = {(c, g): zs for c in ev.classes for g, zs in merge_requests(list(plans[c].values())).items()}
            cached = None if args.cache is None else args.cache / f"fold{fold}_query{qid}.pt"
            if cached is not None and cached.is_file():  # the same weights' pass, kept to try other settings
                shared = torch.load(cached, weights_only=True)
            else:
                shared = predict_query(model, ev.inferer, to_channels(query.image), support_image, support.label,
                                       requests, states=states)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(shared, cached)
            for c in ev.classes:
                preds = {g: shared[(k, g)] for k, g in requests if k == c}
                truth = query.label == c
                for row, steps in variants.items():
                    plan = plans[c]["ep1" if steps is None else "whole"]
                    vol = assemble(plan, preds, truth.shape, query.image, priors[c], steps).astype(bool)
                    tp, fp, fn = confusion_counts(vol, truth, plan.scored)
                    if tp + fp + fn:
                        dice[row][ev.desc.class_name(c)].append(dice_from_counts(tp, fp, fn))
                    fps[row] += fp_slices(vol & plan.scored[None, None, :], truth)
            print(f"fold {fold} query {qid} done", flush=True)
    return {"dice": dice, "fp": fps}, [ev.desc.class_name(c) for c in ev.classes]


def table(results: dict, names: list[str]) -> str:
    dice, fps = results["dice"], results["fp"]
    mean = {row: statistics.mean(statistics.mean(v[n]) for n in names if v[n]) for row, v in dice.items()}
    ep1 = mean["EP1 (oracle)"]
    lines = ["| protocol | " + " | ".join(names) + " | mean | x EP1 | FP slices |",
             "|---" * (len(names) + 4) + "|"]
    for row, v in dice.items():
        cells = [f"{statistics.mean(v[n]):.3f}" if v[n] else "-" for n in names]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {mean[row]:.3f} | {mean[row] / ep1:.2f} | {fps[row]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="trained weights with data_contract.json beside")
    parser.add_argument("--method", default="qnet")
    parser.add_argument("--encoder", default="small")
    parser.add_argument("--dataset", default="chaos")
    parser.add_argument("--dataset-dir", type=Path, default=DATA)
    parser.add_argument("--family", default="qnet", choices=("qnet", "adnet", "alp"))
    parser.add_argument("--folds", type=int, nargs="+", default=[0])
    parser.add_argument("--queries", type=int, nargs="*", default=None, help="restrict each fold's query scans")
    parser.add_argument("--margin", type=float, default=WholeScanSteps.margin)
    parser.add_argument("--min-confidence", type=float, default=WholeScanSteps.min_confidence)
    parser.add_argument("--area-factor", type=float, default=WholeScanSteps.area_factor)
    parser.add_argument("--relative-confidence", type=float, default=WholeScanSteps.relative_confidence)
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder keeping each query's predictions (one checkpoint per folder): reruns with "
                             "other step settings skip the network")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results, names = measure(args)
    print(f"\n{args.method} ({args.encoder}) {args.ckpt}, {args.dataset} folds {args.folds} ({args.family}), "
          f"margin {args.margin}, min_confidence {args.min_confidence}, relative_confidence "
          f"{args.relative_confidence}, area_factor {args.area_factor}\n")
    print(table(results, names))


if __name__ == "__main__":
    main()

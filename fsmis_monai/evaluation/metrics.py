"""Dice accounting of the volumetric protocols.

Dice of one (query scan, class, protocol) = 2TP / (2TP + FP + FN) with TP/FP/FN summed over the
protocol's scored slices (every reference repository scores per volume, docs/reference.md#dice-accounting). The counts
come from MONAI's :func:`~monai.metrics.get_confusion_matrix` and the Dice from its F1 score
(:func:`~monai.metrics.compute_confusion_matrix_metric`), which is the same quantity. Class Dice = mean
over query scans, protocol Dice = mean over classes, folds = mean and standard deviation of those.

Which cases have a Dice:

- whole-volume protocols (``whole``, ``ep2``: every query slice predicted and scored): a query volume without
  the class on which the network predicts false positives scores 2TP / (2TP + FP + FN) = 0 and is averaged
  like any case (as ADNet scores EP2: the Dice of the volume, docs/reference.md#adnet-ep1-and-ep2). Only a volume with
  neither ground truth nor prediction is undefined.
- oracle protocols (``alp``, ``ep1``, ``senet``: only the organ's slices are scored): a query without the class
  gives nothing to score, so its Dice is undefined.

An undefined case is reported with ``status="empty_ground_truth"`` (and its FP count), ``dice`` is NaN and
it is left out of the means and counted separately, never averaged silently.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix

from fsmis_monai.evaluation.protocols import ORACLE_PROTOCOLS

STATUS_OK = "ok"
STATUS_EMPTY = "empty_ground_truth"


@dataclass
class CaseResult:
    """One row of ``per_case.csv``."""

    fold: int
    query_id: int
    support_id: int
    class_id: int
    class_name: str
    protocol: str
    dice: float
    tp: int
    fp: int
    fn: int
    scored_slices: int
    predicted_slices: int
    status: str

    def as_row(self) -> dict:
        row = asdict(self)
        row["class"] = row.pop("class_id")
        return row

    @classmethod
    def from_row(cls, row: dict) -> "CaseResult":
        row = dict(row)
        row["class_id"] = row.pop("class")
        return cls(**row)


def confusion_counts(pred: np.ndarray, truth: np.ndarray, scored: np.ndarray) -> tuple[int, int, int]:
    """TP, FP, FN of binary volumes [..., Z] summed over the slices where ``scored`` [Z] is true."""
    scored = np.asarray(scored, bool)
    if not scored.any():
        return 0, 0, 0
    p = torch.as_tensor(np.ascontiguousarray(np.asarray(pred, bool)[..., scored]))[None, None]
    t = torch.as_tensor(np.ascontiguousarray(np.asarray(truth, bool)[..., scored]))[None, None]
    cm = get_confusion_matrix(p.to(torch.float64), t.to(torch.float64))[0, 0]  # tp, fp, tn, fn
    return int(cm[0]), int(cm[1]), int(cm[3])


def dice_from_counts(tp: int, fp: int, fn: int, smooth: float = 0.0) -> float:
    """2TP / (2TP + FP + FN) (MONAI's F1 score); NaN when undefined. ``smooth`` is LSLPN's +0.001 (faithful)."""
    if smooth:
        return (2.0 * tp + smooth) / (2.0 * tp + fp + fn + smooth)
    cm = torch.tensor([[tp, fp, 0, fn]], dtype=torch.float64)
    return float(compute_confusion_matrix_metric("f1 score", cm)[0])


def case_status(tp: int, fn: int, fp: int = 0, protocol: str | None = None) -> str:
    """``"ok"`` when the case has a Dice: ground truth on the scored slices, or (whole-volume protocols,
    ``protocol`` not an oracle one) a prediction there; else ``"empty_ground_truth"`` (see the module docstring)."""
    if tp + fn > 0:
        return STATUS_OK
    whole_volume = protocol is not None and protocol not in ORACLE_PROTOCOLS
    return STATUS_OK if whole_volume and fp > 0 else STATUS_EMPTY


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, float)
    return float(arr.mean()), float(arr.std())


def summarize_cases(cases: Iterable[CaseResult]) -> dict:
    """Per fold: class Dice (mean/std over scans), protocol Dice (mean over classes); across folds: mean/std.

    Layout::

        {"folds": {fold: {protocol: {"classes": {cls: {mean, std, n, n_empty}}, "mean": m}}},
         "protocols": {protocol: {"mean": m, "std_over_folds": s, "classes": {cls: {mean, std_over_folds}},
                                  "n_cases": n, "n_empty": e}}}
    """
    cases = list(cases)
    folds = sorted({c.fold for c in cases})
    protocols = list(dict.fromkeys(c.protocol for c in cases))
    classes = sorted({c.class_id for c in cases})
    names = {c.class_id: c.class_name for c in cases}
    per_fold: dict = {}
    for f in folds:
        per_fold[str(f)] = {}
        for p in protocols:
            cls_stats = {}
            for k in classes:
                sel = [c for c in cases if c.fold == f and c.protocol == p and c.class_id == k]
                if not sel:
                    continue
                ok = [c.dice for c in sel if c.status == STATUS_OK]
                m, s = _mean_std(ok)
                cls_stats[str(k)] = {"name": names[k], "mean": m, "std": s, "n": len(ok), "n_empty": len(sel) - len(ok)}
            defined = [v["mean"] for v in cls_stats.values() if not math.isnan(v["mean"])]
            per_fold[str(f)][p] = {"classes": cls_stats, "mean": _mean_std(defined)[0]}
    overall: dict = {}
    for p in protocols:
        fold_means = [per_fold[str(f)][p]["mean"] for f in folds if p in per_fold[str(f)]]
        fold_means = [v for v in fold_means if not math.isnan(v)]
        m, s = _mean_std(fold_means)
        cls_over: dict = {}
        for k in classes:
            vals = [per_fold[str(f)][p]["classes"][str(k)]["mean"] for f in folds
                    if str(k) in per_fold[str(f)][p]["classes"]]
            vals = [v for v in vals if not math.isnan(v)]
            cm, cs = _mean_std(vals)
            cls_over[str(k)] = {"name": names[k], "mean": cm, "std_over_folds": cs}
        sel = [c for c in cases if c.protocol == p]
        overall[p] = {"mean": m, "std_over_folds": s, "classes": cls_over, "n_cases": len(sel),
                      "n_empty": sum(c.status != STATUS_OK for c in sel)}
    return {"folds": per_fold, "protocols": overall}

"""Protocol parity: for fixed predictions, each protocol's Dice equals a plain-NumPy computation written here
from the definitions in docs/reference.md#evaluation-protocols (not from the evaluator's code), on real CHAOS scans."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from _evaluation_data import THRESHOLD, SupportMaskModel, load, ref_case, subsampled_scans, zscore
from fsmis_monai.evaluation import evaluate
from fsmis_monai.evaluation.protocols import fraction_picks, linspace_bounds
from fsmis_monai.evaluation.report import read_per_case_csv


def test_reference_chunk_arithmetic():
    """The worked examples of docs/reference.md#q-net-family-protocol (C = labelled support slices, C_q = labelled query
    slices)."""
    assert fraction_picks(11) == [1, 5, 9]
    assert fraction_picks(14) == [2, 7, 11]
    assert fraction_picks(24) == [4, 12, 20]
    assert linspace_bounds(11).tolist() == [0, 3, 7, 11]
    assert linspace_bounds(24).tolist() == [0, 8, 16, 24]
    # ALP's chunk-centre formula and the Q-Net scripts' literal [1/6, 1/2, 5/6] agree for every C
    for c in range(1, 400):
        assert fraction_picks(c) == [int(p * c) for p in (1 / 6, 0.5, 5 / 6)], c


@pytest.mark.parametrize("faithful", [False, True])
def test_protocol_dice_parity_on_chaos(chaos_dir, tmp_path, faithful):
    support_id = 3
    # faithful SENet needs >= 12 organ slices in the support (the reference crashes otherwise): liver only
    query_ids, classes = ((1, 2), (1, 2, 3, 4)) if not faithful else ((1,), (1,))
    chaos_dir = subsampled_scans(chaos_dir, tmp_path / "data", (support_id, *query_ids))  # 128 x 128 in-plane
    protocols = ("alp", "ep1", "ep2", "senet", "whole")
    out = tmp_path / "eval"
    summary = evaluate(SupportMaskModel(), chaos_dir, dataset="chaos", fold=0, family="qnet", protocols=protocols,
                       output_dir=out, query_ids=query_ids, classes=classes, faithful=faithful, progress=False,
                       overlay_slices=0, whole_scan_steps=[])  # the plans alone; the steps: transforms/test_whole_scan
    rows = {(int(r["query_id"]), int(r["class"]), r["protocol"]): r for r in read_per_case_csv(out / "per_case.csv")}
    assert len(rows) == len(query_ids) * len(classes) * len(protocols)
    _, s_lbl = load(chaos_dir, support_id)
    expected: dict = {}
    for qid in query_ids:
        q_img, q_lbl = load(chaos_dir, qid)
        assert np.abs(zscore(q_img.astype(np.float64)) - THRESHOLD).min() > 1e-5  # no float near-ties
        for c in classes:
            for p in protocols:
                dice, tp, fp, fn, n_scored, n_pred, pred = ref_case(p, q_img, q_lbl == c, s_lbl == c, faithful)
                r = rows[(qid, c, p)]
                assert (int(r["tp"]), int(r["fp"]), int(r["fn"])) == (tp, fp, fn), (qid, c, p)
                assert int(r["scored_slices"]) == n_scored and int(r["predicted_slices"]) == n_pred
                assert int(r["support_id"]) == support_id
                assert abs(float(r["dice"]) - dice) < 1e-9, (qid, c, p)
                expected.setdefault((p, c), []).append(dice)
                saved = np.asarray(nib.load(str(out / "predictions" / p / str(qid) / f"class_{c}.nii.gz")).dataobj)
                np.testing.assert_array_equal(saved, pred.astype(np.uint8))
    for p in protocols:
        class_means = [np.mean(expected[(p, c)]) for c in classes]
        for c, m in zip(classes, class_means):
            assert abs(summary["protocols"][p]["classes"][str(c)]["mean"] - m) < 1e-9
        assert abs(summary["protocols"][p]["mean"] - np.mean(class_means)) < 1e-9


def test_faithful_senet_refuses_short_support_range(chaos_dir, tmp_path):
    """Support scan 3's right kidney spans fewer than 12 slices over 200 pixels: the released LSLPN
    evaluation indexes an empty chunk there; the faithful mode says so instead of inventing a slice."""
    from fsmis_monai.io import FsmisInputError

    with pytest.raises(FsmisInputError, match="chunk 0 of 12 empty"):
        evaluate(SupportMaskModel(), chaos_dir, fold=0, protocols=("senet",), query_ids=(1,), classes=(2,),
                 faithful=True, progress=False)


def test_empty_ground_truth_is_reported(cmr_dir, tmp_path):
    """A query scan without the class: oracle protocols score nothing (flagged, left out of the means, never
    averaged as NaN); under ep2/whole its false positives score Dice 0 and the case is averaged."""
    data = tmp_path / "data"
    data.mkdir()
    for sid in (1, 2):
        for kind in ("image", "label"):
            (data / f"{kind}_{sid}.nii.gz").symlink_to(cmr_dir / f"{kind}_{sid}.nii.gz")
    lbl_img = nib.load(str(cmr_dir / "label_3.nii.gz"))
    lbl = np.asarray(lbl_img.dataobj).copy()
    lbl[lbl == 600] = 0  # remove the right ventricle (class 3) from query 3
    nib.save(nib.Nifti1Image(lbl, lbl_img.affine, lbl_img.header), str(data / "label_3.nii.gz"))
    (data / "image_3.nii.gz").symlink_to(cmr_dir / "image_3.nii.gz")

    out = tmp_path / "eval"
    summary = evaluate(SupportMaskModel(), data, dataset="cmr", fold=0, protocols=("alp", "ep1", "ep2", "senet", "whole"),
                       output_dir=out, support_id=1, query_ids=(2, 3), classes=(2, 3), progress=False, overlay_slices=0,
                       whole_scan_steps=[])
    rows = {(int(r["query_id"]), int(r["class"]), r["protocol"]): r for r in read_per_case_csv(out / "per_case.csv")}
    q_img, _ = load(cmr_dir, 3)
    _, s_lbl = load(cmr_dir, 1)
    for p in ("alp", "ep1", "senet"):
        r = rows[(3, 3, p)]
        assert r["status"] == "empty_ground_truth" and r["dice"] == "" and int(r["scored_slices"]) == 0
    for p in ("ep2", "whole"):
        r = rows[(3, 3, p)]
        _, tp, fp, fn, n_scored, _, _ = ref_case(p, q_img, lbl == 600, s_lbl == 600)
        assert r["status"] == "ok" and float(r["dice"]) == 0.0  # 2TP / (2TP + FP + FN) with TP = 0 < FP
        assert (int(r["tp"]), int(r["fp"]), int(r["fn"]), int(r["scored_slices"])) == (0, fp, 0, n_scored) and fp > 0
    for p, stats in summary["protocols"].items():
        whole_volume = p in ("ep2", "whole")
        assert stats["n_empty"] == (0 if whole_volume else 1)
        # class 3: query 2's Dice, averaged with query 3's 0 under the whole-volume protocols
        q2 = float(rows[(2, 3, p)]["dice"])
        assert stats["classes"]["3"]["mean"] == pytest.approx(q2 / 2 if whole_volume else q2, abs=1e-12)
        assert math.isfinite(stats["mean"])
        fold = summary["folds"]["0"][p]["classes"]["3"]
        assert (fold["n"], fold["n_empty"]) == ((2, 0) if whole_volume else (1, 1))
    assert "no ground truth on the scored slices" in (out / "summary.md").read_text()


def test_whole_volume_dice_rule():
    """Only whole/ep2 score a volume without ground truth, and only when something was predicted."""
    from fsmis_monai.evaluation.metrics import case_status, dice_from_counts

    for p in ("whole", "ep2"):
        assert case_status(0, 0, 770246, p) == "ok" and dice_from_counts(0, 770246, 0) == 0.0
        assert case_status(0, 0, 0, p) == "empty_ground_truth"
    for p in ("ep1", "alp", "senet"):
        assert case_status(0, 0, 12, p) == "empty_ground_truth"
    assert case_status(3, 1, 0, "ep1") == "ok"


def test_summary_means_over_scans_classes_and_folds():
    """Class Dice = mean over query scans, protocol Dice = mean over classes, folds: mean and std of those."""
    from fsmis_monai.evaluation.metrics import CaseResult, summarize_cases

    rng = np.random.default_rng(0)
    dice = {(f, q, c): float(rng.uniform(0.2, 0.9)) for f in (0, 1) for q in (1, 2, 3) for c in (1, 4)}
    cases = [CaseResult(f, q, 9, c, f"c{c}", "ep1", d, 1, 1, 1, 3, 3, "ok") for (f, q, c), d in dice.items()]
    cases.append(CaseResult(1, 5, 9, 4, "c4", "ep1", float("nan"), 0, 7, 0, 30, 30, "empty_ground_truth"))
    s = summarize_cases(cases)
    fold_means = []
    for f in (0, 1):
        cls = [np.mean([dice[(f, q, c)] for q in (1, 2, 3)]) for c in (1, 4)]
        assert s["folds"][str(f)]["ep1"]["mean"] == pytest.approx(np.mean(cls), abs=1e-12)
        fold_means.append(np.mean(cls))
    assert s["protocols"]["ep1"]["mean"] == pytest.approx(np.mean(fold_means), abs=1e-12)
    assert s["protocols"]["ep1"]["std_over_folds"] == pytest.approx(np.std(fold_means), abs=1e-12)
    c4 = [np.mean([dice[(f, q, 4)] for q in (1, 2, 3)]) for f in (0, 1)]
    assert s["protocols"]["ep1"]["classes"]["4"]["std_over_folds"] == pytest.approx(np.std(c4), abs=1e-12)
    assert s["folds"]["1"]["ep1"]["classes"]["4"]["n_empty"] == 1 and s["protocols"]["ep1"]["n_empty"] == 1


def test_bad_inputs_are_named(chaos_dir, tmp_path):
    from fsmis_monai.io import FsmisInputError

    data = tmp_path / "data"
    data.mkdir()
    for kind in ("image", "label"):
        (data / f"{kind}_1.nii.gz").symlink_to(chaos_dir / f"{kind}_1.nii.gz")
    with pytest.raises(FsmisInputError, match=r"needs scans \[3, 2, 5, 8\]"):  # fold 0: support 3, queries 2, 5, 8
        evaluate(SupportMaskModel(), data, fold=0, progress=False)
    with pytest.raises(ValueError, match="unknown protocol 'ep3'"):
        evaluate(SupportMaskModel(), data, fold=0, protocols="ep1,ep3", progress=False)

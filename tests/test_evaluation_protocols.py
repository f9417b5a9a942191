"""Protocol parity: for fixed predictions, each protocol's Dice equals a plain-NumPy computation written here
from the definitions in methods.md section 3 (not from the evaluator's code), on real CHAOS scans."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fsmis_monai.evaluation import evaluate
from fsmis_monai.evaluation.protocols import fraction_picks, linspace_bounds
from fsmis_monai.evaluation.report import read_per_case_csv
from fsmis_monai.networks.methods.base import FewShotSegmenter

THRESHOLD = 0.5  # the fake model's fixed intensity threshold on the z-scored query


class SupportMaskModel(FewShotSegmenter):
    """Fixed predictions: the support slice's mask wherever the z-scored query is brighter than 0.5.

    The prediction of query slice z therefore depends on which support slice the protocol pairs it with
    and on the query slice itself, so wrong support picks, chunks or slice bookkeeping change the Dice.
    """

    name = "support_mask"

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.calls = 0
        self.fail_after = fail_after

    def encode_support(self, support_images, support_masks):
        return {"mask": support_masks.amax(0)}

    def segment(self, query_images, state):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        fg = state["mask"][None] * (query_images[:, 0] > THRESHOLD).float()
        return torch.stack([1 - fg, fg], 1)


# ------------------------------------------------- independent reference (methods.md section 3)


def zscore(x):
    return (x - x.mean()) / x.std()


def labelled(mask):
    return [z for z in range(mask.shape[2]) if mask[:, :, z].sum() > 0]


def picks_3(support_mask):
    c = labelled(support_mask)
    return [c[int(p * len(c))] for p in (1 / 6, 0.5, 5 / 6)]


def ref_assignment(protocol, q_mask, s_mask, faithful=False):
    """(support slice per predicted query slice {z: s}, scored slice list, Dice smoothing)."""
    depth = q_mask.shape[2]
    if protocol == "ep2":
        c = labelled(s_mask)
        return {z: c[int(0.5 * len(c))] for z in range(depth)}, list(range(depth)), 0.0
    if protocol == "ep1":
        sup, q = picks_3(s_mask), labelled(q_mask)
        idx = np.linspace(0, len(q), 4).astype(int)
        return {q[i]: sup[k] for k in range(3) for i in range(idx[k], idx[k + 1])}, q, 0.0
    if protocol == "alp":
        sup, q = picks_3(s_mask), labelled(q_mask)
        zmin, zmax = min(q), max(q)
        assign = {}
        for z in range(depth):
            part = int((z - zmin) // ((zmax - zmin) / 3))
            assign[z] = sup[min(max(part, 0), 2)]
        return assign, list(range(zmin, zmax + 1)), 0.0
    if protocol == "whole":
        sup = picks_3(s_mask)
        sd = s_mask.shape[2]
        assign = {}
        for z in range(depth):
            d = [abs(z / (depth - 1) - s / (sd - 1)) for s in sup]
            assign[z] = sup[d.index(min(d))]
        return assign, list(range(depth)), 0.0
    if protocol == "senet":
        def organ_range(m):
            last = m.shape[2] - 1 if faithful else m.shape[2]
            idx = [z for z in range(last) if m[:, :, z].sum() > 200]
            return list(range(idx[0], idx[-1] + (0 if faithful else 1)))

        s_rng, q_rng, n = organ_range(s_mask), organ_range(q_mask), 12
        assign = {}
        for i in range(n):
            s_chunk = s_rng[math.floor(i / n * len(s_rng)):math.floor((i + 1) / n * len(s_rng))]
            q_chunk = q_rng[math.floor(i / n * len(q_rng)):math.floor((i + 1) / n * len(q_rng))]
            if s_chunk:
                s = s_chunk[len(s_chunk) // 2]
            else:  # documented fallback of the corrected protocol: the chunk's centre position
                s = s_rng[min(math.floor((i + 0.5) / n * len(s_rng)), len(s_rng) - 1)]
            for z in q_chunk:
                assign[z] = s
        return assign, q_rng, 0.001 if faithful else 0.0
    raise ValueError(protocol)


def ref_case(protocol, q_img, q_mask, s_mask, faithful=False):
    assign, scored, smooth = ref_assignment(protocol, q_mask, s_mask, faithful)
    zq = zscore(q_img.astype(np.float64))
    pred = np.zeros(q_mask.shape, bool)
    for z, s in assign.items():
        pred[:, :, z] = s_mask[:, :, s] & (zq[:, :, z] > THRESHOLD)
    p, t = pred[:, :, scored], q_mask[:, :, scored]
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    if smooth:
        return (2 * tp + smooth) / (2 * tp + fp + fn + smooth), tp, fp, fn, len(scored), len(assign), pred
    dice = 2 * tp / (2 * tp + fp + fn) if tp + fn > 0 else float("nan")
    return dice, tp, fp, fn, len(scored), len(assign), pred


def load(folder: Path, sid: int):
    img = np.asarray(nib.load(str(folder / f"image_{sid}.nii.gz")).dataobj)
    lbl = np.asarray(nib.load(str(folder / f"label_{sid}.nii.gz")).dataobj)
    return img, lbl


# ------------------------------------------------------------------------------------------ tests


def test_reference_chunk_arithmetic():
    """The worked examples of methods.md 3.3 (C = labelled support slices, C_q = labelled query slices)."""
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
    protocols = ("alp", "ep1", "ep2", "senet", "whole")
    out = tmp_path / "eval"
    summary = evaluate(SupportMaskModel(), chaos_dir, dataset="chaos", fold=0, family="qnet", protocols=protocols,
                       output_dir=out, query_ids=query_ids, classes=classes, faithful=faithful, progress=False,
                       overlay_slices=0)
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
    """A query scan without the class: oracle protocols score nothing, ep2/whole count the false positives;
    the case is flagged, left out of the means and never averaged as NaN."""
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
                       output_dir=out, support_id=1, query_ids=(2, 3), classes=(2, 3), progress=False, overlay_slices=0)
    rows = {(int(r["query_id"]), int(r["class"]), r["protocol"]): r for r in read_per_case_csv(out / "per_case.csv")}
    q_img, _ = load(cmr_dir, 3)
    _, s_lbl = load(cmr_dir, 1)
    for p in ("alp", "ep1", "senet"):
        r = rows[(3, 3, p)]
        assert r["status"] == "empty_ground_truth" and r["dice"] == "" and int(r["scored_slices"]) == 0
    for p in ("ep2", "whole"):
        r = rows[(3, 3, p)]
        _, tp, fp, fn, n_scored, _, _ = ref_case(p, q_img, lbl == 600, s_lbl == 600)
        assert r["status"] == "empty_ground_truth" and r["dice"] == ""
        assert (int(r["tp"]), int(r["fp"]), int(r["fn"]), int(r["scored_slices"])) == (0, fp, 0, n_scored) and fp > 0
    for p, stats in summary["protocols"].items():
        assert stats["n_empty"] == 1
        # class 3 has one defined case (query 2) and the mean over classes is finite
        assert stats["classes"]["3"]["mean"] == pytest.approx(float(rows[(2, 3, p)]["dice"]), abs=1e-12)
        assert math.isfinite(stats["mean"])
        fold = summary["folds"]["0"][p]["classes"]["3"]
        assert (fold["n"], fold["n_empty"]) == (1, 1)
    assert "no ground truth on the scored slices" in (out / "summary.md").read_text()

"""The oracle-free whole-scan steps (``fsmis_monai.transforms.whole_scan``) on real CHAOS-T2 scans with a known
answer, and their equality across evaluation and inference:

- ``range``: support scan 3 (fold 0's support) and query scan 2, every class: the support-guided range covers
  every labelled slice of the query (margin 0.2) and, for the short organs, leaves slices out;
- ``presence``: no trained model is available in the tests, so the evidence is a SYNTHETIC DETERMINISTIC
  method, stated here: foreground probability 0.95 on the query's liver and 0.55 on a false-positive patch of
  the same size in every slice (weak evidence). With the liver erased from the query only the weak patch is
  left and the step rejects every slice; with the liver, exactly the liver is kept;
- ``consistency``: the liver plus a larger, less confident false-positive blob: the step keeps the liver,
  where MONAI's ``KeepLargestConnectedComponent`` keeps the blob;
- ``anchor``: a hand-built volume whose answer is drawn by construction (a shrinking disc painted on one
  slice, a look-alike disc elsewhere, a neighbour touching the organ's end and one out of reach): the painted
  slice is the paint, the look-alike and the unreachable neighbour are dropped; the transform applies it only
  to the query read from the painted scan's file (through a link, as the app's query folder holds it);
- the evaluator's ``whole`` protocol (``assemble``) and the inference post-processing (``WholeScanStepsd`` in
  ``prediction_postprocessing``) give the same voxels from the same logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import KeepLargestConnectedComponent
from scipy import ndimage

from fsmis_monai.data.datalist import pair_scans
from fsmis_monai.data.registry import get_dataset
from fsmis_monai.evaluation.evaluator import assemble, load_scan
from fsmis_monai.evaluation.protocols import make_plan
from fsmis_monai.transforms.whole_scan import (DEFAULT_STEPS, STEPS, SupportPrior, WholeScanSteps, WholeScanStepsd,
                                               anchored_components, body_mask, check_steps, slice_range)

LIVER = 1


@pytest.fixture(scope="module")
def scans(chaos_dir):
    """Support scan 3 and query scan 2, full depth, z-scored at the stored grid."""
    desc = get_dataset("chaos")
    files = {f.scan_id: f for f in pair_scans(chaos_dir, require_pseudolabels=False) if f.scan_id in (2, 3)}
    return load_scan(files[3], desc), load_scan(files[2], desc)


def _synthetic_evidence(label: np.ndarray) -> np.ndarray:
    """The synthetic method: 0.95 on the liver, 0.55 on a 20 x 20 patch in a corner of every slice, 0.05 elsewhere."""
    prob = np.full(label.shape, 0.05, np.float32)
    prob[:20, :20, :] = 0.55
    prob[label == LIVER] = 0.95
    return prob


def test_range_covers_every_labelled_query_slice(scans):
    support, query = scans
    body = body_mask(query.image)
    for c, name in enumerate(("liver", "right kidney", "left kidney", "spleen"), start=1):
        prior = SupportPrior.from_volume(support.image, support.label == c)
        inside = slice_range(prior, body, margin=0.2)
        labelled = (query.label == c).any(axis=(0, 1))
        assert labelled.any()
        assert not (labelled & ~inside).any(), f"{name}: labelled slices {np.flatnonzero(labelled & ~inside)} cut"
        if c != LIVER:  # the kidneys and the spleen lie in part of the scan: slices are left out
            assert (~inside).sum() >= 5, name


def test_presence_rejects_a_query_whose_organ_was_erased(scans):
    support, query = scans
    prior = SupportPrior.from_volume(support.image, support.label == LIVER)
    erased_label = np.where(query.label == LIVER, 0, query.label)
    erased_image = np.where(query.label == LIVER, float(np.median(query.image)), query.image)
    presence = WholeScanSteps(("presence",))
    weak = _synthetic_evidence(erased_label)
    assert (weak > 0.5).any()  # without the step the patch is predicted on every slice
    assert not presence(weak, erased_image, prior).any()
    kept = presence(_synthetic_evidence(query.label), query.image, prior).any(axis=(0, 1))
    liver = (query.label == LIVER).sum(axis=(0, 1))
    assert not kept[liver == 0].any()  # the weak patch alone: rejected
    assert kept[liver >= 1000].all()  # the liver's confident evidence: kept (the patch with it, slice-level)


def test_consistency_keeps_the_confident_component_not_the_largest(scans):
    _, query = scans
    liver = query.label == LIVER
    zs = np.flatnonzero(liver.any(axis=(0, 1)))
    prob = np.where(liver, 0.95, 0.05).astype(np.float32)
    xs = np.flatnonzero(liver.any(axis=(1, 2)))
    blob = np.zeros_like(liver)  # a block beside the liver (other side of the body), larger than the liver
    if xs[0] > liver.shape[0] - xs[-1]:
        blob[: xs[0] - 5, 40:-40, zs[0] : zs[-1] + 1] = True
    else:
        blob[xs[-1] + 5 :, 40:-40, zs[0] : zs[-1] + 1] = True
    assert blob.sum() > liver.sum() and not (ndimage.binary_dilation(blob) & liver).any()
    prob[blob] = 0.7
    largest = KeepLargestConnectedComponent(applied_labels=[1])(torch.as_tensor((prob > 0.5)[None]))[0].numpy()
    assert largest.astype(bool)[blob].all()  # what inference kept before: the false positive
    kept = WholeScanSteps(("consistency",))(prob, query.image, None)
    np.testing.assert_array_equal(kept, liver)


@pytest.mark.parametrize("chosen", [STEPS, DEFAULT_STEPS], ids=["all", "default"])
def test_evaluation_and_inference_apply_the_same_steps(scans, chosen):
    support, query = scans
    c = 4  # spleen
    rng = np.random.default_rng(0)
    margins = rng.normal(0.0, 3.0, query.label.shape).astype(np.float32)
    margins[query.label == c] += 4.0
    plan = make_plan("whole", query.label == c, support.label == c)
    predictions = {g: {int(z): margins[..., z] for z in range(margins.shape[-1])} for g in plan.support_groups}
    prior = SupportPrior.from_volume(support.image, support.label == c)
    steps = WholeScanSteps(chosen)
    evaluated = assemble(plan, predictions, margins.shape, query.image, prior, steps).astype(bool)

    logits = torch.stack([torch.zeros(margins.shape), torch.as_tensor(margins)])  # [2, H, W, D]: fg - bg = margin
    out = WholeScanStepsd("pred", prior=prior.to_dict(), steps=chosen)(
        {"pred": logits, "image": torch.as_tensor(query.image)[None]})
    inferred = out["pred"].argmax(0).numpy().astype(bool)
    np.testing.assert_array_equal(evaluated, inferred)
    raw = margins > 0
    assert evaluated.sum() < raw.sum()  # the steps did something on this input
    # switched off: the argmax, as the oracle protocols and the published numbers use it
    off = assemble(plan, predictions, margins.shape, query.image, prior, WholeScanSteps(()))
    np.testing.assert_array_equal(off.astype(bool), raw)
    passthrough = WholeScanStepsd("pred", steps=[])({"pred": logits, "image": None})["pred"]
    assert passthrough is logits


def test_unknown_step_names_are_refused():
    assert check_steps(["consistency", "RANGE"]) == ("range", "consistency")
    with pytest.raises(ValueError, match="unknown whole-scan step"):
        check_steps(["largest"])


def test_blank_query_maps_the_range_onto_the_whole_stack():
    blank = np.zeros((16, 16, 10), np.float32)
    body = body_mask(blank)
    assert not body.any()
    inside = slice_range(SupportPrior(0.5, 0.6, 0.1), body, margin=0.0)
    np.testing.assert_array_equal(np.flatnonzero(inside), [5])  # 0.5 * 9 = 4.5 .. 0.6 * 9 = 5.4 of slices 0..9


def _disc(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _painted_case():
    """pred, painted, expected ``[32, 32, 10]`` (expected with ``min_overlap`` 0): organ discs at (10, 10), radius
    5 on slice 4 shrinking by 1 per slice to slice 8 and from slice 4 down to slice 1 (radius 2); a look-alike
    disc at (24, 24) on slices 2-7; on slice 9 a blob touching the organ's slice-8 disc (2 of its 5 pixels inside
    it: kept as the organ's end without the overlap rule, a neighbour with it) and one 6 px away from it
    (dropped); the paint on slice 4 a disc of radius 4 (the person's outline, not the prediction's)."""
    shape, pred = (32, 32, 10), np.zeros((32, 32, 10), bool)
    expected = np.zeros_like(pred)
    for z, r in {1: 2, 2: 3, 3: 4, 4: 5, 5: 4, 6: 3, 7: 2, 8: 1}.items():
        pred[..., z] = _disc(shape, (10, 10), r)
        expected[..., z] = pred[..., z]
    for z in range(2, 8):
        pred[..., z] |= _disc(shape, (24, 24), 3)
    near, far = _disc(shape, (10, 11), 1), _disc(shape, (10, 17), 1)
    pred[..., 9] = near | far
    expected[..., 9] = near
    painted = np.zeros_like(pred)
    painted[..., 4] = _disc(shape, (10, 10), 4)
    expected[..., 4] = painted[..., 4]
    return pred, painted, expected


def test_anchor_keeps_the_painted_organ_and_the_paint():
    pred, painted, expected = _painted_case()
    np.testing.assert_array_equal(anchored_components(pred, painted, min_overlap=0.0), expected)
    # the overlap rule (default 0.8): the slice-9 blob lies 2/5 inside slice 8's organ, so the following stops
    continuous = expected.copy()
    continuous[..., 9] = False
    np.testing.assert_array_equal(anchored_components(pred, painted), continuous)
    np.testing.assert_array_equal(anchored_components(pred, painted, min_overlap=0.4), expected)  # 2/5 = 0.4
    # no growth between slices: a slice keeps only what lies inside the previous slice's kept mask, so the
    # shrinking organ is kept whole and of the end blob only its overlap with the slice-8 disc
    no_growth = expected.copy()
    no_growth[..., 9] &= expected[..., 8]
    assert 0 < no_growth[..., 9].sum() < expected[..., 9].sum()
    np.testing.assert_array_equal(anchored_components(pred, painted, growth=0), no_growth)
    prob = np.where(pred, 0.9, 0.1).astype(np.float32)
    image = np.zeros(pred.shape, np.float32)
    np.testing.assert_array_equal(WholeScanSteps(("anchor", "consistency"))(prob, image, None, painted), continuous)
    # no paint (a query that is not the painted scan): consistency decides
    kept = WholeScanSteps(("anchor", "consistency"))(prob, image, None)
    np.testing.assert_array_equal(kept, WholeScanSteps(("consistency",))(prob, image, None))
    with pytest.raises(ValueError, match="not on the prediction's grid"):
        WholeScanSteps(("anchor",))(prob, image, None, painted[:-1])


def test_anchor_applies_to_the_painted_scans_file_only(tmp_path):
    from monai.data import MetaTensor

    pred, painted, expected = _painted_case()
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"")
    link = tmp_path / "queries" / "scan.nii.gz"
    link.parent.mkdir()
    link.symlink_to(scan)
    logits = torch.stack([torch.zeros(pred.shape), torch.as_tensor(np.where(pred, 2.0, -2.0))])
    steps = WholeScanStepsd("pred", steps=["anchor", "consistency"], painted={"image": str(scan), "mask": painted})
    expected[..., 9] = False  # the default overlap rule (test above)
    for source, want in ((link, expected), (tmp_path / "other.nii.gz", None)):
        image = MetaTensor(torch.zeros((1, *pred.shape)), meta={"filename_or_obj": str(source)})
        out = steps({"pred": logits, "image": image})["pred"].argmax(0).numpy().astype(bool)
        if want is None:
            want = WholeScanSteps(("consistency",))(np.where(pred, 0.9, 0.1), np.zeros(pred.shape), None)
        np.testing.assert_array_equal(out, want)

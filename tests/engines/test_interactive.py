"""The helpers of the interactive (MONAI Label) path that need no server: which value Slicer gave the chosen
segment, how many slices a result labels along the network's slice axis, and the one-line refusals. The
whole path through a real server is ``tests/apps/test_monailabel_app.py``."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from fsmis_monai.engines.interactive import labelled_slices, painted_value, segment_with_bundle, support_overrides
from fsmis_monai.io import FsmisInputError, save_nifti

SLICER_INFO = [{"name": "liver", "id": 1}, {"name": "spleen", "id": 2}, {"name": "left kidney", "id": 3}]


def test_painted_value_is_the_selected_segments_id():
    assert painted_value(SLICER_INFO, "spleen") == 2
    assert painted_value(SLICER_INFO, "left kidney") == 3
    with pytest.raises(FsmisInputError, match="'heart' is not one of the uploaded segments"):
        painted_value(SLICER_INFO, "heart")


def test_labelled_slices_counts_along_the_contract_slice_axis(tmp_path):
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[1, 2, 0] = mask[3, 2, 3] = 1  # two slices of the last axis, two of the first
    mask[3, 0, 3] = 2
    ras = save_nifti(tmp_path / "ras.nii.gz", mask, affine=np.eye(4))
    assert labelled_slices(ras) == 2 and labelled_slices(ras, value=2) == 1
    assert labelled_slices(ras, "LAS") == 2  # the S axis is the last one
    # stored with the superior axis first: the network's axial slices are the first array axis
    sfirst = save_nifti(tmp_path / "s_first.nii.gz", mask, affine=np.array(
        [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float))
    assert labelled_slices(sfirst, "LAS") == 2 and labelled_slices(sfirst, "RAI") == 2
    mask[5, 2, 0] = 1  # a third slice along the first axis only
    sfirst = save_nifti(tmp_path / "s_first.nii.gz", mask, affine=np.array(
        [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float))
    assert labelled_slices(sfirst, "LAS") == 3 and labelled_slices(sfirst) == 2


def test_support_overrides_read_the_painted_value_on_every_painted_slice():
    o = support_overrides("img.nii.gz", "lbl.nii.gz", 2)
    assert o["support_class"] == 2 and o["n_support_slices"] is None and o["dataset_name"] is None
    # a painted label does not give the organ's slice range; on the painted scan the paint anchors the organ
    assert o["whole_scan_steps"] == ["anchor", "consistency"]


def test_segment_with_bundle_refuses_a_folder_without_inference_json_or_a_missing_query(tmp_path):
    with pytest.raises(FsmisInputError, match="not a bundle"):
        segment_with_bundle(tmp_path, tmp_path / "q.nii.gz", tmp_path / "out")
    from conftest import REPO_ROOT

    with pytest.raises(FsmisInputError, match="q.nii.gz: no such image"):
        segment_with_bundle(REPO_ROOT / "bundles" / "adnet", tmp_path / "q.nii.gz", tmp_path / "out")


def test_every_painted_slice_is_a_support_slice(tmp_path):
    """``n_support_slices=None`` (the app's support): every slice holding the painted value, in order."""
    from fsmis_monai.engines.inference import support_slices

    rng = np.random.default_rng(0)
    image = save_nifti(tmp_path / "image.nii.gz", rng.normal(size=(16, 16, 6)).astype(np.float32), affine=np.eye(4))
    painted = np.zeros((16, 16, 6), np.uint8)
    painted[4:9, 4:9, [1, 2, 4]] = 3
    painted[2, 2, 5] = 1  # another segment: not the support
    label = save_nifti(tmp_path / "painted.nii.gz", painted, affine=np.eye(4))
    images, masks, picks = support_slices(image, label, 3, None)
    assert picks == [1, 2, 4] and images.shape == (3, 3, 16, 16) and int(masks.sum()) == 3 * 25


def test_restore_painted_puts_back_the_drawn_slices_along_the_slice_axis(tmp_path):
    """A prediction whose painted slice was resampled (outline moved) gets the paint back on that slice only;
    the slice axis is the one pointing S/I, also when it is the stored first axis."""
    from fsmis_monai.engines.interactive import restore_painted

    rng = np.random.default_rng(0)
    for affine, axis in ((np.diag([-1.0, 1.0, 1.0, 1.0]), 2),  # LAS: slices along the last axis
                         (np.array([[0, 0, -1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float), 0)):  # S first
        pred = (rng.random((6, 5, 4)) > 0.5).astype(np.uint8)
        paint = np.zeros((6, 5, 4), np.uint8)
        index = [slice(None)] * 3
        index[axis] = 1
        paint[tuple(index)] = (rng.random(paint[tuple(index)].shape) > 0.3) * 3  # the painted segment's value 3
        pred_file, paint_file = tmp_path / f"pred{axis}.nii.gz", tmp_path / f"paint{axis}.nii.gz"
        nib.save(nib.Nifti1Image(pred, affine), str(pred_file))
        nib.save(nib.Nifti1Image(paint, affine), str(paint_file))
        restore_painted(pred_file, paint_file, 3, "LAS")
        got = np.asarray(nib.load(str(pred_file)).dataobj)
        want = pred.copy()
        want[tuple(index)] = paint[tuple(index)] == 3
        np.testing.assert_array_equal(got, want)
        assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith(f"pred{axis}") or ".tmp" in f.name) \
            == [f"pred{axis}.nii.gz"]  # no temporary left beside it

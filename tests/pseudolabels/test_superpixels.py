"""2D superpixels (SSL-ALPNet): the faithful relabelling bug, the corrected default, the transforms and the
command, against a plain per-slice scikit-image loop written here."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import felzenszwalb

from fsmis_monai.io import FsmisInputError
from fsmis_monai.pseudolabels import make_superpixels

CHAOS_THRESHOLD = 1e-4 + 50


def _body(slice_yx: np.ndarray, threshold: float) -> np.ndarray:
    above = slice_yx > threshold
    if not above.any():
        return above
    comp, n = ndimage.label(above, structure=np.ones((3, 3)))
    sizes = ndimage.sum_labels(above, comp, index=np.arange(1, n + 1))
    return ndimage.binary_fill_holes(comp == 1 + int(np.argmax(sizes)))


def reference_loop(volume_xyz: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Plain loop as the SSL-ALPNet notebook describes it: per slice felzenszwalb(min_size=400, sigma=1),
    id 0 -> max+1, relabel the list [unique ids..., max] from 1 skipping 0, outside the body -> 0.
    Returns (faithful relabelling, raw skimage ids)."""
    faithful = np.zeros(volume_xyz.shape, dtype=np.int64)
    raw_all = np.zeros(volume_xyz.shape, dtype=np.int64)
    for z in range(volume_xyz.shape[2]):
        img = volume_xyz[:, :, z].T
        raw = felzenszwalb(img, min_size=400, sigma=1)
        raw_all[:, :, z] = raw.T
        ids = list(np.unique(raw))
        top = max(ids)
        shifted = np.where(raw == 0, top + 1, raw) * _body(img, threshold)
        out = np.zeros(raw.shape, dtype=np.int64)
        new = 1
        for v in ids + [top]:
            if v == 0:
                continue
            out[shifted == v] = new
            new += 1
        faithful[:, :, z] = out.T
    return faithful, raw_all


@pytest.fixture(scope="module")
def chaos_slices(chaos_dir):
    img = nib.load(str(chaos_dir / "image_1.nii.gz"))
    return np.asarray(img.dataobj)[:, :, 12:17], img


def test_faithful_reproduces_the_reference_relabelling(chaos_slices):
    vol, _ = chaos_slices
    want, raw = reference_loop(vol, CHAOS_THRESHOLD)
    got = make_superpixels(vol, body_threshold=CHAOS_THRESHOLD, faithful=True)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    for z in range(vol.shape[2]):
        top = raw[:, :, z].max()
        ids = set(np.unique(got[:, :, z])) - {0}
        assert top not in ids and top + 1 in ids  # the gap
        assert not (got[:, :, z][raw[:, :, z] == 0]).any()  # superpixel 0 is dropped


def test_corrected_default_keeps_every_superpixel_with_contiguous_ids(chaos_slices):
    vol, _ = chaos_slices
    _, raw = reference_loop(vol, CHAOS_THRESHOLD)
    got = make_superpixels(vol, body_threshold=CHAOS_THRESHOLD)
    for z in range(vol.shape[2]):
        body = _body(vol[:, :, z].T, CHAOS_THRESHOLD).T
        g, r = got[:, :, z], raw[:, :, z]
        np.testing.assert_array_equal(g > 0, body)
        ids = np.unique(g[body])
        np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))  # contiguous
        # one-to-one with the skimage superpixels inside the body, in increasing skimage id order
        pairs = np.unique(np.stack([r[body], g[body]]), axis=1)
        assert pairs.shape[1] == ids.size == np.unique(r[body]).size
        assert np.all(np.diff(pairs[0]) > 0) and np.all(np.diff(pairs[1]) > 0)
        assert 0 in r[body]  # this slice exercises the id-0 superpixel the reference drops


def test_empty_slices_and_bad_input():
    vol = np.zeros((40, 40, 2))
    vol[5:30, 5:30, 1] = 100.0
    out = make_superpixels(vol, body_threshold=50)
    assert not out[:, :, 0].any() and out[:, :, 1].max() >= 1
    with pytest.raises(FsmisInputError, match="3D"):
        make_superpixels(np.zeros((4, 4)))
    with pytest.raises(FsmisInputError, match="NaN"):
        make_superpixels(np.full((4, 4, 1), np.nan))


def test_transforms_match_the_functions(chaos_slices, tmp_path):
    from monai.transforms import LoadImaged

    from fsmis_monai.pseudolabels import make_supervoxels
    from fsmis_monai.transforms.pseudolabels import Superpixelsd, Supervoxels, Supervoxelsd

    vol, img = chaos_slices
    small = vol[64:192, 64:192, :]
    path = tmp_path / "image_1.nii.gz"
    nib.save(nib.Nifti1Image(small, img.affine), str(path))
    d = LoadImaged("image", image_only=True, ensure_channel_first=True)({"image": str(path)})
    d = Superpixelsd("image", body_threshold=CHAOS_THRESHOLD, faithful=True)(d)
    d = Supervoxelsd("image", min_size=500)(d)
    np.testing.assert_array_equal(np.asarray(d["superpixels"])[0], make_superpixels(small, body_threshold=CHAOS_THRESHOLD, faithful=True))
    np.testing.assert_array_equal(np.asarray(d["supervoxels"])[0], make_supervoxels(small, (1.25, 1.25, 7.7), min_size=500))
    np.testing.assert_allclose(d["supervoxels"].affine, d["image"].affine)  # geometry travels with the label
    with pytest.raises(FsmisInputError, match="spacing"):
        Supervoxels()(small[None])  # a plain array has no spacing


def test_command_writes_superpixels_and_summary(chaos_slices, tmp_path):
    from fsmis_monai.cli import main

    vol, img = chaos_slices
    src = tmp_path / "src"
    src.mkdir()
    nib.save(nib.Nifti1Image(vol[:, :, :2], img.affine), str(src / "image_1.nii.gz"))
    assert main(["superpixels", "--src", str(src), "--dst", str(tmp_path / "out"), "--dataset", "chaos", "--faithful"]) == 0
    out = nib.load(str(tmp_path / "out" / "superpix-MIDDLE_1.nii.gz"))
    want, _ = reference_loop(vol[:, :, :2], CHAOS_THRESHOLD)
    np.testing.assert_array_equal(np.asarray(out.dataobj), want)
    summary = json.loads((tmp_path / "out" / "superpixels_summary.json").read_text(encoding="utf-8"))
    per_slice = sum(len(np.unique(want[:, :, z])) - 1 for z in range(2))
    assert summary["scans"][0]["superpixels"] == per_slice

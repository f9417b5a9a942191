"""Volumes and episodic datasets on real CHAOS scans (2 scans at half in-plane resolution) and one CMR scan.

Expected values are recomputed here from the files with nibabel/NumPy, independently of the code under test.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fsmis_monai.data.datalist import ScanFiles, pair_scans
from fsmis_monai.data.episodes import (
    GroundTruthEpisodeDataset,
    SuperpixelEpisodeDataset,
    SupervoxelEpisodeDataset,
    excluded_slices,
    setting_exclusions,
)
from fsmis_monai.data.seeding import seed_worker
from fsmis_monai.data.volumes import intensity_stats, load_volume, load_volumes, training_volumes
from fsmis_monai.io import FsmisInputError, save_nifti
from fsmis_monai.pseudolabels import make_superpixels, make_supervoxels

SCANS = (1, 2)
KIDNEYS = (2, 3)
MIN_SIZE = 50  # pixels at 128^2 (the references' 200 at 256^2)


def _raw(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def scan_dirs(chaos_dir, tmp_path_factory):
    """CHAOS scans 1 and 2 at half in-plane resolution with their supervoxels and superpixels on disk."""
    root = tmp_path_factory.mktemp("chaos_small")
    sv_dir, sp_dir = root / "supervoxels", root / "superpixels"
    for i in SCANS:
        img = nib.load(str(chaos_dir / f"image_{i}.nii.gz"))
        affine = img.affine.copy()
        affine[:3, :2] *= 2
        image = np.asarray(img.dataobj)[::2, ::2].astype(np.float32)
        label = _raw(chaos_dir / f"label_{i}.nii.gz")[::2, ::2].astype(np.uint8)
        save_nifti(root / f"image_{i}.nii.gz", image, affine)
        save_nifti(root / f"label_{i}.nii.gz", label, affine)
        supervoxels = make_supervoxels(image, (2.5, 2.5, 7.7), min_size=1250)
        superpixels = make_superpixels(image, min_size=100, body_threshold=1e-4 + 50)
        save_nifti(sv_dir / f"superpix-MIDDLE_{i}.nii.gz", supervoxels, affine)
        save_nifti(sp_dir / f"superpix-MIDDLE_{i}.nii.gz", superpixels, affine)
    return root, sv_dir, sp_dir


@pytest.fixture(scope="module")
def raw(scan_dirs):
    """Per scan id, the files as stored ([H, W, Z]): image, label, supervoxels, superpixels."""
    root, sv_dir, sp_dir = scan_dirs
    return {i: {"image": _raw(root / f"image_{i}.nii.gz").astype(np.float64), "label": _raw(root / f"label_{i}.nii.gz"),
                "sv": _raw(sv_dir / f"superpix-MIDDLE_{i}.nii.gz"), "sp": _raw(sp_dir / f"superpix-MIDDLE_{i}.nii.gz")}
            for i in SCANS}


@pytest.fixture(scope="module")
def sv_volumes(scan_dirs):
    root, sv_dir, _ = scan_dirs
    return load_volumes(pair_scans(root, pseudolabel_dir=sv_dir), "chaos")


@pytest.fixture(scope="module")
def sp_volumes(scan_dirs):
    root, _, sp_dir = scan_dirs
    return load_volumes(pair_scans(root, pseudolabel_dir=sp_dir), "chaos")


def _slices(ep: dict) -> list[tuple[int, int]]:
    """Every (scan id, z) an episode uses, supports and queries."""
    q_scans = np.atleast_1d(np.asarray(ep["scan_id"])).tolist()
    q_slices = np.atleast_1d(np.asarray(ep["slice_index"])).tolist()
    supports = list(zip(ep["support_scan_ids"].tolist(), ep["support_slice_indices"].tolist()))
    return supports + list(zip(q_scans, q_slices))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


# ----------------------------------------------------------------------------------------- volumes


def test_volume_zscore_slice_order_and_channels(sv_volumes, raw):
    vol = sv_volumes[0]
    img = raw[vol.scan_id]["image"]
    expected = (img - img.mean()) / img.std()
    z = vol.num_slices // 2
    np.testing.assert_allclose(vol.image[z], expected[:, :, z], atol=1e-5)
    s = vol.image_slice(z)
    assert s.shape == (3, 128, 128) and s.dtype == np.float32
    assert np.array_equal(s[0], s[2])
    np.testing.assert_array_equal(vol.label[z], raw[vol.scan_id]["label"][:, :, z])
    np.testing.assert_array_equal(vol.pseudolabel[z], raw[vol.scan_id]["sv"][:, :, z])
    assert not vol.image.flags.writeable


def test_global_stats_and_cache(scan_dirs, raw):
    root, _, _ = scan_dirs
    files = pair_scans(root, ids=[1, 2])
    stats = intensity_stats(files)
    allv = np.concatenate([raw[i]["image"].ravel() for i in (1, 2)])
    assert stats.mean == pytest.approx(allv.mean(), rel=1e-9) and stats.std == pytest.approx(allv.std(), rel=1e-9)
    vols = load_volumes(files, "chaos", normalization="global")
    np.testing.assert_allclose(vols[1].image[5], (raw[2]["image"][:, :, 5] - allv.mean()) / allv.std(), atol=1e-5)
    assert load_volumes(files, "chaos", normalization="global")[0] is vols[0]  # read once per process


def test_training_volumes_pairs_by_id(scan_dirs, sv_volumes):
    root, sv_dir, _ = scan_dirs
    vols = training_volumes(root, "chaos", fold=None, pseudolabel_dir=sv_dir)
    assert [v.scan_id for v in vols] == list(SCANS)
    # the contract derived from the scans (their own orientation and spacing) changes nothing in them
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.pseudolabel, b.pseudolabel)
               for a, b in zip(vols, sv_volumes))
    again = training_volumes(root, "chaos", fold=None, pseudolabel_dir=sv_dir)
    assert all(a is b for a, b in zip(vols, again))  # same options, same files: served from the cache


def test_cmr_labels_remapped_to_canonical_ids(cmr_dir):
    vol = load_volumes(pair_scans(cmr_dir, ids=[1]), "cmr")[0]
    lab = _raw(cmr_dir / "label_1.nii.gz")
    assert set(np.unique(vol.label).tolist()) == {0, 1, 2, 3}
    for raw_value, canonical in ((200, 1), (500, 2), (600, 3)):
        np.testing.assert_array_equal(vol.label == canonical, np.moveaxis(lab == raw_value, -1, 0))
    with pytest.raises(FsmisInputError, match=r"label_1\.nii\.gz.*\[200, 500, 600\]"):
        load_volumes(pair_scans(cmr_dir, ids=[1]), "chaos", cache=False)  # CHAOS has no 200/500/600


def test_geometry_mismatch_names_the_file(scan_dirs, tmp_path):
    root, _, _ = scan_dirs
    image = root / "image_1.nii.gz"
    affine = nib.load(str(image)).affine
    shape = nib.load(str(image)).shape
    short = tmp_path / "superpix-MIDDLE_1.nii.gz"
    save_nifti(short, np.zeros((shape[0], shape[1], shape[2] - 1), np.int32), affine)
    with pytest.raises(FsmisInputError, match=r"superpix-MIDDLE_1\.nii\.gz: shape"):
        load_volume(ScanFiles(1, image, root / "label_1.nii.gz", short), "chaos")
    moved = tmp_path / "label_1.nii.gz"
    shifted = affine.copy()
    shifted[0, 3] += 5
    save_nifti(moved, _raw(root / "label_1.nii.gz"), shifted)
    with pytest.raises(FsmisInputError, match=r"label_1\.nii\.gz: geometry"):
        load_volume(ScanFiles(1, image, moved), "chaos")
    assert load_volume(ScanFiles(1, image, moved), "chaos", check_geometry=False).label is not None


def test_in_plane_crop_and_resize(scan_dirs, raw):
    root, _, _ = scan_dirs
    files = pair_scans(root, ids=[1])
    cropped = load_volumes(files, "chaos", image_size=(96, 100), cache=False)[0]
    assert cropped.image.shape[1:] == (96, 100)
    np.testing.assert_array_equal(cropped.label[3], raw[1]["label"][16:112, 14:114, 3])
    resized = load_volumes(files, "chaos", image_size=(64, 64), resize_mode="resize", cache=False)[0]
    assert resized.image.shape[1:] == (64, 64) and set(np.unique(resized.label)) <= set(np.unique(raw[1]["label"]))


# ---------------------------------------------------------------------------------------- samplers


def test_supervoxel_episodes_adjacent_slices_and_masks(sv_volumes, raw):
    ds = SupervoxelEpisodeDataset(sv_volumes, length=30, min_size=MIN_SIZE, augmentation=None, seed=3)
    orders = set()
    for i in range(len(ds)):
        ep = ds[i]
        assert ep["support_images"].shape == (1, 3, 128, 128) and ep["support_images"].dtype == torch.float32
        assert ep["support_masks"].shape == (1, 128, 128) and ep["query_images"].shape == (3, 128, 128)
        assert ep["query_labels"].shape == (128, 128) and ep["query_labels"].dtype == torch.int64
        (s_scan, s_z), (q_scan, q_z) = _slices(ep)
        assert s_scan == q_scan and abs(s_z - q_z) == 1
        orders.add(q_z - s_z)
        sv = raw[q_scan]["sv"]
        sup = sv[:, :, s_z] == ep["label_id"]
        qry = sv[:, :, q_z] == ep["label_id"]
        np.testing.assert_array_equal(ep["support_masks"][0].numpy(), sup)
        np.testing.assert_array_equal(ep["query_labels"].numpy(), qry)
        assert sup.any() and qry.any() and max(sup.sum(), qry.sum()) >= MIN_SIZE
        img = raw[q_scan]["image"]
        zscored = (img - img.mean()) / img.std()
        np.testing.assert_allclose(ep["query_images"][1].numpy(), zscored[:, :, q_z], atol=1e-5)
    assert orders == {-1, 1}  # the query lies above or below the support


def test_supervoxel_k_shot_several_queries_consecutive(sv_volumes):
    ds = SupervoxelEpisodeDataset(sv_volumes, length=8, n_shots=3, n_queries=2, min_size=MIN_SIZE, seed=1)
    for i in range(len(ds)):
        ep = ds[i]
        assert ep["support_images"].shape == (3, 3, 128, 128) and ep["query_images"].shape == (2, 3, 128, 128)
        assert ep["query_labels"].shape == (2, 128, 128)
        used = _slices(ep)
        assert len({s for s, _ in used}) == 1
        steps = np.diff([z for _, z in used])
        assert np.all(steps == 1) or np.all(steps == -1)
        # augmented (one side): masks stay binary and non-empty
        assert set(torch.unique(ep["support_masks"]).tolist()) <= {0.0, 1.0}
        assert (ep["support_masks"].sum(dim=(1, 2)) > 0).all() and (ep["query_labels"].sum(dim=(1, 2)) > 0).all()


def test_superpixel_episodes_copy_one_slice(sp_volumes, raw):
    plain = SuperpixelEpisodeDataset(sp_volumes, length=15, augmentation=None, seed=0)
    for i in range(len(plain)):
        ep = plain[i]
        (s_scan, s_z), (q_scan, q_z) = _slices(ep)
        assert (s_scan, s_z) == (q_scan, q_z)
        expected = raw[q_scan]["sp"][:, :, q_z] == ep["label_id"]
        assert expected.any()  # corrected draw: only ids present in the slice
        np.testing.assert_array_equal(ep["query_labels"].numpy(), expected)
        assert torch.equal(ep["support_masks"][0], ep["query_labels"].float())
    augmented = SuperpixelEpisodeDataset(sp_volumes, length=6, seed=0)
    for i in range(len(augmented)):
        ep = augmented[i]
        assert not torch.equal(ep["support_images"][0], ep["query_images"])  # two independent copies
        assert ep["support_masks"].sum() > 0 and ep["query_labels"].sum() > 0
    faithful = SuperpixelEpisodeDataset(sp_volumes, length=15, augmentation=None, seed=0, faithful=True)
    for i in range(len(faithful)):
        ep = faithful[i]
        top = raw[int(ep["scan_id"])]["sp"][:, :, int(ep["slice_index"])].max()
        assert 1 <= ep["label_id"] < top  # randint(1, max): the top id is never drawn


def test_ground_truth_episodes_across_patients(sv_volumes, raw):
    ds = GroundTruthEpisodeDataset(sv_volumes, classes=(1, 4), length=30, min_size=MIN_SIZE, augmentation=None, seed=2)
    pairs_across = 0
    for i in range(len(ds)):
        ep = ds[i]
        assert ep["label_id"] in (1, 4)
        (s_scan, s_z), (q_scan, q_z) = _slices(ep)
        pairs_across += s_scan != q_scan
        sup = raw[s_scan]["label"][:, :, s_z] == ep["label_id"]
        np.testing.assert_array_equal(ep["support_masks"][0].numpy(), sup)
        np.testing.assert_array_equal(ep["query_labels"].numpy(), raw[q_scan]["label"][:, :, q_z] == ep["label_id"])
        assert sup.sum() >= MIN_SIZE
    assert pairs_across > 0
    with pytest.raises(RuntimeError, match="no valid episode after 5 draws"):
        SupervoxelEpisodeDataset(sv_volumes, min_size=10**6, max_tries=5, augmentation=None)[0]
    with pytest.raises(ValueError, match="both trained on and excluded"):
        GroundTruthEpisodeDataset(sv_volumes, classes=(1, 2), exclude_classes=KIDNEYS)


def test_setting2_exclusion_or_and_faithful_and(sv_volumes, sp_volumes, raw):
    assert setting_exclusions("chaos", 1) == () and setting_exclusions("chaos", 2) == (1, 2, 3, 4)
    expected_or = {i: [z for z in range(raw[i]["label"].shape[2])
                       if not np.isin(raw[i]["label"][:, :, z], KIDNEYS).any()] for i in SCANS}
    expected_and = {i: [z for z in range(raw[i]["label"].shape[2])
                        if not all((raw[i]["label"][:, :, z] == c).any() for c in KIDNEYS)] for i in SCANS}
    # augmentation does not move slices: off here, to keep the test fast
    corrected = SupervoxelEpisodeDataset(sv_volumes, length=30, min_size=MIN_SIZE, exclude_classes=KIDNEYS, seed=5,
                                         augmentation=None)
    faithful = SupervoxelEpisodeDataset(sv_volumes, length=30, min_size=MIN_SIZE, exclude_classes=KIDNEYS, seed=5,
                                        faithful=True, augmentation=None)
    assert corrected.allowed_slices == expected_or
    assert faithful.allowed_slices == expected_and
    assert sum(map(len, expected_and.values())) > sum(map(len, expected_or.values()))
    for ds in (corrected, SuperpixelEpisodeDataset(sp_volumes, length=20, exclude_classes=KIDNEYS, seed=5,
                                                   augmentation=None)):
        for i in range(len(ds)):
            for scan, z in _slices(ds[i]):
                assert not np.isin(raw[scan]["label"][:, :, z], KIDNEYS).any()
    kept_kidney = 0
    for i in range(len(faithful)):
        for scan, z in _slices(faithful[i]):
            assert z in expected_and[scan]
            kept_kidney += np.isin(raw[scan]["label"][:, :, z], KIDNEYS).any()
    assert kept_kidney > 0  # the released AND keeps slices with one kidney
    label = sv_volumes[0].label
    assert np.array_equal(excluded_slices(label, ()), np.zeros(label.shape[0], bool))


# ----------------------------------------------------------------------------------------- seeding


def test_same_seed_same_episodes_new_epoch_new_episodes(sv_volumes):
    a = SupervoxelEpisodeDataset(sv_volumes, length=4, min_size=MIN_SIZE, seed=11)
    b = SupervoxelEpisodeDataset(sv_volumes, length=4, min_size=MIN_SIZE, seed=11)
    for i in (3, 0, 2):  # any order
        _assert_same(a[i], b[i])
    c = SupervoxelEpisodeDataset(sv_volumes, length=4, min_size=MIN_SIZE, seed=12)
    assert not torch.equal(a[0]["query_images"], c[0]["query_images"])
    first = a[1]
    a.set_epoch(1)
    assert not torch.equal(first["query_images"], a[1]["query_images"])
    a.set_epoch(0)
    _assert_same(first, a[1])


def test_workers_zero_and_two_give_identical_batches(sv_volumes, sp_volumes):
    for ds in (SupervoxelEpisodeDataset(sv_volumes, length=6, min_size=MIN_SIZE, seed=4),
               SuperpixelEpisodeDataset(sp_volumes, length=6, seed=4)):
        batches = []
        for workers in (0, 2):
            loader = DataLoader(ds, batch_size=2, num_workers=workers, worker_init_fn=seed_worker)
            batches.append(list(loader))
        assert len(batches[0]) == 3
        b = batches[0][0]
        assert b["support_images"].shape == (2, 1, 3, 128, 128) and b["support_masks"].shape == (2, 1, 128, 128)
        assert b["query_images"].shape == (2, 3, 128, 128) and b["query_labels"].shape == (2, 128, 128)
        assert b["scan_id"].shape == (2,) and b["support_slice_indices"].shape == (2, 1)
        for x, y in zip(*batches):
            _assert_same(x, y)


def test_time_episodes_reports_seconds(sv_volumes):
    """``time_episodes`` lives in bench/data_loading.py (a measuring helper, not library code)."""
    spec = importlib.util.spec_from_file_location("data_loading", Path(__file__).parents[2] / "bench" / "data_loading.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ds = SupervoxelEpisodeDataset(sv_volumes, length=4, min_size=MIN_SIZE, augmentation=None)
    t = bench.time_episodes(ds, 3)
    assert 0 < t < 5


class _NoiseDataset(torch.utils.data.Dataset):
    """Each item: one draw of a MONAI random transform held by the dataset (a user pipeline's randomness)."""

    def __init__(self) -> None:
        from monai.transforms import RandGaussianNoise

        self.noise = RandGaussianNoise(prob=1.0)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.as_tensor(self.noise(np.zeros((1, 2), np.float32)))


def test_seed_worker_gives_monai_transforms_distinct_reproducible_streams():
    def run(init):
        loader = DataLoader(_NoiseDataset(), batch_size=1, num_workers=2, worker_init_fn=init,
                            generator=torch.Generator().manual_seed(0))
        return [b[0] for b in loader]  # items 0, 2 come from worker 0; items 1, 3 from worker 1

    unseeded = run(None)
    assert torch.equal(unseeded[0], unseeded[1])  # forked workers share the transform's RandomState
    seeded, again = run(seed_worker), run(seed_worker)
    assert not torch.equal(seeded[0], seeded[1])
    for a, b in zip(seeded, again):
        assert torch.equal(a, b)

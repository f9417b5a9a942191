"""Augmentation of fsmis_monai.data.augment on a real CHAOS slice, against independent NumPy computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from fsmis_monai.data.augment import (
    EpisodeAugmentation,
    RandIsotropicAffine,
    RandIsotropicAffined,
    RandSimardElastic,
    RandSimardElasticd,
    gamma_transform,
)
from fsmis_monai.io import load_nifti


@pytest.fixture(scope="module")
def real_slice(chaos_dir):
    """A z-scored axial slice of CHAOS scan 2 holding several organs, with its label (values 0-4)."""
    image, _ = load_nifti(chaos_dir / "image_2.nii.gz", dtype=np.float64)
    label, _ = load_nifti(chaos_dir / "label_2.nii.gz")
    z = int(np.argmax([len(np.unique(label[:, :, k])) for k in range(label.shape[2])]))
    img = (image - image.mean()) / image.std()
    return img[:, :, z][None].astype(np.float32), label[:, :, z][None].astype(np.float32)


def _reference_gamma(img: np.ndarray, gamma: float) -> np.ndarray:
    """The Schlemper/Q-Net gamma formula (docs/reference.md#augmentation), written out independently."""
    lo, hi = img.min(), img.max()
    return (hi - lo + 1e-5) * ((img - lo + 1e-5) / (hi - lo + 1e-5)) ** gamma + lo


def test_gamma_matches_reference_formula(real_slice):
    img = real_slice[0].astype(np.float64)
    gt = gamma_transform()
    drawn = []
    for seed in range(20):
        gt.set_random_state(seed)
        out = np.asarray(gt(img))
        g = float(gt.gamma_value)
        drawn.append(g)
        lo, span = img.min(), img.max() - img.min()
        np.testing.assert_allclose(out, ((img - lo) / span) ** g * span + lo, rtol=1e-5, atol=1e-5 * span)
        # the reference puts its 1e-5 inside the power, which lifts the darkest pixel by at most
        # 1e-5^g * span^(1-g) (a few thousandths of the range for g near 0.5), plus 1e-5 from its range factor
        bound = 1e-5**g * (span + 1e-5) ** (1 - g) + 2e-5
        assert np.abs(out - _reference_gamma(img, g)).max() <= 1.05 * bound
    drawn = np.array(drawn)
    assert drawn.min() >= 0.5 and drawn.max() <= 1.5
    assert drawn.min() < 0.7 and drawn.max() > 1.3  # the whole range is used, not a constant


def _gaussian_taps(sigma: float, radius: int) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def test_elastic_displacement_magnitude_matches_theory():
    """RMS displacement of blurred U(-1, 1) noise: alpha * sqrt(1/3) * sum(w^2) (separable 21-tap kernel)."""
    alpha, sigma = 10.0, 5.0
    expected = alpha * np.sqrt(1 / 3) * np.sum(_gaussian_taps(sigma, 10) ** 2)
    n = 192
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ramps = np.stack([rows, cols]).astype(np.float32)  # 2 channels: each pixel's own coordinates
    el = RandSimardElastic(alpha=alpha, sigma=sigma)
    measured = []
    for seed in range(6):
        el.set_random_state(seed)
        out = el(ramps)
        inner = (slice(12, n - 12),) * 2  # linear interpolation of a ramp is exact away from the borders
        measured += [(out[0] - rows)[inner], (out[1] - cols)[inner]]
    rms = float(np.sqrt(np.mean(np.square(measured))))
    assert rms == pytest.approx(expected, rel=0.1), (rms, expected)
    assert expected > 0.25  # sanity of the formula itself: about a third of a pixel


def test_geometric_labels_stay_integer_nearest(real_slice):
    image, label = real_slice
    values = set(np.unique(label).tolist())
    for cls in (RandIsotropicAffined, RandSimardElasticd):
        t = cls(("image", "label"), label_keys="label")
        for seed in range(3):
            t.set_random_state(seed)
            out = t({"image": image, "label": label})
            assert set(np.unique(out["label"]).tolist()) <= values
            assert out["image"].shape == image.shape and out["image"].dtype == np.float32
            assert not np.array_equal(out["image"], image)


def test_faithful_elastic_label_is_rounded_bilinear(real_slice):
    """Faithful labels: bilinear warp of the binary mask then rint (independent scipy computation)."""
    image, label = real_slice
    mask = (label == label.max()).astype(np.float32)
    el = RandSimardElasticd(("image", "mask"), label_keys="mask", faithful=True)
    el.set_random_state(7)
    out = el({"image": image, "mask": mask})
    disp = el.transform.displacement
    rows, cols = np.meshgrid(np.arange(mask.shape[1]), np.arange(mask.shape[2]), indexing="ij")
    warped = map_coordinates(mask[0], [rows + disp[0], cols + disp[1]], order=1, mode="reflect")
    expected = np.rint(warped)
    ties = np.isclose(warped, 0.5)
    np.testing.assert_array_equal(out["mask"][0][~ties], expected[~ties])
    nearest = RandSimardElasticd(("image", "mask"), label_keys="mask")
    nearest.set_random_state(7)
    differs = np.count_nonzero(nearest({"image": image, "mask": mask})["mask"] != out["mask"])
    assert differs > 0  # the two label modes are really different


def test_affine_warp_applies_the_drawn_isotropic_matrix():
    """The warp of a coordinate ramp is the inverse of the drawn forward matrix; zooms/shifts in range."""
    n = 96
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ramps = np.stack([rows, cols]).astype(np.float32)
    centre = (n - 1) / 2
    inner = slice(24, n - 24)
    design = np.stack([rows[inner, inner].ravel() - centre, cols[inner, inner].ravel() - centre,
                       np.ones((n - 48) ** 2)], axis=1)
    t = RandIsotropicAffine()
    for seed in range(8):
        t.set_random_state(seed)
        out = t(ramps)
        fitted = np.stack([np.linalg.lstsq(design, out[k][inner, inner].ravel() - centre, rcond=None)[0]
                           for k in (0, 1)])
        np.testing.assert_allclose(fitted, np.linalg.inv(t.matrix)[:2], atol=1e-3)
        linear = t.matrix[:2, :2]
        # |det| = zoom^2 * cos(shear): isotropic zoom in [0.9, 1.2], shear within 5 degrees
        det = abs(np.linalg.det(linear))
        assert 0.9**2 * np.cos(np.deg2rad(5)) - 1e-9 <= det <= 1.2**2 + 1e-9
        shift = np.linalg.norm(t.matrix[:2, 2])
        assert shift <= 1.2 * np.sqrt(2) * 5 * 1.01


def test_episode_augmentation_one_side_leaves_the_other_side_untouched(real_slice):
    image, label = real_slice
    mask = (label > 0).astype(np.float32)
    aug = EpisodeAugmentation("one_side")
    sides_changed = set()
    for seed in range(12):
        supports, queries = aug([(image, mask)], [(image, mask)], np.random.default_rng(seed))
        s_changed = not np.array_equal(supports[0][0], image)
        q_changed = not np.array_equal(queries[0][0], image)
        assert s_changed or q_changed
        sides_changed.add((s_changed, q_changed))
    assert (True, False) in sides_changed and (False, True) in sides_changed  # gamma+geometric on one side
    both = EpisodeAugmentation("both")
    supports, queries = both([(image, mask)], [(image, mask)], np.random.default_rng(0))
    assert not np.array_equal(supports[0][0], image) and not np.array_equal(queries[0][0], image)
    assert not np.array_equal(supports[0][0], queries[0][0])  # independent copies

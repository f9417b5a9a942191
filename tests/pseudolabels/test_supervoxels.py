"""3D supervoxels: the Cython Felzenszwalb against a plain-Python union-find, the ADNet generator's
post-processing on a real CHAOS scan, determinism across runs and worker counts, and bad input."""

from __future__ import annotations

import itertools
import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fsmis_monai import _felzenszwalb3d
from fsmis_monai.io import FsmisInputError
from fsmis_monai.pseudolabels import felzenszwalb_3d, make_supervoxels, supervoxel_weights

# ----------------------------------------------------------------------------- brute-force reference


# The reference generator's 13 directions (dz, dy, dx) in the order it concatenates its edge arrays
# (docs/reference.md#supervoxels): x, xy, y, x(-y) in-plane, then zx, zxy, zy, z(-x), z(-x)(-y), z(-y), zx(-y), z(-x)y, z.
REFERENCE_DIRECTIONS = [(0, 1, 0), (0, 1, 1), (0, 0, 1), (0, 1, -1), (1, 1, 0), (1, 1, 1), (1, 0, 1), (1, -1, 0),
                        (1, -1, -1), (1, 0, -1), (1, 1, -1), (1, -1, 1), (1, 0, 0)]


def _weight(offset: tuple[int, int, int], s: float) -> float:
    """docs/reference.md#supervoxels in the reference's float form: in-plane 1, z s**2, z + one in-plane axis
    (sqrt(1 + s**2) / sqrt(2))**2, z + both (sqrt(2 + s**2) / sqrt(3))**2."""
    in_plane = (offset[1] != 0) + (offset[2] != 0)
    if offset[0] == 0:
        return 1.0
    if in_plane == 0:
        return s ** 2
    return (math.sqrt(in_plane + s ** 2) / math.sqrt(in_plane + 1)) ** 2


def numpy1_introsort(values: list[float], depth: int = -1) -> list[int]:
    """NumPy 1.x's default ``argsort`` (introsort) in plain Python: median-of-3 quicksort with Hoare
    partitioning, larger side pushed, insertion sort below 16 elements, heapsort past 2*log2(n) levels.
    (Checked locally against numpy 1.23.5, whose ``argsort`` made the published supervoxels.)"""
    a = list(range(len(values)))
    v = values

    def heapsort(lo: int, n: int) -> None:
        def sift(i: int, size: int, tmp: int) -> None:
            j = 2 * i
            while j <= size:
                if j < size and v[a[lo + j - 1]] < v[a[lo + j]]:
                    j += 1
                if v[tmp] < v[a[lo + j - 1]]:
                    a[lo + i - 1] = a[lo + j - 1]
                    i, j = j, 2 * j
                else:
                    break
            a[lo + i - 1] = tmp

        for start in range(n // 2, 0, -1):
            sift(start, n, a[lo + start - 1])
        while n > 1:
            tmp = a[lo + n - 1]
            a[lo + n - 1] = a[lo]
            n -= 1
            sift(1, n, tmp)

    lo, hi, stack = 0, len(a) - 1, []
    if depth < 0:
        depth = 2 * (len(a).bit_length() - 1) if a else 0
    while True:
        if depth < 0:
            heapsort(lo, hi - lo + 1)
        else:
            while hi - lo > 15:
                mid = lo + ((hi - lo) >> 1)
                for x, y in ((mid, lo), (hi, mid), (mid, lo)):
                    if v[a[x]] < v[a[y]]:
                        a[x], a[y] = a[y], a[x]
                pivot = v[a[mid]]
                a[mid], a[hi - 1] = a[hi - 1], a[mid]
                i, j = lo, hi - 1
                while True:
                    i += 1
                    while v[a[i]] < pivot:
                        i += 1
                    j -= 1
                    while pivot < v[a[j]]:
                        j -= 1
                    if i >= j:
                        break
                    a[i], a[j] = a[j], a[i]
                a[i], a[hi - 1] = a[hi - 1], a[i]
                depth -= 1
                if i - lo < hi - i:
                    stack.append((i + 1, hi, depth))
                    hi = i - 1
                else:
                    stack.append((lo, i - 1, depth))
                    lo = i + 1
            for i in range(lo + 1, hi + 1):
                item, j = a[i], i
                while j > lo and v[item] < v[a[j - 1]]:
                    a[j] = a[j - 1]
                    j -= 1
                a[j] = item
        if not stack:
            return a
        lo, hi, depth = stack.pop()


def brute_force_felzenszwalb(vol: np.ndarray, spacing: tuple[float, float, float], k: float, min_size: int,
                             numpy1_order: bool = False) -> np.ndarray:
    """Plain-Python Felzenszwalb on a (z, y, x) volume: float64 costs sqrt(w * dI**2), edges listed direction
    by direction (voxels in C order) as the reference lists them, then sorted by cost: stably, or in
    NumPy 1.x ``argsort`` order."""
    nz, ny, nx = vol.shape
    s = spacing[0] / spacing[1]
    edges = []
    for off in REFERENCE_DIRECTIONS:
        w = _weight(off, s)
        for z, y, x in itertools.product(range(nz), range(ny), range(nx)):
            zz, yy, xx = z + off[0], y + off[1], x + off[2]
            if 0 <= zz < nz and 0 <= yy < ny and 0 <= xx < nx:
                diff = float(vol[zz, yy, xx]) - float(vol[z, y, x])
                edges.append((math.sqrt(w * (diff * diff)), (z * ny + y) * nx + x, (zz * ny + yy) * nx + xx))
    if numpy1_order:
        edges = [edges[i] for i in numpy1_introsort([e[0] for e in edges])]
    else:
        edges.sort(key=lambda e: e[0])  # list.sort is stable: ties keep the listing order
    n = vol.size
    parent = list(range(n))
    size = [1] * n
    internal = [0.0] * n

    def root(a: int) -> int:
        while parent[a] != a:
            a = parent[a]
        return a

    for cost, a, b in edges:
        ra, rb = root(a), root(b)
        if ra != rb and cost < min(internal[ra] + k / size[ra], internal[rb] + k / size[rb]):
            parent[rb] = ra
            size[ra] += size[rb]
            internal[ra] = cost
    for _, a, b in edges:
        ra, rb = root(a), root(b)
        if ra != rb and (size[ra] < min_size or size[rb] < min_size):
            parent[rb] = ra
            size[ra] += size[rb]
    first_seen: dict[int, int] = {}
    out = [first_seen.setdefault(root(p), len(first_seen)) for p in range(n)]
    return np.array(out, dtype=np.int32).reshape(vol.shape)


def _blocky_volume(seed: int, shape=(8, 32, 32)) -> np.ndarray:
    """Piecewise-constant regions plus small integer noise: many exactly tied edge costs, as in real scans
    (integer intensities) where the counting sort's stable tie order decides the result."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 6, size=(2, 4, 4)) * 40
    vol = np.kron(coarse, np.ones((shape[0] // 2, shape[1] // 4, shape[2] // 4)))
    return vol + rng.integers(0, 3, size=shape)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spacing,scale,min_size", [((3.0, 1.5, 1.5), 255.0, 40), ((7.7, 1.25, 1.25), 600.0, 150)])
def test_matches_brute_force_union_find(seed, spacing, scale, min_size):
    vol = _blocky_volume(seed)
    got = felzenszwalb_3d(vol, spacing=spacing, scale=scale, sigma=0, min_size=min_size)
    want = brute_force_felzenszwalb(vol, spacing, scale / 255.0, min_size)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    # the comparison-sort fallback (too many distinct costs for the counting sort) gives the same order
    weights = np.array([_weight(o, spacing[0] / spacing[1]) for o in REFERENCE_DIRECTIONS])
    assert list(_felzenszwalb3d.OFFSETS) == REFERENCE_DIRECTIONS
    np.testing.assert_array_equal(supervoxel_weights(spacing), weights)  # bit-identical to the reference form
    fallback = _felzenszwalb3d.segment(vol.astype(np.float64), weights, scale / 255.0, min_size, max_distinct=0)
    np.testing.assert_array_equal(fallback, want)
    assert 1 < want.max() + 1 < vol.size  # the case really merges and really keeps several regions


def test_faithful_order_matches_brute_force_numpy1_argsort():
    vol = _blocky_volume(4)
    spacing = (7.7, 1.25, 1.25)
    got = felzenszwalb_3d(vol, spacing=spacing, scale=600.0, min_size=150, faithful=True)
    want = brute_force_felzenszwalb(vol, spacing, 600.0 / 255.0, 150, numpy1_order=True)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, felzenszwalb_3d(vol, spacing=spacing, scale=600.0, min_size=150))  # ties matter


@pytest.mark.parametrize("n,distinct,depth", [(40, 3, -1), (3000, 5, -1), (3000, 3000, -1), (500, 4, 1)])
def test_numpy1_argsort_port(n, distinct, depth):
    """The Cython introsort equals the plain-Python one, heapsort fallback included (forced by depth)."""
    values = np.random.default_rng(n + distinct).integers(0, distinct, n).astype(np.float64)
    got = _felzenszwalb3d.numpy1_argsort(values, depth)
    assert np.all(np.diff(values[got]) >= 0)
    np.testing.assert_array_equal(got, numpy1_introsort(list(values), depth))


def test_matches_brute_force_with_smoothing_on_real_crop(chaos_dir):
    image = np.asarray(nib.load(str(chaos_dir / "image_1.nii.gz")).dataobj)
    crop = np.ascontiguousarray(image[112:144, 112:144, 14:22].transpose(2, 1, 0))  # (z, y, x) 8x32x32
    spacing = (7.7, 1.25, 1.25)
    got = felzenszwalb_3d(crop, spacing=spacing, scale=300.0, sigma=1.0, min_size=60)
    smoothed = ndimage.gaussian_filter(crop.astype(np.float64), sigma=1.0 / np.asarray(spacing))
    want = brute_force_felzenszwalb(smoothed, spacing, 300.0 / 255.0, 60)
    np.testing.assert_array_equal(got, want)
    assert want.max() >= 2


# ------------------------------------------------------------------------------ generator on real scans


def _independent_body_mask(rescaled_xyz: np.ndarray, threshold: float) -> np.ndarray:
    """Per axial slice: > threshold, largest 8-connected component (first in raster order on ties), holes filled."""
    mask = np.zeros(rescaled_xyz.shape, dtype=bool)
    for z in range(rescaled_xyz.shape[2]):
        above = rescaled_xyz[:, :, z].T > threshold
        if not above.any():
            continue
        comp, n = ndimage.label(above, structure=np.ones((3, 3)))
        sizes = ndimage.sum_labels(above, comp, index=np.arange(1, n + 1))
        mask[:, :, z] = ndimage.binary_fill_holes(comp == 1 + int(np.argmax(sizes))).T
    return mask


@pytest.fixture(scope="module")
def chaos_crop(chaos_dir):
    """CHAOS scan 2, the central 128 x 128 in-plane window over all slices (keeps body edges and air)."""
    img = nib.load(str(chaos_dir / "image_2.nii.gz"))
    data = np.asarray(img.dataobj)[64:192, 40:168, :]
    return data, tuple(float(z) for z in img.header.get_zooms()[:3])


def test_generator_properties_on_real_scan(chaos_crop):
    image, spacing = chaos_crop
    min_size = 2000
    seg = make_supervoxels(image, spacing, min_size=min_size)
    rescaled = 255.0 * (image - image.min()) / np.ptp(image)
    body = _independent_body_mask(rescaled, 10.0)
    assert seg.dtype == np.int32 and seg.shape == image.shape
    np.testing.assert_array_equal(seg > 0, body)
    assert 0.2 < body.mean() < 0.99  # the crop really has both body and air

    raw = felzenszwalb_3d(rescaled.transpose(2, 1, 0), spacing=(spacing[2], spacing[0], spacing[1]), min_size=min_size)
    raw = raw.transpose(2, 1, 0)
    sizes = np.bincount(raw.ravel())
    assert sizes.min() >= min_size  # every supervoxel is large enough before the body mask clips it
    n = raw.max() + 1
    # reference numbering: component of voxel (x=0, y=0, z=0) moves to n, the others keep their id
    expected = np.where(raw == 0, n, raw)
    np.testing.assert_array_equal(seg[body], expected[body])
    # components are 26-connected regions
    for lab in range(n):
        _, pieces = ndimage.label(raw == lab, structure=np.ones((3, 3, 3)))
        assert pieces == 1
    # contiguous renumbering keeps the partition and leaves no gap
    renum = make_supervoxels(image, spacing, min_size=min_size, renumber=True)
    ids = np.unique(renum)
    np.testing.assert_array_equal(ids, np.arange(ids.size))
    assert len(np.unique(np.stack([renum.ravel(), seg.ravel()]), axis=1).T) == ids.size


def test_deterministic_across_runs(chaos_crop):
    image, spacing = chaos_crop
    a = make_supervoxels(image, spacing, min_size=1000)
    b = make_supervoxels(image.copy(), spacing, min_size=1000)
    assert a.tobytes() == b.tobytes()


def test_command_byte_identical_across_worker_counts(tmp_path, cmr_dir):
    from fsmis_monai.cli import main

    src = tmp_path / "src"
    src.mkdir()
    for sid in (1, 2):  # two small CMR scans, cropped to keep the test fast
        img = nib.load(str(cmr_dir / f"image_{sid}.nii.gz"))
        data = np.asarray(img.dataobj)[64:192, 64:192, :]
        nib.save(nib.Nifti1Image(data, img.affine, img.header), str(src / f"image_{sid}.nii.gz"))
    for workers in (1, 2):
        assert main(["supervoxels", "--src", str(src), "--dst", str(tmp_path / f"w{workers}"),
                     "--dataset", "cmr", "--workers", str(workers)]) == 0
    for sid in (1, 2):
        one = (tmp_path / "w1" / f"superpix-MIDDLE_{sid}.nii.gz").read_bytes()
        assert one == (tmp_path / "w2" / f"superpix-MIDDLE_{sid}.nii.gz").read_bytes()
        out = nib.load(str(tmp_path / "w1" / f"superpix-MIDDLE_{sid}.nii.gz"))
        np.testing.assert_allclose(out.affine, nib.load(str(src / f"image_{sid}.nii.gz")).affine)  # geometry kept
    summary = json.loads((tmp_path / "w1" / "supervoxels_summary.json").read_text(encoding="utf-8"))
    assert [s["id"] for s in summary["scans"]] == [1, 2]
    assert all(s["status"] == "ok" and s["supervoxels"] > 0 for s in summary["scans"])


# ----------------------------------------------------------------------------------------- bad input


def test_defined_results_for_degenerate_volumes():
    assert felzenszwalb_3d(np.zeros((0, 4, 4))).shape == (0, 4, 4)
    const = np.full((4, 6, 6), 7.0)
    np.testing.assert_array_equal(felzenszwalb_3d(const, min_size=1), np.zeros(const.shape, np.int32))
    # constant image: no body after rescaling (the reference divides by zero here)
    np.testing.assert_array_equal(make_supervoxels(const, (1.0, 1.0, 2.0), min_size=5), np.zeros(const.shape))
    assert make_supervoxels(np.zeros((4, 4, 0)), (1, 1, 1)).shape == (4, 4, 0)
    # integer input behaves as its float value
    ints = _blocky_volume(3).astype(np.int16)
    np.testing.assert_array_equal(felzenszwalb_3d(ints, min_size=10), felzenszwalb_3d(ints.astype(float), min_size=10))


@pytest.mark.parametrize(
    "volume,match",
    [
        (np.zeros((8, 8)), "expected a 3D array"),
        (np.array([[[1.0, np.nan]]]), "NaN or infinite"),
        (np.zeros((2, 2, 2), dtype=complex), "real-valued"),
        (np.array([[["a"]]]), "real-valued"),
    ],
)
def test_bad_input_is_a_clear_error(volume, match):
    with pytest.raises(FsmisInputError, match=match):
        felzenszwalb_3d(volume)
    with pytest.raises(FsmisInputError, match=match):
        make_supervoxels(volume, (1.0, 1.0, 1.0))


def test_bad_parameters_are_clear_errors():
    vol = np.zeros((2, 3, 3))
    with pytest.raises(FsmisInputError, match="spacing"):
        felzenszwalb_3d(vol, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(FsmisInputError, match="scale"):
        felzenszwalb_3d(vol, scale=0)
    with pytest.raises(FsmisInputError, match="min_size"):
        felzenszwalb_3d(vol, min_size=-1)


def test_command_reports_a_bad_scan_and_finishes_the_others(tmp_path, cmr_dir):
    from fsmis_monai.cli import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    img = nib.load(str(cmr_dir / "image_3.nii.gz"))
    data = np.asarray(img.dataobj)[96:160, 96:160, :]
    nib.save(nib.Nifti1Image(data, img.affine), str(src / "image_3.nii.gz"))
    (src / "image_4.nii.gz").write_bytes(b"not a nifti")
    bad = data.copy()
    bad[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(bad, img.affine), str(src / "image_5.nii.gz"))
    assert main(["supervoxels", "--src", str(src), "--dst", str(dst), "--min-size", "200", "--workers", "1"]) == 1
    assert sorted(p.name for p in dst.iterdir()) == ["superpix-MIDDLE_3.nii.gz", "supervoxels_summary.json"]
    status = {s["id"]: s for s in json.loads((dst / "supervoxels_summary.json").read_text(encoding="utf-8"))["scans"]}
    assert status[3]["status"] == "ok"
    assert status[4]["status"] == "failed" and "image_4.nii.gz" in status[4]["error"]
    assert status[5]["status"] == "failed" and "NaN" in status[5]["error"]
    # existing outputs are kept unless --overwrite
    before = (dst / "superpix-MIDDLE_3.nii.gz").stat().st_mtime_ns
    main(["supervoxels", "--src", str(src), "--dst", str(dst), "--min-size", "200"])
    assert (dst / "superpix-MIDDLE_3.nii.gz").stat().st_mtime_ns == before

"""Preprocessing recipes on raw data synthesised from the real scans.

Raw downloads do not exist on these machines, so each test rebuilds a raw layout from a real
preprocessed scan (CHAOS: DICOM series + grey PNG masks in DICOM pixel order; CMR: NIfTI with raw
200/500/600 labels; Synapse: a 512 x 512 HU volume) at another spacing and size, chosen so that the
recipe's output grid lands exactly on the original one. The recipe must then give back the original
geometry exactly and the original labels (Dice >= 0.95 per class).

The raw volumes are synthesised in ``tests/_raw_scans.py`` (``scipy.ndimage.map_coordinates``, independent of MONAI).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fsmis_monai.io import FsmisInputError
from fsmis_monai.preprocess import load_recipe, run_preprocessing, slice_index
from _raw_scans import (
    SYNAPSE_FROM_CHAOS,
    load_real,
    make_chaos_raw,
    make_cmr_raw,
    make_synapse_raw,
    write_png_masks,
)


# ------------------------------------------------------------------------------------ helpers


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def assert_recovered(dst: Path, out_id: int, image, label, affine, classes, min_corr=0.98):
    """Output geometry equals the original exactly; labels reach Dice >= 0.95 per class."""
    out_img = nib.load(str(dst / f"image_{out_id}.nii.gz"))
    out_lab = nib.load(str(dst / f"label_{out_id}.nii.gz"))
    assert out_img.shape == label.shape == out_lab.shape
    np.testing.assert_allclose(out_img.affine, affine, atol=1e-3)
    np.testing.assert_allclose(out_lab.affine, affine, atol=1e-3)
    assert nib.aff2axcodes(out_img.affine) == nib.aff2axcodes(affine)
    np.testing.assert_allclose(out_img.header.get_zooms(), np.linalg.norm(affine[:3, :3], axis=0), atol=1e-4)
    got = np.asarray(out_lab.dataobj)
    assert np.issubdtype(got.dtype, np.integer)
    for c in classes:
        assert dice(got == c, label == c) >= 0.95, (c, dice(got == c, label == c))
    assert set(np.unique(got)) <= {0, *classes}
    corr = np.corrcoef(np.asarray(out_img.dataobj).ravel(), image.ravel())[0, 1]
    assert corr > min_corr, corr


@pytest.fixture(scope="module")
def chaos_scan(chaos_dir):
    return load_real(chaos_dir, 1, slice(19, 25))  # 6 slices holding all four organs


@pytest.fixture(scope="module")
def cmr_scan(cmr_dir):
    return load_real(cmr_dir, 2, slice(4, 10))


def outputs(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.glob("*_*.nii.gz")) if dst.is_dir() else []


# ---------------------------------------------------------------------------------- recovery


def test_chaos_dicom_png_recovers_original(tmp_path, chaos_scan):
    image, label, affine = chaos_scan
    make_chaos_raw(tmp_path / "raw", 1, image, label, affine)
    report = run_preprocessing("chaos_mr_t2", tmp_path / "raw", tmp_path / "out", progress=False)
    assert report.ok, report.failed
    # the original is already clipped at its 99.5th percentile; the recipe clips the raw volume again
    assert_recovered(tmp_path / "out", 1, image, label, affine, classes=(1, 2, 3, 4))
    summary = json.loads((tmp_path / "out" / "dataset_summary.json").read_text())
    scan = summary["scans"]["1"]
    assert scan["shape"] == [256, 256, 6] and scan["orientation"] == "LAS"
    assert scan["spacing"] == pytest.approx([1.25, 1.25, 7.7], abs=1e-4)
    got = np.asarray(nib.load(str(tmp_path / "out" / "label_1.nii.gz")).dataobj)
    for c, name in ((1, "liver"), (4, "spleen")):
        assert scan["voxels_per_class"][name] == int((got == c).sum())
    img = np.asarray(nib.load(str(tmp_path / "out" / "image_1.nii.gz")).dataobj)
    assert scan["intensity_range"] == pytest.approx([float(img.min()), float(img.max())])

    # faithful resampling (per-class linear + round, size int(n * s / t + 1)) recovers the labels too:
    # int(11 * 3.85 / 7.7 + 1) = 6 slices, int(340 * 1.0 / 1.25 + 1) = 273 columns centre-cropped to 256
    faithful = run_preprocessing("chaos_mr_t2", tmp_path / "raw", tmp_path / "faithful", faithful=True, progress=False)
    assert faithful.ok, faithful.failed
    assert_recovered(tmp_path / "faithful", 1, image, label, affine, classes=(1, 2, 3, 4))


def test_chaos_pngs_flip_rows_for_dcm2niix_images(tmp_path, chaos_scan):
    """The reference's setting: a dcm2niix NIfTI (rows reversed, LAS) + PNGs, flipped along the rows."""
    image, label, affine = chaos_scan
    raw = tmp_path / "raw"
    (raw / "niis").mkdir(parents=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(raw / "niis" / "image_1.nii.gz"))
    write_png_masks(label[:, ::-1], raw / "MR" / "1" / "T2SPIR" / "Ground", decreasing=False)  # DICOM row order
    recipe = load_recipe("chaos_mr_t2")
    recipe["raw"].update(image="niis/image_{id}.nii.gz", image_reader="NibabelReader")
    recipe["steps"] = [s for s in recipe["steps"] if "orientation" not in s]
    recipe["raw"]["chaos_png"]["flip_rows"] = True
    assert run_preprocessing(recipe, raw, tmp_path / "flipped", progress=False).ok
    assert_recovered(tmp_path / "flipped", 1, image, label, affine, classes=(1, 2, 3, 4))
    # without the flip the masks land upside down: the organs no longer overlap
    recipe["raw"]["chaos_png"]["flip_rows"] = False
    assert run_preprocessing(recipe, raw, tmp_path / "unflipped", progress=False).ok
    wrong = np.asarray(nib.load(str(tmp_path / "unflipped" / "label_1.nii.gz")).dataobj)
    assert dice(wrong == 4, label == 4) < 0.5


def test_chaos_itk_reader_places_pngs_by_dicom_position(tmp_path, chaos_scan):
    """ITKReader stacks by position, not instance number; PNGs numbered from 0 pair by rank."""
    image, label, affine = chaos_scan
    base = make_chaos_raw(tmp_path / "raw", 1, image[..., :4], label[..., :4], affine)
    ground = base / "Ground"
    for png in sorted(ground.iterdir()):  # IMG-0002-<instance>.png -> mask_<instance - 1>.png
        png.rename(ground / f"mask_{int(png.stem.split('-')[-1]) - 1:03d}.png")
    recipe = load_recipe("chaos_mr_t2")
    recipe["raw"]["image_reader"] = "ITKReader"
    assert run_preprocessing(recipe, tmp_path / "raw", tmp_path / "out", progress=False).ok
    assert_recovered(tmp_path / "out", 1, image[..., :4], label[..., :4], affine, classes=(1, 2, 3, 4))


def test_size_rules():
    from fsmis_monai.transforms import output_size

    # docs/reference.md#quirk-preprocessing: the notebooks' int(n * s / t + 1) keeps one voxel past the data at equal spacing
    assert output_size(37, 7.7, 7.7, "reference") == 38 and output_size(37, 7.7, 7.7, "extent") == 37
    assert output_size(448, 0.7, 0.7 * 1.75, "reference") == 257  # the Synapse 257 x 257
    assert output_size(576, 0.62500003, 1.25, "extent") == 288  # header noise does not add a voxel


def test_cmr_raw_labels_mapped_and_geometry_exact(tmp_path, cmr_scan):
    image, label, affine = cmr_scan
    assert set(np.unique(label)) == {0, 200, 500, 600}  # the real scan holds the raw values
    make_cmr_raw(tmp_path / "raw", 2, image, label, affine)
    report = run_preprocessing("cmr_bssfp", tmp_path / "raw", tmp_path / "out", progress=False)
    assert report.ok, report.failed
    canonical = np.select([label == 200, label == 500, label == 600], [1, 2, 3], 0)
    clipped = np.minimum(image, np.percentile(image, 99.5))
    assert_recovered(tmp_path / "out", 2, clipped, canonical, affine, classes=(1, 2, 3))
    classmap = json.loads((tmp_path / "out" / "classmap.json").read_text())
    assert set(classmap) == {"lv_myocardium", "lv_blood_pool", "right_ventricle"}
    assert classmap["right_ventricle"]["2"] == [int(z) for z in np.nonzero((canonical == 3).any((0, 1)))[0]]

    keep = run_preprocessing("cmr_bssfp", tmp_path / "raw", tmp_path / "raw_labels", keep_raw=True, progress=False)
    assert keep.ok
    assert_recovered(tmp_path / "raw_labels", 2, clipped, label, affine, classes=(200, 500, 600))


def test_synapse_window_crop_and_exact_256(tmp_path, chaos_scan):
    image, label, affine = chaos_scan
    image, label, affine = image[..., :4], label[..., :4], affine  # 4 slices are enough here
    make_synapse_raw(tmp_path / "raw", 21, image, label, affine)
    report = run_preprocessing("synapse_ct", tmp_path / "raw", tmp_path / "out", progress=False)
    assert report.ok, report.failed
    assert outputs(tmp_path / "out") == ["image_10.nii.gz", "label_10.nii.gz"]  # raw 21 is the 11th training scan
    syn = np.zeros_like(label)
    for chaos, s in SYNAPSE_FROM_CHAOS.items():
        syn[label == chaos] = s
    hu = np.clip(image / image.max() * 700.0 - 400.0, -125, 275)
    assert_recovered(tmp_path / "out", 10, hu, syn, affine, classes=(1, 2, 3, 6))
    img = np.asarray(nib.load(str(tmp_path / "out" / "image_10.nii.gz")).dataobj)
    assert img.min() == pytest.approx(0.0, abs=1e-3) and img.max() == pytest.approx(255.0, abs=1e-3)


# -------------------------------------------------------------------------------- bad input


def _fails_cleanly(tmp_path: Path, recipe: str, raw: Path, culprit: Path, expect: str) -> None:
    report = run_preprocessing(recipe, raw, tmp_path / "out", progress=False)
    assert not report.ok
    (message,) = report.failed.values()
    assert str(culprit) in message and expect in message, message
    assert outputs(tmp_path / "out") == []
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    summary = json.loads((tmp_path / "out" / "dataset_summary.json").read_text())
    assert list(summary["failed"].values()) == [message]


@pytest.fixture
def chaos_raw(tmp_path, chaos_scan):
    image, label, affine = chaos_scan
    return make_chaos_raw(tmp_path / "raw", 1, image[..., :3], label[..., :3], affine)


def test_chaos_empty_series(tmp_path, chaos_raw):
    for f in (chaos_raw / "DICOM_anon").iterdir():
        f.unlink()
    (chaos_raw / "DICOM_anon" / "notes.txt").write_text("not a DICOM file")
    _fails_cleanly(tmp_path, "chaos_mr_t2", tmp_path / "raw", chaos_raw / "DICOM_anon", "empty DICOM series")


def test_chaos_zero_byte_slice(tmp_path, chaos_raw):
    victim = sorted((chaos_raw / "DICOM_anon").iterdir())[1]
    victim.write_bytes(b"")
    _fails_cleanly(tmp_path, "chaos_mr_t2", tmp_path / "raw", victim, "0 bytes")


def test_chaos_png_count_mismatch(tmp_path, chaos_raw):
    sorted((chaos_raw / "Ground").iterdir())[0].unlink()
    _fails_cleanly(tmp_path, "chaos_mr_t2", tmp_path / "raw", chaos_raw / "Ground", "does not match the image")


def test_chaos_unknown_grey_value(tmp_path, chaos_raw):
    from PIL import Image

    png = sorted((chaos_raw / "Ground").iterdir())[0]
    grey = np.asarray(Image.open(png)).copy()
    grey[5, 5] = 100  # between right kidney (110-135) and liver (55-70)
    Image.fromarray(grey).save(png)
    _fails_cleanly(tmp_path, "chaos_mr_t2", tmp_path / "raw", png, "grey values [100]")


@pytest.fixture
def cmr_raw(tmp_path, cmr_scan):
    image, label, affine = cmr_scan
    return make_cmr_raw(tmp_path / "raw", 2, image[..., :2], label[..., :2], affine)


def test_cmr_label_value_outside_map(tmp_path, cmr_raw):
    ip, lp = cmr_raw
    lab = nib.load(str(lp))
    arr = np.asarray(lab.dataobj).copy()
    arr[0, 0, 0] = 300
    nib.save(nib.Nifti1Image(arr, lab.affine), str(lp))
    _fails_cleanly(tmp_path, "cmr_bssfp", tmp_path / "raw", lp, "label values [300]")


def test_cmr_float_label(tmp_path, cmr_raw):
    ip, lp = cmr_raw
    lab = nib.load(str(lp))
    arr = np.asarray(lab.dataobj).astype(np.float32) / 3.0  # 200/3 ... not integers
    nib.save(nib.Nifti1Image(arr, lab.affine), str(lp))
    _fails_cleanly(tmp_path, "cmr_bssfp", tmp_path / "raw", lp, "non-integer")


def test_cmr_shape_mismatch(tmp_path, cmr_raw):
    ip, lp = cmr_raw
    lab = nib.load(str(lp))
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[:-3], lab.affine), str(lp))
    _fails_cleanly(tmp_path, "cmr_bssfp", tmp_path / "raw", lp, "does not match the image")


def test_cmr_unreadable_and_empty_files(tmp_path, cmr_raw):
    ip, lp = cmr_raw
    ip.write_bytes(b"\x1f\x8b definitely not a NIfTI")
    _fails_cleanly(tmp_path, "cmr_bssfp", tmp_path / "raw", ip, "cannot read")
    ip.write_bytes(b"")
    _fails_cleanly(tmp_path, "cmr_bssfp", tmp_path / "raw", ip, "0 bytes")


def test_synapse_label_outside_map_and_pairing(tmp_path, chaos_scan):
    image, label, affine = chaos_scan
    make_synapse_raw(tmp_path / "raw", 1, image[..., :2], label[..., :2], affine)
    lp = tmp_path / "raw" / "label" / "label0001.nii.gz"
    lab = nib.load(str(lp))
    arr = np.asarray(lab.dataobj).copy()
    arr[100, 100, 0] = 14  # Synapse has 13 organs
    nib.save(nib.Nifti1Image(arr, lab.affine), str(lp))
    _fails_cleanly(tmp_path, "synapse_ct", tmp_path / "raw", lp, "label values [14]")
    # an image without its label stops the run before anything is processed, naming the file
    (tmp_path / "raw" / "img" / "img0002.nii.gz").write_bytes((tmp_path / "raw" / "img" / "img0001.nii.gz").read_bytes())
    with pytest.raises(FsmisInputError, match="img0002.nii.gz: no matching label"):
        run_preprocessing("synapse_ct", tmp_path / "raw", tmp_path / "out2", progress=False)


def test_generic_recipe_and_classmap_counts_class_pixels(tmp_path, cmr_scan):
    image, label, affine = cmr_scan
    label = np.select([label == 200, label == 500, label == 600], [1, 2, 3], 0)
    # slice 0: 2 pixels of class 1 beside 10 of class 3. The notebooks' test (sum of label *values* on
    # the slice >= MIN_TP) would list class 1 there for MIN_TP=5; its pixel count (2) does not reach 5.
    label[..., 0] = 0
    label[10:12, 10, 0] = 1
    label[20:30, 20, 0] = 3
    (tmp_path / "raw" / "images").mkdir(parents=True)
    (tmp_path / "raw" / "labels").mkdir()
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(tmp_path / "raw" / "images" / "7.nii.gz"))
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(tmp_path / "raw" / "labels" / "7.nii.gz"))
    report = run_preprocessing("generic", tmp_path / "raw", tmp_path / "out", min_pixels=5, progress=False)
    assert report.ok, report.failed
    classmap = json.loads((tmp_path / "out" / "classmap.json").read_text())
    out = np.asarray(nib.load(str(tmp_path / "out" / "label_7.nii.gz")).dataobj)
    assert out.shape == label.shape  # already 1.25 mm and 256 x 256: nothing to change
    np.testing.assert_array_equal(out, label)
    value_sum_rule = [z for z in range(out.shape[2]) if (out[..., z] == 1).any() and out[..., z].sum() >= 5]
    assert 0 in value_sum_rule and 0 not in classmap["class_1"]["7"]
    assert 0 in classmap["class_3"]["7"]
    for c in (1, 2, 3):  # an independent count, slice by slice
        expected = [z for z in range(out.shape[2]) if int(np.count_nonzero(out[:, :, z] == c)) >= 5]
        assert classmap[f"class_{c}"]["7"] == expected
    assert slice_index(out, [1], min_pixels=1)[1][0] == 0


def test_generic_recipe_names_a_bad_label(tmp_path, cmr_scan):
    image, label, affine = cmr_scan
    (tmp_path / "raw" / "images").mkdir(parents=True)
    (tmp_path / "raw" / "labels").mkdir()
    nib.save(nib.Nifti1Image(image[..., :2].astype(np.float32), affine), str(tmp_path / "raw" / "images" / "3.nii.gz"))
    (tmp_path / "raw" / "labels" / "3.nii.gz").write_bytes(b"")
    _fails_cleanly(tmp_path, "generic", tmp_path / "raw", tmp_path / "raw" / "labels" / "3.nii.gz", "0 bytes")


def test_skip_finished_and_overwrite(tmp_path, cmr_raw):
    first = run_preprocessing("cmr_bssfp", tmp_path / "raw", tmp_path / "out", progress=False)
    assert [s["status"] for s in first.scans.values()] == ["written"]
    stamp = (tmp_path / "out" / "image_2.nii.gz").stat().st_mtime_ns
    umask = os.umask(0)
    os.umask(umask)
    for name in ("image_2.nii.gz", "label_2.nii.gz", "classmap.json"):  # atomic writes keep normal permissions
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o666 & ~umask
    again = run_preprocessing("cmr_bssfp", tmp_path / "raw", tmp_path / "out", progress=False)
    assert [s["status"] for s in again.scans.values()] == ["skipped"]
    assert again.scans[2]["voxels_per_class"] == first.scans[2]["voxels_per_class"]
    assert (tmp_path / "out" / "image_2.nii.gz").stat().st_mtime_ns == stamp
    forced = run_preprocessing("cmr_bssfp", tmp_path / "raw", tmp_path / "out", overwrite=True, progress=False)
    assert [s["status"] for s in forced.scans.values()] == ["written"]


def test_cli_workers_report_bad_scan_and_finish_others(tmp_path, cmr_dir, capsys):
    from fsmis_monai.cli import main

    raw = tmp_path / "raw"
    for sid in (2, 3):
        make_cmr_raw(raw, sid, *load_real(cmr_dir, sid, slice(5, 7)))
    bad = raw / "c0t2lge" / "patient9_C0.nii.gz"
    bad.write_bytes(b"")
    (raw / "c0t2lge" / "patient9_C0_manual.nii.gz").write_bytes((raw / "c0t2lge" / "patient2_C0_manual.nii.gz").read_bytes())
    code = main(["preprocess", "--recipe", "cmr", "--src", str(raw), "--dst", str(tmp_path / "out"),
                 "--workers", "2", "--no-progress"])
    assert code == 1
    assert f"{bad}: file is empty (0 bytes)" in capsys.readouterr().err
    assert outputs(tmp_path / "out") == ["image_2.nii.gz", "image_3.nii.gz", "label_2.nii.gz", "label_3.nii.gz"]
    summary = json.loads((tmp_path / "out" / "dataset_summary.json").read_text())
    assert sorted(summary["scans"]) == ["2", "3"] and list(summary["failed"]) == ["9"]


def test_recipes_load_and_name_problems(tmp_path):
    for name in ("chaos_mr_t2", "synapse_ct", "cmr_bssfp", "generic", "chaos", "sabs"):
        assert load_recipe(name)["steps"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nraw: {image: 'img.nii.gz', label: 'lab_{id}.nii.gz'}\nsteps: []\n")
    with pytest.raises(FsmisInputError, match="bad.yaml.*raw.image"):
        load_recipe(bad)
    with pytest.raises(FsmisInputError, match="recipe not found"):
        load_recipe("no_such_recipe")

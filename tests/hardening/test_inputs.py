"""Bad input, tried on small windows of real CHAOS/CMR scans: every case ends in a clear error naming the
file and the problem, or in a defined behaviour checked here (docs/hardening.md lists them all)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fsmis_monai.bundles import CPU_OVERRIDES
from fsmis_monai.data.datalist import ScanFiles, pair_scans
from fsmis_monai.data.episodes import GroundTruthEpisodeDataset, SupervoxelEpisodeDataset, setting_exclusions
from fsmis_monai.data.volumes import load_volume, load_volumes, training_volumes
from fsmis_monai.engines.inference import FewShotVolumeInferer, load_support
from fsmis_monai.io import FsmisInputError, load_nifti, save_nifti

from _real_scans import write_chaos_window
from conftest import REPO_ROOT as REPO

SIZE, DEPTH = 64, 8


@pytest.fixture(scope="module")
def scans(chaos_dir, tmp_path_factory) -> Path:
    """Scans 1 and 2 of CHAOS, 64 x 64 x 8 through the liver, with a synthetic pseudolabel (quadrants)."""
    root = write_chaos_window(chaos_dir, tmp_path_factory.mktemp("hardening_inputs") / "data", size=SIZE, depth=DEPTH)
    pseudo = root.parent / "pseudo"
    quadrants = np.zeros((SIZE, SIZE, DEPTH), np.int32)
    quadrants[: SIZE // 2, : SIZE // 2] = 1
    quadrants[SIZE // 2 :, SIZE // 2 :] = 2
    for i in (1, 2):
        affine = nib.load(root / f"image_{i}.nii.gz").affine
        save_nifti(pseudo / f"superpix-MIDDLE_{i}.nii.gz", quadrants, affine=affine)
    return root


def _copy(scans: Path, dst: Path) -> Path:
    shutil.copytree(scans, dst)
    return dst


def _zscore(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.mean()) / a.std()


# ------------------------------------------------------------------------------------------- unreadable files


def _truncate_gz(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncate_raw(path: Path) -> Path:
    """An uncompressed .nii whose voxel data stops half-way (header intact)."""
    raw = path.with_name(path.name[: -len(".gz")])
    raw.write_bytes(gzip.decompress(path.read_bytes()))
    data = raw.read_bytes()
    raw.write_bytes(data[: 352 + (len(data) - 352) // 2])
    path.unlink()
    return raw


@pytest.mark.parametrize("fault, problem", [
    ("truncated_gz", "cannot read as NIfTI"),
    ("truncated_raw", "cannot read as NIfTI"),
    ("zero_bytes", "empty"),
    ("text", "cannot read as NIfTI"),
    ("random_bytes", "cannot read as NIfTI"),
])
def test_unreadable_image_or_label_is_named(scans, tmp_path, fault, problem):
    for kind in ("image", "label"):
        data = _copy(scans, tmp_path / kind)
        bad = data / f"{kind}_2.nii.gz"
        if fault == "truncated_gz":
            _truncate_gz(bad)
        elif fault == "truncated_raw":
            bad = _truncate_raw(bad)
        elif fault == "zero_bytes":
            bad.write_bytes(b"")
        elif fault == "text":
            bad.write_text("patient notes, not an image\n")
        else:
            bad.write_bytes(np.random.default_rng(0).bytes(4096))
        with pytest.raises(FsmisInputError, match=problem) as err:
            training_volumes(data, "chaos", fold=None)
        assert str(bad) in str(err.value)


def test_non_image_files_in_the_data_folder_are_ignored(scans, tmp_path):
    """Pairing reads only ``image_<id>``/``label_<id>`` NIfTI names: notes, hidden files, backups, folders
    and other suffixes are left out, and the pairs are those of the clean folder."""
    data = _copy(scans, tmp_path / "data")
    clean = [s.as_dict() for s in pair_scans(data)]
    (data / "README.txt").write_text("notes")
    (data / ".DS_Store").write_bytes(b"\0\1")
    (data / "image_1.nii.gz.bak").write_bytes(b"old")
    (data / "image_3.png").write_bytes(b"\x89PNG")
    (data / "label_x.nii.gz").write_bytes(b"")
    (data / "image_4.nii.gz.d").mkdir()
    assert [s.as_dict() for s in pair_scans(data)] == clean
    assert [v.scan_id for v in training_volumes(data, "chaos", fold=None)] == [1, 2]


# ------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("fault, problem", [
    ("value_outside_map", r"label values \[7\] are not in the chaos_mr_t2 label map"),
    ("float_label", "values must be integers"),
    ("nan_label", "NaN or infinite"),
    ("shape", r"shape \(64, 64, 7\) differs"),
    ("geometry", "geometry"),
])
def test_label_problems_are_named(scans, tmp_path, fault, problem):
    data = _copy(scans, tmp_path / "data")
    path = data / "label_1.nii.gz"
    label, img = load_nifti(path)
    label, affine = label.astype(np.float32), img.affine.copy()
    if fault == "value_outside_map":
        label[0, 0, 0] = 7
    elif fault == "float_label":
        label[label == 1] = 0.5
    elif fault == "nan_label":
        label[0, 0, 0] = np.nan
    elif fault == "shape":
        label = label[..., :-1]
    else:
        affine[:3, :3] *= 1.5
    save_nifti(path, label, affine=affine)
    with pytest.raises(FsmisInputError, match=problem) as err:
        training_volumes(data, "chaos", fold=None)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------------- pseudolabels


def test_pseudolabel_for_another_scan_extra_or_missing(scans, tmp_path):
    data = _copy(scans, tmp_path / "data")
    pseudo = _copy(scans.parent / "pseudo", tmp_path / "pseudo")
    assert [v.pseudolabel.max() for v in training_volumes(data, "chaos", fold=None, pseudolabel_dir=pseudo)] == [2, 2]
    # scan 2's file under scan 1's name: same shape here, so its geometry (another patient's affine) betrays it
    assert not np.allclose(nib.load(data / "image_1.nii.gz").affine, nib.load(data / "image_2.nii.gz").affine)
    shutil.copy(pseudo / "superpix-MIDDLE_2.nii.gz", pseudo / "superpix-MIDDLE_1.nii.gz")
    with pytest.raises(FsmisInputError, match=r"superpix-MIDDLE_1\.nii\.gz: geometry"):
        training_volumes(data, "chaos", fold=None, pseudolabel_dir=pseudo)
    # an extra pseudolabel without its image, and a missing one, are pairing errors naming the file
    shutil.copy(scans.parent / "pseudo" / "superpix-MIDDLE_1.nii.gz", pseudo / "superpix-MIDDLE_1.nii.gz")
    shutil.copy(pseudo / "superpix-MIDDLE_2.nii.gz", pseudo / "superpix-MIDDLE_9.nii.gz")
    with pytest.raises(FsmisInputError, match=r"superpix-MIDDLE_9\.nii\.gz: no matching image_9"):
        training_volumes(data, "chaos", fold=None, pseudolabel_dir=pseudo)
    (pseudo / "superpix-MIDDLE_9.nii.gz").unlink()
    (pseudo / "superpix-MIDDLE_2.nii.gz").unlink()
    with pytest.raises(FsmisInputError, match=r"image_2\.nii\.gz: no matching superpix-\*_2"):
        training_volumes(data, "chaos", fold=None, pseudolabel_dir=pseudo)


# ------------------------------------------------------------------------------------------- image content


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_voxels_are_refused_by_training_evaluation_and_inference(scans, tmp_path, value):
    data = _copy(scans, tmp_path / "data")
    path = data / "image_2.nii.gz"
    image, img = load_nifti(path, dtype=np.float32)
    image[3, 4, 5] = value
    save_nifti(path, image, affine=img.affine)
    with pytest.raises(FsmisInputError, match="NaN or infinite") as err:
        training_volumes(data, "chaos", fold=None)
    assert str(path) in str(err.value)
    with pytest.raises(FsmisInputError, match="NaN or infinite"):  # support of the inference bundle
        load_support(path, data / "label_2.nii.gz", 1)
    from monai.data import MetaTensor
    query = MetaTensor(torch.as_tensor(image)[None, None], meta={"filename_or_obj": [str(path)]})
    inferer = FewShotVolumeInferer(*load_support(data / "image_1.nii.gz", data / "label_1.nii.gz", 1))
    from fsmis_monai.networks.methods import build_method
    with pytest.raises(FsmisInputError, match="NaN or infinite") as err:
        inferer(query, build_method("adnet", encoder="small"))
    assert str(path) in str(err.value)


def test_constant_volume_is_refused_for_z_score_and_loads_without_it(scans, tmp_path):
    data = _copy(scans, tmp_path / "data")
    path = data / "image_1.nii.gz"
    save_nifti(path, np.full((SIZE, SIZE, DEPTH), 42.0, np.float32), affine=nib.load(path).affine)
    with pytest.raises(FsmisInputError, match="constant image") as err:
        training_volumes(data, "chaos", fold=None)
    assert str(path) in str(err.value)
    vol = load_volumes(pair_scans(data, ids=[1]), "chaos", normalization="none", cache=False)[0]
    assert np.all(vol.image == 42.0)


def test_volume_smaller_than_the_crop_is_centre_padded(scans):
    """image_size larger than the scan in ``crop`` mode pads symmetrically with 0 (the z-scored mean)."""
    files = pair_scans(scans, ids=[1])
    vol = load_volumes(files, "chaos", image_size=(SIZE + 16, SIZE + 10), cache=False)[0]
    raw = np.asarray(nib.load(files[0].image).dataobj)
    label = np.asarray(nib.load(files[0].label).dataobj)
    expected = np.pad(np.moveaxis(_zscore(raw), -1, 0), ((0, 0), (8, 8), (5, 5)))
    np.testing.assert_allclose(vol.image, expected, atol=1e-5)
    np.testing.assert_array_equal(vol.label, np.pad(np.moveaxis(label, -1, 0), ((0, 0), (8, 8), (5, 5))))


def test_257_by_257_scans_crop_to_256_or_are_refused_when_mixed(chaos_dir, tmp_path):
    """Synapse-style 257^2 scans: with image_size 256 the centre crop keeps rows/columns 0..255 (MONAI's
    centre for an odd excess), the same voxels as the original 256^2 scan; mixed sizes without
    image_size are an error naming the scans."""
    data = tmp_path / "data"
    for i in (1, 2):
        img = nib.load(chaos_dir / f"image_{i}.nii.gz")
        lab = np.asarray(nib.load(chaos_dir / f"label_{i}.nii.gz").dataobj)[..., 10:14]
        arr = np.asarray(img.dataobj)[..., 10:14].astype(np.float32)
        if i == 2:
            arr, lab = np.pad(arr, ((0, 1), (0, 1), (0, 0)), mode="edge"), np.pad(lab, ((0, 1), (0, 1), (0, 0)))
        save_nifti(data / f"image_{i}.nii.gz", arr, affine=img.affine)
        save_nifti(data / f"label_{i}.nii.gz", lab.astype(np.uint8), affine=img.affine)
    with pytest.raises(FsmisInputError, match=r"differ in in-plane size.*\(257, 257\)"):
        load_volumes(pair_scans(data), "chaos", normalization="none", cache=False)
    vols = load_volumes(pair_scans(data), "chaos", normalization="none", image_size=(256, 256), cache=False)
    original = np.asarray(nib.load(chaos_dir / "image_2.nii.gz").dataobj)[..., 10:14]
    np.testing.assert_array_equal(vols[1].image, np.moveaxis(original, -1, 0).astype(np.float32))


def test_2d_input_is_refused_where_3d_is_expected(scans, tmp_path):
    image = np.asarray(nib.load(scans / "image_1.nii.gz").dataobj)
    flat = tmp_path / "image_1.nii.gz"
    save_nifti(flat, image[..., 0])
    with pytest.raises(FsmisInputError, match=r"expected a 3D volume, got shape \(64, 64\)") as err:
        load_volume(ScanFiles(1, flat), "chaos")
    assert str(flat) in str(err.value)
    with pytest.raises(FsmisInputError, match="3D"):
        load_support(flat, flat, 1)
    from monai.data import MetaTensor

    from fsmis_monai.networks.methods import build_method
    inferer = FewShotVolumeInferer(*load_support(scans / "image_1.nii.gz", scans / "label_1.nii.gz", 1))
    query = MetaTensor(torch.zeros(1, 1, 64, 64), meta={"filename_or_obj": [str(flat)]})
    with pytest.raises(FsmisInputError, match=r"image_1\.nii\.gz: expected query volumes"):
        inferer(query, build_method("adnet", encoder="small"))


def test_non_axial_orientation_slices_along_the_last_array_axis(cmr_dir):
    """Defined behaviour: the pipeline slices along the third array axis whatever the affine says (CMR
    short-axis stacks are stored P-S-R); the affine travels with the scan to the written predictions.
    Reorient with a recipe's ``orientation`` step when the stored axis is not the one to slice."""
    path = cmr_dir / "image_1.nii.gz"
    img = nib.load(path)
    assert nib.aff2axcodes(img.affine)[2] not in ("S", "I")
    vol = load_volume(ScanFiles(1, path, cmr_dir / "label_1.nii.gz"), "cmr")
    raw = np.asarray(img.dataobj)
    assert vol.num_slices == raw.shape[2]
    np.testing.assert_allclose(vol.image[5], _zscore(raw)[:, :, 5], atol=1e-5)
    np.testing.assert_array_equal(vol.affine, img.affine)


# ------------------------------------------------------------------------------------------- episodes and methods


def test_class_absent_from_every_training_volume(scans, tmp_path):
    """Ground-truth episodes of a class no training scan holds: an error naming the class. Setting 2
    excluding an absent class removes nothing (defined)."""
    data = _copy(scans, tmp_path / "data")
    vols = training_volumes(data, "chaos", fold=None, image_size=(SIZE, SIZE))
    assert not any((v.label == 4).any() for v in vols)  # no spleen in these liver windows
    with pytest.raises(ValueError, match="class 4: 0 training slices"):
        GroundTruthEpisodeDataset(vols, classes=[1, 4], length=2)
    pseudo_vols = training_volumes(data, "chaos", fold=None, pseudolabel_dir=scans.parent / "pseudo")
    ds = SupervoxelEpisodeDataset(pseudo_vols, length=2, min_size=1, exclude_classes=[4], augmentation=False)
    assert all(len(z) == DEPTH for z in ds.allowed_slices.values())
    assert setting_exclusions("chaos", 2, [4]) == (4,)


def test_k_shot_larger_than_the_slices_available(scans):
    vols = training_volumes(scans, "chaos", fold=None, pseudolabel_dir=scans.parent / "pseudo")
    with pytest.raises(ValueError, match=rf"n_shots \+ n_queries = {DEPTH + 1} consecutive slices.*{DEPTH} slices"):
        SupervoxelEpisodeDataset(vols, length=2, n_shots=DEPTH, min_size=1)
    liver_slices = sum(int((v.label == 1).any(axis=(1, 2)).sum()) for v in vols)
    with pytest.raises(ValueError, match=rf"class 1: {liver_slices} training slices"):
        GroundTruthEpisodeDataset(vols, classes=[1], length=2, n_shots=liver_slices)
    # inference: asking for more support slices than hold the class uses each of them once, with a warning
    lab = np.asarray(nib.load(scans / "label_1.nii.gz").dataobj)
    n_liver = int((lab == 1).any(axis=(0, 1)).sum())
    with pytest.warns(UserWarning, match=f"on {n_liver} slices"):
        images, masks = load_support(scans / "image_1.nii.gz", scans / "label_1.nii.gz", 1, n_support_slices=50)
    assert images.shape[0] == n_liver and all(m.sum() > 0 for m in masks)


def _real_episode(scans: Path, query_size: int):
    vol = load_volume(ScanFiles(1, scans / "image_1.nii.gz", scans / "label_1.nii.gz"), "chaos")
    z = int(np.flatnonzero((vol.label == 1).any(axis=(1, 2)))[DEPTH // 2 - 1])
    support = torch.as_tensor(vol.image_slice(z))[None]
    mask = torch.as_tensor((vol.label[z] == 1).astype(np.float32))[None]
    query = torch.as_tensor(vol.image_slice(z + 1))[None]
    if query_size != SIZE:
        query = torch.nn.functional.interpolate(query, size=(query_size, query_size), mode="bilinear")
    return support, mask, query


@pytest.mark.parametrize("method", ["ssl_alpnet", "adnet", "qnet", "lslpn", "pami", "difd"])
def test_empty_support_mask_and_other_query_size(scans, method):
    """Empty support mask: every method returns finite logits (defined: see docs/hardening.md; evaluation
    and inference refuse empty supports before this). A query of another in-plane size than the support:
    logits at the query's size, or (LSLPN, GMRD: tested in their own files) an error saying so."""
    from fsmis_monai.networks.methods import build_method

    torch.manual_seed(0)
    net = build_method(method, encoder="small").eval()
    support, mask, query = _real_episode(scans, SIZE)
    with torch.no_grad():
        logits = net.segment(query, net.encode_support(support, torch.zeros_like(mask)))
    assert logits.shape == (1, 2, SIZE, SIZE) and torch.isfinite(logits).all()
    if method in ("ssl_alpnet", "adnet", "lslpn"):  # no foreground prototype: all background
        assert (logits.argmax(1) == 0).all()
    _, _, big = _real_episode(scans, 80)
    with torch.no_grad():
        state = net.encode_support(support, mask)
        if method == "lslpn":
            with pytest.raises(ValueError, match="differs from the support size"):
                net.segment(big, state)
            return
        logits = net.segment(big, state)
    assert logits.shape == (1, 2, 80, 80) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------- configs


def _parse(key: str, **override):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "adnet" / "configs" / "train.json"))
    parser.update({"bundle_root": str(REPO / "bundles" / "adnet"), **override})
    return parser.get_parsed_content(key)


def _message(err: pytest.ExceptionInfo) -> str:
    """MONAI wraps instantiation errors; the chain holds ours."""
    parts, e = [], err.value
    while e is not None:
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def test_config_errors_are_clear(scans, tmp_path):
    pseudo = str(scans.parent / "pseudo")
    base = {"dataset_dir": str(scans), "pseudolabel_dir": pseudo, "generate_pseudolabels": False,
            "fold": None, **CPU_OVERRIDES, "image_size": SIZE}
    with pytest.raises(Exception) as err:
        _parse("network_def", **{**base, "method": "unet"})
    assert "unknown method 'unet'" in _message(err) and "adnet" in _message(err)
    with pytest.raises(Exception) as err:  # the config's placeholder dataset_dir left as it is
        _parse("train#volumes", **{k: v for k, v in base.items() if k != "dataset_dir"})
    assert "/workspace/data/chaos_mr_t2: data folder not found" in _message(err)
    with pytest.raises(Exception) as err:
        _parse("train#volumes", **{**base, "fold": 7})
    assert "fold" in _message(err) and "7" in _message(err)
    for iterations in (-5, 0):
        with pytest.raises(Exception) as err:
            _parse("train#dataset", **{**base, "max_iterations": iterations, "min_size": 1})
        assert f"max_iterations x batch_size in the bundles) must be >= 1, got {iterations}" in _message(err)
    assert len(_parse("train#dataset", **{**base, "max_iterations": 3, "min_size": 1})) == 3


# ------------------------------------------------------------------------------------------- raw DICOM


@pytest.mark.parametrize("fault", ["truncated", "not_dicom", "stray_note"])
def test_damaged_dicom_slice_is_named_and_a_stray_note_ignored(chaos_dir, tmp_path, fault):
    """A CHAOS series (real slices written as DICOM): a truncated slice or a ``.dcm`` that is no DICOM fails
    the scan naming that file (readers would drop it silently: a lost slice); a note in the folder is ignored."""
    from _raw_scans import load_real, make_chaos_raw

    from fsmis_monai.preprocess import run_preprocessing

    image, label, affine = load_real(chaos_dir, 1, slice(19, 22))
    raw = make_chaos_raw(tmp_path / "raw", 1, image, label, affine)
    victim = sorted((raw / "DICOM_anon").iterdir())[1]
    if fault == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    elif fault == "not_dicom":
        victim.write_bytes(b"not a DICOM file" * 64)
    else:
        (raw / "DICOM_anon" / "notes.txt").write_text("scanned on the old machine")
    report = run_preprocessing("chaos_mr_t2", tmp_path / "raw", tmp_path / "out", progress=False)
    if fault == "stray_note":
        assert report.ok
        assert nib.load(tmp_path / "out" / "image_1.nii.gz").shape[2] == 3
        return
    assert not report.ok
    (message,) = report.failed.values()
    expected = "damaged DICOM slice" if fault == "truncated" else "not a DICOM file"
    assert message.startswith(f"{victim}: {expected}"), message
    assert not list((tmp_path / "out").glob("image_*.nii.gz"))

"""The data contract (fsmis_monai.data.contract): one pipeline for training, evaluation and inference, support
classes by name or raw value, predictions in the query file's own geometry. Real CHAOS / MS-CMRSeg scans."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fsmis_monai.data.contract import DataContract, contract_from_scans, load_contract, save_contract
from fsmis_monai.data.datalist import ScanFiles
from fsmis_monai.data.registry import get_dataset
from fsmis_monai.data.volumes import intensity_stats, load_volume
from fsmis_monai.engines.inference import (
    FewShotVolumeInferer,
    load_support,
    prediction_postprocessing,
    query_preprocessing,
)
from fsmis_monai.evaluation.evaluator import load_scan
from fsmis_monai.io import FsmisInputError

SIZES = {"stored": None, "resize128": ((128, 128), "resize"), "crop200": ((200, 200), "crop")}


def _contract(chaos_dir: Path, normalization: str, size) -> DataContract:
    c = contract_from_scans([chaos_dir / f"image_{i}.nii.gz" for i in (1, 2)], "chaos", normalization,
                            *(size or (None,)))
    assert c.orientation == "LAS" and c.spacing == (1.25, 1.25, 7.7)  # read from the scans' headers
    return c


@pytest.mark.parametrize("normalization,size", [("volume", "stored"), ("global", "stored"),
                                                ("slice_minmax", "stored"), ("none", "stored"),
                                                ("volume", "resize128"), ("global", "crop200")])
def test_training_evaluation_inference_see_the_same_input(chaos_dir, normalization, size):
    contract = _contract(chaos_dir, normalization, SIZES[size])
    files = ScanFiles(3, chaos_dir / "image_3.nii.gz", chaos_dir / "label_3.nii.gz")
    train = load_volume(files, "chaos", contract=contract).image  # [Z, H, W]
    evaluation = load_scan(files, get_dataset("chaos"), contract=contract).image  # [H, W, Z]
    inference = query_preprocessing(contract)({"image": str(files.image)})["image"][0].numpy()  # [H, W, Z]
    np.testing.assert_allclose(np.moveaxis(train, 0, -1), inference, atol=1e-6, rtol=0)
    np.testing.assert_allclose(evaluation, inference, atol=1e-6, rtol=0)
    # independent check of the intensity step on the stored grid (no resampling there)
    raw = np.asarray(nib.load(str(files.image)).dataobj, dtype=np.float64)
    if size == "stored":
        if normalization == "volume":
            expected = (raw - raw.mean()) / raw.std()
        elif normalization == "global":
            s = intensity_stats([ScanFiles(i, chaos_dir / f"image_{i}.nii.gz") for i in (1, 2)])
            expected = (raw - s.mean) / s.std
        elif normalization == "slice_minmax":
            lo, hi = raw.min(axis=(0, 1)), raw.max(axis=(0, 1))
            expected = (raw - lo) / np.maximum(hi - lo, 1e-8)  # an empty slice stays 0
        else:
            expected = raw
        np.testing.assert_allclose(inference, expected, atol=2e-4 * max(1.0, np.abs(expected).max()))
    else:
        assert inference.shape[:2] == SIZES[size][0]


def test_contract_round_trip_and_errors(tmp_path, chaos_dir):
    contract = _contract(chaos_dir, "global", SIZES["resize128"])
    path = save_contract(contract, tmp_path / "models" / "model.pt")
    assert path == tmp_path / "models" / "data_contract.json"
    assert load_contract(tmp_path / "models" / "model.pt") == contract
    with pytest.raises(FsmisInputError, match="no data contract beside the model"):
        load_contract(tmp_path / "elsewhere" / "model.pt")
    path.write_text('{"normalization": "global"}')
    with pytest.raises(FsmisInputError, match="data_contract.json: not a valid data contract"):
        load_contract(path)


def test_released_cmr_labels_by_name_and_raw_value(cmr_dir):
    image, label = cmr_dir / "image_1.nii.gz", cmr_dir / "label_1.nii.gz"
    raw = np.asarray(nib.load(str(label)).dataobj)
    by_name = load_support(image, label, "lv_myocardium", 3, dataset="cmr_bssfp")
    by_value = load_support(image, label, 200, 3, dataset="cmr_bssfp")
    by_text = load_support(image, label, "200", 3, dataset="cmr_bssfp")
    for a, b in ((by_name, by_value), (by_name, by_text)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    zs = [z for z in range(raw.shape[2]) if (raw[..., z] == 200).any()]
    assert by_name[1].shape[0] == 3
    for m in by_name[1]:  # each support mask is the myocardium (raw 200) of one of its slices
        assert m.sum() > 0 and any(np.array_equal(m.numpy(), raw[..., z] == 200) for z in zs)
    with pytest.raises(FsmisInputError, match=r"label_1.nii.gz: support class 1 is not a raw label value of "
                                              r"cmr_bssfp \(values found: \[0, 200, 500, 600\]; known: 200 -> 1 "
                                              r"lv_myocardium"):
        load_support(image, label, 1, 3, dataset="cmr_bssfp")
    with pytest.raises(FsmisInputError, match="'aorta' is not a class of cmr_bssfp.*600 -> 3 right_ventricle"):
        load_support(image, label, "aorta", 3, dataset="cmr_bssfp")


def test_own_masks_with_any_raw_value(cmr_dir, tmp_path):
    """A user's own data: masks stored 0/255, no dataset; class 255 works, names and absent values are named."""
    image = cmr_dir / "image_2.nii.gz"
    lab = nib.load(str(cmr_dir / "label_2.nii.gz"))
    mask = np.where(np.asarray(lab.dataobj) == 500, 255, 0).astype(np.uint8)
    own = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, lab.affine), str(own))
    images, masks = load_support(image, own, 255, 1, dataset=None)
    z = [z for z in range(mask.shape[2]) if (mask[..., z] == 255).any()]
    assert np.array_equal(masks[0].numpy(), mask[..., z[len(z) // 2]] == 255)
    with pytest.raises(FsmisInputError, match=r"mask.nii.gz: support class 'lv_blood_pool' is a name, but there is "
                                              r"no dataset.*values found: \[0, 255\]"):
        load_support(image, own, "lv_blood_pool", 1, dataset=None)
    with pytest.raises(FsmisInputError, match=r"support class 7: no voxel has that value \(values found: \[0, 255\]"):
        load_support(image, own, 7, 1, dataset=None)
    with pytest.raises(FsmisInputError, match=r"support class 255 is not a raw label value of chaos_mr_t2 "
                                              r"\(values found: \[0, 255\].*dataset_name None"):
        load_support(image, own, 255, 1, dataset="chaos")


def _variants(src: Path, out: Path) -> dict[str, Path]:
    """The same scan stored three other ways: in-plane axes swapped, reoriented (RAS-like), re-gridded."""
    from monai.transforms import LoadImage, Spacing

    img = nib.load(str(src))
    a = np.asarray(img.dataobj, dtype=np.float32)
    files = {"original": (a, img.affine),
             "swapped": (a.transpose(1, 0, 2), img.affine[:, [1, 0, 2, 3]])}
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [a.shape[0] - 1, a.shape[1] - 1]
    files["reoriented"] = (a[::-1, ::-1], img.affine @ flip)
    regrid = Spacing(pixdim=(0.8, 0.8, 4.0), mode="bilinear")(LoadImage(image_only=True, ensure_channel_first=True)(str(src)))
    files["regridded"] = (regrid[0].numpy(), regrid.affine.numpy())
    paths = {}
    for k, (arr, affine) in files.items():
        paths[k] = out / f"{k}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), affine), str(paths[k]))
    return paths


def test_predictions_are_written_in_each_query_files_own_geometry(chaos_dir, tmp_path):
    """Fixed random weights (independent of training quality): the prediction on each stored form, written in
    that file's geometry and resampled onto the original grid, agrees with the original's prediction."""
    from monai.transforms import LoadImage, ResampleToMatch

    from fsmis_monai.networks.methods import build_method

    src = tmp_path / "query.nii.gz"  # a few slices of held-out scan 20 keep it fast
    img = nib.load(str(chaos_dir / "image_20.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 12:20], img.affine), str(src))
    paths = _variants(src, tmp_path)
    contract = contract_from_scans([chaos_dir / "image_1.nii.gz"], "chaos", image_size=(128, 128), fit_mode="resize")
    torch.manual_seed(0)
    net = build_method("ssl_alpnet", encoder="small").eval()
    inferer = FewShotVolumeInferer(*load_support(chaos_dir / "image_15.nii.gz", chaos_dir / "label_15.nii.gz",
                                                 "liver", 3, contract=contract))
    pre = query_preprocessing(contract)
    post = prediction_postprocessing(pre, tmp_path / "pred", write_overlays=False)
    load = LoadImage(image_only=True, ensure_channel_first=True)
    original = load(str(src))
    preds = {}
    for k, path in paths.items():
        d = pre({"image": str(path)})
        with torch.no_grad():
            d["pred"] = inferer(d["image"][None], net)[0]
        post(d)
        written = nib.load(str(tmp_path / "pred" / f"{k}_fewshot.nii.gz"))
        stored = nib.load(str(path))
        assert written.shape == stored.shape and np.allclose(written.affine, stored.affine, atol=1e-4)
        preds[k] = ResampleToMatch(mode="nearest")(load(str(written.get_filename())), original)[0].numpy() > 0.5
    ref = preds["original"]
    assert 0.01 < ref.mean() < 0.5  # a real segmentation, not all or nothing
    dice = {k: 2 * (ref & p).sum() / (ref.sum() + p.sum()) for k, p in preds.items()}
    assert dice["swapped"] >= 0.99 and dice["reoriented"] >= 0.99, dice
    # re-gridding interpolates the image twice (0.8 x 0.8 x 4 mm and back), which random weights amplify
    assert dice["regridded"] >= 0.9, dice

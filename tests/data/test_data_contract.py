"""The data contract (fsmis_monai.data.contract): one pipeline for training, evaluation and inference, support
classes by name or raw value, predictions in the query file's own geometry. Real CHAOS / MS-CMRSeg scans."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fsmis_monai.bundles import CPU_OVERRIDES
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
                                              r"\(values found: \[0, 255\].*--dataset_name none"):
        load_support(image, own, 255, 1, dataset="chaos")


REPO = Path(__file__).resolve().parents[2]


def _inference_json(bundle: str, **override):
    """A bundle's rendered ``inference.json`` through MONAI's own ``ConfigWorkflow``."""
    from monai.bundle import ConfigWorkflow

    configs = REPO / "bundles" / bundle / "configs"
    wf = ConfigWorkflow(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
                        logging_file=str(configs / "logging.conf"), workflow_type="infer",
                        bundle_root=str(REPO / "bundles" / bundle), **override)
    wf.initialize()
    return wf


def _variants(src: Path, out: Path) -> dict[str, Path]:
    """The same scan stored other ways: in-plane axes swapped, reoriented (flipped in-plane, RAS-like storage),
    re-gridded to 0.8 x 0.8 x 4 mm on a grid covering the original's extent (as 400 x 400 x 59 covers a whole
    CHAOS scan), and re-gridded to 0.8 x 0.8 x 3.85 mm (every original slice kept: half its 7.7 mm)."""
    from monai.transforms import LoadImage, Spacing

    img = nib.load(str(src))
    a = np.asarray(img.dataobj, dtype=np.float32)
    files = {"swapped": (a.transpose(1, 0, 2), img.affine[:, [1, 0, 2, 3]])}
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [a.shape[0] - 1, a.shape[1] - 1]
    files["reoriented"] = (a[::-1, ::-1], img.affine @ flip)
    loaded = LoadImage(image_only=True, ensure_channel_first=True)(str(src))
    zooms = img.header.get_zooms()[:3]
    for name, pixdim in (("regridded", (0.8, 0.8, 4.0)), ("regridded_exact", (0.8, 0.8, zooms[2] / 2))):
        cover = [int(np.ceil((n - 1) * z / p - 1e-6)) + 1 for n, z, p in zip(a.shape, zooms, pixdim)]
        regrid = Spacing(pixdim=pixdim, mode="bilinear")(loaded, output_spatial_shape=cover)
        files[name] = (regrid[0].numpy(), regrid.affine.numpy())
    paths = {"original": src}
    for k, (arr, affine) in files.items():
        paths[k] = out / f"{k}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), affine), str(paths[k]))
    return paths


def test_the_pipeline_resamples_as_an_independent_trilinear_interpolation(chaos_dir, tmp_path):
    """A re-gridded query brought back to the model's grid by the contract's pipeline equals scipy's trilinear
    interpolation of the file at the original voxel centres: the pipeline adds nothing to the interpolation
    the re-gridded file forces (what makes its prediction differ below)."""
    from scipy.ndimage import map_coordinates

    src = tmp_path / "original.nii.gz"
    img = nib.load(str(chaos_dir / "image_20.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 12:20], img.affine), str(src))
    regridded = nib.load(str(_variants(src, tmp_path)["regridded"]))
    contract = contract_from_scans([chaos_dir / "image_1.nii.gz"], "chaos", normalization="none")
    out = query_preprocessing(contract)({"image": str(regridded.get_filename())})["image"]
    assert out.shape[1:] == (256, 256, 8) and np.allclose(out.affine.numpy(), img.affine, atol=1e-4)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in out.shape[1:]], indexing="ij")).reshape(3, -1)
    xyz = np.linalg.inv(regridded.affine) @ img.affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
    expected = map_coordinates(np.asarray(regridded.dataobj, dtype=np.float64), xyz[:3], order=1, mode="nearest")
    np.testing.assert_allclose(out[0].numpy(), expected.reshape(out.shape[1:]), atol=1e-5 * np.abs(expected).max())


def test_inference_json_writes_each_query_in_its_own_geometry(chaos_dir, tmp_path):
    """inference.json end to end with fixed random weights and their saved contract (128 px, resize): every
    stored form of a real CHAOS query gets a prediction with its own shape and affine which, resampled onto the
    original grid (nearest), agrees with the original's prediction (independent of training quality)."""
    from monai.transforms import LoadImage, ResampleToMatch

    from fsmis_monai.networks.methods import build_method

    queries = tmp_path / "queries"
    queries.mkdir()
    src = queries / "original.nii.gz"  # a few slices of held-out scan 20 keep it fast
    img = nib.load(str(chaos_dir / "image_20.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 12:20], img.affine), str(src))
    paths = _variants(src, queries)
    torch.manual_seed(0)
    ckpt = tmp_path / "models" / "model.pt"
    ckpt.parent.mkdir()
    torch.save(build_method("ssl_alpnet", encoder="small").state_dict(), ckpt)
    save_contract(contract_from_scans([chaos_dir / "image_1.nii.gz"], "chaos", image_size=(128, 128),
                                      fit_mode="resize"), ckpt)
    wf = _inference_json("ssl_alpnet", encoder="small", dataset_dir=str(queries), output_dir=str(tmp_path / "pred"),
                         ckpt_path=str(ckpt), support_image=str(chaos_dir / "image_15.nii.gz"),
                         support_label=str(chaos_dir / "label_15.nii.gz"), support_class="liver",
                         write_overlays=False, whole_scan_steps=[],  # geometry only: the raw argmax
                         device="$torch.device('cpu')")
    assert wf.parser.get_parsed_content("contract").image_size == (128, 128)  # the model's contract, not 256
    wf.run()
    wf.finalize()
    load = LoadImage(image_only=True, ensure_channel_first=True)
    original = load(str(src))
    preds = {}
    for k, path in paths.items():
        written = nib.load(str(tmp_path / "pred" / f"{k}_seg.nii.gz"))
        stored = nib.load(str(path))
        assert written.shape == stored.shape and np.allclose(written.affine, stored.affine, atol=1e-4), k
        preds[k] = ResampleToMatch(mode="nearest")(load(str(written.get_filename())), original)[0].numpy() > 0.5
    ref = preds["original"]
    assert 0.01 < ref.mean() < 0.5  # a real segmentation, not all or nothing
    dice = {k: 2 * (ref & p).sum() / (ref.sum() + p.sum()) for k, p in preds.items()}
    assert dice["swapped"] >= 0.99 and dice["reoriented"] >= 0.99, dice  # same voxels: identical up to rounding
    assert dice["regridded_exact"] >= 0.95, dice  # every original slice kept: in-plane interpolation only
    # 4 mm slices interpolate between the 7.7 mm ones: the file itself holds a blurred scan (the pipeline adds
    # nothing to it, test above), which random weights amplify. Measured here 0.952 (3.85 mm: 0.981); weight
    # seeds 1 and 2: 0.951 and 0.918 (3.85 mm: 0.984, 0.968), so the 0.95 holds for lossless
    # re-gridding only and the 4 mm bound is set below the seed spread.
    assert dice["regridded"] >= 0.9, dice


@pytest.fixture(scope="module")
def tiny_scans(chaos_dir, tmp_path_factory):
    """Three real CHAOS scans cut to 128 x 112 x 10 (liver window), their own geometry kept."""
    from fsmis_monai.io import save_nifti

    data = tmp_path_factory.mktemp("tiny_contract")
    for i in (1, 2, 3):
        image = nib.load(chaos_dir / f"image_{i}.nii.gz")
        label = np.asarray(nib.load(chaos_dir / f"label_{i}.nii.gz").dataobj)
        zs = np.flatnonzero((label == 1).any(axis=(0, 1)))
        window = (slice(40, 168), slice(64, 176), slice(int(zs[len(zs) // 2]) - 5, int(zs[len(zs) // 2]) + 5))
        save_nifti(data / f"image_{i}.nii.gz", np.asarray(image.dataobj)[window].astype(np.float32), affine=image.affine)
        save_nifti(data / f"label_{i}.nii.gz", label[window].astype(np.uint8), affine=image.affine)
    return data


BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "train.json").is_file())
# (normalization, image_size, resize_mode): every mode, the stored in-plane size and both fits to another size
SETTINGS = [("volume", 128, "resize"), ("global", 128, "resize"), ("slice_minmax", 128, "resize"),
            ("none", 128, "resize"), ("volume", 64, "resize"), ("global", 96, "crop")]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_training_evaluation_and_inference_give_the_same_network_input(bundle, tiny_scans, tmp_path):
    """A bundle's rendered configs, parsed by MONAI's ConfigParser: the scan the training path (``train#volumes``,
    which saves the run's contract) prepares is the tensor the evaluation path (``load_scan`` with the saved
    contract) and ``inference.json`` (``preprocessing`` from the contract beside the weights) give the network."""
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / bundle / "configs"
    files = ScanFiles(2, tiny_scans / "image_2.nii.gz", tiny_scans / "label_2.nii.gz")
    for normalization, size, mode in SETTINGS:
        out = tmp_path / f"{normalization}_{size}_{mode}"
        train = ConfigParser()
        train.read_config(str(configs / "train.json"))
        train.update({"bundle_root": str(REPO / "bundles" / bundle), "dataset_dir": str(tiny_scans), "fold": None,
                      "output_dir": str(out), "normalization": normalization, "image_size": size,
                      "resize_mode": mode, "train#volumes#pseudolabel_dir": None})
        volumes = train.get_parsed_content("train#volumes")
        training = np.moveaxis(volumes[[v.scan_id for v in volumes].index(2)].image, 0, -1)  # [H, W, Z]
        saved = out / "checkpoints" / "data_contract.json"
        contract = load_contract(saved)
        assert (contract.normalization, contract.image_size, contract.fit_mode) == (normalization, (size, size), mode)
        if normalization == "global":  # the training scans' statistics, computed at training time
            s = intensity_stats([ScanFiles(i, tiny_scans / f"image_{i}.nii.gz") for i in (1, 2, 3)])
            assert (contract.mean, contract.std) == pytest.approx((s.mean, s.std), rel=1e-6)
        infer = ConfigParser()
        infer.read_config(str(configs / "inference.json"))
        infer.update({"bundle_root": str(REPO / "bundles" / bundle), "ckpt_path": str(saved.with_name("model.pt")),
                      "normalization": "volume"})  # the fallback for weights without a contract: not used
        inference = infer.get_parsed_content("preprocessing")({"image": str(files.image)})["image"][0].numpy()
        evaluation = load_scan(files, get_dataset("chaos"), contract=contract).image
        assert training.shape == (size, size, 10)
        np.testing.assert_allclose(inference, training, atol=1e-6, rtol=0, err_msg=f"{bundle} {normalization} {size}")
        np.testing.assert_allclose(evaluation, training, atol=1e-6, rtol=0, err_msg=f"{bundle} {normalization} {size}")


@pytest.fixture(scope="module")
def tiny_cmr(cmr_dir, tmp_path_factory):
    """MS-CMRSeg scans 1 (support) and 2 (query) cut to their central 96 x 96 x 6, released labels (0/200/500/600)
    kept, and scan 1's blood pool as a user's own 0/255 mask."""
    from fsmis_monai.io import save_nifti

    data = tmp_path_factory.mktemp("tiny_cmr")
    for i in (1, 2):
        image, label = nib.load(cmr_dir / f"image_{i}.nii.gz"), nib.load(cmr_dir / f"label_{i}.nii.gz")
        lab = np.asarray(label.dataobj)
        zs = np.flatnonzero((lab == 200).any(axis=(0, 1)))
        z0 = int(zs[len(zs) // 2]) - 3
        affine = image.affine.copy()
        affine[:3, 3] = image.affine[:3, :3] @ np.array([80.0, 80.0, z0]) + image.affine[:3, 3]
        window = (slice(80, 176), slice(80, 176), slice(z0, z0 + 6))
        save_nifti(data / f"image_{i}.nii.gz", np.asarray(image.dataobj)[window].astype(np.float32), affine=affine)
        save_nifti(data / f"label_{i}.nii.gz", lab[window].astype(np.int16), affine=affine)
        if i == 1:
            save_nifti(data / "mask_1.nii.gz", np.where(lab[window] == 500, 255, 0).astype(np.uint8), affine=affine)
    (data / "queries").mkdir()
    shutil.copy(data / "image_2.nii.gz", data / "queries" / "image_2.nii.gz")
    return data


def test_released_cmr_labels_and_own_masks_in_inference_json_and_freeze(tiny_cmr, tmp_path):
    """inference.json and ``fsmis freeze`` take the released MS-CMRSeg labels by class name or raw value (the
    same prediction / the same frozen support), and a user's own 0/255 mask with no dataset (``none``)."""
    from fsmis_monai.commands.freeze import freeze_bundle
    from fsmis_monai.networks.methods import build_method

    torch.manual_seed(0)
    ckpt = tmp_path / "adnet.pt"
    torch.save(build_method("adnet", encoder="small").state_dict(), ckpt)
    runs = {"name": ("cmr_bssfp", "label_1", "lv_myocardium"), "raw": ("cmr_bssfp", "label_1", 200),
            "own": ("none", "mask_1", 255)}
    preds, frozen = {}, {}
    for run, (dataset, label, cls) in runs.items():
        wf = _inference_json("adnet", encoder="small", ckpt_path=str(ckpt), dataset_name=dataset,
                             dataset_dir=str(tiny_cmr / "queries"), output_dir=str(tmp_path / run),
                             support_image=str(tiny_cmr / "image_1.nii.gz"), support_class=cls,
                             support_label=str(tiny_cmr / f"{label}.nii.gz"), write_overlays=False,
                             device="$torch.device('cpu')")
        wf.run()
        wf.finalize()
        written = nib.load(tmp_path / run / "image_2_seg.nii.gz")
        assert written.shape == (96, 96, 6) and np.allclose(written.affine, nib.load(tiny_cmr / "image_2.nii.gz").affine)
        preds[run] = np.asarray(written.dataobj)
        out = freeze_bundle(REPO / "bundles" / "adnet", tiny_cmr / "image_1.nii.gz", tiny_cmr / f"{label}.nii.gz",
                            cls, tmp_path / f"frozen_{run}", ckpt_path=ckpt, overrides={"encoder": "small"},
                            dataset=dataset)
        frozen[run] = torch.load(out / "models" / "model.pt", weights_only=True)
        assert load_contract(out / "models" / "model.pt").label_map == (None if dataset == "none" else
                                                                        get_dataset("cmr_bssfp").raw_label_map)
    np.testing.assert_array_equal(preds["name"], preds["raw"])
    for key in frozen["name"]:
        torch.testing.assert_close(frozen["name"][key], frozen["raw"][key], rtol=0, atol=0)
    # the own mask (255 where the released label is 500) selects other voxels: another support, another output
    assert any(not torch.equal(frozen["own"][k], frozen["name"][k]) for k in frozen["name"])


def test_evaluate_json_prepares_scans_by_the_saved_contract(tiny_scans, tmp_path, monkeypatch):
    """evaluate.json over train.json reads the contract beside ``ckpt_path``: a network trained at 64 px with
    global statistics is evaluated on the scans training saw (64 px, the same statistics), not at 128."""
    from monai.bundle import ConfigParser

    import fsmis_monai.evaluation.evaluator as evaluator
    from fsmis_monai.networks.methods import build_method

    configs = REPO / "bundles" / "adnet" / "configs"
    models = tmp_path / "models"
    common = {"bundle_root": str(REPO / "bundles" / "adnet"), "dataset_dir": str(tiny_scans), "fold": None,
              **CPU_OVERRIDES, "normalization": "global", "image_size": 64, "ckpt_path": str(models / "model.pt")}
    train = ConfigParser()
    train.read_config(str(configs / "train.json"))
    train.update({**common, "output_dir": str(tmp_path / "run"), "contract_file": str(models / "data_contract.json"),
                  "train#volumes#pseudolabel_dir": None})
    training = {v.scan_id: np.moveaxis(v.image, 0, -1) for v in train.get_parsed_content("train#volumes")}
    torch.manual_seed(0)
    torch.save(build_method("adnet", encoder="small").state_dict(), models / "model.pt")
    seen = {}

    def recording_load_scan(files, *args, **kwargs):
        scan = load_scan(files, *args, **kwargs)
        seen[files.scan_id] = scan.image
        return scan

    monkeypatch.setattr(evaluator, "load_scan", recording_load_scan)
    evaluate = ConfigParser()
    evaluate.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
    evaluate.update({**common, "output_dir": str(tmp_path / "eval"), "fold": 0, "protocols": ["ep1"], "classes": [1],
                     "query_ids": [2], "support_id": 1, "device": "$torch.device('cpu')",
                     "normalization": "volume"})  # the option for weights without a contract: not used
    evaluate.get_parsed_content("evaluate")
    assert seen.keys() == {1, 2}
    for i, image in seen.items():
        assert image.shape == (64, 64, 10)
        np.testing.assert_allclose(image, training[i], atol=1e-6, rtol=0)


def test_gmrd_inference_builds_its_network_at_the_contract_size(tmp_path):
    """GMRD's descriptor MLP is sized by the slice size: a model trained at 64 px is rebuilt at 64 px by
    inference.json from the contract saved beside it, without an --image_size override; no contract: the
    bundle's size."""
    from monai.bundle import ConfigParser

    from conftest import REPO_ROOT

    def built_size(ckpt_dir: Path) -> tuple:
        parser = ConfigParser()
        parser.read_config(str(REPO_ROOT / "bundles" / "gmrd" / "configs" / "inference.json"))
        parser.update({"bundle_root": str(REPO_ROOT / "bundles" / "gmrd"), "encoder": "small",
                       "ckpt_path": str(ckpt_dir / "model.pt")})
        return tuple(parser.get_parsed_content("network_def").image_size)

    trained = tmp_path / "trained"
    trained.mkdir()
    save_contract(DataContract.for_dataset("chaos_mr_t2", image_size=(64, 64)), trained / "model.pt")
    assert built_size(trained) == (64, 64)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert built_size(bare) == (256, 256)

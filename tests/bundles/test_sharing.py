"""Sharing a bundle the MONAI way: zip it, ``monai.bundle.download(url="file://...zip")``, then
``monai.bundle.load`` returns the network with the shipped weights and ``load_bundle_config`` reads the
configs (from the folder and from the zip). Done for a training bundle (random weights of the small
encoder in ``models/model.pt``) and for a frozen bundle written by ``fsmis freeze`` from a real CHAOS scan.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import download, load, load_bundle_config

from fsmis_monai.bundles import CPU_OVERRIDES
from fsmis_monai.commands.freeze import freeze_bundle
from fsmis_monai.io import torch_save
from fsmis_monai.networks.methods import build_method

from _real_scans import liver_window

REPO = Path(__file__).resolve().parents[2]


def _publish(bundle: Path, name: str, tmp: Path) -> Path:
    """Zip ``bundle`` as ``<name>.zip`` holding the folder ``<name>/`` (the model zoo's layout), download it
    into a fresh bundle directory and return that directory."""
    staging = tmp / "staging"
    shutil.copytree(bundle, staging / name)
    archive = shutil.make_archive(str(tmp / name), "zip", root_dir=staging, base_dir=name)
    downloaded = tmp / "downloaded"
    download(name=name, bundle_dir=str(downloaded), url=Path(archive).as_uri(), progress=False)
    assert (downloaded / name / "configs" / "metadata.json").is_file()
    parser = load_bundle_config(archive, "inference.json")  # the zip itself is readable too
    shipped = json.loads((bundle / "configs" / "inference.json").read_text())
    assert parser["network_def"] == shipped["network_def"]
    assert parser["_meta_"] == json.loads((bundle / "configs" / "metadata.json").read_text())
    return downloaded


def test_zipped_training_bundle_downloads_and_loads_with_weights(tmp_path):
    torch.manual_seed(7)
    network = build_method("adnet", encoder="small")
    bundle = tmp_path / "adnet"
    shutil.copytree(REPO / "bundles" / "adnet", bundle)
    torch_save(network.state_dict(), bundle / "models" / "model.pt")
    downloaded = _publish(bundle, "adnet", tmp_path / "pub")
    loaded = load(name="adnet", bundle_dir=str(downloaded), workflow_type="train", net_override=CPU_OVERRIDES,
                  device="cpu")
    assert type(loaded) is type(network)
    expected = network.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k
    parser = load_bundle_config(str(downloaded / "adnet"), "train.json", "inference.json")
    assert parser["method"] == "adnet" and parser["_meta_"]["name"].startswith("ADNet")


def test_zipped_frozen_bundle_loads_as_the_frozen_network(chaos_dir, tmp_path):
    """A frozen liver segmenter made from real scan 1 travels as a zip and segments the same as before."""
    torch.set_num_threads(1)
    data = liver_window(chaos_dir, tmp_path / "data", (1,), n_slices=12)
    torch.manual_seed(1)
    ckpt = torch_save(build_method("ssl_alpnet", encoder="small").state_dict(), tmp_path / "alp.pt")
    frozen_dir = freeze_bundle(REPO / "bundles" / "ssl_alpnet", data / "image_1.nii.gz", data / "label_1.nii.gz",
                               "liver", tmp_path / "liver_alpnet", ckpt_path=ckpt, protocol="ep2",
                               overrides={"encoder": "small"})
    downloaded = _publish(frozen_dir, "liver_alpnet", tmp_path / "pub")
    original = load(name="liver_alpnet", bundle_dir=str(frozen_dir.parent), workflow_type="inference", device="cpu")
    shared = load(name="liver_alpnet", bundle_dir=str(downloaded), workflow_type="inference", device="cpu")
    vol = np.asarray(nib.load(data / "image_1.nii.gz").dataobj, dtype=np.float64)
    vol = (vol - vol.mean()) / vol.std()
    query = torch.as_tensor(vol[..., 6], dtype=torch.float32)[None, None].repeat(1, 3, 1, 1)
    with torch.no_grad():
        a, b = original.eval()(query), shared.eval()(query)
    assert a.shape == (1, 2, 64, 64)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert shared.support_fg.abs().sum() > 0  # the encoded support travelled with the weights

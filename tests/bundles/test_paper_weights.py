"""The paper's initial weights are a bundle's default (issue 20 part 1), and nothing is downloaded in a test.

- Online: torchvision finds its file in the torch hub folder (``$TORCH_HOME/hub/checkpoints/<file of the URL>``).
  Here a locally made state dict in torchvision's own key layout is put there, and the bundle's ``train.json``
  fills every tensor of the encoder's ResNet from it, with one report line per load.
- Offline: ``python -m monai.bundle run`` (MONAI's ``monai.bundle.run``) stops before any data is read or any
  step trained, with one line naming ``pretrained_weights``, the file torchvision wanted and the two ways on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import pytest
import torch
from monai.bundle import ConfigParser, run
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.models.segmentation import DeepLabV3_ResNet101_Weights, deeplabv3_resnet101

from fsmis_monai.io import input_error_in, torch_save

from conftest import REPO_ROOT

BUNDLES = REPO_ROOT / "bundles"


def _hub_file(torch_home: Path, url: str) -> Path:
    """Where ``torchvision``'s ``get_state_dict`` looks for ``url`` before downloading it."""
    return torch_home / "hub" / "checkpoints" / Path(urlparse(url).path).name


def _train_network(bundle: str, **overrides):
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLES / bundle), **overrides})
    return parser.get_parsed_content("network_def")


@pytest.mark.parametrize("bundle, weights, make, unfilled", [
    # Q-Net layout: the COCO DeepLab has no ResNet fc (the reference leaves it random, docs/reference.md#q-net-resnet-101)
    ("qnet", DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
     lambda: deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21, aux_loss=True),
     {"backbone.fc.weight", "backbone.fc.bias"}),
    ("lslpn", ResNet50_Weights.IMAGENET1K_V1, lambda: resnet50(weights=None), set()),
])
def test_default_weights_come_from_the_torch_hub_file(bundle, weights, make, unfilled, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)  # the cached file must be enough
    torch.manual_seed(3)
    state = make().state_dict()
    torch_save(state, _hub_file(tmp_path / "torch", weights.url))
    with caplog.at_level(logging.INFO, logger="fsmis_monai.networks.encoders"):
        network = _train_network(bundle)
    report = network.encoder.weight_report
    source = "torchvision:coco" if "COCO" in str(weights) else "torchvision:imagenet"
    assert report.source == source
    own = network.encoder.state_dict()
    resnet = {k for k in own if k.startswith("backbone.")}
    assert set(report.matched) == resnet - unfilled and not report.shape_mismatched
    for key in report.matched:  # every matched tensor holds the file's value (both layouts name it backbone.*)
        saved = state.get(key, state.get(key[len("backbone."):]))
        assert torch.equal(own[key], saved), key
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(source + ":")]
    assert lines == [report.summary()] and f"{len(resnet - unfilled)} tensors loaded" in lines[0]


def test_offline_run_stops_before_training_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub folder

    def no_network(url, dst, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    configs = BUNDLES / "adnet" / "configs"
    out = tmp_path / "run"
    with pytest.raises(Exception) as err:  # what `python -m monai.bundle run` calls
        run(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
            logging_file=str(configs / "logging.conf"), bundle_root=str(configs.parent),
            dataset_dir=str(tmp_path / "no_scans_read"), output_dir=str(out))
    line = str(input_error_in(err.value))
    wanted = _hub_file(tmp_path / "torch", DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1.url)
    assert "\n" not in line and line.startswith("pretrained_weights='torchvision:coco': ")
    assert str(wanted) in line and DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1.url in line
    assert "a local copy of that file (a path)" in line and "'$None' for random initialisation" in line
    assert not out.exists()  # stopped before the data, the pseudolabels or a training step


def test_adnet_faithful_follows_the_release_random_init(monkeypatch):
    """ADNet's release trains from random init, its paper from COCO (docs/reference.md#quirk-adnet-from-scratch)."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)
    with torch.device("meta"):
        network = _train_network("adnet", faithful=True)
    assert network.encoder.weight_report is None

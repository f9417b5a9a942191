"""A training bundle whose ``model.pt`` was trained with the small encoder: ``monai.bundle.load`` without an
override builds the paper encoder and keeps almost none of the weights; ``load_bundle_network`` reads the
encoder off the checkpoint's layout record and loads every tensor."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import load

from fsmis_monai.io import FsmisInputError, torch_save
from fsmis_monai.networks.layout import LayoutMismatchError, load_bundle_network
from fsmis_monai.networks.methods import build_method

REPO = Path(__file__).resolve().parents[2]


def _bundle_with(network: torch.nn.Module, tmp_path: Path) -> Path:
    bundle = tmp_path / "bundles" / "adnet"
    shutil.copytree(REPO / "bundles" / "adnet", bundle)
    (bundle / "models").mkdir(exist_ok=True)
    torch_save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


def test_small_encoder_checkpoint_loads_whole(tmp_path):
    torch.manual_seed(3)
    trained = build_method("adnet", encoder="small")
    bundle = _bundle_with(trained, tmp_path)
    loaded = load_bundle_network(bundle)
    expected = trained.state_dict()
    assert type(loaded) is type(trained) and loaded.state_dict().keys() == expected.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_monai_load_without_override_keeps_almost_nothing(tmp_path):
    """The defect the helper exists for (and the README's advice to pass net_override): MONAI's load of the same
    bundle with the config's encoder (since ADNet ships weights, its ``small_dilated``; widths differ from the
    checkpoint's ``small_wide``) shares almost no tensor with the checkpoint."""
    torch.manual_seed(3)
    trained = build_method("adnet", encoder="small_wide")
    bundle = _bundle_with(trained, tmp_path)
    kwargs = dict(name="adnet", bundle_dir=str(bundle.parent), workflow_type="inference", device="cpu")
    paper = load(**kwargs)
    # weight tensors only: BatchNorm's step counters (0) and ADNet's fixed initial threshold are equal anyway
    weights = {k: v for k, v in trained.state_dict().items() if v.is_floating_point() and v.numel() > 1}
    same = [k for k, v in weights.items() if k in paper.state_dict() and torch.equal(paper.state_dict()[k], v)]
    assert len(same) < 0.05 * len(weights)
    small = load(**kwargs, net_override={"encoder": "small_wide"})
    assert all(torch.equal(small.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_other_layout_and_missing_file_are_input_errors(tmp_path):
    trained = build_method("qnet", encoder="small")  # a Q-Net checkpoint dropped into the ADNet bundle
    bundle = _bundle_with(trained, tmp_path)
    with pytest.raises(LayoutMismatchError, match="qnet bundle"):
        load_bundle_network(bundle)
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(FsmisInputError, match="model.pt: no such checkpoint"):
        load_bundle_network(bundle)

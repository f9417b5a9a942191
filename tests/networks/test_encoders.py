"""Encoder layouts (shapes, strides, channels) and pretrained-weight loading from local checkpoints.

Checkpoints are synthetic but carry torchvision's real key names and shapes: torchvision models are
instantiated with random weights and their state dicts saved, as the downloaded files would be.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet50, resnet101
from torchvision.models.segmentation import deeplabv3_resnet101

from fsmis_monai.io import FsmisInputError, torch_save
from fsmis_monai.networks.encoders import ENCODERS, build_encoder, load_pretrained_weights
from fsmis_monai.networks.methods import build_method


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return {name: build_encoder(name).eval() for name in ("deeplabv3_resnet101", "qnet_resnet101", "lslpn_resnet50")}


@pytest.fixture(scope="module")
def imagenet_r101(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "resnet101-imagenet.pth"
    torch_save(resnet101(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def coco_deeplab_r101(tmp_path_factory):
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("ckpt") / "deeplabv3_resnet101_coco.pth"
    model = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    torch_save(model.state_dict(), path)
    return path


def _backbone_keys(encoder: nn.Module) -> list[str]:
    return [k for k in encoder.state_dict() if k.startswith("backbone.")]


def _on_meta(name: str, **kwargs) -> nn.Module:
    """The layout on the meta device: shapes propagate without computing (a ResNet-101 at 256^2 is slow on CPU)."""
    with torch.device("meta"):
        return build_encoder(name, **kwargs).eval()


def test_layout_shapes_at_256():
    x = torch.empty(2, 3, 256, 256, device="meta")
    alp = _on_meta("deeplabv3_resnet101")(x)
    qn = _on_meta("qnet_resnet101")(x)
    assert set(alp) == {"down3"} and alp["down3"].shape == (2, 256, 32, 32)
    assert qn["down2"].shape == (2, 512, 64, 64) and qn["down3"].shape == (2, 512, 32, 32)
    assert qn["tau"].shape == (2,)



def test_layouts_compute_at_small_size(encoders):
    """A real (not meta) pass at 64^2 confirms the strides: 1/8 for down3, 1/4 for Q-Net's down2."""
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert encoders["deeplabv3_resnet101"](x)["down3"].shape == (1, 256, 8, 8)
        qn = encoders["qnet_resnet101"](x)
    assert qn["down2"].shape == (1, 512, 16, 16) and qn["down3"].shape == (1, 512, 8, 8)
    assert torch.isfinite(qn["tau"]).all()
    assert encoders["deeplabv3_resnet101"].out_channels == 256 and encoders["qnet_resnet101"].out_channels == 512


def test_lslpn_layout_stride_8_and_frozen_batchnorm(encoders):
    enc = encoders["lslpn_resnet50"]
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 128, 128))
    assert out["down3"].shape == (1, 256, 16, 16) and enc.out_channels == 256
    bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not p.requires_grad for m in bns for p in m.parameters())
    assert not hasattr(enc.backbone, "layer4")
    assert all(b.conv2.dilation == (2, 2) for b in enc.backbone.layer3)
    # conv weights start N(0, 0.01)
    assert abs(float(enc.head[0].weight.detach().std()) - 0.01) < 1e-3
    # the faithful (Caffe-style, ceil-mode pool) variant gives the reference's 65^2 maps on 512^2 inputs
    x = torch.empty(1, 3, 512, 512, device="meta")
    assert _on_meta("lslpn_resnet50")(x)["down3"].shape[-2:] == (64, 64)
    assert _on_meta("lslpn_resnet50", faithful=True)(x)["down3"].shape[-2:] == (65, 65)


def test_small_encoder_and_unknown_name():
    enc = build_encoder("small")
    out = enc(torch.randn(2, 3, 64, 64))
    assert out["down2"].shape == (2, enc.out_channels, 16, 16) and out["down3"].shape == (2, enc.out_channels, 8, 8)
    assert set(ENCODERS) >= {"deeplabv3_resnet101", "qnet_resnet101", "lslpn_resnet50", "small"}
    with pytest.raises(ValueError, match="unknown encoder 'resnet18'"):
        build_encoder("resnet18")


def test_no_unused_aspp_parameters(encoders):
    names = [n for n, _ in encoders["deeplabv3_resnet101"].named_parameters()]
    assert not any("classifier" in n or "aspp" in n.lower() or ".fc." in n for n in names)


def test_imagenet_checkpoint_fills_every_backbone_tensor(encoders, imagenet_r101):
    saved = torch.load(imagenet_r101, weights_only=True)
    for name in ("deeplabv3_resnet101", "qnet_resnet101"):
        enc = encoders[name]
        report = load_pretrained_weights(enc, imagenet_r101)
        assert sorted(report.matched) == sorted(_backbone_keys(enc))
        assert not report.shape_mismatched
        assert torch.equal(enc.state_dict()["backbone.layer3.5.conv2.weight"], saved["layer3.5.conv2.weight"])
    # the DeepLab layout has no fc: those two tensors are reported unused; the Q-Net layout keeps fc
    assert sorted(load_pretrained_weights(encoders["deeplabv3_resnet101"], imagenet_r101).unexpected) == [
        "fc.bias", "fc.weight"
    ]
    report = load_pretrained_weights(encoders["qnet_resnet101"], imagenet_r101)
    assert report.unexpected == [] and sorted(report.missing) == sorted(
        ["reduce2.weight", "reduce3.weight", "tau_head.weight", "tau_head.bias"]
    )


def test_coco_deeplab_checkpoint_maps_onto_both_r101_layouts(encoders, coco_deeplab_r101):
    saved = torch.load(coco_deeplab_r101, weights_only=True)
    alp = load_pretrained_weights(encoders["deeplabv3_resnet101"], coco_deeplab_r101)
    assert sorted(alp.matched) == sorted(_backbone_keys(encoders["deeplabv3_resnet101"]))
    assert alp.unexpected and all(k.startswith(("classifier.", "aux_classifier.")) for k in alp.unexpected)
    qn = load_pretrained_weights(encoders["qnet_resnet101"], coco_deeplab_r101)
    expected = [k for k in _backbone_keys(encoders["qnet_resnet101"]) if not k.startswith("backbone.fc.")]
    assert sorted(qn.matched) == sorted(expected)
    assert "backbone.fc.weight" in qn.missing
    assert torch.equal(encoders["qnet_resnet101"].state_dict()["backbone.conv1.weight"], saved["backbone.conv1.weight"])


def test_imagenet_r50_onto_lslpn_and_wrapped_keys(encoders, tmp_path):
    torch.manual_seed(3)
    state = resnet50(weights=None).state_dict()
    path = tmp_path / "wrapped.pt"
    # a DataParallel-style wrapped checkpoint: {"state_dict": {"module.conv1.weight": ...}}
    torch_save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    enc = encoders["lslpn_resnet50"]
    report = build_encoder("lslpn_resnet50", pretrained_weights=path).weight_report
    assert sorted(report.matched) == sorted(_backbone_keys(enc))
    assert all(k.startswith(("module.layer4.", "module.fc.")) for k in report.unexpected)


def test_shape_mismatch_is_reported_and_skipped(tmp_path):
    enc = build_encoder("small")
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    state["proj3.weight"] = torch.zeros(5, 5, 1, 1)
    state["proj2.weight"] = torch.full_like(state["proj2.weight"], 0.5)
    path = tmp_path / "small.pt"
    torch_save(state, path)
    report = load_pretrained_weights(enc, path)
    assert report.shape_mismatched == [("proj3.weight", (5, 5, 1, 1), tuple(enc.proj3.weight.shape))]
    assert "proj3.weight" in report.missing and "proj3.weight" not in report.matched
    assert torch.all(enc.proj2.weight == 0.5)


def test_checkpoint_matching_nothing_raises_naming_the_file(tmp_path):
    path = tmp_path / "unrelated.pth"
    torch_save({"decoder.block.weight": torch.zeros(3)}, path)
    with pytest.raises(FsmisInputError, match="unrelated.pth: no tensor of this checkpoint fits"):
        build_encoder("deeplabv3_resnet101", pretrained_weights=path)


def test_coco_deeplab_r50_onto_lslpn_layout(encoders, tmp_path):
    """torchvision's COCO DeepLabV3-ResNet-50 (``backbone.`` names, dilated layer3/4, heads) fills the LSLPN
    ResNet-50; its layer4 and the segmentation heads have no place there and are reported unused."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(4)
    state = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True).state_dict()
    path = tmp_path / "deeplabv3_resnet50_coco.pth"
    torch_save(state, path)
    enc = encoders["lslpn_resnet50"]
    report = load_pretrained_weights(enc, path)
    assert sorted(report.matched) == sorted(_backbone_keys(enc))
    assert report.unexpected and all(
        k.startswith(("backbone.layer4.", "classifier.", "aux_classifier.")) for k in report.unexpected
    )
    assert torch.equal(enc.state_dict()["backbone.layer3.5.conv3.weight"], state["backbone.layer3.5.conv3.weight"])


def test_resnet_of_another_depth_is_refused(encoders, coco_deeplab_r101):
    """ResNet-101 and ResNet-50 share the names and shapes of layer3's first 6 blocks: a checkpoint of the
    other depth would fill an encoder halfway without complaint, so it is refused."""
    with pytest.raises(FsmisInputError, match=r"deeplabv3_resnet101_coco.pth: a ResNet of another depth .*"
                                               r"layer3: 23 blocks in the checkpoint, 6 in the encoder"):
        load_pretrained_weights(encoders["lslpn_resnet50"], coco_deeplab_r101)
    r50 = resnet50(weights=None).state_dict()
    for name in ("deeplabv3_resnet101", "qnet_resnet101"):
        with pytest.raises(FsmisInputError, match=r"layer3: 6 blocks in the checkpoint, 23 in the encoder"):
            load_pretrained_weights(encoders[name], r50)


def test_pretrained_weights_reach_a_given_encoder_module(tmp_path):
    from fsmis_monai.io import torch_save
    from fsmis_monai.networks.encoders import build_encoder

    torch.manual_seed(8)
    source = build_encoder("small")
    torch_save({"model": {"encoder." + k: v for k, v in source.state_dict().items()}}, tmp_path / "trained.pt")
    torch.manual_seed(9)
    model = build_method("adnet", encoder=build_encoder("small"), pretrained_weights=tmp_path / "trained.pt")
    assert len(model.encoder.weight_report.matched) == len(source.state_dict())
    assert torch.equal(model.encoder.stem.conv.weight, source.stem.conv.weight)

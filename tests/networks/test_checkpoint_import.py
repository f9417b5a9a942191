"""Importing checkpoints released with the original repositories (``fsmis import-checkpoint``).

Each synthetic checkpoint has exactly the parameter names and shapes of the reference model, as recorded in
``tests/networks/fixtures/reference_checkpoints/<method>.json`` from the public code (the header names the repository,
commit and file). Tensor ``i`` of the fixture holds the constant ``i`` (a stride-0 view, so a ResNet-101
costs no memory), which shows where every value lands. The expected destinations below were written by
hand from the reference code, not taken from the converter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fsmis_monai.cli import main as cli_main
from fsmis_monai.io import FsmisInputError, torch_load, torch_save
from fsmis_monai.networks.checkpoint_import import convert_checkpoint, convert_state_dict, identify
from fsmis_monai.networks.methods import build_method

FIXTURES = Path(__file__).parent / "fixtures" / "reference_checkpoints"
METHODS = ("ssl_alpnet", "adnet", "qnet", "lslpn", "gmrd", "pami", "difd")

# reference name -> our name, read off the reference model code (a few per method, plus one backbone tensor)
EXPECTED = {
    "ssl_alpnet": {"encoder.localconv.weight": "encoder.reduce.weight"},
    "adnet": {"encoder.localconv.weight": "encoder.reduce.weight", "t": "threshold"},
    "qnet": {
        "encoder.reduce1.weight": "encoder.reduce2.weight",
        "encoder.reduce2.weight": "encoder.reduce3.weight",
        "encoder.reduce1d.weight": "encoder.tau_head.weight",
        "encoder.backbone.fc.bias": "encoder.backbone.fc.bias",
    },
    "lslpn": {
        "encoder.conv1.weight": "encoder.backbone.conv1.weight",
        "encoder.layer2.0.downsample.1.running_mean": "encoder.backbone.layer2.0.downsample.1.running_mean",
        "encoder.layer3.5.conv3.weight": "encoder.backbone.layer3.5.conv3.weight",
        "encoder.layer4.0.weight": "encoder.head.0.weight",
        "encoder.layer4.0.bias": "encoder.head.0.bias",
    },
    "gmrd": {
        "mlp1.reduce.0.weight": "fg_mlp.0.weight",
        "mlp2.reduce.2.bias": "bg_mlp.3.bias",
        "decoder1.res1.0.weight": "fg_decoder.reduce.0.weight",
        "decoder2.res2.2.weight": "bg_decoder.residual.2.weight",
        "decoder2.down.3.weight": "bg_decoder.head.3.weight",
    },
    "pami": {
        "MHA.w_ks.bias": "debias.attention.k.bias",
        "MHA.fc.weight": "debias.attention.out.weight",
        "MHA.layer_norm.weight": "debias.attention.norm.weight",
        "MLP.mlp.2.weight": "debias.mlp.mlp.2.weight",
        "layer_norm.bias": "debias.norm.bias",
        "supp_scale.weight": "debias.merge.weight",
        "query_token.weight": "debias.query_injection.weight",
        "fusion_1.0.weight": "debias.fuse_regions.0.weight",
        "SELayer.fc.2.weight": "debias.channel_se.fc.2.weight",
    },
    "difd": {
        "fuse.weight": "fuse.weight",
        "decoder1.merge.0.weight": "fg_decoder.merge.0.weight",
        "decoder2.cls.3.weight": "bg_decoder.cls.3.weight",
    },
}
BACKBONE_SAMPLE = ("encoder.backbone.layer3.22.conv2.weight", "encoder.backbone.bn1.running_var")

# reference tensors this project has no place for (the reference never uses them in its forward pass)
DROPPED = {
    "ssl_alpnet": ("encoder.aspp_out.", "encoder.asppconv."),
    "adnet": ("encoder.aspp_out.", "encoder.asppconv."),
    "qnet": (),
    "lslpn": (),
    "gmrd": (),
    "pami": ("kc_computation.", "postprocess_layer.", "pred_conv."),
    "difd": ("criterion.weight",),
}


def _fixture(method: str) -> dict:
    return json.loads((FIXTURES / f"{method}.json").read_text())


def _synthetic(method: str) -> "tuple[dict, dict]":
    """(state dict with the reference names/shapes, reference name -> the constant its tensor holds)."""
    shapes = _fixture(method)["state_dict"]
    state, value = {}, {}
    for i, (key, shape) in enumerate(shapes.items()):
        dtype = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        state[key] = torch.tensor(i, dtype=dtype).expand(shape)
        value[key] = i
    return state, value


@pytest.fixture(scope="module")
def targets():
    """Our state dict names and shapes at the paper layout (meta device: nothing allocated)."""
    out = {}
    for method in METHODS:
        with torch.device("meta"):
            out[method] = {k: tuple(v.shape) for k, v in build_method(method).state_dict().items()}
    return out


def test_fixtures_name_their_source():
    for method in METHODS:
        doc = _fixture(method)
        assert doc["method"] == method
        assert doc["source"]["repository"].startswith("https://github.com/") and len(doc["source"]["commit"]) == 40
        assert len(doc["state_dict"]) > 250  # a whole ResNet and the heads


@pytest.mark.parametrize("method", METHODS)
def test_every_reference_tensor_lands_or_is_dropped(method, targets, tmp_path):
    state, value = _synthetic(method)
    path = tmp_path / f"{method}_released.pth"
    # the released formats: ADNet saved its nn.DataParallel (module. keys), others a plain state dict;
    # Q-Net also as {"model": ...} to cover wrapped files
    if method == "adnet":
        torch_save({"module." + k: v for k, v in state.items()}, path)
    elif method == "qnet":
        torch_save({"model": state}, path)
    else:
        torch_save(state, path)
    output = tmp_path / "bundle" / "models" / "model.pt"
    converted, report = convert_checkpoint(path, method, output)

    # every reference key consumed, or dropped with a reason; no reference key unknown
    assert report.unknown == []
    assert set(report.mapped) | set(report.dropped) == set(state)
    assert not set(report.mapped) & set(report.dropped)
    assert sorted(report.dropped) == sorted(k for k in state if k.startswith(DROPPED[method]))
    assert all(len(why) > 20 for why in report.dropped.values())
    # every project tensor filled, once, with its own shape
    assert report.initialised == []
    assert set(converted) == set(targets[method])
    assert {k: tuple(v.shape) for k, v in converted.items()} == targets[method]
    assert len(set(report.mapped.values())) == len(report.mapped)
    # values land where the reference code says
    backbone = {k: k for k in BACKBONE_SAMPLE} if method != "lslpn" else {}  # LSLPN: ResNet-50, in EXPECTED
    for ref, ours in {**EXPECTED[method], **backbone}.items():
        assert report.mapped[ref] == ours
        assert torch.all(converted[ours] == value[ref]), (ref, ours)
    for ref, ours in report.mapped.items():
        assert converted[ours].flatten()[0].item() == value[ref]

    # the layout notes: LSLPN's released ResNet is Caffe-style, GMRD's released MLP has no ReLU
    assert len(report.notes) == (1 if method in ("lslpn", "gmrd") else 0)
    # the written file loads into the method at the paper layout with strict=True (built on the meta device
    # and assigned, so a ResNet-101 costs nothing; the CLI test below loads into a real Q-Net)
    with torch.device("meta"):
        network = build_method(method)
    network.load_state_dict(torch_load(output), strict=True, assign=True)
    for ref, ours in EXPECTED[method].items():
        assert torch.all(network.state_dict()[ours] == value[ref])


@pytest.mark.parametrize(
    "given, actual", [("qnet", "gmrd"), ("gmrd", "qnet"), ("ssl_alpnet", "adnet"), ("adnet", "ssl_alpnet"),
                      ("difd", "pami"), ("pami", "difd"), ("qnet", "lslpn"), ("lslpn", "qnet")]
)
def test_checkpoint_of_another_method_is_refused(given, actual, tmp_path):
    state, _ = _synthetic(actual)
    path = tmp_path / f"{actual}.pth"
    torch_save(state, path)
    expected = rf"{actual}\.pth: not a {given} checkpoint.*checkpoint of {actual}.*--method {actual}"
    with pytest.raises(FsmisInputError, match=expected):
        convert_checkpoint(path, given)


def test_each_reference_checkpoint_is_identified_as_its_own_method():
    from fsmis_monai.commands.import_checkpoint import IMPORTABLE
    from fsmis_monai.networks.checkpoint_import import LAYOUTS

    assert set(IMPORTABLE) == set(LAYOUTS) == set(METHODS)
    assert {m: identify(list(_synthetic(m)[0])) for m in METHODS} == {m: [m] for m in METHODS}


def test_gmrd_versions_and_faithful_layout(targets):
    head, value = _synthetic("gmrd")  # released HEAD: no ReLU, second Linear at reduce.2
    faithful, report = convert_state_dict(head, "gmrd", faithful=True)
    assert torch.all(faithful["bg_mlp.2.weight"] == value["mlp2.reduce.2.weight"]) and report.notes == []
    with torch.device("meta"):
        assert set(faithful) == set(build_method("gmrd", faithful=True).state_dict())
    _, report = convert_state_dict(head, "gmrd")
    assert len(report.notes) == 1 and "faithful" in report.notes[0]
    # commit 45ba5c2 (the paper): ReLU at index 2, second Linear at reduce.3 -> the default layout, no note
    paper = {k.replace("reduce.2.", "reduce.3."): v for k, v in head.items()}
    converted, report = convert_state_dict(paper, "gmrd")
    assert report.notes == [] and set(converted) == set(targets["gmrd"])
    assert torch.all(converted["fg_mlp.3.bias"] == value["mlp1.reduce.2.bias"])


def test_difd_released_decoder_width_does_not_fit_the_faithful_layout():
    state, _ = _synthetic("difd")
    with pytest.raises(FsmisInputError, match=r"do not fit the difd layout \(faithful=True\).*1027.*1025"):
        convert_state_dict(state, "difd", faithful=True)


def test_strict_refuses_unknown_and_unfilled_tensors():
    state, value = _synthetic("qnet")
    state["extra_head.weight"] = torch.zeros(3)
    del state["encoder.reduce1d.bias"]
    with pytest.raises(FsmisInputError, match=r"--strict: 1 unknown checkpoint tensors \['extra_head.weight'\], 1 qnet "
                                               r"tensors not filled \['encoder.tau_head.bias'\]"):
        convert_state_dict(state, "qnet", strict=True)
    torch.manual_seed(0)
    converted, report = convert_state_dict(state, "qnet")
    assert report.unknown == ["extra_head.weight"] and report.initialised == ["encoder.tau_head.bias"]
    assert converted["encoder.tau_head.bias"].shape == (1,) and torch.isfinite(converted["encoder.tau_head.bias"]).all()
    assert torch.all(converted["encoder.tau_head.weight"] == value["encoder.reduce1d.weight"])


def test_cli_writes_model_pt_and_reports_errors(tmp_path, capsys):
    state, value = _synthetic("qnet")
    path = tmp_path / "qnet_released.pth"
    torch_save({"module." + k: v for k, v in state.items()}, path)
    out = tmp_path / "qnet" / "models" / "model.pt"
    assert cli_main(["import-checkpoint", "--method", "qnet", str(path), "--output", str(out), "--strict"]) == 0
    printed = capsys.readouterr().out
    assert "630 tensors mapped" in printed and f"wrote {out}" in printed
    network = build_method("qnet")
    network.load_state_dict(torch_load(out), strict=True)
    assert torch.all(network.encoder.reduce3.weight == value["encoder.reduce2.weight"])
    running_mean = network.encoder.backbone.layer4[2].bn3.running_mean
    assert torch.all(running_mean == value["encoder.backbone.layer4.2.bn3.running_mean"])
    assert [p.name for p in out.parent.iterdir()] == ["model.pt"]  # atomic write: no temporary left
    assert cli_main(["import-checkpoint", "--method", "gmrd", str(path), "--output", str(tmp_path / "g.pt")]) == 1
    assert "not a gmrd checkpoint" in capsys.readouterr().err and not (tmp_path / "g.pt").exists()
    junk = tmp_path / "junk.pth"
    torch_save({"model": {"note": "no tensors"}}, junk)
    assert cli_main(["import-checkpoint", "--method", "qnet", str(junk), "--output", str(tmp_path / "j.pt")]) == 1
    assert "junk.pth: holds no tensors" in capsys.readouterr().err

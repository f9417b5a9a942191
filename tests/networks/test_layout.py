"""Faithful through the bundle: a bundle's ``faithful`` reaches its encoder, and checkpoints know their layout.

The released LSLPN checkpoint is synthesised from the reference names and shapes recorded in
``tests/networks/fixtures/reference_checkpoints/lslpn.json`` (tensor ``i`` holds the constant ``i``). The Caffe layout
expected of it is read off ``LS:code/models/resnet.py`` (layer2's stride on its 1x1 conv, ceil-mode max pool):
65 x 65 features for a 512 x 512 input, 9 x 9 for 64 x 64, where the torchvision layout gives 64 / 8.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.handlers import CheckpointLoader

from fsmis_monai.cli import main as cli_main
from fsmis_monai.io import torch_load, torch_save
from fsmis_monai.networks import encoders as encoders_module
from fsmis_monai.networks.checkpoint_import import convert_state_dict
from fsmis_monai.networks.layout import LayoutMismatchError, load_weights, network_layout, read_layout
from fsmis_monai.networks.methods import build_method

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures" / "reference_checkpoints"
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "train.json").is_file())


def _released(method: str) -> "tuple[dict, dict]":
    shapes = json.loads((FIXTURES / f"{method}.json").read_text())["state_dict"]
    state = {k: torch.tensor(i, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32).expand(s)
             for i, (k, s) in enumerate(shapes.items())}
    return state, {k: i for i, k in enumerate(shapes)}


def _bundle_network(bundle: str, configs: "tuple[str, ...]" = ("train.json",), paper_weights: bool = False,
                    **overrides):
    """The bundle's ``network_def``; without ``paper_weights`` no initial weights (a checkpoint is loaded over it)."""
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / c) for c in configs])
    if not paper_weights:
        overrides.setdefault("pretrained_weights", None)
    for key, value in overrides.items():
        parser[key] = value
    return parser, parser.get_parsed_content("network_def")


@pytest.fixture(scope="module")
def imported_lslpn(tmp_path_factory):
    """The released LSLPN checkpoint converted with ``fsmis import-checkpoint --faithful``."""
    folder = tmp_path_factory.mktemp("lslpn")
    state, value = _released("lslpn")
    torch_save(state, folder / "released.pth")
    out = folder / "models" / "model.pt"
    assert cli_main(["import-checkpoint", "--method", "lslpn", str(folder / "released.pth"), "--output", str(out),
                     "--faithful"]) == 0
    return out, value


def test_released_lslpn_through_the_faithful_bundle_gets_the_caffe_layout(imported_lslpn, capsys):
    path, value = imported_lslpn
    assert read_layout(path) == {"method": "lslpn", "encoder": "lslpn_resnet50", "encoder_layout": "caffe",
                                 "switches": {}}
    _, network = _bundle_network("lslpn", faithful=True)
    # the bundle's inference.json loads model.pt with MONAI's CheckpointLoader; evaluation with load_weights
    CheckpointLoader(str(path), {"model": network})(Engine(lambda e, b: None))
    assert torch.all(network.encoder.head[0].bias == value["encoder.layer4.0.bias"])
    load_weights(network, path)
    backbone = network.encoder.backbone
    assert backbone.maxpool.ceil_mode is True
    assert backbone.layer2[0].conv1.stride == (2, 2) and backbone.layer2[0].conv2.stride == (1, 1)
    with torch.no_grad():
        assert network.encoder.eval()(torch.zeros(1, 3, 64, 64))["down3"].shape[-2:] == (9, 9)
        meta = copy.deepcopy(network.encoder).to("meta")
        assert meta(torch.empty(1, 3, 512, 512, device="meta"))["down3"].shape[-2:] == (65, 65)
    # the default bundle builds the torchvision layout, 64 x 64 at 512 px
    _, default = _bundle_network("lslpn")
    with torch.device("meta"):
        assert default.encoder.to("meta")(torch.empty(1, 3, 512, 512))["down3"].shape[-2:] == (64, 64)


def test_loading_into_the_default_layout_fails_naming_both(imported_lslpn):
    path, _ = imported_lslpn
    _, network = _bundle_network("lslpn")  # faithful: false
    before = network.encoder.head[0].bias.clone()
    both = r"caffe layout.*torchvision layout.*encoder_layout.*faithful=true"
    with pytest.raises(LayoutMismatchError, match=rf"{path.name}: does not fit the lslpn network: .*{both}"):
        load_weights(network, path)
    with pytest.raises(LayoutMismatchError, match=both):
        CheckpointLoader(str(path), {"model": network})(Engine(lambda e, b: None))
    assert torch.equal(network.encoder.head[0].bias, before)  # refused before any tensor was copied


def test_plain_state_dict_without_record_loads_with_a_warning(imported_lslpn, tmp_path):
    path, value = imported_lslpn
    plain = torch_save(dict(torch_load(path)), tmp_path / "plain.pt")  # dict(): PyTorch's metadata dropped
    assert read_layout(plain) is None
    _, network = _bundle_network("lslpn")
    with pytest.warns(UserWarning, match=r"plain\.pt: no layout record .*lslpn_resnet50 \(torchvision layout\)"):
        load_weights(network, plain)
    assert torch.all(network.encoder.head[0].bias == value["encoder.layer4.0.bias"])


#: the initial encoder weights of each paper (docs/reference.md#deeplabv3-resnet-101, #q-net-resnet-101,
#: #lslpn-resnet-50): COCO DeepLabV3 for the ResNet-101 methods, ImageNet ResNet-50 for LSLPN
PAPER_WEIGHTS = {"ssl_alpnet": "torchvision:coco", "adnet": "torchvision:coco", "qnet": "torchvision:coco",
                 "lslpn": "torchvision:imagenet", "gmrd": "torchvision:coco", "pami": "torchvision:coco",
                 "difd": "torchvision:coco"}


PAPER_ENCODERS = {"deeplabv3_resnet101", "qnet_resnet101", "lslpn_resnet50"}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_bundle_faithful_reaches_its_encoder(bundle, monkeypatch):
    built = []
    real = encoders_module.build_encoder

    def spy(name, pretrained_weights=None, faithful=False, **kwargs):
        built.append((name, faithful, pretrained_weights))
        return real(name, None, faithful, **kwargs)  # the weights are recorded, not downloaded

    monkeypatch.setattr(encoders_module, "build_encoder", spy)
    # evaluate.json is read over train.json (as the bundle README runs it); inference.json stands alone
    for config in (("train.json",), ("train.json", "evaluate.json"), ("inference.json",)):
        for faithful in (True, False):
            built.clear()
            with torch.device("meta"):  # the paper encoders, built without memory or compute
                parser, network = _bundle_network(bundle, config, paper_weights=True, faithful=faithful)
            # train.json starts from the paper's weights (docs/reference.md#encoders; ADNet's release, behind
            # faithful, from random init: #quirk-adnet-from-scratch); evaluation and inference load model.pt
            weights = PAPER_WEIGHTS[bundle] if config == ("train.json",) else None
            if bundle == "adnet" and faithful:
                weights = None
            assert built == [(parser["encoder"], faithful, weights)], (config, faithful)
            # the paper's encoder, except inference.json of a bundle shipping CPU-trained weights, whose
            # fallback encoder is theirs (issue 21; a checkpoint's own record wins when its file is found)
            paper = "caffe" if bundle == "lslpn" and faithful else "torchvision"
            assert network.encoder.layout == (paper if parser["encoder"] in PAPER_ENCODERS
                                              else encoders_module.ENCODERS[parser["encoder"]].layout)
            assert config == ("inference.json",) or parser["encoder"] in PAPER_ENCODERS
            assert network_layout(network)["method"] == parser["method"]


def test_small_encoder_checkpoint_into_the_paper_encoder_names_the_encoder_to_set(tmp_path):
    """A CPU-override run (small encoder) loaded by a bundle left at its paper encoder: the error says which
    encoder to set, not a faithful switch (found by a new-user trial of inference.json)."""
    path = tmp_path / "model.pt"
    torch_save(build_method("adnet", encoder="small").state_dict(), path)
    with torch.device("meta"):
        paper = build_method("adnet")
    with pytest.raises(LayoutMismatchError, match=r"differ in encoder.*--encoder small") as err:
        load_weights(paper, path)
    assert "faithful" not in str(err.value).split("layout:")[-1]


def test_shape_switches_are_recorded_and_checked():
    head, _ = _released("gmrd")  # released HEAD: descriptor MLP without ReLU -> faithful=True
    converted, report = convert_state_dict(head, "gmrd", faithful=True)
    assert report.layout["switches"] == {"descriptor_mlp_relu": False}
    with torch.device("meta"):
        default = build_method("gmrd")
    with pytest.raises(LayoutMismatchError, match=r"descriptor_mlp_relu=False.*descriptor_mlp_relu=True.*switches"):
        default.load_state_dict(converted, assign=True)
    with torch.device("meta"):
        build_method("gmrd", faithful=True).load_state_dict(converted, assign=True)


def test_training_records_the_layout_and_resume_checks_it(tmp_path):
    from fsmis_monai.engines import TrainingCheckpoints

    def run(faithful: bool) -> torch.nn.Module:
        net = build_method("difd", encoder="small", faithful=faithful)
        engine = Engine(lambda e, b: None)
        TrainingCheckpoints(tmp_path / "ckpt", {"network": net}, save_interval=1,
                            final_path=tmp_path / "model.pt").attach(engine)
        engine.run([0], max_epochs=1)
        return net

    net = run(faithful=False)
    assert read_layout(tmp_path / "model.pt") == network_layout(net)
    assert network_layout(net)["switches"] == {"decoder_inputs": "intended"}
    assert read_layout(next((tmp_path / "ckpt").glob("*.pt"))) == network_layout(net)
    with pytest.raises(LayoutMismatchError, match="decoder_inputs=intended.*decoder_inputs=released"):
        run(faithful=True)  # resuming the default run's checkpoint into the released decoder

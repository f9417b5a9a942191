"""Feature encoders. Every encoder maps images [N, 3, H, W] to a dict of named outputs:

- ``"down2"``: fine features at stride 4 (Q-Net layout: 512 ch at 64x64 for a 256x256 input);
- ``"down3"``: coarse features at stride 8 (ALP/ADNet layout: 256 ch at 32x32; Q-Net layout: 512 ch);
- ``"tau"``: a per-image scalar [N] (Q-Net's query-informed threshold head), where the layout has one.

``encoder.out_channels`` gives the channel count of the feature outputs, so methods never hard-code it, and
``encoder.layout`` names the arrangement of its layers (strides, pooling) that a checkpoint was trained with
(recorded in every saved checkpoint, see :mod:`fsmis_monai.networks.layout`). :func:`build_encoder` creates one
by name (``faithful=True`` selects the reference repository's layout where it differs from ours) and loads
pretrained weights from a local checkpoint, reporting which tensors matched.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Tuple
from urllib.parse import urlparse

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from fsmis_monai.io import FsmisInputError, state_dict_from_checkpoint, torch_load

EncoderOutput = Dict[str, torch.Tensor]


class SmallEncoder(nn.Module):
    """A small CPU-friendly encoder with the Q-Net output layout (``down2``, ``down3``, ``tau``).

    For tests, the quickstart and CPU training budgets: a few MONAI residual units, no pretraining.
    Stem (stride 2) -> ``stage1`` (stride 4, ``down2``) -> ``stage2`` (stride 8) -> ``stage3``: ``dilated_units``
    residual units at stride 8 with dilation 2 (none in the plain ``small`` layout) -> ``down3``. ``width``
    scales every stage (stage channels ``width``, ``2 width``, ``4 width``); ``channels`` is the width of the
    ``down2``/``down3`` projections the methods read. 256^2 input -> ``down2`` 64^2, ``down3`` 32^2.
    """

    layout = "small"

    def __init__(self, in_channels: int = 3, channels: int = 64, width: int = 32, dilated_units: int = 0) -> None:
        super().__init__()
        self.out_channels = channels
        self.stem = Convolution(2, in_channels, width, strides=2, kernel_size=3, norm="batch", act="relu")
        self.stage1 = ResidualUnit(2, width, 2 * width, strides=2, subunits=2, norm="batch", act="relu")
        self.stage2 = ResidualUnit(2, 2 * width, 4 * width, strides=2, subunits=2, norm="batch", act="relu")
        if dilated_units:
            # dilation keeps the stride-8 grid the methods' prototypes need while the receptive field grows,
            # as the dilated ResNets of the papers do (docs/reference.md#cpu-encoders)
            self.stage3 = nn.Sequential(*[
                ResidualUnit(2, 4 * width, 4 * width, subunits=2, dilation=2, norm="batch", act="relu")
                for _ in range(dilated_units)
            ])
        self.proj2 = nn.Conv2d(2 * width, channels, kernel_size=1, bias=False)
        self.proj3 = nn.Conv2d(4 * width, channels, kernel_size=1, bias=False)
        self.tau_head = nn.Linear(4 * width, 1)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        s1 = self.stage1(self.stem(x))  # stride 4
        s2 = self.stage2(s1)  # stride 8
        if hasattr(self, "stage3"):
            s2 = self.stage3(s2)
        tau = self.tau_head(s2.mean(dim=(2, 3))).squeeze(1)
        return {"down2": self.proj2(s1), "down3": self.proj3(s2), "tau": tau}


class WideSmallEncoder(SmallEncoder):
    """``small`` with twice the width (stages of 64/128/256 channels, ~4x the convolution cost): more
    capacity per layer for CPU training budgets (docs/reference.md#cpu-encoders)."""

    layout = "small_wide"

    def __init__(self, in_channels: int = 3, channels: int = 64) -> None:
        super().__init__(in_channels, channels, width=64)


class DilatedSmallEncoder(SmallEncoder):
    """``small`` plus two dilated residual units at stride 8 (a ResNet-18-like depth of ~17 convolutions,
    receptive field ~3x wider, ~2x the convolution cost) for CPU training budgets
    (docs/reference.md#cpu-encoders)."""

    layout = "small_dilated"

    def __init__(self, in_channels: int = 3, channels: int = 64) -> None:
        super().__init__(in_channels, channels, width=32, dilated_units=2)


# ------------------------------------------------------------------------------------- ResNet layouts


def _run_resnet(backbone: nn.Module, x: torch.Tensor, last: str) -> Dict[str, torch.Tensor]:
    """Run a torchvision ResNet's stem and stages up to ``last``; returns every stage's output by name."""
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    out = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = out[name] = getattr(backbone, name)(x)
        if name == last:
            break
    return out


def _kaiming_init(module: nn.Module) -> None:
    """Conv2d Kaiming-normal (fan_out), BatchNorm weight 1 / bias 0 (the Q-Net encoder's init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DeepLabV3ResNet101Encoder(nn.Module):
    """SSL-ALPNet / ADNet layout (docs/reference.md#deeplabv3-resnet-101): the ResNet-101 of torchvision's DeepLabV3
    (layer3 and layer4 dilated, output stride 8) and a bias-free 1x1 conv 2048 -> 256. 256^2 input ->
    ``down3`` 256 x 32^2.

    The reference also builds an ASPP head it never uses (its parameters reach the optimiser and decay);
    it is not built here. Parameter names follow torchvision (``backbone.layer1...``), so the COCO DeepLabV3
    checkpoint loads without renaming.
    """

    arch = "resnet101"
    torchvision_default = "coco"
    layout = "torchvision"  # the reference's own (torchvision DeepLabV3 backbone): no faithful variant

    def __init__(self, out_channels: int = 256) -> None:
        super().__init__()
        from torchvision.models import resnet101

        self.out_channels = out_channels
        self.backbone = resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
        del self.backbone.avgpool, self.backbone.fc  # not part of the layout
        self.reduce = nn.Conv2d(2048, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        return {"down3": self.reduce(_run_resnet(self.backbone, x, "layer4")["layer4"])}


class QNetResNet101Encoder(nn.Module):
    """Q-Net layout (docs/reference.md#q-net-resnet-101; Shen et al., arXiv 2208.11451): torchvision ResNet-101 with
    ``replace_stride_with_dilation=[True, True, False]`` (layer1-3 at stride 4, layer4 at stride 8).

    - ``down2`` = 1x1 conv (no bias) of layer3 1024 -> 512 (64^2 for a 256^2 input);
    - ``down3`` = 1x1 conv (no bias) of layer4 2048 -> 512 (32^2);
    - ``tau`` = Linear(1000 -> 1)(fc(avgpool(layer4))), one threshold per image (the ResNet ``fc`` is kept).

    Init as the reference: every Conv2d Kaiming-normal (fan_out), BatchNorm 1/0, Linear layers PyTorch's
    default. The COCO DeepLabV3 weights the reference loads were trained with the other dilation pattern
    (shapes match, receptive fields differ) and carry no ``fc``, which then stays random.
    """

    arch = "resnet101"
    torchvision_default = "coco"
    layout = "torchvision"  # the reference's own (QN:models/encoder.py, torchvision resnet101): no faithful variant

    def __init__(self, out_channels: int = 512) -> None:
        super().__init__()
        from torchvision.models import resnet101

        self.out_channels = out_channels
        self.backbone = resnet101(weights=None, replace_stride_with_dilation=[True, True, False])
        self.reduce2 = nn.Conv2d(1024, out_channels, kernel_size=1, bias=False)
        self.reduce3 = nn.Conv2d(2048, out_channels, kernel_size=1, bias=False)
        self.tau_head = nn.Linear(1000, 1)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        stages = _run_resnet(self.backbone, x, "layer4")
        pooled = torch.flatten(self.backbone.avgpool(stages["layer4"]), 1)
        tau = self.tau_head(self.backbone.fc(pooled)).squeeze(1)
        return {"down2": self.reduce2(stages["layer3"]), "down3": self.reduce3(stages["layer4"]), "tau": tau}


class LSLPNResNet50Encoder(nn.Module):
    """LSLPN layout (docs/reference.md#lslpn-resnet-50; Yu et al., ISBI 2021): ResNet-50 truncated after layer3, layer3
    dilated 2 (output stride 8); concat(layer2 512, layer3 1024) -> 3x3 conv (dilation 2, 1536 -> 256, bias) -> ReLU ->
    Dropout2d(0.5) as ``down3``. BatchNorm affine parameters are frozen (running statistics still update in training),
    conv weights start N(0, 0.01) before any checkpoint is loaded.

    Built on torchvision's ResNet-50 so ImageNet weights load by name. Every layer3 block uses dilation 2, as
    the reference does. ``faithful=True`` also reproduces the reference's Caffe-style blocks (stride on the 1x1
    conv of layer2's first block rather than on its 3x3 conv, the layout torchvision's ImageNet weights were
    trained with) and its ceil-mode max pool (65^2 instead of 64^2 features for a 512^2 input), from
    ``LS:code/models/resnet.py``; ``layout`` is then ``"caffe"`` instead of ``"torchvision"``. Parameter names
    and shapes are the same in both layouts, so only the recorded layout tells their checkpoints apart.
    """

    arch = "resnet50"
    torchvision_default = "imagenet"
    faithful_layout = "caffe"

    def __init__(self, out_channels: int = 256, faithful: bool = False, dropout: float = 0.5) -> None:
        super().__init__()
        from torchvision.models import resnet50

        self.out_channels = out_channels
        self.faithful = faithful
        self.layout = self.faithful_layout if faithful else "torchvision"
        self.backbone = resnet50(weights=None, replace_stride_with_dilation=[False, True, False])
        del self.backbone.layer4, self.backbone.avgpool, self.backbone.fc
        first = self.backbone.layer3[0].conv2  # torchvision keeps dilation 1 in the first dilated block
        first.dilation, first.padding = (2, 2), (2, 2)
        if faithful:
            block = self.backbone.layer2[0]
            block.conv1.stride, block.conv2.stride = (2, 2), (1, 1)
            self.backbone.maxpool.ceil_mode = True
        self.head = nn.Sequential(
            nn.Conv2d(512 + 1024, out_channels, kernel_size=3, padding=2, dilation=2, bias=True),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        stages = _run_resnet(self.backbone, x, "layer3")
        return {"down3": self.head(torch.cat([stages["layer2"], stages["layer3"]], dim=1))}


# ------------------------------------------------------------------------------------- weight loading

ENCODERS: Dict[str, type] = {
    "deeplabv3_resnet101": DeepLabV3ResNet101Encoder,
    "qnet_resnet101": QNetResNet101Encoder,
    "lslpn_resnet50": LSLPNResNet50Encoder,
    "small": SmallEncoder,
    "small_wide": WideSmallEncoder,
    "small_dilated": DilatedSmallEncoder,
}

logger = logging.getLogger(__name__)


@dataclass
class WeightLoadReport:
    """What a checkpoint filled in an encoder: ``matched`` encoder keys, encoder keys left ``missing``,
    checkpoint keys with no place (``unexpected``) and keys whose shapes differ (``shape_mismatched``)."""

    source: str
    matched: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.source}: {len(self.matched)} tensors loaded, {len(self.missing)} encoder tensors not in the "
            f"checkpoint, {len(self.unexpected)} checkpoint tensors unused, {len(self.shape_mismatched)} shape mismatches"
        )


def _candidate_names(key: str) -> List[str]:
    """Encoder names a checkpoint key may stand for: as is, without wrappers (``module.``, ``encoder.``),
    and with/without torchvision DeepLab's ``backbone.`` prefix (ImageNet ResNets have none)."""
    base = key
    for prefix in ("module.", "encoder."):
        while base.startswith(prefix):
            base = base[len(prefix) :]
    names = [key, base]
    names.append(base[len("backbone.") :] if base.startswith("backbone.") else "backbone." + base)
    return list(dict.fromkeys(names))


def _blocks_per_stage(names: "Iterable[str]") -> Dict[str, int]:
    """Residual blocks per ResNet stage found in tensor names (``...layer3.22.conv1.weight`` -> layer3: 23)."""
    counts: Dict[str, int] = {}
    for name in names:
        match = re.search(r"(?:^|\.)(layer[1-4])\.(\d+)\.", name)
        if match:
            counts[match.group(1)] = max(counts.get(match.group(1), 0), int(match.group(2)) + 1)
    return counts


def _check_depth(source: str, encoder: nn.Module, state: Mapping[str, Any]) -> None:
    """Refuse a ResNet of another depth (e.g. ResNet-101 weights for a ResNet-50 layout): names and shapes of
    the first blocks of each stage coincide, so without this check they would load silently, half filled."""
    ours, theirs = _blocks_per_stage(encoder.state_dict()), _blocks_per_stage(state)
    differ = {s: (theirs[s], ours[s]) for s in ours if s in theirs and theirs[s] != ours[s]}
    if differ:
        detail = ", ".join(f"{s}: {n} blocks in the checkpoint, {m} in the encoder" for s, (n, m) in differ.items())
        raise FsmisInputError(
            f"{source}: a ResNet of another depth than the {type(encoder).__name__} ({detail}); use the matching "
            "ResNet-50/101 weights"
        )


def _torchvision_state_dict(encoder: nn.Module, which: str) -> Mapping[str, torch.Tensor]:
    """Download (torch hub cache) torchvision's ``imagenet`` or ``coco`` weights for the encoder's ResNet."""
    from torchvision import models
    from torchvision.models import segmentation

    arch = getattr(encoder, "arch", None)
    if which == "":
        which = getattr(encoder, "torchvision_default", "")
    table = {
        ("resnet101", "imagenet"): models.ResNet101_Weights.IMAGENET1K_V1,
        ("resnet101", "coco"): segmentation.DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
        ("resnet50", "imagenet"): models.ResNet50_Weights.IMAGENET1K_V1,
        ("resnet50", "coco"): segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
    }
    if (arch, which) not in table:
        raise FsmisInputError(
            f"pretrained_weights: torchvision weights {which or '(default)'!r} are not available for a "
            f"{type(encoder).__name__}; use 'torchvision:imagenet' or 'torchvision:coco' with a ResNet layout, a "
            "local checkpoint file, or '$None' (the CPU switch fsmis_monai.bundles.CPU_OVERRIDES sets it)"
        )
    weights = table[(arch, which)]
    try:
        return weights.get_state_dict(progress=True)
    except (OSError, HTTPException) as e:  # URLError, socket timeouts and refused connections are OSErrors
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
        raise FsmisInputError(_offline_message(f"torchvision:{which}", weights.url, cached, e)) from e


def _offline_message(source: str, url: str, cached: "str | os.PathLike[str]", error: BaseException) -> str:
    """The one line a run stops with when torchvision cannot download ``url`` (no network): names the
    ``pretrained_weights`` setting, the file torchvision wanted and the two ways on."""
    return (
        f"pretrained_weights={source!r}: torchvision could not download {url} to {cached} ({error}); "
        f"either set pretrained_weights to a local copy of that file (a path), or to '$None' for random "
        "initialisation"
    )


def load_pretrained_weights(
    encoder: nn.Module, weights: "str | os.PathLike[str] | Mapping[str, torch.Tensor]"
) -> WeightLoadReport:
    """Copy a checkpoint's tensors into ``encoder`` wherever a name (after key mapping) and shape agree.

    ``weights``: a local file (torchvision ImageNet ResNet-50/101, COCO DeepLabV3, or a wrapped state dict;
    read with ``weights_only=True``), ``"torchvision"`` / ``"torchvision:imagenet"`` / ``"torchvision:coco"``
    (torchvision's own download, needs internet), or a state dict. Returns and logs the report. A checkpoint
    that fills nothing is an error naming the file (the references silently load nothing in that case).
    """
    if isinstance(weights, Mapping):
        source, state = "<state dict>", dict(weights)
    elif str(weights).startswith("torchvision"):
        source = str(weights)
        state = dict(_torchvision_state_dict(encoder, source.partition(":")[2]))
    else:
        source = str(weights)
        state = state_dict_from_checkpoint(torch_load(weights))
    _check_depth(source, encoder, state)
    own = encoder.state_dict()
    report = WeightLoadReport(source=source)
    to_load: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        target = next((n for n in _candidate_names(key) if n in own and n not in to_load), None)
        if target is None or not torch.is_tensor(value):
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[target].shape):
            report.shape_mismatched.append((key, tuple(value.shape), tuple(own[target].shape)))
        else:
            to_load[target] = value
    if not to_load:
        raise FsmisInputError(
            f"{source}: no tensor of this checkpoint fits the {type(encoder).__name__} "
            f"(checkpoint keys look like {list(state)[:3]}, the encoder's like {list(own)[:3]}; "
            f"{len(report.shape_mismatched)} names matched with a different shape)"
        )
    encoder.load_state_dict(to_load, strict=False)
    report.matched = list(to_load)
    report.missing = [k for k in own if k not in to_load]
    logger.info(report.summary())
    return report


def encoder_name(encoder: nn.Module) -> str:
    """The registry name of ``encoder``'s class (its class name when it is not registered)."""
    return next((n for n, cls in ENCODERS.items() if type(encoder) is cls), type(encoder).__name__)


def has_faithful_layout(name: str) -> bool:
    """Whether the encoder registered as ``name`` has a reference layout of its own (a ``faithful`` switch)."""
    return "faithful" in inspect.signature(ENCODERS[name]).parameters


def build_encoder(
    name: str, pretrained_weights: "str | os.PathLike[str] | None" = None, faithful: bool = False, **kwargs: Any
) -> nn.Module:
    """Create the encoder registered as ``name`` (see :data:`ENCODERS`) and optionally load weights into it
    (:func:`load_pretrained_weights`; the report is kept as ``encoder.weight_report``).

    ``faithful=True`` builds the reference repository's layout for encoders that have one of their own
    (``lslpn_resnet50``: the Caffe-style ResNet-50 of ``LS:code/models/resnet.py``); the other registered
    encoders already are the references' layout and ignore it.
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    if has_faithful_layout(name):
        kwargs["faithful"] = faithful
    encoder = ENCODERS[name](**kwargs)
    encoder.weight_report = None
    if pretrained_weights is not None:
        encoder.weight_report = load_pretrained_weights(encoder, pretrained_weights)
    return encoder

"""Feature encoders. Every encoder maps images [N, 3, H, W] to a dict of named outputs:

- ``"down2"``: fine features at stride 4 (Q-Net layout: 512 ch at 64x64 for a 256x256 input);
- ``"down3"``: coarse features at stride 8 (ALP/ADNet layout: 256 ch at 32x32; Q-Net layout: 512 ch);
- ``"tau"``: a per-image scalar [N] (Q-Net's query-informed threshold head), where the layout has one.

``encoder.out_channels`` gives the channel count of the feature outputs, so methods never hard-code it.
"""

from __future__ import annotations

from typing import Dict

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

EncoderOutput = Dict[str, torch.Tensor]


class SmallEncoder(nn.Module):
    """A small CPU-friendly encoder with the Q-Net output layout (``down2``, ``down3``, ``tau``).

    For tests, the quickstart and CPU training budgets: a few MONAI residual units, no pretraining.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, width: int = 32) -> None:
        super().__init__()
        self.out_channels = channels
        self.stem = Convolution(2, in_channels, width, strides=2, kernel_size=3, norm="batch", act="relu")
        self.stage1 = ResidualUnit(2, width, 2 * width, strides=2, subunits=2, norm="batch", act="relu")
        self.stage2 = ResidualUnit(2, 2 * width, 4 * width, strides=2, subunits=2, norm="batch", act="relu")
        self.proj2 = nn.Conv2d(2 * width, channels, kernel_size=1, bias=False)
        self.proj3 = nn.Conv2d(4 * width, channels, kernel_size=1, bias=False)
        self.tau_head = nn.Linear(4 * width, 1)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        s1 = self.stage1(self.stem(x))  # stride 4
        s2 = self.stage2(s1)  # stride 8
        tau = self.tau_head(s2.mean(dim=(2, 3))).squeeze(1)
        return {"down2": self.proj2(s1), "down3": self.proj3(s2), "tau": tau}

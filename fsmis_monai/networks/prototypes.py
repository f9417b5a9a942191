"""The shared vocabulary of prototype methods: masked average pooling and cosine score maps.

MAP(f, M) = sum(f * M) / (sum(M) + eps). The Q-Net family (ADNet, Q-Net, GMRD, PAMI, DIFD) upsamples
the features bilinearly to the mask size before pooling; SSL-ALPNet downsamples the mask to the feature
size instead (methods.md section 5). Both are offered here.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

MAP_EPS = 1e-5


def resize_to(x: torch.Tensor, size: tuple[int, int], align_corners: bool = True) -> torch.Tensor:
    """Bilinear resize of a [N, C, h, w] tensor (no-op when already at ``size``)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def masked_average_pooling(
    features: torch.Tensor,
    masks: torch.Tensor,
    mode: Literal["upsample_features", "downsample_mask"] = "upsample_features",
    eps: float = MAP_EPS,
) -> torch.Tensor:
    """Prototype of each image's masked region: features [N, C, h, w], masks [N, H, W] -> [N, C]."""
    m = masks.unsqueeze(1).to(features.dtype)
    if mode == "upsample_features":
        features = resize_to(features, tuple(m.shape[-2:]))
    elif mode == "downsample_mask":
        m = resize_to(m, tuple(features.shape[-2:]), align_corners=False)
    else:
        raise ValueError(f"unknown MAP mode {mode!r}")
    return (features * m).sum(dim=(2, 3)) / (m.sum(dim=(2, 3)) + eps)


def cosine_map(features: torch.Tensor, prototypes: torch.Tensor, scale: float = 1.0, eps: float = 1e-8) -> torch.Tensor:
    """Scaled cosine similarity of every pixel with every prototype.

    features [N, C, h, w] and prototypes [P, C] (shared) or [N, P, C] (per image) -> [N, P, h, w].
    """
    f = F.normalize(features, dim=1, eps=eps)
    if prototypes.dim() == 2:
        p = F.normalize(prototypes, dim=1, eps=eps)
        return scale * torch.einsum("nchw,pc->nphw", f, p)
    p = F.normalize(prototypes, dim=2, eps=eps)
    return scale * torch.einsum("nchw,npc->nphw", f, p)

"""The shared vocabulary of prototype methods: masked average pooling (over the whole mask, or over boxes and
grid cells), cosine score maps, the threshold probability and Q-Net's fusion of feature paths.

MAP(f, M) = sum(f * M) / (sum(M) + eps). The Q-Net family (ADNet, Q-Net, GMRD, PAMI, DIFD) upsamples
the features bilinearly to the mask size before pooling; SSL-ALPNet downsamples the mask to the feature
size instead (docs/reference.md#masked-average-pooling). Both are offered here.
"""

from __future__ import annotations

from typing import Dict, Literal, Mapping

import torch
import torch.nn.functional as F

from fsmis_monai.losses.core import PROB_EPS

MAP_EPS = 1e-5


def resize_to(x: torch.Tensor, size: tuple[int, int], align_corners: bool = True) -> torch.Tensor:
    """Bilinear resize of a [N, C, h, w] tensor (no-op when already at ``size``)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def _interpolation_matrix(n_in: int, n_out: int, align_corners: bool, like: torch.Tensor) -> torch.Tensor:
    """[n_out, n_in] matrix of 1D linear interpolation, as ``F.interpolate(mode="bilinear")`` applies per axis."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device)[None, None]
    return F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=align_corners)[0, 0]


def interval_indicators(start: torch.Tensor, stop: torch.Tensor, size: int, dtype=torch.float32) -> torch.Tensor:
    """[n, size] indicator of the intervals [start, stop) (start, stop [n]): one axis of n boxes or grid cells.

    A box's masked sum of x is rows^T x cols (:func:`box_sums`), so n boxes cost two matrix products instead of
    n slices (LSLPN cells, DIFD boxes)."""
    idx = torch.arange(size, device=start.device)
    return ((idx >= start[:, None]) & (idx < stop[:, None])).to(dtype)


def box_sums(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Sums [n, C] of x [C, H, W] over n boxes given by row and column indicators [n, H], [n, W]
    (:func:`interval_indicators`); divided by the box's mask count this is the box's masked average."""
    return torch.einsum("chb,bh->bc", torch.einsum("chw,bw->chb", x, cols.to(x)), rows.to(x))


def upsampled_mask_weights(masks: torch.Tensor, size: tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """Masks [N, H, W] pulled back to a feature grid ``size`` (h, w) through bilinear upsampling.

    Bilinear upsampling is linear and separable, up(f) = A_h f A_w^T, so
    sum(up(f) * M) = sum(f * (A_h^T M A_w)): pooling against these weights equals pooling the upsampled
    features, without materialising [N, C, H, W] features (the Q-Net family pools 512 x 256 x 256 per image).
    """
    h, w = size
    a_h = _interpolation_matrix(h, masks.shape[-2], align_corners, masks)
    a_w = _interpolation_matrix(w, masks.shape[-1], align_corners, masks)
    return torch.einsum("Hh,nHW,Ww->nhw", a_h, masks, a_w)


def masked_average_pooling(
    features: torch.Tensor,
    masks: torch.Tensor,
    mode: Literal["upsample_features", "downsample_mask"] = "upsample_features",
    eps: float = MAP_EPS,
    align_corners: bool = False,
) -> torch.Tensor:
    """Prototype of each image's masked region: features [N, C, h, w], masks [N, H, W] -> [N, C].

    ``upsample_features`` pools the features bilinearly upsampled to the mask size (ADNet, Q-Net and
    descendants; their ``F.interpolate`` default is ``align_corners=False``), computed exactly through
    :func:`upsampled_mask_weights`; ``downsample_mask`` pools against the mask resized to the feature size
    (SSL-ALPNet).
    """
    m = masks.to(features.dtype)
    if mode == "upsample_features":
        weights = m if tuple(m.shape[-2:]) == tuple(features.shape[-2:]) else upsampled_mask_weights(
            m, tuple(features.shape[-2:]), align_corners
        )
        return torch.einsum("nchw,nhw->nc", features, weights) / (m.sum(dim=(1, 2))[:, None] + eps)
    if mode == "downsample_mask":
        m = resize_to(m.unsqueeze(1), tuple(features.shape[-2:]), align_corners=False)
        return (features * m).sum(dim=(2, 3)) / (m.sum(dim=(2, 3)) + eps)
    raise ValueError(f"unknown MAP mode {mode!r}")


def cosine_map(features: torch.Tensor, prototypes: torch.Tensor, scale: float = 1.0, eps: float = 1e-8) -> torch.Tensor:
    """Scaled cosine similarity of every pixel with every prototype.

    features [N, C, h, w] and prototypes [P, C] (shared) or [N, P, C] (per image) -> [N, P, h, w].
    """
    return scale * unit_cosine_map(F.normalize(features, dim=1, eps=eps), prototypes, eps)


def unit_cosine_map(units: torch.Tensor, prototypes: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """:func:`cosine_map` (scale 1) of features already normalised along channels, ``units`` [N, C, h, w]
    (a method that scores one feature map against several prototype sets normalises it once)."""
    if prototypes.dim() == 2:
        return torch.einsum("nchw,pc->nphw", units, F.normalize(prototypes, dim=1, eps=eps))
    return torch.einsum("nchw,npc->nphw", units, F.normalize(prototypes, dim=2, eps=eps))


def threshold_probability(
    features: torch.Tensor, prototypes: torch.Tensor, tau: torch.Tensor, scale: float = 20.0
) -> torch.Tensor:
    """ADNet / Q-Net foreground probability against one prototype per image with a per-image threshold.

    p(x) = 1 - sigmoid(0.5 * (-scale * cos(f(x), p) - tau)); features [N, C, h, w], prototypes [N, C] or [C],
    tau [N] (or a scalar) -> [N, h, w].
    """
    if prototypes.dim() == 1:
        prototypes = prototypes.expand(features.shape[0], -1)
    anomaly = -cosine_map(features, prototypes[:, None], scale=scale)[:, 0]
    tau = torch.as_tensor(tau, dtype=features.dtype, device=features.device).reshape(-1, 1, 1)
    return 1.0 - torch.sigmoid(0.5 * (anomaly - tau))


def foreground_probability_to_logits(probability: torch.Tensor, eps: float = PROB_EPS) -> torch.Tensor:
    """[N, h, w] foreground probabilities -> [N, 2, h, w] log-probabilities [log(1-p), log p] (clamped as the
    Q-Net family clamps before its NLL), so that ``softmax`` of the result gives back [1-p, p]."""
    p = probability.unsqueeze(1)
    return torch.log(torch.cat([1.0 - p, p], dim=1).clamp(eps, 1.0 - eps))


def fuse_paths(per_path: Dict[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Q-Net's multi-scale fusion sum_n w_n x_n / sum_n w_n over the paths of ``per_path`` (all ``weights``
    count in the denominator, so a path left out contributes its weight but no term; PAMI leaves out its
    zero-weight path). Q-Net: {"down2": alpha, "down3": 1 - alpha}."""
    return sum(weights[k] * v for k, v in per_path.items()) / sum(weights.values())


def grid_prototypes(features: torch.Tensor, masks: torch.Tensor, window: int, threshold: float) -> torch.Tensor:
    """Local prototypes (SSL-ALPNet, Ouyang et al. ECCV 2020): average-pool features [K, C, h, w] and masks
    [K, h, w] (already at feature size) with a ``window`` x ``window`` kernel; every window whose pooled mask
    exceeds ``threshold`` gives one prototype. All shots pool together -> [P, C] (P may be 0)."""
    pooled_f = F.avg_pool2d(features, window)
    pooled_m = F.avg_pool2d(masks.unsqueeze(1).to(features.dtype), window)[:, 0]
    return pooled_f.permute(0, 2, 3, 1)[pooled_m > threshold]


def softmax_weighted_score(
    features: torch.Tensor, prototypes: torch.Tensor, scale: float = 20.0, eps: float = 1e-4
) -> torch.Tensor:
    """S(x) = sum_k softmax_k(d(x)) d_k(x) with d_k = scale * cos(f(x), p_k): features [N, C, h, w],
    prototypes [P, C] -> [N, 1, h, w]. With one prototype this is plain scaled cosine; with none it is 0
    (as a convolution with zero filters gives in the reference)."""
    if prototypes.shape[0] == 0:
        return features.new_zeros((features.shape[0], 1, *features.shape[-2:]))
    d = cosine_map(features, prototypes, scale=scale, eps=eps)
    return (torch.softmax(d, dim=1) * d).sum(dim=1, keepdim=True)


"""Boundary-F1 loss (Bokhovkin & Burnaev, "Boundary Loss for Remote Sensing Imagery Semantic Segmentation",
ISNN 2019), as DIFD trains with it (docs/reference.md#difd, theta0 = 3, theta = 5).

Written here because MONAI's ``BoundaryLoss`` is Kervadec's signed-distance loss, a different objective.

For every class c, with y_c the one-hot ground truth and p_c the predicted probability:

    boundary(m)   = maxpool_{theta0}(1 - m) - (1 - m)      (pixels of m touching a pixel outside m)
    extended(b)   = maxpool_{theta}(b)                      (boundary dilated by (theta - 1) / 2 pixels)
    P_c = sum(b(p_c) * ext(b(y_c))) / sum(b(p_c)),   R_c = sum(ext(b(p_c)) * b(y_c)) / sum(b(y_c))
    loss = mean over batch and classes of 1 - 2 P_c R_c / (P_c + R_c)

Max pooling pads with -inf, so the image border is not a boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss


def _boundary(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    inverse = 1.0 - mask
    return F.max_pool2d(inverse, kernel_size=kernel, stride=1, padding=(kernel - 1) // 2) - inverse


def _extend(boundary: torch.Tensor, kernel: int) -> torch.Tensor:
    return F.max_pool2d(boundary, kernel_size=kernel, stride=1, padding=(kernel - 1) // 2)


class BoundaryF1Loss(_Loss):
    """1 - boundary F1 between class probabilities [N, C, H, W] and integer labels [N, H, W].

    Args:
        theta0: odd window that finds boundaries (3 = 8-neighbourhood).
        theta: odd window that widens them for the precision/recall matching (5 = 2-pixel tolerance).
        ignore_index: label value excluded from the sums. Ignored pixels count as class 0 when boundaries
            are located (the released loss has no ignore handling and fails on such labels).
        eps: added to every denominator, 1e-7 as released.
    """

    def __init__(self, theta0: int = 3, theta: int = 5, ignore_index: int = 255, eps: float = 1e-7) -> None:
        super().__init__()
        if theta0 % 2 == 0 or theta % 2 == 0:
            raise ValueError(f"theta0 and theta must be odd window sizes, got {theta0} and {theta}")
        self.theta0 = theta0
        self.theta = theta
        self.ignore_index = ignore_index
        self.eps = eps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4 or target.shape != (input.shape[0], *input.shape[2:]):
            raise ValueError(
                f"expected probabilities [N, C, H, W] and labels [N, H, W], got {tuple(input.shape)} and "
                f"{tuple(target.shape)}"
            )
        n_classes = input.shape[1]
        valid = (target != self.ignore_index).unsqueeze(1).to(input.dtype)
        labels = torch.where(target == self.ignore_index, torch.zeros_like(target), target).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"labels must lie in [0, {n_classes - 1}] or equal ignore_index {self.ignore_index}")
        one_hot = F.one_hot(labels, n_classes).permute(0, 3, 1, 2).to(input.dtype)

        gt_b = _boundary(one_hot, self.theta0) * valid
        pred_b = _boundary(input, self.theta0) * valid
        gt_b_ext = _extend(gt_b, self.theta) * valid
        pred_b_ext = _extend(pred_b, self.theta) * valid

        precision = (pred_b * gt_b_ext).sum(dim=(2, 3)) / (pred_b.sum(dim=(2, 3)) + self.eps)
        recall = (pred_b_ext * gt_b).sum(dim=(2, 3)) / (gt_b.sum(dim=(2, 3)) + self.eps)
        bf1 = 2 * precision * recall / (precision + recall + self.eps)
        return (1.0 - bf1).mean()

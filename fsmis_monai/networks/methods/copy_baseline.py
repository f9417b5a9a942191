"""The no-learning floor: the support mask copied onto the query slice the protocol pairs it with.

No network and no image information: the prediction for a query slice is the mask of the support slice(s) the
evaluation protocol pairs with it (EP1 / ALP: the support's organ slice at the same relative position inside
the organ; ``whole``: the support group the protocol picks), averaged over the shots. It measures what a
protocol's slice pairing alone is worth, so a trained network can be read against it: a model below this
floor on a class has learned nothing about that organ's appearance. No published FSMIS repository reports
it (docs/reference.md#copy-baseline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsmis_monai.networks.methods.base import FewShotOutput, FewShotSegmenter, SupportState, check_support

#: logit magnitude of a copied mask: softmax probability ~1 - 4.5e-5 where the mask is 1 (or 0)
COPY_LOGIT = 10.0


class SupportMaskCopy(FewShotSegmenter):
    """Registered as ``"support_copy"``: ``segment`` returns the shots' mean support mask as the foreground.

    ``encode_support``: support images [K, C, H, W] (unused) and masks [K, H, W] -> state ``{"mask": [H, W]}``,
    the mean of the K masks; ``segment``: query images [N, C, H', W'] -> logits [N, 2, H', W'] with foreground
    where the mean mask is >= 0.5 (resized bilinearly when the query's in-plane size differs). The one
    parameter-free method: ``forward`` (training) raises ``TypeError``, there is nothing to learn.
    """

    name = "support_copy"

    def __init__(self, encoder: object = None, faithful: bool = False, **unused: object) -> None:
        # ``encoder`` and the method options a bundle passes are accepted and ignored: the floor reads no image
        super().__init__()
        self.faithful = faithful

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
        check_support(support_images, support_masks)
        return {"mask": support_masks.float().mean(0)}

    def segment(self, query_images: torch.Tensor, state: SupportState) -> torch.Tensor:
        mask = state["mask"].to(query_images.device)
        size = tuple(query_images.shape[-2:])
        if tuple(mask.shape) != size:
            mask = F.interpolate(mask[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        fg = (mask >= 0.5).to(query_images.dtype) * (2 * COPY_LOGIT) - COPY_LOGIT
        fg = fg.expand(query_images.shape[0], *size)
        return torch.stack([torch.zeros_like(fg), fg], dim=1)

    def forward(self, support_images, support_masks, query_images, query_labels=None) -> FewShotOutput:
        raise TypeError("support_copy is the parameter-free no-learning floor: it has nothing to train")

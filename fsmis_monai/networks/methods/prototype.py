"""A plain prototype baseline (PANet-style without alignment): MAP foreground and background
prototypes, logits = 20 * cosine. Used to test the data and evaluation pipeline on real scans before
any published method is trained, and as the simplest reference for new methods.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fsmis_monai.networks.methods.base import (
    FewShotOutput,
    FewShotSegmenter,
    QueryFeatures,
    SupportState,
    check_support,
    encoder_features,
    resolve_encoder,
)
from fsmis_monai.networks.prototypes import cosine_map, masked_average_pooling, resize_to


class PrototypeSegmenter(FewShotSegmenter):
    """Masked-average-pooling + cosine few-shot segmenter on any encoder's ``feature_key`` output."""

    name = "prototype"

    def __init__(self, encoder: "str | nn.Module | None" = None, feature_key: str = "down3", scale: float = 20.0,
                 pretrained_weights: Optional[str] = None) -> None:
        super().__init__()
        self.encoder = resolve_encoder("small" if encoder is None else encoder, pretrained_weights)
        self.feature_key = feature_key
        self.scale = scale

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
        check_support(support_images, support_masks)
        feats = self.encoder(support_images)[self.feature_key]
        fg = masked_average_pooling(feats, support_masks).mean(0)
        bg = masked_average_pooling(feats, 1.0 - support_masks).mean(0)
        return {"prototypes": torch.stack([bg, fg])}

    def encode_query(self, query_images: torch.Tensor) -> QueryFeatures:
        return encoder_features(self.encoder, query_images, (self.feature_key,))

    def segment_encoded(self, features: QueryFeatures, state: SupportState) -> torch.Tensor:
        logits = cosine_map(features[self.feature_key], state["prototypes"], scale=self.scale)
        return resize_to(logits, features.image_size)

    def forward(self, support_images, support_masks, query_images, query_labels=None) -> FewShotOutput:
        """Each episode encoded on its own (support, then query: no joint BatchNorm batch, unlike the template
        of the published methods); plain cross-entropy (the base's :meth:`training_losses`)."""
        logits = torch.cat(
            [self.segment(q[None], self.encode_support(s, m)) for s, m, q in zip(support_images, support_masks, query_images)]
        )
        out: FewShotOutput = {"logits": logits}
        if query_labels is not None:
            out["losses"] = self.training_losses(logits, query_labels, {})
        return out

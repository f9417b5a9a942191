"""ADNet (Hansen et al., "Anomaly detection-inspired few-shot medical image segmentation through
self-supervision with supervoxels", MedIA 2022): one foreground prototype and a learned threshold
(docs/reference.md#adnet).

The query is scored by its anomaly S = -20 cos(f, p) against the support's foreground prototype p;
p_fg = 1 - sigmoid(0.5 (S - T)) with a single learned T (initialised at -10: "foreground when cos > 0.5").
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from fsmis_monai.losses import prototype_alignment_loss, threshold_loss, weighted_nll
from fsmis_monai.networks.methods.base import (
    FewShotSegmenter,
    QueryFeatures,
    SupportState,
    check_support,
    encoder_features,
    resolve_encoder,
)
from fsmis_monai.networks.prototypes import (
    foreground_probability_to_logits,
    masked_average_pooling,
    resize_to,
    threshold_probability,
)


class ADNet(FewShotSegmenter):
    """ADNet on any encoder output ``feature_key`` (default layout: DeepLabV3-ResNet-101, 256 ch at 1/8).

    ``logits`` are the clamped log-probabilities [log(1 - p), log p], so ``softmax`` gives back [1 - p, p] and
    the losses are the reference's NLL of clamped probabilities.

    Args:
        encoder / pretrained_weights: as in every method. Note (docs/reference.md#quirk-adnet-from-scratch): the
            released training script builds the network *without* pretrained weights; the paper describes a
            COCO-pretrained encoder. Here the constructor's default is ``None`` (the release); the bundle's
            ``train.json`` defaults to the paper (``"torchvision:coco"``) and to ``None`` with ``faithful: true``.
        faithful: accepted for a uniform interface; no documented ADNet model quirk changes numbers.
        threshold_init: initial T, -10. scale: 20. class_weights: query NLL weights (bg, fg), (0.1, 1).
        align_weight: alignment loss weight, 1. threshold_loss_weight: weight of the T / 20 loss, 1.
    """

    name = "adnet"

    def __init__(
        self,
        encoder: "str | nn.Module" = "deeplabv3_resnet101",
        pretrained_weights: Optional[str] = None,
        faithful: bool = False,
        feature_key: str = "down3",
        threshold_init: float = -10.0,
        scale: float = 20.0,
        class_weights: Sequence[float] = (0.1, 1.0),
        align_weight: float = 1.0,
        threshold_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.encoder = resolve_encoder(encoder, pretrained_weights, faithful)
        self.faithful = faithful
        self.feature_key = feature_key
        self.threshold = nn.Parameter(torch.tensor([float(threshold_init)]))
        self.scale = scale
        self.class_weights = tuple(class_weights)
        self.align_weight, self.threshold_loss_weight = align_weight, threshold_loss_weight

    def _prototype(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Mean over shots of the MAP of the features upsampled to the mask size -> [C]."""
        return masked_average_pooling(features, masks.to(features.dtype)).mean(dim=0)

    def probability(self, features: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
        """Foreground probability [N, 1, h, w] in [0, 1] at feature resolution: features [N, C, h, w] against
        ``prototype`` [C] with the learned threshold (docs/reference.md#adnet)."""
        return threshold_probability(features, prototype, self.threshold, self.scale).unsqueeze(1)

    @staticmethod
    def _logits(probability: torch.Tensor, size) -> torch.Tensor:
        return foreground_probability_to_logits(resize_to(probability, size, align_corners=True)[:, 0])

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
        check_support(support_images, support_masks)
        return {"prototype": self._prototype(self.encoder(support_images)[self.feature_key], support_masks)}

    def encode_query(self, query_images: torch.Tensor) -> QueryFeatures:
        return encoder_features(self.encoder, query_images, (self.feature_key,))

    def segment_encoded(self, features: QueryFeatures, state: SupportState) -> torch.Tensor:
        return self._logits(self.probability(features[self.feature_key], state["prototype"]), features.image_size)

    def forward_episode(self, support, support_masks, query, query_labels):
        s_feats, q_feats = support[self.feature_key], query[self.feature_key]
        prob = self.probability(q_feats, self._prototype(s_feats, support_masks))
        logits = self._logits(prob, query.image_size)
        if query_labels is None:
            return logits, {}
        return logits, {"align": self._alignment_loss(q_feats, prob, s_feats, support_masks)}

    def training_losses(self, logits, query_labels, episode_means):
        """Weighted NLL (0.1, 1) of the logits [B, 2, H, W] against labels [B, H, W], the weighted alignment
        mean and the threshold loss T / 20 (docs/reference.md#shared-losses)."""
        return {
            "query_nll": weighted_nll(logits, query_labels, self.class_weights),
            "align": self.align_weight * episode_means["align"],
            "threshold": self.threshold_loss_weight * threshold_loss(self.threshold, self.scale),
        }

    def _alignment_loss(self, q_feats, q_prob, s_feats, s_masks) -> torch.Tensor:
        """Query prototype from the query's argmax at *feature* resolution (as released), same threshold."""
        query_fg = (torch.cat([1.0 - q_prob, q_prob], dim=1).argmax(dim=1) == 1).to(q_feats.dtype)  # [1, h, w]

        def segment_support(fg: torch.Tensor, shot: int) -> torch.Tensor:
            prototype = masked_average_pooling(q_feats, fg)[0]
            return self._logits(self.probability(s_feats[shot : shot + 1], prototype), tuple(s_masks.shape[-2:]))

        return prototype_alignment_loss(query_fg, s_masks, segment_support, weighted_nll)

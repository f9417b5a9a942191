"""SSL-ALPNet (Ouyang et al., "Self-supervision with superpixels: training few-shot medical image segmentation
without annotation", ECCV 2020; TMI 2022): adaptive local prototype pooling (docs/reference.md#ssl-alpnet).

Local prototypes are window-averaged support features whose window is at least ``purity`` foreground (or
background); the foreground also gets the global MAP prototype. A pixel's class score is the softmax-weighted
sum of its scaled cosine similarities to that class's prototypes. No decoder, no threshold.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fsmis_monai.losses import prototype_alignment_loss, weighted_cross_entropy
from fsmis_monai.networks.methods.base import (
    FewShotSegmenter,
    QueryFeatures,
    SupportState,
    check_support,
    encoder_features,
    resolve_encoder,
)
from fsmis_monai.networks.prototypes import grid_prototypes, masked_average_pooling, resize_to, softmax_weighted_score

#: the reference decides "local + global" vs "global only" foreground with a 4x4 pool, whatever the pooling window
REFERENCE_CHECK_WINDOW = 4


class ALPNet(FewShotSegmenter):
    """SSL-ALPNet on any encoder output ``feature_key`` (default layout: DeepLabV3-ResNet-101, 256 ch at 1/8).

    Args:
        encoder: encoder name for :func:`~fsmis_monai.networks.encoders.build_encoder` or a module.
        pretrained_weights: checkpoint for the encoder (the paper uses the COCO DeepLabV3 weights).
        faithful: reproduce the released code's quirk (docs/reference.md#quirk-alpnet-check-window): the foreground "has
            local prototypes" check always pools 4x4, even at test time where the prototypes pool 2x2. The default
            checks with the window actually used, so a small organ with pure 2x2 windows gets local prototypes.
        train_window / test_window: local pooling window on the feature map (4 -> 8x8 candidates on 32^2).
        purity: minimum pooled mask value for a window to become a prototype (strictly greater), 0.95.
        scale: cosine scale, 20. class_weights: query CE weights (bg, fg), (0.05, 1).
        align_weight: weight of the PANet alignment loss, 1.
    """

    name = "ssl_alpnet"

    def __init__(
        self,
        encoder: "str | nn.Module" = "deeplabv3_resnet101",
        pretrained_weights: Optional[str] = None,
        faithful: bool = False,
        feature_key: str = "down3",
        train_window: int = 4,
        test_window: int = 2,
        purity: float = 0.95,
        scale: float = 20.0,
        class_weights: Sequence[float] = (0.05, 1.0),
        align_weight: float = 1.0,
        norm_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.encoder = resolve_encoder(encoder, pretrained_weights, faithful)
        self.faithful = faithful
        self.feature_key = feature_key
        self.train_window, self.test_window = train_window, test_window
        self.purity, self.scale, self.norm_eps = purity, scale, norm_eps
        self.class_weights = tuple(class_weights)
        self.align_weight = align_weight

    # ---------------------------------------------------------------------------------- prototypes

    def _window(self) -> int:
        return self.train_window if self.training else self.test_window

    def prototypes(self, features: torch.Tensor, masks: torch.Tensor, window: int) -> SupportState:
        """Background and foreground prototype sets from features [K, C, h, w] and fg masks [K, h, w] at feature
        size: bg = local prototypes only; fg = local + one global per shot, or the shots' mean global prototype
        alone when no window is pure enough (checked with ``window``, or 4x4 when ``faithful``)."""
        bg_masks = 1.0 - masks
        bg = grid_prototypes(features, bg_masks, window, self.purity)
        check = REFERENCE_CHECK_WINDOW if self.faithful else window
        global_protos = masked_average_pooling(features, masks)  # masks already at feature size
        if F.avg_pool2d(masks.unsqueeze(1), check).max() >= self.purity:
            fg = torch.cat([grid_prototypes(features, masks, window, self.purity), global_protos])
        else:
            fg = global_protos.mean(dim=0, keepdim=True)
        return {"bg": bg, "fg": fg}

    def scores(self, features: torch.Tensor, state: SupportState) -> torch.Tensor:
        """Scores [N, 2, h, w] ([S_bg, S_fg], units of ``scale`` x cosine) of features [N, C, h, w] at feature
        resolution: softmax-weighted scaled cosine to each class's prototypes (docs/reference.md#ssl-alpnet)."""
        return torch.cat(
            [softmax_weighted_score(features, state[c], self.scale, self.norm_eps) for c in ("bg", "fg")], dim=1
        )

    def _support_state(self, features: torch.Tensor, masks: torch.Tensor, window: int) -> SupportState:
        small = resize_to(masks.unsqueeze(1).to(features.dtype), tuple(features.shape[-2:]), align_corners=False)
        return self.prototypes(features, small[:, 0], window)

    # ---------------------------------------------------------------------------------- contract

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
        check_support(support_images, support_masks)
        features = self.encoder(support_images)[self.feature_key]
        return self._support_state(features, support_masks, self._window())

    def encode_query(self, query_images: torch.Tensor) -> QueryFeatures:
        return encoder_features(self.encoder, query_images, (self.feature_key,))

    def segment_encoded(self, features: QueryFeatures, state: SupportState) -> torch.Tensor:
        return resize_to(self.scores(features[self.feature_key], state), features.image_size, align_corners=False)

    def forward_episode(self, support, support_masks, query, query_labels):
        s_feats, q_feats = support[self.feature_key], query[self.feature_key]
        masks = support_masks.to(s_feats.dtype)
        score = self.scores(q_feats, self._support_state(s_feats, masks, self._window()))
        logits = resize_to(score, query.image_size, align_corners=False)
        if query_labels is None:
            return logits, {}
        return logits, {"align": self._alignment_loss(q_feats, score, s_feats, masks)}

    def training_losses(self, logits, query_labels, episode_means):
        """Weighted cross-entropy (0.05, 1) of the logits [B, 2, H, W] against labels [B, H, W] plus the
        weighted alignment mean (docs/reference.md#ssl-alpnet, losses)."""
        return {
            "query_ce": weighted_cross_entropy(logits, query_labels, self.class_weights),
            "align": self.align_weight * episode_means["align"],
        }

    def _alignment_loss(
        self, q_feats: torch.Tensor, q_score: torch.Tensor, s_feats: torch.Tensor, s_masks: torch.Tensor
    ) -> torch.Tensor:
        """Query argmax at feature size -> query prototypes (training pooling) -> segment each support shot."""
        query_fg = (q_score.argmax(dim=1) == 1).to(q_feats.dtype)  # [1, h, w]

        def segment_support(fg: torch.Tensor, shot: int) -> torch.Tensor:
            state = self.prototypes(q_feats, fg, self.train_window)
            score = self.scores(s_feats[shot : shot + 1], state)
            return resize_to(score, tuple(s_masks.shape[-2:]), align_corners=False)

        return prototype_alignment_loss(query_fg, s_masks, segment_support, weighted_cross_entropy, skip_empty=False)

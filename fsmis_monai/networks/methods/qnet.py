"""Q-Net (Shen et al., "Q-Net: Query-Informed Few-Shot Medical Image Segmentation", arXiv 2208.11451):
ADNet's anomaly threshold made query-informed, on two feature scales, with test-time prototype refinement
(docs/reference.md#q-net).

Per path n (``down2`` at 1/4, ``down3`` at 1/8): p_n = 1 - sigmoid(0.5 (-20 cos(f_n, proto_n) - tau_q)), with
tau_q the encoder's threshold head on the *query* image; fused as alpha up(p_down2) + (1 - alpha) up(p_down3).
At test time each query's prototypes are refined for a few Adam steps (see :meth:`QNet.refine_prototype`).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fsmis_monai.losses import prototype_alignment_loss, weighted_nll
from fsmis_monai.networks.methods.base import (
    FewShotSegmenter,
    QueryFeatures,
    SupportState,
    check_support,
    resolve_encoder,
)
from fsmis_monai.networks.prototypes import (
    foreground_probability_to_logits,
    fuse_paths,
    masked_average_pooling,
    resize_to,
    threshold_probability,
)

PATHS = ("down2", "down3")


def _minmax_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """sigmoid((x - min) / (max - min)) with min/max over each image's [C, h, w] (a constant image gives
    sigmoid(0) instead of the reference's NaN)."""
    flat = x.flatten(1)
    lo, hi = flat.min(dim=1)[0], flat.max(dim=1)[0]
    return torch.sigmoid((x - lo.view(-1, 1, 1, 1)) / (hi - lo).clamp_min(1e-12).view(-1, 1, 1, 1))


class QNet(FewShotSegmenter):
    """Q-Net on an encoder with ``down2``, ``down3`` and ``tau`` outputs (default: the Q-Net ResNet-101 layout).

    ``logits`` are the clamped log-probabilities [log(1 - p), log p] of the fused foreground probability.
    Refinement runs batched: every query slice gets its own copy of the prototypes and its own loss term;
    Adam updates each element independently, so a batch gives the same result as one slice at a time.

    Args:
        encoder / pretrained_weights: as in every method (the reference loads the COCO DeepLabV3 weights).
        faithful: reproduce the released refinement loss (docs/reference.md#quirk-q-net-refinement):
            BCE(sigmoid(minmax(f)), sigmoid(minmax(f_new))) with the gradient flowing through the *target* f_new. That
            gradient, -logit(input), does not vanish when f_new = f: it pushes the normalised features towards 0 or 1.
            The default (corrected) swaps the arguments, BCE(f_new, f) with f the fixed target, which is minimal when
            the prototype-filled features match the original ones.
        alpha: weight of the ``down2`` path, 0.9 (the README suggests 0.6 for setting 2).
        refine_steps / refine_lr: test-time refinement, 7 Adam steps at lr 0.01 (0 disables it).
        scale: 20. class_weights: query NLL weights (bg, fg), (0.1, 1). align_weight: 1.
    """

    name = "qnet"

    @property
    def test_time_grad(self) -> bool:
        """Whether ``segment`` refines at test time (then inference runs under ``no_grad``, see the base)."""
        return self.refine_steps > 0

    def __init__(
        self,
        encoder: "str | nn.Module" = "qnet_resnet101",
        pretrained_weights: Optional[str] = None,
        faithful: bool = False,
        alpha: float = 0.9,
        refine_steps: int = 7,
        refine_lr: float = 0.01,
        scale: float = 20.0,
        class_weights: Sequence[float] = (0.1, 1.0),
        align_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.encoder = resolve_encoder(encoder, pretrained_weights, faithful)
        self.faithful = faithful
        self.alpha = alpha
        self.refine_steps, self.refine_lr = refine_steps, refine_lr
        self.scale = scale
        self.class_weights = tuple(class_weights)
        self.align_weight = align_weight

    # ---------------------------------------------------------------------------------- pieces

    @staticmethod
    def _check_outputs(out: Dict[str, torch.Tensor]) -> None:
        missing = [k for k in (*PATHS, "tau") if k not in out]
        if missing:
            raise ValueError(f"Q-Net needs an encoder with outputs {PATHS + ('tau',)}; this one lacks {missing}")

    @staticmethod
    def _prototypes(features: Dict[str, torch.Tensor], masks: torch.Tensor) -> SupportState:
        """Per path, the shots' mean MAP (features upsampled to the mask size) -> [C]."""
        return {n: masked_average_pooling(features[n], masks.to(features[n].dtype)).mean(dim=0) for n in PATHS}

    def fuse(self, probabilities: Dict[str, torch.Tensor], size) -> torch.Tensor:
        """alpha * up(p_down2) + (1 - alpha) * up(p_down3) (bilinear, align_corners=True) -> [N, 1, H, W]."""
        up = {n: resize_to(probabilities[n], size, align_corners=True) for n in PATHS}
        return fuse_paths(up, {"down2": self.alpha, "down3": 1.0 - self.alpha})

    def _probability(self, features: torch.Tensor, prototype: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return threshold_probability(features, prototype, tau, self.scale).unsqueeze(1)

    def refine_prototype(self, features: torch.Tensor, prototype: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Test-time refinement of one path's prototype for each query: features [N, C, h, w] -> [N, C].

        Each Adam step: the predicted foreground (p > 1 - p) of the features is replaced by the prototype, and
        the BCE between the min-max-normalised, sigmoid-squashed original and new features is minimised with
        respect to the prototype (argument order: see ``faithful``).
        """
        # clones made outside inference mode are ordinary tensors autograd accepts, whatever the caller's context
        with torch.inference_mode(False), torch.enable_grad():
            features, tau = features.detach().clone(), tau.detach().clone()
            proto = prototype.detach().expand(features.shape[0], -1).clone().requires_grad_(True)
            optimiser = torch.optim.Adam([proto], lr=self.refine_lr)
            original = _minmax_sigmoid(features)
            for _ in range(self.refine_steps):
                p = self._probability(features, proto.detach(), tau)
                fg = (torch.cat([1.0 - p, p], dim=1).argmax(dim=1, keepdim=True) == 1).to(features.dtype)
                filled = _minmax_sigmoid(features * (1.0 - fg) + proto[:, :, None, None] * fg)
                pair = (original, filled) if self.faithful else (filled, original)
                loss = F.binary_cross_entropy(*pair, reduction="none").mean(dim=(1, 2, 3)).sum()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        return proto.detach()

    def _segment_features(self, query: Dict[str, torch.Tensor], state: SupportState, size) -> torch.Tensor:
        """Fused foreground probability [N, 1, H, W]; refines the prototypes first when not training."""
        tau = query["tau"]
        protos = dict(state)
        if not self.training and self.refine_steps > 0:
            protos = {n: self.refine_prototype(query[n], state[n], tau) for n in PATHS}
        return self.fuse({n: self._probability(query[n], protos[n], tau) for n in PATHS}, size)

    # ---------------------------------------------------------------------------------- contract

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
        check_support(support_images, support_masks)
        out = self.encoder(support_images)
        self._check_outputs(out)
        return self._prototypes(out, support_masks)

    def encode_query(self, query_images: torch.Tensor) -> QueryFeatures:
        out = self.encoder(query_images)
        self._check_outputs(out)
        return QueryFeatures({k: out[k] for k in (*PATHS, "tau")}, (int(query_images.shape[-2]), int(query_images.shape[-1])))

    def segment_encoded(self, features: QueryFeatures, state: SupportState) -> torch.Tensor:
        """Logits [N, 2, H, W] of encoded queries; the test-time refinement starts from the encoded features, per query."""
        return foreground_probability_to_logits(self._segment_features(features.maps, state, features.image_size)[:, 0])

    def forward_episode(self, support, support_masks, query, query_labels):
        self._check_outputs(query.maps)
        prob = self._segment_features(query.maps, self._prototypes(support, support_masks), query.image_size)
        logits = foreground_probability_to_logits(prob[:, 0])
        if query_labels is None:
            return logits, {}
        return logits, {"align": self._alignment_loss(query.maps, prob, support, support_masks)}

    def training_losses(self, logits, query_labels, episode_means):
        """Weighted NLL (0.1, 1) of the logits [B, 2, H, W] against labels [B, H, W] plus the weighted
        alignment mean (docs/reference.md#shared-losses)."""
        return {
            "query_nll": weighted_nll(logits, query_labels, self.class_weights),
            "align": self.align_weight * episode_means["align"],
        }

    def _alignment_loss(self, q_feats, q_prob, s_feats, s_masks) -> torch.Tensor:
        """Query argmax at image size -> query prototypes per path -> fused support prediction, thresholded
        with the *query's* tau (as released), unweighted NLL."""
        query_fg = (torch.cat([1.0 - q_prob, q_prob], dim=1).argmax(dim=1) == 1).to(q_prob.dtype)  # [1, H, W]

        def segment_support(fg: torch.Tensor, shot: int) -> torch.Tensor:
            probs = {
                n: self._probability(s_feats[n][shot : shot + 1], masked_average_pooling(q_feats[n], fg)[0], q_feats["tau"])
                for n in PATHS
            }
            return foreground_probability_to_logits(self.fuse(probs, tuple(s_masks.shape[-2:]))[:, 0])

        return prototype_alignment_loss(query_fg, s_masks, segment_support, weighted_nll)

"""The one contract every few-shot method implements.

    state  = method.encode_support(support_images, support_masks)   # once per support set (k shots)
    logits = method.segment(query_images, state)                      # any batch of query slices
    out    = method(support_images, support_masks, query_images, query_labels)   # training episode

Shapes (C = image channels, 3 for the ImageNet-style encoders):
- ``encode_support``: ``support_images`` [K, C, H, W], ``support_masks`` [K, H, W] (float, 1 = foreground).
- ``segment``: ``query_images`` [N, C, H, W] -> logits [N, 2, H, W] (channel 0 background, 1 foreground);
  ``softmax`` of the logits is the method's probability and ``argmax`` its prediction.
- ``forward`` (training): ``support_images`` [B, K, C, H, W], ``support_masks`` [B, K, H, W],
  ``query_images`` [B, C, H, W], ``query_labels`` [B, H, W] (long, optional; 255 = ignore) ->
  :class:`FewShotOutput` with ``logits`` [B, 2, H, W] and, when labels are given, ``losses``: named scalar
  terms already weighted as the method's paper does. The training loss is their sum.

Evaluation, inference, freezing and export all go through ``encode_support``/``segment``, so a new
method is one module implementing this class plus one bundle.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, TypedDict

import torch
from torch import nn

SupportState = Dict[str, Any]


class FewShotOutput(TypedDict, total=False):
    logits: torch.Tensor
    losses: Dict[str, torch.Tensor]


class FewShotSegmenter(nn.Module):
    """Base class: subclasses implement :meth:`encode_support`, :meth:`segment` and :meth:`forward`."""

    #: Registry name used in bundle configs (``method: "qnet"``).
    name: str = "base"

    def __init__(self) -> None:
        super().__init__()
        from fsmis_monai.networks.layout import record_and_check_layout

        record_and_check_layout(self)  # every state dict records the layout, every load checks it

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
        raise NotImplementedError

    def segment(self, query_images: torch.Tensor, state: SupportState) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        support_images: torch.Tensor,
        support_masks: torch.Tensor,
        query_images: torch.Tensor,
        query_labels: Optional[torch.Tensor] = None,
    ) -> FewShotOutput:
        raise NotImplementedError

    @staticmethod
    def total_loss(output: FewShotOutput) -> torch.Tensor:
        """Sum of the method's loss terms (what the trainer back-propagates)."""
        losses = output.get("losses") or {}
        if not losses:
            raise ValueError("the method returned no loss terms: pass query_labels to forward() when training")
        return torch.stack([v.reshape(()) for v in losses.values()]).sum()


def resolve_encoder(
    encoder: "str | nn.Module", pretrained_weights: Optional[str] = None, faithful: bool = False
) -> nn.Module:
    """An encoder module as given, or the registered encoder of that name (imported only when needed), in the
    reference repository's layout when ``faithful`` (the method's own switch, so a bundle's ``faithful``
    reaches its encoder; see :func:`~fsmis_monai.networks.encoders.build_encoder`)."""
    if isinstance(encoder, nn.Module):
        if getattr(encoder, "faithful", faithful) != faithful:
            import warnings

            warnings.warn(
                f"faithful={faithful} but the given {type(encoder).__name__} was built with faithful="
                f"{encoder.faithful} (layout {getattr(encoder, 'layout', '?')!r}); it is used as given",
                UserWarning,
                stacklevel=3,
            )
        if pretrained_weights is not None:
            from fsmis_monai.networks.encoders import load_pretrained_weights

            encoder.weight_report = load_pretrained_weights(encoder, pretrained_weights)
        return encoder
    from fsmis_monai.networks.encoders import build_encoder

    return build_encoder(encoder, pretrained_weights=pretrained_weights, faithful=faithful)


def check_support(support_images: torch.Tensor, support_masks: torch.Tensor) -> None:
    """Validate support shapes with a message a user can act on."""
    if support_images.dim() != 4:
        raise ValueError(f"support_images must be [K, C, H, W], got shape {tuple(support_images.shape)}")
    if support_masks.dim() != 3:
        raise ValueError(f"support_masks must be [K, H, W], got shape {tuple(support_masks.shape)}")
    if support_images.shape[0] != support_masks.shape[0] or support_images.shape[-2:] != support_masks.shape[-2:]:
        raise ValueError(
            f"support images {tuple(support_images.shape)} and masks {tuple(support_masks.shape)} disagree in "
            "number of shots or in-plane size"
        )


def encode_episodes(
    encoder: nn.Module, support_images: torch.Tensor, query_images: torch.Tensor
) -> "tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]":
    """One encoder pass over a training batch (support [B, K, C, H, W] and query [B, C, H, W] images together,
    as the references concatenate them, so BatchNorm sees both). Returns (support outputs with leading
    [B, K], query outputs with leading [B]) for every output key of the encoder."""
    if support_images.dim() != 5 or query_images.dim() != 4 or support_images.shape[0] != query_images.shape[0]:
        raise ValueError(
            f"forward() expects support_images [B, K, C, H, W] and query_images [B, C, H, W], got "
            f"{tuple(support_images.shape)} and {tuple(query_images.shape)}"
        )
    b, k = support_images.shape[:2]
    out = encoder(torch.cat([support_images.flatten(0, 1), query_images]))
    support = {key: v[: b * k].reshape(b, k, *v.shape[1:]) for key, v in out.items()}
    query = {key: v[b * k :] for key, v in out.items()}
    return support, query

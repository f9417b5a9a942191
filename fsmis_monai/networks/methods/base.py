"""The one contract every few-shot method implements.

    state    = method.encode_support(support_images, support_masks)   # once per support set (k shots)
    logits   = method.segment(query_images, state)                      # any batch of query slices
    features = method.encode_query(query_images)                        # once per query slice ...
    logits   = method.segment_encoded(features, state)                  # ... for any number of supports
    out      = method(support_images, support_masks, query_images, query_labels)   # training episode

Shapes (C = image channels, 3 for the ImageNet-style encoders):
- ``encode_support``: ``support_images`` [K, C, H, W], ``support_masks`` [K, H, W] (float, 1 = foreground).
- ``segment``: ``query_images`` [N, C, H, W] -> logits [N, 2, H, W] (channel 0 background, 1 foreground);
  ``softmax`` of the logits is the method's probability and ``argmax`` its prediction.
- ``forward`` (training): ``support_images`` [B, K, C, H, W], ``support_masks`` [B, K, H, W],
  ``query_images`` [B, C, H, W], ``query_labels`` [B, H, W] (long, optional; 255 = ignore) ->
  :class:`FewShotOutput` with ``logits`` [B, 2, H, W] and, when labels are given, ``losses``: named scalar
  terms already weighted as the method's paper does. The training loss is their sum.

- ``encode_query``: ``query_images`` [N, C, H, W] -> :class:`QueryFeatures` (the encoder outputs the method
  reads, batch-first, and the image size); ``segment_encoded``: those features and a support state -> logits
  [N, 2, H, W]. ``segment`` is their composition.

A query slice's encoder features depend neither on the class nor on the support, so the evaluator encodes
each query slice once and segments it against every (class, support set) that asks for it. The split is
optional: a method that implements only ``segment`` gets the base fallback (``encode_query`` keeps the
images, ``segment_encoded`` calls ``segment``), which is correct but re-encodes per support state.

Evaluation, inference, freezing and export all go through ``encode_support`` and ``segment`` (or its two
halves), so a new method is one module implementing this class plus one bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, TypedDict

import torch
from torch import nn

SupportState = Dict[str, Any]


class FewShotOutput(TypedDict, total=False):
    logits: torch.Tensor
    losses: Dict[str, torch.Tensor]


#: key of the fallback :class:`QueryFeatures`: the query images themselves (the method does not split)
QUERY_IMAGES = "query_images"


@dataclass(frozen=True)
class QueryFeatures:
    """Encoded query slices: ``maps`` {encoder output name: tensor [N, ...]} (every value batch-first, one row
    per query slice) and the query ``image_size`` (H, W) the logits are resized to."""

    maps: Dict[str, torch.Tensor]
    image_size: Tuple[int, int]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.maps[key]

    def __len__(self) -> int:
        return int(next(iter(self.maps.values())).shape[0])

    def rows(self, index: Sequence[int]) -> "QueryFeatures":
        """The features of the query slices ``index`` (positions in this batch, in that order)."""
        index = list(index)
        if index == list(range(len(self))):
            return self
        idx = torch.as_tensor(index, dtype=torch.long, device=next(iter(self.maps.values())).device)
        return QueryFeatures({k: v.index_select(0, idx) for k, v in self.maps.items()}, self.image_size)


def encoder_features(encoder: nn.Module, query_images: torch.Tensor, keys: Sequence[str]) -> QueryFeatures:
    """One encoder pass over ``query_images`` [N, C, H, W], keeping only the outputs ``keys`` (what the method
    reads afterwards, so a batch of encoded slices holds no unused map). Raises ``ValueError`` naming the
    missing outputs when the encoder lacks one."""
    out = encoder(query_images)
    missing = [k for k in keys if k not in out]
    if missing:
        raise ValueError(f"the method needs encoder outputs {list(keys)}; {type(encoder).__name__} lacks {missing}")
    return QueryFeatures({k: out[k] for k in keys}, (int(query_images.shape[-2]), int(query_images.shape[-1])))


class FewShotSegmenter(nn.Module):
    """Base class: subclasses implement :meth:`encode_support`, :meth:`forward` and either the pair
    :meth:`encode_query` / :meth:`segment_encoded` (``segment`` is then their composition) or :meth:`segment`."""

    #: Registry name used in bundle configs (``method: "qnet"``).
    name: str = "base"

    def __init__(self) -> None:
        super().__init__()
        from fsmis_monai.networks.layout import record_and_check_layout

        record_and_check_layout(self)  # every state dict records the layout, every load checks it

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
        raise NotImplementedError

    @classmethod
    def splits_query(cls) -> bool:
        """Whether the method encodes query slices on their own (overrides :meth:`encode_query`)."""
        return cls.encode_query is not FewShotSegmenter.encode_query

    def encode_query(self, query_images: torch.Tensor) -> QueryFeatures:
        """Encode query slices [N, C, H, W] once, for any number of support states.

        The base version is the fallback of a method that cannot split: the "features" are the images, and
        :meth:`segment_encoded` runs :meth:`segment` on them (the encoder then runs per support state).
        """
        return QueryFeatures({QUERY_IMAGES: query_images}, (int(query_images.shape[-2]), int(query_images.shape[-1])))

    def segment_encoded(self, features: QueryFeatures, state: SupportState) -> torch.Tensor:
        """Logits [N, 2, H, W] of already encoded query slices (:meth:`encode_query`) against ``state``."""
        if self.splits_query():
            raise NotImplementedError(f"{type(self).__name__} overrides encode_query but not segment_encoded")
        return self.segment(features[QUERY_IMAGES], state)

    def segment(self, query_images: torch.Tensor, state: SupportState) -> torch.Tensor:
        """Logits [N, 2, H, W] of query slices [N, C, H, W]: ``segment_encoded(encode_query(images), state)``."""
        if not self.splits_query():
            raise NotImplementedError(f"{type(self).__name__} implements neither segment nor encode_query")
        return self.segment_encoded(self.encode_query(query_images), state)

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

"""Plugging few-shot episodes into MONAI's :class:`~monai.engines.SupervisedTrainer`.

The trainer's iteration is ``inputs, targets, args, kwargs = prepare_batch(batch)``, then
``pred = inferer(inputs, network, *args, **kwargs)`` and ``loss = loss_function(pred, targets)``.
A few-shot episode fills it as follows:

- :class:`FewShotPrepareBatch`: ``inputs`` = query images, ``targets`` = query labels, and the support
  tensors (plus the query labels the method's own losses need) as keyword arguments;
- :class:`FewShotInferer`: calls the method with keywords, ``network(query_images=inputs, support_images=...,
  ...)``, so the query is the engine's ``image`` and overlays/metrics read the usual output keys;
- :class:`FewShotLoss`: the method already returns its weighted loss terms (``{"logits", "losses"}``,
  see :mod:`fsmis_monai.networks.methods.base`); the training loss is their sum.

No custom ``iteration_update`` is needed, so AMP, gradient accumulation, DDP and every MONAI/ignite handler
keep working unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from monai.engines.utils import PrepareBatch
from monai.inferers import Inferer
from monai.utils import CommonKeys
from torch import nn

from fsmis_monai.networks.methods.base import FewShotSegmenter

#: Keys of an episode batch (see :mod:`fsmis_monai.data.episodes`).
SUPPORT_IMAGES, SUPPORT_MASKS, QUERY_IMAGES, QUERY_LABELS = "support_images", "support_masks", "query_images", "query_labels"


class FewShotPrepareBatch(PrepareBatch):
    """Episode batch -> ``(query_images, query_labels, (), {support_images, support_masks, query_labels})``.

    Batch shapes: support_images [B, K, C, H, W], support_masks [B, K, H, W], query_images [B, C, H, W],
    query_labels [B, H, W].

    Tensors are copied to ``device`` in their stored dtype, then converted there: from a DataLoader with
    ``pin_memory=True`` and a trainer with ``non_blocking=True`` the host-to-device copies are asynchronous
    (a conversion on the host would make a new, unpinned tensor first). ``channels_last``: query images in
    NHWC memory order, for a network converted with ``memory_format=torch.channels_last``.
    """

    def __init__(self, channels_last: bool = False) -> None:
        self.channels_last = bool(channels_last)

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        missing = [k for k in (SUPPORT_IMAGES, SUPPORT_MASKS, QUERY_IMAGES, QUERY_LABELS) if k not in batchdata]
        if missing:
            raise KeyError(f"episode batch lacks {missing}; it has {sorted(batchdata)}")

        def move(key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
            t = torch.as_tensor(batchdata[key]).to(device=device, non_blocking=non_blocking, **kwargs)
            return t if dtype is None else t.to(dtype)

        query_labels = move(QUERY_LABELS, torch.long)
        network_kwargs = {
            SUPPORT_IMAGES: move(SUPPORT_IMAGES, torch.float32),
            SUPPORT_MASKS: move(SUPPORT_MASKS, torch.float32),
            QUERY_LABELS: query_labels,
        }
        query_images = move(QUERY_IMAGES, torch.float32)
        if self.channels_last:
            query_images = query_images.contiguous(memory_format=torch.channels_last)
        return query_images, query_labels, (), network_kwargs


class FewShotInferer(Inferer):
    """Training-time inferer: run one episode through the method, all arguments by keyword."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError("FewShotInferer passes episodes by keyword; got positional extras")
        return network(query_images=inputs, **kwargs)


class FewShotLoss(nn.Module):
    """The method's loss terms summed (the targets were already given to the method's forward).

    A non-finite loss stops training with an error naming the terms: a diverged run (typically a learning
    rate too high for the method) would otherwise go on writing NaN weights for the rest of its budget.
    """

    def forward(self, output: Mapping[str, Any], target: torch.Tensor | None = None) -> torch.Tensor:
        loss = FewShotSegmenter.total_loss(output)  # type: ignore[arg-type]
        if not bool(torch.isfinite(loss.detach())):
            terms = {k: float(v.detach()) for k, v in output["losses"].items()}
            raise FloatingPointError(
                f"training loss is not finite, terms {terms}: the run diverged. Lower `learning_rate` (the "
                "paper schedules use 1e-3) or check the training data; resume from the last checkpoint after "
                "changing the config."
            )
        return loss


def _undecollate(output: Any) -> Mapping[str, Any]:
    """Trainers built with ``decollate=True`` hold a list of per-item dicts sharing the loss: take the first."""
    return output[0] if isinstance(output, (list, tuple)) else output


def loss_terms(output: Any) -> dict[str, float]:
    """Trainer output -> ``{"loss": total, <term>: value...}`` for Stats/TensorBoard handlers.

    Bundle trainers use ``decollate=False`` so the output keeps the method's ``{"logits", "losses"}`` dict.
    """
    output = _undecollate(output)
    terms = {"loss": float(torch.as_tensor(output[CommonKeys.LOSS]).detach())}
    pred = output.get(CommonKeys.PRED) or {}
    for name, value in (pred.get("losses") or {}).items():
        terms[name] = float(value.detach())
    return terms


def total_loss(output: Any) -> float:
    """Trainer output -> the scalar training loss (for the progress bar and the console log)."""
    return float(torch.as_tensor(_undecollate(output)[CommonKeys.LOSS]).detach())

"""Slice-by-slice few-shot inference over a 3D query volume with MONAI's :class:`~monai.inferers.SliceInferer`.

The support set is encoded once (``method.encode_support``) and bound to the network the inferer calls
(:class:`SupportBoundSegmenter`): MONAI 1.5-1.6's ``SliceInferer`` forwards no keyword argument to the
network except ``condition``, so the support state cannot travel as an argument. Query slices go through
``method.segment`` ``sw_batch_size`` at a time (1 when the method sets ``requires_single_query = True``).

:meth:`FewShotSliceInferer.segment_shared` serves many support states on one query stack: each query slice
is encoded once (``method.encode_query``) and its features segmented against every state that asks for it
(``method.segment_encoded``), chunk by chunk.

Everything runs under :func:`torch.inference_mode`, except for methods that set
``test_time_grad = True`` (test-time optimisation such as Q-Net's prototype refinement), which run under
:func:`torch.no_grad` so that they may re-enable gradients inside ``segment``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Hashable, Mapping, Optional, Sequence

import torch
from monai.inferers import SliceInferer
from torch import nn

from fsmis_monai.networks.methods.base import FewShotSegmenter, SupportState


def inference_context(method: nn.Module) -> contextlib.AbstractContextManager:
    """``inference_mode`` unless the method optimises at test time (then ``no_grad``)."""
    return torch.no_grad() if getattr(method, "test_time_grad", False) else torch.inference_mode()


def effective_batch_size(method: nn.Module, sw_batch_size: int) -> int:
    return 1 if getattr(method, "requires_single_query", False) else max(1, int(sw_batch_size))


class SupportBoundSegmenter(nn.Module):
    """``x -> method.segment(x, state)``: a one-argument network for MONAI inferers.

    ``on_batch`` (optional) is called with the batch size after every call (progress bars).
    """

    def __init__(self, method: FewShotSegmenter, state: SupportState,
                 on_batch: Optional[Callable[[int], None]] = None) -> None:
        super().__init__()
        self.method = method
        self.state = state
        self.on_batch = on_batch

    def forward(self, query_images: torch.Tensor) -> torch.Tensor:
        logits = self.method.segment(query_images, self.state)
        if self.on_batch is not None:
            self.on_batch(int(query_images.shape[0]))
        return logits


class FewShotSliceInferer:
    """Segment the slices of a query stack against one support set.

    Args:
        sw_batch_size: query slices per ``segment`` call.
        device: where the method runs (``None``: the device of its first parameter, else CPU).
        spatial_dim: the slice axis of the [C, H, W, D] inputs (2: last axis, NIfTI's z).
    """

    def __init__(self, sw_batch_size: int = 8, device: Optional[torch.device | str] = None, spatial_dim: int = 2) -> None:
        self.sw_batch_size = sw_batch_size
        self.device = None if device is None else torch.device(device)
        self.spatial_dim = spatial_dim

    def _device(self, method: nn.Module) -> torch.device:
        if self.device is not None:
            return self.device
        p = next(method.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @staticmethod
    def _dtype(method: nn.Module) -> torch.dtype:
        """Inputs follow the method's floating-point precision (float32 unless it was converted)."""
        p = next((p for p in method.parameters() if p.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

    def encode(self, method: FewShotSegmenter, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
        """Encode a k-shot support set ([K, C, H, W] images, [K, H, W] masks) once."""
        dev = self._device(method)
        with inference_context(method):
            dtype = self._dtype(method)
            return method.encode_support(support_images.to(dev, dtype), support_masks.to(dev, dtype))

    def __call__(
        self,
        method: FewShotSegmenter,
        queries: torch.Tensor,
        state: SupportState,
        on_batch: Optional[Callable[[int], None]] = None,
    ) -> torch.Tensor:
        """Logits [2, H, W, D] of the query stack ``queries`` [C, H, W, D] (D slices) against ``state``."""
        if queries.dim() != 4:
            raise ValueError(f"queries must be [C, H, W, D], got shape {tuple(queries.shape)}")
        dev = self._device(method)
        roi = [s for i, s in enumerate(queries.shape[1:]) if i != self.spatial_dim]
        inferer = SliceInferer(
            spatial_dim=self.spatial_dim,
            roi_size=roi,
            sw_batch_size=effective_batch_size(method, self.sw_batch_size),
            overlap=0.0,
            mode="constant",
            sw_device=dev,
            device=torch.device("cpu"),
            progress=False,
        )
        network = SupportBoundSegmenter(method, state, on_batch)
        with inference_context(method):
            out = inferer(queries[None].to(self._dtype(method)), network)
        return out[0]

    def segment_shared(
        self,
        method: FewShotSegmenter,
        queries: torch.Tensor,
        requests: Mapping[Hashable, Sequence[int]],
        state_of: Callable[[Hashable], SupportState],
        postprocess: Callable[[torch.Tensor], torch.Tensor] = lambda logits: logits,
        on_batch: Optional[Callable[[int], None]] = None,
    ) -> Dict[Hashable, torch.Tensor]:
        """Segment many (support state, query slices) requests on one query stack, encoding each slice once.

        ``queries`` [C, H, W, D]; ``requests`` {key: slice indices z}; ``state_of(key)`` gives the support state
        of a key (called when a chunk first needs it; the caller caches). The union of the requested slices is
        encoded ``sw_batch_size`` at a time (``method.encode_query``) and each chunk's features are segmented
        (``method.segment_encoded``) against every key that asks for slices of the chunk, so only one chunk
        of features is alive at a time. Returns {key: ``postprocess(logits)`` stacked along dim 0, in the
        order of ``requests[key]``, on the CPU}; ``postprocess`` maps logits [n, 2, H, W] to [n, ...] (e.g.
        the argmax), so the full logits of the whole stack are never held.

        Hand-written rather than through MONAI's ``SliceInferer``: that runs one network per call, and here
        one encoded chunk serves several support states.
        """
        if queries.dim() != 4:
            raise ValueError(f"queries must be [C, H, W, D], got shape {tuple(queries.shape)}")
        dev, dtype = self._device(method), self._dtype(method)
        stack = queries.movedim(self.spatial_dim + 1, 0)  # [D, C, H, W] view
        wanted = sorted({int(z) for zs in requests.values() for z in zs})
        position = {key: {int(z): i for i, z in enumerate(zs)} for key, zs in requests.items()}
        pieces: Dict[Hashable, list] = {key: [None] * len(zs) for key, zs in requests.items()}
        step = effective_batch_size(method, self.sw_batch_size)
        with inference_context(method):
            for start in range(0, len(wanted), step):
                chunk = wanted[start : start + step]
                at = {z: i for i, z in enumerate(chunk)}
                features = method.encode_query(stack[chunk].to(dev, dtype))
                for key, zs in requests.items():
                    mine = [z for z in position[key] if z in at]
                    if not mine:
                        continue
                    out = postprocess(method.segment_encoded(features.rows([at[z] for z in mine]), state_of(key))).cpu()
                    for z, piece in zip(mine, out):
                        pieces[key][position[key][z]] = piece
                    if on_batch is not None:
                        on_batch(len(mine))
                del features
        return {key: torch.stack(p) if p else torch.zeros(0) for key, p in pieces.items()}

    def segment_stack(self, method: FewShotSegmenter, queries: torch.Tensor, support_images: torch.Tensor,
                      support_masks: torch.Tensor, on_batch: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """Encode the support once, then segment every slice of ``queries``; logits [2, H, W, D]."""
        return self(method, queries, self.encode(method, support_images, support_masks), on_batch)

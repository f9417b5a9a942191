"""Few-shot inference on a user's own volumes with MONAI's ``SupervisedEvaluator`` (a bundle's inference.json).

The support set comes from an annotated NIfTI (image + label + class): its labelled slices are picked
as the evaluation protocols pick them (the centres of ``n_support_slices`` equal parts of the organ,
:func:`fsmis_monai.evaluation.protocols.fraction_picks`) and used together as a k-shot support.
:class:`FewShotVolumeInferer` is a MONAI ``Inferer``: for every query volume it encodes the support with the
network's current weights (so a ``CheckpointLoader`` that runs at ``STARTED`` is honoured) and segments
each axial slice through the evaluation's slice inferer. The query keeps its MetaTensor geometry, so
``SaveImaged`` writes the prediction on the query's grid.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from monai.data import MetaTensor, NibabelWriter
from monai.inferers import Inferer
from monai.transforms import NormalizeIntensity
from torch import nn

from fsmis_monai.data.registry import get_dataset
from fsmis_monai.io import FsmisInputError, atomic_path, load_nifti


def load_support(
    image: str | Path,
    label: str | Path,
    support_class: int | str,
    n_support_slices: int = 1,
    dataset: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Support images ``[K, 3, H, W]`` (volume z-score, channel repeated) and masks ``[K, H, W]`` picked from
    an annotated scan. ``support_class`` is a label value, or a class name when ``dataset`` is given."""
    from fsmis_monai.evaluation.protocols import class_slices, fraction_picks

    img, _ = load_nifti(image, dtype=np.float32)
    lab, _ = load_nifti(label)
    if img.ndim != 3 or lab.shape != img.shape:
        raise FsmisInputError(f"{label}: label shape {lab.shape} does not match image {image} shape {img.shape} (3D)")
    if not np.all(np.isfinite(img)):
        raise FsmisInputError(f"{image}: image contains NaN or infinite values")
    c = get_dataset(dataset).class_id(support_class) if dataset is not None else int(support_class)
    mask = lab == c
    zs = class_slices(mask)
    if zs.size == 0:
        raise FsmisInputError(f"{label}: no voxel has label {c}; pick a class present in the support label "
                              f"(values found: {np.unique(lab).tolist()})")
    if int(n_support_slices) > len(zs):
        warnings.warn(f"{label}: {n_support_slices} support slices asked, class {c} is on {len(zs)} slices; using "
                      f"those {len(zs)}")
    picks = sorted({int(zs[i]) for i in fraction_picks(len(zs), min(int(n_support_slices), len(zs)))})
    volume = NormalizeIntensity()(torch.as_tensor(img)[None])[0]
    images = torch.stack([volume[..., z] for z in picks])[:, None].repeat(1, 3, 1, 1)
    masks = torch.stack([torch.as_tensor(mask[..., z], dtype=torch.float32) for z in picks])
    return images.float(), masks


def _source(tensor: torch.Tensor) -> str:
    """The file a (batched) MetaTensor was read from, for error messages."""
    name = getattr(tensor, "meta", {}).get("filename_or_obj", "query volume")
    return str(name[0] if isinstance(name, (list, tuple)) and name else name)


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing through :func:`fsmis_monai.io.atomic_path` (``SaveImaged(writer=...)``):
    an interrupted inference leaves the previous prediction or none, never a truncated NIfTI."""

    def write(self, filename: Any, verbose: bool = False, **obj_kwargs: Any) -> None:
        with atomic_path(filename) as tmp:
            super().write(tmp, verbose=verbose, **obj_kwargs)


class FewShotVolumeInferer(Inferer):
    """``inferer(volume [B, 1, H, W, D], network) -> logits [B, 2, H, W, D]`` against a fixed support set.

    Args:
        support_images: ``[K, 3, H, W]`` (e.g. from :func:`load_support`).
        support_masks: ``[K, H, W]``.
        sw_batch_size: query slices per ``segment`` call.
    """

    def __init__(self, support_images: torch.Tensor, support_masks: torch.Tensor, sw_batch_size: int = 8) -> None:
        from fsmis_monai.evaluation.inferer import FewShotSliceInferer

        super().__init__()
        self.support_images = support_images
        self.support_masks = support_masks
        self.slices = FewShotSliceInferer(sw_batch_size=sw_batch_size)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        from fsmis_monai.engines.checkpoints import unwrap

        if inputs.dim() != 5 or inputs.shape[1] not in (1, 3):
            raise FsmisInputError(f"{_source(inputs)}: expected query volumes [B, 1, H, W, D] (3D scans), got shape "
                                  f"{tuple(inputs.shape)}")
        method = unwrap(network)
        was_training = method.training
        method.eval()
        try:
            state = self.slices.encode(method, self.support_images, self.support_masks)
            outs = []
            for volume in inputs:
                queries = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
                if not torch.isfinite(queries).all():  # NaN would silently become background after argmax
                    raise FsmisInputError(f"{_source(volume)}: query volume contains NaN or infinite values")
                queries = queries.expand(3, *queries.shape[1:]) if queries.shape[0] == 1 else queries
                outs.append(self.slices(method, queries, state).to(inputs.device))
        finally:
            method.train(was_training)
        logits = torch.stack(outs)
        if isinstance(inputs, MetaTensor):  # keep the query's geometry and file name for SaveImaged
            logits = MetaTensor(logits)
            logits.copy_meta_from(inputs, copy_attr=True)
        return logits

"""Resampling and in-plane cropping as the FSMIS preprocessing needs them.

MONAI's ``SpatialResample`` does the interpolation; what ``Spacing`` lacks and is added here:

- a grid anchored on the first voxel for every affine. ``Spacing`` anchors on a corner only when it
  finds one within 1e-8; with the float noise of oblique affines (MS-CMRSeg) it falls back to
  centring, shifting the grid by half an output voxel;
- the output size rule. ``"extent"`` (default) keeps every output voxel centre inside the input's:
  ``floor((n - 1) * s / t) + 1`` (``Spacing`` rounds, which may add a voxel outside). The reference
  notebooks (SimpleITK) use ``int(n * s / t + 1)``, which usually adds one voxel past the end of the
  data (filled with 0): ``size_rule="reference"`` reproduces it. Both tolerate 1e-6 of header noise;
- an exact in-plane size (Synapse: exactly 256 x 256, where the reference rule gives 257);
- the reference's label resampling: each class linearly interpolated as a binary map, rounded, merged
  (``label_mode="per_class_linear"``, faithful); the default is nearest neighbour;
- cropping a fixed border and centre crop/pad in plane with the image padded by its own minimum
  (``ResizeWithPadOrCrop`` pads with one constant fixed at construction).
"""

from __future__ import annotations

from typing import Any, Hashable, Literal, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import MapTransform, ResizeWithPadOrCrop, SpatialCrop, SpatialResample, Transform

from fsmis_monai.io import FsmisInputError
from fsmis_monai.transforms.checks import label_values, source_of

_EPS = 1e-6  # header float noise (0.62500003 mm) must not change a voxel count
SizeRule = Literal["extent", "reference"]
ResampleMode = Literal["bilinear", "nearest", "per_class_linear"]


def output_size(n: int, spacing: float, target: float, rule: SizeRule = "extent") -> int:
    """Voxels along one axis after resampling ``n`` voxels of ``spacing`` to ``target`` (see module doc)."""
    if rule == "reference":
        return int(n * spacing / target + 1 + _EPS)
    if rule == "extent":
        return int(np.floor((n - 1) * spacing / target + _EPS)) + 1
    raise ValueError(f"unknown size rule {rule!r}; use 'extent' or 'reference'")


class ResampleToSpacing(Transform):
    """Resample a channel-first MetaTensor to ``spacing`` (or to ``size`` voxels) keeping the first voxel fixed.

    Args:
        spacing: target spacing per axis; ``None`` or ``0`` keeps the input spacing of that axis.
        size: optional exact number of voxels per axis (``None`` entries fall back to ``spacing``); the
            spacing of such an axis becomes ``n * s / size`` so the output covers the input extent.
        size_rule: ``"extent"`` (default: every output voxel centre inside the input) or ``"reference"``
            (faithful: the SimpleITK notebooks' ``int(n * s / t + 1)``).
        mode: ``"bilinear"`` (images), ``"nearest"`` (labels, default) or ``"per_class_linear"`` (labels,
            faithful: every class resampled linearly as a 0/1 map, rounded, merged in ascending class order).
    """

    def __init__(self, spacing: Sequence[float | None] | None = None, size: Sequence[int | None] | None = None,
                 size_rule: SizeRule = "extent", mode: ResampleMode = "bilinear") -> None:
        if mode not in ("bilinear", "nearest", "per_class_linear"):
            raise ValueError(f"unknown resampling mode {mode!r}")
        output_size(2, 1.0, 1.0, size_rule)  # validates the rule
        self.spacing = None if spacing is None else [0.0 if s is None else float(s) for s in spacing]
        self.size = None if size is None else [None if s is None or int(s) <= 0 else int(s) for s in size]
        self.size_rule = size_rule
        self.mode = mode

    def target_grid(self, img: MetaTensor) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Input spacing, output spacing and output shape for ``img``."""
        shape = list(img.shape[1:])
        in_sp = affine_to_spacing(img.affine, r=len(shape)).cpu().numpy().astype(float)
        out_sp, out_shape = in_sp.copy(), list(shape)
        for ax, n in enumerate(shape):
            exact = self.size[ax] if self.size is not None and ax < len(self.size) else None
            target = self.spacing[ax] if self.spacing is not None and ax < len(self.spacing) else 0.0
            if exact:
                out_sp[ax], out_shape[ax] = in_sp[ax] * n / exact, exact
            elif target > 0:
                out_sp[ax], out_shape[ax] = target, output_size(n, in_sp[ax], target, self.size_rule)
        return in_sp, out_sp, out_shape

    def __call__(self, img: MetaTensor) -> MetaTensor:
        if not isinstance(img, MetaTensor):
            raise TypeError("ResampleToSpacing needs a MetaTensor (it reads the spacing from the affine)")
        in_sp, out_sp, out_shape = self.target_grid(img)
        # Outside the input extent (the reference rule's extra voxel) the reference fills 0, like "zeros".
        padding = "zeros" if self.size_rule == "reference" else "border"

        # same directions and first voxel, columns scaled to the new spacing
        dst_aff = img.affine.to(torch.float64).clone()
        dst_aff[:-1, :-1] *= torch.as_tensor(out_sp / in_sp, dtype=torch.float64)

        def resample(x: torch.Tensor, mode: str) -> MetaTensor:
            sp = SpatialResample(mode=mode, padding_mode=padding, align_corners=False, dtype=torch.float32)
            return sp(x, dst_affine=dst_aff, spatial_size=out_shape)

        if self.mode != "per_class_linear":
            return resample(img, self.mode)
        classes = [int(c) for c in label_values(img)[0] if c != 0]
        if not classes:
            return resample(img, "nearest")
        out, merged = None, None
        for c in classes:
            binary = MetaTensor((img == c).float(), affine=img.affine, meta=img.meta)
            resampled = resample(binary, "bilinear")
            if out is None:
                out, merged = resampled, torch.zeros(resampled.shape, dtype=torch.float32)
            merged[torch.round(resampled.as_tensor()) >= 1] = float(c)
        out.set_array(merged)
        return out


class ResampleToSpacingd(MapTransform):
    """Dictionary twin of :class:`ResampleToSpacing`: images bilinear, ``label_keys`` with ``label_mode``."""

    def __init__(self, keys: KeysCollection, label_keys: KeysCollection = (), spacing: Sequence[float | None] | None = None,
                 size: Sequence[int | None] | None = None, size_rule: SizeRule = "extent",
                 label_mode: Literal["nearest", "per_class_linear"] = "nearest", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = set([label_keys] if isinstance(label_keys, str) else label_keys)
        self.image_resampler = ResampleToSpacing(spacing, size, size_rule, "bilinear")
        self.label_resampler = ResampleToSpacing(spacing, size, size_rule, label_mode)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (self.label_resampler if key in self.label_keys else self.image_resampler)(d[key])
        return d


class CropBorder(Transform):
    """Remove ``border[i]`` voxels from both ends of spatial axis ``i`` (Synapse: 32 px in plane)."""

    def __init__(self, border: Sequence[int]) -> None:
        self.border = [int(b) for b in border]

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        shape = list(img.shape[1:])
        border = (self.border + [0] * len(shape))[: len(shape)]
        if any(n <= 2 * b for n, b in zip(shape, border)):
            raise FsmisInputError(f"{source_of(img)}: shape {tuple(shape)} is too small to crop a border of {border}")
        return SpatialCrop(roi_start=border, roi_end=[n - b for n, b in zip(shape, border)])(img)


class CropBorderd(MapTransform):
    """Dictionary twin of :class:`CropBorder`."""

    def __init__(self, keys: KeysCollection, border: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.cropper = CropBorder(border)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper(d[key])
        return d


class CropOrPadInPlane(Transform):
    """Centre crop or pad the first two spatial axes to ``size``; the slice axis is untouched.

    ``pad_value="min"`` pads with the image's own minimum (the reference's choice for images), a number
    pads with that constant (0 for labels). MONAI's ``ResizeWithPadOrCrop`` does the work.
    """

    def __init__(self, size: Sequence[int], pad_value: float | Literal["min"] = 0.0) -> None:
        self.size = [int(s) for s in size]
        self.pad_value = pad_value

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        spatial = list(self.size) + [-1] * (img.ndim - 1 - len(self.size))
        value = float(img.min()) if self.pad_value == "min" else float(self.pad_value)
        return ResizeWithPadOrCrop(spatial, mode="constant", value=value)(img)


class CropOrPadInPlaned(MapTransform):
    """Dictionary twin of :class:`CropOrPadInPlane`: images pad with their minimum, ``label_keys`` with 0."""

    def __init__(self, keys: KeysCollection, size: Sequence[int], label_keys: KeysCollection = (),
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = set([label_keys] if isinstance(label_keys, str) else label_keys)
        self.image_op = CropOrPadInPlane(size, "min")
        self.label_op = CropOrPadInPlane(size, 0.0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (self.label_op if key in self.label_keys else self.image_op)(d[key])
        return d

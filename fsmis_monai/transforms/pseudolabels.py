"""MONAI transforms computing self-supervision pseudolabels on the fly inside a pipeline.

``Supervoxels`` / ``Supervoxelsd`` wrap :func:`fsmis_monai.pseudolabels.make_supervoxels` (ADNet / Q-Net
family) and ``Superpixels`` / ``Superpixelsd`` wrap :func:`fsmis_monai.pseudolabels.make_superpixels`
(SSL-ALPNet). Input is a channel-first single-channel image ``(1, x, y, z)`` as ``LoadImaged(...,
ensure_channel_first=True)`` gives it; the output has the same layout and type (a ``MetaTensor`` keeps the
image's meta data, so the pseudolabel carries its geometry). The voxel spacing comes from the
``MetaTensor`` (``pixdim``) unless given explicitly.

Import them from this module (``from fsmis_monai.transforms.pseudolabels import Supervoxelsd``).
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy

from fsmis_monai.io import FsmisInputError
from fsmis_monai.pseudolabels import SUPERVOXEL_BODY_THRESHOLD, make_superpixels, make_supervoxels

__all__ = ["Superpixels", "Superpixelsd", "Supervoxels", "Supervoxelsd"]


def _single_channel(img: NdarrayOrTensor, name: str) -> np.ndarray:
    arr = convert_to_numpy(img)
    if arr.ndim != 4 or arr.shape[0] != 1:
        raise FsmisInputError(f"{name}: expected a channel-first single-channel 3D image (1, x, y, z), got {arr.shape}")
    return arr[0]


def _spacing_of(img: NdarrayOrTensor, spacing: Sequence[float] | None, name: str) -> tuple[float, float, float]:
    if spacing is not None:
        return tuple(float(s) for s in spacing)
    pixdim = getattr(img, "pixdim", None)
    if pixdim is None:
        raise FsmisInputError(f"{name}: the image carries no spacing (not a MetaTensor); pass spacing=(sx, sy, sz)")
    return tuple(float(s) for s in convert_to_numpy(pixdim)[:3])


def _as_output(labels: np.ndarray, img: NdarrayOrTensor) -> NdarrayOrTensor:
    out, *_ = convert_to_dst_type(labels[None], dst=img, dtype=np.int32)
    return out


class Supervoxels(Transform):
    """3D supervoxels of a ``(1, x, y, z)`` image; see :func:`~fsmis_monai.pseudolabels.make_supervoxels`.

    Args:
        min_size: minimum supervoxel size in voxels (5000 CHAOS / Synapse, 1000 CMR in the references).
        spacing: ``(sx, sy, sz)`` in mm; default: read from the ``MetaTensor``.
        renumber: number supervoxels 1..K without gaps.
        faithful: tie order of the published files (NumPy 1.x argsort); slower.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, min_size: int = 5000, spacing: Sequence[float] | None = None, scale: float = 1.0,
                 sigma: float = 0.0, body_threshold: float = SUPERVOXEL_BODY_THRESHOLD, renumber: bool = False,
                 faithful: bool = False) -> None:
        self.min_size = min_size
        self.spacing = spacing
        self.scale = scale
        self.sigma = sigma
        self.body_threshold = body_threshold
        self.renumber = renumber
        self.faithful = faithful

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        labels = make_supervoxels(
            _single_channel(img, "Supervoxels"), _spacing_of(img, self.spacing, "Supervoxels"),
            min_size=self.min_size, scale=self.scale, sigma=self.sigma, body_threshold=self.body_threshold,
            renumber=self.renumber, faithful=self.faithful,
        )
        return _as_output(labels, img)


class Superpixels(Transform):
    """2D superpixels of every axial slice of a ``(1, x, y, z)`` image; see
    :func:`~fsmis_monai.pseudolabels.make_superpixels` (``faithful=True``: the reference relabelling bug)."""

    backend = [TransformBackends.NUMPY]

    def __init__(self, min_size: int = 400, sigma: float = 1.0, body_threshold: float = 1e-4, scale: float = 1.0,
                 faithful: bool = False) -> None:
        self.kwargs = {"min_size": min_size, "sigma": sigma, "body_threshold": body_threshold, "scale": scale,
                       "faithful": faithful}

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        return _as_output(make_superpixels(_single_channel(img, "Superpixels"), **self.kwargs), img)


class _PseudolabelDict(MapTransform):
    """Apply ``self.transform`` to ``keys`` and store the results under ``output_keys``."""

    transform: Transform

    def __init__(self, keys: KeysCollection, output_keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = [output_keys] if isinstance(output_keys, str) else list(output_keys)
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"{type(self).__name__}: {len(self.keys)} keys but {len(self.output_keys)} output_keys")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.transform(d[key])
        return d


class Supervoxelsd(_PseudolabelDict):
    """Dictionary twin of :class:`Supervoxels`: ``d[output_keys] = Supervoxels(...)(d[keys])``."""

    def __init__(self, keys: KeysCollection, output_keys: KeysCollection = "supervoxels", min_size: int = 5000,
                 spacing: Sequence[float] | None = None, scale: float = 1.0, sigma: float = 0.0,
                 body_threshold: float = SUPERVOXEL_BODY_THRESHOLD, renumber: bool = False, faithful: bool = False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, output_keys, allow_missing_keys)
        self.transform = Supervoxels(min_size, spacing, scale, sigma, body_threshold, renumber, faithful)


class Superpixelsd(_PseudolabelDict):
    """Dictionary twin of :class:`Superpixels`: ``d[output_keys] = Superpixels(...)(d[keys])``."""

    def __init__(self, keys: KeysCollection, output_keys: KeysCollection = "superpixels", min_size: int = 400,
                 sigma: float = 1.0, body_threshold: float = 1e-4, scale: float = 1.0, faithful: bool = False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, output_keys, allow_missing_keys)
        self.transform = Superpixels(min_size, sigma, body_threshold, scale, faithful)

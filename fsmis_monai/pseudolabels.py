"""Self-supervision pseudolabels: 3D supervoxels (ADNet / Q-Net family) and 2D superpixels (SSL-ALPNet).

* :func:`felzenszwalb_3d` - graph-based segmentation of a 3D volume with anisotropic spacing (own Cython
  implementation in ``supervoxels/felzenszwalb3d.pyx``; scikit-image only has the 2D version).
* :func:`make_supervoxels` - the supervoxel generator of ADNet (Hansen et al., MedIA 2022) as used by
  Q-Net, GMRD, PAMI and DIFD: rescale to 0-255, ``felzenszwalb_3d(scale=1, sigma=0, min_size)``,
  per-slice body mask, label 0 moved to max+1, voxels outside the body set to 0.
* :func:`make_superpixels` - the 2D superpixels of SSL-ALPNet (Ouyang et al., ECCV 2020): scikit-image
  ``felzenszwalb`` per axial slice, body mask, relabelling (with the reference's relabelling bug behind
  ``faithful=True``).

Arrays follow the NIfTI / nibabel / MONAI layout ``(x, y, z)`` with ``z`` the slice axis. Internally the
reference's ``(z, y, x)`` order is used so that edge order, component numbering and the 2D slices match it.
See ``supervoxels/README.md`` for every difference from the reference code and why.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage.segmentation import relabel_sequential

from fsmis_monai.io import FsmisInputError

__all__ = [
    "SUPERVOXEL_BODY_THRESHOLD",
    "body_mask_2d",
    "body_mask_volume",
    "felzenszwalb_3d",
    "make_superpixels",
    "make_supervoxels",
    "supervoxel_weights",
]

SUPERVOXEL_BODY_THRESHOLD = 10.0  # on the 0-255 rescaled volume (ADNet generate_supervoxels.py)


# ----------------------------------------------------------------------------------------- checks


def _check_volume(volume: np.ndarray, ndim: int, what: str) -> np.ndarray:
    """A real-valued, finite float64 array with ``ndim`` dimensions, or :class:`FsmisInputError`."""
    arr = np.asarray(volume)
    if arr.ndim != ndim:
        raise FsmisInputError(f"{what}: expected a {ndim}D array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.issubdtype(arr.dtype, np.complexfloating):
        raise FsmisInputError(f"{what}: expected real-valued intensities, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if arr.size and not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise FsmisInputError(f"{what}: {bad} voxel(s) are NaN or infinite; fix or mask them first")
    return arr


def _check_spacing(spacing: Sequence[float], ndim: int, what: str) -> np.ndarray:
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.size != ndim or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise FsmisInputError(f"{what}: spacing must be {ndim} positive numbers, got {tuple(np.ravel(spacing))}")
    return sp


# ------------------------------------------------------------------------------------ supervoxels


def supervoxel_weights(spacing: Sequence[float]) -> np.ndarray:
    """Squared-length weight ``w`` of each of the 13 edge directions (cost = sqrt(w * dI**2)).

    ADNet (docs/reference.md#supervoxels), with ``s = spacing[0] / spacing[1]``: in-plane edges (diagonals too) weigh 1,
    pure axis-0 edges ``s**2``, axis-0 + one in-plane axis ``(1 + s**2) / 2`` and axis-0 + both
    ``(2 + s**2) / 3``, i.e. the mean squared step per moved axis in units of ``spacing[1]``. They are
    evaluated in the reference's floating-point form, ``(sqrt(sum) / sqrt(m))**2``, so that the costs and
    hence the edge order are bit-identical to it; unequal in-plane spacings use the same rule.
    """
    from fsmis_monai._felzenszwalb3d import OFFSETS

    sp = _check_spacing(spacing, 3, "felzenszwalb_3d")
    rel2 = [np.float64(1.0), (sp[1] / sp[1]) ** 2, (sp[2] / sp[1]) ** 2]
    rel2[0] = (sp[0] / sp[1]) ** 2
    weights = []
    for off in OFFSETS:
        moved = [a for a in (1, 2, 0) if off[a] != 0]  # in-plane terms first, as the reference writes 1 + s**2
        if len(moved) == 1:
            weights.append(rel2[moved[0]])
        else:
            total = rel2[moved[0]]
            for a in moved[1:]:
                total = total + rel2[a]
            weights.append((np.sqrt(total) / np.sqrt(len(moved))) ** 2)
    return np.array(weights, dtype=np.float64)


def felzenszwalb_3d(
    volume: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    scale: float = 1.0,
    sigma: float = 0.0,
    min_size: int = 20,
    faithful: bool = False,
) -> np.ndarray:
    """Felzenszwalb-Huttenlocher segmentation of a 3D volume over the 26-neighbourhood.

    Args:
        volume: 3D real array; ``spacing[i]`` is the voxel size along axis ``i``. Axis 0 plays the role
            of the reference's slice axis only through ``spacing`` (see :func:`supervoxel_weights`).
        scale: merge scale; ``k = scale / 255`` as in scikit-image's 2D version.
        sigma: Gaussian pre-smoothing in spacing units (``sigma / spacing`` voxels per axis); 0 = none.
        min_size: components smaller than this are merged into a neighbour afterwards.
        faithful: order tied edges as NumPy 1.x's unstable ``argsort`` does (the published supervoxels
            were made so; with it they are reproduced bit for bit). Slower: a comparison sort.

    Returns:
        int32 labels ``0..n-1`` numbered by each component's first voxel in C order.

    Edges are sorted **stably** by their exact float64 cost, ties in the reference's own edge order
    (direction by direction, voxels in C order): the result is what the reference computes with a stable
    ``argsort``, and it is the same on every machine (the reference's unstable ``argsort`` is not).
    """
    from fsmis_monai import _felzenszwalb3d

    vol = _check_volume(volume, 3, "felzenszwalb_3d")
    if not np.isfinite(scale) or scale <= 0:
        raise FsmisInputError(f"felzenszwalb_3d: scale must be > 0, got {scale}")
    if not np.isfinite(sigma) or sigma < 0:
        raise FsmisInputError(f"felzenszwalb_3d: sigma must be >= 0, got {sigma}")
    if int(min_size) != min_size or min_size < 0:
        raise FsmisInputError(f"felzenszwalb_3d: min_size must be a non-negative integer, got {min_size}")
    if vol.size > _felzenszwalb3d.MAX_VOXELS:
        raise FsmisInputError(f"felzenszwalb_3d: {vol.size} voxels exceed the supported {_felzenszwalb3d.MAX_VOXELS}")
    weights = supervoxel_weights(spacing)
    if sigma > 0:
        from scipy import ndimage

        vol = ndimage.gaussian_filter(vol, sigma=sigma / np.asarray(spacing, dtype=np.float64))
    return _felzenszwalb3d.segment(np.ascontiguousarray(vol), weights, float(scale) / 255.0, int(min_size),
                                   numpy1_order=bool(faithful))


def body_mask_2d(slice_2d: np.ndarray, threshold: float) -> np.ndarray:
    """Body mask of one slice: ``slice > threshold``, largest 8-connected component, holes filled.

    The reference's rule (ADNet and SSL-ALPNet ``fg_mask2d``): an empty threshold gives an empty mask;
    equal-sized components resolve to the one met first in raster order.
    """
    from scipy import ndimage

    above = slice_2d > threshold
    if not above.any():
        return above
    components, _ = ndimage.label(above, structure=np.ones((3, 3), dtype=bool))  # numbered in raster order
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
    return ndimage.binary_fill_holes(components == largest)


def body_mask_volume(volume_xyz: np.ndarray, threshold: float) -> np.ndarray:
    """:func:`body_mask_2d` of every axial slice of an ``(x, y, z)`` volume (slices taken as ``(y, x)``)."""
    mask = np.zeros(volume_xyz.shape, dtype=bool)
    for z in range(volume_xyz.shape[2]):
        mask[:, :, z] = body_mask_2d(volume_xyz[:, :, z].T, threshold).T
    return mask


def make_supervoxels(
    image: np.ndarray,
    spacing: Sequence[float],
    min_size: int = 5000,
    scale: float = 1.0,
    sigma: float = 0.0,
    body_threshold: float = SUPERVOXEL_BODY_THRESHOLD,
    renumber: bool = False,
    faithful: bool = False,
) -> np.ndarray:
    """ADNet-style supervoxels of an ``(x, y, z)`` image with ``spacing = (sx, sy, sz)``; int32 ``(x, y, z)``.

    Reference behaviour (ADNet ``generate_supervoxels.py``): min-max rescale to 0-255, segment in the
    ``(z, y, x)`` order with spacing ``(sz, sx, sy)``, per-slice body mask (threshold 10 on the rescaled
    volume), component 0 moved to ``max + 1`` so none is lost, voxels outside the body set to 0.
    ``min_size`` is 5000 for CHAOS and Synapse, 1000 for CMR.

    Corrections: the edge sort is stable (same output everywhere, whatever the NumPy build); a constant
    volume gives all-background instead of the reference's division by zero; ``renumber=True`` maps the
    surviving ids to 1..K (the reference leaves gaps where a supervoxel lies wholly outside the body).
    ``faithful=True`` orders tied edges as NumPy 1.x's ``argsort`` did for the released files, which it
    then reproduces bit for bit (checked on all 55 CHAOS / CMR scans published with Q-Net).
    """
    img = _check_volume(image, 3, "make_supervoxels")
    sp = _check_spacing(spacing, 3, "make_supervoxels")
    if img.size == 0:
        return np.zeros(img.shape, dtype=np.int32)
    low, span = img.min(), np.ptp(img)
    rescaled = 255.0 * (img - low) / span if span > 0 else np.zeros_like(img)
    zyx = np.ascontiguousarray(rescaled.transpose(2, 1, 0))
    # the reference reads pixdim through ITK as the float32's shortest decimal string ("7.7", not 7.69999981)
    sz, sx, sy = (float(str(np.float32(v))) for v in (sp[2], sp[0], sp[1]))
    seg = felzenszwalb_3d(zyx, spacing=(sz, sx, sy), scale=scale, sigma=sigma, min_size=min_size, faithful=faithful)
    seg = seg.transpose(2, 1, 0)
    seg[seg == 0] = seg.max() + 1
    seg[~body_mask_volume(rescaled, body_threshold)] = 0
    out = np.ascontiguousarray(seg, dtype=np.int32)
    return relabel_sequential(out)[0] if renumber else out  # ids 1..K in increasing order, 0 stays 0


# ------------------------------------------------------------------------------------ superpixels


def _relabel_faithful(raw: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """SSL-ALPNet ``superpix_masking``: superpixel 0 is lost and the top id is shifted up by one.

    Ids ``1..M-1`` keep their value, the top id ``M`` becomes ``M + 1`` (so ``M`` is a gap) and the
    pixels of superpixel 0 become background, as do pixels outside the mask.
    """
    top = int(raw.max())
    out = np.where(mask & (raw > 0), raw, 0).astype(np.int32)
    if top > 0:
        out[out == top] = top + 1
    return out


def _relabel_corrected(raw: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Every superpixel that touches the mask gets an id in 1..K (increasing with its original id)."""
    shifted = np.where(mask, raw.astype(np.int32) + 1, 0)  # superpixel 0 is kept; outside the mask is background
    return relabel_sequential(shifted)[0].astype(np.int32)


def make_superpixels(
    volume: np.ndarray,
    min_size: int = 400,
    sigma: float = 1.0,
    body_threshold: float = 1e-4,
    scale: float = 1.0,
    faithful: bool = False,
) -> np.ndarray:
    """SSL-ALPNet 2D superpixels of every axial slice of an ``(x, y, z)`` volume; int32 ``(x, y, z)``.

    Each slice ``(y, x)`` goes through ``skimage.segmentation.felzenszwalb(scale, sigma, min_size)`` on
    the stored intensities; the body mask is :func:`body_mask_2d` with ``body_threshold`` (1e-4 for CT,
    1e-4 + 50 for CHAOS MR). Ids are per slice.

    ``faithful=True`` reproduces the reference relabelling: superpixel 0 is dropped and the top id is
    moved up by one, leaving a gap (docs/reference.md#quirk-superpixel-ids: an episode sampler drawing ids from 1..max
    can then draw an empty one). The default keeps every superpixel inside the body and numbers them 1..K.
    """
    from skimage.segmentation import felzenszwalb

    zyx = np.ascontiguousarray(_check_volume(volume, 3, "make_superpixels").transpose(2, 1, 0))
    relabel = _relabel_faithful if faithful else _relabel_corrected
    out = np.zeros(zyx.shape, dtype=np.int32)
    for z, slice_yx in enumerate(zyx):  # contiguous (y, x) slices, as the reference's SimpleITK arrays
        raw = felzenszwalb(slice_yx, scale=scale, sigma=sigma, min_size=min_size)
        out[z] = relabel(raw, body_mask_2d(slice_yx, body_threshold))
    return np.ascontiguousarray(out.transpose(2, 1, 0))

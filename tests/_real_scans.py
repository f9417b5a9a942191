"""Real CHAOS scans cut small into a temporary folder (never into the repository), shared by the bundle, export,
engine and hardening tests: a window through the liver, optionally every other pixel in-plane, and a few slices
around the liver's middle, saved with the affine of the cut (window origin, spacing times the step)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import nibabel as nib
import numpy as np

from fsmis_monai.io import save_nifti

LIVER = 1


def chaos_window(src: Path, dst: Path, ids: Sequence[int], origin: Tuple[int, int] = (40, 64), size: int = 128,
                 depth: int = 8, step: int = 2) -> Path:
    """``image_<id>``/``label_<id>`` of ``src`` cut to ``x, y = origin + [0, size)`` (every ``step``-th pixel) and
    ``depth`` slices centred on the liver (image float32, label uint8); returns ``dst``."""
    for i in ids:
        image = nib.load(src / f"image_{i}.nii.gz")
        label = np.asarray(nib.load(src / f"label_{i}.nii.gz").dataobj)
        zs = np.flatnonzero((label == LIVER).any(axis=(0, 1)))
        z0 = int(zs[len(zs) // 2]) - depth // 2
        x0, y0 = origin
        window = (slice(x0, x0 + size, step), slice(y0, y0 + size, step), slice(z0, z0 + depth))
        affine = image.affine @ np.diag([step, step, 1.0, 1.0])
        affine[:3, 3] = image.affine[:3, :3] @ np.array([x0, y0, z0], dtype=float) + image.affine[:3, 3]
        save_nifti(dst / f"image_{i}.nii.gz", np.asarray(image.dataobj)[window].astype(np.float32), affine=affine)
        save_nifti(dst / f"label_{i}.nii.gz", label[window].astype(np.uint8), affine=affine)
    return dst


def liver_window(src: Path, dst: Path, ids: Sequence[int], n_slices: int = 8, step: int = 2) -> Path:
    """The 128 x 128 window ``x 40:168, y 64:192`` (64 x 64 at the default step 2), ``n_slices`` slices."""
    return chaos_window(src, dst, ids, depth=n_slices, step=step)


def write_chaos_window(chaos_dir: Path, out: Path, ids=(1, 2), size: int = 96, depth: int = 10) -> Path:
    """The full-resolution window ``x 56:56+size, y 72:72+size``, ``depth`` slices (the hardening tests' cut)."""
    return chaos_window(chaos_dir, out, ids, origin=(56, 72), size=size, depth=depth, step=1)

"""Real CHAOS scans cut small for the bundle/export tests: a 128 x 128 window through the liver, every
other pixel (64 x 64 in-plane) and a few slices around the liver's middle, written to a temporary folder
(never into the repository) with the affine of the cut (window origin and doubled spacing)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from fsmis_monai.io import save_nifti

LIVER = 1


def liver_window(src: Path, dst: Path, ids: Sequence[int], n_slices: int = 8, step: int = 2) -> Path:
    """``image_<id>``/``label_<id>`` of ``src`` cut to ``x 40:168, y 64:192`` (step ``step``) and ``n_slices``
    slices centred on the liver; returns ``dst``."""
    for i in ids:
        image = nib.load(src / f"image_{i}.nii.gz")
        label = np.asarray(nib.load(src / f"label_{i}.nii.gz").dataobj)
        zs = np.flatnonzero((label == LIVER).any(axis=(0, 1)))
        z0 = int(zs[len(zs) // 2]) - n_slices // 2
        window = (slice(40, 168, step), slice(64, 192, step), slice(z0, z0 + n_slices))
        affine = image.affine @ np.diag([step, step, 1.0, 1.0])
        affine[:3, 3] = image.affine[:3, :3] @ np.array([40.0, 64.0, z0]) + image.affine[:3, 3]
        save_nifti(dst / f"image_{i}.nii.gz", np.asarray(image.dataobj)[window].astype(np.float32), affine=affine)
        save_nifti(dst / f"label_{i}.nii.gz", label[window].astype(np.uint8), affine=affine)
    return dst

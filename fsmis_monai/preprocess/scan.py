"""One raw scan through its recipe's Compose: written atomically as ``image_<id>`` / ``label_<id>``, with the
statistics (shape, spacing, per-class slices) that the run's indexes are made of."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fsmis_monai.io import FsmisInputError, input_error_in, load_nifti, save_nifti
from fsmis_monai.preprocess.raw_files import RawScan
from fsmis_monai.preprocess.recipes import IMAGE, LABEL, build_transform, label_table


def output_paths(dst: str | os.PathLike[str], out_id: int) -> tuple[Path, Path]:
    return Path(dst) / f"image_{out_id}.nii.gz", Path(dst) / f"label_{out_id}.nii.gz"


def slice_index(label: np.ndarray, classes: Sequence[int], min_pixels: int = 1) -> dict[int, list[int]]:
    """Slices (last axis) holding at least ``min_pixels`` voxels **of each class**
    (docs/reference.md#quirk-classmap-threshold).

    The CHAOS/CMR notebooks compared the *sum of label values* on the slice with the threshold, which
    lets a slice of another, higher-valued class count; this counts the pixels of the class itself.
    """
    out = {}
    for c in classes:
        counts = (label == c).reshape(-1, label.shape[-1]).sum(axis=0)
        out[int(c)] = [int(z) for z in np.nonzero(counts >= max(1, int(min_pixels)))[0]]
    return out


def scan_stats(image: np.ndarray, label: np.ndarray, affine: np.ndarray, classes: Sequence[int],
               min_pixels: int) -> dict[str, Any]:
    import nibabel as nib

    slices = slice_index(label, classes, min_pixels)
    return {
        "shape": list(label.shape),
        "spacing": [round(float(s), 6) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "orientation": "".join(nib.aff2axcodes(affine)),
        "intensity_range": [float(image.min()), float(image.max())],
        "voxels_per_class": {int(c): int((label == c).sum()) for c in classes},
        "slices": slices,
    }


@lru_cache(maxsize=4)
def _cached_transform(recipe_json: str, faithful: bool, keep_raw: bool | None):
    return build_transform(json.loads(recipe_json), faithful, keep_raw)


def _label_dtype(values: Sequence[int]) -> Any:
    return np.uint8 if max(values, default=0) <= 255 and min(values, default=0) >= 0 else np.int16


def preprocess_scan(recipe: Mapping[str, Any], scan: RawScan, dst: str | os.PathLike[str], overwrite: bool = False,
                    faithful: bool = False, keep_raw: bool | None = None, min_pixels: int = 1) -> dict[str, Any]:
    """Preprocess one scan (or reuse its outputs) and return its statistics; raises ``FsmisInputError``.

    Nothing is written unless the whole transform succeeded; the label is written first and removed
    again if writing the image fails, so a scan never has a label without its image.
    """
    image_path, label_path = output_paths(dst, scan.out_id)
    _, _, names = label_table(recipe, keep_raw)
    classes = sorted(c for c in names if c != 0) if names else []
    if not overwrite and image_path.is_file() and label_path.is_file():
        label, limg = load_nifti(label_path)
        image, _ = load_nifti(image_path)
        classes = classes or sorted(int(v) for v in np.unique(label) if v != 0)
        stats = scan_stats(image, label, limg.affine, classes, min_pixels)
        return {**stats, "id": scan.out_id, "raw_id": scan.raw_id, "status": "skipped"}

    transform = _cached_transform(json.dumps(recipe, sort_keys=True, default=str), faithful, keep_raw)
    try:
        out = transform({IMAGE: scan.image, LABEL: scan.label})
    except Exception as e:
        err = input_error_in(e)
        if err is not None:
            raise err from None
        raise FsmisInputError(f"{scan.image}: preprocessing failed ({type(e).__name__}: {e})") from e
    affine = out[IMAGE].affine.cpu().numpy().astype(np.float64)
    image = out[IMAGE].as_tensor()[0].cpu().numpy().astype(np.float32)
    label_f = out[LABEL].as_tensor()[0].cpu().numpy()
    label = np.rint(label_f).astype(np.int64)
    classes = classes or sorted(int(v) for v in np.unique(label) if v != 0)
    label = label.astype(_label_dtype(classes))

    Path(dst).mkdir(parents=True, exist_ok=True)
    save_nifti(label_path, label, affine)
    try:
        save_nifti(image_path, image, affine)
    except BaseException:
        label_path.unlink(missing_ok=True)
        raise
    stats = scan_stats(image, label, affine, classes, min_pixels)
    return {**stats, "id": scan.out_id, "raw_id": scan.raw_id, "status": "written"}

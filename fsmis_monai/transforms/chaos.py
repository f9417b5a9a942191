"""CHAOS MR ground truth: a folder of PNG slices (grey values) -> one label volume with labels 1..4.

MONAI has no reader for a stack of 2D PNG masks that must line up with a DICOM series, so this is
custom. Two facts of the reference pipeline (docs/reference.md#quirk-chaos-png-labels) are handled differently:

- **Grey values map to labels by value, not by rank.** The reference sorts the unique grey values of a
  volume and numbers them 0..4, which mislabels every organ after a missing one. Here a fixed table of
  grey ranges (the CHAOS documentation: liver 63, right kidney 126, left kidney 189, spleen 252) maps
  each pixel, and a grey value outside every range is an error naming the PNG.
- **The row flip.** The reference flips the stacked PNGs along array axis 1 (the image rows) because
  ``dcm2niix`` stores the DICOM rows reversed in its NIfTI. The PNGs themselves are in DICOM pixel order,
  so when the series is read with MONAI's DICOM readers (``PydicomReader``/``ITKReader``, which keep the
  DICOM row order and record it in the affine) no flip is needed: ``flip_rows=False``. A later
  ``Orientationd("LAS")`` then gives the reference's array layout. Set ``flip_rows=True`` only to pair the
  PNGs with an image converted by ``dcm2niix``.

**Slice order.** The reference stacks the PNGs by the trailing number of their names
(``IMG-0002-00010.png`` -> 10) and relies on that matching the slice order of its NIfTI. Here, when the
image was read from a DICOM folder, each PNG is placed on the slice of *its* DICOM file, whatever order
the reader stacked the series in (``PydicomReader``: instance number; ``ITKReader``: position): the PNG
whose number equals a file's ``InstanceNumber``, or, when the numberings differ (e.g. 0-based PNGs), the
PNG of the same rank; each file's slice comes from its ``ImagePositionPatient`` and the image affine.
Without a DICOM folder (a NIfTI image) the PNGs are stacked by number, as the reference does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Hashable, Mapping

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from fsmis_monai.io import FsmisInputError
from fsmis_monai.transforms.checks import check_raw_path, dicom_files, source_of

# label -> inclusive grey range, from the CHAOS data description (liver 63 (55-70), right kidney 126
# (110-135), left kidney 189 (175-200), spleen 252 (240-255)).
CHAOS_GREY_RANGES: dict[int, tuple[int, int]] = {1: (55, 70), 2: (110, 135), 3: (175, 200), 4: (240, 255)}

_TRAILING_NUMBER = re.compile(r"(\d+)\D*$")


def trailing_number(path: Path) -> int:
    m = _TRAILING_NUMBER.search(path.stem)
    if m is None:
        raise FsmisInputError(f"{path}: PNG name has no slice number")
    return int(m.group(1))


def grey_to_label(grey: np.ndarray, grey_ranges: Mapping[int, tuple[int, int]], name: str = "<array>") -> np.ndarray:
    """Map grey values to labels with an inclusive range per label; 0 stays background, others fail."""
    label = np.zeros(grey.shape, dtype=np.uint8)
    known = grey == 0
    for lab, (lo, hi) in grey_ranges.items():
        hit = (grey >= lo) & (grey <= hi)
        label[hit] = lab
        known |= hit
    if not known.all():
        bad = np.unique(grey[~known])
        raise FsmisInputError(f"{name}: grey values {bad[:8].tolist()} match no label of the grey table "
                              f"{dict(grey_ranges)}")
    return label


def dicom_instances_by_slice(folder: Path, affine: np.ndarray, n_slices: int) -> list[int]:
    """The ``InstanceNumber`` of the DICOM file lying on each slice of the volume read from ``folder``.

    ``affine`` is the volume's RAS affine (MONAI's readers convert DICOM's LPS); a file whose
    ``ImagePositionPatient`` does not fall on a distinct slice is an error naming it.
    """
    import pydicom

    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    by_slice: list[int | None] = [None] * n_slices
    for f in dicom_files(folder):
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["ImagePositionPatient", "InstanceNumber"])
        if "ImagePositionPatient" not in ds:
            raise FsmisInputError(f"{f}: no ImagePositionPatient; cannot place its PNG mask")
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        k = float((inverse @ np.array([-x, -y, z, 1.0]))[2])
        slot = int(round(k))
        if abs(k - slot) > 0.1 or not 0 <= slot < n_slices or by_slice[slot] is not None:
            raise FsmisInputError(f"{f}: its position does not fall on a distinct slice of the series read from {folder}")
        by_slice[slot] = int(ds.InstanceNumber) if "InstanceNumber" in ds else trailing_number(f)
    if any(n is None for n in by_slice):
        raise FsmisInputError(f"{folder}: {by_slice.count(None)} slices of the series have no DICOM file")
    return by_slice  # type: ignore[return-value]


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image  # pillow: installed with scikit-image and matplotlib

    check_raw_path(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise FsmisInputError(f"{path}: cannot read as PNG ({type(e).__name__}: {e})") from e
    if arr.ndim == 3:  # grey stored as RGB(A): accept only when the colour channels agree
        if not (arr[..., :3] == arr[..., :1]).all():
            raise FsmisInputError(f"{path}: colour PNG; expected a grey-level mask")
        arr = arr[..., 0]
    return arr


class ChaosPngLabelStack(Transform):
    """Read a CHAOS ``Ground`` folder into a ``(x, y, z)`` = (column, row, slice) label array.

    Args:
        grey_ranges: label -> inclusive grey range (default :data:`CHAOS_GREY_RANGES`).
        flip_rows: reverse the image rows, as the reference does for ``dcm2niix`` images (see module doc).
    """

    def __init__(self, grey_ranges: Mapping[int, tuple[int, int]] | None = None, flip_rows: bool = False) -> None:
        self.grey_ranges = dict(CHAOS_GREY_RANGES if grey_ranges is None else
                                {int(k): (int(v[0]), int(v[1])) for k, v in grey_ranges.items()})
        self.flip_rows = flip_rows

    def __call__(self, folder: str | Path, slice_numbers: list[int] | None = None) -> np.ndarray:
        """Stack the PNGs of ``folder``; ``slice_numbers[k]`` (optional) is the number of the DICOM
        instance on slice ``k``: the PNG with that number goes there, or the PNG of the same rank when the
        two numberings differ."""
        folder = check_raw_path(folder)
        pngs = [p for p in folder.iterdir() if p.suffix.lower() == ".png"]
        if not pngs:
            raise FsmisInputError(f"{folder}: no PNG masks")
        pngs.sort(key=trailing_number)
        numbers = [trailing_number(p) for p in pngs]
        if len(set(numbers)) != len(numbers):
            dup = next(p for p, n in zip(pngs, numbers) if numbers.count(n) > 1)
            raise FsmisInputError(f"{dup}: two PNG masks share slice number {trailing_number(dup)}")
        if slice_numbers is not None and len(slice_numbers) == len(pngs):
            if set(slice_numbers) == set(numbers):
                pngs = [pngs[numbers.index(n)] for n in slice_numbers]
            else:
                rank = {n: r for r, n in enumerate(sorted(slice_numbers))}
                pngs = [pngs[rank[n]] for n in slice_numbers]
        slices = []
        for p in pngs:
            grey = _read_png(p)
            if slices and grey.shape != slices[0].shape:
                raise FsmisInputError(f"{p}: slice shape {grey.shape} differs from {slices[0].shape} of {pngs[0].name}")
            slices.append(grey_to_label(grey, self.grey_ranges, str(p)))
        stack = np.stack(slices, axis=-1)  # (row, column, slice)
        if self.flip_rows:
            stack = stack[::-1]
        return np.ascontiguousarray(stack.transpose(1, 0, 2))  # (column, row, slice) like MONAI's DICOM readers


class LoadChaosPngLabeld(MapTransform):
    """Load ``data[key]`` (a ``Ground`` folder) as a channel-first MetaTensor in the geometry of ``ref_key``.

    The stack must have the reference image's spatial shape (same slice count and in-plane size);
    otherwise the error names both the PNG folder and the image.
    """

    def __init__(self, keys: KeysCollection, ref_key: str = "image", grey_ranges: Mapping[int, tuple[int, int]] | None = None,
                 flip_rows: bool = False) -> None:
        super().__init__(keys)
        self.ref_key = ref_key
        self.reader = ChaosPngLabelStack(grey_ranges, flip_rows)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.ref_key]
        for key in self.key_iterator(d):
            folder = Path(d[key])
            source = Path(source_of(ref))
            numbers = None
            if source.is_dir():  # a DICOM series: put each PNG on its DICOM file's slice
                numbers = dicom_instances_by_slice(source, ref.affine.cpu().numpy(), int(ref.shape[-1]))
            arr = self.reader(folder, numbers)
            if tuple(arr.shape) != tuple(ref.shape[1:]):
                raise FsmisInputError(
                    f"{folder}: PNG stack of shape {arr.shape} (column, row, slice) does not match the image "
                    f"{source_of(ref)} of shape {tuple(ref.shape[1:])}")
            meta = {k: v for k, v in ref.meta.items() if k not in ("filename_or_obj", "affine")}
            meta["filename_or_obj"] = str(folder)
            d[key] = MetaTensor(arr[None], affine=ref.affine.clone(), meta=meta)
        return d

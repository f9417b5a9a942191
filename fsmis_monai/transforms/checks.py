"""Checked loading and validation of raw scans: every problem becomes an ``FsmisInputError`` naming the file.

MONAI's ``LoadImaged`` and ``MapLabelValued`` accept or silently pass through much bad input (a zero-byte
slice is skipped, a label value missing from the map is kept as is, a float label is truncated later), and
their errors name the transform rather than the file. These wrappers add the checks a preprocessing run
needs so that a bad scan fails early, clearly, and before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform, Transform

from fsmis_monai.io import FsmisInputError


def source_of(img: Any, default: str = "<array>") -> str:
    """The file (or folder) an image was read from, for error messages."""
    meta = getattr(img, "meta", None) or {}
    src = meta.get("filename_or_obj", default)
    if isinstance(src, (list, tuple)):  # a DICOM series read slice by slice: name its folder
        src = str(Path(src[0]).parent) if src else default
    return str(src)


def dicom_files(folder: Path) -> list[Path]:
    import pydicom

    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.stat().st_size > 0 and pydicom.misc.is_dicom(p)]


def check_raw_path(path: str | Path, dicom_series: bool = False) -> Path:
    """Fail with a message naming ``path`` if it is missing, empty (0 bytes) or an empty DICOM series folder.

    A folder is checked file by file: one zero-byte slice is named, because DICOM readers skip it silently
    and the volume would lose a slice.
    """
    p = Path(path)
    if not p.exists():
        raise FsmisInputError(f"{p}: file not found")
    if p.is_file():
        if p.stat().st_size == 0:
            raise FsmisInputError(f"{p}: file is empty (0 bytes)")
        return p
    files = [f for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")]
    empty = [f for f in files if f.stat().st_size == 0]
    if empty:
        raise FsmisInputError(f"{empty[0]}: file is empty (0 bytes)")
    if not files:
        raise FsmisInputError(f"{p}: folder is empty" + (" (empty DICOM series)" if dicom_series else ""))
    if dicom_series and not dicom_files(p):
        raise FsmisInputError(f"{p}: empty DICOM series (no DICOM file among {len(files)} files)")
    if dicom_series:  # readers skip a non-DICOM file silently; one named *.dcm is a lost slice, not a stray note
        import pydicom

        fake = [f for f in files if f.suffix.lower() == ".dcm" and not pydicom.misc.is_dicom(f)]
        if fake:
            raise FsmisInputError(f"{fake[0]}: not a DICOM file (no DICM header) in the series {p}")
    return p


def unreadable_dicom(folder: Path) -> tuple[Path, Exception] | None:
    """The first DICOM file of ``folder`` whose pixel data cannot be decoded (to name it when a series fails)."""
    import pydicom

    for f in dicom_files(folder):
        try:
            pydicom.dcmread(f).pixel_array
        except Exception as e:  # pydicom raises ValueError/EOFError/AttributeError... for damaged files
            return f, e
    return None


class CheckedLoadImaged(MapTransform):
    """``LoadImaged`` (channel first, MetaTensor) with the file checked before and the result checked after.

    Before: :func:`check_raw_path`. After: a DICOM series must have as many slices as DICOM files in its
    folder, and ``finite_keys`` must hold finite voxels only. Reader errors are re-raised as
    ``FsmisInputError`` naming the file.
    """

    def __init__(self, keys: KeysCollection, reader: str | None = None, finite_keys: KeysCollection = (),
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reader_name = reader
        self.loader = LoadImaged(keys, reader=reader, image_only=True, ensure_channel_first=True,
                                 allow_missing_keys=allow_missing_keys)
        self.finite_keys = set(finite_keys if isinstance(finite_keys, (list, tuple, set)) else [finite_keys])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = Path(d[key])
            check_raw_path(path, dicom_series=path.is_dir())
            try:
                loaded = self.loader({key: str(path)})[key]
            except Exception as e:  # readers raise RuntimeError/OSError/ValueError/IndexError...
                cause = e.__cause__ or e
                culprit = unreadable_dicom(path) if path.is_dir() else None
                if culprit is not None:
                    raise FsmisInputError(f"{culprit[0]}: damaged DICOM slice ({type(culprit[1]).__name__}: "
                                          f"{culprit[1]}) in the series {path}") from e
                raise FsmisInputError(
                    f"{path}: cannot read with {self.reader_name or 'MONAI LoadImage'} ({type(cause).__name__}: {cause})"
                ) from e
            if path.is_dir():
                n_files = len(dicom_files(path))
                if loaded.shape[-1] != n_files:
                    raise FsmisInputError(
                        f"{path}: the series read has {loaded.shape[-1]} slices but the folder holds {n_files} "
                        "DICOM files (unreadable slices or a mixed series)")
            if key in self.finite_keys and not torch.isfinite(loaded).all():
                raise FsmisInputError(f"{path}: contains NaN or infinite voxels")
            loaded.meta["filename_or_obj"] = str(path)
            d[key] = loaded
        return d


class CheckSameShaped(MapTransform):
    """All ``keys`` must share the spatial shape of the first key; the others then take its geometry.

    The reference pipelines copy the image's geometry onto the label (``CopyInformation``); here the
    copy happens only after the shapes are checked, so a mismatched label fails naming both files.
    """

    def __init__(self, keys: KeysCollection, copy_geometry: bool = True) -> None:
        super().__init__(keys)
        self.copy_geometry = copy_geometry

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first, *others = list(self.key_iterator(d))
        ref = d[first]
        for key in others:
            img = d[key]
            if tuple(img.shape[1:]) != tuple(ref.shape[1:]):
                raise FsmisInputError(
                    f"{source_of(img)}: shape {tuple(img.shape[1:])} does not match the image "
                    f"{source_of(ref)} of shape {tuple(ref.shape[1:])}")
            if self.copy_geometry and isinstance(img, MetaTensor) and isinstance(ref, MetaTensor):
                img.affine = ref.affine.clone()
        return d


def label_values(label: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(integer values present, non-integer values present)`` of a label map.

    ``torch.unique``/``np.unique`` sort the whole volume (about 1 s for a 512 x 512 x 40 CT); label
    values are small non-negative integers in practice, so a histogram (``np.bincount``) finds them
    in a fraction of that, with ``np.unique`` as the fallback for anything else.
    """
    arr = np.asarray(label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else label)
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        off = np.abs(arr - rounded) > 1e-6
        if off.any():
            return np.unique(rounded[~off]).astype(np.int64), np.unique(arr[off])
        arr = rounded
    ints = arr.astype(np.int64, copy=False).ravel()
    lo, hi = (int(ints.min()), int(ints.max())) if ints.size else (0, 0)
    if lo >= 0 and hi < 1 << 20:
        return np.nonzero(np.bincount(ints, minlength=1))[0], np.empty(0)
    return np.unique(ints), np.empty(0)


class CheckLabelValues(Transform):
    """Fail unless every voxel of a label map is an integer listed in ``allowed`` (``None``: any integer).

    MONAI's ``MapLabelValue`` leaves values missing from its map untouched, which would write a label the
    rest of the pipeline does not know; a float label (e.g. a probability map or a linearly resampled
    label) would be truncated silently. Both are errors here.
    """

    def __init__(self, allowed: Sequence[int] | None = None) -> None:
        self.allowed = None if allowed is None else sorted(int(v) for v in allowed)

    def __call__(self, label: Any) -> Any:
        values, fractional = label_values(label)
        name = source_of(label)
        if fractional.size:
            raise FsmisInputError(
                f"{name}: label holds non-integer values ({', '.join(f'{v:g}' for v in fractional[:5])}...): "
                "not a label map (float or interpolated labels are refused)")
        if self.allowed is not None:
            bad = sorted(set(int(v) for v in values) - set(self.allowed))
            if bad:
                raise FsmisInputError(f"{name}: label values {bad} are not in the recipe's label map {self.allowed}")
        return label


class CheckLabelValuesd(MapTransform):
    """Dictionary twin of :class:`CheckLabelValues`."""

    def __init__(self, keys: KeysCollection, allowed: Sequence[int] | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.checker = CheckLabelValues(allowed)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.checker(d[key])
        return d

"""Scans held in memory for episodic sampling: checked loading, label remapping, intensity normalisation.

A :class:`Volume` is one scan paired by id (:func:`fsmis_monai.data.datalist.pair_scans`): the image,
its canonical label map and its pseudolabels (supervoxels or superpixels), all stored slice-first as
``[Z, H, W]`` so that one axial slice is one contiguous array. ``H, W`` are the file's first two array
axes (the NIfTI / MONAI ``LoadImage`` order that the evaluation uses, slice ``z`` = ``array[:, :, z]``);
the reference loaders read with SimpleITK and therefore see the transposed slice.

Normalisation (methods.md 1.6):
- ``"volume"`` (every ADNet-style loader, and ALP on MR): per-scan z-score ``(x - mean) / std``;
- ``"global"`` (ALP on CT): one mean/std over every voxel of the *training* scans, computed once by
  :func:`intensity_stats` and reused at test time;
- ``"none"``: the stored intensities.

Loaded volumes are cached per process (keyed by file paths, sizes and modification times plus the
options), so building a training and a validation dataset, or re-creating a dataset, reads each file once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from fsmis_monai.data.datalist import ScanFiles, pair_scans
from fsmis_monai.data.registry import DatasetDescriptor, FoldFamily, get_dataset, get_fold
from fsmis_monai.io import FsmisInputError, load_nifti

Normalization = Literal["volume", "global", "none"]
ResizeMode = Literal["crop", "resize"]

__all__ = [
    "Volume",
    "IntensityStats",
    "intensity_stats",
    "load_volume",
    "load_volumes",
    "training_volumes",
    "clear_volume_cache",
]


@dataclass(frozen=True)
class IntensityStats:
    """Mean and standard deviation used for the ``"global"`` normalisation."""

    mean: float
    std: float


@dataclass(frozen=True, eq=False)
class Volume:
    """One scan in memory. Arrays are ``[Z, H, W]`` and read-only (volumes are shared between datasets)."""

    scan_id: int
    image: np.ndarray  # float32, normalised
    label: np.ndarray | None  # uint8/int16, canonical class ids (registry ``raw_label_map`` applied)
    pseudolabel: np.ndarray | None  # int32, 0 = no pseudolabel
    files: ScanFiles
    affine: np.ndarray = field(repr=False)

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])

    def image_slice(self, z: int, channels: int = 3) -> np.ndarray:
        """Axial slice ``z`` as ``[channels, H, W]`` float32 (the single channel repeated, methods.md 1.6)."""
        return np.repeat(self.image[z][None], channels, axis=0)


# --------------------------------------------------------------------------------------- reading


def _check_integral(values: np.ndarray, path: Path, what: str) -> None:
    if values.size and not np.all(np.isfinite(values)):
        raise FsmisInputError(f"{path}: {what} contains NaN or infinite values")
    if values.size and not np.array_equal(values, np.round(values)):
        examples = values[values != np.round(values)][:3]
        raise FsmisInputError(f"{path}: {what} values must be integers, found e.g. {examples}")


def _read_label(path: Path, desc: DatasetDescriptor) -> tuple[np.ndarray, np.ndarray]:
    data, img = load_nifti(path)
    values = np.unique(data)
    _check_integral(values, path, "label")
    unknown = sorted(set(values.astype(np.int64).tolist()) - set(int(k) for k in desc.raw_label_map))
    if unknown:
        raise FsmisInputError(
            f"{path}: label values {unknown} are not in the {desc.key} label map {dict(desc.raw_label_map)}"
        )
    lut = np.zeros(max(int(k) for k in desc.raw_label_map) + 1, dtype=np.int16)
    for raw, canonical in desc.raw_label_map.items():
        lut[int(raw)] = int(canonical)
    out = lut[data.astype(np.int64)]
    return out.astype(np.uint8 if out.max(initial=0) < 256 else np.int16), np.asarray(img.affine)


def _read_pseudolabel(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data, img = load_nifti(path)
    values = np.unique(data)
    _check_integral(values, path, "pseudolabel")
    if values.size and values.min() < 0:
        raise FsmisInputError(f"{path}: pseudolabel ids must be >= 0, found {values.min()}")
    if values.size and values.max() > np.iinfo(np.int32).max:
        raise FsmisInputError(f"{path}: pseudolabel id {values.max()} does not fit in int32")
    return data.astype(np.int32), np.asarray(img.affine)


def _check_geometry(reference: Path, ref_shape, ref_affine, other: Path, shape, affine, check_affine: bool) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise FsmisInputError(f"{other}: shape {tuple(shape)} differs from {reference.name} {tuple(ref_shape)}")
    if check_affine and not np.allclose(affine, ref_affine, atol=1e-3):
        raise FsmisInputError(
            f"{other}: geometry (affine) differs from {reference.name}; regenerate it from that image "
            f"(e.g. `fsmis supervoxels`) or load with check_geometry=False.\n  {other.name}: "
            f"{np.round(affine, 4).tolist()}\n  {reference.name}: {np.round(ref_affine, 4).tolist()}"
        )


def _fit_in_plane(arr: np.ndarray, image_size: tuple[int, int], mode: ResizeMode, is_label: bool) -> np.ndarray:
    """Crop/pad (centre) or resize a ``[Z, H, W]`` array in-plane with MONAI (Z acts as the channel axis)."""
    from monai.transforms import Resize, ResizeWithPadOrCrop

    if tuple(arr.shape[1:]) == tuple(image_size):
        return arr
    if mode == "crop":
        out = ResizeWithPadOrCrop(spatial_size=image_size)(arr)
    elif mode == "resize":
        if is_label:
            out = Resize(spatial_size=image_size, mode="nearest")(arr.astype(np.float32))
        else:
            out = Resize(spatial_size=image_size, mode="bilinear", anti_aliasing=False)(arr)
    else:
        raise ValueError(f"resize_mode must be 'crop' or 'resize', got {mode!r}")
    return np.asarray(out).astype(arr.dtype, copy=False)


def _slice_first(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(arr, -1, 0))


def _normalise(image: np.ndarray, path: Path, normalization: Normalization, stats: IntensityStats | None) -> np.ndarray:
    if normalization == "none":
        return image.astype(np.float32)
    if normalization == "volume":
        mean, std = float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64))
    elif normalization == "global":
        if stats is None:
            raise ValueError("normalization='global' needs intensity stats (see intensity_stats())")
        mean, std = stats.mean, stats.std
    else:
        raise ValueError(f"normalization must be 'volume', 'global' or 'none', got {normalization!r}")
    if not std > 0:
        raise FsmisInputError(f"{path}: constant image (standard deviation 0), cannot z-score it")
    return ((image - mean) / std).astype(np.float32)


def load_volume(
    files: ScanFiles,
    dataset: str | DatasetDescriptor,
    normalization: Normalization = "volume",
    stats: IntensityStats | None = None,
    image_size: Sequence[int] | None = None,
    resize_mode: ResizeMode = "crop",
    check_geometry: bool = True,
) -> Volume:
    """Read one scan (image, label, pseudolabel), check that they agree, remap and normalise it.

    Shapes must match exactly; affines must match too unless ``check_geometry=False`` (pseudolabels made
    by the reference code carry no geometry). ``image_size`` (H, W) centre-crops/pads (``"crop"``, how ALP
    brings 257^2 SABS slices to 256^2) or resizes (``"resize"``: bilinear image, nearest labels) in-plane.
    """
    desc = get_dataset(dataset)
    image, img = load_nifti(files.image)
    if image.ndim != 3:
        raise FsmisInputError(f"{files.image}: expected a 3D volume, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise FsmisInputError(f"{files.image}: image contains NaN or infinite values")
    label = pseudo = None
    if files.label is not None:
        label, affine = _read_label(files.label, desc)
        _check_geometry(files.image, image.shape, img.affine, files.label, label.shape, affine, check_geometry)
    if files.pseudolabel is not None:
        pseudo, affine = _read_pseudolabel(files.pseudolabel)
        _check_geometry(files.image, image.shape, img.affine, files.pseudolabel, pseudo.shape, affine, check_geometry)
    image = _normalise(image, files.image, normalization, stats)

    arrays = [_slice_first(a) if a is not None else None for a in (image, label, pseudo)]
    if image_size is not None:
        size = (int(image_size[0]), int(image_size[1]))
        arrays = [None if a is None else _fit_in_plane(a, size, resize_mode, is_label=i > 0)
                  for i, a in enumerate(arrays)]
    for a in arrays:
        if a is not None:
            a.setflags(write=False)
    return Volume(files.scan_id, arrays[0], arrays[1], arrays[2], files, np.asarray(img.affine))


# --------------------------------------------------------------------------------------- caching


_CACHE: dict[tuple, Volume] = {}


def _file_key(path: Path | None) -> tuple:
    if path is None:
        return (None,)
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def clear_volume_cache() -> None:
    """Forget every cached volume (frees memory; the next load reads the files again)."""
    _CACHE.clear()


def load_volumes(
    files: Sequence[ScanFiles],
    dataset: str | DatasetDescriptor,
    normalization: Normalization = "volume",
    stats: IntensityStats | None = None,
    image_size: Sequence[int] | None = None,
    resize_mode: ResizeMode = "crop",
    check_geometry: bool = True,
    cache: bool = True,
) -> list[Volume]:
    """:func:`load_volume` for each scan, reading each file once per process when ``cache`` is on.

    For ``normalization="global"`` without ``stats`` the statistics are computed over ``files`` (pass
    the training scans here, and the same ``stats`` when loading test scans).
    """
    if not files:
        raise ValueError("no scans to load")
    desc = get_dataset(dataset)
    if normalization == "global" and stats is None:
        stats = intensity_stats(files)
    size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    out = []
    for f in files:
        key = (_file_key(f.image), _file_key(f.label), _file_key(f.pseudolabel), desc.key, normalization,
               None if normalization != "global" else (stats.mean, stats.std), size, resize_mode, check_geometry)
        vol = _CACHE.get(key) if cache else None
        if vol is None:
            vol = load_volume(f, desc, normalization, stats, size, resize_mode, check_geometry)
            if cache:
                _CACHE[key] = vol
        out.append(vol)
    shapes = {v.spatial_shape for v in out}
    if len(shapes) > 1:
        raise FsmisInputError(
            "scans differ in in-plane size " + ", ".join(f"{v.files.image.name}: {v.spatial_shape}" for v in out[:6])
            + "; pass image_size to crop/resize them to one size"
        )
    return out


def intensity_stats(files: Sequence[ScanFiles]) -> IntensityStats:
    """Mean and standard deviation over every voxel of ``files`` (ALP's global CT normalisation)."""
    total = total_sq = 0.0
    count = 0
    for f in files:
        data, _ = load_nifti(f.image, dtype=np.float64)
        if not np.all(np.isfinite(data)):
            raise FsmisInputError(f"{f.image}: image contains NaN or infinite values")
        total += float(data.sum())
        total_sq += float(np.square(data).sum())
        count += data.size
    if count == 0:
        raise ValueError("no voxels to compute intensity statistics from")
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
    return IntensityStats(mean, std)


def training_volumes(
    dataset_dir: str | os.PathLike[str],
    dataset: str | DatasetDescriptor,
    fold: int | None = 0,
    family: FoldFamily = "qnet",
    pseudolabel_dir: str | os.PathLike[str] | None = None,
    require_labels: bool = True,
    normalization: Normalization | None = None,
    image_size: Sequence[int] | None = None,
    resize_mode: ResizeMode = "crop",
    check_geometry: bool = True,
) -> list[Volume]:
    """The training scans of ``fold`` (all scans when ``fold`` is None), loaded and cached.

    ``normalization`` defaults to ``"volume"`` for MR and ``"global"`` (statistics over these training
    scans) for CT, as ALP does; ADNet-style pipelines z-score per volume everywhere (pass ``"volume"``).
    """
    desc = get_dataset(dataset)
    all_scans = pair_scans(dataset_dir, pseudolabel_dir=pseudolabel_dir, require_labels=require_labels)
    ids = [s.scan_id for s in all_scans]
    if fold is not None:
        wanted = set(get_fold(desc, fold, family, ids=ids).train_ids)
        all_scans = [s for s in all_scans if s.scan_id in wanted]
    norm = normalization or ("global" if desc.modality == "CT" else "volume")
    return load_volumes(all_scans, desc, norm, None, image_size, resize_mode, check_geometry)

"""Scans held in memory for episodic sampling: checked loading, label remapping, intensity normalisation.

A :class:`Volume` is one scan paired by id (:func:`fsmis_monai.data.datalist.pair_scans`): the image,
its canonical label map and its pseudolabels (supervoxels or superpixels), all stored slice-first as
``[Z, H, W]`` so that one axial slice is one contiguous array. ``H, W`` are the file's first two array
axes (the NIfTI / MONAI ``LoadImage`` order that the evaluation uses, slice ``z`` = ``array[:, :, z]``);
the reference loaders read with SimpleITK and therefore see the transposed slice.

Normalisation (docs/reference.md#intensity-normalisation):
- ``"volume"`` (every ADNet-style loader, and ALP on MR): per-scan z-score ``(x - mean) / std``;
- ``"global"`` (ALP on CT): one mean/std over every voxel of the *training* scans, computed once by
  :func:`intensity_stats` and reused at test time;
- ``"none"``: the stored intensities.

Loaded volumes are cached per process (keyed by file paths, sizes and modification times plus the
options), so building a training and a validation dataset, or re-creating a dataset, reads each file once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from fsmis_monai.data.contract import DataContract, build_pipeline, contract_from_scans, loader, save_contract
from fsmis_monai.data.datalist import ScanFiles, pair_scans
from fsmis_monai.data.registry import DatasetDescriptor, FoldFamily, get_dataset, get_fold
from fsmis_monai.io import FsmisInputError, load_nifti

Normalization = Literal["volume", "global", "slice_minmax", "none"]
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
        """Axial slice ``z`` as ``[channels, H, W]`` float32 (the single channel repeated,
        docs/reference.md#intensity-normalisation)."""
        return np.repeat(self.image[z][None], channels, axis=0)


# --------------------------------------------------------------------------------------- reading


def _check_integral(values: np.ndarray, path: Path, what: str) -> None:
    if values.size and not np.all(np.isfinite(values)):
        raise FsmisInputError(f"{path}: {what} contains NaN or infinite values")
    if values.size and not np.array_equal(values, np.round(values)):
        examples = values[values != np.round(values)][:3]
        raise FsmisInputError(f"{path}: {what} values must be integers, found e.g. {examples}")


def _check_geometry(reference: Path, ref_shape, ref_affine, other: Path, shape, affine, check_affine: bool) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise FsmisInputError(f"{other}: shape {tuple(shape)} differs from {reference.name} {tuple(ref_shape)}")
    if check_affine and not np.allclose(affine, ref_affine, atol=1e-3):
        raise FsmisInputError(
            f"{other}: geometry (affine) differs from {reference.name}; regenerate it from that image "
            f"(e.g. `fsmis supervoxels`) or load with check_geometry=False.\n  {other.name}: "
            f"{np.round(affine, 4).tolist()}\n  {reference.name}: {np.round(ref_affine, 4).tolist()}"
        )


def _check_pseudolabel(values: np.ndarray, path: Path) -> None:
    _check_integral(values, path, "pseudolabel")
    if values.size and values.min() < 0:
        raise FsmisInputError(f"{path}: pseudolabel ids must be >= 0, found {values.min()}")
    if values.size and values.max() > np.iinfo(np.int32).max:
        raise FsmisInputError(f"{path}: pseudolabel id {values.max()} does not fit in int32")


def _slice_first(arr) -> np.ndarray:
    """``[1, H, W, Z]`` (pipeline output) -> contiguous ``[Z, H, W]`` numpy."""
    arr = arr.as_tensor() if hasattr(arr, "as_tensor") else arr
    return np.ascontiguousarray(np.moveaxis(np.asarray(arr)[0], -1, 0))


def volume_contract(
    dataset: str | DatasetDescriptor,
    normalization: Normalization = "volume",
    stats: IntensityStats | None = None,
    image_size: Sequence[int] | None = None,
    resize_mode: ResizeMode = "crop",
) -> DataContract:
    """The contract the keyword options of :func:`load_volume` describe (stored orientation and spacing)."""
    if normalization == "global" and stats is None:
        raise ValueError("normalization='global' needs intensity stats (see intensity_stats())")
    extra = {"mean": stats.mean, "std": stats.std} if normalization == "global" and stats is not None else {}
    size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    return DataContract.for_dataset(get_dataset(dataset).key, normalization=normalization, image_size=size,
                                    fit_mode=resize_mode, **extra)


def load_volume(
    files: ScanFiles,
    dataset: str | DatasetDescriptor,
    normalization: Normalization = "volume",
    stats: IntensityStats | None = None,
    image_size: Sequence[int] | None = None,
    resize_mode: ResizeMode = "crop",
    check_geometry: bool = True,
    contract: DataContract | None = None,
) -> Volume:
    """Read one scan (image, label, pseudolabel), check that they agree, and prepare it with the data
    contract's pipeline (:func:`fsmis_monai.data.contract.build_pipeline`, the one evaluation and inference use).

    ``contract`` wins over ``normalization``/``stats``/``image_size``/``resize_mode`` (which describe a contract
    that keeps the stored orientation and spacing). Shapes must match exactly; affines must match too unless
    ``check_geometry=False`` (pseudolabels made by the reference code carry no geometry: they then take the
    image's). ``image_size`` (H, W) centre-crops/pads (``"crop"``, how ALP brings 257^2 SABS slices to 256^2)
    or resizes (``"resize"``: bilinear image, nearest labels) in-plane.
    """
    desc = get_dataset(dataset)
    if contract is None:
        contract = volume_contract(desc, normalization, stats, image_size, resize_mode)
    paths = {"image": files.image, "label": files.label, "pseudolabel": files.pseudolabel}
    paths = {k: v for k, v in paths.items() if v is not None}
    d = loader(list(paths))({k: str(v) for k, v in paths.items()})
    image = d["image"]
    if image.ndim != 4:
        raise FsmisInputError(f"{files.image}: expected a 3D volume, got shape {tuple(image.shape[1:])}")
    for key in ("label", "pseudolabel"):
        if key not in d:
            continue
        if key == "pseudolabel":
            _check_pseudolabel(np.unique(np.asarray(d[key].as_tensor())), paths[key])
        _check_geometry(files.image, image.shape[1:], image.affine.numpy(), paths[key], d[key].shape[1:],
                        d[key].affine.numpy(), check_geometry)
        d[key].affine = image.affine.clone()  # one grid for all (checked above, or told to trust the image)
    out = build_pipeline(contract, "image", "label" if "label" in d else None,
                         ["pseudolabel"] if "pseudolabel" in d else [], load=False)(d)
    arrays = [_slice_first(out[k]) if k in out else None for k in ("image", "label", "pseudolabel")]
    arrays[0] = arrays[0].astype(np.float32, copy=False)
    if arrays[1] is not None:
        arrays[1] = arrays[1].astype(np.uint8 if arrays[1].max(initial=0) < 256 else np.int16)
    if arrays[2] is not None:
        arrays[2] = arrays[2].astype(np.int32)
    for a in arrays:
        if a is not None:
            a.setflags(write=False)
    return Volume(files.scan_id, arrays[0], arrays[1], arrays[2], files, out["image"].affine.numpy())


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
    contract: DataContract | None = None,
) -> list[Volume]:
    """:func:`load_volume` for each scan, reading each file once per process when ``cache`` is on.

    For ``normalization="global"`` without ``stats`` the statistics are computed over ``files`` (pass
    the training scans here, and the same ``stats`` when loading test scans). ``contract`` wins over the
    normalisation and size options.
    """
    if not files:
        raise ValueError("no scans to load")
    desc = get_dataset(dataset)
    if contract is None:
        if normalization == "global" and stats is None:
            stats = intensity_stats(files)
        contract = volume_contract(desc, normalization, stats, image_size, resize_mode)
    contract_key = json.dumps(contract.to_dict(), sort_keys=True)
    out = []
    for f in files:
        key = (_file_key(f.image), _file_key(f.label), _file_key(f.pseudolabel), desc.key, contract_key,
               check_geometry)
        vol = _CACHE.get(key) if cache else None
        if vol is None:
            vol = load_volume(f, desc, check_geometry=check_geometry, contract=contract)
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
    contract: DataContract | None = None,
    contract_file: str | os.PathLike[str] | None = None,
) -> list[Volume]:
    """The training scans of ``fold`` (all scans when ``fold`` is None or the data are a user's own, dataset
    ``none``), loaded and cached.

    ``normalization`` defaults to ``"volume"`` for MR and ``"global"`` (statistics over these training
    scans) for CT, as ALP does; ADNet-style pipelines z-score per volume everywhere (pass ``"volume"``).
    The scans are prepared under ``contract``, by default the one derived from them
    (:func:`fsmis_monai.data.contract.contract_from_scans`: their common orientation and spacing, the
    global statistics when asked), which ``contract_file`` (the trained weights' path, e.g.
    ``models/model.pt``) saves beside the model for evaluation, inference and ``fsmis freeze``.
    """
    desc = get_dataset(dataset)
    all_scans = pair_scans(dataset_dir, pseudolabel_dir=pseudolabel_dir, require_labels=require_labels)
    ids = [s.scan_id for s in all_scans]
    if fold is not None and not desc.own_data:  # own data (dataset none) has no folds: every scan trains
        wanted = set(get_fold(desc, fold, family, ids=ids).train_ids)
        all_scans = [s for s in all_scans if s.scan_id in wanted]
    if not all_scans:
        raise FsmisInputError(f"{dataset_dir}: no training scans for fold {fold}")
    norm = normalization or ("global" if desc.modality == "CT" else "volume")
    if contract is None:
        contract = contract_from_scans([s.image for s in all_scans], desc.key, norm, image_size, resize_mode)
    if contract_file is not None:
        save_contract(contract, contract_file)
    return load_volumes(all_scans, desc, check_geometry=check_geometry, contract=contract)

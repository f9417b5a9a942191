"""The data contract of a trained model: how a scan must be prepared so the network sees what it saw in training.

A :class:`DataContract` is a small JSON record saved beside the trained weights (``models/model.pt`` ->
``models/data_contract.json``, :func:`contract_path`) and copied by ``fsmis freeze``. It holds

- the label map (raw value on disk -> class id) and the class names (``label_map=None``: a user's own data,
  any raw value is a class of its own);
- the orientation (axis codes, e.g. ``"LAS"``) and voxel spacing (mm, along the array axes after
  orientation; a non-positive entry keeps the stored spacing) the network was trained at; ``None`` keeps the
  stored orientation / spacing (scans whose slice axis is the acquisition axis, e.g. oblique cardiac MR);
- the slice axis (the array axis slices are cut along, after orientation);
- the intensity normalisation (``volume``: per-scan z-score; ``global``: z-score with the training scans'
  ``mean``/``std``, computed at training time; ``slice_minmax``: each slice to [0, 1]; ``none``);
- the in-plane size and fit mode (``crop``: centre crop/pad, ``resize``: bilinear image, nearest labels).

:func:`build_pipeline` is the one factory of the MONAI transform chain every path uses (training volumes,
evaluation, ``inference.json``, ``fsmis freeze`` and the frozen bundle): ``LoadImaged -> EnsureChannelFirstd ->
Orientationd -> Spacingd -> label map -> intensity -> in-plane fit``. Every spatial step is a MONAI invertible
transform, so ``Invertd`` writes a prediction back in the query file's own geometry.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import NibabelReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ResizeWithPadOrCropd,
    Resized,
    Spacingd,
)

from fsmis_monai.io import FsmisInputError, read_json, volume_shape, write_json

Normalization = Literal["volume", "global", "slice_minmax", "none"]
FitMode = Literal["crop", "resize"]
NORMALIZATIONS: tuple[str, ...] = ("volume", "global", "slice_minmax", "none")
CONTRACT_FILE = "data_contract.json"
#: spacings that agree within this (mm) are the same grid (MONAI skips resampling within AFFINE_TOL = 1e-3)
SPACING_TOL = 1e-3

__all__ = ["DataContract", "build_pipeline", "contract_path", "save_contract", "load_contract",
           "contract_from_scans", "resolve_support_class", "NORMALIZATIONS", "network_image_size"]


@dataclass(frozen=True)
class DataContract:
    """How scans are prepared for one trained network (see the module docstring). JSON via :meth:`to_dict`."""

    class_names: Mapping[int, str] = field(default_factory=dict)
    label_map: Optional[Mapping[int, int]] = None
    dataset: Optional[str] = None
    orientation: Optional[str] = None
    spacing: Optional[tuple[float, float, float]] = None
    slice_axis: int = 2
    normalization: Normalization = "volume"
    mean: Optional[float] = None
    std: Optional[float] = None
    image_size: Optional[tuple[int, int]] = None
    fit_mode: FitMode = "crop"

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.normalization == "global" and (self.mean is None or not self.std or self.std <= 0):
            raise ValueError("normalization='global' needs the training scans' mean and a positive std")
        if self.fit_mode not in ("crop", "resize"):
            raise ValueError(f"fit_mode must be 'crop' or 'resize', got {self.fit_mode!r}")
        if self.slice_axis != 2:  # the slice inferers and volumes cut along the last spatial axis
            raise ValueError(f"slice_axis must be 2 (the last spatial axis after orientation), got {self.slice_axis}")
        if self.orientation is not None and len(self.orientation) != 3:
            raise ValueError(f"orientation must be 3 axis codes such as 'RAS', got {self.orientation!r}")

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def for_dataset(cls, dataset: Optional[str], **kwargs: Any) -> "DataContract":
        """A contract with the registry's label map and class names of ``dataset`` (``None``, ``"none"`` or
        ``""``: a user's own data, any raw label value is a class; the spelling a command line can pass)."""
        from fsmis_monai.data.registry import get_dataset

        desc = get_dataset(dataset)
        if desc.own_data:
            return cls(**kwargs)
        return cls(class_names=dict(desc.label_names), label_map=dict(desc.raw_label_map), dataset=desc.key, **kwargs)

    def replace(self, **changes: Any) -> "DataContract":
        return dataclasses.replace(self, **changes)

    def with_labels_of(self, dataset: Optional[str]) -> "DataContract":
        """This contract reading label files of ``dataset`` (its label map and names); ``None``: a user's own
        masks, any raw value is a class. The image preparation is unchanged."""
        labels = DataContract.for_dataset(dataset)
        return self.replace(class_names=labels.class_names, label_map=labels.label_map, dataset=labels.dataset)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["class_names"] = {str(k): v for k, v in self.class_names.items()}
        d["label_map"] = None if self.label_map is None else {str(k): int(v) for k, v in self.label_map.items()}
        d["spacing"] = None if self.spacing is None else [float(s) for s in self.spacing]
        d["image_size"] = None if self.image_size is None else [int(s) for s in self.image_size]
        return {"format": "fsmis-data-contract/1", **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataContract":
        d = {k: v for k, v in d.items() if k != "format"}
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown data contract keys {sorted(unknown)}")
        d["class_names"] = {int(k): str(v) for k, v in (d.get("class_names") or {}).items()}
        if d.get("label_map") is not None:
            d["label_map"] = {int(k): int(v) for k, v in d["label_map"].items()}
        for key in ("spacing", "image_size"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    # ---------------------------------------------------------------------------------- labels

    def known_classes(self) -> str:
        """``"200 -> 1 lv_myocardium, ..."``, for error messages."""
        if self.label_map is None:
            return "any raw value (own data, no dataset)"
        return ", ".join(f"{raw} -> {c} {self.class_names.get(c, '?')}" for raw, c in sorted(self.label_map.items())
                         if c != 0)


def contract_path(model_path: str | os.PathLike[str]) -> Path:
    """``models/model.pt`` -> ``models/data_contract.json`` (the contract lives beside the weights)."""
    p = Path(model_path)
    return (p if p.is_dir() else p.parent) / CONTRACT_FILE


def save_contract(contract: DataContract, model_path: str | os.PathLike[str]) -> Path:
    """Write ``contract`` atomically beside ``model_path`` (a weights file or its folder). A file that already
    holds the same contract is left as it is (a resumed or refused run rewrites nothing)."""
    path, record = contract_path(model_path), contract.to_dict()
    if path.is_file():
        try:
            if read_json(path) == json.loads(json.dumps(record)):
                return path
        except (OSError, ValueError):
            pass  # unreadable: replaced below
    return write_json(path, record)


def network_image_size(model_path: Optional[str | os.PathLike[str]], image_size: int) -> list[int]:
    """``[H, W]`` to build a network whose layers depend on the slice size (GMRD) at: the ``image_size`` of the
    contract saved beside ``model_path`` (the size it was trained at, e.g. ``--image_size 128``), else
    ``[image_size, image_size]`` (no weights, or weights without a contract). Used by evaluation and inference
    alike, so a network is built as it was trained whatever ``image_size`` the command gives."""
    saved = load_contract(model_path, default=DataContract()).image_size if model_path else None
    return [int(s) for s in saved] if saved is not None else [int(image_size), int(image_size)]


def load_contract(model_path: str | os.PathLike[str], default: Optional[DataContract] = None) -> DataContract:
    """The contract saved beside ``model_path``; ``default`` when there is none (a model trained before
    contracts were saved), else an error naming the file."""
    path = contract_path(model_path)
    if not path.is_file():
        if default is not None:
            return default
        raise FsmisInputError(f"{path}: no data contract beside the model; retrain or write one with save_contract")
    try:
        return DataContract.from_dict(read_json(path))
    except (ValueError, TypeError) as e:
        raise FsmisInputError(f"{path}: not a valid data contract ({e})") from e


def contract_from_scans(image_files: Sequence[str | os.PathLike[str]], dataset: Optional[str],
                        normalization: Normalization = "volume", image_size: Optional[Sequence[int]] = None,
                        fit_mode: FitMode = "crop") -> DataContract:
    """The contract of a network trained on ``image_files`` (read from their headers and voxels).

    Orientation: the scans' common axis codes (``None`` when they differ: slices are then cut along the
    stored last axis, as in the oblique MS-CMRSeg scans). Spacing: their common spacing, else the dataset's
    target spacing. ``global`` normalisation: mean/std over every voxel of these scans.
    """
    import nibabel as nib

    if not image_files:
        raise ValueError("no training scans to derive a data contract from")
    headers = [CheckedNibabelReader().read(str(f)) for f in image_files]
    codes = {"".join(nib.aff2axcodes(h.affine)) for h in headers}
    orientation = codes.pop() if len(codes) == 1 else None
    spacings = []
    for h in headers:
        affine = h.affine
        if orientation is not None:  # the spacing along the array axes after orientation
            ornt = nib.orientations.io_orientation(affine)
            affine = affine @ nib.orientations.inv_ornt_aff(ornt, h.shape[:3])
            affine = affine[:, [int(a) for a in ornt[:, 0].argsort()] + [3]]
        spacings.append(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))
    spacings = np.asarray(spacings)
    if np.all(np.abs(spacings - spacings[0]) <= SPACING_TOL):
        spacing: Optional[tuple] = tuple(float(round(s, 6)) for s in spacings[0])
    else:  # the benchmark's target spacing; own data (dataset none): each scan keeps its own
        from fsmis_monai.data.registry import get_dataset

        desc = get_dataset(dataset)
        spacing = None if desc.own_data else tuple(float(s) for s in desc.target_spacing)
    stats: dict[str, float] = {}
    if normalization == "global":
        from fsmis_monai.data.datalist import ScanFiles
        from fsmis_monai.data.volumes import intensity_stats

        s = intensity_stats([ScanFiles(i, Path(f)) for i, f in enumerate(image_files)])
        stats = {"mean": s.mean, "std": s.std}
    size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    return DataContract.for_dataset(dataset, orientation=orientation, spacing=spacing, normalization=normalization,
                                    image_size=size, fit_mode=fit_mode, **stats)


# ----------------------------------------------------------------------------------- transforms


def _source(data: Mapping, key: str) -> str:
    meta = getattr(data.get(key), "meta", {}) or {}
    return str(meta.get("filename_or_obj", key))


class CheckImaged(MapTransform):
    """Refuse what the network cannot take: not one 3D volume (:func:`fsmis_monai.io.volume_shape`: a 4D file of
    several volumes is refused, ``(X, Y, Z, 1)`` taken), NaN/inf, or a constant image to z-score (MONAI's
    ``NormalizeIntensity`` would silently divide by 1). One-line error naming the file."""

    def __init__(self, keys: KeysCollection, zscore: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.zscore = zscore

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim != 4:
                raise FsmisInputError(f"{_source(d, key)}: expected a 3D volume, got shape {tuple(img.shape[1:])}")
            volume_shape((*img.shape[1:], img.shape[0]), _source(d, key))  # channels = the file's 4th axis
            if not torch.isfinite(torch.as_tensor(img)).all():
                raise FsmisInputError(f"{_source(d, key)}: image contains NaN or infinite values")
            if self.zscore and not float(torch.as_tensor(img).float().std()) > 0:
                raise FsmisInputError(f"{_source(d, key)}: constant image (standard deviation 0), cannot z-score it")
        return d


class CheckLabelsd(MapTransform):
    """Label values must be integers and, with a label map, known; errors name the file, the values found and
    the classes known (MONAI's ``MapLabelValue`` would pass unknown values through). The values are found with
    the recipes' :func:`~fsmis_monai.transforms.checks.label_values` (a histogram, not a sort of the volume)."""

    def __init__(self, keys: KeysCollection, contract: DataContract, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.contract = contract

    def __call__(self, data: Mapping) -> dict:
        from fsmis_monai.transforms.checks import label_values

        d = dict(data)
        for key in self.key_iterator(d):
            if not torch.isfinite(torch.as_tensor(d[key])).all():
                raise FsmisInputError(f"{_source(d, key)}: label contains NaN or infinite values")
            ints, fractional = label_values(d[key])
            if fractional.size:
                raise FsmisInputError(f"{_source(d, key)}: label values must be integers, found "
                                      f"{sorted(set(ints.tolist()) | set(fractional.tolist()))[:8]}")
            found = ints.tolist()
            if self.contract.label_map is not None:
                unknown = sorted(int(v) for v in found if int(v) not in self.contract.label_map)
                if unknown:
                    raise FsmisInputError(
                        f"{_source(d, key)}: label values {unknown} are not in the {self.contract.dataset} label map "
                        f"(values found: {[int(v) for v in found]}; known: {self.contract.known_classes()}); for "
                        "your own masks choose no dataset (--dataset_name none) and give the raw value")
        return d


class SliceMinMaxd(MapTransform):
    """Each slice (last spatial axis) scaled to [0, 1] (LSLPN's normalisation). Hand-written: MONAI's
    ``ScaleIntensity`` scales whole channels, not slices."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            dims = tuple(range(img.ndim - 1))
            lo = img.amin(dim=dims, keepdim=True)
            hi = img.amax(dim=dims, keepdim=True)
            d[key] = (img - lo) / torch.clamp(hi - lo, min=1e-8)
        return d


class CheckedNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` whose failures (missing, empty, not NIfTI, truncated) are one-line
    :class:`~fsmis_monai.io.FsmisInputError` naming the file, as :func:`fsmis_monai.io.load_nifti` reports them."""

    def read(self, data: Any, **kwargs: Any):
        names = list(data) if isinstance(data, (list, tuple)) else [data]
        for name in names:
            p = Path(name)
            if not p.is_file():
                raise FsmisInputError(f"{p}: file not found")
            if p.stat().st_size == 0:
                raise FsmisInputError(f"{p}: file is empty (0 bytes)")
        try:
            return super().read(data, **kwargs)
        except Exception as e:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, OSError)
            raise FsmisInputError(f"{', '.join(map(str, names))}: cannot read as NIfTI ({type(e).__name__}: {e})") from e

    def _get_array_data(self, img: Any, filename: Any) -> np.ndarray:
        try:
            return super()._get_array_data(img, filename)
        except Exception as e:
            raise FsmisInputError(f"{filename}: cannot read as NIfTI ({type(e).__name__}: {e})") from e


class Pipeline(Compose):
    """MONAI ``Compose`` that lets this toolkit's one-line input errors through: MONAI wraps any exception of a
    transform in a ``RuntimeError`` ("applying transform ..."), which would bury the file name and problem."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except RuntimeError as e:
            cause = e
            while cause is not None and not isinstance(cause, FsmisInputError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            raise


class LoadNiftid(LoadImaged):
    """``LoadImaged`` that reads with :class:`CheckedNibabelReader` only (given a reader, MONAI's ``LoadImage``
    would try every registered reader in turn and replace the error by "cannot find a suitable reader")."""

    def __init__(self, keys: KeysCollection, **kwargs: Any) -> None:
        super().__init__(keys, **kwargs)
        self.checked_reader = CheckedNibabelReader()

    def __call__(self, data: Mapping, reader: Any = None) -> dict:
        return super().__call__(data, reader or self.checked_reader)


def loader(keys: Sequence[str]) -> "Pipeline":
    """``LoadImaged -> EnsureChannelFirstd`` for ``keys`` (stored dtype kept): the first stage of
    :func:`build_pipeline`, separate so callers can check what was read (label values, geometry) first.
    Built once per process and key set: MONAI's ``LoadImage`` instantiates every registered reader when it is
    built (each unavailable optional one logs a line), so one per scan would repeat that per scan."""
    return _loader(tuple(keys))


@functools.lru_cache(maxsize=None)
def _loader(keys: Tuple[str, ...]) -> "Pipeline":
    return Pipeline([LoadNiftid(list(keys), image_only=True, dtype=None), EnsureChannelFirstd(list(keys))])


def build_pipeline(
    contract: DataContract,
    image_key: str = "image",
    label_key: Optional[str] = None,
    mask_keys: Sequence[str] = (),
    load: bool = True,
) -> Pipeline:
    """The MONAI transforms that turn files into the network's input grid under ``contract``.

    ``image_key`` (bilinear) and ``label_key`` (nearest; the contract's label map applied, unknown values
    refused) and ``mask_keys`` (nearest, values kept: pseudolabels, a user's raw masks) go through
    ``LoadImaged -> EnsureChannelFirstd`` (with ``load``; else the dict holds channel-first MetaTensors)
    ``-> Orientationd -> Spacingd -> label map -> intensity -> in-plane fit -> float32``. Output: MetaTensors
    ``[1, H, W, D]`` (slice ``z`` = ``[..., z]``) whose ``applied_operations`` ``Invertd`` undoes.
    """
    labels = ([label_key] if label_key else []) + list(mask_keys)
    keys = [image_key] + labels
    modes = ["bilinear"] + ["nearest"] * len(labels)
    xforms: list = []
    if load:
        xforms += list(loader(keys).transforms)
    xforms.append(CheckImaged(image_key, zscore=contract.normalization == "volume"))
    if label_key:
        xforms.append(CheckLabelsd(label_key, contract))
    xforms.append(EnsureTyped(image_key, dtype=torch.float32, track_meta=True))
    if contract.orientation is not None:
        xforms.append(Orientationd(keys, axcodes=contract.orientation, labels=None))
    if contract.spacing is not None:
        xforms.append(Spacingd(keys, pixdim=contract.spacing, mode=modes, dtype=torch.float32))
    if label_key and contract.label_map is not None:
        raw = sorted(contract.label_map)
        xforms.append(MapLabelValued(label_key, orig_labels=raw, target_labels=[contract.label_map[r] for r in raw]))
    if contract.normalization == "volume":
        xforms.append(NormalizeIntensityd(image_key))
    elif contract.normalization == "global":
        xforms.append(NormalizeIntensityd(image_key, subtrahend=contract.mean, divisor=contract.std))
    elif contract.normalization == "slice_minmax":
        xforms.append(SliceMinMaxd(image_key))
    if contract.image_size is not None:
        size = (int(contract.image_size[0]), int(contract.image_size[1]), -1)
        if contract.fit_mode == "crop":
            xforms.append(ResizeWithPadOrCropd(keys, spatial_size=size))
        else:
            xforms.append(Resized(keys, spatial_size=size, mode=["trilinear"] + ["nearest"] * len(labels),
                                  anti_aliasing=False))
    xforms.append(EnsureTyped(image_key, dtype=torch.float32, track_meta=True))
    return Pipeline(xforms)


def resolve_support_class(contract: DataContract, support_class: int | str, label_file: Any,
                          values_found: Sequence[int]) -> tuple[str, int]:
    """Which key and value select the support class: ``("label", class id)`` (class id after the label map)
    or ``("mask", raw value)`` (own data, no label map).

    ``support_class`` is a class name (needs a dataset) or a raw label value as stored in the file (e.g.
    ``200`` for the released MS-CMRSeg myocardium). Errors name the file, the values found and the classes known.
    """
    found = sorted(int(v) for v in values_found)
    text = str(support_class).strip()
    is_value = text.lstrip("-").isdigit()
    where = f"{label_file}: support class {support_class!r}"
    if contract.label_map is None:
        if not is_value:
            raise FsmisInputError(f"{where} is a name, but there is no dataset to name classes; give a raw label "
                                  f"value (values found: {found})")
        value = int(text)
        if value not in found or value == 0:
            raise FsmisInputError(f"{where}: no voxel has that value (values found: {found})")
        return "mask", value
    if is_value:
        raw = int(text)
        if raw not in contract.label_map or contract.label_map[raw] == 0:
            raise FsmisInputError(f"{where} is not a raw label value of {contract.dataset} (values found: {found}; "
                                  f"known: {contract.known_classes()}); for your own masks choose no dataset "
                                  "(--dataset_name none)")
        class_id = contract.label_map[raw]
    else:
        ids = [c for c, n in contract.class_names.items() if n.lower() == text.lower() and c != 0]
        if not ids:
            raise FsmisInputError(f"{where} is not a class of {contract.dataset} (values found: {found}; "
                                  f"known: {contract.known_classes()})")
        class_id = ids[0]
    if not any(contract.label_map.get(v) == class_id for v in found):
        raise FsmisInputError(f"{where}: no voxel has that class (values found: {found}; known: "
                              f"{contract.known_classes()})")
    return "label", class_id

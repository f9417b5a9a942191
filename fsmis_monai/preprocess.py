"""Run a preprocessing recipe (``preprocessing/<dataset>.yaml``) over a raw download.

A recipe is data: where the raw files are (glob patterns with an ``{id}`` placeholder), which MONAI
reader loads them, which label values are allowed and how they map to canonical ids, and an ordered
list of steps. :func:`build_transform` turns it into one MONAI ``Compose`` of dictionary transforms;
:func:`run_preprocessing` pairs the raw files by id, runs the Compose per scan (optionally in a process
pool), writes ``image_<id>.nii.gz`` / ``label_<id>.nii.gz`` atomically, and then the per-class slice
index ``classmap.json`` and ``dataset_summary.json`` of the output folder.

A scan that fails is reported with the file at fault and writes nothing; the others still run.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fsmis_monai.data.scan_pool import map_scans
from fsmis_monai.io import FsmisInputError, input_error_in, load_nifti, save_nifti, write_json

RECIPE_DIR_ENV = "FSMIS_RECIPES"
IMAGE, LABEL = "image", "label"
STEP_NAMES = ("orientation", "clip_percentile", "window", "crop_border", "resample", "crop_or_pad")


# ------------------------------------------------------------------------------------------ recipes


def recipe_dirs() -> list[Path]:
    """Folders searched for a recipe given by short name: ``$FSMIS_RECIPES``, then the project's ``preprocessing/``
    (:func:`fsmis_monai.resources.shipped_dir`: the clone's, or the copy inside an installed package)."""
    from fsmis_monai.resources import shipped_dir

    dirs = [Path(p) for p in os.environ.get(RECIPE_DIR_ENV, "").split(os.pathsep) if p]
    try:
        return dirs + [shipped_dir("preprocessing")]
    except FsmisInputError:
        return dirs


def resolve_recipe(name_or_path: str | os.PathLike[str]) -> Path:
    """A recipe file from a path or a short name (``chaos_mr_t2``, or a registry alias such as ``chaos``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    names = [p.stem]
    try:
        from fsmis_monai.data.registry import get_dataset

        names.append(get_dataset(p.stem).key)
    except KeyError:
        pass
    for d in recipe_dirs():
        for n in names:
            if (d / f"{n}.yaml").is_file():
                return d / f"{n}.yaml"
    known = sorted({f.stem for d in recipe_dirs() if d.is_dir() for f in d.glob("*.yaml")})
    raise FsmisInputError(f"{name_or_path}: recipe not found (not a file; known recipes: {known})")


def load_recipe(name_or_path: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Read and check a recipe; returns it as a plain dict (picklable, so workers can rebuild the Compose)."""
    import yaml

    if isinstance(name_or_path, Mapping):
        recipe, where = dict(name_or_path), "<recipe>"
    else:
        path = resolve_recipe(name_or_path)
        where = str(path)
        try:
            recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise FsmisInputError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(recipe, dict):
        raise FsmisInputError(f"{where}: a recipe is a mapping with keys name, raw, labels, steps")
    for key in ("name", "raw", "steps"):
        if key not in recipe:
            raise FsmisInputError(f"{where}: recipe misses the key {key!r}")
    raw = recipe["raw"]
    for key in ("image", "label"):
        if "{id}" not in str(raw.get(key, "")):
            raise FsmisInputError(f"{where}: raw.{key} must be a pattern holding '{{id}}', got {raw.get(key)!r}")
    for step in recipe["steps"]:
        if not (isinstance(step, dict) and len(step) == 1 and next(iter(step)) in STEP_NAMES):
            raise FsmisInputError(f"{where}: each step is one of {STEP_NAMES} with its parameters, got {step!r}")
    recipe.setdefault("labels", {})
    recipe["_source"] = where
    return recipe


def label_table(recipe: Mapping[str, Any], keep_raw: bool | None = None) -> tuple[list[int] | None, dict[int, int], dict[int, str]]:
    """``(allowed raw values, raw -> written value map, written value -> class name)`` of a recipe.

    ``labels.map`` lists every allowed raw value with its canonical id; without it any integer is allowed
    and kept. ``labels.keep_raw`` (or ``keep_raw``) writes the raw values but still checks them.
    """
    labels = recipe.get("labels") or {}
    keep = bool(labels.get("keep_raw", False)) if keep_raw is None else keep_raw
    mapping = {int(k): int(v) for k, v in (labels.get("map") or {}).items()}
    names: dict[int, str] = {}
    if recipe.get("dataset"):
        from fsmis_monai.data.registry import get_dataset

        names.update(get_dataset(recipe["dataset"]).label_names)
    names.update({int(k): str(v) for k, v in (labels.get("names") or {}).items()})
    if not mapping:
        return None, {}, names
    if keep:
        names = {raw: names.get(canon, f"class_{canon}") for raw, canon in mapping.items()}
        return sorted(mapping), {}, names
    return sorted(mapping), mapping, names


def build_transform(recipe: Mapping[str, Any], faithful: bool = False, keep_raw: bool | None = None):
    """The MONAI ``Compose`` of a recipe: checked loading, label checks and mapping, then its steps.

    ``faithful=True`` resamples like the reference notebooks (labels per class linear + round, size rule
    ``int(n * s / t + 1)``); the default uses nearest-neighbour labels and MONAI's extent rule.
    """
    from monai.transforms import (
        ClipIntensityPercentilesd,
        Compose,
        EnsureTyped,
        MapLabelValued,
        Orientationd,
        ScaleIntensityd,
        ScaleIntensityRanged,
    )

    from fsmis_monai.transforms import (
        CheckedLoadImaged,
        CheckLabelValuesd,
        CheckSameShaped,
        CropBorderd,
        CropOrPadInPlaned,
        LoadChaosPngLabeld,
        ResampleToSpacingd,
    )

    raw = recipe["raw"]
    both = [IMAGE, LABEL]
    transforms: list[Callable] = [CheckedLoadImaged(IMAGE, reader=raw.get("image_reader"), finite_keys=IMAGE)]
    if raw.get("label_reader") == "chaos_png":
        png = raw.get("chaos_png") or {}
        transforms.append(LoadChaosPngLabeld(LABEL, ref_key=IMAGE, grey_ranges=png.get("grey_ranges"),
                                             flip_rows=bool(png.get("flip_rows", False))))
    else:
        transforms.append(CheckedLoadImaged(LABEL, reader=raw.get("label_reader")))
    allowed, mapping, _ = label_table(recipe, keep_raw)
    transforms += [CheckSameShaped(both), CheckLabelValuesd(LABEL, allowed)]
    if mapping and any(k != v for k, v in mapping.items()):
        transforms.append(MapLabelValued(LABEL, list(mapping), list(mapping.values())))

    for step in recipe["steps"]:
        (name, params), = step.items()
        params = dict(params or {})
        if name == "orientation":
            transforms.append(Orientationd(both, axcodes=params["axcodes"], labels=(("L", "R"), ("P", "A"), ("I", "S"))))
        elif name == "clip_percentile":
            transforms.append(ClipIntensityPercentilesd(IMAGE, lower=params.get("lower"), upper=params.get("upper")))
        elif name == "window":
            (a, b), (lo, hi) = params["range"], params.get("output", params["range"])
            if params.get("rescale", "volume") == "volume":  # reference: clip to the window, then min-max per volume
                transforms += [ScaleIntensityRanged(IMAGE, a_min=a, a_max=b, b_min=a, b_max=b, clip=True),
                               ScaleIntensityd(IMAGE, minv=lo, maxv=hi)]
            else:  # fixed window -> output mapping, the same for every volume
                transforms.append(ScaleIntensityRanged(IMAGE, a_min=a, a_max=b, b_min=lo, b_max=hi, clip=True))
        elif name == "crop_border":
            transforms.append(CropBorderd(both, params["border"]))
        elif name == "resample":
            transforms.append(ResampleToSpacingd(
                both, label_keys=LABEL, spacing=params.get("spacing"), size=params.get("size"),
                size_rule="reference" if faithful else params.get("size_rule", "extent"),
                label_mode="per_class_linear" if faithful else params.get("label_mode", "nearest")))
        elif name == "crop_or_pad":
            transforms.append(CropOrPadInPlaned(both, params["size"], label_keys=LABEL))
    transforms.append(EnsureTyped(both, data_type="tensor", track_meta=True))
    return Compose(transforms)


# --------------------------------------------------------------------------------------- raw files


@dataclass(frozen=True)
class RawScan:
    """One raw scan: its id in the raw layout, the id it is written under, and its files."""

    raw_id: int
    out_id: int
    image: str
    label: str


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = [re.escape(p).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*") for p in pattern.split("{id}")]
    return re.compile("^" + r"(?P<id>\d+)".join(parts) + "$")


def _find(src: Path, pattern: str) -> dict[int, Path]:
    regex = _pattern_regex(pattern)
    found: dict[int, Path] = {}
    for p in sorted(src.glob(pattern.replace("{id}", "*"))):
        m = regex.match(p.relative_to(src).as_posix())
        if m is None:
            continue
        sid = int(m.group("id"))
        if sid in found:
            raise FsmisInputError(f"{p}: a second file for raw scan {sid} (first: {found[sid]})")
        found[sid] = p
    return found


def find_raw_scans(recipe: Mapping[str, Any], src: str | os.PathLike[str]) -> list[RawScan]:
    """Pair the recipe's image and label patterns under ``src`` by id; unpaired files are an error naming them."""
    src = Path(src)
    if not src.is_dir():
        raise FsmisInputError(f"{src}: raw data folder not found")
    raw = recipe["raw"]
    images, labels = _find(src, raw["image"]), _find(src, raw["label"])
    if not images:
        raise FsmisInputError(f"{src}: no raw image matches the pattern {raw['image']!r} of recipe {recipe['name']}")
    problems = [f"{images[i]}: no matching label ({raw['label'].replace('{id}', str(i))})"
                for i in sorted(set(images) - set(labels))]
    problems += [f"{labels[i]}: no matching image ({raw['image'].replace('{id}', str(i))})"
                 for i in sorted(set(labels) - set(images))]
    id_map = {int(k): int(v) for k, v in (raw.get("ids") or {}).items()}
    if id_map:
        problems += [f"{images[i]}: raw id {i} is not in the recipe's id table" for i in sorted(images) if i not in id_map]
    if problems:
        raise FsmisInputError("raw file pairing failed:\n  " + "\n  ".join(problems))
    return [RawScan(i, id_map.get(i, i), str(images[i]), str(labels[i])) for i in sorted(images)]


# ------------------------------------------------------------------------------------ one scan


def output_paths(dst: str | os.PathLike[str], out_id: int) -> tuple[Path, Path]:
    return Path(dst) / f"image_{out_id}.nii.gz", Path(dst) / f"label_{out_id}.nii.gz"


def slice_index(label: np.ndarray, classes: Sequence[int], min_pixels: int = 1) -> dict[int, list[int]]:
    """Slices (last axis) holding at least ``min_pixels`` voxels **of each class** (methods.md 1.3, 8.3).

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


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ whole run


@dataclass
class PreprocessReport:
    """What a run did: per-scan statistics of the finished scans and the error of each failed one."""

    scans: dict[int, dict[str, Any]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    classmap_path: Path | None = None
    summary_path: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


def run_preprocessing(recipe: str | os.PathLike[str] | Mapping[str, Any], src: str | os.PathLike[str],
                      dst: str | os.PathLike[str], workers: int = 1, overwrite: bool = False, faithful: bool = False,
                      keep_raw: bool | None = None, min_pixels: int | None = None, progress: bool = True,
                      ids: Sequence[int] | None = None) -> PreprocessReport:
    """Preprocess every raw scan of ``src`` into ``dst``; see the module docstring.

    ``workers > 1`` runs scans in a process pool (:func:`~fsmis_monai.data.scan_pool.map_scans`, forked where
    possible, one torch thread per worker as in DataLoader workers, which keeps forking after OpenMP use safe).
    ``min_pixels`` (default: the recipe's ``classmap.min_pixels``, else 1) is the class pixel count a
    slice needs to enter ``classmap.json``. ``ids`` restricts the run to these raw ids.
    """
    recipe = load_recipe(recipe)
    if min_pixels is None:
        min_pixels = int((recipe.get("classmap") or {}).get("min_pixels", 1))
    scans = find_raw_scans(recipe, src)
    if ids is not None:
        wanted = {int(i) for i in ids}
        scans = [s for s in scans if s.raw_id in wanted]
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    report = PreprocessReport()
    job = functools.partial(preprocess_scan, recipe, dst=str(dst), overwrite=overwrite, faithful=faithful,
                            keep_raw=keep_raw, min_pixels=min_pixels)
    for outcome in map_scans(job, scans, source=lambda s: s.image, workers=workers, progress=progress,
                             desc=f"preprocess {recipe['name']}", initializer=_worker_init):
        if outcome.ok:
            report.scans[outcome.job.out_id] = outcome.value
        else:
            report.failed[outcome.job.out_id] = outcome.error
    _, _, names = label_table(recipe, keep_raw)
    report.classmap_path, report.summary_path = write_indexes(dst, recipe, report, names, faithful, min_pixels)
    return report


def write_indexes(dst: Path, recipe: Mapping[str, Any], report: PreprocessReport, names: Mapping[int, str],
                  faithful: bool, min_pixels: int) -> tuple[Path, Path]:
    """Write ``classmap.json`` ({class_name: {scan_id: [slices]}}) and ``dataset_summary.json`` into ``dst``."""
    ids = sorted(report.scans)
    classes = sorted({c for s in report.scans.values() for c in s["slices"]})
    name = {c: names.get(c, f"class_{c}") for c in classes}
    classmap = {name[c]: {str(i): report.scans[i]["slices"].get(c, []) for i in ids} for c in classes}
    per_scan = {}
    for i in ids:
        s = report.scans[i]
        per_scan[str(i)] = {
            "raw_id": s["raw_id"], "status": s["status"], "shape": s["shape"], "spacing": s["spacing"],
            "orientation": s["orientation"], "intensity_range": s["intensity_range"],
            "voxels_per_class": {name[c]: s["voxels_per_class"].get(c, 0) for c in classes},
            "slices_per_class": {name[c]: len(s["slices"].get(c, [])) for c in classes},
        }
    summary = {
        "recipe": recipe["name"],
        "recipe_file": recipe.get("_source"),
        "faithful": faithful,
        "classmap_min_pixels": min_pixels,
        "num_scans": len(ids),
        "classes": {str(c): name[c] for c in classes},
        "totals": {
            "voxels_per_class": {name[c]: sum(p["voxels_per_class"][name[c]] for p in per_scan.values()) for c in classes},
            "slices_per_class": {name[c]: sum(p["slices_per_class"][name[c]] for p in per_scan.values()) for c in classes},
        },
        "scans": per_scan,
        "failed": {str(k): v for k, v in sorted(report.failed.items())},
    }
    return write_json(dst / "classmap.json", classmap), write_json(dst / "dataset_summary.json", summary)

"""Preprocessing recipes (``preprocessing/<dataset>.yaml``): find, read and check one, and turn it into
one MONAI ``Compose`` of dictionary transforms (:func:`build_transform`).

A recipe is data: where the raw files are (glob patterns with an ``{id}`` placeholder), which MONAI
reader loads them, which label values are allowed and how they map to canonical ids, and an ordered
list of steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from fsmis_monai.io import FsmisInputError

RECIPE_DIR_ENV = "FSMIS_RECIPES"
IMAGE, LABEL = "image", "label"
STEP_NAMES = ("orientation", "clip_percentile", "window", "crop_border", "resample", "crop_or_pad")


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

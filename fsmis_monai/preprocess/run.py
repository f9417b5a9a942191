"""A whole preprocessing run: every raw scan of a folder (optionally in a process pool), then the per-class
slice index ``classmap.json`` and ``dataset_summary.json`` of the output folder."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from fsmis_monai.data.scan_pool import map_scans
from fsmis_monai.io import write_json
from fsmis_monai.preprocess.raw_files import find_raw_scans
from fsmis_monai.preprocess.recipes import label_table, load_recipe
from fsmis_monai.preprocess.scan import preprocess_scan


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


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

"""Pseudolabels for every ``image_<id>`` of a folder: 3D supervoxels or 2D superpixels.

Scans are paired by the id in their file name (:func:`fsmis_monai.data.datalist.pair_scans`), processed
one volume per job (:func:`fsmis_monai.data.scan_pool.map_scans`), written atomically with the image's
geometry as ``superpix-MIDDLE_<id>.nii.gz`` and summarised in ``<kind>_summary.json`` (count, median
size and time per scan). A scan that fails is reported in the summary; the others still finish.
``fsmis supervoxels`` / ``fsmis superpixels`` and the bundles' :func:`fsmis_monai.engines.ensure_pseudolabels`
call these functions.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from fsmis_monai.io import FsmisInputError

__all__ = ["OUTPUT_PATTERN", "label_stats", "run_pseudolabel_folder", "superpixel_folder", "supervoxel_folder"]

OUTPUT_PATTERN = "superpix-MIDDLE_{id}.nii.gz"


def label_stats(labels: np.ndarray, per_slice: bool) -> dict[str, Any]:
    """Number of labelled regions (per axial slice when ids are per slice) and their median size (voxels)."""
    inside = labels != 0
    if per_slice:
        keys = labels.astype(np.int64) * labels.shape[2] + np.arange(labels.shape[2])[None, None, :]
        _, sizes = np.unique(keys[inside], return_counts=True)
    else:
        _, sizes = np.unique(labels[inside], return_counts=True)
    return {"regions": int(sizes.size), "median_size": float(np.median(sizes)) if sizes.size else 0.0}


def _process_scan(job: tuple[int, Path, Path], compute: Callable, kind: str, per_slice: bool) -> dict[str, Any]:
    """Load, compute, write one scan; raises ``FsmisInputError`` naming the image."""
    from fsmis_monai.io import load_nifti, save_nifti, volume_shape

    scan_id, image, output = job
    data, img = load_nifti(image)
    data = data.reshape(volume_shape(data.shape, image))  # (X, Y, Z, 1) taken, as every command takes it
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    try:
        labels = compute(data, spacing)
    except FsmisInputError as e:
        raise FsmisInputError(f"{image}: {e}") from e
    save_nifti(output, labels, affine=img.affine, dtype=np.int32)
    stats = label_stats(labels, per_slice)
    return {kind: stats["regions"], "median_size": stats["median_size"]}


def _previous_ok(summary_path: Path) -> dict[int, dict]:
    from fsmis_monai.io import read_json

    if not summary_path.is_file():
        return {}
    try:
        return {int(s["id"]): s for s in read_json(summary_path).get("scans", []) if s.get("status") == "ok"}
    except (FsmisInputError, AttributeError, KeyError, TypeError, ValueError):
        return {}


def run_pseudolabel_folder(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    compute: Callable[[np.ndarray, tuple], np.ndarray],
    *,
    kind: str,
    parameters: dict[str, Any],
    workers: int = 1,
    overwrite: bool = False,
    per_slice: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Apply ``compute(image, spacing) -> labels`` to every scan of ``src``; return the summary written.

    ``compute`` must be picklable (a module-level function or a ``functools.partial`` of one). Outputs
    that exist are kept unless ``overwrite``. The summary (``dst/<kind>_summary.json``) lists every scan
    with ``status`` ``"ok"`` or ``"failed"`` (then ``error``: ``"<file>: <problem>"``).

    Raises:
        FsmisInputError: ``src`` holds no pairable scans, or ``workers < 1``.
    """
    from fsmis_monai.data.datalist import pair_scans
    from fsmis_monai.data.scan_pool import map_scans
    from fsmis_monai.io import write_json

    src, dst = Path(src), Path(dst)
    scans = pair_scans(src, require_labels=False)
    dst.mkdir(parents=True, exist_ok=True)
    summary_path = dst / f"{kind}_summary.json"
    previous = _previous_ok(summary_path)

    entries: dict[int, dict] = {}
    todo = []
    for scan in scans:
        output = dst / OUTPUT_PATTERN.format(id=scan.scan_id)
        if output.exists() and not overwrite:
            entries[scan.scan_id] = {**previous.get(scan.scan_id, {"id": scan.scan_id, "output": str(output)}),
                                     "status": "ok", "skipped": "output exists (use --overwrite)"}
        else:
            todo.append((scan.scan_id, scan.image, output))

    start = time.perf_counter()
    job = functools.partial(_process_scan, compute=compute, kind=kind, per_slice=per_slice)
    for outcome in map_scans(job, todo, source=lambda j: str(j[1]), workers=workers, desc=kind, progress=progress):
        sid, image, output = outcome.job
        entry: dict[str, Any] = {"id": sid, "image": str(image), "output": str(output)}
        entry.update({"status": "ok", **outcome.value} if outcome.ok else {"status": "failed", "error": outcome.error})
        entries[sid] = {**entry, "seconds": outcome.seconds}

    summary = {
        "command": kind,
        "src": str(src),
        "parameters": parameters,
        "workers": workers,
        "total_seconds": round(time.perf_counter() - start, 3),
        "scans": [entries[s.scan_id] for s in scans],
    }
    write_json(summary_path, summary)
    summary["summary_path"] = str(summary_path)
    return summary


def supervoxel_folder(src: str | os.PathLike[str], dst: str | os.PathLike[str], dataset: Optional[str] = None,
                      min_size: Optional[int] = None, renumber: bool = False, faithful: bool = False,
                      workers: int = 1, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """3D supervoxels (:func:`fsmis_monai.pseudolabels.make_supervoxels`) of every scan of ``src``.

    ``min_size`` None: the dataset's reference value (5000 voxels without a dataset). Returns the summary
    of :func:`run_pseudolabel_folder`.
    """
    from fsmis_monai.data.registry import get_dataset
    from fsmis_monai.pseudolabels import SUPERVOXEL_BODY_THRESHOLD, make_supervoxels

    if min_size is None:
        min_size = get_dataset(dataset).supervoxel_min_size  # no dataset: registry.OWN_DATA's default
    params = {"min_size": int(min_size), "scale": 1.0, "sigma": 0.0, "body_threshold": SUPERVOXEL_BODY_THRESHOLD,
              "renumber": bool(renumber), "faithful": bool(faithful), "dataset": dataset}
    compute = functools.partial(make_supervoxels, min_size=int(min_size), renumber=bool(renumber), faithful=bool(faithful))
    return run_pseudolabel_folder(src, dst, compute, kind="supervoxels", parameters=params, workers=workers,
                                  overwrite=overwrite, progress=progress)


def _superpixels(image: np.ndarray, spacing: tuple, **kwargs: Any) -> np.ndarray:
    """``compute(image, spacing)`` form of :func:`make_superpixels` (2D superpixels ignore the spacing)."""
    from fsmis_monai.pseudolabels import make_superpixels

    return make_superpixels(image, **kwargs)


def superpixel_folder(src: str | os.PathLike[str], dst: str | os.PathLike[str], dataset: Optional[str] = None,
                      min_size: int = 400, sigma: float = 1.0, body_threshold: Optional[float] = None,
                      faithful: bool = False, workers: int = 1, overwrite: bool = False,
                      progress: bool = True) -> dict[str, Any]:
    """2D superpixels (:func:`fsmis_monai.pseudolabels.make_superpixels`, per axial slice) of every scan of ``src``.

    ``body_threshold`` None: the dataset's value (1e-4 without a dataset). The summary counts superpixels
    over all slices.
    """
    from fsmis_monai.data.registry import get_dataset

    if body_threshold is None:
        body_threshold = get_dataset(dataset).superpixel_body_threshold
    params = {"min_size": min_size, "sigma": sigma, "scale": 1.0, "body_threshold": body_threshold,
              "faithful": bool(faithful), "dataset": dataset}
    compute = functools.partial(_superpixels, min_size=min_size, sigma=sigma, body_threshold=body_threshold,
                                faithful=bool(faithful))
    return run_pseudolabel_folder(src, dst, compute, kind="superpixels", parameters=params, workers=workers,
                                  overwrite=overwrite, per_slice=True, progress=progress)

"""Run a preprocessing recipe (``preprocessing/<dataset>.yaml``) over a raw download.

A recipe is data: where the raw files are (glob patterns with an ``{id}`` placeholder), which MONAI
reader loads them, which label values are allowed and how they map to canonical ids, and an ordered
list of steps. :func:`build_transform` turns it into one MONAI ``Compose`` of dictionary transforms;
:func:`run_preprocessing` pairs the raw files by id, runs the Compose per scan (optionally in a process
pool), writes ``image_<id>.nii.gz`` / ``label_<id>.nii.gz`` atomically, and then the per-class slice
index ``classmap.json`` and ``dataset_summary.json`` of the output folder.

A scan that fails is reported with the file at fault and writes nothing; the others still run.
One job per module: :mod:`.recipes`, :mod:`.raw_files`, :mod:`.scan` (one scan), :mod:`.run` (a folder).
"""

from fsmis_monai.preprocess.raw_files import RawScan, find_raw_scans
from fsmis_monai.preprocess.recipes import (
    IMAGE,
    LABEL,
    RECIPE_DIR_ENV,
    STEP_NAMES,
    build_transform,
    label_table,
    load_recipe,
    recipe_dirs,
    resolve_recipe,
)
from fsmis_monai.preprocess.run import PreprocessReport, run_preprocessing, write_indexes
from fsmis_monai.preprocess.scan import output_paths, preprocess_scan, scan_stats, slice_index

__all__ = [
    "IMAGE",
    "LABEL",
    "RECIPE_DIR_ENV",
    "STEP_NAMES",
    "PreprocessReport",
    "RawScan",
    "build_transform",
    "find_raw_scans",
    "label_table",
    "load_recipe",
    "output_paths",
    "preprocess_scan",
    "recipe_dirs",
    "resolve_recipe",
    "run_preprocessing",
    "scan_stats",
    "slice_index",
    "write_indexes",
]

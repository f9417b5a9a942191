"""Preprocessing: the MONAI recipes against a plain SimpleITK implementation of the same steps.

For each recipe (CHAOS DICOM + PNG, CMR NIfTI, Synapse HU NIfTI) a few raw scans are synthesised from
the real scans in ../shared/data (the same synthesis as the tests, tests/_raw_scans.py, at full size),
then every scan is preprocessed, read to written, by

- ``monai``: ``fsmis_monai.preprocess.preprocess_scan`` (the recipe's MONAI Compose, atomic writes);
- ``sitk``: the notebooks' approach written here with SimpleITK + NumPy (series reader, np.percentile,
  sitk.Resample, NumPy crop/pad, sitk.WriteImage), following the same recipe parameters.

Both run in this process, one thread each (torch and ITK), alternating scan by scan. Time is wall
clock per volume; peak memory is the rise of the process's resident-set high-water mark during the
volume (``/proc/self/status`` VmHWM, reset before each volume through ``/proc/self/clear_refs`` after
freed memory went back to the OS).
Also printed: the label agreement (Dice) of the two outputs, which shows they did the same job.

    python bench/preprocess.py [--scans 3] [--modes default faithful]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import _raw_scans as synth  # noqa: E402  (raw-data synthesis shared with the tests)
from conftest import CHAOS_DIR, CMR_DIR  # noqa: E402

# ------------------------------------------------------------------------- plain SimpleITK pipeline


def _sitk():
    import SimpleITK as sitk

    return sitk


def sitk_read_chaos(image_dir: Path, label_dir: Path, grey_ranges: dict):
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(image_dir))  # sorted by slice position
    reader.SetFileNames(files)
    image = reader.Execute()
    from PIL import Image

    pngs = {int(re.search(r"(\d+)\D*$", p.stem).group(1)): p for p in label_dir.glob("*.png")}
    numbers = [int(re.search(r"(\d+)\D*$", Path(f).stem).group(1)) for f in files]  # instance of each slice
    stack = np.stack([np.asarray(Image.open(pngs[n])) for n in numbers])  # (z, row, column) = sitk layout
    label = np.zeros(stack.shape, np.uint8)
    for lab, (lo, hi) in grey_ranges.items():
        label[(stack >= lo) & (stack <= hi)] = lab
    lab_img = sitk.GetImageFromArray(label)
    lab_img.CopyInformation(image)
    return image, lab_img


def sitk_resample(img, spacing, size, interp, default=0.0):
    sitk = _sitk()
    return sitk.Resample(img, [int(s) for s in size], sitk.Transform(), interp, img.GetOrigin(), [float(s) for s in spacing],
                         img.GetDirection(), default, img.GetPixelID())


def sitk_crop_or_pad(img, size, pad_value):
    """Centre crop/pad the first two axes of a sitk image to ``size`` with NumPy; origin moved accordingly."""
    sitk = _sitk()
    arr = sitk.GetArrayFromImage(img)  # (z, y, x)
    shift = [0, 0]
    for ax_np, ax_itk, target in ((2, 0, size[0]), (1, 1, size[1])):
        n = arr.shape[ax_np]
        if n > target:
            start = n // 2 - target // 2
            arr = np.take(arr, range(start, start + target), axis=ax_np)
            shift[ax_itk] = start
        elif n < target:
            before = (target - n) // 2
            widths = [(0, 0)] * 3
            widths[ax_np] = (before, target - n - before)
            arr = np.pad(arr, widths, constant_values=pad_value)
            shift[ax_itk] = -before
    out = sitk.GetImageFromArray(arr)
    out.SetSpacing(img.GetSpacing())
    out.SetDirection(img.GetDirection())
    out.SetOrigin(img.TransformContinuousIndexToPhysicalPoint([float(shift[0]), float(shift[1]), 0.0]))
    return out


def sitk_pipeline(recipe: dict, image_path: str, label_path: str, out_dir: Path, out_id: int, faithful: bool) -> None:
    sitk = _sitk()
    raw = recipe["raw"]
    if raw.get("label_reader") == "chaos_png":
        grey = {int(k): tuple(v) for k, v in raw["chaos_png"]["grey_ranges"].items()}
        image, label = sitk_read_chaos(Path(image_path), Path(label_path), grey)
        image = sitk.Cast(image, sitk.sitkFloat32)
    else:
        image = sitk.ReadImage(image_path, sitk.sitkFloat32)
        label = sitk.ReadImage(label_path)
        lab = sitk.GetArrayFromImage(label)
        mapping = {int(k): int(v) for k, v in (recipe["labels"].get("map") or {}).items()}
        if mapping:
            out = np.zeros(lab.shape, np.uint8)
            for k, v in mapping.items():
                out[lab == k] = v
            lab = out
        label = sitk.GetImageFromArray(lab.astype(np.uint8))
        label.CopyInformation(image)
    for step in recipe["steps"]:
        (name, p), = step.items()
        if name == "orientation":
            image, label = sitk.DICOMOrient(image, p["axcodes"]), sitk.DICOMOrient(label, p["axcodes"])
        elif name == "clip_percentile":
            arr = sitk.GetArrayFromImage(image)
            arr = np.minimum(arr, np.percentile(arr, p["upper"]))
            clipped = sitk.GetImageFromArray(arr)
            clipped.CopyInformation(image)
            image = clipped
        elif name == "window":
            (a, b), (lo, hi) = p["range"], p["output"]
            arr = np.clip(sitk.GetArrayFromImage(image), a, b)
            arr = (arr - arr.min()) / (arr.max() - arr.min()) * (hi - lo) + lo
            windowed = sitk.GetImageFromArray(arr.astype(np.float32))
            windowed.CopyInformation(image)
            image = windowed
        elif name == "crop_border":
            border = list(p["border"])
            image, label = sitk.Crop(image, border, border), sitk.Crop(label, border, border)
        elif name == "resample":
            sp_in, n_in = np.array(image.GetSpacing()), np.array(image.GetSize())
            spacing = list(p.get("spacing") or [0, 0, 0])
            size = list(p.get("size") or [None, None, None])
            sp_out, n_out = sp_in.copy(), n_in.copy()
            for ax in range(3):
                if size[ax]:
                    sp_out[ax], n_out[ax] = sp_in[ax] * n_in[ax] / size[ax], size[ax]
                elif spacing[ax]:
                    sp_out[ax] = spacing[ax]
                    x = (n_in[ax] * sp_in[ax] / spacing[ax] + 1) if faithful else ((n_in[ax] - 1) * sp_in[ax] / spacing[ax])
                    n_out[ax] = int(x + 1e-6) if faithful else int(np.floor(x + 1e-6)) + 1
            image = sitk_resample(image, sp_out, n_out, sitk.sitkLinear)
            if faithful:  # the notebooks: each class linearly, rint, merged
                merged = None
                lab = sitk.GetArrayFromImage(label)
                for c in [int(v) for v in np.unique(lab) if v != 0]:
                    binary = sitk.GetImageFromArray((lab == c).astype(np.float32))
                    binary.CopyInformation(label)
                    res = np.rint(sitk.GetArrayFromImage(sitk_resample(binary, sp_out, n_out, sitk.sitkLinear)))
                    merged = np.zeros(res.shape, np.uint8) if merged is None else merged
                    merged[res >= 1] = c
                ref = sitk_resample(label, sp_out, n_out, sitk.sitkNearestNeighbor)
                label = sitk.GetImageFromArray(merged)
                label.CopyInformation(ref)
            else:
                label = sitk_resample(label, sp_out, n_out, sitk.sitkNearestNeighbor)
        elif name == "crop_or_pad":
            vmin = float(sitk.GetArrayViewFromImage(image).min())
            image, label = sitk_crop_or_pad(image, p["size"], vmin), sitk_crop_or_pad(label, p["size"], 0)
    sitk.WriteImage(image, str(out_dir / f"image_{out_id}.nii.gz"))
    sitk.WriteImage(label, str(out_dir / f"label_{out_id}.nii.gz"))


# ----------------------------------------------------------------------------------- measuring


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(fn) -> tuple[float, float]:
    """(seconds, peak resident-memory rise in MB) of ``fn()``.

    Freed memory is first handed back to the OS (``gc.collect`` + glibc ``malloc_trim``) so that the
    high-water mark measures this volume, not what earlier volumes left in the allocator.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, max(0, _rss_kb("VmHWM") - before) / 1024.0


# ------------------------------------------------------------------------------------ raw inputs


def synthesise(root: Path, n: int) -> dict[str, list]:
    """Full-size raw scans per recipe: CHAOS (DICOM + PNG), CMR (NIfTI 200/500/600), Synapse (512^2 HU)."""
    import nibabel as nib

    chaos_ids, cmr_ids = [1, 2, 3, 5, 8][:n], [1, 2, 3, 4, 5][:n]
    for sid in chaos_ids:
        nz = nib.load(str(CHAOS_DIR / f"image_{sid}.nii.gz")).shape[2]
        image, label, affine = synth.load_real(CHAOS_DIR, sid, slice(0, nz))
        synth.make_chaos_raw(root / "chaos", sid, image, label, affine)
        synth.make_synapse_raw(root / "synapse", sid, image, label, affine)
    for sid in cmr_ids:
        nz = nib.load(str(CMR_DIR / f"image_{sid}.nii.gz")).shape[2]
        synth.make_cmr_raw(root / "cmr", sid, *synth.load_real(CMR_DIR, sid, slice(0, nz)))
    return {"chaos_mr_t2": root / "chaos", "cmr_bssfp": root / "cmr", "synapse_ct": root / "synapse"}


def dice_agreement(a_dir: Path, b_dir: Path, out_id: int) -> float:
    import nibabel as nib

    a = np.asarray(nib.load(str(a_dir / f"label_{out_id}.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(b_dir / f"label_{out_id}.nii.gz")).dataobj)
    if a.shape != b.shape:
        return float("nan")
    classes = [c for c in np.unique(a) if c != 0]
    return float(np.mean([2 * ((a == c) & (b == c)).sum() / max(1, (a == c).sum() + (b == c).sum()) for c in classes]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=3, help="raw scans per recipe")
    ap.add_argument("--modes", nargs="+", default=["default", "faithful"], choices=["default", "faithful"])
    args = ap.parse_args(argv)

    import SimpleITK as sitk
    import torch

    from fsmis_monai.preprocess import find_raw_scans, load_recipe, preprocess_scan

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        sources = synthesise(tmp / "raw", args.scans)
        print(f"synthesised raw inputs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for name, src in sources.items():
            recipe = load_recipe(name)
            scans = find_raw_scans(recipe, src)
            # warm-up (imports, reader registration, caches) on the first scan, not measured
            preprocess_scan(recipe, scans[0], tmp / "warm" / name)
            sitk_pipeline(recipe, scans[0].image, scans[0].label, _mk(tmp / "warm" / f"{name}_sitk"), scans[0].out_id, False)
            for mode in args.modes:
                faithful = mode == "faithful"
                m_dir, s_dir = _mk(tmp / name / mode / "monai"), _mk(tmp / name / mode / "sitk")
                for scan in scans:
                    tm, mm = measure(lambda: preprocess_scan(recipe, scan, m_dir, overwrite=True, faithful=faithful))
                    ts, ms = measure(lambda: sitk_pipeline(recipe, scan.image, scan.label, s_dir, scan.out_id, faithful))
                    rows.append((name, mode, scan.raw_id, tm, ts, mm, ms, dice_agreement(m_dir, s_dir, scan.out_id)))
                    print(f"  {name} {mode} scan {scan.raw_id}: monai {tm:.2f}s sitk {ts:.2f}s", file=sys.stderr)
    print_table(rows)
    return 0


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def print_table(rows) -> None:
    head = ("recipe", "mode", "scan", "monai s", "sitk s", "time ratio", "monai MB", "sitk MB", "mem ratio", "label Dice")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, mode, sid, tm, ts, mm, ms, d in rows:
        print(f"| {name} | {mode} | {sid} | {tm:.2f} | {ts:.2f} | {tm / ts:.2f} | {mm:.0f} | {ms:.0f} | "
              f"{mm / max(ms, 1):.2f} | {d:.4f} |")
    for name in dict.fromkeys(r[0] for r in rows):
        for mode in dict.fromkeys(r[1] for r in rows if r[0] == name):
            sel = [r for r in rows if r[0] == name and r[1] == mode]
            tm, ts = np.mean([r[3] for r in sel]), np.mean([r[4] for r in sel])
            mm, ms = np.mean([r[5] for r in sel]), np.mean([r[6] for r in sel])
            print(f"| **{name}** | {mode} | mean of {len(sel)} | {tm:.2f} | {ts:.2f} | **{tm / ts:.2f}** | {mm:.0f} | "
                  f"{ms:.0f} | **{mm / max(ms, 1):.2f}** | {np.mean([r[7] for r in sel]):.4f} |")


if __name__ == "__main__":
    sys.exit(main())

"""Raw data synthesised from the real scans for the preprocessing recipes (used by ``preprocess/test_recipes.py``,
``hardening/test_inputs.py`` and ``bench/preprocess.py``): a real scan resampled to a raw grid (``scipy.ndimage``,
independent of MONAI) and written as the raw layout of each dataset (CHAOS DICOM + PNG masks, CMR NIfTI, Synapse
NIfTI), chosen so that the recipe's output grid lands exactly on the original one."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

CHAOS_GREY = {1: 63, 2: 126, 3: 189, 4: 252}  # CHAOS data description
SYNAPSE_FROM_CHAOS = {1: 6, 2: 2, 3: 3, 4: 1}  # liver 6, right kidney 2, left kidney 3, spleen 1


def load_real(folder: Path, sid: int, z: slice):
    """A real scan cropped to the slices ``z``, with the affine moved accordingly."""
    img = nib.load(str(folder / f"image_{sid}.nii.gz"))
    lab = nib.load(str(folder / f"label_{sid}.nii.gz"))
    image = np.asarray(img.dataobj)[:, :, z].astype(np.float64)
    label = np.rint(np.asarray(lab.dataobj)[:, :, z]).astype(np.int64)
    affine = img.affine @ _translate(0, 0, z.start)
    return image, label, affine


def _translate(*t) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = t
    return m


def resample_raw(array: np.ndarray, scale, offset, shape, order: int, cval: float = 0.0) -> np.ndarray:
    """Sample ``array`` at original index ``offset + scale * raw_index`` for every raw index of ``shape``."""
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    coords = [o + s * g for o, s, g in zip(offset, scale, grid)]
    return ndimage.map_coordinates(array, coords, order=order, mode="constant", cval=cval)


def raw_affine(affine: np.ndarray, scale, offset) -> np.ndarray:
    t = np.diag(list(scale) + [1.0])
    t[:3, 3] = offset
    return affine @ t


def write_dicom_series(volume: np.ndarray, affine_ras: np.ndarray, folder: Path, decreasing: bool = True) -> None:
    """Write ``volume`` (x=column, y=row, z) as one DICOM file per slice, with DICOM geometry tags.

    ``decreasing=True`` numbers the instances against the slice axis (head-first scanners do), so the
    reader must not assume instance order equals position order.
    """
    import locale

    import SimpleITK as sitk

    # SimpleITK's DICOM writer (GDCM) resets the C locale's LC_CTYPE to "C", which turns Python's default text
    # encoding into ASCII for every later test in the process: keep the process's locale as it was
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        _write_slices(sitk, volume, affine_ras, folder, decreasing)
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)


def _write_slices(sitk, volume: np.ndarray, affine_ras: np.ndarray, folder: Path, decreasing: bool) -> None:
    folder.mkdir(parents=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    nz = volume.shape[2]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(nz):
        sl = sitk.GetImageFromArray(np.ascontiguousarray(volume[:, :, k].T).astype(np.int16)[None])
        pos = lps[:3, :3] @ [0, 0, k] + lps[:3, 3]
        instance = nz - k if decreasing else k + 1
        tags = {
            "0008|0060": "MR", "0020|000d": "1.2.826.0.1.1", "0020|000e": "1.2.826.0.1.1.1",
            "0020|0013": str(instance), "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
            "0020|0037": "\\".join(f"{v:.6f}" for v in list(direction[:, 0]) + list(direction[:, 1])),
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}", "0018|0050": f"{spacing[2]:.6f}",
        }
        for t, v in tags.items():
            sl.SetMetaData(t, v)
        writer.SetFileName(str(folder / f"IMG-0002-{instance:05d}.dcm"))
        writer.Execute(sl)


def write_png_masks(label: np.ndarray, folder: Path, decreasing: bool = True, name: str = "IMG-0002-{}.png",
                    first: int = 1) -> None:
    """CHAOS ground truth: one grey PNG per slice in DICOM pixel order (rows, columns), numbered like the DICOMs."""
    from PIL import Image

    folder.mkdir(parents=True)
    nz = label.shape[2]
    for k in range(nz):
        grey = np.zeros(label.shape[:2], np.uint8)
        for c, g in CHAOS_GREY.items():
            grey[label[:, :, k] == c] = g
        number = (nz - 1 - k if decreasing else k) + first
        Image.fromarray(np.ascontiguousarray(grey.T)).save(folder / name.format(number))  # no zero padding


# ---------------------------------------------------------------------------- raw synthesis


# CHAOS: raw at 1.0 x 1.0 x 3.85 mm, 340 x 340 in plane starting 10 mm before the original grid, so the
# 1.25 mm output grid is the original grid shifted by 8 voxels and centre-cropped back onto it.
CHAOS_SCALE, CHAOS_OFFSET = (0.8, 0.8, 0.5), (-8.0, -8.0, 0.0)


def make_chaos_raw(root: Path, sid: int, image, label, affine, raw_id: int | None = None) -> Path:
    nz = 2 * (label.shape[2] - 1) + 1
    shape = (340, 340, nz)
    raw_img = resample_raw(image, CHAOS_SCALE, CHAOS_OFFSET, shape, order=1)
    raw_lab = resample_raw(label.astype(float), CHAOS_SCALE, CHAOS_OFFSET, shape, order=0)
    aff = raw_affine(affine, CHAOS_SCALE, CHAOS_OFFSET)
    # the original is LAS (dcm2niix); DICOM stores rows the other way: flip y into LPS pixel order
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, shape[1] - 1
    aff_dcm = aff @ flip
    base = root / "MR" / str(raw_id if raw_id is not None else sid) / "T2SPIR"
    write_dicom_series(np.rint(raw_img[:, ::-1]), aff_dcm, base / "DICOM_anon")
    write_png_masks(np.rint(raw_lab[:, ::-1]).astype(int), base / "Ground")
    return base


# CMR: raw at half the in-plane spacing, 288 original voxels wide starting 16 voxels before the grid.
CMR_SCALE, CMR_OFFSET = (0.5, 0.5, 1.0), (-16.0, -16.0, 0.0)


def make_cmr_raw(root: Path, sid: int, image, label, affine) -> tuple[Path, Path]:
    shape = (576, 576, label.shape[2])
    raw_img = resample_raw(image, CMR_SCALE, CMR_OFFSET, shape, order=1)
    raw_lab = resample_raw(label.astype(float), CMR_SCALE, CMR_OFFSET, shape, order=0)
    aff = raw_affine(affine, CMR_SCALE, CMR_OFFSET)
    folder = root / "c0t2lge"
    folder.mkdir(parents=True, exist_ok=True)
    ip, lp = folder / f"patient{sid}_C0.nii.gz", folder / f"patient{sid}_C0_manual.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(raw_img).astype(np.int16), aff), str(ip))
    nib.save(nib.Nifti1Image(raw_lab.astype(np.int16), aff), str(lp))
    return ip, lp


# Synapse: 512 x 512 HU volume whose 448 x 448 centre maps onto the 256 x 256 original (x 1.75).
SYN_SCALE, SYN_OFFSET = (1 / 1.75, 1 / 1.75, 1.0), (-32 / 1.75, -32 / 1.75, 0.0)


def make_synapse_raw(root: Path, raw_id: int, image, label, affine) -> None:
    shape = (512, 512, label.shape[2])
    hu = image / image.max() * 700.0 - 400.0  # MR intensities -> a CT-like range, air -1000 outside
    raw_img = resample_raw(hu, SYN_SCALE, SYN_OFFSET, shape, order=1, cval=-1000.0)
    raw_lab = resample_raw(label.astype(float), SYN_SCALE, SYN_OFFSET, shape, order=0)
    syn_lab = np.zeros(shape, np.int16)
    for chaos, syn in SYNAPSE_FROM_CHAOS.items():
        syn_lab[np.rint(raw_lab) == chaos] = syn
    aff = raw_affine(affine, SYN_SCALE, SYN_OFFSET)
    for sub, arr in (("img", np.rint(raw_img).astype(np.int16)), ("label", syn_lab)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, aff), str(root / sub / f"{sub}{raw_id:04d}.nii.gz"))

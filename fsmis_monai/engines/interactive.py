"""One painted support, one query volume: a bundle's own ``inference.json`` run for an interactive request.

The MONAI Label app (``apps/monailabel``) and its benchmarks segment a scan from a label a person painted on a
few of its slices. They do not hold a pipeline of their own: :func:`segment_with_bundle` runs the bundle's
``configs/inference.json`` through MONAI's ``ConfigWorkflow`` (the very workflow ``python -m monai.bundle run``
builds), overriding only its documented inputs (support image, label, class, query folder, output folder,
weights). Whatever that config does (data contract, support slice picks, slice inferer, ``Invertd`` back to
the query's geometry) the app therefore does too, and gets every later change of it.

The painted label is read as a user's own mask (``dataset_name`` None: any raw value is a class, the
value of the painted segment), and every slice holding it is a support slice (``n_support_slices`` None,
:func:`fsmis_monai.engines.inference.support_slices`). A frozen bundle of ``fsmis freeze`` (its support
encoded once) runs the same way, without support overrides.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import nibabel as nib
import numpy as np

from fsmis_monai.io import FsmisInputError, atomic_path

__all__ = ["support_overrides", "segment_with_bundle", "labelled_slices", "restore_painted", "painted_value",
           "is_bundle"]

#: the support is every slice the person painted (``support_slices`` with ``n_support_slices`` None)
ALL_PAINTED = None
#: whole-scan steps for a painted support: ``range`` reads the support label's extent as the organ's, which a few
#: painted slices understate (bench/RESULTS.md "MONAI Label app": ~13 of 25 liver slices labelled), so it is left
#: out; on the painted scan itself ``anchor`` keeps the painted slices as drawn and the components touching them,
#: on another scan (``support_image``) ``consistency`` applies
PAINTED_STEPS: tuple[str, ...] = ("anchor", "consistency")


def is_bundle(folder: str | Path) -> bool:
    """Whether ``folder`` holds a bundle's ``configs/inference.json`` (a training bundle or a frozen one)."""
    return (Path(folder) / "configs" / "inference.json").is_file()


def support_overrides(image: str | Path, label: str | Path, value: int) -> dict[str, Any]:
    """``inference.json`` keys that make ``label == value`` on ``image`` the support: every painted slice,
    the label read as the user's own mask (no dataset label map; ``value`` is the painted raw value), and the
    whole-scan steps a partial label allows (:data:`PAINTED_STEPS`)."""
    return {"support_image": str(image), "support_label": str(label), "support_class": int(value),
            "n_support_slices": ALL_PAINTED, "dataset_name": None, "whole_scan_steps": list(PAINTED_STEPS)}


def painted_value(label_info: Sequence[Mapping[str, Any]], selected: str) -> int:
    """The label value of the segment named ``selected`` in a labelmap exported by 3D Slicer's MONAI Label
    plugin: ``label_info`` lists the segments as ``{"name", "id"}`` with ``id`` the value each segment
    has in the uploaded file (segment order, from 1). Raises :class:`FsmisInputError` for an unknown name."""
    for entry in label_info or []:
        if str(entry.get("name")) == str(selected):
            return int(entry.get("id", entry.get("idx")))
    names = [str(e.get("name")) for e in label_info or []]
    raise FsmisInputError(f"selected label {selected!r} is not one of the uploaded segments {names}")


def segment_with_bundle(bundle: str | Path, query: str | Path, output_dir: str | Path,
                        overrides: Optional[Mapping[str, Any]] = None) -> Path:
    """Run ``bundle/configs/inference.json`` on the single volume ``query``; returns the prediction written in
    ``output_dir`` (``<query name>_seg.nii.gz``, uint8 0/1, the query's shape and affine).

    ``overrides``: further ``inference.json`` keys (e.g. :func:`support_overrides`, ``ckpt_path``,
    ``encoder``, ``device``, ``keep_largest_component``). The query is linked alone into a fresh folder that
    becomes ``dataset_dir``. Raises :class:`FsmisInputError` (one line, naming the file) for a bad support or
    query, and for a bundle folder without ``configs/inference.json``.
    """
    from monai.bundle import ConfigWorkflow

    from fsmis_monai.engines.inference import OUTPUT_POSTFIX

    bundle, query, output_dir = Path(bundle), Path(query), Path(output_dir)
    if not is_bundle(bundle):
        raise FsmisInputError(f"{bundle}: not a bundle (configs/inference.json missing)")
    if not query.is_file():
        raise FsmisInputError(f"{query}: no such image")
    suffix = ".nii.gz" if query.name.endswith(".nii.gz") else query.suffix
    stem = query.name[: -len(suffix)] if suffix else query.name
    with tempfile.TemporaryDirectory(prefix="fsmis_query_") as folder:
        link = Path(folder) / query.name
        link.symlink_to(query.resolve())
        settings = {"write_overlays": False, **dict(overrides or {}), "dataset_dir": folder,
                    "query_glob": query.name, "output_dir": str(output_dir)}
        configs = bundle / "configs"
        workflow = ConfigWorkflow(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
                                  logging_file=False, workflow_type="infer", bundle_root=str(bundle), **settings)
        logging.getLogger(__name__).debug("inference.json of %s on %s with %s", bundle, query, settings)
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    out = output_dir / f"{stem}_{OUTPUT_POSTFIX}.nii.gz"
    if not out.is_file():  # pragma: no cover - the config wrote elsewhere
        raise FsmisInputError(f"{bundle}: inference.json wrote no prediction {out.name} into {output_dir}")
    return out


def _slice_axis(img: nib.Nifti1Image, orientation: Optional[str]) -> int:
    """The array axis of ``img`` that is the network's slice axis: the one pointing to ``orientation[2]`` (e.g.
    ``S`` or ``I`` for ``"LAS"``), or the stored last axis without an orientation."""
    if not orientation:
        return 2
    codes = nib.aff2axcodes(img.affine)
    pair = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}[orientation[2].upper()]
    return next(i for i, c in enumerate(codes) if c in pair)


def labelled_slices(volume: str | Path, orientation: Optional[str] = None, value: Optional[int] = None) -> int:
    """How many slices of the NIfTI ``volume`` hold a voxel ``> 0`` (or ``== value``), slices cut along the
    array axis that is the network's slice axis (:func:`_slice_axis`: the axis pointing to ``orientation[2]``,
    e.g. ``S`` or ``I`` for ``"LAS"``, the data contract's orientation; without one, the stored last axis)."""
    img = nib.load(str(volume))
    data = np.asarray(img.dataobj)
    mask = data > 0 if value is None else data == value
    axis = _slice_axis(img, orientation)
    other = tuple(a for a in range(mask.ndim) if a != axis)
    return int(mask.any(axis=other).sum())


def restore_painted(prediction: str | Path, label: str | Path, value: int, orientation: Optional[str] = None) -> Path:
    """Rewrite ``prediction`` (a 0/1 NIfTI on the painted scan's grid) so that every painted slice (a slice of
    ``label`` holding ``value``, cut along the network's slice axis, :func:`_slice_axis`) is exactly the paint.

    Why: the ``anchor`` step keeps the paint on the model's grid (e.g. 128 px), and ``Invertd``'s resampling
    back to the scan moves its outline by a pixel or two; a person expects the slice they drew back as drawn.
    Raises :class:`FsmisInputError` when the two files' shapes differ."""
    pred_img, paint_img = nib.load(str(prediction)), nib.load(str(label))
    pred, painted = np.asarray(pred_img.dataobj).copy(), np.asarray(paint_img.dataobj) == value
    if pred.shape[:3] != painted.shape[:3]:
        raise FsmisInputError(f"{label}: shape {painted.shape} differs from the prediction's {pred.shape}")
    axis = _slice_axis(paint_img, orientation)
    drawn = painted.any(axis=tuple(a for a in range(painted.ndim) if a != axis))
    index = [slice(None)] * pred.ndim
    index[axis] = drawn
    pred[tuple(index)] = painted[tuple(index)].astype(pred.dtype)
    out = Path(prediction)
    with atomic_path(out) as tmp:  # the file is the old prediction or the new one, never half written
        nib.save(nib.Nifti1Image(pred, pred_img.affine, pred_img.header), str(tmp))
    return out

"""The infer task of one few-shot bundle: a painted label in, the organ in the whole volume out.

A MONAI Label ``InferTask`` of type ``scribbles`` (the only type for which 3D Slicer's MONAI Label plugin
uploads the painted segments as the ``label`` field, with ``label_info`` and ``selected_label_name`` in the
params; ``plugins/slicer/MONAILabel/MONAILabel.py``, ``onUpdateScribbles``). The work is the bundle's own
``inference.json`` (:func:`fsmis_monai.engines.interactive.segment_with_bundle`); this module only turns the
request into that config's support inputs and its errors into HTTP errors with a one-line reason.

Request (``POST /infer/<task>?image=<id>``, multipart ``params`` + ``label``):

- ``label``: a NIfTI on the image's grid; the support is every slice holding the chosen value.
- ``params.selected_label_name`` + ``params.label_info`` (Slicer) or ``params.support_class`` (a raw value);
  neither: the label's only non-zero value.
- ``params.support_image``: a datastore image id the label was painted on (default: the query ``image``);
  without an upload its saved label (``labels/final``, Slicer's "Submit Label") is the support, so
  ``POST /batch/infer/<task>`` applies it to other images of the datastore.
- ``params.frozen``: one of the folders written by ``fsmis freeze`` that the server was started with
  (``--conf frozen``; by folder name or path): its support is already encoded, no label needed. Only those:
  bundle configs execute Python, so a request cannot name any folder of the server's disk.
- ``params.keep_largest_component``: bool.

Result: a uint8 0/1 NIfTI in the image's geometry: ``inference.json``'s prediction, the slices painted on this
very image replaced by the paint as drawn (:func:`~fsmis_monai.engines.interactive.restore_painted`); params
``labelled_slices`` (slices of the result that hold the organ), ``painted_slices``, ``support_image`` (an image
id), ``bundle``, ``weights``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from fsmis_monai.engines.inference import model_contract
from fsmis_monai.engines.interactive import (
    is_bundle,
    labelled_slices,
    painted_value,
    restore_painted,
    segment_with_bundle,
    support_overrides,
)
from fsmis_monai.io import FsmisInputError

logger = logging.getLogger(__name__)


def _refuse(status: int, reason: str) -> HTTPException:
    """An HTTP error whose body is ``{"detail": <one line>}``."""
    return HTTPException(status_code=status, detail=" ".join(str(reason).split()))


def _nifti(path: str, what: str) -> nib.Nifti1Image:
    try:
        return nib.load(path)
    except Exception as e:  # nibabel raises several types for a file that is not an image
        reason = str(e).replace(str(path), what)  # the server's temp-file name means nothing to the user
        raise _refuse(422, f"{what}: not a NIfTI image ({type(e).__name__}: {reason})") from e


class FewShotInfer(InferTask):
    """``request -> (prediction file, result params)`` with ``bundle``'s ``inference.json``.

    Args:
        bundle: a bundle folder (``configs/inference.json``).
        ckpt_path: its weights (``models/model.pt`` of the bundle by default).
        overrides: further ``inference.json`` keys for every request (e.g. ``{"encoder": "small"}``).
        datastore: a callable returning the app's datastore (image ids -> files, saved labels).
        labels: the class names shown in Slicer.
        frozen: bundles of ``fsmis freeze`` a request may name (``params.frozen``).
    """

    def __init__(self, bundle: Path, ckpt_path: Path, overrides: Mapping[str, Any], datastore: Any,
                 labels: Any, frozen: Sequence[Path] = ()) -> None:
        super().__init__(type=InferType.SCRIBBLES, labels=labels, dimension=3,
                         description=f"Few-shot {bundle.name}: paint the organ on one slice (or a few), get it in "
                                     "every slice of the scan",
                         config={"keep_largest_component": False})
        self.bundle = Path(bundle)
        self.ckpt_path = Path(ckpt_path)
        self.overrides = {**dict(overrides), "ckpt_path": str(self.ckpt_path)}
        self.datastore = datastore
        self.frozen = {Path(f).resolve().name: Path(f).resolve() for f in frozen}
        self.orientation = model_contract(self.ckpt_path, None).orientation

    def is_valid(self) -> bool:
        return is_bundle(self.bundle) and self.ckpt_path.is_file()

    # ------------------------------------------------------------------------------------------- request

    def _image(self, image_id: str, what: str) -> str:
        uri = self.datastore().get_image_uri(str(image_id)) if image_id else ""
        if not uri or not Path(uri).is_file():
            raise _refuse(404, f"{what} {image_id!r}: no such image in the datastore")
        return uri

    def _support(self, request: Mapping[str, Any], query: str) -> Tuple[str, str, int, str]:
        """(support image, its label file, the painted value, a name for the label in messages)."""
        support_id = request.get("support_image")
        image = self._image(support_id, "support_image") if support_id else query
        label = request.get("label")
        name = "uploaded label"
        if not label:
            if not support_id:
                raise _refuse(422, "no label uploaded: paint the organ on a slice (a 'label' file on the image's "
                                   "grid), or name a support_image with a saved label, or a frozen support")
            label = self.datastore().get_label_uri(str(support_id), "final")
            name = f"saved label of {support_id!r}"
            if not label or not Path(label).is_file():
                raise _refuse(422, f"support_image {support_id!r} has no saved label; upload the painted label")
        painted = np.asarray(_nifti(str(label), name).dataobj)
        shape, want = painted.shape[:3], _nifti(image, "image").shape[:3]
        if painted.ndim < 3 or shape != want:
            hint = "" if support_id else ("; paint on this image, or name the image the label was painted on with "
                                          "params.support_image")
            raise _refuse(422, f"{name}: shape {tuple(painted.shape)} differs from the image's {tuple(want)}{hint}")
        values = sorted(int(v) for v in np.unique(painted) if v != 0)
        if not values:
            raise _refuse(422, f"{name} is empty: paint the organ on at least one slice")
        try:
            if request.get("selected_label_name"):
                value = painted_value(request.get("label_info") or [], request["selected_label_name"])
            elif request.get("support_class") is not None:
                value = int(request["support_class"])
            elif len(values) == 1:
                value = values[0]
            else:
                raise FsmisInputError(f"{name} holds values {values}: say which with selected_label_name (and "
                                      "label_info) or support_class")
        except (FsmisInputError, ValueError) as e:
            raise _refuse(422, str(e)) from e
        if value not in values:
            raise _refuse(422, f"{name}: the chosen segment (value {value}) is not painted; values painted: {values}")
        return image, str(label), value, name

    # ------------------------------------------------------------------------------------------- run

    def __call__(self, request: Dict[str, Any]) -> Tuple[Optional[str], Dict[str, Any]]:
        query = request.get("image") or ""
        if not query or not Path(query).is_file():
            raise _refuse(404, f"image {request.get('image_id', query)!r}: no such image in the datastore")
        overrides = dict(self.overrides)
        if request.get("keep_largest_component") is not None:
            overrides["keep_largest_component"] = bool(request["keep_largest_component"])
        frozen = request.get("frozen")
        bundle, result = self.bundle, {"bundle": self.bundle.name, "weights": str(self.ckpt_path)}
        label_name = None
        if frozen:
            named = self.frozen.get(str(frozen))
            bundle = named or next((p for p in self.frozen.values() if p == Path(str(frozen)).resolve()), None)
            if bundle is None:
                raise _refuse(422, f"frozen {frozen!r}: not one of the frozen supports the server was started "
                                   f"with (--conf frozen): {sorted(self.frozen)}")
            overrides = {k: v for k, v in overrides.items() if k in ("keep_largest_component", "device")}
            result.update(frozen=str(bundle), weights=str(bundle / "models" / "model.pt"))
        else:
            image, label, value, label_name = self._support(request, query)
            overrides.update(support_overrides(image, label, value))
            result.update(support_image=request.get("support_image") or request.get("image_id") or Path(query).name,
                          painted_slices=labelled_slices(label, self.orientation, value))
        with tempfile.TemporaryDirectory(prefix="fsmis_label_") as out_dir:
            try:
                pred = segment_with_bundle(bundle, query, out_dir, overrides)
            except FsmisInputError as e:
                reason = str(e).replace(str(request.get("label")), label_name) if label_name else str(e)
                raise _refuse(422, reason) from e
            if label_name and Path(image) == Path(query):  # painted on this very scan: those slices as drawn
                restore_painted(pred, label, value, self.orientation)
            result["labelled_slices"] = labelled_slices(pred, self.orientation)
            # the server deletes the result file once sent (monailabel.endpoints.infer.send_response)
            handle, out = tempfile.mkstemp(prefix="fsmis_", suffix=".nii.gz")
            os.close(handle)
            shutil.move(str(pred), out)
        logger.info("%s: %s", self.bundle.name, result)
        return out, result

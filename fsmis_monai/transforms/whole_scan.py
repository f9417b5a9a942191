"""Oracle-free whole-scan segmentation: method-agnostic steps applied to a few-shot model's foreground
probabilities of every slice of a query volume (docs/reference.md#whole-scan-steps).

The published protocols (EP1, ALP, SENet) choose the query slices with the query's ground truth; a user has
none, so every slice is segmented and the network's false positives away from the organ count. Three steps,
each chosen by name (:data:`STEPS`; the bundles' ``whole_scan_steps`` key, the evaluator's ``whole``
protocol), use only the support scan and the query's intensities:

- ``range`` (support-guided slice range, after TPM, MICCAI 2025, position prior): the organ's first and last
  slice in the support, relative to the body's extent along the slice axis, mapped onto the query's body
  extent, widened by ``margin`` (a fraction of that extent); slices outside are cleared.
- ``presence`` (slice-level presence, after ADNet EP2's anomaly threshold, Hansen et al. MedIA 2022): a
  slice's prediction is rejected when its mean foreground probability is below ``min_confidence`` or below
  ``relative_confidence`` times the scan's most confident slice, or its area, relative to the slice's body
  area, exceeds ``area_factor`` times the support's largest one.
- ``anchor`` (own, for a support painted on the query scan itself, as in the MONAI Label app): the labelled
  slices keep the person's label, and only the 3D components of the prediction that touch it are kept; a
  query that is not the support scan is left to the next step.
- ``consistency`` (own): 3D connected components; only the most confident component of each of the
  ``n_anchor`` most confident slices is kept (not the largest one, which is often a false positive,
  bench/RESULTS.md "keep the largest component").

All thresholds are fixed or come from the support (:class:`SupportPrior`); no query label is read. Arrays
are ``[H, W, D]`` with the slice axis last (the data contract's grid). Hand-written: MONAI offers only the
largest connected component (``KeepLargestConnectedComponent``), no position or presence prior.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform
from scipy import ndimage

from fsmis_monai.io import FsmisInputError
from fsmis_monai.pseudolabels import SUPERVOXEL_BODY_THRESHOLD, body_mask_volume

STEPS: tuple[str, ...] = ("range", "presence", "anchor", "consistency")
#: the steps ``inference.json``, frozen bundles and the evaluation's ``whole`` protocol use by default, chosen
#: by bench/organ_anywhere.py (bench/RESULTS.md "organ anywhere"): with the shipped Q-Net weights, range +
#: consistency raised every class of CHAOS-T2 fold 0 (whole 0.417 -> 0.613, 1.14 x EP1); ``presence`` lowered
#: the liver and stays opt-in. ``[]`` switches them off (the published protocols' numbers)
DEFAULT_STEPS: tuple[str, ...] = ("range", "consistency")


def check_steps(steps: Optional[Sequence[str]]) -> tuple[str, ...]:
    """Normalise a list of step names (``None`` or ``[]``: none); unknown names raise ``ValueError``."""
    out = tuple(str(s).strip().lower() for s in (steps or ()))
    unknown = [s for s in out if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown whole-scan step(s) {unknown}; known: {', '.join(STEPS)}")
    return tuple(s for s in STEPS if s in out)  # one fixed order: range, presence, anchor, consistency


def body_mask(volume: np.ndarray) -> np.ndarray:
    """Body mask ``[H, W, D]`` bool of an intensity volume, as the supervoxel preprocessing computes it
    (min-max rescaled to 0-255, threshold 10, largest component per slice, holes filled:
    :func:`fsmis_monai.pseudolabels.body_mask_volume`)."""
    vol = np.asarray(volume, dtype=np.float32)
    low, span = float(vol.min()), float(vol.max() - vol.min())
    rescaled = 255.0 * (vol - low) / span if span > 0 else np.zeros_like(vol)
    return body_mask_volume(rescaled, SUPERVOXEL_BODY_THRESHOLD)


def body_extent(body: np.ndarray) -> tuple[int, int]:
    """First and last slice (inclusive) holding body; the whole stack when no slice does."""
    zs = np.flatnonzero(body.any(axis=(0, 1)))
    return (int(zs[0]), int(zs[-1])) if zs.size else (0, body.shape[-1] - 1)


def _relative(z: float, extent: tuple[int, int]) -> float:
    return (z - extent[0]) / max(extent[1] - extent[0], 1)


@dataclass(frozen=True)
class SupportPrior:
    """What the support scan says about the organ: its first and last slice relative to the body's extent
    (0 = first body slice, 1 = last) and its largest slice area as a fraction of that slice's body area.
    Plain numbers, so a frozen bundle stores them in its config (:meth:`to_dict`)."""

    start: float
    stop: float
    max_area: float

    @classmethod
    def from_volume(cls, image: np.ndarray, mask: np.ndarray, what: str = "support") -> "SupportPrior":
        """From the support's intensities and binary class mask, both ``[H, W, D]`` on the model's grid.

        Raises:
            FsmisInputError: the mask holds no voxel (``what`` names the file or scan).
        """
        mask = np.asarray(mask, bool)
        zs = np.flatnonzero(mask.any(axis=(0, 1)))
        if zs.size == 0:
            raise FsmisInputError(f"{what}: the support mask holds no voxel of the class")
        body = body_mask(image)
        extent = body_extent(body)
        areas = mask.sum(axis=(0, 1))[zs] / np.maximum(body.sum(axis=(0, 1))[zs], 1)
        return cls(_relative(zs[0], extent), _relative(zs[-1], extent), float(areas.max()))

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SupportPrior":
        return cls(float(d["start"]), float(d["stop"]), float(d["max_area"]))


def slice_range(prior: SupportPrior, body: np.ndarray, margin: float = 0.2) -> np.ndarray:
    """``range`` step: bool ``[D]``, the query slices inside the support's relative organ range (``prior``)
    mapped onto the query's body extent (``body`` ``[H, W, D]``), widened by ``margin`` of that extent."""
    extent = body_extent(body)
    rel = (np.arange(body.shape[-1]) - extent[0]) / max(extent[1] - extent[0], 1)
    return (rel >= prior.start - margin) & (rel <= prior.stop + margin)


def slice_confidence(prob: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Mean foreground probability of each slice's predicted pixels, ``[D]`` (0 where nothing is predicted)."""
    area = pred.sum(axis=(0, 1))
    return np.where(area > 0, (prob * pred).sum(axis=(0, 1)) / np.maximum(area, 1), 0.0)


def slice_presence(prob: np.ndarray, pred: np.ndarray, prior: SupportPrior, body: np.ndarray,
                   min_confidence: float = 0.6, relative_confidence: float = 0.9,
                   area_factor: float = 2.0) -> np.ndarray:
    """``presence`` step: bool ``[D]``, the slices whose prediction is kept: mean foreground probability at
    least ``min_confidence`` and at least ``relative_confidence`` times the scan's most confident slice (the
    method's own best evidence in this scan, so a model of any calibration is judged by its own scale), and
    area (relative to the slice's body area) at most ``area_factor`` times the support's largest."""
    area = pred.sum(axis=(0, 1)) / np.maximum(body.sum(axis=(0, 1)), 1)
    conf = slice_confidence(prob, pred)
    plausible = area <= area_factor * prior.max_area
    best = conf[plausible].max() if plausible.any() else 0.0
    return (conf >= max(min_confidence, relative_confidence * best)) & plausible


def confident_components(prob: np.ndarray, pred: np.ndarray, n_anchor: int = 3) -> np.ndarray:
    """``consistency`` step: bool ``[H, W, D]``, the 3D components (26-connected) of ``pred`` chosen by the
    ``n_anchor`` most confident slices (highest :func:`slice_confidence` among the slices whose predicted area
    is at least a tenth of the largest, so that a few stray pixels do not anchor): on each anchor slice, the
    component with the highest mean foreground probability there, among those covering at least a tenth of
    the slice's prediction. Size alone never decides, unlike ``KeepLargestConnectedComponent``."""
    components, n = ndimage.label(pred, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return pred.astype(bool)
    area = pred.sum(axis=(0, 1))
    conf = np.where(area >= 0.1 * area.max(), slice_confidence(prob, pred), -1.0)
    anchors = [int(z) for z in np.argsort(-conf, kind="stable")[: max(1, int(n_anchor))] if conf[z] >= 0]
    keep = set()
    for z in anchors:
        ids = components[..., z].ravel()
        pixels = np.bincount(ids, minlength=n + 1)[1:]
        mean = np.bincount(ids, weights=prob[..., z].ravel(), minlength=n + 1)[1:] / np.maximum(pixels, 1)
        mean[pixels < 0.1 * pixels.sum()] = -1.0
        keep.add(int(mean.argmax()) + 1)
    return np.isin(components, sorted(keep))


def anchored_components(pred: np.ndarray, painted: np.ndarray, growth: int = 1, min_overlap: float = 0.8) -> np.ndarray:
    """``anchor`` step: bool ``[H, W, D]``. The slices of ``painted`` (the support label drawn on this very
    scan, ``[H, W, D]``) holding a voxel take the label as drawn (a person's label is the truth there); from
    them the organ is followed slice by slice away from the drawn ones: a slice keeps the predicted pixels
    within ``growth`` pixels of the previous slice's kept mask, and the following stops before the first slice
    that keeps none, or whose kept pixels lie less than ``min_overlap`` inside the previous slice's mask (the
    prediction has run into a neighbour: an organ's outline moves little from one slice to the next). The
    organ is the one the person pointed at: a look-alike elsewhere in the scan (the other kidney) and a
    neighbour the prediction runs into are dropped. ``growth`` and ``min_overlap``: bench/RESULTS.md, "MONAI
    Label app"."""
    painted = np.asarray(painted, bool)
    pred = np.asarray(pred, bool)
    drawn = np.flatnonzero(painted.any(axis=(0, 1)))
    out = np.zeros_like(pred)
    if drawn.size == 0:
        return out
    out[..., drawn] = painted[..., drawn]
    ring = ndimage.generate_binary_structure(2, 1)
    depth = pred.shape[-1]
    for start, step in ((int(drawn[-1]), 1), (int(drawn[0]), -1)):
        z = start + step
        while 0 <= z < depth and not painted[..., z].any():
            allowed = ndimage.binary_dilation(out[..., z - step], ring, iterations=max(int(growth), 0)) \
                if growth > 0 else out[..., z - step]
            out[..., z] = pred[..., z] & allowed
            kept = int(out[..., z].sum())
            if not kept or (out[..., z] & out[..., z - step]).sum() < min_overlap * kept:
                out[..., z] = False
                break
            z += step
    # slices between two drawn slices: the prediction, within reach of either neighbour
    for z in range(int(drawn[0]) + 1, int(drawn[-1])):
        if not painted[..., z].any():
            reach = ndimage.binary_dilation(out[..., z - 1] | painted[..., z + 1], ring, iterations=max(int(growth), 1))
            out[..., z] = pred[..., z] & reach
    return out


@dataclass(frozen=True)
class WholeScanSteps:
    """The chosen steps and their settings: ``steps(prob, image, prior) -> pred``.

    Args:
        steps: names from :data:`STEPS` (any order; applied as range, presence, consistency).
        margin: ``range`` widening, a fraction of the query's body extent.
        min_confidence, relative_confidence, area_factor: ``presence`` thresholds (mean foreground
            probability of a slice's prediction, absolute and relative to the scan's most confident slice;
            predicted area over the support's largest, both relative to the body area).
        n_anchor: ``consistency`` anchor slices.

    ``anchor`` applies when a painted mask is given (the query is the support scan) and then replaces
    ``consistency``; without one, ``consistency`` (if chosen) runs.
    """

    steps: tuple[str, ...] = DEFAULT_STEPS
    margin: float = 0.2
    min_confidence: float = 0.6
    relative_confidence: float = 0.9
    area_factor: float = 2.0
    n_anchor: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check_steps(self.steps))

    def __call__(self, prob: np.ndarray, image: np.ndarray, prior: Optional[SupportPrior],
                 painted: Optional[np.ndarray] = None) -> np.ndarray:
        """Binary prediction ``[H, W, D]`` from foreground probabilities ``prob`` ``[H, W, D]`` (in [0, 1];
        a pixel is foreground when ``prob > 0.5``, the argmax) and the query's intensities ``image``
        ``[H, W, D]`` (for its body mask). ``prior`` is needed by ``range`` and ``presence``; ``painted``
        (``[H, W, D]``, the support label when the query is the support scan) by ``anchor``."""
        prob = np.asarray(prob, dtype=np.float32)
        pred = prob > 0.5
        anchored = "anchor" in self.steps and painted is not None
        if anchored and np.shape(painted) != pred.shape:
            raise ValueError(f"anchor: painted mask {np.shape(painted)} is not on the prediction's grid {pred.shape}")
        if not self.steps or not (pred.any() or anchored):
            return pred
        if prior is None and {"range", "presence"} & set(self.steps):
            raise ValueError("the range and presence steps need the support's prior (SupportPrior)")
        body = body_mask(image) if {"range", "presence"} & set(self.steps) else None
        if "range" in self.steps:
            pred &= slice_range(prior, body, self.margin)[None, None, :]
        if "presence" in self.steps:
            pred &= slice_presence(prob, pred, prior, body, self.min_confidence, self.relative_confidence,
                                   self.area_factor)[None, None, :]
        if anchored:
            return anchored_components(pred, painted)
        if "consistency" in self.steps and pred.any():
            pred = confident_components(prob, pred, self.n_anchor)
        return pred


class WholeScanStepsd(MapTransform):
    """Dictionary transform for ``inference.json`` and frozen bundles: ``pred`` logits ``[2, H, W, D]`` ->
    one-hot ``[2, H, W, D]`` of :class:`WholeScanSteps`' prediction (so the ``AsDiscreted(argmax=True)`` that
    follows is unchanged), on the network's grid, with ``image_key`` ``[C, H, W, D]`` the prepared query.

    Args:
        prior: the support's :class:`SupportPrior` or its :meth:`~SupportPrior.to_dict` (a frozen bundle's).
        steps: names from :data:`STEPS`; empty: the logits pass through unchanged.
        painted: for ``anchor``, ``{"image": support scan file, "mask": its label [H, W, D] on the network's
            grid}`` (:func:`fsmis_monai.engines.inference.load_painted_support`); used for the query whose file
            (``image_key``'s ``filename_or_obj``; a symbolic or hard link to it counts) is that support scan.
    """

    def __init__(self, keys: str | Sequence[Hashable] = "pred", prior: Optional[SupportPrior | Mapping] = None,
                 steps: Optional[Sequence[str]] = DEFAULT_STEPS, image_key: str = "image",
                 painted: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(keys)
        self.prior = SupportPrior.from_dict(prior) if isinstance(prior, Mapping) else prior
        self.steps = WholeScanSteps(tuple(steps or ()))
        self.image_key = image_key
        self.painted = painted

    def _painted_mask(self, image: Any) -> Optional[np.ndarray]:
        """The support label when ``image`` (a query MetaTensor) is read from the support scan's file."""
        if not self.painted:
            return None
        source = getattr(image, "meta", {}).get("filename_or_obj")
        try:  # the same file, also through a symbolic or hard link (the app links each query into a folder)
            same = bool(source) and os.path.samefile(str(source), str(self.painted["image"]))
        except OSError:
            same = False
        return np.asarray(self.painted["mask"], bool) if same else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if not self.steps.steps:
            return d
        image = d[self.image_key]
        painted = self._painted_mask(image)
        image = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)[0]
        for key in self.key_iterator(d):
            logits = d[key]
            prob = torch.softmax(torch.as_tensor(logits).detach().float().cpu(), dim=0)[1].numpy()
            kept = torch.as_tensor(self.steps(prob, image, self.prior, painted))
            onehot = torch.stack([~kept, kept]).to(logits.dtype if isinstance(logits, torch.Tensor) else torch.float32)
            if hasattr(logits, "copy_meta_from"):  # keep the MetaTensor's geometry and transform trace
                onehot = type(logits)(onehot)
                onehot.copy_meta_from(logits, copy_attr=True)
            d[key] = onehot
        return d

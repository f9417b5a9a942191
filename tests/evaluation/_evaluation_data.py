"""Helpers of the evaluation tests: real scans subsampled in-plane into a temporary folder (never into the
repository) to keep whole-volume runs within the time budget, a model with fixed predictions, and an
independent plain-NumPy version of the protocols written from docs/reference.md#evaluation-protocols (not from the
code)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from fsmis_monai.networks.methods.base import FewShotSegmenter


def subsampled_scans(src: Path, dst: Path, ids: Sequence[int], step: int = 2) -> Path:
    """Write ``image_<id>``/``label_<id>`` of ``src`` keeping every ``step``-th voxel in x and y (geometry
    updated: the affine's in-plane columns scaled by ``step``)."""
    dst.mkdir(parents=True, exist_ok=True)
    for sid in ids:
        for kind in ("image", "label"):
            img = nib.load(str(src / f"{kind}_{sid}.nii.gz"))
            data = np.asarray(img.dataobj)[::step, ::step]
            affine = img.affine.copy()
            affine[:3, :2] *= step
            out = nib.Nifti1Image(data, affine)
            out.set_qform(affine, code=1)
            out.set_sform(affine, code=1)
            nib.save(out, str(dst / f"{kind}_{sid}.nii.gz"))
    return dst


THRESHOLD = 0.5  # the fake model's fixed intensity threshold on the z-scored query


class SupportMaskModel(FewShotSegmenter):
    """Fixed predictions: the support slice's mask wherever the z-scored query is brighter than 0.5.

    The prediction of query slice z therefore depends on which support slice the protocol pairs it with
    and on the query slice itself, so wrong support picks, chunks or slice bookkeeping change the Dice.
    """

    name = "support_mask"

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.calls = 0
        self.fail_after = fail_after

    def encode_support(self, support_images, support_masks):
        return {"mask": support_masks.amax(0)}

    def segment(self, query_images, state):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        fg = state["mask"][None] * (query_images[:, 0] > THRESHOLD).float()
        return torch.stack([1 - fg, fg], 1)


# --------------------------------------------- independent reference (docs/reference.md#evaluation-protocols)


def zscore(x):
    return (x - x.mean()) / x.std()


def labelled(mask):
    return [z for z in range(mask.shape[2]) if mask[:, :, z].sum() > 0]


def picks_3(support_mask):
    c = labelled(support_mask)
    return [c[int(p * len(c))] for p in (1 / 6, 0.5, 5 / 6)]


def ref_assignment(protocol, q_mask, s_mask, faithful=False):
    """(support slice per predicted query slice {z: s}, scored slice list, Dice smoothing)."""
    depth = q_mask.shape[2]
    if protocol == "ep2":
        c = labelled(s_mask)
        return {z: c[int(0.5 * len(c))] for z in range(depth)}, list(range(depth)), 0.0
    if protocol == "ep1":
        sup, q = picks_3(s_mask), labelled(q_mask)
        idx = np.linspace(0, len(q), 4).astype(int)
        return {q[i]: sup[k] for k in range(3) for i in range(idx[k], idx[k + 1])}, q, 0.0
    if protocol == "alp":
        sup, q = picks_3(s_mask), labelled(q_mask)
        zmin, zmax = min(q), max(q)
        assign = {}
        for z in range(depth):
            part = int((z - zmin) // ((zmax - zmin) / 3))
            assign[z] = sup[min(max(part, 0), 2)]
        return assign, list(range(zmin, zmax + 1)), 0.0
    if protocol == "whole":
        sup = picks_3(s_mask)
        sd = s_mask.shape[2]
        assign = {}
        for z in range(depth):
            d = [abs(z / (depth - 1) - s / (sd - 1)) for s in sup]
            assign[z] = sup[d.index(min(d))]
        return assign, list(range(depth)), 0.0
    if protocol == "senet":
        def organ_range(m):
            last = m.shape[2] - 1 if faithful else m.shape[2]
            idx = [z for z in range(last) if m[:, :, z].sum() > 200]
            return list(range(idx[0], idx[-1] + (0 if faithful else 1)))

        s_rng, q_rng, n = organ_range(s_mask), organ_range(q_mask), 12
        assign = {}
        for i in range(n):
            s_chunk = s_rng[math.floor(i / n * len(s_rng)):math.floor((i + 1) / n * len(s_rng))]
            q_chunk = q_rng[math.floor(i / n * len(q_rng)):math.floor((i + 1) / n * len(q_rng))]
            if s_chunk:
                s = s_chunk[len(s_chunk) // 2]
            else:  # documented fallback of the corrected protocol: the chunk's centre position
                s = s_rng[min(math.floor((i + 0.5) / n * len(s_rng)), len(s_rng) - 1)]
            for z in q_chunk:
                assign[z] = s
        return assign, q_rng, 0.001 if faithful else 0.0
    raise ValueError(protocol)


def ref_case(protocol, q_img, q_mask, s_mask, faithful=False):
    assign, scored, smooth = ref_assignment(protocol, q_mask, s_mask, faithful)
    zq = zscore(q_img.astype(np.float64))
    pred = np.zeros(q_mask.shape, bool)
    for z, s in assign.items():
        pred[:, :, z] = s_mask[:, :, s] & (zq[:, :, z] > THRESHOLD)
    p, t = pred[:, :, scored], q_mask[:, :, scored]
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    if smooth:
        return (2 * tp + smooth) / (2 * tp + fp + fn + smooth), tp, fp, fn, len(scored), len(assign), pred
    dice = 2 * tp / (2 * tp + fp + fn) if tp + fn > 0 else float("nan")
    return dice, tp, fp, fn, len(scored), len(assign), pred


def load(folder: Path, sid: int):
    img = np.asarray(nib.load(str(folder / f"image_{sid}.nii.gz")).dataobj)
    lbl = np.asarray(nib.load(str(folder / f"label_{sid}.nii.gz")).dataobj)
    return img, lbl

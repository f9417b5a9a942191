"""Boundary-F1 loss (fsmis_monai.losses.boundary): values worked out by hand on drawn masks, and parity with
an independent SciPy computation on a real CHAOS liver mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import maximum_filter

from fsmis_monai.io import load_nifti
from fsmis_monai.losses.boundary import BoundaryF1Loss


def _probs(fg: np.ndarray) -> torch.Tensor:
    """Hard two-class probabilities [1, 2, H, W] from a 0/1 foreground map."""
    p = torch.from_numpy(fg.astype(np.float32))
    return torch.stack([1 - p, p])[None]


def _squares(*corners, size=20, side=4):
    m = np.zeros((size, size), np.int64)
    for y, x in corners:
        m[y : y + side, x : x + side] = 1
    return m


def test_perfect_prediction_scores_zero():
    gt = _squares((3, 3))
    loss = BoundaryF1Loss()(_probs(gt), torch.from_numpy(gt)[None])
    # P = R = 1 for both classes; only the 1e-7 terms remain: 1 - 2 / (2 + 1e-7)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_all_background_prediction_scores_one():
    gt = _squares((3, 3))
    loss = BoundaryF1Loss()(_probs(np.zeros_like(gt)), torch.from_numpy(gt)[None])
    # a constant prediction has no boundary in either class: P = R = 0, BF1 = 0, loss = 1
    assert float(loss) == pytest.approx(1.0, abs=1e-6)


def test_one_of_two_objects_found_scores_one_third():
    # two 4x4 squares 9 px apart (beyond the 2 px tolerance); the prediction has only the first.
    # fg: predicted boundary = the 12 rim pixels of square A, all on the GT boundary -> P = 1;
    #     GT boundary = 24 rim pixels of A and B, 12 of them near the prediction -> R = 1/2.
    # bg: boundary = the 20-pixel ring around each square: P = 20/20 = 1, R = 20/40 = 1/2.
    # BF1 = 2 * 1 * 0.5 / 1.5 = 2/3 for both classes, so the loss is 1/3.
    gt = _squares((3, 3), (3, 13))
    pred = _squares((3, 3))
    loss = BoundaryF1Loss()(_probs(pred), torch.from_numpy(gt)[None])
    assert float(loss) == pytest.approx(1 / 3, abs=1e-6)


def test_ignored_pixels_are_left_out():
    gt = _squares((3, 3), (3, 13))
    gt[2:9, 12:19] = 255  # square B and its ring are "ignore"
    loss = BoundaryF1Loss()(_probs(_squares((3, 3))), torch.from_numpy(gt)[None])
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_gradient_flows_to_probabilities():
    gt = torch.from_numpy(_squares((3, 3)))[None]
    logits = torch.randn(1, 2, 20, 20, generator=torch.Generator().manual_seed(0)).requires_grad_()
    BoundaryF1Loss()(torch.softmax(logits, 1), gt).backward()
    assert logits.grad.abs().sum() > 0


def _bf1_scipy(prob: np.ndarray, gt: np.ndarray, theta0=3, theta=5, eps=1e-7) -> float:
    """Independent float64 computation: maximum filters with -inf outside the image."""
    losses = []
    for c in range(prob.shape[0]):
        y = (gt == c).astype(np.float64)
        p = prob[c].astype(np.float64)

        def boundary(m):
            return maximum_filter(1 - m, size=theta0, mode="constant", cval=-np.inf) - (1 - m)

        def extend(b):
            return maximum_filter(b, size=theta, mode="constant", cval=-np.inf)

        gb, pb = boundary(y), boundary(p)
        precision = (pb * extend(gb)).sum() / (pb.sum() + eps)
        recall = (extend(pb) * gb).sum() / (gb.sum() + eps)
        losses.append(1 - 2 * precision * recall / (precision + recall + eps))
    return float(np.mean(losses))


def test_matches_scipy_on_real_liver_mask(chaos_dir):
    label, _ = load_nifti(chaos_dir / "label_2.nii.gz")
    z = int(np.argmax((label == 1).sum(axis=(0, 1))))
    liver = (label[64:192, 64:192, z] == 1).astype(np.int64)
    assert liver.sum() > 500
    rng = np.random.default_rng(0)
    fg = np.clip(np.roll(liver, 4, axis=1) * 0.8 + rng.uniform(0, 0.2, liver.shape), 0, 1)  # shifted, soft
    prob = np.stack([1 - fg, fg]).astype(np.float32)
    loss = BoundaryF1Loss()(torch.from_numpy(prob)[None], torch.from_numpy(liver)[None])
    expect = _bf1_scipy(prob, liver)
    assert float(loss) == pytest.approx(expect, abs=1e-4)
    assert 0.1 < expect < 1.0  # a 4-pixel shift with a 2-pixel tolerance is penalised but not maximal

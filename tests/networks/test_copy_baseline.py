"""The no-learning floor (``support_copy``): EP1 Dice of the copied support mask, recomputed by hand with numpy
from the label files (support slices at 1/6, 1/2, 5/6 of the support's organ, query organ slices split into
three equal chunks, docs/reference.md#adnet-ep1-and-ep2), equals what the evaluator reports for the registered method."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fsmis_monai.evaluation import evaluate
from fsmis_monai.networks.methods import build_method


def ep1_copy_dice(support: np.ndarray, query: np.ndarray) -> float:
    """Hand-made EP1 floor for one class: binary masks [H, W, Z]; 3D Dice over the query's organ slices."""
    s_z = np.flatnonzero(support.sum((0, 1)))
    q_z = np.flatnonzero(query.sum((0, 1)))
    picks = [s_z[int(f * len(s_z))] for f in (1 / 6, 1 / 2, 5 / 6)]
    bounds = np.linspace(0, len(q_z), 4).astype(int)
    pred = np.zeros_like(query)
    for k in range(3):
        for z in q_z[bounds[k]:bounds[k + 1]]:
            pred[..., z] = support[..., picks[k]]
    return 2.0 * (pred & query).sum() / (pred.sum() + query.sum())


@pytest.mark.parametrize("label", [1, 2])
def test_copy_floor_matches_a_hand_computation(chaos_dir: Path, label: int) -> None:
    support_id, query_id = 15, 20
    s = nib.load(chaos_dir / f"label_{support_id}.nii.gz").get_fdata() == label
    q = nib.load(chaos_dir / f"label_{query_id}.nii.gz").get_fdata() == label
    expected = ep1_copy_dice(s, q)
    summary = evaluate(build_method("support_copy"), chaos_dir, dataset="chaos", fold=0, protocols=["ep1"],
                       classes=[label], query_ids=[query_id], support_id=support_id, device="cpu",
                       progress=False, resume=False, save_predictions=False)
    assert summary["protocols"]["ep1"]["mean"] == pytest.approx(expected, abs=1e-6)
    assert 0.05 < expected < 0.95  # a real, non-trivial overlap: the check can fail either way


def test_copy_floor_has_nothing_to_train() -> None:
    net = build_method("support_copy", encoder="small")
    assert sum(p.numel() for p in net.parameters()) == 0
    masks = torch.zeros(1, 1, 8, 8)
    masks[..., 2:5, 2:5] = 1
    logits = net.segment(torch.zeros(2, 3, 8, 8), net.encode_support(torch.zeros(1, 3, 8, 8), masks[0]))
    assert logits.shape == (2, 2, 8, 8)
    assert torch.equal(logits.argmax(1)[0], masks[0, 0].long())
    with pytest.raises(TypeError, match="nothing to train"):
        net(torch.zeros(1, 1, 3, 8, 8), masks, torch.zeros(1, 3, 8, 8))

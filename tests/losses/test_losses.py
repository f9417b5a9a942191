"""The shared losses (fsmis_monai.losses): weighted NLL on logits and on probabilities, the threshold loss and
the prototype alignment pattern, against NumPy and hand-worked values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsmis_monai.losses import (
    prototype_alignment_loss,
    threshold_loss,
    probability_nll,
    weighted_cross_entropy,
)


def test_weighted_losses_against_numpy():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 2, 5, 5, generator=g)
    labels = torch.randint(0, 2, (2, 5, 5), generator=g)
    labels[0, 0] = 255
    lab, valid = labels.numpy(), labels.numpy() != 255
    w = np.array([0.05, 1.0])
    logp = logits.numpy() - np.log(np.exp(logits.numpy()).sum(axis=1, keepdims=True))
    picked = np.take_along_axis(logp, np.where(valid, lab, 0)[:, None], axis=1)[:, 0]
    expected = (-(w[np.where(valid, lab, 0)] * picked)[valid]).sum() / w[np.where(valid, lab, 0)][valid].sum()
    assert float(weighted_cross_entropy(logits, labels, [0.05, 1.0])) == pytest.approx(expected, rel=1e-5)

    probs = torch.softmax(logits, dim=1)
    probs[0, 1, 1, 1], probs[0, 0, 1, 1] = 0.0, 1.0  # clamped at float32 eps before the log
    p = np.clip(probs.numpy(), np.finfo(np.float32).eps, 1 - np.finfo(np.float32).eps)
    w = np.array([0.1, 1.0])
    picked = np.take_along_axis(np.log(p), np.where(valid, lab, 0)[:, None], axis=1)[:, 0]
    expected = (-(w[np.where(valid, lab, 0)] * picked)[valid]).sum() / w[np.where(valid, lab, 0)][valid].sum()
    assert float(probability_nll(probs, labels, [0.1, 1.0])) == pytest.approx(expected, rel=1e-5)
    assert float(threshold_loss(torch.tensor([-10.0]))) == pytest.approx(-0.5)


def test_alignment_loss_pattern():
    masks = torch.zeros(3, 4, 4)
    masks[:, 1:3, 1:3] = 1.0
    masks[2, 0, 0] = 0.5  # neither 0 nor 1: ignored
    seen = []

    def segment_support(fg, shot):
        seen.append((shot, float(fg.sum())))
        return torch.full((1, 2, 4, 4), float(shot))

    def criterion(out, labels):
        assert int((labels == 255).sum()) == (1 if int(out[0, 0, 0, 0]) == 2 else 0)
        return out.mean() + 1.0

    query_fg = torch.zeros(1, 4, 4)
    assert float(prototype_alignment_loss(query_fg, masks, segment_support, criterion)) == 0.0 and not seen
    loss = prototype_alignment_loss(query_fg, masks, segment_support, criterion, skip_empty=False)
    assert float(loss) == pytest.approx(((0 + 1) + (1 + 1) + (2 + 1)) / 3)
    assert [s for s, _ in seen] == [0, 1, 2]

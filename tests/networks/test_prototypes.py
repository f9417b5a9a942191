"""Shared prototype operations (fsmis_monai.networks.prototypes) against explicit computations."""

from __future__ import annotations

import numpy as np
import torch

from fsmis_monai.networks.prototypes import masked_average_pooling
from method_checks import np_map_upsampled


def test_upsampled_masked_average_pooling_matches_explicit_upsampling():
    g = torch.Generator().manual_seed(7)
    feats, masks = torch.randn(2, 4, 8, 8, generator=g), (torch.rand(2, 64, 64, generator=g) > 0.6).float()
    expected = np.stack([np_map_upsampled(feats[i], masks[i]) for i in range(2)])
    np.testing.assert_allclose(masked_average_pooling(feats, masks).numpy(), expected, rtol=1e-5, atol=1e-6)

"""LSLPN (fsmis_monai.networks.methods.lslpn): grid layout, cell prototypes and the max over covering
cells against plain loops, and the method contract on a real CHAOS episode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsmis_monai.networks.methods.lslpn import LSLPN, window_starts
from method_checks import (
    episode,  # noqa: F401 (fixture)
    one_thread,  # noqa: F401 (autouse fixture)
    small_encoder,
)


def _grid_by_hand(size: int, n_grid: int = 8):
    """Windows of side size // 8 every half side, plus one ending at the border if the last stops short."""
    k = size // n_grid
    s = k // 2
    starts = []
    y = 0
    while y + k <= size:
        starts.append(y)
        y += s
    if starts[-1] + k < size:
        starts.append(size - k)
    return starts, k


@pytest.mark.parametrize("size, cells", [(512, 225), (256, 225), (64, 225), (100, 256)])
def test_grid_counts(size, cells):
    starts, k = window_starts(size)
    assert (starts, k) == _grid_by_hand(size)
    assert len(starts) ** 2 == cells
    assert starts[-1] + k == size  # the last window ends at the border
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + k] = True
    assert covered.all()


def test_paper_grid_at_512():
    starts, k = window_starts(512)
    assert k == 64 and starts[:3] == [0, 32, 64] and starts[-1] == 448


def _model(faithful=False):
    torch.manual_seed(0)
    return LSLPN(encoder=small_encoder(), faithful=faithful)


def test_cell_prototypes_match_loop():
    model = _model()
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 5, 32, 32, generator=g)
    mask = torch.zeros(2, 32, 32)
    mask[0, 3:17, 5:21] = 1
    mask[1, 20:23, 20:24] = 1  # 12 px: only cells holding > 10 of them count
    protos, valid = model.cell_prototypes(feats, mask)
    starts, k = window_starts(32)
    for n in range(2):
        for iy, y in enumerate(starts):
            for ix, x in enumerate(starts):
                m = mask[n, y : y + k, x : x + k].numpy()
                f = feats[n, :, y : y + k, x : x + k].numpy()
                count = m.sum()
                assert bool(valid[n, iy, ix]) == (count > 10)
                expect = (f * m).sum((1, 2)) / (count + 1e-5) if count > 10 else np.zeros(5)
                np.testing.assert_allclose(protos[n, iy, ix].numpy(), expect, atol=1e-5)


@pytest.mark.parametrize("faithful", [False, True])
def test_max_over_covering_cells_matches_loop(faithful):
    model = _model(faithful)
    g = torch.Generator().manual_seed(5)
    size, c = 24, 4  # cell 3, stride 1 (floor of 1.5): 22 windows per side, up to 3 covering per axis
    feats = torch.randn(1, c, size, size, generator=g)
    protos = torch.randn(22, 22, c, generator=g)
    valid = torch.rand(22, 22, generator=g) > 0.6
    glob = torch.randn(c, generator=g)
    if faithful:  # released: empty cells hold zero prototypes and are not marked invalid
        protos = protos * valid[..., None]
        valid = torch.ones_like(valid)
    scores = model.class_scores(feats, (size, size), protos, valid, glob)[0].numpy()

    starts, k = window_starts(size)
    assert len(starts) == 22
    f = feats[0].numpy()
    unit = lambda v: v / max(np.linalg.norm(v), 1e-8)  # noqa: E731
    covering = [[i for i, s in enumerate(starts) if s <= p < s + k] for p in range(size)]
    for y in range(size):
        for x in range(size):
            fx = unit(f[:, y, x])
            cands = [
                20 * float(fx @ unit(protos[iy, ix].numpy()))
                for iy in covering[y]
                for ix in covering[x]
                if valid[iy, ix]
            ]
            if faithful:
                expect = max([-1.0] + cands)
            else:
                expect = max(cands) if cands else 20 * float(fx @ unit(glob.numpy()))
            assert scores[y, x] == pytest.approx(expect, abs=1e-4)


def test_corrected_scores_are_true_cosines_faithful_floor_at_minus_one():
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(1, 3, 32, 32, generator=g)
    protos = -feats.mean((2, 3))[0].expand(15, 15, 3).clone()  # anti-aligned prototypes: negative scores
    valid = torch.ones(15, 15, dtype=torch.bool)
    corrected = _model(False).class_scores(feats, (32, 32), protos, valid, protos[0, 0])
    faithful = _model(True).class_scores(feats, (32, 32), protos, valid, protos[0, 0])
    assert corrected.min() < -1.0
    assert faithful.min() >= -1.0
    torch.testing.assert_close(faithful, corrected.clamp(min=-1.0))


def test_query_size_must_match_support(episode):
    model = _model().eval()
    state = model.encode_support(episode["support_images"][0], episode["support_masks"][0])
    with pytest.raises(ValueError, match="differs from the support size"):
        model.segment(torch.zeros(1, 3, 32, 32), state)


def test_low_resolution_paths_equal_upsampling_first():
    """Prototypes and scores computed from stride-8 features equal those of the explicitly upsampled
    features (bilinear, align_corners=False, as released)."""
    model = _model()
    g = torch.Generator().manual_seed(9)
    feats = torch.randn(1, 6, 8, 8, generator=g)
    up = torch.nn.functional.interpolate(feats, size=(64, 64), mode="bilinear", align_corners=False)
    mask = torch.zeros(1, 64, 64)
    mask[0, 10:41, 7:30] = 1
    for a, b in zip(model.cell_prototypes(feats, mask), model.cell_prototypes(up, mask)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    protos, valid = model.cell_prototypes(feats, mask)
    glob = protos[0].reshape(-1, 6).mean(0)
    torch.testing.assert_close(
        model.class_scores(feats, (64, 64), protos[0], valid[0], glob),
        model.class_scores(up, (64, 64), protos[0], valid[0], glob),
        atol=1e-4, rtol=1e-4,
    )

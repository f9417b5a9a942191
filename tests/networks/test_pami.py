"""PAMI (fsmis_monai.networks.methods.pami): farthest-point sampling, Voronoi region prototypes and the mask
downsampling switches against plain NumPy, the ID-block threshold, and the method contract on a real
CHAOS episode."""

from __future__ import annotations

import numpy as np
import torch

from fsmis_monai.networks.methods.pami import PAMI, farthest_point_sampling, voronoi_region_prototypes
from method_checks import (
    check_segment_matches_forward,
    episode,  # noqa: F401 (fixture)
    one_thread,  # noqa: F401 (autouse fixture)
    small_encoder,
)


def _model(**kw):
    torch.manual_seed(0)
    return PAMI(encoder=small_encoder(), **kw)


def _fps_numpy(points: np.ndarray, n: int, first: int) -> list:
    chosen = [first]
    for _ in range(n - 1):
        d = np.array([min(((p - points[c]) ** 2).sum() for c in chosen) for p in points])
        chosen.append(int(np.argmax(d)))
    return chosen


def test_fps_picks_the_farthest_point():
    pts = torch.tensor([[0, 0], [0, 1], [5, 5], [9, 0], [2, 2]])
    idx = farthest_point_sampling(pts, 3, first=0).tolist()
    assert idx[1] == 3  # (9, 0): squared distance 81 from (0, 0), the largest
    assert idx[2] == 2  # (5, 5): min squared distance 41 to the chosen ones, the largest left
    rng = np.random.default_rng(0)
    cloud = rng.integers(0, 40, size=(300, 2))
    assert farthest_point_sampling(torch.from_numpy(cloud), 20, first=7).tolist() == _fps_numpy(cloud, 20, 7)


def test_voronoi_prototypes_against_numpy():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 16, 16, generator=g)
    fg = torch.zeros(16, 16, dtype=torch.bool)
    fg[3:12, 2:14] = True
    protos = voronoi_region_prototypes(feats, fg, 8, first=5)
    pts = torch.nonzero(fg).numpy()
    centres = _fps_numpy(pts, 8, 5)
    d = ((pts[:, None] - pts[centres][None]) ** 2).sum(-1)
    region = d.argmin(1)
    f = feats.numpy()[:, pts[:, 0], pts[:, 1]].T
    expect = np.stack([f[region == r].mean(0) for r in range(8)])
    np.testing.assert_allclose(protos.numpy(), expect, atol=1e-5)


def test_duplicate_centres_give_no_nan():
    feats = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1))
    fg = torch.zeros(8, 8, dtype=torch.bool)
    fg[2, 2] = fg[2, 5] = fg[6, 3] = True  # 3 pixels, 8 regions: centres repeat, 5 regions stay empty
    protos = voronoi_region_prototypes(feats, fg, 8, first=0)
    assert torch.isfinite(protos).all()
    pixel_feats = {tuple(feats[:, y, x].tolist()) for y, x in torch.nonzero(fg).tolist()}
    assert {tuple(p.tolist()) for p in protos} == pixel_feats  # every region is one of the 3 pixels


def test_mask_downsampling_switches():
    mask = torch.zeros(64, 64)
    mask[5:30, 9:22] = 1
    corrected = _model().foreground_pixels(mask, (16, 16)).numpy()
    released = _model(faithful=True).foreground_pixels(mask, (16, 16)).numpy()
    m = mask.numpy()
    # corrected: feature pixels at least half covered (4 x 4 block means)
    np.testing.assert_array_equal(corrected, m.reshape(16, 4, 16, 4).mean((1, 3)) >= 0.5)
    # released: bilinear x4 downsampling (align_corners=False) samples the mean of pixels 4i+1 and 4i+2,
    # then any non-zero value counts; plus the first 64 raster pixels forced on if fewer than 64
    bilinear = 0.25 * (m[1::4, 1::4] + m[1::4, 2::4] + m[2::4, 1::4] + m[2::4, 2::4]) > 0
    if bilinear.sum() < 64:
        bilinear.reshape(-1)[:64] = True
    np.testing.assert_array_equal(released, bilinear)
    assert released.sum() > corrected.sum()


def test_tiny_mask_keeps_its_own_pixels():
    mask = torch.zeros(64, 64)
    mask[40:44, 40:44] = 1  # one feature pixel at 16 x 16
    assert _model().foreground_pixels(mask, (16, 16)).nonzero().tolist() == [[10, 10]]
    forced = _model(force_raster_pixels=True).foreground_pixels(mask, (16, 16))
    assert forced.sum() == 65 and forced[0, :16].all()  # released: padded with the first raster pixels


def test_unused_path_changes_nothing_but_compute(episode):
    lean, full = _model(), _model(compute_unused_paths=True)
    assert lean.paths == ["down2"] and full.paths == ["down2", "down3"]
    torch.testing.assert_close(check_segment_matches_forward(lean, episode), check_segment_matches_forward(full, episode))


def test_interactive_threshold_drops_low_affinities():
    model = _model().eval()
    block = model.debias
    block.transform = lambda q, kv=None: q  # identity calibration: affinity = P' q^T
    p = torch.zeros(4, 32)
    p[:, 0] = torch.tensor([3.0, 1.0, -2.0, 0.5])
    p[:, 1] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.zeros(1, 32)
    q[0, 0] = 1.0
    # affinities 3, 1, -2, 0.5: k_c = floor((-2 + 0.625) / 2) = -1, so only -2 is dropped
    out = block.interactive(p, p, q)
    w = torch.softmax(torch.tensor([3.0, 1.0, -10000.0, 0.5]), 0)[:, None]
    expect = torch.nn.functional.layer_norm(w @ p.mean(0, keepdim=True) + p, (32,), block.norm.weight, block.norm.bias)
    torch.testing.assert_close(out, expect)

"""DIFD (fsmis_monai.networks.methods.difd): patch and box prototypes with their purity thresholds and caps
against plain loops and the released draw order, the fusion factor, the decoder inputs, the untouched
global RNG, and the method contract on a real CHAOS episode."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsmis_monai.networks.methods.difd import DIFD, DualInterspersion, fusion_factor, patch_prototypes, random_boxes
from method_checks import (
    episode,  # noqa: F401 (fixture)
    one_thread,  # noqa: F401 (autouse fixture)
    run,
    small_encoder,
)


def _model(**kw):
    torch.manual_seed(0)
    return DIFD(encoder=small_encoder(), **kw)


def _patch_counts(mask: np.ndarray):
    """fg pixel count of every 16 x 8 window at stride 8, raster order (plain loops)."""
    h, w = mask.shape
    return np.array([mask[y : y + 16, x : x + 8].sum() for y in range(0, h - 15, 8) for x in range(0, w - 7, 8)])


def test_patch_prototypes_match_unfold():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 64, 48, generator=g)
    mask = (torch.rand(64, 48, generator=g) > 0.7).float()
    fg, bg, n_fg, n_bg = patch_prototypes(feats, mask)
    pf = F.unfold(feats[None], (16, 8), stride=8)[0].reshape(3, 128, -1)  # released: unfold every patch
    pm = F.unfold(mask[None, None], (16, 8), stride=8)[0]  # [128, P]
    np.testing.assert_array_equal(n_fg.numpy(), _patch_counts(mask.numpy()))
    torch.testing.assert_close(n_bg, 128 - n_fg)
    torch.testing.assert_close(fg, ((pf * pm).sum(1) / (pm.sum(0) + 1e-5)).t())
    torch.testing.assert_close(bg, ((pf * (1 - pm)).sum(1) / ((1 - pm).sum(0) + 1e-5)).t())


@pytest.fixture
def python_random_state():
    state = random.getstate()
    yield
    random.setstate(state)


def test_patch_thresholds_and_caps(python_random_state):
    feats = torch.randn(2, 256, 256, generator=torch.Generator().manual_seed(1))
    si = DualInterspersion()
    half = np.zeros((256, 256), np.float32)
    half[:128] = 1
    counts = _patch_counts(half)
    fg_ok = np.flatnonzero(counts >= min(128 * 0.95, half.sum() / 150))
    bg_ok = np.flatnonzero(128 - counts >= min(128, (65536 - half.sum()) / 250))
    assert len(fg_ok) == len(bg_ok) == 480  # 15 patch rows x 32 columns on each side
    m = torch.from_numpy(half)
    fg, bg = si.systematic(feats, m, float(half.sum()), 65536 - float(half.sum()), random.Random(9), 9)
    assert len(fg) == 150 and len(bg) == 250  # the caps
    # the released sub-sampling: random.seed(9), then sample 150 fg patches, then 250 bg patches
    random.seed(9)
    fg_pick, bg_pick = random.sample(range(480), 150), random.sample(range(480), 250)
    all_fg, all_bg, _, _ = patch_prototypes(feats, m)
    torch.testing.assert_close(fg, all_fg[fg_ok[fg_pick]])
    torch.testing.assert_close(bg, all_bg[bg_ok[bg_pick]])


def test_small_object_threshold_is_n_fg_over_150():
    feats = torch.randn(2, 256, 256, generator=torch.Generator().manual_seed(2))
    block = np.zeros((256, 256), np.float32)
    block[100:130, 100:150] = 1  # 1500 px: patches with >= 1500 / 150 = 10 fg pixels qualify
    counts = _patch_counts(block)
    expect_fg = int((counts >= 10).sum())
    expect_bg = int((128 - counts >= 128).sum())  # min(128, 64036 / 250) = 128: pure background only
    assert 0 < expect_fg < 150 and expect_bg > 250
    fg, bg = DualInterspersion().systematic(feats, torch.from_numpy(block), 1500.0, 64036.0, random.Random(9), 9)
    assert len(fg) == expect_fg and len(bg) == 250


def _released_boxes(h, w, n=100):
    """The released draws, written out with the global generator (docs/reference.md#difd)."""
    torch.manual_seed(9)
    ar = torch.rand(n) * 1.5 + 0.5
    a0 = ar[ar <= 1]
    h0 = ((torch.rand(len(a0)) * 0.9375 + 0.0625) * (h * a0)).int()
    w0 = (h0 / a0).int()
    a1 = ar[ar > 1]
    w1 = ((torch.rand(len(a1)) * 0.9375 + 0.0625) * (w / a1)).int()
    h1 = (w1 * a1).int()
    bh, bw = torch.cat([h0, h1]), torch.cat([w0, w1])
    x1 = (torch.rand(n) * (h - bh)).int()
    y1 = (torch.rand(n) * (w - bw)).int()
    return torch.stack([x1, y1, x1 + bh, y1 + bw], 1)


def test_random_boxes_follow_released_draws_and_conditions():
    saved = torch.get_rng_state()
    try:
        expect = _released_boxes(256, 256)
    finally:
        torch.set_rng_state(saved)
    boxes = random_boxes(256, 256, 100, torch.Generator().manual_seed(9))
    torch.testing.assert_close(boxes, expect)
    assert (boxes[:, 2] <= 256).all() and (boxes[:, 3] <= 256).all() and (boxes[:, :2] >= 0).all()

    mask = np.zeros((256, 256), np.float32)
    mask[60:160, 80:200] = 1
    n_fg = mask.sum()
    n_bg = mask.size - n_fg
    feats = torch.randn(2, 256, 256, generator=torch.Generator().manual_seed(3))
    f = feats.numpy().astype(np.float64)
    expect_fg, expect_bg = [], []
    for t, l, b, r in boxes.tolist():
        m, fb = mask[t:b, l:r], f[:, t:b, l:r]
        n1 = m.sum()
        n0 = (b - t) * (r - l) - n1
        if n1 >= min((b - t) * (r - l) * 0.95, n_fg / 100) and n1 < n_fg:
            expect_fg.append((fb * m).sum((1, 2)) / (n1 + 1e-5))
        if n0 >= min((b - t) * (r - l), n_bg / 100) and n0 < n_bg:
            expect_bg.append((fb * (1 - m)).sum((1, 2)) / (n0 + 1e-5))
    fg, bg = DualInterspersion().boxes(feats, torch.from_numpy(mask), float(n_fg), float(n_bg), torch.Generator().manual_seed(9))
    assert 0 < len(expect_fg) < 100 and 0 < len(expect_bg) < 100
    np.testing.assert_allclose(fg.numpy(), np.stack(expect_fg), atol=1e-4)
    np.testing.assert_allclose(bg.numpy(), np.stack(expect_bg), atol=1e-4)


def test_fusion_factor_against_pairwise_mean():
    g = torch.Generator().manual_seed(4)
    target, source = torch.randn(2, 5, 6, 6, generator=g), torch.randn(1, 5, 6, 6, generator=g)
    mask = torch.zeros(1, 24, 24)
    mask[0, 4:12, 8:20] = 1
    small = F.interpolate(mask[:, None], size=(6, 6), mode="bilinear")[0, 0] > 0
    s = F.normalize(source[0], dim=0)[:, small].t().numpy()  # [n_i, C]
    for n in range(2):
        t = F.normalize(target[n], dim=0).flatten(1).t().numpy()  # [n_j, C]
        expect = 1 / (1 + np.exp(-(s @ t.T).mean()))
        assert float(fusion_factor(target, source, mask)[n]) == pytest.approx(expect, abs=1e-5)
    assert (fusion_factor(target, source, torch.zeros(1, 24, 24)) == 0).all()


@pytest.mark.parametrize("variant, extra", [("intended", 3), ("released", 1)])
def test_decoder_inputs(episode, variant, extra):
    model = _model(decoder_inputs=variant).eval()
    with torch.no_grad():
        state = model.encode_support(episode["support_images"][0], episode["support_masks"][0])
        q = model.encoder(episode["query_images"])
        x = model.deploy(state["bases"]["fg"], q["down2"], state["features"], state["masks"], q["tau"], state["tau"])
    assert x.shape[1] == 2 * 32 + extra == model.fg_decoder.merge[0].in_channels
    torch.testing.assert_close(x[:, :32], q["down2"])
    if variant == "intended":  # last map: cosine to the global prototype (last basis row)
        glob = state["bases"]["fg"][-1]
        torch.testing.assert_close(x[:, -1], F.cosine_similarity(q["down2"], glob[None, :, None, None], dim=1), atol=1e-5, rtol=0)


def test_forward_leaves_global_rngs_alone(episode):
    model = _model().eval()
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    with torch.no_grad():
        run(model, episode)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert py_state == random.getstate()
    assert all(np.array_equal(a, b) for a, b in zip(np_state[1:2], np.random.get_state()[1:2]))
    # in training, dropout draws from the global RNG, which is never reset: different seeds stay different
    # (the released forward reseeds it to 9, which would make the two draws below equal)
    model.train()
    draws = []
    for seed in (123, 456):
        torch.manual_seed(seed)
        run(model, episode)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])


def test_empty_support_mask_has_no_fg_patches(episode):
    model = _model().eval()
    with torch.no_grad():
        state = model.encode_support(episode["support_images"][0], torch.zeros_like(episode["support_masks"][0]))
        assert len(state["bases"]["fg"]) == 2  # the (zero) global MAP, appended again at the end
        assert torch.isfinite(model.segment(episode["query_images"], state)).all()


def test_fresh_interspersion_draws_without_a_seed(episode):
    model = _model(interspersion_seed=None).eval()
    feats = model.encoder(episode["support_images"][0])["down2"].detach()
    masks = episode["support_masks"][0]
    torch.manual_seed(0)
    first = model.bases(feats, masks)["fg"]
    second = model.bases(feats, masks)["fg"]
    torch.manual_seed(0)
    again = model.bases(feats, masks)["fg"]
    assert first.shape != second.shape or not torch.equal(first, second)  # new boxes at every call
    torch.testing.assert_close(first, again)  # ... drawn from the (seeded) global generator

"""GMRD (fsmis_monai.networks.methods.gmrd): descriptor counts, edge masks, the filled map and the auxiliary
losses against independent computations, the empty-mask fallback, and the method contract on a real
CHAOS episode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsmis_monai.networks.methods.gmrd import (
    GMRD,
    descriptor_consistency_loss,
    fill_outside_mask,
    inner_edge_mask,
    outer_edge_mask,
)
from method_checks import (
    episode,  # noqa: F401 (fixture)
    one_thread,  # noqa: F401 (autouse fixture)
    small_encoder,
)


def _model(**kw):
    torch.manual_seed(0)
    return GMRD(encoder=small_encoder(), image_size=64, **kw)


def _chebyshev_within(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels within Chebyshev distance r of a mask pixel (plain loops, image border not padded)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            out[y, x] = mask[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].max()
    return out


def test_edge_masks_against_loops():
    m = np.zeros((12, 12), np.float32)
    m[2:9, 3:10] = 1  # 7 x 7 object
    m[0:3, 0:2] = 1  # touching the image border: the border must not erode it
    t = torch.from_numpy(m)
    eroded = 1 - _chebyshev_within(1 - m, 2)
    np.testing.assert_array_equal(inner_edge_mask(t).numpy(), m - eroded)
    band = _chebyshev_within(m, 2) - m
    np.testing.assert_array_equal(outer_edge_mask(t, "band").numpy(), band)
    assert set(np.unique(band)) == {0, 1}
    released = outer_edge_mask(t, "released").numpy()
    np.testing.assert_array_equal(released, _chebyshev_within(1 - m, 2) - m)
    # docs/reference.md#quirk-gmrd-release: +1 on all background, 0 on the inner 2-px band, -1 inside the object
    assert (released[m == 0] == 1).all()
    assert released[5, 6] == -1 and released[2, 5] == 0


def test_fill_outside_mask():
    g = torch.Generator().manual_seed(0)
    feats = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16)  # column j = pixel j, all distinct
    many = torch.zeros(16)
    many[:10] = 1  # 10 inside, 6 outside: drawn without replacement
    out = fill_outside_mask(feats, many, g)
    torch.testing.assert_close(out[:, :10], feats[:, :10])
    picked = out[0, 10:].long().tolist()
    assert len(set(picked)) == 6 and set(picked) <= set(range(10))
    torch.testing.assert_close(out[1, 10:], feats[1, picked])  # whole feature vectors are copied
    few = torch.zeros(16)
    few[[3, 7, 11]] = 1  # 3 inside, 13 outside: every inside pixel used 4 times, one of them a 5th time
    out = fill_outside_mask(feats, few, g)
    outside = [j for j in range(16) if few[j] == 0]
    counts = np.bincount(out[0, outside].long().numpy(), minlength=16)[[3, 7, 11]]
    assert sorted(counts.tolist()) == [4, 4, 5]
    assert fill_outside_mask(feats, torch.zeros(16), g).abs().sum() == 0


def test_descriptor_counts(episode):
    model = _model().eval()
    feats = model.encoder(episode["support_images"][0])["down2"]
    d = model.descriptors(feats[0], episode["support_masks"][0, 0], torch.Generator().manual_seed(0))
    assert d["fg"].shape == (102, 32) and d["bg"].shape == (602, 32)
    full = F.interpolate(feats, size=(64, 64), mode="bilinear", align_corners=True)[0]
    m = episode["support_masks"][0, 0]
    # rows 100 / 600: global MAP; last row: edge prototype (independent sums)
    torch.testing.assert_close(d["fg"][100], (full * m).sum((1, 2)) / (m.sum() + 1e-5))
    edge = inner_edge_mask(m)
    torch.testing.assert_close(d["fg"][101], (full * edge).sum((1, 2)) / (edge.sum() + 1e-5))
    torch.testing.assert_close(d["bg"][600], (full * (1 - m)).sum((1, 2)) / ((1 - m).sum() + 1e-5))


def test_consistency_loss_against_numpy():
    g = torch.Generator().manual_seed(1)
    sf, qf, sb, qb = (torch.randn(n, 6, generator=g) for n in (7, 7, 9, 9))

    def unit(a):
        a = a.numpy().astype(np.float64)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    def agreement(s, q):
        s, q = unit(s), unit(q)
        vals = [max(s[i] @ q[j] for j in range(len(q) - 2)) for i in range(len(s) - 2)]
        vals += [s[-2] @ q[-2], s[-1] @ q[-1]]
        return np.mean(vals)

    intra = 2 - agreement(sf, qf) - agreement(sb, qb)
    inter = max(0.0, (unit(sf) @ unit(sb).T).mean()) + max(0.0, (unit(qf) @ unit(qb).T).mean())
    assert float(descriptor_consistency_loss(sf, qf, sb, qb)) == pytest.approx(intra + inter, abs=1e-5)


def test_image_size_mismatch_is_explained(episode):
    model = GMRD(encoder=small_encoder(), image_size=32)
    with pytest.raises(ValueError, match="built for 32x32 images"):
        model.encode_support(episode["support_images"][0], episode["support_masks"][0])


def test_switches():
    paper, released = _model(), _model(faithful=True)
    assert any(isinstance(m, torch.nn.ReLU) for m in paper.fg_mlp) and paper.outer_edge == "band"
    assert not any(isinstance(m, torch.nn.ReLU) for m in released.fg_mlp) and released.outer_edge == "released"
    assert released.auxiliary_weight == 0 and paper.auxiliary_weight == 0.5


def test_empty_support_mask_uses_threshold_fallback(episode):
    model = _model().eval()
    ep = dict(episode, support_masks=torch.zeros_like(episode["support_masks"]))
    with torch.no_grad():
        state = model.encode_support(ep["support_images"][0], ep["support_masks"][0])
        assert state["fallback"]
        logits = model.segment(ep["query_images"], state)
        q = model.encoder(ep["query_images"])
        # zero mask -> zero prototype -> cos 0 -> p = 1 - sigmoid(0.5 * (0 - tau)) everywhere
        p = 1 - torch.sigmoid(0.5 * (0 - q["tau"]))
        torch.testing.assert_close(torch.softmax(logits, 1)[:, 1], p.reshape(-1, 1, 1).expand(-1, 64, 64), atol=1e-5, rtol=0)
    out = model.train()(ep["support_images"], ep["support_masks"], ep["query_images"], ep["query_labels"])
    assert torch.isfinite(model.total_loss(out))

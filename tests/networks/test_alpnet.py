"""SSL-ALPNet (fsmis_monai.networks.methods.alpnet): local and global prototypes and the softmax-weighted score
against plain loops, the fg check window switch, and a real CHAOS slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsmis_monai.io import load_nifti
from fsmis_monai.networks.methods.alpnet import ALPNet
from method_checks import np_cos


def _np_alp(features: np.ndarray, masks: np.ndarray, window: int, check: int, purity: float = 0.95):
    """Plain-loop SSL-ALPNet prototype sets for features [K, C, h, w], masks [K, h, w] at feature size."""
    k_, c_, h, w = features.shape
    bg, fg_local = [], []
    for k in range(k_):
        for i in range(h // window):
            for j in range(w // window):
                sl = (slice(i * window, (i + 1) * window), slice(j * window, (j + 1) * window))
                proto = features[k][(slice(None),) + sl].mean(axis=(1, 2))
                fg_share = masks[k][sl].mean()
                if 1.0 - fg_share > purity:
                    bg.append(proto)
                if fg_share > purity:
                    fg_local.append(proto)
    globals_ = [(features[k] * masks[k]).sum(axis=(1, 2)) / (masks[k].sum() + 1e-5) for k in range(k_)]
    pure = any(
        masks[k][i : i + check, j : j + check].mean() >= purity
        for k in range(k_) for i in range(0, h - check + 1, check) for j in range(0, w - check + 1, check)
    )
    fg = fg_local + globals_ if pure else [np.mean(globals_, axis=0)]
    return np.array(bg).reshape(-1, c_), np.array(fg)


def _np_softmax_score(features: np.ndarray, protos: np.ndarray) -> np.ndarray:
    if len(protos) == 0:
        return np.zeros(features.shape[1:])
    d = np.stack([20.0 * np_cos(features, p, 1e-4) for p in protos])
    e = np.exp(d - d.max(axis=0))
    return (e / e.sum(axis=0) * d).sum(axis=0)


@pytest.mark.parametrize("faithful", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_alp_prototypes_and_softmax_weighted_score(faithful, training):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 6, 8, 8, generator=g)
    masks = torch.zeros(2, 8, 8)
    masks[0, 1:4, 1:4] = 1.0  # pure 2x2 windows, no pure 4x4 window
    masks[1, 4:8, 0:7] = 1.0  # one pure 4x4 window
    model = ALPNet(encoder="small", faithful=faithful).train(training)
    window = 4 if training else 2
    state = model.prototypes(feats, masks, window)
    bg, fg = _np_alp(feats.numpy(), masks.numpy(), window, 4 if faithful else window)
    np.testing.assert_allclose(state["bg"].numpy(), bg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["fg"].numpy(), fg, rtol=1e-5, atol=1e-6)
    query = torch.randn(1, 6, 8, 8, generator=g)
    scores = model.scores(query, state)[0].numpy()
    np.testing.assert_allclose(scores[0], _np_softmax_score(query[0].numpy(), bg), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores[1], _np_softmax_score(query[0].numpy(), fg), rtol=1e-4, atol=1e-4)


def test_alp_fg_check_window_switch():
    """A foreground with pure 2x2 but no pure 4x4 window: at test time the corrected check keeps its local
    prototypes; the faithful (released) 4x4 check falls back to the global prototype alone."""
    feats = torch.randn(1, 6, 8, 8)
    masks = torch.zeros(1, 8, 8)
    masks[0, 1:4, 1:4] = 1.0
    corrected = ALPNet(encoder="small").eval().prototypes(feats, masks, 2)["fg"]
    faithful = ALPNet(encoder="small", faithful=True).eval().prototypes(feats, masks, 2)["fg"]
    assert corrected.shape[0] == 2 and faithful.shape[0] == 1


def test_alp_on_a_real_chaos_slice(chaos_dir):
    """Local prototypes of a real liver mask: the count of pure windows matches a plain count on the mask."""
    image, _ = load_nifti(chaos_dir / "image_1.nii.gz", dtype=np.float32)
    label, _ = load_nifti(chaos_dir / "label_1.nii.gz")
    z = int(np.argmax((label == 1).sum(axis=(0, 1))))
    img = torch.from_numpy((image[..., z] - image.mean()) / image.std())[None, None].repeat(1, 3, 1, 1)
    mask = torch.from_numpy((label[..., z] == 1).astype(np.float32))[None]
    model = ALPNet(encoder="small").eval()
    with torch.no_grad():
        feats = model.encoder(F.interpolate(img, size=(128, 128), mode="bilinear"))["down3"]  # 16 x 16
        state = model.encode_support(F.interpolate(img, size=(128, 128), mode="bilinear"),
                                     F.interpolate(mask[None], size=(128, 128), mode="nearest")[0])
    small = F.interpolate(F.interpolate(mask[None], size=(128, 128), mode="nearest"), size=(16, 16),
                          mode="bilinear", align_corners=False)[0].numpy()
    bg, fg = _np_alp(feats.numpy(), small, window=2, check=2)
    assert len(fg) > 2, "the liver slice should give several pure 2x2 windows"
    assert state["fg"].shape[0] == len(fg) and state["bg"].shape[0] == len(bg)
    np.testing.assert_allclose(state["fg"].numpy(), fg, rtol=1e-4, atol=1e-5)

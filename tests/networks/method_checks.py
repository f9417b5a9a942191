"""Helpers of the method tests (``tests/networks``): a real CHAOS episode at a small size, a synthetic episode
(with ignored pixels) for SSL-ALPNet / ADNet / Q-Net, NumPy versions of cosine and MAP, and the contract checks
every method must pass (training step, determinism, encode_support + segment == forward, fitting one real
episode), run by ``test_contract.py``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsmis_monai.io import load_nifti
from fsmis_monai.networks.methods import build_method
from fsmis_monai.networks.encoders import SmallEncoder


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny ops: on a loaded machine two threads make them 20x slower (measured on
    the LSLPN fit test: 0.9 s with one thread, 18 s with two), so they run single-threaded."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_encoder() -> SmallEncoder:
    """A CPU-fast encoder with the Q-Net output layout (down2 stride 4, down3 stride 8, tau), 32 channels."""
    return SmallEncoder(channels=32, width=16)


@functools.lru_cache(maxsize=4)
def _liver_slices(scan: Path, size: int):
    image, _ = load_nifti(scan / "image_2.nii.gz", dtype=np.float32)
    label, _ = load_nifti(scan / "label_2.nii.gz")
    liver = label == 1  # CHAOS-T2 label 1 = liver
    z = int(np.argmax(liver.sum(axis=(0, 1))))
    img = torch.from_numpy((image - image.mean()) / image.std())
    pick = lambda k: F.interpolate(img[None, None, :, :, k], size=(size, size), mode="area")[0, 0]  # noqa: E731
    lab = lambda k: F.interpolate(  # noqa: E731
        torch.from_numpy(liver[:, :, k].astype(np.float32))[None, None], size=(size, size), mode="nearest"
    )[0, 0]
    return pick(z), lab(z), pick(z + 1), lab(z + 1)


def liver_episode(chaos_dir: Path, size: int = 64) -> Dict[str, torch.Tensor]:
    """One-shot episode from CHAOS-T2 scan 2: support = the slice with the largest liver, query = the next
    slice; z-scored, area-downsampled to ``size`` (labels nearest), tiled to 3 channels."""
    s_img, s_mask, q_img, q_mask = _liver_slices(Path(chaos_dir), size)
    assert s_mask.sum() > 20 and q_mask.sum() > 20
    return {
        "support_images": s_img.expand(3, -1, -1)[None, None].clone(),
        "support_masks": s_mask[None, None].clone(),
        "query_images": q_img.expand(3, -1, -1)[None].clone(),
        "query_labels": q_mask[None].long(),
    }


@pytest.fixture(scope="module")
def episode(chaos_dir):
    """The 64 x 64 CHAOS liver episode of :func:`liver_episode`."""
    return liver_episode(chaos_dir, 64)


def run(model, ep, labels: bool = True):
    return model(ep["support_images"], ep["support_masks"], ep["query_images"], ep["query_labels"] if labels else None)


def check_training_step(model, ep, expected_losses, own_modules) -> None:
    """Shapes, finite named losses, and gradients reaching the encoder and the method's own modules."""
    model.train()
    out = run(model, ep)
    b, _, h, w = ep["query_images"].shape
    assert out["logits"].shape == (b, 2, h, w)
    assert torch.isfinite(out["logits"]).all()
    assert set(out["losses"]) == set(expected_losses)
    for name, value in out["losses"].items():
        assert value.dim() == 0 and torch.isfinite(value), name
    model.zero_grad()
    model.total_loss(out).backward()
    # the encoder's unused heads (e.g. tau for LSLPN) get no gradient; the method's own modules must
    for module, complete in [(model.encoder, False), *[(m, True) for m in own_modules]]:
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        if complete:
            assert all(g is not None for g in grads), type(module).__name__
        grads = [g for g in grads if g is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), type(module).__name__
        assert sum(float(g.abs().sum()) for g in grads) > 0, type(module).__name__
    # a batch of two 2-shot episodes: same loss terms, all finite
    out = run(model, two_by_two(ep))
    assert out["logits"].shape == (2, 2, h, w) and set(out["losses"]) == set(expected_losses)
    assert torch.isfinite(model.total_loss(out))


def check_deterministic(factory: Callable[[], torch.nn.Module], ep) -> None:
    """Same seed -> same weights, same training losses and logits."""
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = factory()
        model.train()
        torch.manual_seed(1)
        out = run(model, ep)
        outs.append((out["logits"].detach(), {k: float(v.detach()) for k, v in out["losses"].items()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    assert outs[0][1] == outs[1][1]


def two_by_two(ep) -> Dict[str, torch.Tensor]:
    """A batch of 2 two-shot episodes from the real one: shots = (slice, its mirror image); the second
    episode is the first rotated by 90 degrees."""
    flip = lambda x: torch.flip(x, dims=(-1,))  # noqa: E731
    rot = lambda x: torch.rot90(x, 1, dims=(-2, -1))  # noqa: E731
    s_img = torch.cat([ep["support_images"], flip(ep["support_images"])], dim=1)
    s_mask = torch.cat([ep["support_masks"], flip(ep["support_masks"])], dim=1)
    return {
        "support_images": torch.cat([s_img, rot(s_img)]),
        "support_masks": torch.cat([s_mask, rot(s_mask)]),
        "query_images": torch.cat([ep["query_images"], rot(ep["query_images"])]),
        "query_labels": torch.cat([ep["query_labels"], rot(ep["query_labels"])]),
    }


def check_segment_matches_forward(model, ep, atol: float = 1e-4) -> torch.Tensor:
    """In eval mode, encode_support + segment gives the forward logits, episode by episode, for one 1-shot
    episode and for a batch of two 2-shot episodes; returns the 1-shot logits."""
    model.eval()
    with torch.no_grad():
        for batch in (ep, two_by_two(ep)):
            logits = run(model, batch, labels=False)["logits"]
            for i in range(len(logits)):
                state = model.encode_support(batch["support_images"][i], batch["support_masks"][i])
                segmented = model.segment(batch["query_images"][i : i + 1], state)
                torch.testing.assert_close(segmented, logits[i : i + 1], rtol=0, atol=atol)
            if batch is ep:
                single = logits
    return single


def dice(logits: torch.Tensor, labels: torch.Tensor) -> float:
    pred = logits.argmax(1) == 1
    gt = labels == 1
    return float(2 * (pred & gt).sum() / (pred.sum() + gt.sum()).clamp(min=1))


def check_fits_episode(model, ep, steps: int = 12, lr: float = 1e-3) -> None:
    """A few Adam steps on one real episode lower the training loss and raise the query Dice."""
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    first = None
    for _ in range(steps):
        out = run(model, ep)
        first = out["logits"].detach() if first is None else first
        loss = model.total_loss(out)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = run(model, ep, labels=False)["logits"]
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    assert dice(final, ep["query_labels"]) > max(dice(first, ep["query_labels"]), 0.5)


# ----------------------------------------------- synthetic episodes and NumPy helpers (SSL-ALPNet, ADNet, Q-Net)

SIZE = 64
LOSS_TERMS = {"ssl_alpnet": {"query_ce", "align"}, "adnet": {"query_nll", "align", "threshold"}, "qnet": {"query_nll", "align"}}


def synthetic_episode(batch: int = 2, shots: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(batch, shots, 3, SIZE, SIZE, generator=g)
    masks = torch.zeros(batch, shots, SIZE, SIZE)
    masks[..., 12:44, 16:52] = 1.0
    query = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    labels = torch.zeros(batch, SIZE, SIZE, dtype=torch.long)
    labels[:, 16:40, 20:48] = 1
    labels[:, :2] = 255
    return support, masks, query, labels


def build(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return build_method(name, encoder="small", **kwargs)


def fg_probability(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits, dim=1)[:, 1].detach().numpy()


def np_cos(features: np.ndarray, proto: np.ndarray, eps: float) -> np.ndarray:
    """cos(f(x), p) for features [C, h, w] with norms clamped at eps."""
    f = features / np.maximum(np.linalg.norm(features, axis=0, keepdims=True), eps)
    return np.einsum("chw,c->hw", f, proto / max(np.linalg.norm(proto), eps))


def np_map_upsampled(features: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """MAP of one image's features upsampled (bilinear, align_corners=False) to the mask size: [C]."""
    up = F.interpolate(features[None], size=mask.shape, mode="bilinear", align_corners=False)[0].numpy()
    m = mask.numpy()
    return (up * m).sum(axis=(1, 2)) / (m.sum() + 1e-5)

"""SSL-ALPNet, ADNet and Q-Net: the method contract, their equations against independent computations
written here (NumPy / plain loops), the shared losses, and the switches for documented reference quirks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsmis_monai.io import load_nifti
from fsmis_monai.losses import (
    prototype_alignment_loss,
    threshold_loss,
    probability_nll,
    weighted_cross_entropy,
)
from fsmis_monai.networks.methods import build_method
from fsmis_monai.networks.methods.adnet import ADNet
from fsmis_monai.networks.methods.alpnet import ALPNet
from fsmis_monai.networks.methods.qnet import QNet
from fsmis_monai.networks.prototypes import masked_average_pooling

SIZE = 64
LOSS_TERMS = {"ssl_alpnet": {"query_ce", "align"}, "adnet": {"query_nll", "align", "threshold"}, "qnet": {"query_nll", "align"}}


def _episode(batch: int = 2, shots: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(batch, shots, 3, SIZE, SIZE, generator=g)
    masks = torch.zeros(batch, shots, SIZE, SIZE)
    masks[..., 12:44, 16:52] = 1.0
    query = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    labels = torch.zeros(batch, SIZE, SIZE, dtype=torch.long)
    labels[:, 16:40, 20:48] = 1
    labels[:, :2] = 255
    return support, masks, query, labels


def _build(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return build_method(name, encoder="small", **kwargs)


def _fg_probability(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits, dim=1)[:, 1].detach().numpy()


def _np_cos(features: np.ndarray, proto: np.ndarray, eps: float) -> np.ndarray:
    """cos(f(x), p) for features [C, h, w] with norms clamped at eps."""
    f = features / np.maximum(np.linalg.norm(features, axis=0, keepdims=True), eps)
    return np.einsum("chw,c->hw", f, proto / max(np.linalg.norm(proto), eps))


def _np_map_upsampled(features: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """MAP of one image's features upsampled (bilinear, align_corners=False) to the mask size: [C]."""
    up = F.interpolate(features[None], size=mask.shape, mode="bilinear", align_corners=False)[0].numpy()
    m = mask.numpy()
    return (up * m).sum(axis=(1, 2)) / (m.sum() + 1e-5)


# ------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", ["ssl_alpnet", "adnet", "qnet"])
def test_training_forward_backward_reaches_encoder(name):
    model = _build(name).train()
    support, masks, query, labels = _episode()
    out = model(support, masks, query, labels)
    assert out["logits"].shape == (2, 2, SIZE, SIZE)
    assert set(out["losses"]) == LOSS_TERMS[name]
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out["losses"].values())
    model.total_loss(out).backward()
    stem = model.encoder.stem.conv.weight.grad
    assert stem is not None and float(stem.abs().sum()) > 0
    if name == "adnet":
        assert model.threshold.grad is not None and float(model.threshold.grad.abs()) > 0


@pytest.mark.parametrize("name", ["ssl_alpnet", "adnet", "qnet"])
def test_same_seed_same_result(name):
    support, masks, query, labels = _episode(batch=1, shots=1)
    a = _build(name, seed=3)(support, masks, query, labels)
    b = _build(name, seed=3)(support, masks, query, labels)
    assert torch.equal(a["logits"], b["logits"])
    assert all(torch.equal(a["losses"][k], b["losses"][k]) for k in a["losses"])
    c = _build(name, seed=4)(support, masks, query, labels)
    assert not torch.equal(a["logits"], c["logits"])


@pytest.mark.parametrize("name", ["ssl_alpnet", "adnet", "qnet"])
def test_encode_once_then_segment_equals_forward_in_eval(name):
    model = _build(name).eval()
    support, masks, query, _ = _episode()
    with torch.no_grad():
        joint = model(support, masks, query)["logits"]
        for b in range(2):
            state = model.encode_support(support[b], masks[b])
            separate = model.segment(query[b : b + 1], state)
            # compare probabilities: the joint pass batches support and query through the encoder together
            np.testing.assert_allclose(_fg_probability(separate), _fg_probability(joint[b : b + 1]), atol=2e-4)


def test_registry_names_and_classes():
    assert type(_build("ssl_alpnet")) is ALPNet and ALPNet.name == "ssl_alpnet"
    assert type(_build("adnet")) is ADNet and type(_build("qnet")) is QNet


class _CoarseOnly(torch.nn.Module):
    """An encoder with only a ``down3`` output (the ALP/ADNet layout)."""

    out_channels = 3

    def forward(self, x):
        return {"down3": F.avg_pool2d(x, 8)}


def test_encoder_without_threshold_head_is_refused():
    with pytest.raises(ValueError, match="lacks \\['down2', 'tau'\\]"):
        QNet(encoder=_CoarseOnly()).encode_support(torch.zeros(1, 3, 16, 16), torch.zeros(1, 16, 16))


# ------------------------------------------------------------------------------------- equations


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
    d = np.stack([20.0 * _np_cos(features, p, 1e-4) for p in protos])
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


def test_adnet_probability_equation():
    model = ADNet(encoder="small").eval()
    with torch.no_grad():
        model.threshold.fill_(-7.3)
    g = torch.Generator().manual_seed(2)
    feats, proto = torch.randn(2, 5, 6, 6, generator=g), torch.randn(5, generator=g)
    p = model.probability(feats, proto).detach().numpy()[:, 0]
    for n in range(2):
        cos = _np_cos(feats[n].numpy(), proto.numpy(), 1e-8)
        np.testing.assert_allclose(p[n], 1.0 / (1.0 + np.exp(-(10.0 * cos + 0.5 * -7.3))), rtol=1e-5, atol=1e-6)
    # the reference's form 1 - sigmoid(0.5 (S - T)) with S = -20 cos, on the whole segment path
    support, masks, query, _ = _episode(batch=1, shots=2)
    with torch.no_grad():
        s_feats = model.encoder(support[0])["down3"]
        q_feats = model.encoder(query)["down3"][0]
        proto = np.mean([_np_map_upsampled(s_feats[k], masks[0, k]) for k in range(2)], axis=0)
        probs = model.segment(query, model.encode_support(support[0], masks[0]))
    s = -20.0 * _np_cos(q_feats.numpy(), proto, 1e-8)
    p_small = 1.0 - 1.0 / (1.0 + np.exp(-0.5 * (s - -7.3)))
    expected = F.interpolate(torch.from_numpy(p_small)[None, None].float(), size=(SIZE, SIZE), mode="bilinear",
                             align_corners=True)[0, 0].numpy()
    np.testing.assert_allclose(_fg_probability(probs)[0], expected, atol=1e-5)


def test_qnet_query_informed_threshold_and_alpha_fusion():
    model = QNet(encoder="small", alpha=0.7, refine_steps=0).eval()
    support, masks, query, _ = _episode(batch=1, shots=1)
    with torch.no_grad():
        s_out, q_out = model.encoder(support[0]), model.encoder(query)
        probs = _fg_probability(model.segment(query, model.encode_support(support[0], masks[0])))[0]
    tau = float(q_out["tau"][0])
    ups = {}
    for path in ("down2", "down3"):
        proto = _np_map_upsampled(s_out[path][0], masks[0, 0])
        cos = _np_cos(q_out[path][0].numpy(), proto, 1e-8)
        p = 1.0 - 1.0 / (1.0 + np.exp(-0.5 * (-20.0 * cos - tau)))
        ups[path] = F.interpolate(torch.from_numpy(p)[None, None].float(), size=(SIZE, SIZE), mode="bilinear",
                                  align_corners=True)[0, 0].numpy()
    np.testing.assert_allclose(probs, 0.7 * ups["down2"] + 0.3 * ups["down3"], atol=1e-5)


def test_qnet_refinement_only_at_test_time():
    support, masks, query, labels = _episode(batch=1, shots=1)
    refined, plain = _build("qnet", refine_steps=7), _build("qnet", refine_steps=0)
    assert torch.equal(refined(support, masks, query, labels)["logits"], plain(support, masks, query, labels)["logits"])
    refined.eval(), plain.eval()
    with torch.no_grad():
        a = refined.segment(query, refined.encode_support(support[0], masks[0]))
        b = plain.segment(query, plain.encode_support(support[0], masks[0]))
    assert float((torch.softmax(a, 1) - torch.softmax(b, 1)).abs().max()) > 1e-3
    assert refined.test_time_grad and not plain.test_time_grad
    with torch.inference_mode():  # refinement still runs (on clones made outside inference mode)
        c = refined.segment(query, refined.encode_support(support[0], masks[0]))
    torch.testing.assert_close(c, a)


def _refinement_objective(features, proto, mask):
    """BCE(sigmoid(minmax(filled)), sigmoid(minmax(features))) for one image, the fg mask held fixed."""
    def squash(x):
        return torch.sigmoid((x - x.min()) / (x.max() - x.min()))
    filled = features * (1 - mask) + proto[:, None, None] * mask
    x, t = squash(filled), squash(features)
    return float(-(t * torch.log(x) + (1 - t) * torch.log(1 - x)).mean())


def test_qnet_refinement_batched_per_slice_and_direction():
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(3, 8, 6, 6, generator=g)
    proto = feats[0, :, 2, 2].clone()
    tau = torch.tensor([-6.0, -12.0, -9.0])
    model = QNet(encoder="small", refine_steps=1)
    batched = model.refine_prototype(feats, proto, tau)
    singles = torch.cat([model.refine_prototype(feats[i : i + 1], proto, tau[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[0], proto)
    # one corrected step lowers the objective (mask from the initial prototype, as the step sees it)
    with torch.no_grad():
        p = model._probability(feats, proto, tau)[:, 0]
    for i in range(3):
        mask = (p[i] > 1 - p[i]).float()
        assert _refinement_objective(feats[i], batched[i], mask) < _refinement_objective(feats[i], proto, mask)
    faithful = QNet(encoder="small", refine_steps=1, faithful=True).refine_prototype(feats, proto, tau)
    assert not torch.allclose(faithful, batched)


# ------------------------------------------------------------------------------------- losses


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


def test_upsampled_masked_average_pooling_matches_explicit_upsampling():
    g = torch.Generator().manual_seed(7)
    feats, masks = torch.randn(2, 4, 8, 8, generator=g), (torch.rand(2, 64, 64, generator=g) > 0.6).float()
    expected = np.stack([_np_map_upsampled(feats[i], masks[i]) for i in range(2)])
    np.testing.assert_allclose(masked_average_pooling(feats, masks).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pretrained_weights_reach_a_given_encoder_module(tmp_path):
    from fsmis_monai.io import torch_save
    from fsmis_monai.networks.encoders import build_encoder

    torch.manual_seed(8)
    source = build_encoder("small")
    torch_save({"model": {"encoder." + k: v for k, v in source.state_dict().items()}}, tmp_path / "trained.pt")
    torch.manual_seed(9)
    model = build_method("adnet", encoder=build_encoder("small"), pretrained_weights=tmp_path / "trained.pt")
    assert len(model.encoder.weight_report.matched) == len(source.state_dict())
    assert torch.equal(model.encoder.stem.conv.weight, source.stem.conv.weight)

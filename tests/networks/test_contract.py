"""The method contract every registered method passes: training step (shapes, named finite losses, gradients),
determinism under a seed, encode_support + segment == forward in eval mode, and fitting one real episode.

SSL-ALPNet, ADNet and Q-Net are checked on a synthetic episode with ignored pixels; LSLPN, GMRD, PAMI and DIFD
on a real CHAOS episode with the checks of ``method_checks`` (which also test their own modules' gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsmis_monai.networks.methods import METHODS
from fsmis_monai.networks.methods.adnet import ADNet
from fsmis_monai.networks.methods.alpnet import ALPNet
from fsmis_monai.networks.methods.difd import DIFD
from fsmis_monai.networks.methods.gmrd import GMRD
from fsmis_monai.networks.methods.lslpn import LSLPN
from fsmis_monai.networks.methods.pami import PAMI
from fsmis_monai.networks.methods.qnet import QNet
from method_checks import (
    LOSS_TERMS,
    SIZE,
    build,
    check_deterministic,
    check_fits_episode,
    check_segment_matches_forward,
    check_training_step,
    episode,  # noqa: F401 (fixture)
    fg_probability,
    one_thread,  # noqa: F401 (autouse fixture)
    small_encoder,
    synthetic_episode,
)

SYNTHETIC = ["ssl_alpnet", "adnet", "qnet"]  # contract on a synthetic episode
REAL = {"lslpn": LSLPN, "gmrd": GMRD, "pami": PAMI, "difd": DIFD}  # contract on a real CHAOS episode


def _model(name: str, **kw):
    torch.manual_seed(0)
    kw = dict(kw, image_size=64) if name == "gmrd" else kw
    return REAL[name](encoder=small_encoder(), **kw)


# (method, faithful): expected loss terms and the method's own modules that must all receive gradients
TRAINING = {
    ("lslpn", False): ({"query_ce"}, lambda m: []),
    ("gmrd", False): ({"query_nll", "align", "aux"}, lambda m: [m.fg_mlp, m.bg_mlp, m.fg_decoder, m.bg_decoder]),
    ("gmrd", True): ({"query_nll", "align"}, lambda m: [m.fg_decoder, m.bg_decoder]),
    **{("pami", f): ({"query_nll", "align", "proto_mse", "query_self"},
                     lambda m: [m.debias.query_injection, m.debias.merge]) for f in (False, True)},
    **{("difd", f): ({"query_nll", "query_boundary", "align_nll", "align_boundary"},
                     lambda m: [m.fuse, m.fg_decoder, m.bg_decoder]) for f in (False, True)},
}
SEGMENT = [("lslpn", False), ("lslpn", True), ("gmrd", False), ("pami", False), ("pami", True), ("difd", False),
           ("difd", True)]
FIT = {"lslpn": {}, "gmrd": {}, "pami": {}, "difd": {"steps": 16, "lr": 3e-3}}
# every registered method but the prototype baseline (a reference point, not a published method) is checked here
assert set(SYNTHETIC) | set(REAL) == set(METHODS) - {"prototype"}, sorted(METHODS)


# ------------------------------------------------------------------------- synthetic episode (ALPNet, ADNet, Q-Net)


@pytest.mark.parametrize("name", ["ssl_alpnet", "adnet", "qnet"])
def test_training_forward_backward_reaches_encoder(name):
    model = build(name).train()
    support, masks, query, labels = synthetic_episode()
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
    support, masks, query, labels = synthetic_episode(batch=1, shots=1)
    a = build(name, seed=3)(support, masks, query, labels)
    b = build(name, seed=3)(support, masks, query, labels)
    assert torch.equal(a["logits"], b["logits"])
    assert all(torch.equal(a["losses"][k], b["losses"][k]) for k in a["losses"])
    c = build(name, seed=4)(support, masks, query, labels)
    assert not torch.equal(a["logits"], c["logits"])


@pytest.mark.parametrize("name", ["ssl_alpnet", "adnet", "qnet"])
def test_encode_once_then_segment_equals_forward_in_eval(name):
    model = build(name).eval()
    support, masks, query, _ = synthetic_episode()
    with torch.no_grad():
        joint = model(support, masks, query)["logits"]
        for b in range(2):
            state = model.encode_support(support[b], masks[b])
            separate = model.segment(query[b : b + 1], state)
            # compare probabilities: the joint pass batches support and query through the encoder together
            np.testing.assert_allclose(fg_probability(separate), fg_probability(joint[b : b + 1]), atol=2e-4)


def test_registry_names_and_classes():
    assert type(build("ssl_alpnet")) is ALPNet and ALPNet.name == "ssl_alpnet"
    assert type(build("adnet")) is ADNet and type(build("qnet")) is QNet


# ------------------------------------------------------------------------- real CHAOS episode (LSLPN, GMRD, PAMI, DIFD)


@pytest.mark.parametrize("name, faithful", list(TRAINING), ids=[f"{n}-faithful" if f else n for n, f in TRAINING])
def test_training_step(episode, name, faithful):
    model = _model(name, faithful=True) if faithful else _model(name)
    expected, own = TRAINING[(name, faithful)]
    check_training_step(model, episode, expected, own(model))


@pytest.mark.parametrize("name", list(REAL))
def test_deterministic(episode, name):
    check_deterministic(lambda: _model(name), episode)


@pytest.mark.parametrize("name, faithful", SEGMENT, ids=[f"{n}-{f}" for n, f in SEGMENT])
def test_segment_matches_forward(episode, name, faithful):
    check_segment_matches_forward(_model(name, faithful=True) if faithful else _model(name), episode)


@pytest.mark.parametrize("name", list(FIT))
def test_fits_real_episode(episode, name):
    check_fits_episode(_model(name), episode, **FIT[name])

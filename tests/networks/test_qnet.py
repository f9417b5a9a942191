"""Q-Net (fsmis_monai.networks.methods.qnet): the query-informed threshold and the alpha fusion of two paths
against NumPy, test-time prototype refinement (batched, corrected and faithful), and an encoder without the
threshold head refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsmis_monai.networks.methods.qnet import QNet
from method_checks import SIZE, build, fg_probability, np_cos, np_map_upsampled, synthetic_episode


class _CoarseOnly(torch.nn.Module):
    """An encoder with only a ``down3`` output (the ALP/ADNet layout)."""

    out_channels = 3

    def forward(self, x):
        return {"down3": F.avg_pool2d(x, 8)}


def test_encoder_without_threshold_head_is_refused():
    with pytest.raises(ValueError, match="lacks \\['down2', 'tau'\\]"):
        QNet(encoder=_CoarseOnly()).encode_support(torch.zeros(1, 3, 16, 16), torch.zeros(1, 16, 16))


def test_qnet_query_informed_threshold_and_alpha_fusion():
    model = QNet(encoder="small", alpha=0.7, refine_steps=0).eval()
    support, masks, query, _ = synthetic_episode(batch=1, shots=1)
    with torch.no_grad():
        s_out, q_out = model.encoder(support[0]), model.encoder(query)
        probs = fg_probability(model.segment(query, model.encode_support(support[0], masks[0])))[0]
    tau = float(q_out["tau"][0])
    ups = {}
    for path in ("down2", "down3"):
        proto = np_map_upsampled(s_out[path][0], masks[0, 0])
        cos = np_cos(q_out[path][0].numpy(), proto, 1e-8)
        p = 1.0 - 1.0 / (1.0 + np.exp(-0.5 * (-20.0 * cos - tau)))
        ups[path] = F.interpolate(torch.from_numpy(p)[None, None].float(), size=(SIZE, SIZE), mode="bilinear",
                                  align_corners=True)[0, 0].numpy()
    np.testing.assert_allclose(probs, 0.7 * ups["down2"] + 0.3 * ups["down3"], atol=1e-5)


def test_qnet_refinement_only_at_test_time():
    support, masks, query, labels = synthetic_episode(batch=1, shots=1)
    refined, plain = build("qnet", refine_steps=7), build("qnet", refine_steps=0)
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

"""ADNet (fsmis_monai.networks.methods.adnet): the foreground probability with its learned threshold against
an independent NumPy computation, alone and on the whole segment path."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fsmis_monai.networks.methods.adnet import ADNet
from method_checks import SIZE, fg_probability, np_cos, np_map_upsampled, synthetic_episode


def test_adnet_probability_equation():
    model = ADNet(encoder="small").eval()
    with torch.no_grad():
        model.threshold.fill_(-7.3)
    g = torch.Generator().manual_seed(2)
    feats, proto = torch.randn(2, 5, 6, 6, generator=g), torch.randn(5, generator=g)
    p = model.probability(feats, proto).detach().numpy()[:, 0]
    for n in range(2):
        cos = np_cos(feats[n].numpy(), proto.numpy(), 1e-8)
        np.testing.assert_allclose(p[n], 1.0 / (1.0 + np.exp(-(10.0 * cos + 0.5 * -7.3))), rtol=1e-5, atol=1e-6)
    # the reference's form 1 - sigmoid(0.5 (S - T)) with S = -20 cos, on the whole segment path
    support, masks, query, _ = synthetic_episode(batch=1, shots=2)
    with torch.no_grad():
        s_feats = model.encoder(support[0])["down3"]
        q_feats = model.encoder(query)["down3"][0]
        proto = np.mean([np_map_upsampled(s_feats[k], masks[0, k]) for k in range(2)], axis=0)
        probs = model.segment(query, model.encode_support(support[0], masks[0]))
    s = -20.0 * np_cos(q_feats.numpy(), proto, 1e-8)
    p_small = 1.0 - 1.0 / (1.0 + np.exp(-0.5 * (s - -7.3)))
    expected = F.interpolate(torch.from_numpy(p_small)[None, None].float(), size=(SIZE, SIZE), mode="bilinear",
                             align_corners=True)[0, 0].numpy()
    np.testing.assert_allclose(fg_probability(probs)[0], expected, atol=1e-5)

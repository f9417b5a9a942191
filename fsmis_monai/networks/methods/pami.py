"""PAMI: partition a medical image (Zhu et al., "Partition-A-Medical-Image: Extracting Multiple Representative
Sub-regions for Few-shot Medical Image Segmentation", IEEE TIM 2024, arXiv 2309.11172; docs/reference.md#pami).

On the Q-Net encoder's features (``down2`` only: the released path weights are [1, 0]) with the Q-Net
query-informed threshold p(x) = 1 - sigmoid(0.5 * (-20 cos(f(x), p) - tau)):

1. **RPL** (regional prototypical learning): the support mask at feature resolution is split into 64
   regions by farthest-point sampling of 64 centres over its pixels and a Voronoi assignment; each region's
   mean feature is a prototype (64 x C).
2. **QPC**: a coarse query prototype q_c = soft MAP of the query under the prediction of the global
   support prototype.
3. **PRD** (prototypical representation debiasing), applied 3 times: P <- debias(P, q_c), then
   q_c <- soft MAP of the query under the prediction of mean(P). ``debias`` injects q_c into P, runs the MS
   block (multi-direction self-debiasing: self-attention, a spatial branch weighting prototypes and an SE
   channel branch, two fusions) and the ID block (interactive debiasing: support-query affinity,
   threshold k_c, softmax, LayerNorm), and merges them with attention; one attention module, one MLP and
   one LayerNorm are shared by every step, as released.
4. **AP**: the released assembly weight is t = 1, so the prediction is that of mean(P).

Losses (all weight 1): weighted NLL [0.1, 1] on the query; alignment (the predicted query mask's prototype
segments the support with the support's tau, unweighted NLL); MSE between that query prototype and the
support global prototype; the query self-loss (q_c segments the query, unweighted NLL against the
query labels).

Corrected by default, reproduced with ``faithful=True`` (docs/reference.md#quirk-pami-release):
- ``dilating_downsample``: the released mask downsampling (bilinear, then any non-zero value is
  foreground) grows the mask by up to a feature pixel; the default keeps feature pixels whose area is at
  least half foreground (any overlap if that leaves none).
- ``force_raster_pixels``: masks with fewer pixels than regions were padded with the first raster pixels
  of the image (wrong places); the default keeps the true pixels and lets centres repeat.
- ``compute_unused_paths``: the released model also runs the ``down3`` path through RPL/PRD with weight 0.
Regions left empty by repeated centres take their centre pixel's feature in both modes (released: NaN).
The argmax in the spatial branch is not differentiable, as released.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fsmis_monai.losses import binary_labels, probability_nll
from fsmis_monai.networks.methods.base import (
    FewShotSegmenter,
    QueryFeatures,
    SupportState,
    check_support,
    encoder_features,
    resolve_encoder,
)
from fsmis_monai.networks.prototypes import (
    foreground_probability_to_logits,
    fuse_paths,
    masked_average_pooling,
    resize_to,
    threshold_probability,
)


# -- RPL ---------------------------------------------------------------------------------------------------
def farthest_point_sampling(points: torch.Tensor, n: int, first: int) -> torch.Tensor:
    """Indices of ``n`` centres among ``points`` [m, 2]: ``first``, then each next point maximises the
    smallest squared distance to the centres chosen so far (ties: lowest index)."""
    pts = points.to(torch.float64)
    chosen = [int(first)]
    nearest = ((pts - pts[first]) ** 2).sum(-1)
    for _ in range(n - 1):
        i = int(torch.argmax(nearest))
        chosen.append(i)
        nearest = torch.minimum(nearest, ((pts - pts[i]) ** 2).sum(-1))
    return torch.tensor(chosen, dtype=torch.long, device=points.device)


def voronoi_region_prototypes(features: torch.Tensor, foreground: torch.Tensor, n: int, first: int) -> torch.Tensor:
    """RPL prototypes [n, C]: features [C, h, w], foreground [h, w] (bool, non-empty).

    Every foreground pixel joins its nearest centre (ties: lowest centre index); a region's prototype is
    the mean feature of its pixels, or its centre pixel's feature when a repeated centre leaves it empty.
    """
    points = torch.nonzero(foreground)  # [m, 2] (y, x), raster order
    centres = farthest_point_sampling(points, n, first)
    d2 = ((points[:, None].to(torch.float64) - points[centres][None].to(torch.float64)) ** 2).sum(-1)
    region = d2.argmin(dim=1)  # [m]
    pixel_feats = features[:, points[:, 0], points[:, 1]].t()  # [m, C]
    sums = pixel_feats.new_zeros(n, pixel_feats.shape[1]).index_add(0, region, pixel_feats)
    counts = torch.bincount(region, minlength=n).to(pixel_feats.dtype)[:, None]
    return torch.where(counts > 0, sums / counts.clamp(min=1), pixel_feats[centres])


# -- shared attention blocks (released: one instance of each, reused everywhere) ---------------------------
class ReluMultiHeadAttention(nn.Module):
    """Multi-head attention whose heads each span the full width d (not d / heads), with ReLU after the
    Q/K/V and output projections, dropout, residual and LayerNorm. Written by hand because
    ``nn.MultiheadAttention`` splits the width across heads and has no activations."""

    def __init__(self, dim: int, n_heads: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.n_heads, self.dim, self.dropout = n_heads, dim, dropout
        self.q = nn.Linear(dim, n_heads * dim)
        self.k = nn.Linear(dim, n_heads * dim)
        self.v = nn.Linear(dim, n_heads * dim)
        for proj in (self.q, self.k, self.v):
            nn.init.normal_(proj.weight, mean=0.0, std=float(np.sqrt(1.0 / dim)))  # sqrt(2 / (d_model + d_k))
        self.out = nn.Linear(n_heads * dim, dim)
        nn.init.xavier_normal_(self.out.weight)
        self.out_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q [Lq, d], k and v [Lk, d] (default: q) -> [Lq, d]."""
        k = q if k is None else k
        v = k if v is None else v

        def heads(x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
            return F.relu(proj(x)).reshape(x.shape[0], self.n_heads, self.dim).transpose(0, 1)

        attended = F.scaled_dot_product_attention(
            heads(q, self.q), heads(k, self.k), heads(v, self.v), dropout_p=self.dropout if self.training else 0.0
        )  # [heads, Lq, d], scaled by 1 / sqrt(d)
        merged = attended.transpose(0, 1).reshape(q.shape[0], -1)
        return self.norm(F.relu(self.out_dropout(self.out(merged))) + q)


class ResidualMLP(nn.Module):
    """LayerNorm(x + Linear(d -> 2d) -> GELU -> Linear(2d -> d))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, d] -> [L, d]."""
        return self.norm(self.mlp(x) + x)


class SqueezeExcitation(nn.Module):
    """SE channel weights from the mean over prototypes (the released 8 x 8 reshape + global pooling is
    the same mean over the 64 prototypes)."""

    def __init__(self, dim: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, max(dim // reduction, 1), bias=False), nn.ReLU(), nn.Linear(max(dim // reduction, 1), dim, bias=False), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prototypes [n, C] -> [n, C], each channel scaled by its SE weight in (0, 1)."""
        return x * self.fc(x.mean(0, keepdim=True))


class PrototypeDebiasing(nn.Module):
    """One PRD step (released ``BATE``): P [n, C] and the coarse query prototype q [1, C] -> P' [n, C]."""

    def __init__(self, dim: int, n_regions: int, n_heads: int = 3) -> None:
        super().__init__()
        self.attention = ReluMultiHeadAttention(dim, n_heads)
        self.mlp = ResidualMLP(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.query_injection = nn.Linear(n_regions, n_regions)
        self.spatial_weight = nn.Linear(2, 1)
        self.channel_se = SqueezeExcitation(dim)
        self.fuse_regions = nn.Sequential(
            nn.Linear(2 * n_regions, n_regions, bias=False), nn.GELU(), nn.Linear(n_regions, n_regions, bias=False)
        )
        self.fuse_channels = nn.Sequential(nn.Linear(2 * dim, dim, bias=False), nn.GELU(), nn.Linear(dim, dim, bias=False))
        self.merge = nn.Linear(2 * dim, dim)

    def transform(self, q: torch.Tensor, kv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The shared attention, MLP and LayerNorm: q [Lq, C], kv [Lk, C] (default q) -> [Lq, C]."""
        return self.mlp(self.attention(q, kv, kv))

    def multi_direction(self, p_injected: torch.Tensor) -> torch.Tensor:
        """MS block: query-injected prototypes [n, C] -> self-attention, spatial and SE channel branches, two
        fusions -> [n, C] (docs/reference.md#pami)."""
        calibrated = self.transform(p_injected)
        spatial = torch.stack([calibrated.argmax(dim=1).to(calibrated.dtype).detach(), calibrated.mean(dim=1)], dim=1)
        spatial = torch.sigmoid(self.spatial_weight(spatial)) * calibrated  # [n, C]
        channel = self.channel_se(calibrated)
        fused_regions = self.fuse_regions(torch.cat([spatial, calibrated], dim=0).t()).t()
        fused_channels = self.fuse_channels(torch.cat([channel, calibrated], dim=1))
        return self.merge(torch.cat([self.transform(fused_regions), self.transform(fused_channels)], dim=1))

    def interactive(self, prototypes: torch.Tensor, p_injected: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """ID block: affinity [n, 1] of the calibrated prototypes (``p_injected`` [n, C]) to the calibrated query
        [1, C], threshold floor((min + mean) / 2), softmax over the prototypes -> [n, C]
        (docs/reference.md#pami)."""
        affinity = self.transform(p_injected) @ self.transform(query).t()  # [n, 1]
        k_c = torch.floor((affinity.min() + affinity.mean()) / 2)
        weights = torch.softmax(affinity.masked_fill(affinity < k_c, -10000.0), dim=0)
        return self.norm(weights @ prototypes.mean(0, keepdim=True) + p_injected)

    def forward(self, prototypes: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """One PRD step: regional prototypes [n, C] debiased against the coarse query prototype [1, C] -> [n, C]
        (query injection, MS block, ID block; docs/reference.md#pami)."""
        injected = prototypes + self.query_injection(query.expand_as(prototypes).t()).t()
        fused = self.multi_direction(injected)
        interacted = self.interactive(prototypes, injected, query)
        t = self.transform(interacted, injected)
        t = self.transform(self.merge(torch.cat([t, fused], dim=1)))
        return self.norm(t + prototypes)


class PAMI(FewShotSegmenter):
    """Regional prototypes + prototypical representation debiasing (see the module docstring).

    Args:
        encoder: module or registered name (default "qnet_resnet101"); must give the path keys and "tau".
        pretrained_weights: passed to the encoder builder when ``encoder`` is a name.
        path_weights: {feature key: weight} of the Q-Net paths (released {"down2": 1, "down3": 0}).
        n_regions: RPL regions (64).
        n_iterations: PRD repetitions (3).
        class_weights: weights (bg, fg) of the query NLL, (0.1, 1).
        fps_seed: seed of the first FPS centre (1289 as released). Training draws from one sampler created
            at construction, as released; eval mode restarts it at every call so inference is reproducible.
        faithful, dilating_downsample, force_raster_pixels, compute_unused_paths: see the module docstring.
    """

    name = "pami"

    def __init__(
        self,
        encoder: "str | nn.Module" = "qnet_resnet101",
        pretrained_weights: Optional[str] = None,
        path_weights: Optional[Dict[str, float]] = None,
        n_regions: int = 64,
        n_iterations: int = 3,
        n_heads: int = 3,
        scale: float = 20.0,
        class_weights: Sequence[float] = (0.1, 1.0),
        fps_seed: int = 1289,
        faithful: bool = False,
        dilating_downsample: Optional[bool] = None,
        force_raster_pixels: Optional[bool] = None,
        compute_unused_paths: Optional[bool] = None,
    ) -> None:
        super().__init__()
        self.encoder = resolve_encoder(encoder, pretrained_weights, faithful)
        self.path_weights = dict(path_weights or {"down2": 1.0, "down3": 0.0})
        self.n_regions = n_regions
        self.n_iterations = n_iterations
        self.scale = scale
        self.fps_seed = fps_seed
        self.faithful = faithful
        self.dilating_downsample = faithful if dilating_downsample is None else dilating_downsample
        self.force_raster_pixels = faithful if force_raster_pixels is None else force_raster_pixels
        self.compute_unused_paths = faithful if compute_unused_paths is None else compute_unused_paths
        self.class_weights = tuple(class_weights)
        self.debias = PrototypeDebiasing(self.encoder.out_channels, n_regions, n_heads)
        self.sampler = np.random.RandomState(fps_seed)

    @property
    def paths(self) -> List[str]:
        """Encoder outputs the method computes: those of non-zero weight, all of them with ``compute_unused_paths``."""
        return [k for k, w in self.path_weights.items() if w != 0 or self.compute_unused_paths]

    # -- RPL -------------------------------------------------------------------------------------------
    def foreground_pixels(self, mask: torch.Tensor, size) -> torch.Tensor:
        """The support mask [H, W] at feature resolution ``size`` as a bool map."""
        if self.dilating_downsample:
            fg = F.interpolate(mask[None, None], size=tuple(size), mode="bilinear")[0, 0] > 0
        else:
            area = F.adaptive_avg_pool2d(mask[None, None].to(torch.float32), tuple(size))[0, 0]
            fg = area >= 0.5
            if not fg.any():
                fg = area > 0
        if self.force_raster_pixels and int(fg.sum()) < self.n_regions:
            fg = fg.clone()
            fg.view(-1)[: self.n_regions] = True
        return fg

    def region_prototypes(self, features: torch.Tensor, mask: torch.Tensor, sampler) -> torch.Tensor:
        """RPL: features [C, h, w], mask [H, W] -> [n_regions, C]."""
        fg = self.foreground_pixels(mask, features.shape[-2:])
        m = int(fg.sum())
        if m == 0:  # empty support mask: every region is the (zero) global prototype
            return masked_average_pooling(features[None], mask[None]).expand(self.n_regions, -1)
        return voronoi_region_prototypes(features, fg, self.n_regions, int(sampler.choice(m)))

    def _sampler(self):
        return self.sampler if self.training else np.random.RandomState(self.fps_seed)

    # -- prediction ------------------------------------------------------------------------------------
    def support_state(self, feats: Dict[str, torch.Tensor], masks: torch.Tensor) -> SupportState:
        """Global and regional prototypes per path from support features {key: [K, C, h, w]}, masks [K, H, W]."""
        sampler = self._sampler()
        state: SupportState = {"image_size": tuple(masks.shape[-2:]), "global": {}, "regions": {}}
        for key in self.paths:
            f = feats[key]
            state["global"][key] = masked_average_pooling(f, masks).mean(0)  # released MAP: align_corners=False
            state["regions"][key] = [self.region_prototypes(f_k, m_k, sampler) for f_k, m_k in zip(f, masks)]
        return state

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
        """RPL state (:meth:`support_state`) of support images [K, C, H, W] and masks [K, H, W]; ``ValueError``
        on inconsistent shapes (:func:`check_support`)."""
        check_support(support_images, support_masks)
        return self.support_state(self.encoder(support_images), support_masks)

    def coarse_query_prototype(self, features: torch.Tensor, prototype: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """QPC: soft MAP [N, C] of query features [N, C, h, w] under the prediction of ``prototype`` [C] with
        thresholds ``tau`` [N] (docs/reference.md#pami, the coarse query prototype)."""
        return masked_average_pooling(features, threshold_probability(features, prototype, tau, self.scale))

    def refine(self, features: torch.Tensor, tau: torch.Tensor, state: SupportState, key: str) -> torch.Tensor:
        """QPC + ``n_iterations`` x PRD for one query [1, C, h, w], tau [1] -> refined support prototype [C] of
        path ``key`` (docs/reference.md#pami, PRD three times)."""
        coarse = self.coarse_query_prototype(features, state["global"][key], tau)
        regions = state["regions"][key]
        for _ in range(self.n_iterations):
            regions = [self.debias(r, coarse) for r in regions]
            support = torch.stack([r.mean(0) for r in regions]).mean(0)
            coarse = self.coarse_query_prototype(features, support, tau)
        return support

    def predict(self, feats: Dict[str, torch.Tensor], tau: torch.Tensor, state: SupportState) -> torch.Tensor:
        """Fused foreground probability [N, H, W] in [0, 1] of the queries, from encoder outputs
        {path: [N, C, h, w]} and tau [N] (assembled prediction with weight 1: the refined prototype's;
        docs/reference.md#pami). H, W: ``state["image_size"]``."""
        size = tuple(state["image_size"])
        probs = {}
        for key in self.paths:
            support = torch.stack([self.refine(f[None], t[None], state, key) for f, t in zip(feats[key], tau)])
            probs[key] = resize_to(threshold_probability(feats[key], support, tau, self.scale)[:, None], size)[:, 0]
        return fuse_paths(probs, self.path_weights)

    def encode_query(self, query_images: torch.Tensor) -> QueryFeatures:
        return encoder_features(self.encoder, query_images, (*self.paths, "tau"))

    def segment_encoded(self, features: QueryFeatures, state: SupportState) -> torch.Tensor:
        """Logits [N, 2, H, W] of encoded queries; QPC and PRD run per query on its encoded features."""
        state = {**state, "image_size": tuple(features.image_size)}  # logits at the query's size, not the support's
        return foreground_probability_to_logits(self.predict(features.maps, features["tau"], state))

    # -- training --------------------------------------------------------------------------------------
    def episode_losses(self, supp, supp_tau, masks, qry, qry_tau, state, probability, labels):
        """Alignment, prototype MSE and query self-loss of one episode (one query); PAMI's three episode terms
        (docs/reference.md#pami, losses, each weight 1; alignment as in docs/reference.md#shared-losses).

        Args:
            supp / qry: encoder outputs {path: [K, C, h, w]} of the support / {path: [1, C, h, w]} of the query.
            supp_tau / qry_tau: the encoder's threshold logits, [K] / [1] (the alignment uses the support's).
            masks: support masks [K, H, W] in {0, 1}; labels: query labels [1, H, W] (255 ignored).
            state: :meth:`support_state` of the episode; probability: fused query foreground probability
                [1, H, W] from :meth:`predict`.

        Returns:
            {"align", "proto_mse", "query_self"}: scalar tensors (nats, MSE of feature units); "align" and
            "proto_mse" are a graph-connected zero when the predicted query mask is empty.
        """
        size = tuple(masks.shape[-2:])
        zero = probability.sum() * 0.0
        # query self-loss: the first coarse query prototype (QPC, before PRD) segments its own query
        self_probs = {}
        for k in self.paths:
            coarse = self.coarse_query_prototype(qry[k], state["global"][k], qry_tau)
            self_probs[k] = resize_to(threshold_probability(qry[k], coarse, qry_tau, self.scale)[:, None], size)[:, 0]
        p = fuse_paths(self_probs, self.path_weights)
        query_self = probability_nll(torch.stack([1 - p, p], dim=1), labels)
        pred = (probability[0] > 0.5).to(masks.dtype)  # argmax of [1 - p, p]
        if pred.sum() == 0:
            return {"align": zero, "proto_mse": zero, "query_self": query_self}
        supp_probs, q_protos = {}, {}
        for k in self.paths:
            q_protos[k] = masked_average_pooling(qry[k], pred[None])[0]
            s = threshold_probability(supp[k], q_protos[k], supp_tau, self.scale)
            supp_probs[k] = resize_to(s[:, None], size)[:, 0]
        p = fuse_paths(supp_probs, self.path_weights)
        return {
            "align": probability_nll(torch.stack([1 - p, p], dim=1), binary_labels(masks)),
            "proto_mse": F.mse_loss(fuse_paths(q_protos, self.path_weights), fuse_paths(state["global"], self.path_weights)),
            "query_self": query_self,
        }

    def forward_episode(self, support, support_masks, query, query_labels):
        """Prediction: the fused foreground probability [1, H, W] (:meth:`prediction_logits` makes the logits)."""
        state = self.support_state(support, support_masks)
        p = self.predict(query.maps, query["tau"], state)
        if query_labels is None:
            return p, {}
        return p, self.episode_losses(support, support["tau"], support_masks, query.maps, query["tau"], state, p, query_labels)

    def prediction_logits(self, probability: torch.Tensor) -> torch.Tensor:
        """Logits [B, 2, H, W] whose softmax is [1 - p, p] for foreground probabilities [B, H, W]."""
        return foreground_probability_to_logits(probability)

    def training_losses(self, probability, query_labels, episode_means):
        """Weighted NLL (0.1, 1) of the query probabilities [B, H, W] against labels [B, H, W], then the batch
        means of the episode terms (:meth:`episode_losses`); scalars in nats (docs/reference.md#shared-losses)."""
        nll = probability_nll(torch.stack([1 - probability, probability], 1), query_labels, self.class_weights)
        return {"query_nll": nll, **episode_means}

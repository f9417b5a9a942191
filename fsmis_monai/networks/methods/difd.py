"""DIFD: dual interspersion and flexible deployment (Cheng et al., IEEE TMI 2025, 10.1109/TMI.2025.3546653;
docs/reference.md#difd).

On the Q-Net encoder's ``down2`` features (stride 4); tau, the encoder's per-image scalar, sets
temperatures 1 + 20 sigmoid(tau):

1. **Dual interspersion** builds, per class, a basis set from support features upsampled to the image:
   the global MAP; **systematic** patch prototypes (16 x 8 windows, stride 8; a fg patch is kept when its fg
   count >= min(0.95 * 128, n_fg / 150), a bg patch when its bg count >= min(128, n_bg / 250); at most 150 fg
   / 250 bg, sub-sampled at random; none qualifying -> up to 100 random pixel features); and **random**
   boxes (100 boxes, aspect ratio U(0.5, 2); a box gives a fg prototype when n1 >= min(0.95 h w, n_fg / 100)
   and n1 < n_fg, a bg one likewise with min(h w, n_bg / 100)). The class's global MAP over all shots is
   appended last.
2. **IFR** (interactive feature refinement): every basis b_k builds a query pseudo-mask
   sigmoid(cos(f_q, b_k) (1 + 20 sigmoid(tau_q))) and a query-updated prototype u_k; with the fusion factor
   G = sigmoid(mean cos(support fg pixels, query pixels)), b_k <- b_k + conv1x1([b_k (1 - G), u_k G]).
3. **FD** (flexible deployment): w_k(x) = softmax_k(cos(f_q(x), b_k) (1 + 20 sigmoid(tau_s))); the deployed
   prototype P(x) = sum_k w_k b_k and sim_0 = sum_k w_k cos_k, sim_1 = sum_k cos_k.
4. fg and bg **decoders** turn [f_q, P, similarity maps] into one logit each; logits [bg, fg].

Losses: weighted NLL [0.1, 1] and boundary-F1 on the query; the same two on the alignment prediction (bases
from the predicted query mask segment the support).

Decoder input (docs/reference.md#quirk-difd-release): the released decoder expects 2C + 3 channels but is given [f_q, P,
sim_0] (2C + 1), so the released code cannot run. ``decoder_inputs="intended"`` (default) gives it [f_q, P, sim_0,
sim_1, cos(f_q, global MAP)] - the two maps the released code computes and never uses, which make exactly 2C + 3 - and
``"released"`` builds the decoder for the 2C + 1 inputs instead.

Randomness: the released code reseeds the global ``random`` and ``torch`` generators (seed 9) inside
every forward, which resets training randomness each step. Here the sub-sampling and the boxes use
local generators seeded with ``interspersion_seed`` (9: the released draws, identical at every call);
``interspersion_seed=None`` draws a fresh seed from the global torch RNG at every call instead.

``faithful=True`` uses the released decoder inputs, only shot 0's bases and features (the released indexing
makes the model 1-shot) and the released tau roles in the alignment pass (tau_q for pseudo-masks, tau_s
for deployment, although there the support is the image being segmented). The default pools the bases of
all shots and lets each tau follow its image.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fsmis_monai.losses import BoundaryF1Loss, binary_labels, probability_nll
from fsmis_monai.networks.methods.base import (
    FewShotSegmenter,
    QueryFeatures,
    SupportState,
    check_support,
    encoder_features,
    resolve_encoder,
)
from fsmis_monai.networks.prototypes import (
    MAP_EPS,
    box_sums,
    interval_indicators,
    masked_average_pooling,
    resize_to,
    unit_cosine_map,
)

#: F.normalize's default eps, which the cosines of IFR and FD use
NORMALIZE_EPS = 1e-12


# -- dual interspersion ----------------------------------------------------------------------------------
def patch_prototypes(
    features: torch.Tensor, mask: torch.Tensor, kernel: Tuple[int, int] = (16, 8), stride: int = 8
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked averages of every ``kernel`` window (stride ``stride``, no padding, raster order).

    features [C, H, W], mask [H, W] -> fg prototypes [P, C], bg prototypes [P, C], fg counts [P], bg counts [P].
    Window sums come from average pooling (the released code unfolds every patch; same windows, less memory).
    """
    area = kernel[0] * kernel[1]
    m = mask[None].to(features.dtype)
    pool = lambda x: F.avg_pool2d(x, kernel, stride=stride) * area  # noqa: E731
    fg_sum = pool(features * m).flatten(1).t()
    all_sum = pool(features).flatten(1).t()
    fg_count = pool(m).flatten()
    bg_count = area - fg_count
    fg = fg_sum / (fg_count[:, None] + MAP_EPS)
    bg = (all_sum - fg_sum) / (bg_count[:, None] + MAP_EPS)
    return fg, bg, fg_count, bg_count


def random_boxes(height: int, width: int, n: int, generator: torch.Generator, aspect_range=(0.5, 2.0)) -> torch.Tensor:
    """[n, 4] integer boxes (top, left, bottom, right), drawn in the released order from ``generator``:
    aspect r ~ U(range); r <= 1: h = (0.0625 + 0.9375 U) H r, w = h / r; r > 1: w = (0.0625 + 0.9375 U) W / r,
    h = w r (truncated to integers); top-left corner uniform where the box fits."""
    lo, hi = aspect_range
    aspect = torch.rand(n, generator=generator) * (hi - lo) + lo
    tall, wide = aspect[aspect <= 1], aspect[aspect > 1]
    h0 = ((torch.rand(len(tall), generator=generator) * 0.9375 + 0.0625) * (height * tall)).int()
    w0 = (h0 / tall).int()
    w1 = ((torch.rand(len(wide), generator=generator) * 0.9375 + 0.0625) * (width / wide)).int()
    h1 = (w1 * wide).int()
    h, w = torch.cat([h0, h1]), torch.cat([w0, w1])
    top = (torch.rand(n, generator=generator) * (height - h)).int()
    left = (torch.rand(n, generator=generator) * (width - w)).int()
    return torch.stack([top, left, top + h, left + w], dim=1)


def random_pixel_features(features: torch.Tensor, mask: torch.Tensor, rng: random.Random, limit: int = 100) -> torch.Tensor:
    """Up to ``limit`` features [n, C] of mask pixels, drawn without replacement (released fallback)."""
    pixels = features.flatten(1).t()[mask.flatten() == 1]
    if len(pixels) > limit:
        pixels = pixels[rng.sample(range(len(pixels)), limit)]
    return pixels


class DualInterspersion(nn.Module):
    """SI + RI basis sets of one support image (no learned parameters; see the module docstring)."""

    def __init__(
        self,
        kernel: Tuple[int, int] = (16, 8),
        stride: int = 8,
        purity: float = 0.95,
        fg_divisor: float = 150,
        bg_divisor: float = 250,
        max_fg: int = 150,
        max_bg: int = 250,
        n_boxes: int = 100,
        fallback_points: int = 100,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.purity = tuple(kernel), stride, purity
        self.fg_divisor, self.bg_divisor, self.max_fg, self.max_bg = fg_divisor, bg_divisor, max_fg, max_bg
        self.n_boxes, self.fallback_points = n_boxes, fallback_points

    def systematic(self, features, mask, n_fg, n_bg, rng: random.Random, seed: int):
        """Patch prototypes kept by the purity thresholds and caps: (fg [a, C] or None, bg [b, C])."""
        fg, bg, fg_count, bg_count = patch_prototypes(features, mask, self.kernel, self.stride)
        area = self.kernel[0] * self.kernel[1]

        def keep(protos, counts, threshold, cap, class_mask):
            kept = protos[counts >= threshold]
            if len(kept) == 0:
                rng.seed(seed)  # released: the fallback reseeds the sub-sampling stream
                return random_pixel_features(features, class_mask, rng, self.fallback_points)
            if len(kept) > cap:
                kept = kept[rng.sample(range(len(kept)), cap)]
            return kept

        fg_kept = None
        if n_fg > 0:
            fg_kept = keep(fg, fg_count, min(area * self.purity, n_fg / self.fg_divisor), self.max_fg, mask)
        bg_kept = keep(bg, bg_count, min(area, n_bg / self.bg_divisor), self.max_bg, 1 - mask)
        return fg_kept, bg_kept

    def boxes(self, features, mask, n_fg, n_bg, generator: torch.Generator):
        """Random-box prototypes: (fg [a, C], bg [b, C]) masked averages of the boxes that pass the tests."""
        height, width = mask.shape
        # drawn on the CPU generator (same boxes on every device), then moved to the mask's device
        boxes = random_boxes(height, width, self.n_boxes, generator).to(mask.device)
        rows = interval_indicators(boxes[:, 0], boxes[:, 2], height, mask.dtype)  # [n, H]
        cols = interval_indicators(boxes[:, 1], boxes[:, 3], width, mask.dtype)  # [n, W]
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).to(mask.dtype)
        n1 = torch.einsum("bh,hw,bw->b", rows, mask, cols)
        n0 = area - n1
        fg_keep = (n1 >= torch.clamp(area * self.purity, max=n_fg / self.n_boxes)) & (n1 < n_fg)
        bg_keep = (n0 >= torch.clamp(area, max=n_bg / self.n_boxes)) & (n0 < n_bg)
        # box sums of f * m and f as two matrix products (slicing 100 boxes out of a [C, H, W] map costs a
        # full-size gradient buffer per box in the backward pass)
        keep = fg_keep | bg_keep
        fg_sum = box_sums(features * mask, rows[keep], cols[keep])
        all_sum = box_sums(features, rows[keep], cols[keep])
        fg = (fg_sum / (n1[keep][:, None] + MAP_EPS))[fg_keep[keep]]
        bg = ((all_sum - fg_sum) / (n0[keep][:, None] + MAP_EPS))[bg_keep[keep]]
        return fg, bg

    def forward(self, features: torch.Tensor, mask: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """features [C, H, W] (image size), mask [H, W] -> (bg bases [b, C], fg bases [a, C]), global MAPs first."""
        n_fg = float(mask.sum())
        n_bg = mask.numel() - n_fg
        m = mask.to(features.dtype)
        fg_pts = [((features * m).sum((1, 2)) / (n_fg + MAP_EPS))[None]]
        bg_pts = [((features * (1 - m)).sum((1, 2)) / (n_bg + MAP_EPS))[None]]
        fg_patch, bg_patch = self.systematic(features, m, n_fg, n_bg, random.Random(seed), seed)
        if fg_patch is not None:
            fg_pts.append(fg_patch)
        bg_pts.append(bg_patch)
        fg_box, bg_box = self.boxes(features, m, n_fg, n_bg, torch.Generator().manual_seed(seed))
        return torch.cat(bg_pts + [bg_box]), torch.cat(fg_pts + [fg_box])


# -- IFR + FD ----------------------------------------------------------------------------------------------
def fusion_factor(target: torch.Tensor, source: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
    """G per target image [N]: sigmoid of the mean cosine between every source pixel inside the mask
    (mask [K, H, W] bilinearly downsampled to the feature size, > 0) and every target pixel; 0 for an
    empty mask. The mean over all pairs equals the dot product of the two mean unit vectors."""
    small = F.interpolate(source_mask[:, None].to(source.dtype), size=source.shape[-2:], mode="bilinear")[:, 0] > 0
    if not small.any():
        return target.new_zeros(target.shape[0])
    src = F.normalize(source, dim=1).permute(0, 2, 3, 1)[small].mean(0)  # [C]
    tgt = F.normalize(target, dim=1).flatten(2).mean(2)  # [N, C]
    return torch.sigmoid(tgt @ src)


class DeploymentDecoder(nn.Module):
    """merge 1x1 -> residual block -> 3x3 + 1x1 classifier, one logit map (released layout, no biases)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        c = channels
        self.merge = nn.Sequential(nn.Conv2d(in_channels, c, 1, bias=False), nn.ReLU(), nn.Dropout2d(0.2))
        self.res1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.ReLU(), nn.Dropout2d(0.1))
        self.res2 = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.ReLU()
        )
        self.cls = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.ReLU(), nn.Dropout2d(0.1), nn.Conv2d(c, 1, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder input [N, in_channels, h, w] (:meth:`DIFD.deploy`) -> one logit map [N, 1, h, w]."""
        x = self.res1(self.merge(x))
        return self.cls(self.res2(x) + x)


class DIFD(FewShotSegmenter):
    """Dual interspersion + interactive refinement + flexible deployment (see the module docstring).

    Args:
        encoder: module or registered name (default "qnet_resnet101"); must give ``feature_key`` and "tau".
        pretrained_weights: passed to the encoder builder when ``encoder`` is a name.
        decoder_inputs: "intended" (2C + 3 channels) or "released" (2C + 1); None follows ``faithful``.
        interspersion_seed: seed of the local generators of the interspersion (9), None = fresh each call.
        faithful: see the module docstring.
        class_weights: weights (bg, fg) of the query and alignment NLL, (0.1, 1).
        Remaining arguments: the interspersion constants (released values as defaults).
    """

    name = "difd"

    def __init__(
        self,
        encoder: "str | nn.Module" = "qnet_resnet101",
        pretrained_weights: Optional[str] = None,
        feature_key: str = "down2",
        decoder_inputs: Optional[str] = None,
        interspersion_seed: Optional[int] = 9,
        faithful: bool = False,
        scale: float = 20.0,
        class_weights: Sequence[float] = (0.1, 1.0),
        theta0: int = 3,
        theta: int = 5,
        kernel: Tuple[int, int] = (16, 8),
        stride: int = 8,
        purity: float = 0.95,
        max_fg_patches: int = 150,
        max_bg_patches: int = 250,
        n_boxes: int = 100,
    ) -> None:
        super().__init__()
        self.encoder = resolve_encoder(encoder, pretrained_weights, faithful)
        self.feature_key = feature_key
        self.faithful = faithful
        self.decoder_inputs = decoder_inputs or ("released" if faithful else "intended")
        if self.decoder_inputs not in ("intended", "released"):
            raise ValueError(f"decoder_inputs must be 'intended' or 'released', got {self.decoder_inputs!r}")
        self.interspersion_seed = interspersion_seed
        self.scale = scale
        c = self.encoder.out_channels
        n_maps = 3 if self.decoder_inputs == "intended" else 1
        self.interspersion = DualInterspersion(
            kernel, stride, purity, max_fg=max_fg_patches, max_bg=max_bg_patches, n_boxes=n_boxes
        )
        self.fuse = nn.Conv2d(2, 1, kernel_size=1, bias=False)
        self.fg_decoder = DeploymentDecoder(2 * c + n_maps, c)
        self.bg_decoder = DeploymentDecoder(2 * c + n_maps, c)
        self.class_weights = tuple(class_weights)
        self.boundary_loss = BoundaryF1Loss(theta0=theta0, theta=theta)

    def _seed(self) -> int:
        if self.interspersion_seed is not None:
            return self.interspersion_seed
        return int(torch.randint(0, 2**31 - 1, (1,)).item())  # consumes, never resets, the global RNG

    # -- bases -----------------------------------------------------------------------------------------
    def bases(self, features: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Basis sets {"fg", "bg"} [n + 1, C] (global MAP over all shots last) from features [K, C, h, w]."""
        size = tuple(masks.shape[-2:])
        full = resize_to(features, size)  # align_corners=True
        shots = range(1) if self.faithful else range(len(masks))
        seed = self._seed()
        fg_sets: List[torch.Tensor] = []
        bg_sets: List[torch.Tensor] = []
        for k in shots:
            bg, fg = self.interspersion(full[k], masks[k], seed)
            fg_sets.append(fg)
            bg_sets.append(bg)
        fg_global = masked_average_pooling(full, masks).mean(0, keepdim=True)
        bg_global = masked_average_pooling(full, 1 - masks).mean(0, keepdim=True)
        return {"fg": torch.cat(fg_sets + [fg_global]), "bg": torch.cat(bg_sets + [bg_global])}

    # -- IFR + FD ----------------------------------------------------------------------------------------
    def deploy(self, bases, target, source, source_mask, tau_pseudo, tau_deploy) -> torch.Tensor:
        """Decoder input [N, 2C + 3 or 2C + 1, h, w] for target features [N, C, h, w].

        bases [n + 1, C] (last row: global MAP); source features [K, C, h, w] and mask [K, H, W] give the
        fusion factor; tau_pseudo [N] and tau_deploy (scalar) set the two temperatures.
        """
        glob, basis = bases[-1], bases[:-1]
        unit = F.normalize(target, dim=1, eps=NORMALIZE_EPS)  # once for the three cosine maps
        # IFR: pseudo-masks, query-updated prototypes, residual fusion
        cos = unit_cosine_map(unit, basis, eps=NORMALIZE_EPS)
        pseudo = torch.sigmoid(cos * (1 + self.scale * torch.sigmoid(tau_pseudo)).reshape(-1, 1, 1, 1))
        updated = torch.einsum("nchw,nkhw->nkc", target, pseudo) / (pseudo.sum((2, 3))[..., None] + MAP_EPS)
        g = fusion_factor(target, source, source_mask).reshape(-1, 1, 1)
        pair = torch.stack([basis.expand_as(updated) * (1 - g), updated * g], dim=1)  # [N, 2, n, C]
        refined = basis + self.fuse(pair)[:, 0]  # [N, n, C]
        # FD: per-pixel soft choice of a basis
        cos = unit_cosine_map(unit, refined, eps=NORMALIZE_EPS)
        weights = torch.softmax(cos * (1 + self.scale * torch.sigmoid(tau_deploy)), dim=1)
        deployed = torch.einsum("nkhw,nkc->nchw", weights, refined)
        maps = [(weights * cos).sum(1, keepdim=True)]
        if self.decoder_inputs == "intended":
            one_sim = unit_cosine_map(unit, glob[None], eps=NORMALIZE_EPS)
            maps += [cos.sum(1, keepdim=True), one_sim]
        return torch.cat([target, deployed] + maps, dim=1)

    def logits_from_bases(self, bases, target, source, source_mask, tau_pseudo, tau_deploy, size) -> torch.Tensor:
        """Logits [N, 2, H, W] ([bg, fg]) of target features [N, C, h, w]: interactive feature refinement and
        flexible deployment (:meth:`deploy`) of each class's bases, then that class's decoder
        (docs/reference.md#difd, IFR + FD).

        Args:
            bases: {"fg", "bg"} [n + 1, C] from :meth:`bases` (last row: global MAP).
            target: features [N, C, h, w] of the images segmented (the query; the support in the alignment).
            source / source_mask: features [K, C, h, w] and {0, 1} masks [K, H, W] the bases came from
                (the fusion factor; the background decoder gets ``1 - source_mask``).
            tau_pseudo: encoder threshold logits [N] (pseudo-mask temperature 1 + scale * sigmoid(tau)).
            tau_deploy: scalar threshold logit (deployment temperature).
            size: (H, W) the logits are resized to (bilinear, align_corners=True).
        """
        fg = self.fg_decoder(self.deploy(bases["fg"], target, source, source_mask, tau_pseudo, tau_deploy))
        bg = self.bg_decoder(self.deploy(bases["bg"], target, source, 1 - source_mask, tau_pseudo, tau_deploy))
        return resize_to(torch.cat([bg, fg], dim=1), tuple(size))

    def support_state(self, features: torch.Tensor, tau: torch.Tensor, masks: torch.Tensor) -> SupportState:
        """State from support features [K, C, h, w], threshold logits tau [K] and masks [K, H, W]: the bases
        ({"fg", "bg"} [n + 1, C]) and the shots kept for the fusion factor (the first only when ``faithful``,
        docs/reference.md#quirk-difd-release)."""
        shots = slice(0, 1) if self.faithful else slice(None)
        return {
            "image_size": tuple(masks.shape[-2:]),
            "bases": self.bases(features, masks),
            "features": features[shots],
            "masks": masks[shots],
            "tau": tau[0],  # released: the deployment temperature uses the (first) support image's tau
            "shot_tau": tau[shots],
        }

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
        """:meth:`support_state` of support images [K, C, H, W] and masks [K, H, W]; ``ValueError`` on
        inconsistent shapes (:func:`check_support`)."""
        check_support(support_images, support_masks)
        enc = self.encoder(support_images)
        return self.support_state(enc[self.feature_key], enc["tau"], support_masks)

    def query_logits(self, features: torch.Tensor, tau: torch.Tensor, state: SupportState) -> torch.Tensor:
        """Logits [N, 2, H, W] of query features [N, C, h, w] with threshold logits tau [N]; H, W:
        ``state["image_size"]``."""
        return self.logits_from_bases(
            state["bases"], features, state["features"], state["masks"], tau, state["tau"], state["image_size"]
        )

    def encode_query(self, query_images: torch.Tensor) -> QueryFeatures:
        return encoder_features(self.encoder, query_images, (self.feature_key, "tau"))

    def segment_encoded(self, features: QueryFeatures, state: SupportState) -> torch.Tensor:
        state = {**state, "image_size": tuple(features.image_size)}  # logits at the query's size, not the support's
        return self.query_logits(features[self.feature_key], features["tau"], state)

    # -- training --------------------------------------------------------------------------------------
    def alignment_losses(self, state: SupportState, qry: torch.Tensor, qry_tau: torch.Tensor, logits: torch.Tensor):
        """Alignment (docs/reference.md#shared-losses; DIFD weights it like the query loss,
        docs/reference.md#difd): bases from the predicted query mask segment every support shot.

        Args:
            state: :meth:`support_state` of the episode; qry: query features [1, C, h, w]; qry_tau: [1];
            logits: query logits [1, 2, H, W].

        Returns:
            {"align_nll", "align_boundary"}: scalars (weighted NLL in nats, boundary-F1 loss in [0, 1]); a
            graph-connected zero for both when the predicted query mask is empty.
        """
        pred = logits.argmax(dim=1).to(state["masks"].dtype)  # [1, H, W]
        if pred.sum() == 0:
            zero = logits.sum() * 0.0
            return {"align_nll": zero, "align_boundary": zero}
        bases = self.bases(qry, pred)
        supp, masks = state["features"], state["masks"]
        if self.faithful:  # released tau roles: query tau for the pseudo-masks, support tau for deployment
            tau_pseudo, tau_deploy = qry_tau.expand(len(supp)), state["tau"]
        else:  # each tau follows its image: the support is segmented, the query provides the bases
            tau_pseudo, tau_deploy = state["shot_tau"], qry_tau[0]
        probs = torch.softmax(self.logits_from_bases(bases, supp, qry, pred, tau_pseudo, tau_deploy, pred.shape[-2:]), 1)
        labels = binary_labels(masks)
        return {
            "align_nll": probability_nll(probs, labels, self.class_weights),
            "align_boundary": self.boundary_loss(probs, labels),
        }

    def forward_episode(self, support, support_masks, query, query_labels):
        state = self.support_state(support[self.feature_key], support["tau"], support_masks)
        qry, qry_tau = query[self.feature_key], query["tau"]
        logits = self.query_logits(qry, qry_tau, state)
        if query_labels is None:
            return logits, {}
        return logits, self.alignment_losses(state, qry, qry_tau, logits)

    def training_losses(self, logits, query_labels, episode_means):
        """Weighted NLL (0.1, 1) and boundary-F1 loss of the query logits [B, 2, H, W] against labels [B, H, W],
        then the batch means of the alignment terms (docs/reference.md#difd, losses, each weight 1)."""
        probs = torch.softmax(logits, dim=1)
        return {
            "query_nll": probability_nll(probs, query_labels, self.class_weights),
            "query_boundary": self.boundary_loss(probs, query_labels),
            **episode_means,
        }

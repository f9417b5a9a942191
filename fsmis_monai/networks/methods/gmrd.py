"""GMRD: generated multiple representatives (Cheng et al., "Few-shot Medical Image Segmentation via Generating
Multiple Representatives", IEEE TMI 2024, 10.1109/TMI.2024.3358295; docs/reference.md#gmrd).

On the Q-Net encoder's ``down2`` features (stride 4), with f_s upsampled to the image size:

1. **Descriptors.** For the foreground mask M (and likewise the background 1 - M): a "filled" map replaces
   every pixel outside M by the feature of a randomly drawn pixel inside M; a descriptor MLP maps its
   [C, H*W] matrix along the pixel axis to [C, n] (n = 100 fg / 600 bg); the class's global MAP prototype
   and an edge prototype (MAP over a 2-pixel band at the mask border) are appended: 102 fg and 602 bg
   descriptors. K shots are averaged descriptor-wise.
2. **MAMP.** Per class, the cosine affinity maps of the query features to all its descriptors (102 / 602
   channels at feature resolution) go through a small residual conv decoder to one logit map; the logits
   [bg, fg] are upsampled to the image (softmax(bg, fg) is the prediction).
3. **Empty support mask:** the Q-Net single-prototype path with the query-informed threshold tau.

Losses: weighted NLL [0.1, 1] on the query, an alignment loss (query descriptors from the predicted query
mask segment the support, unweighted NLL), and - the paper's two losses as in commit 45ba5c2 - 0.5 x
(intra + inter), where intra pulls support and query descriptors together and inter pushes each image's
fg and bg descriptors apart.

Switches: ``faithful=True`` is the released HEAD (no auxiliary losses, no ReLU in the descriptor MLP);
the default is the paper/45ba5c2 version with both. ``outer_edge="released"`` uses the released "outer-edge"
mask dilate(1 - M) - M, which is 1 on all background and -1 inside the object (docs/reference.md#quirk-gmrd-release);
``"band"`` (the default unless faithful) is the 2-pixel band just outside the object, as the paper describes.

The descriptor MLP's input size is the number of image pixels, so the model is built for one
``image_size`` (256 in the paper) and refuses other sizes with a clear error.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from monai.transforms import dilate as monai_dilate
from monai.transforms import erode as monai_erode
from torch import nn

from fsmis_monai.losses import binary_labels, probability_nll
from fsmis_monai.networks.methods.base import (
    FewShotOutput,
    FewShotSegmenter,
    QueryFeatures,
    SupportState,
    check_support,
    encoder_features,
    resolve_encoder,
)
from fsmis_monai.networks.prototypes import (
    cosine_map,
    foreground_probability_to_logits,
    masked_average_pooling,
    resize_to,
    threshold_probability,
)


def _morphology(op, mask: torch.Tensor, iterations: int) -> torch.Tensor:
    x = mask.reshape(-1, 1, *mask.shape[-2:])
    size = 2 * iterations + 1  # iterated 3x3 squares = one (2i+1) square
    return op(x, size).reshape(mask.shape).to(mask.dtype)


def dilate(mask: torch.Tensor, iterations: int = 2) -> torch.Tensor:
    """Binary dilation of {0, 1} masks [..., H, W] by a 3x3 square, ``iterations`` times (MONAI's ``dilate``;
    the image border counts as background)."""
    return _morphology(monai_dilate, mask, iterations)


def erode(mask: torch.Tensor, iterations: int = 2) -> torch.Tensor:
    """Binary erosion of {0, 1} masks [..., H, W] by a 3x3 square, ``iterations`` times (MONAI's ``erode``;
    the image border is ignored, so an object touching it is not eroded from there)."""
    return _morphology(monai_erode, mask, iterations)


def inner_edge_mask(mask: torch.Tensor) -> torch.Tensor:
    """Foreground pixels within 2 pixels of the background: M - erode(M)."""
    return mask - erode(mask)


def outer_edge_mask(mask: torch.Tensor, mode: str = "band") -> torch.Tensor:
    """Background edge mask: "band" = dilate(M) - M; "released" = dilate(1 - M) - M
    (docs/reference.md#quirk-gmrd-release)."""
    if mode == "band":
        return dilate(mask) - mask
    if mode == "released":
        return dilate(1.0 - mask) - mask
    raise ValueError(f"outer_edge must be 'band' or 'released', got {mode!r}")


def fill_outside_mask(features: torch.Tensor, mask: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """GMRD's "filled" feature map: features [C, P] (P pixels), mask [P] -> [C, P].

    Pixels inside the mask keep their feature; every other pixel takes the feature of a randomly drawn
    mask pixel, drawn without replacement when the mask has enough pixels, otherwise all mask pixels
    tiled plus a random remainder. An empty mask gives zeros.
    """
    inside = torch.nonzero(mask.reshape(-1) == 1).flatten()
    outside = torch.nonzero(mask.reshape(-1) != 1).flatten()
    n_in, n_out = inside.numel(), outside.numel()
    if n_in == 0:
        return features.new_zeros(features.shape)
    if n_out == 0:
        return features
    device = features.device
    if n_in >= n_out:
        picks = torch.randperm(n_in, generator=generator)[:n_out]
    else:
        remainder = torch.randperm(n_in, generator=generator)[: n_out % n_in]
        picks = torch.cat([remainder, torch.arange(n_in).repeat(n_out // n_in)])
    source = torch.arange(features.shape[1], device=device)
    source[outside] = inside[picks.to(device)]
    return features[:, source]


class DescriptorMLP(nn.Sequential):
    """Linear(P -> n) -> Dropout(0.2) [-> ReLU] -> Linear(n -> n), applied along the pixel axis."""

    def __init__(self, n_pixels: int, n_descriptors: int, relu: bool) -> None:
        layers = [nn.Linear(n_pixels, n_descriptors), nn.Dropout(0.2)]
        if relu:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_descriptors, n_descriptors))
        super().__init__(*layers)


class AffinityDecoder(nn.Module):
    """MAMP decoder: (n + 2) affinity maps -> one logit map (conv residual block, no biases)."""

    def __init__(self, n_descriptors: int, hidden: int = 100) -> None:
        super().__init__()
        n = n_descriptors
        self.reduce = nn.Sequential(nn.Conv2d(n + 2, n, 1, bias=False), nn.ReLU())
        self.residual = nn.Sequential(
            nn.Conv2d(n, n, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1, bias=False), nn.ReLU()
        )
        self.head = nn.Sequential(
            nn.Conv2d(n, hidden, 3, padding=1, bias=False), nn.ReLU(), nn.Dropout2d(0.1), nn.Conv2d(hidden, 1, 1, bias=False)
        )

    def forward(self, affinity: torch.Tensor) -> torch.Tensor:
        """Cosine affinity maps [N, n + 2, h, w] to one class's descriptors -> one logit map [N, 1, h, w]."""
        x = self.reduce(affinity)
        return self.head(self.residual(x) + x)


def descriptor_consistency_loss(
    supp_fg: torch.Tensor, qry_fg: torch.Tensor, supp_bg: torch.Tensor, qry_bg: torch.Tensor
) -> torch.Tensor:
    """The paper's intra + inter loss on descriptor sets [n + 2, C] (last two rows: global MAP, edge).

    intra = 2 - mean_fg - mean_bg, where mean_c averages each support MLP descriptor's best cosine to the
    query MLP descriptors together with cos(global, global) and cos(edge, edge); inter = max(0, mean cos
    of fg vs bg descriptors) for the support plus the same for the query.
    """

    def agreement(s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        s, q = F.normalize(s, dim=-1), F.normalize(q, dim=-1)
        best = (s[:-2] @ q[:-2].t()).max(dim=1).values
        return torch.cat([best, (s[-2:] * q[-2:]).sum(-1)]).mean()

    def separation(fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        return (F.normalize(fg, dim=-1) @ F.normalize(bg, dim=-1).t()).mean().clamp(min=0)

    intra = 2 - agreement(supp_fg, qry_fg) - agreement(supp_bg, qry_bg)
    inter = separation(supp_fg, supp_bg) + separation(qry_fg, qry_bg)
    return intra + inter


class GMRD(FewShotSegmenter):
    """Generated multiple representatives + multi-affinity decoding (see the module docstring).

    Args:
        encoder: module or registered name (default "qnet_resnet101"); must give ``feature_key`` and "tau".
        pretrained_weights: passed to the encoder builder when ``encoder`` is a name.
        image_size: input side (int) or (H, W); fixes the descriptor MLP's input size H * W.
        n_fg, n_bg: MLP descriptors per class (100 / 600).
        feature_key: encoder output used ("down2", stride 4).
        faithful: released HEAD (no auxiliary losses, no MLP ReLU, released outer-edge mask).
        auxiliary_weight: weight of intra + inter (0.5; ignored when faithful).
        outer_edge: "band" or "released"; None follows ``faithful``.
        class_weights: weights (bg, fg) of the query NLL, (0.1, 1).
        eval_seed: seed of the fill sampling in eval mode, so inference is reproducible (training draws
            from the global torch RNG, which the trainer seeds).
    """

    name = "gmrd"

    def __init__(
        self,
        encoder: "str | nn.Module" = "qnet_resnet101",
        pretrained_weights: Optional[str] = None,
        image_size: Union[int, Sequence[int]] = 256,
        n_fg: int = 100,
        n_bg: int = 600,
        feature_key: str = "down2",
        faithful: bool = False,
        auxiliary_weight: float = 0.5,
        outer_edge: Optional[str] = None,
        class_weights: Sequence[float] = (0.1, 1.0),
        scale: float = 20.0,
        eval_seed: int = 2025,
    ) -> None:
        super().__init__()
        self.encoder = resolve_encoder(encoder, pretrained_weights, faithful)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if len(size) != 2:
            raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
        self.image_size: Tuple[int, int] = size
        self.feature_key = feature_key
        self.faithful = faithful
        self.auxiliary_weight = 0.0 if faithful else auxiliary_weight
        self.outer_edge = outer_edge or ("released" if faithful else "band")
        outer_edge_mask(torch.zeros(1, 3, 3), self.outer_edge)  # validate the mode early
        self.scale = scale
        self.eval_seed = eval_seed
        self.class_weights = tuple(class_weights)
        n_pixels = size[0] * size[1]
        self.fg_mlp = DescriptorMLP(n_pixels, n_fg, relu=not faithful)
        self.bg_mlp = DescriptorMLP(n_pixels, n_bg, relu=not faithful)
        self.fg_decoder = AffinityDecoder(n_fg)
        self.bg_decoder = AffinityDecoder(n_bg)

    # -- descriptors -----------------------------------------------------------------------------------
    def _check_size(self, size: Tuple[int, int]) -> None:
        if tuple(size) != self.image_size:
            raise ValueError(
                f"GMRD was built for {self.image_size[0]}x{self.image_size[1]} images (its descriptor MLP takes "
                f"{self.image_size[0] * self.image_size[1]} pixels) but got {size[0]}x{size[1]}; resize the "
                "inputs or build the model with image_size matching them"
            )

    def _generator(self) -> Optional[torch.Generator]:
        return None if self.training else torch.Generator().manual_seed(self.eval_seed)

    def descriptors(self, features: torch.Tensor, mask: torch.Tensor, generator=None) -> Dict[str, torch.Tensor]:
        """fg [n_fg + 2, C] and bg [n_bg + 2, C] descriptors of one image: features [C, h, w], mask [H, W]."""
        self._check_size(tuple(mask.shape[-2:]))
        full = resize_to(features[None], tuple(mask.shape[-2:]))[0]  # [C, H, W], align_corners=True
        c = full.shape[0]
        out = {}
        for cls, m, edge, mlp in (
            ("fg", mask, inner_edge_mask(mask), self.fg_mlp),
            ("bg", 1.0 - mask, outer_edge_mask(mask, self.outer_edge), self.bg_mlp),
        ):
            filled = fill_outside_mask(full.reshape(c, -1), m.reshape(-1), generator)
            generated = mlp(filled).t()  # [n, C]
            glob = masked_average_pooling(full[None], m[None])
            edge_proto = masked_average_pooling(full[None], edge[None])
            out[cls] = torch.cat([generated, glob, edge_proto])
        return out

    def support_state(self, features: torch.Tensor, masks: torch.Tensor) -> SupportState:
        """State from support encoder features [K, C, h, w] and masks [K, H, W]."""
        size = tuple(masks.shape[-2:])
        if masks.sum() == 0:  # released fallback: one (zero-mask) prototype, query-informed threshold
            proto = masked_average_pooling(features, masks, align_corners=True).mean(0)
            return {"image_size": size, "fallback": True, "prototype": proto}
        generator = self._generator()
        per_shot = [self.descriptors(f, m, generator) for f, m in zip(features, masks)]
        return {
            "image_size": size,
            "fallback": False,
            "fg": torch.stack([d["fg"] for d in per_shot]).mean(0),
            "bg": torch.stack([d["bg"] for d in per_shot]).mean(0),
        }

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
        """:meth:`support_state` of support images [K, C, H, W] and masks [K, H, W]; ``ValueError`` on
        inconsistent shapes (:func:`check_support`) or a slice size the MLP was not built for."""
        check_support(support_images, support_masks)
        self._check_size(tuple(support_masks.shape[-2:]))
        enc = self.encoder(support_images)
        return self.support_state(enc[self.feature_key], support_masks)

    # -- prediction ------------------------------------------------------------------------------------
    def mamp_logits(self, features: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, size) -> torch.Tensor:
        """[N, 2, H, W] logits [bg, fg] from features [N, C, h, w] and descriptor sets [n + 2, C]."""
        fg_logit = self.fg_decoder(cosine_map(features, fg))
        bg_logit = self.bg_decoder(cosine_map(features, bg))
        return resize_to(torch.cat([bg_logit, fg_logit], dim=1), tuple(size))

    def query_logits(self, features: torch.Tensor, tau: torch.Tensor, state: SupportState) -> torch.Tensor:
        """Logits [N, 2, H, W] of query features [N, C, h, w]: multiple affinity maps (:meth:`mamp_logits`), or
        the Q-Net threshold with tau [N] after an empty support mask (docs/reference.md#gmrd)."""
        size = state["image_size"]
        if state["fallback"]:
            p = threshold_probability(features, state["prototype"], tau, self.scale)
            return foreground_probability_to_logits(resize_to(p[:, None], tuple(size))[:, 0])
        return self.mamp_logits(features, state["fg"], state["bg"], size)

    def encode_query(self, query_images: torch.Tensor) -> QueryFeatures:
        return encoder_features(self.encoder, query_images, (self.feature_key, "tau"))

    def segment_encoded(self, features: QueryFeatures, state: SupportState) -> torch.Tensor:
        return self.query_logits(features[self.feature_key], features["tau"], state)

    # -- training --------------------------------------------------------------------------------------
    def alignment_losses(
        self, supp_feats: torch.Tensor, supp_masks: torch.Tensor, qry_feats: torch.Tensor, qry_tau, logits, state
    ) -> Dict[str, torch.Tensor]:
        """Alignment (docs/reference.md#shared-losses): query descriptors built from the predicted query mask
        segment the support; plus the paper's descriptor consistency term (docs/reference.md#gmrd, 0.5 x
        intra + inter; absent from the released HEAD, docs/reference.md#quirk-gmrd-release).

        Args:
            supp_feats: support features [K, C, h, w]; supp_masks: {0, 1} masks [K, H, W].
            qry_feats: query features [1, C, h, w]; qry_tau: scalar threshold logit (the fallback path).
            logits: query logits [1, 2, H, W]; state: :meth:`support_state` of the episode.

        Returns:
            {"align", "aux"}: scalars (NLL in nats; weighted cosine terms); a graph-connected zero for both
            when the predicted query mask is empty, "aux" zero without ``auxiliary_weight`` or on the fallback.
        """
        zero = logits.sum() * 0.0
        pred = logits.argmax(dim=1)[0].to(supp_masks.dtype)  # [H, W]
        if pred.sum() == 0:
            return {"align": zero, "aux": zero}
        labels = binary_labels(supp_masks)
        if state["fallback"]:
            proto = masked_average_pooling(qry_feats, pred[None], align_corners=True)[0]
            tau = qry_tau.expand(supp_feats.shape[0])  # released: the query's threshold
            p = resize_to(threshold_probability(supp_feats, proto, tau, self.scale)[:, None], tuple(pred.shape))[:, 0]
            probs = torch.stack([1.0 - p, p], dim=1)
            return {"align": probability_nll(probs, labels), "aux": zero}
        qry = self.descriptors(qry_feats[0], pred, self._generator())
        probs = torch.softmax(self.mamp_logits(supp_feats, qry["fg"], qry["bg"], pred.shape), dim=1)
        out = {"align": probability_nll(probs, labels), "aux": zero}
        if self.auxiliary_weight:
            aux = descriptor_consistency_loss(state["fg"], qry["fg"], state["bg"], qry["bg"])
            out["aux"] = self.auxiliary_weight * aux
        return out

    def forward(self, support_images, support_masks, query_images, query_labels=None) -> FewShotOutput:
        self._check_size(tuple(support_masks.shape[-2:]))  # before the encoder pass
        return super().forward(support_images, support_masks, query_images, query_labels)

    def forward_episode(self, support, support_masks, query, query_labels):
        s_feats, q_feats, q_tau = support[self.feature_key], query[self.feature_key], query["tau"]
        state = self.support_state(s_feats, support_masks)
        logits = self.query_logits(q_feats, q_tau, state)
        if query_labels is None:
            return logits, {}
        return logits, self.alignment_losses(s_feats, support_masks, q_feats, q_tau[0], logits, state)

    def training_losses(self, logits, query_labels, episode_means):
        """Weighted NLL (0.1, 1) of the query logits [B, 2, H, W] against labels [B, H, W], the batch mean of
        "align" and, with ``auxiliary_weight``, of "aux" (docs/reference.md#gmrd)."""
        losses = {
            "query_nll": probability_nll(torch.softmax(logits, dim=1), query_labels, self.class_weights),
            "align": episode_means["align"],
        }
        if self.auxiliary_weight:
            losses["aux"] = episode_means["aux"]
        return losses

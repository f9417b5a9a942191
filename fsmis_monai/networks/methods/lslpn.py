"""LSLPN: location-sensitive local prototypes (Yu et al., "A Location-Sensitive Local Prototype Network for
Few-Shot Medical Image Segmentation", ISBI 2021, arXiv 2103.10178; docs/reference.md#lslpn).

The image plane is covered by an overlapping grid of square cells: side k = H / n_grid (n_grid = 8), stride
k / 2, the last window of each row/column moved to end at the border (15 x 15 = 225 cells whenever H is a
multiple of 16, e.g. 512 as in the paper or 256 as in the shared benchmarks). Support features are upsampled
to the image size and, in every cell g, a foreground and a background prototype is the masked average of
the features inside g, kept only when the mask has more than ``min_pixels`` (10) pixels in g. A query pixel x
is scored per class c by the best cell covering it:

    s_c(x) = max over cells g containing x of  20 * cos(f(x), p_{c,g}),

and ``[s_bg, s_fg]`` are the logits (plain cross-entropy, no alignment loss).

``faithful=True`` reproduces the released handling of cells whose mask is too small: they get a zero
prototype, i.e. a constant score 0 that takes part in the max, and every score is floored at -1 (the
released score map starts at -1 before the max). The default (corrected) ignores such cells in the max and
scores pixels that no valid cell covers against the class's global (whole-mask) prototype, so the scores
are true cosines (docs/reference.md#quirk-lslpn-empty-cells).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

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
    _interpolation_matrix,
    interval_indicators,
    masked_average_pooling,
    resize_to,
)


def window_starts(size: int, n_grid: int = 8, overlap: bool = True) -> Tuple[List[int], int]:
    """Start offsets of the 1-D grid windows and their length k = size // n_grid.

    Windows step by k (or k // 2 with ``overlap``); when the last one stops short of the border one more
    window ending exactly at the border is added, so every pixel is covered.
    """
    k = size // n_grid
    stride = k // 2 if overlap else k
    if k < 1 or stride < 1:
        raise ValueError(f"image side {size} is too small for a {n_grid}-cell grid{' with overlap' if overlap else ''}")
    starts = list(range(0, size - k + 1, stride))
    if starts[-1] + k < size:
        starts.append(size - k)
    return starts, k


def _disjoint_layers(starts: List[int], k: int) -> List[List[int]]:
    """Split windows into layers of pairwise disjoint windows (greedy interval colouring).

    Within a layer every pixel is covered at most once, so a layer's prototypes can be painted into one
    full-resolution map; the max over covering cells becomes a max over a handful of layers.
    """
    layers: List[List[int]] = []
    ends: List[int] = []
    for g in sorted(range(len(starts)), key=lambda i: starts[i]):
        for j, end in enumerate(ends):
            if end <= starts[g]:
                layers[j].append(g)
                ends[j] = starts[g] + k
                break
        else:
            layers.append([g])
            ends.append(starts[g] + k)
    return layers


def _layer_index(layer: List[int], starts: List[int], k: int, size: int, device) -> torch.Tensor:
    """[size] index of the window of ``layer`` covering each position, -1 where none does."""
    index = torch.full((size,), -1, dtype=torch.long, device=device)
    for g in layer:
        index[starts[g] : starts[g] + k] = g
    return index


class LSLPN(FewShotSegmenter):
    """Location-sensitive local prototype network (see the module docstring).

    Args:
        encoder: an encoder module or a registered encoder name (default "lslpn_resnet50", stride 8).
        pretrained_weights: passed to the encoder builder when ``encoder`` is a name.
        feature_key: which encoder output to use ("down3" = stride 8, the LSLPN layout).
        n_grid: cells per image side (8: cell = H / 8).
        overlap: half-cell stride (True, as released) or a plain non-overlapping grid.
        min_pixels: a cell yields a class prototype only if the class has more pixels than this in the cell.
        scale: cosine multiplier (20).
        faithful: released empty-cell handling (zero prototypes, -1 floor) instead of the corrected one.
    """

    name = "lslpn"

    def __init__(
        self,
        encoder: "str | nn.Module" = "lslpn_resnet50",
        pretrained_weights: Optional[str] = None,
        feature_key: str = "down3",
        n_grid: int = 8,
        overlap: bool = True,
        min_pixels: int = 10,
        scale: float = 20.0,
        faithful: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = resolve_encoder(encoder, pretrained_weights, faithful)
        self.feature_key = feature_key
        self.n_grid = n_grid
        self.overlap = overlap
        self.min_pixels = min_pixels
        self.scale = scale
        self.faithful = faithful

    # -- grid prototypes -------------------------------------------------------------------------------
    def grid(self, size: Tuple[int, int]):
        """(row starts, cell height, column starts, cell width) of the grid for an image of ``size``."""
        ys, ky = window_starts(size[0], self.n_grid, self.overlap)
        xs, kx = window_starts(size[1], self.n_grid, self.overlap)
        return ys, ky, xs, kx

    def cell_prototypes(self, features: torch.Tensor, masks: torch.Tensor):
        """Per-cell masked averages of the features bilinearly upsampled to the mask size.

        features [K, C, h, w], masks [K, H, W] -> prototypes [K, Gy, Gx, C] (zero where the cell is empty)
        and validity [K, Gy, Gx] (count > min_pixels). Upsampling is linear, so each cell's masked sum of
        upsampled features is the low-resolution features pooled against that cell's mask pulled back
        through the interpolation (A_h^T (M restricted to the cell) A_w); no full-size feature map is made.
        """
        size = tuple(masks.shape[-2:])
        ys, ky, xs, kx = self.grid(size)
        m = masks.to(features.dtype)
        ys_t, xs_t = torch.as_tensor(ys, device=m.device), torch.as_tensor(xs, device=m.device)
        wy = interval_indicators(ys_t, ys_t + ky, size[0], m.dtype)  # [Gy, H]: each cell's rows
        wx = interval_indicators(xs_t, xs_t + kx, size[1], m.dtype)  # [Gx, W]: each cell's columns
        counts = torch.einsum("gH,kHW,jW->kgj", wy, m, wx)
        a_h = _interpolation_matrix(features.shape[-2], size[0], False, m)  # [H, h]
        a_w = _interpolation_matrix(features.shape[-1], size[1], False, m)  # [W, w]
        rows = torch.einsum("gH,kHW->kgHW", wy, m)  # mask restricted to each row band
        rows = torch.einsum("Hh,kgHW->kghW", a_h, rows)
        weights = torch.einsum("kghW,jW,Ww->kgjhw", rows, wx, a_w)  # [K, Gy, Gx, h, w]
        sums = torch.einsum("kchw,kgjhw->kgjc", features, weights)
        valid = counts > self.min_pixels
        protos = sums / (counts[..., None] + MAP_EPS)
        return protos * valid[..., None].to(protos.dtype), valid

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
        check_support(support_images, support_masks)
        return self.support_state(self.encoder(support_images)[self.feature_key], support_masks)

    def support_state(self, features: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
        """Grid and global prototypes from encoder features [K, C, h, w] and masks [K, H, W]."""
        state: SupportState = {"image_size": tuple(support_masks.shape[-2:])}
        for cls, mask in (("bg", 1.0 - support_masks), ("fg", support_masks)):
            protos, valid = self.cell_prototypes(features, mask)
            if self.faithful:  # released: mean over shots, empty cells contributing zeros
                state[cls] = protos.mean(0)
                state[f"{cls}_valid"] = torch.ones_like(valid[0])
            else:  # corrected: mean over the shots where the cell is valid
                n_valid = valid.sum(0)
                state[cls] = protos.sum(0) / n_valid.clamp(min=1)[..., None].to(protos.dtype)
                state[f"{cls}_valid"] = n_valid > 0
            state[f"{cls}_global"] = masked_average_pooling(features, mask, align_corners=False).mean(0)
        return state

    # -- scoring ---------------------------------------------------------------------------------------
    def class_scores(
        self, features: torch.Tensor, size, protos: torch.Tensor, valid: torch.Tensor, global_proto: torch.Tensor,
        norm: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Max over covering cells of scale * cos(up(f)(x), p_g): features [N, C, h, w] -> [N, H, W].

        protos [Gy, Gx, C], valid [Gy, Gx]; ``norm`` [N, H, W] = |up(f)| (computed when not given).
        Upsampling is linear, so up(f) . p = up(f . p): the numerators of all cells are computed at feature
        resolution and upsampled, and each layer of disjoint cells picks its cell's map per pixel.
        """
        n, c = features.shape[:2]
        h, w = size
        ys, ky, xs, kx = self.grid((h, w))
        if norm is None:
            norm = resize_to(features, (h, w), align_corners=False).norm(dim=1)
        norm = norm.clamp(min=1e-8)
        units = F.normalize(torch.cat([protos.reshape(-1, c), global_proto[None]]), dim=1)
        numerators = resize_to(torch.einsum("nchw,gc->nghw", features, units), (h, w), align_corners=False)
        empty = len(ys) * len(xs)  # index of the global map, which also stands for "no cell here"
        cells = []
        for layer_y in _disjoint_layers(ys, ky):
            iy = _layer_index(layer_y, ys, ky, h, features.device)
            for layer_x in _disjoint_layers(xs, kx):
                ix = _layer_index(layer_x, xs, kx, w, features.device)
                cell = iy[:, None] * len(xs) + ix[None, :]
                cells.append(torch.where((iy[:, None] >= 0) & (ix[None, :] >= 0), cell, torch.full_like(cell, empty)))
        cells = torch.stack(cells)  # [L, H, W]: per layer of disjoint cells, the cell covering each pixel
        covered = torch.cat([valid.reshape(-1), valid.new_zeros(1)])[cells]
        scores = self.scale * numerators.gather(1, cells.expand(n, -1, -1, -1)) / norm[:, None]
        best = scores.masked_fill(~covered, float("-inf")).amax(dim=1)
        if self.faithful:
            return best.clamp(min=-1.0)  # released score map is initialised to -1 before the max
        return torch.where(torch.isfinite(best), best, self.scale * numerators[:, -1] / norm)

    def encode_query(self, query_images: torch.Tensor) -> QueryFeatures:
        return encoder_features(self.encoder, query_images, (self.feature_key,))

    def segment_encoded(self, features: QueryFeatures, state: SupportState) -> torch.Tensor:
        size = tuple(features.image_size)
        if size != tuple(state["image_size"]):
            raise ValueError(f"query size {size} differs from the support size {tuple(state['image_size'])}")
        return self.query_logits(features[self.feature_key], state)

    def query_logits(self, features: torch.Tensor, state: SupportState) -> torch.Tensor:
        """[N, 2, H, W] logits [s_bg, s_fg] from query encoder features [N, C, h, w]."""
        size = tuple(state["image_size"])
        norm = resize_to(features, size, align_corners=False).norm(dim=1)
        return torch.stack(
            [
                self.class_scores(features, size, state[c], state[f"{c}_valid"], state[f"{c}_global"], norm)
                for c in ("bg", "fg")
            ],
            dim=1,
        )

    def forward_episode(self, support, support_masks, query, query_labels):
        """Plain cross-entropy on the logits (the base's :meth:`training_losses`), no alignment term."""
        return self.query_logits(query[self.feature_key], self.support_state(support[self.feature_key], support_masks)), {}

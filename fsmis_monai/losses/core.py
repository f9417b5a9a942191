"""Loss terms shared by the prototype methods (docs/reference.md#shared-losses).

- :func:`weighted_cross_entropy`: class-weighted CE on logits (SSL-ALPNet, bg weight 0.05);
- :func:`weighted_nll_from_probs`: class-weighted NLL on probabilities clamped to [eps, 1 - eps] before the
  log, as the threshold-based methods (ADNet, Q-Net and their descendants) compute it;
- :func:`prototype_alignment_loss`: PANet's alignment pattern (Wang et al., ICCV 2019): the query's
  predicted mask builds query prototypes, which segment the support, scored against the support mask;
- :func:`threshold_loss`: ADNet's penalty T / 20 on its learned anomaly threshold (Hansen et al., MedIA 2022).

Written here because MONAI's losses take logits/one-hot targets without an ignore index; these are thin
wrappers on ``torch.nn.functional`` with the references' clamping and weighting.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from fsmis_monai.networks.prototypes import PROBABILITY_EPS, binary_labels, probability_nll

IGNORE_INDEX = 255
#: probability clamp of the references: float32 machine epsilon
PROB_EPS = PROBABILITY_EPS


def _class_weight(weight: Optional[Sequence[float] | torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    if weight is None:
        return None
    return torch.as_tensor(weight, dtype=like.dtype, device=like.device)


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[Sequence[float] | torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Cross-entropy of logits [N, K, H, W] against labels [N, H, W]; ``ignore_index`` pixels are skipped."""
    return F.cross_entropy(logits, target.long(), weight=_class_weight(weight, logits), ignore_index=ignore_index)


def clamped_log_probs(probs: torch.Tensor, eps: float = PROB_EPS) -> torch.Tensor:
    """log(clamp(p, eps, 1 - eps)): the log-probabilities the threshold methods feed to NLL."""
    return torch.log(torch.clamp(probs, eps, 1.0 - eps))


def weighted_nll_from_log_probs(
    log_probs: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[Sequence[float] | torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Weighted NLL of log-probabilities [N, K, H, W] (mean normalised by the weights of the counted pixels)."""
    return F.nll_loss(log_probs, target.long(), weight=_class_weight(weight, log_probs), ignore_index=ignore_index)


def weighted_nll_from_probs(
    probs: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[Sequence[float] | torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    eps: float = PROB_EPS,
) -> torch.Tensor:
    """Weighted NLL of probabilities [N, K, H, W], clamped to [eps, 1 - eps] before the log."""
    return probability_nll(probs, target, _class_weight(weight, probs), ignore_index, eps)


#: labels of support masks [K, H, W]: 1 where the mask is 1, 0 where it is 0, ``ignore_index`` elsewhere
support_labels = binary_labels


def prototype_alignment_loss(
    query_foreground: torch.Tensor,
    support_masks: torch.Tensor,
    segment_support: Callable[[torch.Tensor, int], torch.Tensor],
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    skip_empty: bool = True,
) -> torch.Tensor:
    """PANet's prototype alignment loss for one episode, averaged over the support shots.

    Args:
        query_foreground: the query's predicted foreground mask [1, h, w] (0/1; e.g. the argmax of the
            query prediction), from which ``segment_support`` builds the query prototypes.
        support_masks: support ground truth [K, H, W] (1 fg, 0 bg, anything else ignored).
        segment_support: ``(query_foreground, shot) -> output`` [1, 2, H, W] for support shot ``shot``
            (logits or log-probabilities, whatever ``criterion`` expects).
        criterion: ``(output, labels [1, H, W]) -> scalar``.
        skip_empty: return 0 when the query prediction has no foreground (ADNet, Q-Net); SSL-ALPNet does
            not skip (its prototypes then come out zero).
    """
    zero = support_masks.new_zeros(())
    if skip_empty and not bool(query_foreground.any()):
        return zero
    labels = support_labels(support_masks)
    n_shots = support_masks.shape[0]
    loss = zero
    for shot in range(n_shots):
        loss = loss + criterion(segment_support(query_foreground, shot), labels[shot : shot + 1]) / n_shots
    return loss


def threshold_loss(threshold: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """ADNet's threshold penalty: T / scale (T is the learned anomaly threshold, initialised at -10)."""
    return threshold.mean() / scale

"""Loss terms shared by the few-shot methods (docs/reference.md#shared-losses): one vocabulary for all of them.

Every term takes integer labels [N, H, W] with ``IGNORE_INDEX`` (255) for pixels that do not count and class
weights ``weight`` (bg, fg) or None; only the input differs:

- :func:`weighted_cross_entropy`: logits (SSL-ALPNet, LSLPN, the prototype baseline);
- :func:`weighted_nll`: log-probabilities (ADNet, Q-Net: their logits are clamped log-probabilities);
- :func:`probability_nll`: probabilities, clamped to [``PROB_EPS``, 1 - ``PROB_EPS``] before the log, as the
  Q-Net family computes it (GMRD, PAMI, DIFD);
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

#: label value of pixels that no loss counts
IGNORE_INDEX = 255
#: probability clamp of the references before the log: float32 machine epsilon
PROB_EPS = float(torch.finfo(torch.float32).eps)

ClassWeights = Optional["Sequence[float] | torch.Tensor"]


def _class_weight(weight: ClassWeights, like: torch.Tensor) -> Optional[torch.Tensor]:
    if weight is None:
        return None
    return torch.as_tensor(weight, dtype=like.dtype, device=like.device)


def binary_labels(mask: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Long labels from a float mask [...]: 1 where the mask is 1, 0 where it is 0, ``ignore_index`` elsewhere."""
    labels = torch.full(mask.shape, ignore_index, dtype=torch.long, device=mask.device)
    labels[mask == 1] = 1
    labels[mask == 0] = 0
    return labels


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: ClassWeights = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Cross-entropy of logits [N, K, H, W] against labels [N, H, W]; ``ignore_index`` pixels are skipped."""
    return F.cross_entropy(logits, target.long(), weight=_class_weight(weight, logits), ignore_index=ignore_index)


def weighted_nll(
    log_probs: torch.Tensor, target: torch.Tensor, weight: ClassWeights = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Weighted NLL of log-probabilities [N, K, H, W] (mean normalised by the weights of the counted pixels)."""
    return F.nll_loss(log_probs, target.long(), weight=_class_weight(weight, log_probs), ignore_index=ignore_index)


def probability_nll(
    probabilities: torch.Tensor,
    target: torch.Tensor,
    weight: ClassWeights = None,
    ignore_index: int = IGNORE_INDEX,
    eps: float = PROB_EPS,
) -> torch.Tensor:
    """Weighted NLL of class probabilities [N, K, H, W]: :func:`weighted_nll` of log(clamp(p, eps, 1 - eps))."""
    return weighted_nll(torch.log(probabilities.clamp(eps, 1.0 - eps)), target, weight, ignore_index)


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
    labels = binary_labels(support_masks)
    n_shots = support_masks.shape[0]
    loss = zero
    for shot in range(n_shots):
        loss = loss + criterion(segment_support(query_foreground, shot), labels[shot : shot + 1]) / n_shots
    return loss


def threshold_loss(threshold: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """ADNet's threshold penalty: T / scale (T is the learned anomaly threshold, initialised at -10)."""
    return threshold.mean() / scale

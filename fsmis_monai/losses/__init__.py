"""Loss terms shared by the few-shot methods (weighted CE/NLL, alignment pattern, threshold loss, boundary-F1)."""

from fsmis_monai.losses.core import (
    IGNORE_INDEX,
    PROB_EPS,
    clamped_log_probs,
    prototype_alignment_loss,
    support_labels,
    threshold_loss,
    weighted_cross_entropy,
    weighted_nll_from_log_probs,
    weighted_nll_from_probs,
)
from fsmis_monai.losses.boundary import BoundaryF1Loss

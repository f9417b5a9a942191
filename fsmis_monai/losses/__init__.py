"""Loss terms shared by the few-shot methods (weighted CE/NLL, alignment pattern, threshold loss, boundary-F1)."""

from fsmis_monai.losses.core import (
    IGNORE_INDEX,
    PROB_EPS,
    binary_labels,
    probability_nll,
    prototype_alignment_loss,
    threshold_loss,
    weighted_cross_entropy,
    weighted_nll,
)
from fsmis_monai.losses.boundary import BoundaryF1Loss

"""Array + dictionary transforms MONAI lacks, used by the preprocessing recipes and the data pipeline.

Everything else the recipes need comes straight from MONAI (``LoadImaged``, ``Orientationd``,
``ClipIntensityPercentilesd``, ``ScaleIntensityRanged``, ``MapLabelValued``, ``ResizeWithPadOrCropd``...).
"""

from fsmis_monai.transforms.chaos import CHAOS_GREY_RANGES, ChaosPngLabelStack, LoadChaosPngLabeld
from fsmis_monai.transforms.checks import (
    CheckedLoadImaged,
    CheckLabelValues,
    CheckLabelValuesd,
    CheckSameShaped,
    check_raw_path,
)
from fsmis_monai.transforms.spatial import (
    CropBorder,
    CropBorderd,
    CropOrPadInPlane,
    CropOrPadInPlaned,
    ResampleToSpacing,
    ResampleToSpacingd,
    output_size,
)

__all__ = [
    "CHAOS_GREY_RANGES",
    "ChaosPngLabelStack",
    "LoadChaosPngLabeld",
    "CheckedLoadImaged",
    "CheckLabelValues",
    "CheckLabelValuesd",
    "CheckSameShaped",
    "check_raw_path",
    "CropBorder",
    "CropBorderd",
    "CropOrPadInPlane",
    "CropOrPadInPlaned",
    "ResampleToSpacing",
    "ResampleToSpacingd",
    "output_size",
]

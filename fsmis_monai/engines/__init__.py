"""Few-shot training on MONAI/ignite engines: episode batches into ``SupervisedTrainer``, resumable episode
order, training handlers, periodic volumetric validation and bundle-facing helpers."""

from fsmis_monai.engines.checkpoints import TrainingCheckpoints
from fsmis_monai.engines.data import ensure_pseudolabels, pseudolabel_command
from fsmis_monai.engines.fewshot import FewShotInferer, FewShotLoss, FewShotPrepareBatch, loss_terms, total_loss
from fsmis_monai.engines.handlers import (
    LearningRateLogger,
    LossProgressBar,
    prediction_overlay,
    query_overlays,
    summary_writer,
)
from fsmis_monai.engines.resume import (
    ContinueRun,
    ResumableEpisodeSampler,
    ResumeEpisodes,
    checkpoint_iteration,
    iterations_asked,
    latest_checkpoint,
)
from fsmis_monai.engines.inference import FewShotVolumeInferer, load_support
from fsmis_monai.engines.performance import amp_kwargs, compile_encoder, set_cudnn
from fsmis_monai.engines.validation import FewShotValidation

__all__ = [
    "TrainingCheckpoints",
    "ensure_pseudolabels",
    "pseudolabel_command",
    "FewShotVolumeInferer",
    "load_support",
    "amp_kwargs",
    "set_cudnn",
    "compile_encoder",
    "FewShotInferer",
    "FewShotLoss",
    "FewShotPrepareBatch",
    "loss_terms",
    "total_loss",
    "LearningRateLogger",
    "LossProgressBar",
    "prediction_overlay",
    "query_overlays",
    "summary_writer",
    "ResumableEpisodeSampler",
    "ResumeEpisodes",
    "ContinueRun",
    "iterations_asked",
    "checkpoint_iteration",
    "latest_checkpoint",
    "FewShotValidation",
]

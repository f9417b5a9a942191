"""Small training handlers MONAI/ignite lack in the exact form a few-shot run needs.

- :class:`LossProgressBar`: ignite's tqdm bar showing the loss (ignite's ``attach`` takes the output
  transform as an argument, which bundle configs cannot pass, so it is bound at construction);
- :class:`LearningRateLogger`: the optimiser's learning rate as a TensorBoard scalar per iteration
  (MONAI's ``LrScheduleHandler`` only prints it);
- :func:`query_overlays` / :func:`prediction_overlay`: RGB overlays (query image + ground truth, query image +
  prediction) for MONAI's ``TensorBoardImageHandler``, built with :func:`monai.visualize.blend_images`;
- :func:`summary_writer`: the run's TensorBoard writer on rank 0 only (ignite's ``idist``), a stand-in that
  writes nothing elsewhere.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.utils import CommonKeys
from monai.visualize import blend_images

from fsmis_monai.engines.fewshot import QUERY_IMAGES, QUERY_LABELS, total_loss


class NoSummaryWriter:
    """Stands for a ``SummaryWriter`` where nothing is logged: every method accepts its arguments and does nothing.

    MONAI's TensorBoard handlers create their own writer (and folder) when given ``None``, and a bundle config
    resolves every handler of its lists, also those a rank other than 0 never attaches.
    """

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def summary_writer(log_dir: str, **kwargs: Any) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` of ``log_dir`` on rank 0 (or without ``torch.distributed``);
    on other ranks a :class:`NoSummaryWriter`, so no empty ``tensorboard_rank<N>/`` folder is made (their
    logging handlers are not attached: ``multi_gpu_train.json``)."""
    import ignite.distributed as idist
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir, **kwargs) if idist.get_rank() == 0 else NoSummaryWriter()


class LossProgressBar(ProgressBar):
    """``ProgressBar`` that shows the training loss when attached by a bundle's handler list."""

    def __init__(self, output_transform: Callable[[Any], Any] = total_loss, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._loss_transform = output_transform

    def attach(self, engine: Engine, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("output_transform", lambda out: {"loss": self._loss_transform(out)})
        super().attach(engine, *args, **kwargs)


class LearningRateLogger:
    """Write ``optimizer.param_groups[0]["lr"]`` to TensorBoard every ``interval`` iterations."""

    def __init__(self, summary_writer: Any, optimizer: torch.optim.Optimizer, interval: int = 1, tag: str = "lr") -> None:
        self.writer = summary_writer
        self.optimizer = optimizer
        self.interval = max(1, int(interval))
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        self.writer.add_scalar(self.tag, self.optimizer.param_groups[0]["lr"], engine.state.iteration)


def _overlay(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] images and [B, H, W] masks -> [B, 3, H, W] RGB overlays (first image channel)."""
    masks = masks.detach().float().cpu()
    masks = torch.where(masks == 255, torch.zeros_like(masks), masks)  # ignore label shows as background
    return torch.stack(
        [torch.as_tensor(blend_images(img[:1], m[None], alpha=0.5)) for img, m in zip(images.detach().float().cpu(), masks)]
    )


def query_overlays(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``TensorBoardImageHandler.batch_transform``: the query image with its ground truth, and the mask."""
    labels = torch.as_tensor(batch[QUERY_LABELS])
    return _overlay(torch.as_tensor(batch[QUERY_IMAGES]), labels), (labels == 1).float()[:, None]


def prediction_overlay(output: Mapping[str, Any]) -> torch.Tensor:
    """``TensorBoardImageHandler.output_transform``: the query image with the method's prediction."""
    return _overlay(output[CommonKeys.IMAGE], output[CommonKeys.PRED]["logits"].argmax(1))

"""Periodic volumetric validation during training, through the project's few-shot evaluator.

Every ``interval`` iterations the network is evaluated with :func:`fsmis_monai.evaluation.evaluate` on
scans held out of training (by default the query scans of the training fold, which the fold's training
list excludes). The mean Dice of each protocol and class goes to the log, to TensorBoard and to
``engine.state.metrics`` (``val_<protocol>_mean_dice``). Scans are prepared by the run's data contract
(``contract_file``), as the training volumes are. It monitors training only: the saved model is the
last iteration, as in the reference methods, never one selected on these scans
(docs/reference.md#quirk-lslpn-evaluation).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from ignite.engine import Engine, Events
from torch import nn

logger = logging.getLogger(__name__)


class FewShotValidation:
    """Ignite handler running the few-shot evaluator every ``interval`` iterations (0 disables it)."""

    def __init__(
        self,
        network: nn.Module,
        dataset_dir: str | Path,
        interval: int,
        dataset: str = "chaos",
        fold: int = 0,
        family: str = "qnet",
        protocols: str | Sequence[str] = ("ep1",),
        output_dir: Optional[str | Path] = None,
        summary_writer: Any = None,
        device: Any = None,
        contract_file: Optional[str | Path] = None,
        **evaluate_options: Any,
    ) -> None:
        self.network = network
        self.dataset_dir = dataset_dir
        self.interval = int(interval)
        self.dataset = dataset
        self.fold = fold
        self.family = family
        self.protocols = protocols
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.writer = summary_writer
        self.device = device
        self.contract_file = contract_file
        self.options = evaluate_options

    def attach(self, engine: Engine) -> None:
        if self.interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        from fsmis_monai.evaluation import evaluate

        it = engine.state.iteration
        out = None if self.output_dir is None else self.output_dir / f"iteration_{it}"
        options = dict(self.options)
        if self.contract_file is not None:  # the run's contract (written when its volumes were built)
            from fsmis_monai.data.contract import load_contract

            options["contract"] = load_contract(self.contract_file)
        was_training = self.network.training
        try:
            summary = evaluate(self.network, self.dataset_dir, dataset=self.dataset, fold=self.fold,
                               family=self.family, protocols=self.protocols, output_dir=out, device=self.device,
                               progress=False, save_predictions=False, **options)
        finally:
            self.network.train(was_training)
        for protocol, stats in summary["protocols"].items():
            name = f"val_{protocol}_mean_dice"
            engine.state.metrics[name] = stats["mean"]
            logger.info(f"iteration {it}: validation {protocol} mean Dice {stats['mean']:.4f}")
            if self.writer is not None and not math.isnan(stats["mean"]):
                self.writer.add_scalar(f"val/{protocol}/mean_dice", stats["mean"], it)
                for c, cs in stats["classes"].items():
                    if not math.isnan(cs["mean"]):
                        self.writer.add_scalar(f"val/{protocol}/{cs['name']}", cs["mean"], it)

"""Config-driven entry to the evaluator for bundles and the CLI: build the method by registry name, load
its checkpoint safely (``weights_only``), evaluate. Without a checkpoint the untrained network is
evaluated and a warning says so.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from fsmis_monai.evaluation.evaluator import DEFAULT_PROTOCOLS, evaluate
from fsmis_monai.networks.layout import load_weights

logger = logging.getLogger(__name__)

UNTRAINED_WARNING = "no checkpoint given: evaluating the UNTRAINED network (its Dice is a floor, not a result)"


def load_checkpoint(network: nn.Module, ckpt_path: str | Path) -> nn.Module:
    """Load ``ckpt_path`` (a state dict, or a dict wrapping one under model/network/state_dict) strictly."""
    return load_weights(network, ckpt_path)  # layout record checked (fsmis_monai.networks.layout)


def build_model(method: str | nn.Module, ckpt_path: Optional[str | Path] = None,
                method_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """The network: ``method`` is a registry name (``build_method``) or an already built module."""
    if isinstance(method, nn.Module):
        network = method
    else:
        from fsmis_monai.networks.methods import build_method

        network = build_method(str(method), **dict(method_kwargs or {}))
    if ckpt_path:
        load_checkpoint(network, ckpt_path)
    else:
        warnings.warn(UNTRAINED_WARNING, UserWarning, stacklevel=2)
        logger.warning(UNTRAINED_WARNING)
    return network


def run_evaluation(
    dataset_dir: str | Path,
    output_dir: Optional[str | Path] = None,
    method: str | nn.Module = "prototype",
    network: Optional[nn.Module] = None,
    ckpt_path: Optional[str | Path] = None,
    method_kwargs: Optional[Mapping[str, Any]] = None,
    dataset: str = "chaos",
    fold: int | Sequence[int] = 0,
    family: str = "qnet",
    protocols: str | Sequence[str] = DEFAULT_PROTOCOLS,
    device: Optional[str | torch.device] = None,
    sw_batch_size: int = 8,
    seed: Optional[int] = 0,
    **options: Any,
) -> dict:
    """Evaluate from plain keyword settings (the shared bundle keys); returns the summary dict.

    ``network`` (e.g. instantiated by a bundle config) wins over ``method``. ``seed`` makes the weights of
    an untrained network reproducible. Unknown keys are passed to :func:`~fsmis_monai.evaluation.evaluate`.
    """
    if seed is not None:
        torch.manual_seed(int(seed))
    model = build_model(network if network is not None else method, ckpt_path, method_kwargs)
    return evaluate(model, dataset_dir, dataset=dataset, fold=fold, family=family, protocols=protocols,
                    output_dir=output_dir, device=device, sw_batch_size=sw_batch_size, **options)

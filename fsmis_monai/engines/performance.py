"""GPU speed switches a bundle config sets next to MONAI's trainer (measured by ``bench/gpu_check.py``).

- :func:`amp_kwargs`: the ``amp_kwargs`` of MONAI's ``SupervisedTrainer`` (``torch.autocast("cuda", ...)``):
  bfloat16 where the GPU supports it (float32's exponent range, so no loss scaling is needed and no step is
  skipped; MONAI's ``GradScaler`` stays but never finds an overflow), else MONAI's default float16;
- :func:`set_cudnn`: cuDNN's autotuner. ``monai.utils.set_determinism`` (every bundle's ``initialize``)
  sets ``cudnn.deterministic = True`` and ``cudnn.benchmark = False``; call this after it to trade
  run-to-run bit-identity for speed.

``channels_last`` needs no helper: ``network.to(device, memory_format=torch.channels_last)`` in the config
and ``FewShotPrepareBatch(channels_last=True)`` for the query images.
"""

from __future__ import annotations

from typing import Any

import torch


def amp_kwargs(device: str | torch.device | None = None) -> dict[str, Any]:
    """``{"dtype": torch.bfloat16}`` when ``device`` (default: the current CUDA device) is a CUDA device that
    supports bfloat16, else ``{}`` (MONAI's float16 autocast with loss scaling; on CPU the trainer's
    ``torch.autocast("cuda")`` is inactive anyway)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return {"dtype": torch.bfloat16}
    return {}


def set_cudnn(benchmark: bool = False, deterministic: bool | None = None) -> None:
    """Set ``torch.backends.cudnn.benchmark`` (and ``deterministic``: default ``not benchmark``).

    With ``benchmark=True`` cuDNN times its algorithms for each new input shape and keeps the fastest
    (episodes have one shape, so the search runs once); the pick can differ between runs, so two runs are no
    longer bit-identical. A no-op for CPU training.
    """
    torch.backends.cudnn.benchmark = bool(benchmark)
    torch.backends.cudnn.deterministic = (not benchmark) if deterministic is None else bool(deterministic)


def compile_encoder(network: torch.nn.Module, enabled: bool = False, backend: str = "inductor") -> torch.nn.Module:
    """``torch.compile`` the method's encoder in place when ``enabled``; returns ``network``.

    Only the encoder: its input has one fixed shape per bundle ([batch, 3, image_size, image_size]), so it is
    compiled once, while the method heads (prototype counts, masked pooling over episode-dependent masks) would
    recompile or break the graph at every episode. ``nn.Module.compile`` keeps the parameter names, so
    checkpoints of a compiled run load into an uncompiled network and back. The first steps pay the compilation
    (minutes on a CPU, tens of seconds on a GPU); the losses are those of the uncompiled step to float tolerance
    (``tests/engines/test_compile_switch.py``). ``backend``: a ``torch.compile`` backend (``"inductor"``, the
    default, generates kernels; ``"aot_eager"`` only traces, the test's choice on 2 CPU cores).
    """
    if enabled:
        network.encoder.compile(backend=backend, dynamic=False)
    return network

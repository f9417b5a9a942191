"""Reproducible randomness for episodic training, independent of DataLoader workers.

An episode is drawn from a generator keyed by ``(seed, epoch, index)`` (:func:`episode_rng`), so it is
the same whichever worker builds it, however many workers there are and whatever came before (resumed
runs see the same episodes); the episodic datasets reseed their MONAI transforms from it for every item.

For randomness a user pipeline adds on top, :func:`seed_worker` is the DataLoader ``worker_init_fn``:
PyTorch (>= 1.9) already seeds ``random``, NumPy and torch differently in every worker, but MONAI's
random transforms carry their own ``RandomState``, which every forked worker inherits unchanged, so all
workers would draw the same numbers; it reseeds them from the worker's seed (MONAI's ``set_rnd``).
The references seeded only ``random`` and ``torch`` (docs/reference.md#quirk-seeding). For the main process use
``monai.utils.set_determinism(seed)``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["episode_rng", "seed_worker"]


def episode_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of episode ``index`` of ``epoch`` under ``seed`` (a NumPy ``SeedSequence`` of the three)."""
    if index < 0 or epoch < 0:
        raise IndexError(f"episode index and epoch must be >= 0, got index {index}, epoch {epoch}")
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]))


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: give the MONAI random transforms held by the worker's dataset the worker's seed."""
    from monai.data.utils import set_rnd

    info = torch.utils.data.get_worker_info()
    if info is not None:
        set_rnd(info.dataset, seed=info.seed)

"""Reproducible randomness for episodic training, independent of DataLoader workers.

An episode is drawn from a generator keyed by ``(seed, epoch, index)`` (:func:`episode_rng`), so it is
the same whichever worker builds it, however many workers there are and whatever came before (resumed
runs see the same episodes). :func:`seed_worker` additionally seeds Python's ``random`` and NumPy's global
state in every worker from torch's per-worker seed (PyTorch's recommended recipe), for any randomness a
user pipeline adds on top (the references seeded only ``random`` and ``torch``, methods.md 8.22). For the
main process use ``monai.utils.set_determinism(seed)``.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["episode_rng", "seed_worker"]


def episode_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of episode ``index`` of ``epoch`` under ``seed`` (a NumPy ``SeedSequence`` of the three)."""
    if index < 0 or epoch < 0:
        raise IndexError(f"episode index and epoch must be >= 0, got index {index}, epoch {epoch}")
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]))


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random`` and NumPy from the worker's torch seed (set by the DataLoader)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)

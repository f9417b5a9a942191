"""Reproducible randomness for episodic training, independent of DataLoader workers.

An episode is drawn from a generator keyed by ``(seed, epoch, index)`` (:func:`episode_rng`), so it is
the same whichever worker builds it, however many workers there are and whatever came before (resumed
runs see the same episodes); the episodic datasets reseed their MONAI transforms from it for every item.

For randomness a user pipeline adds on top, :func:`seed_worker` is the DataLoader ``worker_init_fn``:
PyTorch (>= 1.9) already seeds ``random``, NumPy and torch differently in every worker, but MONAI's
random transforms carry their own ``RandomState``, which every forked worker inherits unchanged, so all
workers would draw the same numbers; it reseeds them from the worker's seed. It is MONAI's own
``monai.data.utils.worker_init_fn`` under the name the bundle configs use; ``monai.data.DataLoader``
installs it by itself, a plain ``torch.utils.data.DataLoader`` needs it passed.
The references seeded only ``random`` and ``torch`` (docs/reference.md#quirk-seeding). For the main process use
``monai.utils.set_determinism(seed)``.
"""

from __future__ import annotations

import numpy as np
from monai.data.utils import worker_init_fn as seed_worker

__all__ = ["episode_rng", "seed_worker"]


def episode_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of episode ``index`` of ``epoch`` under ``seed`` (a NumPy ``SeedSequence`` of the three)."""
    if index < 0 or epoch < 0:
        raise IndexError(f"episode index and epoch must be >= 0, got index {index}, epoch {epoch}")
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]))

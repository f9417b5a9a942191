"""Resuming a stopped training run where it stopped: same weights, optimiser, LR schedule *and* episodes.

MONAI's :class:`~monai.handlers.CheckpointSaver`/:class:`~monai.handlers.CheckpointLoader` restore the
network, optimiser, scheduler and the trainer's iteration. Ignite then continues counting iterations but
restarts the data loader at the start of the epoch, which would replay the first episodes. Episode ``i``
of an episode dataset is a fixed function of ``(seed, i)``, so :class:`EpisodeSampler` starts the loader at
the restored iteration instead (:class:`ResumeEpisodes` sets the offset when the epoch starts, after the
checkpoint has been loaded).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from ignite.engine import Engine, Events
from torch.utils.data import DistributedSampler

_CKPT = re.compile(r"^checkpoint_(?:final_)?iteration=(\d+)\.pt$")


class EpisodeSampler(DistributedSampler):
    """Episodes in order (no shuffling: each index already is a random episode), split across ranks, with a
    resumable start offset.

    Single process: ``EpisodeSampler(dataset)``; ``torchrun``: ``EpisodeSampler(dataset, num_replicas=world,
    rank=rank)`` gives rank ``r`` the episodes ``r, r + world, ...`` (distinct episodes per rank).
    ``__len__`` stays the full per-rank count so the trainer's epoch length does not change on resume.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])


class ResumeEpisodes:
    """Handler: at each epoch start, skip the episodes the restored iteration count has already consumed."""

    def __init__(self, sampler: EpisodeSampler, batch_size: int = 1) -> None:
        self.sampler = sampler
        self.batch_size = int(batch_size)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch_length = engine.state.epoch_length or 0
        done = engine.state.iteration % epoch_length if epoch_length else 0
        self.sampler.start = done * self.batch_size


def checkpoint_iteration(path: str | Path) -> int | None:
    """Iteration of a ``checkpoint_[final_]iteration=N.pt`` file written by ``CheckpointSaver``."""
    m = _CKPT.match(Path(path).name)
    return int(m.group(1)) if m else None


def latest_checkpoint(ckpt_dir: str | Path) -> str | None:
    """The checkpoint with the highest iteration in ``ckpt_dir`` (``None`` when there is none: fresh run)."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = [(checkpoint_iteration(p), p) for p in folder.iterdir()]
    found = [(i, p) for i, p in found if i is not None]
    return str(max(found)[1]) if found else None

"""Resuming a stopped training run where it stopped: same weights, optimiser, LR schedule *and* episodes.

MONAI's :class:`~monai.handlers.CheckpointSaver`/:class:`~monai.handlers.CheckpointLoader` restore the
network, optimiser, scheduler and the trainer's iteration. Ignite then continues counting iterations but
restarts the data loader at the start of the epoch, which would replay the first episodes. Episode ``i``
of an episode dataset is a fixed function of ``(seed, epoch, i)`` (:mod:`fsmis_monai.data.episodes`), so
:class:`ResumableEpisodeSampler` skips the episodes already consumed instead (:class:`ResumeEpisodes`
sets the offset when the run starts, after the checkpoint has been loaded).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Sized

from ignite.engine import Engine, Events
from torch.utils.data import DistributedSampler

_CKPT = re.compile(r"^checkpoint_(?:final_)?iteration=(\d+)\.pt$")


class ResumableEpisodeSampler(DistributedSampler):
    """Episodes in index order, split across ranks, able to start part-way through an epoch.

    No shuffling: each index already is a random episode. Rank ``r`` of ``num_replicas`` gets the episodes
    ``r, r + num_replicas, ...`` (distinct episodes per rank; single process: the defaults 1 and 0).
    ``skip`` indices are dropped from the next iterator only. ``__len__`` stays the full per-rank count so
    the trainer's epoch length does not change on resume.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)  # type: ignore[arg-type]
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.skip :]
        self.skip = 0
        return iter(indices)


class ResumeEpisodes:
    """Handler keeping the episode sequence aligned with the trainer's iteration count.

    At the first ``EPOCH_STARTED`` of a run (after ``CheckpointLoader`` restored the iteration on
    ``STARTED``, before ignite creates the first data iterator) the sampler skips the episodes already
    consumed in the current epoch. Datasets with ``set_epoch`` (:mod:`fsmis_monai.data.episodes`) are told
    the epoch at every ``EPOCH_STARTED``; bundles train one long epoch, so DataLoader workers never hold a
    stale epoch.
    """

    def __init__(self, sampler: ResumableEpisodeSampler, batch_size: int = 1) -> None:
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self._first = True

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._arm)
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def _arm(self, engine: Engine) -> None:
        self._first = True

    def __call__(self, engine: Engine) -> None:
        dataset = getattr(self.sampler, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(engine.state.epoch - 1)
        if self._first:
            self._first = False
            epoch_length = engine.state.epoch_length or len(self.sampler)
            self.sampler.skip = (engine.state.iteration % epoch_length) * self.batch_size


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

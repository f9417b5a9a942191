"""Resuming a stopped training run where it stopped: same weights, optimiser, LR schedule *and* episodes.

MONAI's :class:`~monai.handlers.CheckpointSaver`/:class:`~monai.handlers.CheckpointLoader` restore the
network, optimiser, scheduler and the trainer's iteration. Ignite then continues counting iterations but
restarts the data loader at the start of the epoch, which would replay the first episodes. Episode ``i``
of an episode dataset is a fixed function of ``(seed, epoch, i)`` (:mod:`fsmis_monai.data.episodes`), so
:class:`ResumableEpisodeSampler` skips the episodes already consumed instead (:class:`ResumeEpisodes`
sets the offset when the run starts, after the checkpoint has been loaded).

:class:`ContinueRun` loads the checkpoint into a run configured for *at least* as many iterations: the
length of the run, the LR schedule and the episodes are the current configuration's, the checkpoint gives
the position (iteration, weights, optimiser state). A run stopped at iteration ``k`` and continued to ``N``
iterations is the uninterrupted ``N``-iteration run whenever the schedule up to ``k`` is the same in both.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Sized

from ignite.engine import Engine, Events
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.utils.data import DistributedSampler

from fsmis_monai.io import FsmisInputError

logger = logging.getLogger(__name__)

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


def iterations_asked(engine: Engine) -> int | None:
    """Iterations the run is configured for: ``max_iters``, else ``epoch_length x max_epochs`` (bundles:
    ``max_iterations``, one epoch of ``max_iterations`` episode batches); ``None`` when unknown."""
    state = engine.state
    if getattr(state, "max_iters", None) is not None:  # ignite >= 0.5
        return int(state.max_iters)
    if state.epoch_length and state.max_epochs:
        return int(state.epoch_length) * int(state.max_epochs)
    return None


def schedulers_of(objects: Sequence[Any]) -> list[LRScheduler]:
    """The LR schedulers among checkpointed ``objects`` that a replay can position (``ReduceLROnPlateau``
    depends on metrics, not on the step count: it keeps its checkpointed state)."""
    return [o for o in objects if isinstance(o, LRScheduler) and not isinstance(o, ReduceLROnPlateau)]


def replay_schedule(scheduler: LRScheduler, fresh: dict, fresh_groups: list[dict], steps: int) -> None:
    """Put ``scheduler`` and its optimiser's LR where the *configured* schedule is after ``steps`` steps.

    Loading a checkpoint restores the schedule it was saved with (``MultiStepLR.load_state_dict`` even
    replaces the milestones), so a run continued to a larger count would keep the old count's milestones.
    ``fresh``/``fresh_groups`` are the scheduler's state and the optimiser's ``lr``/``initial_lr`` before
    loading; stepping the configured schedule ``steps`` times gives the LR of an uninterrupted run, with
    the same floating-point operations. Hand-written: PyTorch has no "seek" for a scheduler (the closed
    forms exist for a few schedulers only).
    """
    scheduler.load_state_dict(copy.deepcopy(fresh))
    for group, values in zip(scheduler.optimizer.param_groups, fresh_groups):
        group.update(values)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()


class ContinueRun:
    """Resume from ``path`` into a run of the same or a larger iteration count (``STARTED`` handler).

    - fewer iterations asked than the checkpoint has trained: :class:`~fsmis_monai.io.FsmisInputError`
      when attached, naming the checkpoint (nothing is trained or written);
    - the run's length stays the configured one: ignite's ``load_state_dict`` restores the checkpoint's
      ``epoch_length`` (the old ``max_iterations``), which would end the run at the old count;
    - LR schedulers follow the configured schedule (:func:`replay_schedule`): the LR at the resume
      iteration is the configured schedule's LR there, milestones below it count as passed;
    - episodes continue from the checkpoint's iteration (:class:`ResumeEpisodes`, whose offset uses the
      configured epoch length set here).

    Args:
        path: the checkpoint (``checkpoint_[final_]iteration=N.pt``).
        load: called with the engine to load ``path`` (MONAI's ``CheckpointLoader``).
        schedulers: LR schedulers restored by ``load`` (:func:`schedulers_of`).
    """

    def __init__(
        self, path: str | Path, load: Callable[[Engine], None], schedulers: Sequence[LRScheduler] = ()
    ) -> None:
        self.path = str(path)
        self.load = load
        self.schedulers = list(schedulers)

    def attach(self, engine: Engine) -> None:
        self._check(engine, checkpoint_iteration(self.path))
        engine.add_event_handler(Events.STARTED, self)

    def _check(self, engine: Engine, done: int | None) -> None:
        asked = iterations_asked(engine)
        if asked is not None and done is not None and done > asked:
            raise FsmisInputError(
                f"{self.path}: that run already trained {done} iterations, more than the {asked} asked for "
                f"(max_iterations); ask for at least {done} to continue it, or train from scratch in another "
                "output_dir (or resume=false)")

    def __call__(self, engine: Engine) -> None:
        state = engine.state
        length, max_epochs, max_iters = state.epoch_length, state.max_epochs, getattr(state, "max_iters", None)
        fresh = [(s, copy.deepcopy(s.state_dict()), [{k: g[k] for k in ("lr", "initial_lr") if k in g}
                                                     for g in s.optimizer.param_groups]) for s in self.schedulers]
        self.load(engine)
        self._check(engine, state.iteration)
        state.max_epochs, state.max_iters = max_epochs, max_iters
        if length:
            state.epoch_length = length
            state.epoch = state.iteration // length
        for scheduler, sched_state, groups in fresh:
            replay_schedule(scheduler, sched_state, groups, steps=scheduler.last_epoch)
        asked = iterations_asked(engine)
        if asked is not None and state.iteration >= asked:
            logger.warning(f"{self.path}: that run already trained the {asked} iterations asked for; nothing to "
                           "train. Ask for more (max_iterations) to continue it, or use another output_dir "
                           "(or resume=false) to train from scratch.")
        else:
            logger.info(f"continuing from iteration {state.iteration} of {asked}")

"""Resumable training checkpoints for a bundle's handler list.

Checkpoint savers and MONAI's ``CheckpointLoader`` need the trainer in their dict to restore its iteration,
but a bundle config cannot reference the trainer from inside the trainer's own handler list (a circular
reference). :class:`TrainingCheckpoints` receives the trainer when it is attached and builds the handlers
then: resume from the newest ``checkpoint_iteration=N.pt`` of ``ckpt_dir`` (``map_location`` so GPU
checkpoints load on CPU) into a run of the same or a larger iteration count
(:class:`~fsmis_monai.engines.resume.ContinueRun`), save atomically every ``save_interval`` iterations
(:func:`atomic_checkpoint`; ignite saves on rank 0 only), and when the run has trained all its iterations
write the bare network weights to ``final_path`` (the bundle's ``models/model.pt``), preceded by the run's
data contract (``ckpt_dir/data_contract.json``, written by ``training_volumes(contract_file=...)`` when the
run is built) copied beside it, so ``models/`` never pairs new weights with another run's contract.
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader
from torch import nn

from fsmis_monai.engines.resume import ContinueRun, iterations_asked, latest_checkpoint, schedulers_of
from fsmis_monai.io import FsmisInputError, torch_save

logger = logging.getLogger(__name__)


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside ``DataParallel``/``DistributedDataParallel`` wrappers."""
    return network.module if hasattr(network, "module") and isinstance(network.module, nn.Module) else network


def _iteration(engine: Engine) -> int:
    return engine.state.iteration


def atomic_checkpoint(ckpt_dir: str | Path, objects: Mapping[str, Any], score_name: str,
                      n_saved: Optional[int]) -> Checkpoint:
    """An ignite ``Checkpoint`` of ``objects`` at the trainer's iteration, as ``checkpoint_<score_name>=N.pt``.

    The names are those of MONAI's ``CheckpointSaver`` (``score_name`` ``"iteration"`` or
    ``"final_iteration"``), which :func:`~fsmis_monai.engines.resume.latest_checkpoint` reads back. Built
    here rather than through ``CheckpointSaver`` because MONAI (1.4-1.6) gives its ``DiskSaver``
    ``atomic=False``: a run killed mid-save would leave a truncated checkpoint that the next resume picks.
    ``DiskSaver(atomic=True)`` writes a temporary file renamed into place; the temporary (``tmp*``) never
    matches the checkpoint name pattern, so an orphan left by a kill is ignored by resume. Only rank 0 saves.
    """
    saver = DiskSaver(str(ckpt_dir), atomic=True, create_dir=True, require_empty=False)
    return Checkpoint(dict(objects), saver, score_function=_iteration, score_name=score_name, n_saved=n_saved)


def adopt_earlier(checkpoint: Checkpoint, ckpt_dir: str | Path, score_name: str) -> list[str]:
    """Count the ``checkpoint_<score_name>=N.pt`` files already in ``ckpt_dir`` toward ``checkpoint``'s ``n_saved``.

    ignite's ``Checkpoint`` keeps ``n_saved`` among the files it wrote itself: a resumed run would keep every
    file of the runs before it. Loading their ``(iteration, file name)`` pairs as its state (ignite's own
    ``load_state_dict``) makes it delete the oldest of them as it saves newer ones. Only for a resumed run,
    whose new iterations are all later than the files found. Returns the file names adopted, oldest first.
    """
    pattern = re.compile(rf"checkpoint_{re.escape(score_name)}=(\d+)\.pt")
    found = sorted((int(m.group(1)), p.name) for p in Path(ckpt_dir).iterdir() if (m := pattern.fullmatch(p.name)))
    checkpoint.load_state_dict({"_saved": found})
    return [name for _, name in found]


class TrainingCheckpoints:
    """Resume + periodic save + final model export, attached as one handler.

    Args:
        ckpt_dir: folder of the full checkpoints (network, optimiser, scheduler, trainer state).
        objects: what to save/restore besides the trainer, e.g. ``{"network": ..., "optimizer": ...,
            "lr_scheduler": ...}``.
        save_interval: iterations between checkpoints (0: only the final one).
        n_saved: how many periodic checkpoints to keep (None: all), counting those of the runs a resume continues
            (the final checkpoint: the newest only).
        resume: start from the newest checkpoint in ``ckpt_dir`` when there is one.
        map_location: passed to ``CheckpointLoader``.
        final_path: where the trained network's state dict goes when the run has trained all its iterations
            (None: nowhere); a run stopped early (``terminate()``, an error, a kill) does not write it. The
            data contract of ``ckpt_dir`` (``data_contract.json``), when there is one, is written atomically
            beside it just before.
        network_key: the entry of ``objects`` written to ``final_path``.
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        objects: Mapping[str, Any],
        save_interval: int = 1000,
        n_saved: Optional[int] = 2,
        resume: bool = True,
        map_location: Any = "cpu",
        final_path: Optional[str | Path] = None,
        network_key: str = "network",
    ) -> None:
        if "trainer" in objects:
            raise ValueError("objects must not hold 'trainer': the trainer is added when the handler is attached")
        self.ckpt_dir = Path(ckpt_dir)
        self.objects = dict(objects)
        self.save_interval = int(save_interval)
        self.n_saved = n_saved
        self.resume = resume
        self.map_location = map_location
        self.final_path = final_path
        self.network_key = network_key
        self.resumed_from: Optional[str] = None

    def attach(self, engine: Engine) -> None:
        state = {**self.objects, "trainer": engine}
        if self.resume:
            self.resumed_from = latest_checkpoint(self.ckpt_dir)
            if self.resumed_from is not None:
                if not zipfile.is_zipfile(self.resumed_from):  # PyTorch's own message would not name the file
                    raise FsmisInputError(f"{self.resumed_from}: damaged checkpoint (not a complete torch.save "
                                          "file); delete it to resume from the previous one")
                logger.info(f"resuming from {self.resumed_from}")
                loader = CheckpointLoader(self.resumed_from, state, map_location=self.map_location)
                ContinueRun(self.resumed_from, loader, schedulers_of(self.objects.values())).attach(engine)
        # The final checkpoint is written when the run completes or fails (as MONAI's CheckpointSaver does with
        # save_final=True). Registering the periodic save now would put it ahead of the handlers listed after
        # this one (the LR scheduler's step among them): a checkpoint of iteration N would hold the schedule of
        # N - 1, and a resume would apply every later milestone one iteration late. It is registered when the
        # run starts instead, after every handler of the trainer's config.
        self._final = atomic_checkpoint(self.ckpt_dir, state, "final_iteration", n_saved=1)
        if self.resumed_from is not None:
            adopt_earlier(self._final, self.ckpt_dir, "final_iteration")
        engine.add_event_handler(Events.COMPLETED, self._save_final)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._save_final_and_raise)
        if self.save_interval > 0:
            interval = atomic_checkpoint(self.ckpt_dir, state, "iteration", n_saved=self.n_saved)
            if self.resumed_from is not None:
                adopt_earlier(interval, self.ckpt_dir, "iteration")
            engine.add_event_handler(Events.STARTED, self._save_periodically, interval)
        if self.final_path is not None:
            engine.add_event_handler(Events.COMPLETED, self._export)

    def _save_final(self, engine: Engine) -> None:
        self._final(engine)
        logger.info(f"saved final checkpoint: {self._final.last_checkpoint}")

    def _save_final_and_raise(self, engine: Engine, error: BaseException) -> None:
        self._final(engine)
        logger.info(f"exception raised, saved the last checkpoint: {self._final.last_checkpoint}")
        raise error

    def _save_periodically(self, engine: Engine, interval: Checkpoint) -> None:
        if not engine.has_event_handler(interval):
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), interval)

    def _export(self, engine: Engine) -> None:
        import ignite.distributed as idist

        asked = iterations_asked(engine)
        if asked is not None and engine.state.iteration < asked:  # terminate() also fires COMPLETED
            logger.warning(f"training stopped at iteration {engine.state.iteration} of {asked}: {self.final_path} "
                           f"not written; run again to continue from the checkpoints in {self.ckpt_dir}")
            return
        if idist.get_rank() == 0:
            from fsmis_monai.data.contract import CONTRACT_FILE, load_contract, save_contract

            if (self.ckpt_dir / CONTRACT_FILE).is_file():  # the run's contract goes with its weights
                save_contract(load_contract(self.ckpt_dir / CONTRACT_FILE), self.final_path)
            network = unwrap(self.objects[self.network_key])
            torch_save(network.state_dict(), self.final_path)
            logger.info(f"trained network written to {self.final_path}")

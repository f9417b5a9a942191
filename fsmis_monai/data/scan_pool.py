"""Map one job per scan over a process pool; a scan that fails is reported, the others still finish.

Shared by the folder runners (:func:`fsmis_monai.preprocess.run_preprocessing`,
:func:`fsmis_monai.data.pseudolabel_folder.run_pseudolabel_folder`). Written here because neither
``concurrent.futures`` nor MONAI's ``ThreadDataLoader`` turn a job's exception into a per-item failure
that names its file while the other items go on (``Executor.map`` stops at the first error).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar

from fsmis_monai.io import FsmisInputError, input_error_in

__all__ = ["ScanOutcome", "failure_message", "map_scans"]

J = TypeVar("J")


@dataclass
class ScanOutcome(Generic[J]):
    """The result of one job: ``value`` when it succeeded, else ``error`` (``"<file>: <problem>"``)."""

    job: J
    value: Any = None
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def failure_message(error: BaseException, source: str) -> str:
    """``error`` as one line naming ``source`` (the file the job read) unless the message already names a file.

    MONAI's ``Compose`` wraps errors in ``RuntimeError``: the project's :class:`FsmisInputError` behind it
    (which names its file) is reported instead.
    """
    found = input_error_in(error)
    if found is not None:
        return str(found)
    if source and source in str(error):
        return str(error)
    return f"{source}: {type(error).__name__}: {error}"


def _run(fn: Callable[[J], Any], source: str, job: J) -> ScanOutcome[J]:
    start = time.perf_counter()
    try:
        value, error = fn(job), None
    except Exception as e:  # one bad scan must not stop the folder
        value, error = None, failure_message(e, source)
    return ScanOutcome(job, value, error, round(time.perf_counter() - start, 3))


def map_scans(
    fn: Callable[[J], Any],
    jobs: Sequence[J],
    *,
    source: Callable[[J], str],
    workers: int = 1,
    desc: str = "",
    progress: bool = True,
    initializer: Optional[Callable[[], None]] = None,
) -> list[ScanOutcome[J]]:
    """Run ``fn(job)`` for every job and return the outcomes in the order of ``jobs``.

    ``workers > 1`` runs jobs in a process pool (forked where the platform allows, so workers do not
    re-import torch/MONAI; ``initializer`` runs once per worker); ``fn`` and the jobs must then be
    picklable (module-level functions or ``functools.partial`` of them). ``source(job)`` (called in this
    process) names the file a failure is reported against. Each failure is also written above the progress bar as it happens.

    Raises:
        FsmisInputError: ``workers < 1``.
    """
    from tqdm.auto import tqdm

    if workers < 1:
        raise FsmisInputError(f"--workers must be >= 1, got {workers}")
    bar = tqdm(total=len(jobs), desc=desc, unit="scan", disable=not progress)
    outcomes: dict[int, ScanOutcome[J]] = {}

    def record(i: int, outcome: ScanOutcome[J]) -> None:
        outcomes[i] = outcome
        if not outcome.ok:
            bar.write(f"FAILED {outcome.error}")
        bar.update(1)

    if workers == 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            record(i, _run(fn, str(source(job)), job))
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context(method),
                                 initializer=initializer) as pool:
            futures = {pool.submit(_run, fn, str(source(job)), job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                record(futures[future], future.result())
    bar.close()
    return [outcomes[i] for i in range(len(jobs))]

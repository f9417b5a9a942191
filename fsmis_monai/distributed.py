"""Work that one process of a ``torch.distributed`` group (``torchrun``) does for all: :func:`on_rank_zero`.

Written here because neither ignite's ``idist`` nor MONAI has a call that runs a task on one rank and hands
every rank its result *or its error*: a plain barrier would leave the other ranks waiting for a rank 0 that
failed. Kept free of heavy imports so a group of processes starts quickly.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

from fsmis_monai.io import FsmisInputError

__all__ = ["on_rank_zero"]

T = TypeVar("T")


def on_rank_zero(task: Callable[[], T]) -> T:
    """``task()`` run by rank 0 of the ``torch.distributed`` group while the other ranks wait (a broadcast from
    rank 0, which is also the barrier); every rank returns rank 0's result or raises its error (an input error
    as the same :class:`FsmisInputError`, anything else as ``RuntimeError`` naming it). Without a process
    group of more than one rank, ``task()`` is simply run.

    Raises:
        FsmisInputError: ``task`` raised one on rank 0.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return task()
    outcome: list = [None]
    error: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", task())]
        except Exception as e:  # shared with the waiting ranks, then re-raised here
            error = e
            outcome = [("input" if isinstance(e, FsmisInputError) else "bug", f"{type(e).__name__}: {e}", str(e))]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    status, *detail = outcome[0]
    if status == "ok":
        return detail[0]
    if status == "input":
        raise FsmisInputError(detail[1])
    raise RuntimeError(f"rank 0 failed: {detail[0]}")

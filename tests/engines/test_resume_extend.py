"""Continuing a training run to a larger ``max_iterations`` (ADNet bundle, small encoder, real CHAOS windows).

A run of 6 iterations (checkpoint every 2, LR halved every 2 iterations) is stopped after iteration 4, or
finishes; rerun with ``max_iterations=8`` it continues from its last checkpoint to 8 and ends with the
weights, per-iteration losses and learning rates of an uninterrupted 8-iteration run. A smaller count than
already trained is refused naming the checkpoint; ``model.pt`` is written only by a run that trained all
its iterations.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from fsmis_monai.io import FsmisInputError, torch_load

from _training_run import REPO, prepare_run_data, train_overrides

LR, GAMMA, STEP = 1e-3, 0.5, 2  # MultiStepLR milestones: range(STEP, max_iterations, STEP)


@pytest.fixture(scope="module")
def data(chaos_dir, tmp_path_factory):
    return prepare_run_data(chaos_dir, tmp_path_factory.mktemp("resume_extend"))


def _train(root: Path, out: Path, max_iterations: int, stop_after: int | None = None) -> dict:
    """One ADNet bundle training run in this process; the iteration it started at and, per iteration, the loss
    and the learning rate the optimiser used."""
    configs = REPO / "bundles" / "adnet" / "configs"
    overrides = train_overrides(root / "data", root / "supervoxels", out, max_iterations=max_iterations,
                                learning_rate=LR, lr_gamma=GAMMA, lr_step=STEP)
    wf = ConfigWorkflow(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
                        workflow_type="train", bundle_root=str(configs.parent), **overrides)
    wf.initialize()
    trainer, run = wf.trainer, {"lr": {}, "loss": {}}
    trainer.add_event_handler(Events.STARTED, lambda e: run.setdefault("started", e.state.iteration))
    trainer.add_event_handler(Events.ITERATION_STARTED,
                              lambda e: run["lr"].__setitem__(e.state.iteration, e.optimizer.param_groups[0]["lr"]))
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: run["loss"].__setitem__(e.state.iteration, e.state.output["loss"].item()))
    if stop_after:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop_after), lambda e: e.terminate())
    wf.run()
    wf.finalize()
    run["ended"] = trainer.state.iteration
    return run


def _same_weights(a: Path, b: Path) -> bool:
    x, y = torch_load(a), torch_load(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def runs(data):
    torch.set_num_threads(1)
    full = _train(data, data / "full", 8)
    stopped = _train(data, data / "stopped", 6, stop_after=4)
    stopped_model_written = (data / "stopped" / "model.pt").exists()
    stopped_more = _train(data, data / "stopped", 8)
    stopped_kept = _checkpoints(data / "stopped")
    finished = _train(data, data / "finished", 6)
    finished_model = torch_load(data / "finished" / "model.pt")
    finished_more = _train(data, data / "finished", 8)
    return dict(full=full, stopped=stopped, stopped_model_written=stopped_model_written, stopped_more=stopped_more,
                finished=finished, finished_model=finished_model, finished_more=finished_more,
                kept={"stopped": stopped_kept, "finished": _checkpoints(data / "finished")})


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("checkpoint_*.pt"))


def test_uninterrupted_schedule_is_the_configured_one(runs):
    """Independent of the code under test: LR at iteration k = LR x GAMMA^(milestones in range(2, 8, 2) <= k-1)."""
    expected = {k: LR * GAMMA ** sum(1 for m in range(STEP, 8, STEP) if m <= k - 1) for k in range(1, 9)}
    assert runs["full"]["started"] == 0 and runs["full"]["ended"] == 8
    assert runs["full"]["lr"] == pytest.approx(expected, rel=1e-12)


def test_a_stopped_run_continues_to_the_larger_count(data, runs):
    """6 iterations stopped after 4, rerun with 8: iterations 5..8 with the losses, LRs and final weights of
    the uninterrupted 8-iteration run; the stopped run wrote no model.pt."""
    stopped, more, full = runs["stopped"], runs["stopped_more"], runs["full"]
    assert stopped["ended"] == 4 and not runs["stopped_model_written"]
    assert more["started"] == 4 and sorted(more["loss"]) == [5, 6, 7, 8]
    for run in (stopped, more):
        for it in run["loss"]:
            assert run["loss"][it] == full["loss"][it] and run["lr"][it] == full["lr"][it], it
    assert _same_weights(data / "full" / "model.pt", data / "stopped" / "model.pt")


def test_a_finished_run_continues_to_the_larger_count(data, runs):
    """A finished 6-iteration run (milestones 2, 4) rerun with 8 (milestones 2, 4, 6): the LR of iterations 7
    and 8 has the decay at 6 that the 6-iteration schedule never reached, as in the uninterrupted run."""
    finished, more, full = runs["finished"], runs["finished_more"], runs["full"]
    assert finished["ended"] == 6 and more["started"] == 6 and sorted(more["loss"]) == [7, 8]
    assert more["lr"][7] == full["lr"][7] == pytest.approx(LR * GAMMA**3)
    for it in more["loss"]:
        assert more["loss"][it] == full["loss"][it], it
    assert not all(torch.equal(runs["finished_model"][k], v)
                   for k, v in torch_load(data / "full" / "model.pt").items())  # 6 iterations != 8
    assert _same_weights(data / "full" / "model.pt", data / "finished" / "model.pt")


@pytest.mark.parametrize("run", ["stopped", "finished"])
def test_n_saved_counts_the_checkpoints_of_earlier_runs(runs, run):
    """train.json keeps n_saved=2 periodic checkpoints (every 2 iterations here) and the newest final one; a run
    continued to 8 iterations keeps those of iterations 6 and 8, not also those the first run left (2, 4)."""
    assert runs["kept"][run] == ["checkpoint_final_iteration=8.pt", "checkpoint_iteration=6.pt",
                                 "checkpoint_iteration=8.pt"]


def test_same_count_trains_nothing_and_smaller_count_is_refused(data, runs):
    """Rerun at the trained count: nothing trained, same model.pt. A smaller count: one-line error naming
    the newest checkpoint, before anything is trained or written."""
    out = data / "finished"
    again = _train(data, out, 8)
    assert again["started"] == 8 and again["ended"] == 8 and again["loss"] == {}
    assert _same_weights(data / "full" / "model.pt", out / "model.pt")

    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(Exception) as err:
        _train(data, out, 6)
    cause = err.value
    while not isinstance(cause, FsmisInputError) and cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, FsmisInputError), err.value
    message = str(cause)
    assert "\n" not in message and "iteration=8.pt" in message and str(out / "checkpoints") in message
    assert "trained 8 iterations, more than the 6 asked for" in message
    # nothing new written (TensorBoard's event file is opened when the config is parsed: left out)
    after = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "tfevents" not in p.name}
    assert after == {k: v for k, v in before.items() if "tfevents" not in k}

"""Faults: a training run SIGKILLed (between checkpoints and half-way through writing one) resumes and ends
with the weights and losses of an uninterrupted run; checkpoints are written atomically; every writer in
the package goes through ``fsmis_monai.io``."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fsmis_monai.io import FsmisInputError, torch_load

from _training_run import REPO, prepare_run_data, TRAIN_SCRIPT, train_overrides


@pytest.fixture(scope="module")
def tiny_run_data(chaos_dir, tmp_path_factory):
    return prepare_run_data(chaos_dir, tmp_path_factory.mktemp("hardening_train"))


def _train(root: Path, out: Path, **cfg) -> tuple[int, list[str]]:
    """Run the training script in a fresh interpreter; returns (exit code, stdout lines)."""
    script = root / "train_script.py"
    script.write_text(TRAIN_SCRIPT)
    arg = json.dumps({"repo": str(REPO), "overrides": train_overrides(root / "data", root / "supervoxels", out), **cfg})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), arg], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    return proc.returncode, proc.stdout.splitlines()


def _losses(lines: list[str]) -> dict[int, str]:
    return {int(l.split()[1]): l.split()[2] for l in lines if l.startswith("loss ")}


def _started(lines: list[str]) -> int:
    return next(int(l.split()[1]) for l in lines if l.startswith("started_at "))


def _checkpoints(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith("checkpoint")}


@pytest.mark.slow
def test_sigkill_mid_run_and_mid_save_resume_to_the_uninterrupted_weights(tiny_run_data):
    """6 iterations, a checkpoint every 2. Killed run: SIGKILL half-way through writing the iteration-4
    checkpoint (resume must fall back to iteration 2), then SIGKILL right after iteration 5 (resume from 4)."""
    root = tiny_run_data
    code, full = _train(root, root / "full")
    assert code == 0 and "finished" in full and _started(full) == 0

    part = root / "part"
    code, first = _train(root, part, kill_in_save=4)
    assert code == -signal.SIGKILL and "finished" not in first
    # killed inside iteration 4's checkpoint save, which runs after the iteration's other handlers (its loss log)
    assert sorted(_losses(first)) == [1, 2, 3, 4]
    # the half-written iteration-4 checkpoint never took the checkpoint's name; iteration 2's is intact
    assert _checkpoints(part / "checkpoints") == {"checkpoint_iteration=2.pt"}
    assert set(torch_load(part / "checkpoints" / "checkpoint_iteration=2.pt")) >= {"network", "optimizer", "trainer"}

    code, second = _train(root, part, kill_after=5)
    assert code == -signal.SIGKILL and _started(second) == 2 and sorted(_losses(second)) == [3, 4, 5]
    assert "checkpoint_iteration=4.pt" in _checkpoints(part / "checkpoints")
    assert not (part / "model.pt").exists()

    code, third = _train(root, part)
    assert code == 0 and _started(third) == 4 and sorted(_losses(third)) == [5, 6]

    # bit-identical losses for every iteration, whichever process computed it, and identical final weights
    reference = _losses(full)
    for lines in (first, second, third):
        for it, loss in _losses(lines).items():
            assert loss == reference[it], (it, loss, reference[it])
    a, b = torch_load(root / "full" / "model.pt"), torch_load(part / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_saver_is_atomic(tmp_path, monkeypatch):
    """MONAI's CheckpointSaver writes in place (atomic=False); TrainingCheckpoints switches ignite's atomic
    save on, so a save that dies half-way leaves the previous checkpoint and no file under the new name."""
    from ignite.engine import Engine, Events

    from fsmis_monai.engines import TrainingCheckpoints

    net = torch.nn.Linear(3, 2)
    engine = Engine(lambda e, b: net.weight.data.add_(1.0))
    after_first = []
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: after_first.append(net.weight.data.clone()))
    TrainingCheckpoints(tmp_path, {"network": net}, save_interval=1, n_saved=None, resume=False).attach(engine)
    real_save = torch.save

    def dies_on_second(obj, f, *a, **k):
        if engine.state.iteration == 2:
            f.write(b"partial")
            raise KeyboardInterrupt("killed mid-write")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        engine.run([0, 1, 2], max_epochs=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint_iteration=1.pt"], names  # no truncated iteration-2 file, no leftover temp
    saved = torch_load(tmp_path / "checkpoint_iteration=1.pt")
    assert torch.equal(saved["network"]["weight"], after_first[0])  # the state after iteration 1


def test_damaged_newest_checkpoint_is_named_on_resume(tmp_path):
    """A truncated newest checkpoint (e.g. left by a version without atomic saves): resume stops with an
    error naming it instead of PyTorch's anonymous zip error; once it is deleted, the previous one is used."""
    from ignite.engine import Engine

    from fsmis_monai.engines import TrainingCheckpoints

    net = torch.nn.Linear(3, 2)
    torch.save({"network": net.state_dict()}, tmp_path / "checkpoint_iteration=2.pt")
    data = (tmp_path / "checkpoint_iteration=2.pt").read_bytes()
    (tmp_path / "checkpoint_iteration=4.pt").write_bytes(data[: len(data) // 2])
    handler = TrainingCheckpoints(tmp_path, {"network": net}, save_interval=0)
    with pytest.raises(FsmisInputError, match=r"checkpoint_iteration=4\.pt: damaged checkpoint"):
        handler.attach(Engine(lambda e, b: None))
    (tmp_path / "checkpoint_iteration=4.pt").unlink()
    handler.attach(Engine(lambda e, b: None))
    assert handler.resumed_from == str(tmp_path / "checkpoint_iteration=2.pt")


# Calls that write a file. fsmis_monai.io wraps each in atomic_path; anything else must go through it too.
_WRITERS = {"save", "savefig", "to_csv", "write_text", "write_bytes", "savez", "savez_compressed", "imwrite",
            "to_filename", "tofile", "dump"}


def _writes_outside_atomic_path(source: str, name: str) -> list[str]:
    """``name:line call`` for every writing call not inside a ``with atomic_path(...)`` block."""
    tree = ast.parse(source)
    safe: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any("atomic_path" in ast.unparse(i.context_expr) for i in node.items):
            safe.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in safe:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        # append mode ("a") is let through: an append-only log loses nothing already written (fsmis reproduce's
        # train.log of each fold, as TensorBoard's event files; docs/hardening.md#faults)
        is_open_for_write = name == "open" and any(
            isinstance(a, ast.Constant) and isinstance(a.value, str) and set(a.value) & set("wx")
            for a in [*node.args[1:2], *[k.value for k in node.keywords if k.arg == "mode"]])
        if name in _WRITERS or is_open_for_write:
            text = ast.unparse(node)
            # our own atomic helpers (write_text of fsmis_monai.io, called as a plain function) are fine
            if isinstance(func, ast.Name) and name in {"write_text"}:
                continue
            found.append(f"{name}:{node.lineno} {text[:80]}")
    return found


def test_the_writer_scan_finds_direct_writes():
    source = """torch.save(obj, path)
nib.save(img, path)
open(path, "w").write(text)
frame.to_csv(path)
path.write_text(text)
fig.savefig(path)
with atomic_path(path) as tmp:
    torch.save(obj, tmp)
open(path).read()
write_text(path, text)
"""
    found = _writes_outside_atomic_path(source, "x.py")
    assert sorted(int(f.split(":")[1].split()[0]) for f in found) == [1, 2, 3, 4, 5, 6], found


def test_every_file_written_by_the_package_goes_through_atomic_path():
    offenders = []
    for path in sorted((REPO / "fsmis_monai").rglob("*.py")):
        offenders += _writes_outside_atomic_path(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert not offenders, "writers bypassing fsmis_monai.io.atomic_path:\n" + "\n".join(offenders)


def test_predictions_are_written_atomically(tmp_path, monkeypatch):
    """Every bundle's SaveImaged (and the frozen bundle's) uses AtomicNibabelWriter: a write that dies
    half-way leaves the previous prediction, readable, and no temporary."""
    import nibabel as nib
    from monai.data import MetaTensor
    from monai.transforms import SaveImage

    from fsmis_monai.commands import freeze
    from fsmis_monai.engines.inference import AtomicNibabelWriter

    from monai.transforms import Compose, SaveImaged

    from fsmis_monai.engines.inference import prediction_postprocessing

    writer = "fsmis_monai.engines.inference.AtomicNibabelWriter"
    shared = "$fsmis_monai.engines.inference.prediction_postprocessing("
    for cfg in sorted((REPO / "bundles").glob("*/configs/inference.json")):
        post = json.loads(cfg.read_text(encoding="utf-8"))["postprocessing"]
        if isinstance(post, str):  # the shared pipeline, checked below
            assert post.startswith(shared), cfg
            continue
        saves = [t for t in post["transforms"] if t["_target_"] == "SaveImaged"]
        assert saves and all(t.get("writer") == writer for t in saves), cfg
    assert shared[1:] in Path(freeze.__file__).read_text(encoding="utf-8")  # the frozen bundle's too
    saves = [t for t in prediction_postprocessing(Compose([]), tmp_path).transforms if isinstance(t, SaveImaged)]
    assert saves and all(t.saver.writers == (AtomicNibabelWriter,) for t in saves)

    save = SaveImage(output_dir=tmp_path, output_postfix="seg", separate_folder=False, print_log=False,
                     writer=AtomicNibabelWriter, resample=False)
    meta = {"filename_or_obj": "query.nii.gz", "affine": torch.eye(4)}
    save(MetaTensor(torch.ones(1, 4, 4, 3), meta=meta))
    target = tmp_path / "query_seg.nii.gz"
    assert np.asarray(nib.load(target).dataobj).sum() == 48

    def dies(img, filename):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(nib, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        save(MetaTensor(torch.zeros(1, 4, 4, 3), meta=meta))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["query_seg.nii.gz"]
    assert np.asarray(nib.load(target).dataobj).sum() == 48

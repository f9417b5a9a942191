"""``python -m monai.bundle run`` on bad input ends in one line a person can act on (``error: <file>: <problem>``,
printed by :mod:`fsmis_monai.bundle_errors`), while a real bug keeps its traceback. Run as a user runs it: a
subprocess of MONAI's unmodified entry point, on two real CHAOS scans cut small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsmis_monai.bundle_errors import excepthook
from fsmis_monai.io import FsmisInputError

from _real_scans import liver_window
from conftest import REPO_ROOT as REPO

BUNDLE = REPO / "bundles" / "adnet"
CONFIGS = BUNDLE / "configs"


def run_bundle(configs: list[str], cwd: Path, **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of the ADNet bundle (small encoder) with ``--key value`` overrides."""
    config = str(CONFIGS / configs[0]) if len(configs) == 1 else json.dumps([str(CONFIGS / c) for c in configs])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--bundle_root", str(BUNDLE),
           "--meta_file", str(CONFIGS / "metadata.json"), "--encoder", "small"]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("FSMIS_TRACEBACK", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def scans(chaos_dir, tmp_path_factory) -> Path:
    return liver_window(chaos_dir, tmp_path_factory.mktemp("bundle_errors") / "data", (1, 2), n_slices=6)


def test_missing_support_image_ends_in_one_line(scans, tmp_path):
    missing = tmp_path / "nowhere" / "image.nii.gz"
    proc = run_bundle(["inference.json"], tmp_path, dataset_dir=scans, support_image=missing,
                      support_label=scans / "label_1.nii.gz", ckpt_path="$None", output_dir=tmp_path / "pred")
    assert proc.returncode != 0
    assert last_line(proc) == f"error: {missing}: file not found", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "pred").exists()


def test_checkpoint_that_is_not_one_ends_in_one_line(scans, tmp_path):
    note = tmp_path / "model.pt"
    note.write_text("weights are on the shared drive\n")
    proc = run_bundle(["train.json", "evaluate.json"], tmp_path, dataset_dir=scans, fold="$None", ckpt_path=note,
                      output_dir=tmp_path / "eval", image_size=64)
    assert proc.returncode != 0
    assert last_line(proc).startswith(f"error: {note}: not a PyTorch checkpoint"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_a_bug_keeps_its_traceback(scans, tmp_path):
    # not bad input: an expression that fails in Python (a bug in a config) must keep MONAI's full traceback
    proc = run_bundle(["inference.json"], tmp_path, dataset_dir=scans, support_image=scans / "image_1.nii.gz",
                      support_label=scans / "label_1.nii.gz", support_class="'$1 // 0'", ckpt_path="$None",
                      output_dir=tmp_path / "pred")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr
    assert not any(line.startswith("error: ") for line in proc.stderr.splitlines())


def test_traceback_of_input_errors_on_request(capsys, monkeypatch):
    try:
        try:
            raise FsmisInputError("scan.nii.gz: file not found")
        except FsmisInputError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e
    except RuntimeError as wrapped:
        error = wrapped
    excepthook(type(error), error, error.__traceback__)
    assert capsys.readouterr().err == "error: scan.nii.gz: file not found\n"
    monkeypatch.setenv("FSMIS_TRACEBACK", "1")
    excepthook(type(error), error, error.__traceback__)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "error: scan.nii.gz: file not found"

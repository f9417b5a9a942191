"""``fsmis reproduce`` in its tiny CPU mode (issue 20 part 2): two ADNet folds of real CHAOS scans (64 x 64 x 8
liver windows), the CPU switch, 4 iterations; the aggregate checked against each fold's own evaluation; then a
fold killed after its iteration-2 checkpoint resumes from it while the finished fold is left alone."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fsmis_monai.cli import main as fsmis_main
from fsmis_monai.io import torch_load
from fsmis_monai.reproduce import GPU_STEP_MS, estimate_seconds, published

from _real_scans import liver_window

# ADNet folds 0 and 1 of CHAOS (docs/reference.md#folds-and-support-scans): 1 2 3 5 [8] and 8 10 13 15 [19];
# each fold trains on the scans of the folder outside its list
IDS = (1, 2, 3, 5, 8, 10, 13, 15, 19)
TINY = ["--cpu", "--jobs", "2", "--iterations", "4", "--set", "image_size=64", "--set", "num_workers=0",
        "--set", "save_interval=2", "--set", "min_size=20", "--set", "pseudolabel_min_size=500",
        "--set", "classes=[1]", "--set", "val_interval=0", "--set", "log_interval=1", "--set", "image_interval=1000"]


def _fold_means(folder: Path, kind: str) -> list[float]:
    """Liver Dice of each fold as its own evaluation wrote it (ADNet's protocol: EP2)."""
    return [json.loads((folder / f"fold{k}" / kind / "summary.json").read_text())
            ["protocols"]["ep2"]["classes"]["1"]["mean"] for k in (0, 1)]


def test_two_folds_train_evaluate_aggregate_and_resume(chaos_dir, tmp_path, capsys):
    data = liver_window(chaos_dir, tmp_path / "data", IDS)
    out = tmp_path / "out"
    command = ["reproduce", "--method", "adnet", "--dataset", "chaos", "--dataset-dir", str(data), "--output", str(out),
               "--folds", "0,1", *TINY]
    assert fsmis_main(command) == 0
    printed = capsys.readouterr().out
    assert "2 of 2 folds to train" in printed and "estimated time" in printed

    with open(out / "results.csv", newline="") as f:
        rows = {r["class"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"1", "mean"}
    net, floor = _fold_means(out, "evaluation"), _fold_means(out, "support_copy")
    liver = rows["1"]
    assert float(liver["fold0"]) == pytest.approx(100 * net[0]) and float(liver["fold1"]) == pytest.approx(100 * net[1])
    assert float(liver["dice_mean"]) == pytest.approx(100 * np.mean(net))
    assert float(liver["dice_std"]) == pytest.approx(100 * np.std(net))
    assert float(liver["support_copy_mean"]) == pytest.approx(100 * np.mean(floor))
    assert liver["published_source"] == "not published" and math.isnan(float(liver["published"]))
    assert "not published" in (out / "results.md").read_text()
    assert (out / "learning_curves.png").stat().st_size > 0
    script = (out / "commands.sh").read_text()
    assert "--fold 0" in script and "--fold 1" in script and "evaluate.json" in script and "support_copy" in script

    # fold 1 killed between its checkpoints of iterations 2 and 4: only the iteration-2 checkpoint is left
    first = torch_load(out / "fold1" / "model.pt")
    fold0_log = (out / "fold0" / "train.log").read_text()
    fold0_model = (out / "fold0" / "model.pt").stat().st_mtime_ns
    for path in [out / "fold1" / "model.pt", *(out / "fold1" / "training" / "checkpoints").glob("*=4.pt")]:
        path.unlink()
    for kind in ("evaluation", "support_copy"):
        for path in sorted((out / "fold1" / kind).rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    assert fsmis_main(command) == 0
    assert "1 of 2 folds to train" in capsys.readouterr().out
    assert (out / "fold0" / "train.log").read_text() == fold0_log  # the finished fold is not trained again
    assert (out / "fold0" / "model.pt").stat().st_mtime_ns == fold0_model
    assert "continuing from iteration 2 of 4" in (out / "fold1" / "train.log").read_text()  # its checkpoint
    again = torch_load(out / "fold1" / "model.pt")
    for key in first:  # continued from iteration 2, it ends where the uninterrupted run ended
        assert torch.allclose(first[key].float(), again[key].float(), atol=1e-5), key
    assert _fold_means(out, "evaluation")[1] == pytest.approx(net[1], abs=1e-4)


def test_published_values_carry_their_source_and_the_estimate_uses_the_gpu_figures():
    paper = published("ssl_alpnet", "chaos_mr_t2", 1)
    assert paper["3"][0] == 81.92 and "ECCV 2020" in paper["3"][1]  # left kidney, docs/reference.md#reported-results
    assert published("gmrd", "chaos_mr_t2", 1) == {}  # the paper's table is not recorded: "not published"
    # Q-Net: 30 000 iterations at 52.9 ms (bench/RESULTS.md) = 26.5 min per fold; 5 folds on 2 GPUs: 3 waves
    assert estimate_seconds("qnet", 30000, 5, 2) == pytest.approx(3 * 30000 * 0.0529)
    assert set(GPU_STEP_MS) == {"ssl_alpnet", "adnet", "qnet", "lslpn", "gmrd", "pami", "difd"}

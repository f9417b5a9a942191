"""Every bundle through MONAI's own bundle machinery (``ConfigWorkflow``) on real CHAOS scans, tiny settings:
the files and config keys each bundle holds, a 2-iteration training run, resume after a stopped run, evaluation
writing per-case Dice, inference writing predictions on the query's grid. The model zoo's own checks (metadata
schema, ``check_properties``, export) are in ``test_conventions.py``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from fsmis_monai.bundles import CPU_OVERRIDES
from fsmis_monai.engines import ensure_pseudolabels
from fsmis_monai.io import save_nifti, torch_load
from _real_scans import liver_window

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "train.json").is_file())
# keys every inference.json holds; train.json adds the training ones (evaluate.json overrides train.json)
NETWORK_KEYS = {"bundle_root", "dataset_dir", "dataset_name", "output_dir", "encoder", "pretrained_weights",
                "ckpt_path", "device", "seed", "faithful", "network_def", "network"}
SHARED_KEYS = NETWORK_KEYS | {"fold", "setting", "image_size", "max_iterations", "normalization"}
IDS = (1, 2)


@pytest.fixture(scope="module")
def tiny_data(chaos_dir, tmp_path_factory):
    """Two real scans cut to 128 x 128 x 12 (a window through liver and kidneys) with both pseudolabel kinds."""
    root = tmp_path_factory.mktemp("tiny_chaos")
    data = liver_window(chaos_dir, root / "data", IDS, n_slices=12, step=1)
    ensure_pseudolabels(data, root / "supervoxels", "supervoxels", "chaos", min_size=1000)
    ensure_pseudolabels(data, root / "superpixels", "superpixels", "chaos")
    return root


def _workflow(bundle: str, config: str | list[str], workflow_type: str | None, **override) -> ConfigWorkflow:
    configs = REPO / "bundles" / bundle / "configs"
    files = [str(configs / c) for c in config] if isinstance(config, list) else str(configs / config)
    return ConfigWorkflow(config_file=files, meta_file=str(configs / "metadata.json"),
                          logging_file=str(configs / "logging.conf"), workflow_type=workflow_type,
                          bundle_root=str(REPO / "bundles" / bundle), **override)


def _train_overrides(bundle: str, tiny: Path, out: Path, **extra) -> dict:
    kind = "superpixels" if bundle == "ssl_alpnet" else "supervoxels"
    return {"dataset_dir": str(tiny / "data"), "pseudolabel_dir": str(tiny / kind), "fold": None, **CPU_OVERRIDES,
            "image_size": 64, "max_iterations": 2, "num_workers": 0, "val_interval": 0, "progress_bar": False,
            "output_dir": str(out), "ckpt_path": str(out / "model.pt"), "generate_pseudolabels": False,
            "log_interval": 1, "image_interval": 1, **extra}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_files_metadata_and_keys(bundle):
    root = REPO / "bundles" / bundle
    for f in ("LICENSE", "docs/README.md", "configs/metadata.json", "configs/logging.conf", "configs/train.json",
              "configs/evaluate.json", "configs/inference.json", "configs/multi_gpu_train.json"):
        assert (root / f).is_file(), f"{bundle}: {f} missing"
    assert not (root / "scripts").exists()
    train = json.loads((root / "configs" / "train.json").read_text())
    assert SHARED_KEYS | {"inferer"} <= set(train), sorted(SHARED_KEYS - set(train))
    assert train["method"] == bundle
    infer = json.loads((root / "configs" / "inference.json").read_text())
    assert NETWORK_KEYS | {"inferer", "dataset", "evaluator"} <= set(infer)
    assert not {"fold", "setting", "max_iterations", "train", "optimizer"} & set(infer)  # nothing of training
    evaluate = json.loads((root / "configs" / "evaluate.json").read_text())
    # evaluation loads model.pt: no initial weights to download (pretrained_weights null over train.json's)
    lifecycle = {"output_dir", "initialize", "run", "finalize", "pretrained_weights"}
    assert evaluate["pretrained_weights"] is None
    assert "evaluate" in evaluate and not (set(evaluate) - lifecycle) & set(train)  # adds only evaluation keys


@pytest.mark.parametrize("bundle", BUNDLES)
def test_two_iteration_training_run(bundle, tiny_data, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    wf = _workflow(bundle, "train.json", "train", **_train_overrides(bundle, tiny_data, out))
    wf.initialize()
    network = wf.parser.get_parsed_content("network_def")
    before = {k: v.detach().clone() for k, v in network.state_dict().items()}
    wf.run()
    wf.finalize()
    assert wf.trainer.state.iteration == 2
    assert np.isfinite(wf.trainer.state.output["loss"].item())
    assert (out / "checkpoints" / "checkpoint_final_iteration=2.pt").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    saved = torch_load(out / "model.pt")
    contract = json.loads((out / "data_contract.json").read_text())  # written beside the weights, with them
    assert (contract["image_size"], contract["normalization"]) == ([64, 64], "volume")
    assert saved.keys() == before.keys()
    changed = [k for k in saved if saved[k].is_floating_point() and not torch.equal(saved[k], before[k])]
    assert changed, f"{bundle}: two SGD steps changed no weight"


def test_resume_after_stopped_run_continues_from_checkpoint(tiny_data, tmp_path):
    """A run stopped at iteration 3 of 4 resumes at 3 and ends with the weights of an uninterrupted run."""
    torch.set_num_threads(1)

    def run(out, stop_at=None):
        wf = _workflow("adnet", "train.json", "train",
                       **_train_overrides("adnet", tiny_data, out, max_iterations=4, save_interval=2))
        wf.initialize()
        started = []
        wf.trainer.add_event_handler(Events.STARTED, lambda e: started.append(e.state.iteration))
        if stop_at:
            wf.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda e: e.terminate())
        wf.run()
        wf.finalize()
        return started[0], wf.trainer.state.iteration

    assert run(tmp_path / "full") == (0, 4)
    assert run(tmp_path / "part", stop_at=3) == (0, 3)
    # stopped early: neither weights nor their data contract in place (the run's own contract stays in checkpoints/)
    assert not (tmp_path / "part" / "model.pt").exists() and not (tmp_path / "part" / "data_contract.json").exists()
    assert (tmp_path / "part" / "checkpoints" / "data_contract.json").is_file()
    assert run(tmp_path / "part") == (3, 4)  # restored from checkpoint_final_iteration=3.pt
    full, resumed = torch_load(tmp_path / "full" / "model.pt"), torch_load(tmp_path / "part" / "model.pt")
    for k in full:
        assert torch.allclose(full[k].float(), resumed[k].float(), atol=1e-5), k


def test_evaluate_json_writes_per_case_dice(tiny_data, tmp_path):
    out = tmp_path / "eval"
    wf = _workflow("adnet", ["train.json", "evaluate.json"], None, dataset_dir=str(tiny_data / "data"),
                   output_dir=str(out), encoder="small", ckpt_path=None, protocols=["ep1", "whole"], classes=[1], query_ids=[2],
                   support_id=1)
    wf.initialize()
    with pytest.warns(UserWarning, match="UNTRAINED"):
        wf.run()
    rows = list(csv.DictReader((out / "per_case.csv").open()))
    assert {r["protocol"] for r in rows} == {"ep1", "whole"} and {r["query_id"] for r in rows} == {"2"}
    whole = next(r for r in rows if r["protocol"] == "whole")
    pred = np.asarray(nib.load(out / "predictions" / "whole" / "2" / "class_1.nii.gz").dataobj) > 0
    truth = np.asarray(nib.load(tiny_data / "data" / "label_2.nii.gz").dataobj) == 1
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())  # the whole protocol scores every slice
    assert float(whole["dice"]) == pytest.approx(dice, abs=1e-6)


def test_inference_json_writes_predictions_on_query_grid(tiny_data, tmp_path):
    queries = tmp_path / "queries"
    src = nib.load(tiny_data / "data" / "image_2.nii.gz")
    affine = src.affine.copy()
    affine[:3, 3] += (5.0, -7.0, 3.0)  # a query with its own geometry
    save_nifti(queries / "patient_a.nii.gz", np.asarray(src.dataobj), affine=affine)
    wf0 = _workflow("qnet", "inference.json", "infer", encoder="small")
    net = wf0.parser.get_parsed_content("network_def")
    with torch.no_grad():
        next(net.parameters()).add_(0.5)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    wf = _workflow("qnet", "inference.json", "infer", encoder="small", dataset_dir=str(queries),
                   output_dir=str(tmp_path / "pred"), ckpt_path=str(ckpt), refine_steps=1,
                   support_image=str(tiny_data / "data" / "image_1.nii.gz"),
                   support_label=str(tiny_data / "data" / "label_1.nii.gz"), support_class="liver",
                   n_support_slices=2, device="$torch.device('cpu')")
    wf.initialize()
    wf.run()
    wf.finalize()
    loaded = wf.parser.get_parsed_content("network")
    assert torch.equal(next(loaded.parameters()), next(net.parameters()))  # CheckpointLoader filled the network
    out = nib.load(tmp_path / "pred" / "patient_a_seg.nii.gz")
    assert out.shape == src.shape and np.allclose(out.affine, affine)
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1}


def _bundle_run(bundle: str, configs: list[str], cwd: Path, **overrides) -> None:
    """``python -m monai.bundle run`` of ``bundle`` (a subprocess, as a user runs it) with ``--key value``."""
    folder = REPO / "bundles" / bundle / "configs"
    config = json.dumps([str(folder / c) for c in configs]) if len(configs) > 1 else str(folder / configs[0])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(REPO / "bundles" / bundle),
           "--config_file", config]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_gmrd_trained_at_128_evaluates_with_the_documented_command(tiny_data, tmp_path):
    """GMRD's prototype MLPs depend on the slice size: trained with ``--image_size 128``, the README's evaluation
    command (``--encoder small`` added, no size) builds the network at the size the data contract records."""
    torch.set_num_threads(1)
    run = tmp_path / "run"
    wf = _workflow("gmrd", "train.json", "train", **_train_overrides("gmrd", tiny_data, run, image_size=128))
    wf.initialize()
    wf.run()
    wf.finalize()
    assert json.loads((run / "data_contract.json").read_text())["image_size"] == [128, 128]
    out = tmp_path / "eval"
    # the two scans of the window: support 1, query 2, liver (the README's command takes fold 0's scans)
    _bundle_run("gmrd", ["train.json", "evaluate.json"], tmp_path, dataset_dir=str(tiny_data / "data"),
                output_dir=str(out), ckpt_path=str(run / "model.pt"), encoder="small", support_id=1, query_ids=[2],
                classes=[1])
    with open(out / "per_case.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["query_id"], r["class"]) for r in rows} == {("2", "1")}, rows


def test_own_masks_train_and_evaluate_with_no_dataset(chaos_dir, tmp_path):
    """The README's promise for a user's own 0/255 masks (``--dataset_name none``): training makes supervoxels
    at the stated default size (5000) and trains on every scan (no folds); evaluation takes the lowest id as
    support, the others as queries, and the label values present (255) as the classes, named by value."""
    data = liver_window(chaos_dir, tmp_path / "data", IDS, n_slices=12, step=1)
    for i in IDS:
        img = nib.load(data / f"label_{i}.nii.gz")
        save_nifti(data / f"label_{i}.nii.gz", np.where(np.asarray(img.dataobj) == 1, 255, 0).astype(np.uint8),
                   affine=img.affine)
    run = tmp_path / "run"
    _bundle_run("adnet", ["train.json"], tmp_path, dataset_dir=str(data), dataset_name="none", **CPU_OVERRIDES,
                image_size=64, max_iterations=2, num_workers=0, val_interval=0, progress_bar="False",
                output_dir=str(run), ckpt_path=str(run / "model.pt"))
    pseudo = sorted(p.name for p in (run / "none_supervoxels_5000").glob("superpix-*"))
    assert pseudo == ["superpix-MIDDLE_1.nii.gz", "superpix-MIDDLE_2.nii.gz"], sorted(os.listdir(run))
    contract = json.loads((run / "data_contract.json").read_text())
    assert contract["label_map"] is None and contract["dataset"] is None  # any raw value is a class
    assert torch_load(run / "model.pt")

    out = tmp_path / "eval"
    _bundle_run("adnet", ["train.json", "evaluate.json"], tmp_path, dataset_dir=str(data), dataset_name="none",
                encoder="small", output_dir=str(out), ckpt_path=str(run / "model.pt"), protocols=["ep1"])
    with open(out / "per_case.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["support_id"], r["query_id"], r["class"], r["class_name"]) for r in rows} == {("1", "2", "255", "255")}
    assert np.isfinite(float(rows[0]["dice"]))

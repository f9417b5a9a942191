"""The weights shipped in the bundles (issue 21): every file its metadata announces is there, small, loads whole
(MONAI's ``monai.bundle.load`` and :func:`load_bundle_network`, every tensor equal to the file), and a fresh
evaluation of one held-out scan gives the per-scan Dice its ``key_metrics`` record; the README's out-of-the-box
command (``fsmis demo``) segments a cut of the sample scans with them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import load

from fsmis_monai.evaluation.runner import run_evaluation
from fsmis_monai.networks.layout import load_bundle_network, read_layout

from conftest import DATA_ROOT
from _real_scans import chaos_window

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
MB = 2**20


def shipped() -> list[tuple[str, str, dict]]:
    """(bundle, variant, key_metrics) for every weights file a bundle's metadata announces."""
    out = []
    for meta_file in sorted(BUNDLES.glob("*/configs/metadata.json")):
        for variant, metrics in json.loads(meta_file.read_text()).get("key_metrics", {}).items():
            out.append((meta_file.parents[1].name, variant, metrics))
    return out


SHIPPED = shipped()
IDS = [f"{b}-{v}" for b, v, _ in SHIPPED]


def test_weights_are_shipped_and_small():
    assert any(v == "default" for _, v, _ in SHIPPED), "no bundle ships default weights"
    total = 0
    for bundle, variant, metrics in SHIPPED:
        model = BUNDLES / bundle / metrics["file"]
        assert model.is_file() and (model.parent / "data_contract.json").is_file(), model
        assert model.stat().st_size < 15 * MB, model
        total += model.stat().st_size
        assert (BUNDLES / bundle / "docs" / ("learning_curve.png" if variant == "default" else
                                             f"learning_curve_{variant}.png")).is_file()
    assert total < 60 * MB
    # every shipped model.pt is announced by its metadata (no unmeasured weights in the repository)
    announced = {(BUNDLES / b / m["file"]).resolve() for b, _, m in SHIPPED}
    tracked = subprocess.run(["git", "ls-files", "bundles/*/models/*model.pt", "bundles/*/models/*/model.pt"],
                             cwd=REPO, capture_output=True, text=True).stdout.split()
    assert {(REPO / f).resolve() for f in tracked} <= announced


@pytest.mark.parametrize("bundle,variant,metrics", SHIPPED, ids=IDS)
def test_shipped_network_loads_every_tensor(bundle, variant, metrics):
    model = BUNDLES / bundle / metrics["file"]
    state = torch.load(model, map_location="cpu", weights_only=True)
    assert read_layout(model)["encoder"] == metrics["encoder"]
    for net in (load_bundle_network(BUNDLES / bundle, model_file=metrics["file"]),
                load(name=bundle, bundle_dir=str(BUNDLES), model_file=metrics["file"], workflow_type="inference",
                     device="cpu")):
        got = net.state_dict()
        assert got.keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(got[k].float(), v.float()), k


@pytest.mark.slow
@pytest.mark.parametrize("bundle,variant,metrics", SHIPPED, ids=IDS)
def test_key_metrics_equal_a_fresh_evaluation(bundle, variant, metrics, tmp_path):
    """One held-out query scan, every class, EP1: the Dice of this exact file equals what metadata records."""
    query = metrics["query_scans"][0]
    recorded = metrics["per_case_dice"]["ep1"][str(query)]
    net = load_bundle_network(BUNDLES / bundle, model_file=metrics["file"])
    summary = run_evaluation(dataset_dir=DATA_ROOT / metrics["dataset"], output_dir=tmp_path, network=net,
                             ckpt_path=BUNDLES / bundle / metrics["file"], dataset=metrics["dataset"],
                             fold=metrics["fold"], family=metrics["fold_family"], protocols=["ep1"], device="cpu",
                             query_ids=[query], support_id=metrics["support_scan"], progress=False, resume=False,
                             save_predictions=False)
    fresh = {c["name"]: c["mean"] for c in summary["protocols"]["ep1"]["classes"].values()}
    assert fresh.keys() == recorded.keys()
    for name, dice in recorded.items():
        assert fresh[name] == pytest.approx(dice, abs=2e-4), name


@pytest.mark.slow
def test_readme_demo_segments_a_sample_cut_with_the_shipped_weights(tmp_path):
    """``fsmis demo`` (README's first command) on a 16-slice cut of the sample scans: the prediction is
    written in the query's geometry and the printed Dice is the one recomputed here from the files."""
    sample = REPO / "fsmis_monai" / "sample_data" / "chaos_mr_t2"
    cut = chaos_window(sample, tmp_path / "cut", (2, 20), origin=(0, 0), size=256, depth=16, step=1)
    out = tmp_path / "pred"
    run = subprocess.run([sys.executable, "-m", "fsmis_monai", "demo", "--sample-dir", str(cut), "--output", str(out),
                          "--threads", "2"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    pred_img = nib.load(out / "image_2_seg.nii.gz")
    query = nib.load(cut / "image_2.nii.gz")
    assert pred_img.shape == query.shape and np.allclose(pred_img.affine, query.affine)
    pred = np.asarray(pred_img.dataobj) > 0
    truth = np.asarray(nib.load(cut / "label_2.nii.gz").dataobj) == 1
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    printed = float(run.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1])
    assert printed == pytest.approx(dice, abs=1e-3)
    assert dice > 0.5  # the shipped weights segment the liver of a held-out scan

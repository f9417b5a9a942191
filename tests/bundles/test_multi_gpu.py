"""``multi_gpu_train.json`` under ``torchrun``: two CPU processes with gloo train ADNet for a few iterations on two
real CHAOS scans (cropped to 64 x 64 x 10, small encoder). A test-only config appended to the config list
records, per rank, the iterations run, the episodes drawn and the final weights, so the test can check that
both ranks stepped, on distinct episodes, that DDP kept their weights equal, and that rank 0 alone generated
the missing supervoxels, wrote the checkpoints (whose network loads back into the method) and the TensorBoard
logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fsmis_monai.bundles import cpu_cli_args
from fsmis_monai.io import torch_load
from fsmis_monai.networks.methods import build_method

from _real_scans import liver_window

REPO = Path(__file__).resolve().parents[2]
ITERATIONS = 3

# Appended after train.json + multi_gpu_train.json: every rank writes what it did (test instrumentation only).
PROBE = {
    "probe_dir": "$@output_dir + '/probe'",
    "finalize": [
        "$os.makedirs(@probe_dir, exist_ok=True)",
        "$torch.save({'iteration': @train#trainer.state.iteration, 'rank': dist.get_rank(), "
        "'world': dist.get_world_size(), 'episodes': list(iter(@train#sampler))[:@max_iterations], "
        "'weights': @network.module.state_dict()}, @probe_dir + '/rank' + str(dist.get_rank()) + '.pt')",
        "$@train#summary_writer.close()",
        "$dist.is_initialized() and dist.destroy_process_group()",
    ],
}


def test_two_process_gloo_training(chaos_dir, tmp_path):
    data = liver_window(chaos_dir, tmp_path / "data", (1, 2), n_slices=10)
    (tmp_path / "probe.json").write_text(json.dumps(PROBE))
    configs = REPO / "bundles" / "adnet" / "configs"
    out = tmp_path / "run"
    config_list = [str(configs / "train.json"), str(configs / "multi_gpu_train.json"), str(tmp_path / "probe.json")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "monai.bundle", "run", "--config_file", json.dumps(config_list),
           "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
           "--bundle_root", str(REPO / "bundles" / "adnet"), "--dataset_dir", str(data),
           # the run makes the missing supervoxels: rank 0 alone, the other rank waits for them
           "--pseudolabel_dir", str(tmp_path / "supervoxels"), "--pseudolabel_min_size", "300",
           "--fold", "$None", *cpu_cli_args(), "--image_size", "64", "--max_iterations", str(ITERATIONS),
           "--num_workers", "0", "--val_interval", "0", "--progress_bar", "False", "--log_interval", "1",
           "--image_interval", "1",
           # no find_unused_parameters: the bundle turns it on for the small encoder, whose heads for other
           # methods (proj2, tau_head) get no gradient (ADNet's paper encoder trains every parameter)
           "--save_interval", "2", "--output_dir", str(out), "--ckpt_path", str(out / "model.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    output = proc.stdout + proc.stderr
    assert output.count("generating supervoxels for 2 scan(s)") == 1, output[-4000:]
    assert sorted(p.name for p in (tmp_path / "supervoxels").glob("*.nii.gz")) == [
        "superpix-MIDDLE_1.nii.gz", "superpix-MIDDLE_2.nii.gz"]

    probes = [torch_load(out / "probe" / f"rank{r}.pt") for r in (0, 1)]
    assert [p["rank"] for p in probes] == [0, 1] and {p["world"] for p in probes} == {2}
    assert [p["iteration"] for p in probes] == [ITERATIONS, ITERATIONS]  # both ranks stepped
    assert not set(probes[0]["episodes"]) & set(probes[1]["episodes"])  # distinct episodes per rank
    network = build_method("adnet", encoder="small")
    initial = {k: v.detach().clone() for k, v in network.named_parameters()}
    for k in initial:  # DDP averages the gradients, so the parameters stay equal across ranks
        torch.testing.assert_close(probes[0]["weights"][k], probes[1]["weights"][k], atol=1e-6, rtol=0, msg=k)

    # rank 0 alone writes checkpoints and the final network; it loads into a fresh method
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint_final_iteration=3.pt", "checkpoint_iteration=2.pt", "data_contract.json"]
    assert (out / "data_contract.json").is_file()  # the run's data contract travels beside model.pt
    tags = EventAccumulator(str(out / "tensorboard")).Reload().Tags()
    assert {"loss", "lr"} <= set(tags["scalars"]) and tags["images"], tags  # rank 0 logs alone
    assert not list(out.glob("tensorboard_*")), sorted(p.name for p in out.iterdir())  # no empty folder per rank
    network.load_state_dict(torch_load(out / "model.pt"))
    for k, v in network.state_dict().items():
        torch.testing.assert_close(v, probes[0]["weights"][k], atol=0, rtol=0, msg=k)
    assert any(not torch.equal(initial[k], v) for k, v in network.named_parameters())

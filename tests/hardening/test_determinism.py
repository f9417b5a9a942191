"""Determinism on CPU: the ADNet (supervoxel, one-side augmentation) and SSL-ALPNet (superpixel, both-side
augmentation) bundles, each trained twice with the same seed on the same real scans, once with
``num_workers=0`` and once with ``num_workers=2``, gives bit-identical losses at every iteration, identical
weights and identical predictions; another seed gives other losses (the comparison can fail)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from fsmis_monai.data.datalist import ScanFiles
from fsmis_monai.data.volumes import load_volume
from fsmis_monai.engines import ensure_pseudolabels
from fsmis_monai.io import torch_load

from _real_scans import write_chaos_window
from _training_run import REPO, train_overrides

ITERATIONS = 4


@pytest.fixture(scope="module")
def run_data(chaos_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hardening_determinism")
    write_chaos_window(chaos_dir, root / "data")
    ensure_pseudolabels(root / "data", root / "supervoxels", "supervoxels", "chaos", min_size=500)
    ensure_pseudolabels(root / "data", root / "superpixels", "superpixels", "chaos")
    return root


def _train(root: Path, out: Path, num_workers: int, seed: int = 2021, bundle: str = "adnet") -> list[float]:
    torch.set_num_threads(1)
    configs = REPO / "bundles" / bundle / "configs"
    pseudo = root / ("superpixels" if bundle == "ssl_alpnet" else "supervoxels")
    overrides = train_overrides(root / "data", pseudo, out, max_iterations=ITERATIONS,
                                save_interval=0, num_workers=num_workers, seed=seed)
    wf = ConfigWorkflow(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
                        logging_file=str(configs / "logging.conf"), workflow_type="train",
                        bundle_root=str(configs.parent), **overrides)
    wf.initialize()
    losses: list[float] = []
    wf.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    wf.run()
    wf.finalize()
    assert wf.trainer.state.iteration == ITERATIONS
    return losses


def _predict(root: Path, weights: Path, method: str) -> torch.Tensor:
    """Logits of a real query slice segmented from the adjacent annotated slice of the other scan."""
    from fsmis_monai.networks.methods import build_method

    net = build_method(method, encoder="small")
    net.load_state_dict(torch_load(weights))
    net.eval()
    vol = load_volume(ScanFiles(1, root / "data" / "image_1.nii.gz", root / "data" / "label_1.nii.gz"), "chaos")
    z = int(np.flatnonzero((vol.label == 1).any(axis=(1, 2)))[2])
    with torch.no_grad():
        state = net.encode_support(torch.as_tensor(vol.image_slice(z))[None],
                                   torch.as_tensor((vol.label[z] == 1).astype(np.float32))[None])
        return net.segment(torch.as_tensor(vol.image_slice(z + 1))[None], state)


@pytest.mark.parametrize("bundle", ["adnet", "ssl_alpnet"])
def test_same_seed_same_losses_weights_and_predictions_across_worker_counts(run_data, bundle):
    zero = _train(run_data, run_data / bundle / "w0", num_workers=0, bundle=bundle)
    two = _train(run_data, run_data / bundle / "w2", num_workers=2, bundle=bundle)
    assert len(zero) == ITERATIONS and all(np.isfinite(zero))
    assert zero == two  # exact float equality, iteration by iteration
    a, b = torch_load(run_data / bundle / "w0" / "model.pt"), torch_load(run_data / bundle / "w2" / "model.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    predictions = [_predict(run_data, run_data / bundle / w / "model.pt", bundle) for w in ("w0", "w2")]
    assert torch.equal(*predictions)
    other = _train(run_data, run_data / bundle / "seed7", num_workers=0, seed=7, bundle=bundle)
    assert other != zero  # another seed: other episodes, other losses

"""User story (issue 23): a user segments a new scan with a bundle's ``inference.json`` (``python -m monai.bundle
run``, here MONAI's ``ConfigWorkflow``) and gets no prediction on slices far from where the support places the
organ. Real CHAOS scans 3 (support) and 2 (query), every 4th pixel in-plane (64 x 64), full depth; Q-Net, small
encoder, random weights (perturbed so that they predict foreground): the ``range`` step is the part with a
known answer without trained weights. Default ``whole_scan_steps``: no predicted slice outside the
support-guided range of the query (computed here from the library's functions on the model's grid); switched
off (``whole_scan_steps=[]``), the same network predicts outside it (the test is not vacuous)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigWorkflow

from fsmis_monai.engines.inference import load_support_prior, model_contract, query_preprocessing
from fsmis_monai.io import save_nifti
from fsmis_monai.transforms.whole_scan import DEFAULT_STEPS, SupportPrior, body_mask, slice_range

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "qnet" / "configs"
CLASS = "right_kidney"


def _downsampled(src: Path, dst: Path, scan_id: int, step: int = 4) -> None:
    for kind in ("image", "label"):
        nii = nib.load(src / f"{kind}_{scan_id}.nii.gz")
        data = np.asarray(nii.dataobj)[::step, ::step, :]
        save_nifti(dst / f"{kind}_{scan_id}.nii.gz", data.astype(np.float32 if kind == "image" else np.uint8),
                   affine=nii.affine @ np.diag([step, step, 1.0, 1.0]))


def _infer(tmp_path: Path, data: Path, ckpt: Path, out: str, **override) -> np.ndarray:
    wf = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), meta_file=str(CONFIGS / "metadata.json"),
                        workflow_type="infer", bundle_root=str(REPO / "bundles" / "qnet"), encoder="small",
                        refine_steps=1, ckpt_path=str(ckpt), dataset_dir=str(data / "queries"),
                        output_dir=str(tmp_path / out), support_image=str(data / "image_3.nii.gz"),
                        support_label=str(data / "label_3.nii.gz"), support_class=CLASS, n_support_slices=3,
                        write_overlays=False, device="$torch.device('cpu')", **override)
    wf.initialize()
    wf.run()
    wf.finalize()
    return np.asarray(nib.load(tmp_path / out / "image_2_seg.nii.gz").dataobj) > 0


def test_inference_json_predicts_only_within_the_support_guided_range(chaos_dir, tmp_path):
    torch.set_num_threads(1)
    data = tmp_path / "data"
    for i in (2, 3):
        _downsampled(chaos_dir, data, i)
    (data / "queries").mkdir()
    (data / "queries" / "image_2.nii.gz").symlink_to(data / "image_2.nii.gz")
    from fsmis_monai.networks.methods import build_method

    torch.manual_seed(0)
    net = build_method("qnet", encoder="small")
    with torch.no_grad():
        next(net.parameters()).add_(0.5)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)

    contract = model_contract(ckpt, "chaos_mr_t2")
    prior = SupportPrior.from_dict(load_support_prior(data / "image_3.nii.gz", data / "label_3.nii.gz", CLASS,
                                                      contract))
    prepared = query_preprocessing(contract)({"image": str(data / "image_2.nii.gz")})["image"][0].numpy()
    inside = slice_range(prior, body_mask(prepared))
    assert prepared.shape[-1] == 31 and 0 < inside.sum() < 31  # the model's grid keeps the 31 slices

    assert "range" in DEFAULT_STEPS
    default = _infer(tmp_path, data, ckpt, "default")
    off = _infer(tmp_path, data, ckpt, "off", whole_scan_steps=[])
    assert default.shape == off.shape == (64, 64, 31)
    assert not default[..., ~inside].any()
    assert off[..., ~inside].any()  # the network alone predicts far from the organ
    assert not (default & ~off).any()  # the steps only remove

"""The frozen organ segmenter (``fsmis_monai.export``) and ``fsmis freeze`` on real CHAOS scans (cropped and
downsampled to 64 x 64 x 8, small encoder, random weights):

- every method: the frozen module equals ``encode_support`` + ``segment`` of the method (same arithmetic,
  so 1e-6), and its ``torch.jit.trace`` reproduces it (abs 1e-5 + rel 1e-4: the traced graph reorders no
  arithmetic but may pick other kernels);
- ``fsmis freeze``: the support slices are the protocol's (checked against a NumPy z-score and pick written
  here), MONAI's ``verify_net_in_out``, ``ckpt_export`` (TorchScript, abs 1e-5) and ``onnx_export`` (ONNX
  reference evaluator, abs 1e-4) accept the new bundle and reproduce the eager logits, and its
  ``inference.json`` writes a NIfTI on the query's grid equal to the source bundle's own few-shot inference,
  with the same whole-scan steps and support prior (issue 23).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, ckpt_export, onnx_export, verify_metadata, verify_net_in_out

from fsmis_monai.cli import main as fsmis_main
from fsmis_monai.engines.inference import load_support, load_support_prior
from fsmis_monai.export import FrozenFewShotSegmenter, trace
from fsmis_monai.io import FsmisInputError, save_nifti, torch_load, torch_save
from fsmis_monai.networks.methods import METHODS, build_method
from fsmis_monai.transforms.overlays import overlay_slices
from fsmis_monai.transforms.whole_scan import DEFAULT_STEPS

from _real_scans import LIVER, liver_window

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO.parent / "shared" / "monai" / "meta_schema_20240725.json"


@pytest.fixture(scope="module")
def tiny_scans(chaos_dir, tmp_path_factory) -> Path:
    """Scans 1 (support) and 2 (query), 64 x 64 x 8 through the liver."""
    return liver_window(chaos_dir, tmp_path_factory.mktemp("frozen_data"), (1, 2))


def _method(name: str, **kwargs):
    torch.manual_seed(0)
    extra = {"image_size": 64} if name == "gmrd" else {}  # GMRD's descriptor MLP is sized by the image
    return build_method(name, encoder="small", **extra, **kwargs).eval()


def _queries(folder: Path, n: int = 3) -> torch.Tensor:
    vol = np.asarray(nib.load(folder / "image_2.nii.gz").dataobj, dtype=np.float64)
    vol = (vol - vol.mean()) / vol.std()
    return torch.as_tensor(vol[..., 2 : 2 + n], dtype=torch.float32).permute(2, 0, 1)[:, None].repeat(1, 3, 1, 1)


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"prototype"}))
def test_frozen_module_matches_method_and_trace(name, tiny_scans):
    torch.set_num_threads(1)
    method = _method(name, **({"refine_steps": 0} if name == "qnet" else {}))
    images, masks = load_support(tiny_scans / "image_1.nii.gz", tiny_scans / "label_1.nii.gz", LIVER, 2)
    queries = _queries(tiny_scans)
    with torch.no_grad():
        expected = method.segment(queries, method.encode_support(images, masks))
        frozen = FrozenFewShotSegmenter.from_support(method, images, masks)
        eager = frozen(queries)
    assert eager.shape == (3, 2, 64, 64)
    torch.testing.assert_close(eager, expected, atol=1e-6, rtol=0)
    # a fresh module from the spec + state dict (what a bundle's CheckpointLoader does) is the same network
    no_refinement = {"refine_steps": 0} if name == "qnet" else {}
    rebuilt = FrozenFewShotSegmenter(_method(name, **no_refinement), frozen.support_spec)
    rebuilt.load_state_dict(frozen.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(queries), eager, atol=1e-6, rtol=0)
        traced = trace(frozen, queries)
        torch.testing.assert_close(traced(queries), eager, atol=1e-5, rtol=1e-4)
        if name == "pami":  # per-query refinement: the trace keeps its batch size and refuses another one
            with pytest.raises(RuntimeError):
                traced(queries[:1])
        else:
            torch.testing.assert_close(traced(queries[:1]), frozen(queries[:1]), atol=1e-5, rtol=1e-4)


def test_test_time_refinement_runs_eagerly_and_refuses_tracing(tiny_scans):
    """Q-Net's Adam refinement is kept in eager mode; a trace stops with the switch to use."""
    method = _method("qnet", refine_steps=2)
    images, masks = load_support(tiny_scans / "image_1.nii.gz", tiny_scans / "label_1.nii.gz", LIVER, 1)
    queries = _queries(tiny_scans, 2)
    with torch.no_grad():
        expected = method.segment(queries, method.encode_support(images, masks))
        frozen = FrozenFewShotSegmenter.from_support(method, images, masks)
        torch.testing.assert_close(frozen(queries), expected, atol=1e-6, rtol=0)
    assert not frozen.exportable
    with pytest.raises(RuntimeError, match="--no-refinement"):
        trace(frozen, queries)
    dropped = FrozenFewShotSegmenter.from_support(_method("qnet", refine_steps=2), images, masks, refine=False)
    assert dropped.exportable and dropped.method.refine_steps == 0
    with torch.no_grad():
        assert not torch.allclose(dropped(queries), expected)  # the refinement did change the logits


def _expected_support(folder: Path, n_parts: int) -> tuple[list[int], torch.Tensor]:
    """Support picks and images written independently: the C liver slices, positions int(p * C) at the part
    centres p = 1/(2n) + i/n, the volume z-scored (population std) and repeated to 3 channels."""
    vol = np.asarray(nib.load(folder / "image_1.nii.gz").dataobj, dtype=np.float64)
    lab = np.asarray(nib.load(folder / "label_1.nii.gz").dataobj)
    liver = [z for z in range(lab.shape[-1]) if (lab[..., z] == LIVER).any()]
    picks = sorted({liver[int((2 * i + 1) / (2 * n_parts) * len(liver))] for i in range(n_parts)})
    vol = (vol - vol.mean()) / vol.std()
    return picks, torch.as_tensor(vol[..., picks], dtype=torch.float32).permute(2, 0, 1)[:, None].repeat(1, 3, 1, 1)


def test_freeze_command_writes_a_bundle_monai_can_check_export_and_run(tiny_scans, tmp_path):
    torch.set_num_threads(1)
    method = _method("adnet")
    with torch.no_grad():
        next(method.parameters()).mul_(1.5)  # weights the default initialisation would not give
    ckpt = torch_save({"model": method.state_dict()}, tmp_path / "adnet.pt")  # wrapped, as ignite saves
    out = tmp_path / "liver_adnet"
    assert fsmis_main(["freeze", "--bundle", str(REPO / "bundles" / "adnet"), "--ckpt_path", str(ckpt),
                       "--support-image", str(tiny_scans / "image_1.nii.gz"),
                       "--support-label", str(tiny_scans / "label_1.nii.gz"), "--class", "liver",
                       "--output", str(out), "--protocol", "ep1", "--set", 'encoder="small"']) == 0
    for f in ("LICENSE", "docs/README.md", "configs/metadata.json", "configs/inference.json", "models/model.pt",
              "models/data_contract.json"):
        assert (out / f).is_file(), f
    from fsmis_monai.data.contract import load_contract

    assert load_contract(out / "models" / "model.pt").dataset == "chaos_mr_t2"  # copied: queries prepared alike
    meta, config = str(out / "configs" / "metadata.json"), str(out / "configs" / "inference.json")
    shutil.copy(SCHEMA, tmp_path / SCHEMA.name)
    verify_metadata(meta_file=meta, filepath=str(tmp_path / SCHEMA.name))
    inputs = json.loads((out / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]
    assert inputs.keys() == {"image"}

    # the stored support is the ep1 picks of the support scan, encoded by the checkpoint's network
    picks, support_images = _expected_support(tiny_scans, 3)
    lab = np.asarray(nib.load(tiny_scans / "label_1.nii.gz").dataobj)
    support_masks = torch.as_tensor(np.stack([lab[..., z] == LIVER for z in picks]), dtype=torch.float32)
    state = torch_load(out / "models" / "model.pt")
    with torch.no_grad():
        expected_proto = method.encode_support(support_images, support_masks)["prototype"]
    torch.testing.assert_close(state["support_prototype"], expected_proto, atol=1e-4, rtol=1e-4)

    common = dict(meta_file=meta, config_file=config, bundle_root=str(out))
    verify_net_in_out(net_id="network_def", device="cpu", **common)
    spec = json.loads(Path(config).read_text())["network_def"]["support_spec"]
    frozen = FrozenFewShotSegmenter(_method("adnet"), spec)
    frozen.load_state_dict(state)
    queries = _queries(tiny_scans, 1)
    with torch.no_grad():
        eager = frozen.eval()(queries)
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(out / "models" / "model.pt"),
                use_trace=True, input_shape=[1, 3, 64, 64], **common)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "model.ts"))(queries), eager, atol=1e-5, rtol=0)
    import onnx  # extras "export" and "dev"
    from onnx.reference import ReferenceEvaluator

    onnx_export(net_id="network_def", filepath=str(tmp_path / "model.onnx"), ckpt_file=str(out / "models" / "model.pt"),
                use_trace=True, input_shape=[1, 3, 64, 64], converter_kwargs={"dynamo": False}, **common)
    graph = onnx.load(str(tmp_path / "model.onnx"))
    (logits,) = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: queries.numpy()})
    np.testing.assert_allclose(logits, eager.numpy(), atol=1e-4, rtol=0)

    # inference on a query volume with its own geometry: same voxels as the source bundle's few-shot inference
    queries_dir = tmp_path / "queries"
    src = nib.load(tiny_scans / "image_2.nii.gz")
    affine = src.affine.copy()
    affine[:3, 3] += (4.0, -3.0, 2.0)
    save_nifti(queries_dir / "patient_b.nii.gz", np.asarray(src.dataobj), affine=affine)
    frozen_wf = ConfigWorkflow(config_file=config, meta_file=meta, workflow_type="infer", bundle_root=str(out),
                               dataset_dir=str(queries_dir), output_dir=str(tmp_path / "frozen_pred"),
                               device="$torch.device('cpu')")
    source_wf = ConfigWorkflow(config_file=str(REPO / "bundles/adnet/configs/inference.json"),
                               meta_file=str(REPO / "bundles/adnet/configs/metadata.json"), workflow_type="infer",
                               bundle_root=str(REPO / "bundles/adnet"), encoder="small", ckpt_path=str(ckpt),
                               dataset_dir=str(queries_dir), output_dir=str(tmp_path / "source_pred"),
                               support_image=str(tiny_scans / "image_1.nii.gz"), n_support_slices=3,
                               support_label=str(tiny_scans / "label_1.nii.gz"), support_class="liver",
                               device="$torch.device('cpu')")
    for wf in (frozen_wf, source_wf):
        wf.initialize()
        assert wf.check_properties() == []
        wf.run()
        wf.finalize()
    # the same oracle-free whole-scan steps with the same support prior (stored as numbers in the frozen config)
    frozen_config = json.loads(Path(config).read_text())
    assert frozen_config["whole_scan_steps"] == list(DEFAULT_STEPS) == source_wf.parser.get_parsed_content("whole_scan_steps")
    assert frozen_config["support_prior"] == source_wf.parser.get_parsed_content("support_prior") == load_support_prior(
        tiny_scans / "image_1.nii.gz", tiny_scans / "label_1.nii.gz", "liver", load_contract(out / "models" / "model.pt"))
    pred = nib.load(tmp_path / "frozen_pred" / "patient_b_seg.nii.gz")
    assert pred.shape == src.shape and np.allclose(pred.affine, affine)
    reference = np.asarray(nib.load(tmp_path / "source_pred" / "patient_b_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(np.asarray(pred.dataobj), reference)
    for folder in ("frozen_pred", "source_pred"):  # both inference.json write overlay PNGs beside the NIfTI
        overlay = plt.imread(tmp_path / folder / "patient_b_overlay.png")
        assert overlay.ndim == 3 and min(overlay.shape[:2]) > 100


def test_overlay_slices_are_the_largest_predictions():
    rng = np.random.default_rng(0)
    pred = rng.random((16, 16, 7)) > 0.8
    pred[..., 5] = False
    area = [int(pred[..., z].sum()) for z in range(7)]
    largest = sorted(sorted(range(7), key=lambda z: -area[z])[:3])
    assert overlay_slices(pred, 3) == largest
    assert overlay_slices(np.zeros((4, 4, 6)), 3) == [3]  # nothing predicted: the middle slice


def test_freeze_refuses_bad_inputs(tiny_scans, tmp_path, capsys):
    kwargs = dict(support_image=tiny_scans / "image_1.nii.gz", support_label=tiny_scans / "label_1.nii.gz",
                  support_class="liver", overrides={"encoder": "small"})
    from fsmis_monai.commands.freeze import freeze_bundle

    wrong = torch_save(_method("ssl_alpnet").state_dict(), tmp_path / "alpnet.pt")
    with pytest.raises(FsmisInputError, match="alpnet.pt: does not fit the adnet network"):
        freeze_bundle(REPO / "bundles" / "adnet", output=tmp_path / "a", ckpt_path=wrong, **kwargs)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FsmisInputError, match="already exists"):
        freeze_bundle(REPO / "bundles" / "adnet", output=tmp_path / "exists", ckpt_path=wrong, **kwargs)
    ok = torch_save(_method("adnet").state_dict(), tmp_path / "adnet.pt")
    with pytest.raises(FsmisInputError, match="support class 4: no voxel has that class"):
        freeze_bundle(REPO / "bundles" / "adnet", output=tmp_path / "b", ckpt_path=ok,
                      **{**kwargs, "support_class": 4})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    argv = ["freeze", "--bundle", str(REPO / "bundles" / "adnet"), "--ckpt_path", str(ok), "--support-image",
            str(kwargs["support_image"]), "--support-label", str(kwargs["support_label"]),
            "--output", str(tmp_path / "c"), "--set", 'encoder="small"', "--class", "pancreas"]
    assert fsmis_main(argv) == 1  # the command reports the unknown class instead of a traceback
    assert "pancreas" in capsys.readouterr().err and not (tmp_path / "c").exists()

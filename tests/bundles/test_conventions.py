"""The MONAI model zoo's bundle checks (its CI ``verify_bundle.py`` / ``verify_properties.py``), re-implemented
for EVERY bundle in ``bundles/``:

- directory: ``LICENSE``, ``configs/metadata.json``, an inference config and ``docs/README.md``;
- version: ``version`` present in ``changelog``; metadata valid against the zoo's schema (offline copy);
- large files: nothing over ``MAX_FILE_BYTES`` and no weights in the bundle folder (the zoo ships them
  through ``large_files.yml``; here ``models/*.pt`` is git-ignored);
- config keys the zoo and MONAI's workflow properties rely on (``bundle_root``, ``device``, ``dataset_dir``,
  ``network_def``, ``inferer``, ...), and ``check_properties()`` clean for train and inference
  (``ConfigWorkflow`` on two real CHAOS scans cut to 64 x 64 x 8);
- data shape and TorchScript: the zoo runs ``verify_net_in_out`` and ``ckpt_export`` on ``network_def``.
  A few-shot method takes (support images, support masks, query) and a dict of losses, so, like the zoo's
  multi-input bundles, it is checked in its single-input form: the bundle frozen with ``fsmis freeze`` on a
  tiny checkpoint (small encoder, random weights), then ``verify_net_in_out`` and ``ckpt_export``
  (``use_trace``) on that bundle, and the TorchScript module loads and reproduces the eager logits (1e-5);
  ``onnx_export`` too (graph checked by ``onnx.checker``; logits of ONNX's reference evaluator within
  1e-4 abs + 1e-4 rel, NumPy float32 sums; not for LSLPN's graph, which that evaluator cannot run).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import onnx
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, onnx_export, verify_metadata, verify_net_in_out
from onnx.reference import ReferenceEvaluator

from fsmis_monai.commands.freeze import freeze_bundle, method_definition
from fsmis_monai.bundles import CPU_OVERRIDES
from fsmis_monai.engines import ensure_pseudolabels
from fsmis_monai.export import FrozenFewShotSegmenter
from fsmis_monai.io import torch_load, torch_save

from _real_scans import liver_window

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO.parent / "shared" / "monai" / "meta_schema_20240725.json"
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs").is_dir())
MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_SHIPPED_WEIGHTS_BYTES = 15 * 1024 * 1024
ZOO_FILES = ("LICENSE", "configs/metadata.json", "configs/inference.json", "docs/README.md")
# ids MONAI's TrainProperties / InferProperties and the zoo's bundle conventions look up
COMMON_KEYS = ("bundle_root", "device", "dataset_dir", "network_def", "network", "ckpt_path")
TRAIN_KEYS = COMMON_KEYS + ("inferer", "optimizer", "train#trainer", "train#dataset", "train#dataloader",
                            "train#handlers", "train#trainer#max_epochs", "initialize", "run", "finalize")
CHECKPOINT_LOADERS = ("CheckpointLoader", "fsmis_monai.engines.TrainingCheckpoints")
INFER_KEYS = COMMON_KEYS + ("inferer", "dataset", "preprocessing", "postprocessing", "evaluator", "handlers",
                            "initialize", "run")


def test_every_bundle_is_checked():
    assert set(BUNDLES) == {"ssl_alpnet", "adnet", "qnet", "lslpn", "gmrd", "pami", "difd"}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_directory_version_metadata_and_file_sizes(bundle, tmp_path):
    root = REPO / "bundles" / bundle
    missing = [f for f in ZOO_FILES if not (root / f).is_file()]
    assert not missing, f"{bundle}: missing {missing}"
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"], f"{bundle}: version {meta['version']} not in changelog"
    shutil.copy(SCHEMA, tmp_path / SCHEMA.name)  # verify_metadata downloads the schema unless it exists there
    verify_metadata(meta_file=str(root / "configs" / "metadata.json"), filepath=str(tmp_path / SCHEMA.name))
    # what would be published: tracked files plus untracked ones that .gitignore does not exclude
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", str(root)], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split()
    assert listed, f"{bundle}: git lists no file"
    # weights travel only as the measured files the metadata announces (key_metrics, issue 21), each < 15 MB
    shipped = {f"bundles/{bundle}/{m['file']}" for m in meta.get("key_metrics", {}).values()}
    sizes = {f: (REPO / f).stat().st_size for f in listed if (REPO / f).is_file()}
    assert not [f for f, s in sizes.items() if s > (MAX_SHIPPED_WEIGHTS_BYTES if f in shipped else MAX_FILE_BYTES)], sizes
    weights = [f for f in listed if f.endswith((".pt", ".ts", ".onnx", ".pth", ".ckpt"))]
    assert not [f for f in weights if f not in shipped], listed
    assert shipped <= set(weights), f"{bundle}: metadata announces weights that are not there: {shipped - set(weights)}"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_config_keys_the_zoo_expects(bundle):
    configs = REPO / "bundles" / bundle / "configs"
    for name, keys in (("train.json", TRAIN_KEYS), ("inference.json", INFER_KEYS)):
        parser = ConfigParser()
        parser.read_config(str(configs / name))
        missing = [k for k in keys if k not in parser]
        assert not missing, f"{bundle}/{name}: missing {missing}"
        assert parser["bundle_root"] == "."  # relative: the bundle works wherever it is unpacked (--bundle_root)
        assert isinstance(parser.get_parsed_content("device"), torch.device)  # resolves on a CPU-only machine
        handlers = parser.get("handlers" if name == "inference.json" else "train#handlers")
        loaders = [h for h in handlers if h.get("_target_") in CHECKPOINT_LOADERS]
        assert loaders and all("map_location" in h for h in loaders), f"{bundle}/{name}: checkpoints must load on CPU"


@pytest.fixture(scope="module")
def tiny(chaos_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conventions")
    liver_window(chaos_dir, root / "data", (1, 2))
    ensure_pseudolabels(root / "data", root / "supervoxels", "supervoxels", "chaos", min_size=300)
    ensure_pseudolabels(root / "data", root / "superpixels", "superpixels", "chaos")
    return root


@pytest.mark.parametrize("bundle", BUNDLES)
def test_check_properties_train_and_inference(bundle, tiny, tmp_path):
    configs = REPO / "bundles" / bundle / "configs"
    data = tiny / "data"
    kind = "superpixels" if bundle == "ssl_alpnet" else "supervoxels"
    overrides = {
        "train.json": {"dataset_dir": str(data), "pseudolabel_dir": str(tiny / kind), "generate_pseudolabels": False,
                       "fold": None, **CPU_OVERRIDES, "image_size": 64, "num_workers": 0,
                       "output_dir": str(tmp_path), "ckpt_path": str(tmp_path / "model.pt")},
        "inference.json": {"dataset_dir": str(data), "encoder": "small", "support_image": str(data / "image_1.nii.gz"),
                           "support_label": str(data / "label_1.nii.gz"), "image_size": 64},
    }
    for name, workflow_type in (("train.json", "train"), ("inference.json", "infer")):
        wf = ConfigWorkflow(config_file=str(configs / name), meta_file=str(configs / "metadata.json"),
                            logging_file=str(configs / "logging.conf"), workflow_type=workflow_type,
                            bundle_root=str(configs.parent), **overrides[name])
        wf.initialize()
        assert wf.check_properties() == [], f"{bundle}/{name}"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_data_shape_torchscript_and_onnx_export_of_the_frozen_bundle(bundle, tiny, tmp_path):
    torch.set_num_threads(1)
    data = tiny / "data"
    overrides = {"encoder": "small", "image_size": 64}
    method_def, _ = method_definition(REPO / "bundles" / bundle, overrides)
    network = ConfigParser({"net": method_def}).get_parsed_content("net")
    ckpt = torch_save(network.state_dict(), tmp_path / "tiny.pt")
    frozen_dir = freeze_bundle(REPO / "bundles" / bundle, data / "image_1.nii.gz", data / "label_1.nii.gz", "liver",
                               tmp_path / "frozen", ckpt_path=ckpt, protocol="ep2", refine=False, overrides=overrides)
    common = dict(meta_file=str(frozen_dir / "configs" / "metadata.json"),
                  config_file=str(frozen_dir / "configs" / "inference.json"), bundle_root=str(frozen_dir))
    export = dict(net_id="network_def", ckpt_file=str(frozen_dir / "models" / "model.pt"), use_trace=True,
                  input_shape=[1, 3, 64, 64], **common)
    verify_net_in_out(net_id="network_def", device="cpu", **common)
    ckpt_export(filepath=str(tmp_path / "model.ts"), **export)
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    spec = json.loads((frozen_dir / "configs" / "inference.json").read_text())["network_def"]["support_spec"]
    eager = FrozenFewShotSegmenter(network, spec, refine=False)
    eager.load_state_dict(torch_load(frozen_dir / "models" / "model.pt"))
    vol = np.asarray(nib.load(data / "image_2.nii.gz").dataobj, dtype=np.float64)
    query = torch.as_tensor((vol[..., 4] - vol.mean()) / vol.std(), dtype=torch.float32)[None, None].repeat(1, 3, 1, 1)
    with torch.no_grad():
        expected = eager.eval()(query)
        torch.testing.assert_close(scripted(query), expected, atol=1e-5, rtol=0)
    onnx_export(filepath=str(tmp_path / "model.onnx"), converter_kwargs={"dynamo": False}, **export)
    graph = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(graph)
    if bundle != "lslpn":  # onnx.reference cannot run LSLPN's graph ("at most 64 array objects", a NumPy limit)
        (logits,) = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: query.numpy()})
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)

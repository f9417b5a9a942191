"""MONAI Label app: one few-shot infer task per chosen fsmis-monai bundle.

``monailabel start_server --app apps/monailabel --studies <folder of NIfTI scans> --conf bundle <names or paths>``

``--conf`` keys (MONAI Label passes them as strings):

- ``bundle``: comma-separated bundle names (``bundles/<name>`` of this project, e.g. ``qnet,adnet``) or folders;
  default :data:`DEFAULT_BUNDLE`. Task names: ``fsmis_<bundle folder name>``.
- ``ckpt_path``: weights (one bundle only); default each bundle's ``models/model.pt``.
- ``frozen``: comma-separated folders written by ``fsmis freeze`` that requests may use (``params.frozen``).
- ``set``: JSON object of ``inference.json`` keys for every request, e.g. ``{"encoder": "small"}`` for weights
  trained with the small encoder, ``{"device": "$torch.device('cpu')"}``.

See the README section "Paint one slice in 3D Slicer (MONAI Label app)".
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # MONAI Label imports main.py by path

from lib.infers.fewshot import FewShotInfer  # noqa: E402

from fsmis_monai.engines.inference import model_contract  # noqa: E402
from fsmis_monai.io import FsmisInputError  # noqa: E402
from fsmis_monai.resources import shipped_dir  # noqa: E402

logger = logging.getLogger(__name__)
TASK_PREFIX = "fsmis_"
#: the bundle served without ``--conf bundle``: the shipped weights that segment best from a painted slice
#: (bench/RESULTS.md "MONAI Label app": Q-Net 0.818 organ-slice Dice, SSL-ALPNet 0.780, copy floor 0.694)
DEFAULT_BUNDLE = "qnet"


def bundle_folder(name: str) -> Path:
    """A bundle folder from a name of this project's bundles or a path; one-line error otherwise."""
    path = Path(name).expanduser()
    if not (path / "configs" / "inference.json").is_file():
        path = shipped_dir("bundles") / name
    if not (path / "configs" / "inference.json").is_file():
        raise FsmisInputError(f"--conf bundle {name!r}: neither a bundle folder nor one of "
                              f"{sorted(p.name for p in shipped_dir('bundles').iterdir() if not p.name.startswith('_'))}")
    return path.resolve()


class FewShotApp(MONAILabelApp):
    """Serves :class:`lib.infers.fewshot.FewShotInfer` for each bundle of ``--conf bundle``."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        self.bundles = [bundle_folder(b.strip()) for b in conf.get("bundle", DEFAULT_BUNDLE).split(",") if b.strip()]
        ckpt = conf.get("ckpt_path")
        if ckpt and len(self.bundles) != 1:
            raise FsmisInputError("--conf ckpt_path names the weights of one bundle; give one bundle with it")
        self.weights = {b: Path(ckpt).expanduser().resolve() if ckpt else b / "models" / "model.pt"
                        for b in self.bundles}
        for b, w in self.weights.items():
            if not w.is_file():
                raise FsmisInputError(f"{w}: no weights for bundle {b.name}; train it or give --conf ckpt_path")
        self.frozen = [Path(f.strip()).expanduser().resolve() for f in conf.get("frozen", "").split(",") if f.strip()]
        for f in self.frozen:
            if not (f / "configs" / "inference.json").is_file():
                raise FsmisInputError(f"--conf frozen {f}: not a bundle written by fsmis freeze "
                                      "(configs/inference.json missing)")
        try:
            self.overrides = json.loads(conf.get("set", "{}"))
        except json.JSONDecodeError as e:
            raise FsmisInputError(f"--conf set: not a JSON object ({e})") from e
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="fsmis-monai few-shot segmentation",
                         description="Paint an organ on one slice, get it in the whole scan (few-shot bundles)",
                         version="0.1.0")

    def init_infers(self) -> Dict[str, InferTask]:
        tasks: Dict[str, InferTask] = {}
        for bundle in self.bundles:
            contract = model_contract(self.weights[bundle], self._dataset(bundle))
            names = [n for c, n in sorted(contract.class_names.items()) if c != 0] or ["organ"]
            tasks[TASK_PREFIX + bundle.name] = FewShotInfer(bundle, self.weights[bundle], self.overrides,
                                                            self.datastore, labels=names, frozen=self.frozen)
        return tasks

    @staticmethod
    def _dataset(bundle: Path) -> Any:
        """The bundle's ``dataset_name`` (class names shown in Slicer); a frozen bundle has none."""
        config = json.loads((bundle / "configs" / "inference.json").read_text())
        return config.get("dataset_name")

    def infer(self, request: Dict[str, Any], datastore: Any = None) -> Dict[str, Any]:
        """MONAI Label's ``infer`` with an unknown image id refused as HTTP 404 (it would reach the task as
        an empty path)."""
        image = request.get("image")
        store = datastore if datastore else self.datastore()
        if isinstance(image, str) and not os.path.exists(image):
            if not store.get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"image {image!r}: no such image in the datastore")
            request = {**request, "image_id": image}  # MONAI Label replaces "image" by the file; the task names it
        return super().infer(request, datastore)

    def batch_infer(self, request: Dict[str, Any], datastore: Any = None) -> Dict[str, Any]:
        """MONAI Label's batch infer, on a machine without GPU defaulting to ``multi_gpu`` false and ``device``
        cpu (MONAI Label 0.8.5 divides by the GPU count otherwise: an HTTP 500 without a reason)."""
        import torch

        if not torch.cuda.is_available():
            request = {"multi_gpu": False, "device": "cpu", **request}
        return super().batch_infer(request, datastore)

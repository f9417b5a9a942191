"""Few-shot inference on a user's own volumes with MONAI's ``SupervisedEvaluator`` (a bundle's inference.json).

Every volume (support and queries) is prepared by the trained model's data contract
(:mod:`fsmis_monai.data.contract`: orientation, spacing, label map, intensity, in-plane fit, the pipeline
training and evaluation use), and predictions go back to each query file's own geometry with ``Invertd``
(:func:`prediction_postprocessing`). The support set comes from an annotated NIfTI (image + label + class,
by name or raw label value): its labelled slices are picked
as the evaluation protocols pick them (the centres of ``n_support_slices`` equal parts of the organ,
:func:`fsmis_monai.evaluation.protocols.fraction_picks`) and used together as a k-shot support.
:class:`FewShotVolumeInferer` is a MONAI ``Inferer``: for every query volume it encodes the support with the
network's current weights (so a ``CheckpointLoader`` that runs at ``STARTED`` is honoured) and segments
each axial slice through the evaluation's slice inferer. The query keeps its MetaTensor geometry and
transform trace, so ``Invertd`` and ``SaveImaged`` write the prediction on the query file's grid.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from monai.data import MetaTensor, NibabelWriter
from monai.inferers import Inferer
from monai.transforms import (
    AsDiscreted,
    Compose,
    Invertd,
    KeepLargestConnectedComponentd,
    RepeatChanneld,
    SaveImaged,
)
from torch import nn

from fsmis_monai.data.contract import DataContract, build_pipeline, load_contract, loader, resolve_support_class
from fsmis_monai.io import FsmisInputError, atomic_path


def support_slices(
    image: str | Path,
    label: str | Path,
    support_class: int | str,
    n_support_slices: Optional[int] = 1,
    contract: Optional[DataContract] = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Support images ``[K, 3, H, W]``, masks ``[K, H, W]`` and the picked slice indices (in the contract's
    grid), from an annotated scan prepared by the data contract's pipeline (labels nearest, as training).

    ``support_class``: a class name of the contract's dataset or a raw label value as stored in ``label``
    (e.g. 200 for the released MS-CMRSeg myocardium); without a dataset (``contract.label_map`` None) any raw
    value of the user's own masks (e.g. 255). ``n_support_slices`` None: every slice holding the class (a mask
    painted on a few slices, as the MONAI Label app sends it). Errors name the file, the values found and the
    classes known.
    """
    from fsmis_monai.evaluation.protocols import class_slices, fraction_picks

    contract = contract if contract is not None else DataContract()
    d = loader(["image", "label"])({"image": str(image), "label": str(label)})
    if d["image"].ndim != 4 or d["label"].shape[1:] != d["image"].shape[1:]:
        raise FsmisInputError(f"{label}: label shape {tuple(d['label'].shape[1:])} does not match image {image} "
                              f"shape {tuple(d['image'].shape[1:])} (3D)")
    d["label"].affine = d["image"].affine.clone()  # one grid: the image's
    values = torch.unique(d["label"].as_tensor()).tolist()
    kind, value = resolve_support_class(contract, support_class, label, values)
    own = contract.label_map is None
    out = build_pipeline(contract, "image", None if own else "label", ["label"] if own else [], load=False)(d)
    mask = out["label"][0].as_tensor() == value
    zs = class_slices(mask.numpy())
    if zs.size == 0:  # the class vanished on the contract's grid (a sliver removed by resampling)
        raise FsmisInputError(f"{label}: class {support_class!r} covers no voxel after resampling to the model's "
                              f"grid (values found: {[int(v) for v in values]})")
    n_support_slices = len(zs) if n_support_slices is None else n_support_slices
    if int(n_support_slices) > len(zs):
        warnings.warn(f"{label}: {n_support_slices} support slices asked, class {support_class} is on {len(zs)} "
                      f"slices; using those {len(zs)}")
    picks = sorted({int(zs[i]) for i in fraction_picks(len(zs), min(int(n_support_slices), len(zs)))})
    volume = out["image"][0].as_tensor()
    images = torch.stack([volume[..., z] for z in picks])[:, None].repeat(1, 3, 1, 1)
    masks = torch.stack([mask[..., z].float() for z in picks])
    return images.float(), masks, picks


def load_support(
    image: str | Path,
    label: str | Path,
    support_class: int | str,
    n_support_slices: Optional[int] = 1,
    dataset: Optional[str] = None,
    contract: Optional[DataContract] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Support images ``[K, 3, H, W]`` and masks ``[K, H, W]`` (:func:`support_slices`). ``contract`` (the
    trained model's) wins; without it, ``dataset``'s label map at the stored grid with a per-volume z-score."""
    if contract is None:
        contract = DataContract.for_dataset(dataset)
    return support_slices(image, label, support_class, n_support_slices, contract)[:2]


def model_contract(ckpt_path: Optional[str | Path], dataset: Optional[str] = None,
                   **defaults: Any) -> DataContract:
    """The data contract saved beside ``ckpt_path``, reading label files of ``dataset`` (``None``: a user's
    own masks, any raw value). Weights saved without a contract get the stored grid with ``defaults``
    (e.g. ``normalization``), as inference worked before contracts."""
    fallback = DataContract.for_dataset(dataset, **defaults)
    contract = fallback if ckpt_path is None else load_contract(ckpt_path, default=fallback)
    return contract.with_labels_of(dataset)


def query_preprocessing(contract: DataContract, channels: int = 1) -> Compose:
    """The query volumes' transforms: the contract's pipeline (:func:`build_pipeline`), the single channel
    repeated to ``channels`` for networks that take 3 (a frozen bundle)."""
    pipeline = build_pipeline(contract, "image")
    return pipeline if channels == 1 else Compose([pipeline, RepeatChanneld("image", repeats=channels)])


#: postfix of every written prediction, ``<name>_seg.nii.gz`` (the model zoo's convention), for the training
#: bundles' inference and the frozen bundles of ``fsmis freeze`` alike
OUTPUT_POSTFIX = "seg"


def prediction_postprocessing(preprocessing: Compose, output_dir: str | Path, output_postfix: str = OUTPUT_POSTFIX,
                              keep_largest: bool = False, write_overlays: bool = True) -> Compose:
    """``pred`` logits ``[2, H, W, D]`` on the network's grid -> argmax -> ``Invertd`` back to the query file's
    own geometry (shape and affine of the input, nearest) -> optionally ``KeepLargestConnectedComponentd`` ->
    NIfTI written atomically (``<name>_<postfix>.nii.gz``) -> overlay PNG (the image inverted too)."""
    from fsmis_monai.transforms.overlays import SaveOverlayd

    keys = ["pred", "image"] if write_overlays else ["pred"]
    xforms: list = [
        AsDiscreted("pred", argmax=True),
        Invertd(keys, transform=preprocessing, orig_keys=["image"] * len(keys), nearest_interp=[True, False][:len(keys)],
                to_tensor=True),
    ]
    if keep_largest:
        xforms.append(KeepLargestConnectedComponentd("pred", applied_labels=[1]))
    xforms.append(SaveImaged("pred", output_dir=str(output_dir), output_postfix=output_postfix,
                             output_dtype=np.uint8, resample=False, separate_folder=False, print_log=False,
                             writer=AtomicNibabelWriter))
    if write_overlays:
        xforms.append(SaveOverlayd(["image", "pred"], output_dir=output_dir, n_slices=3))
    return Compose(xforms)


def _source(tensor: torch.Tensor) -> str:
    """The file a (batched) MetaTensor was read from, for error messages."""
    name = getattr(tensor, "meta", {}).get("filename_or_obj", "query volume")
    return str(name[0] if isinstance(name, (list, tuple)) and name else name)


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing through :func:`fsmis_monai.io.atomic_path` (``SaveImaged(writer=...)``):
    an interrupted inference leaves the previous prediction or none, never a truncated NIfTI."""

    def write(self, filename: Any, verbose: bool = False, **obj_kwargs: Any) -> None:
        with atomic_path(filename) as tmp:
            super().write(tmp, verbose=verbose, **obj_kwargs)


class FewShotVolumeInferer(Inferer):
    """``inferer(volume [B, 1, H, W, D], network) -> logits [B, 2, H, W, D]`` against a fixed support set.

    Args:
        support_images: ``[K, 3, H, W]`` (e.g. from :func:`load_support`).
        support_masks: ``[K, H, W]``.
        sw_batch_size: query slices per ``segment`` call.
    """

    def __init__(self, support_images: torch.Tensor, support_masks: torch.Tensor, sw_batch_size: int = 8) -> None:
        from fsmis_monai.evaluation.inferer import FewShotSliceInferer

        super().__init__()
        self.support_images = support_images
        self.support_masks = support_masks
        self.slices = FewShotSliceInferer(sw_batch_size=sw_batch_size)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        from fsmis_monai.engines.checkpoints import unwrap

        if inputs.dim() != 5 or inputs.shape[1] not in (1, 3):
            raise FsmisInputError(f"{_source(inputs)}: expected query volumes [B, 1, H, W, D] (3D scans), got shape "
                                  f"{tuple(inputs.shape)}")
        method = unwrap(network)
        was_training = method.training
        method.eval()
        try:
            state = self.slices.encode(method, self.support_images, self.support_masks)
            outs = []
            for volume in inputs:
                queries = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
                if not torch.isfinite(queries).all():  # NaN would silently become background after argmax
                    raise FsmisInputError(f"{_source(volume)}: query volume contains NaN or infinite values")
                queries = queries.expand(3, *queries.shape[1:]) if queries.shape[0] == 1 else queries
                outs.append(self.slices(method, queries, state).to(inputs.device))
        finally:
            method.train(was_training)
        logits = torch.stack(outs)
        if isinstance(inputs, MetaTensor):  # keep the query's geometry and file name for SaveImaged
            logits = MetaTensor(logits)
            logits.copy_meta_from(inputs, copy_attr=True)
        return logits

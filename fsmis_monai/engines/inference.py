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

import logging
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from monai.data import FolderLayout, MetaTensor, NibabelWriter
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


def prepared_support(
    image: str | Path,
    label: str | Path,
    support_class: int | str,
    contract: Optional[DataContract] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The annotated support scan prepared by the data contract's pipeline (labels nearest, as training):
    intensities ``[H, W, D]`` and the class's binary mask ``[H, W, D]`` on the model's grid.

    ``support_class``: a class name of the contract's dataset or a raw label value as stored in ``label``
    (e.g. 200 for the released MS-CMRSeg myocardium); without a dataset (``contract.label_map`` None) any raw
    value of the user's own masks (e.g. 255). Errors name the file, the values found and the classes known.
    """
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
    if not mask.any():  # the class vanished on the contract's grid (a sliver removed by resampling)
        raise FsmisInputError(f"{label}: class {support_class!r} covers no voxel after resampling to the model's "
                              f"grid (values found: {[int(v) for v in values]})")
    return out["image"][0].as_tensor(), mask


def support_slices(
    image: str | Path,
    label: str | Path,
    support_class: int | str,
    n_support_slices: Optional[int] = 1,
    contract: Optional[DataContract] = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Support images ``[K, 3, H, W]``, masks ``[K, H, W]`` and the picked slice indices (in the contract's
    grid), from an annotated scan prepared by :func:`prepared_support`. ``n_support_slices`` None: every slice
    holding the class (a mask painted on a few slices, as the MONAI Label app sends it)."""
    from fsmis_monai.evaluation.protocols import class_slices, fraction_picks

    volume, mask = prepared_support(image, label, support_class, contract)
    zs = class_slices(mask.numpy())
    n_support_slices = len(zs) if n_support_slices is None else n_support_slices
    if int(n_support_slices) > len(zs):
        warnings.warn(f"{label}: {n_support_slices} support slices asked, class {support_class} is on {len(zs)} "
                      f"slices; using those {len(zs)}")
    picks = sorted({int(zs[i]) for i in fraction_picks(len(zs), min(int(n_support_slices), len(zs)))})
    images = torch.stack([volume[..., z] for z in picks])[:, None].repeat(1, 3, 1, 1)
    masks = torch.stack([mask[..., z].float() for z in picks])
    return images.float(), masks, picks


def load_support_prior(
    image: str | Path,
    label: str | Path,
    support_class: int | str,
    contract: Optional[DataContract] = None,
) -> dict[str, float]:
    """The support's :class:`~fsmis_monai.transforms.whole_scan.SupportPrior` (organ position relative to the
    body's extent, largest relative area) as a plain dict, for the whole-scan steps of ``inference.json`` and
    the config of a frozen bundle."""
    from fsmis_monai.transforms.whole_scan import SupportPrior

    volume, mask = prepared_support(image, label, support_class, contract)
    return SupportPrior.from_volume(volume.numpy(), mask.numpy(), str(label)).to_dict()


def load_painted_support(
    image: str | Path,
    label: str | Path,
    support_class: int | str,
    contract: Optional[DataContract] = None,
) -> dict[str, Any]:
    """For the ``anchor`` whole-scan step: ``{"image": the support scan's path (links resolved), "mask": its
    class mask, bool ``[H, W, D]`` on the model's grid}`` (:func:`prepared_support`). A query read from that
    same file (the MONAI Label app's painted scan) keeps the label on the labelled slices and only the
    components touching it (:func:`fsmis_monai.transforms.whole_scan.anchored_components`)."""
    _, mask = prepared_support(image, label, support_class, contract)
    return {"image": str(Path(image).resolve()), "mask": mask.numpy().astype(bool)}


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
#: extension of the written predictions (NIfTI, gzipped)
OUTPUT_EXT = ".nii.gz"
#: NIfTI header ``descrip`` of every prediction :class:`AtomicNibabelWriter` writes: a later run over the same
#: folder (``output_dir`` = ``dataset_dir``) knows its own outputs and never segments them as queries
PREDICTION_MARK = b"fsmis-monai prediction"


def prediction_layout(output_dir: str | Path, data_root_dir: str | Path = "", postfix: str = OUTPUT_POSTFIX,
                      extension: str = OUTPUT_EXT, makedirs: bool = True) -> FolderLayout:
    """Where the output of a query goes: MONAI's ``FolderLayout`` (the one ``SaveImaged`` uses), with the
    query's folder below ``data_root_dir`` kept under ``output_dir``: ``<root>/p2/image.nii.gz`` ->
    ``<output_dir>/p2/image_<postfix><extension>``. Prediction NIfTIs, overlay PNGs and the query datalist's
    collision check (:func:`query_datalist`) all name outputs with it."""
    return FolderLayout(str(output_dir), postfix=postfix, extension=extension, parent=False, makedirs=makedirs,
                        data_root_dir=str(data_root_dir))


def prediction_postprocessing(preprocessing: Compose, output_dir: str | Path, output_postfix: str = OUTPUT_POSTFIX,
                              keep_largest: bool = False, write_overlays: bool = True,
                              data_root_dir: str | Path = "", whole_scan_steps: Optional[Sequence[str]] = (),
                              support_prior: Optional[Mapping[str, float]] = None,
                              painted_support: Optional[Mapping[str, Any]] = None) -> Compose:
    """``pred`` logits ``[2, H, W, D]`` on the network's grid -> the oracle-free ``whole_scan_steps`` with the
    support's prior (:class:`fsmis_monai.transforms.whole_scan.WholeScanStepsd`; ``[]``: none; ``anchor``
    with ``painted_support``, :func:`load_painted_support`) -> argmax ->
    ``Invertd`` back to the query file's own geometry (shape and affine of the input, nearest) -> optionally
    ``KeepLargestConnectedComponentd`` -> NIfTI written atomically (``<name>_<postfix>.nii.gz``, header marked
    :data:`PREDICTION_MARK`) -> overlay PNG (the image inverted too). ``data_root_dir`` (the query folder):
    sub-folders of the queries are kept under ``output_dir`` (:func:`prediction_layout`), so
    ``p2/image.nii.gz`` and ``p3/image.nii.gz`` get a prediction each."""
    from fsmis_monai.transforms.overlays import SaveOverlayd
    from fsmis_monai.transforms.whole_scan import WholeScanStepsd

    keys = ["pred", "image"] if write_overlays else ["pred"]
    xforms: list = [
        WholeScanStepsd("pred", prior=support_prior, steps=whole_scan_steps, painted=painted_support),
        AsDiscreted("pred", argmax=True),
        Invertd(keys, transform=preprocessing, orig_keys=["image"] * len(keys), nearest_interp=[True, False][:len(keys)],
                to_tensor=True),
    ]
    if keep_largest:
        xforms.append(KeepLargestConnectedComponentd("pred", applied_labels=[1]))
    xforms.append(SaveImaged("pred", output_ext=OUTPUT_EXT, output_dtype=np.uint8, resample=False, print_log=False,
                             writer=AtomicNibabelWriter,
                             folder_layout=prediction_layout(output_dir, data_root_dir, output_postfix)))
    if write_overlays:
        xforms.append(SaveOverlayd(["image", "pred"], n_slices=3,
                                   folder_layout=prediction_layout(output_dir, data_root_dir, "overlay", ".png")))
    return Compose(xforms)


def query_datalist(dataset_dir: str | Path, query_glob: str = "*.nii*", output_dir: Optional[str | Path] = None,
                   output_postfix: str = OUTPUT_POSTFIX) -> list[dict[str, str]]:
    """``[{"image": file}, ...]``: the query files of ``dataset_dir`` matching ``query_glob`` (sorted), for the
    ``datalist`` of every inference bundle (training bundles and ``fsmis freeze`` ones).

    One query, one prediction: each query's prediction path (:func:`prediction_layout` under ``output_dir``,
    sub-folders kept) must be its own and must not be another query. Predictions of earlier runs (NIfTI header
    marked :data:`PREDICTION_MARK`) are never queries, so ``output_dir`` may be the query folder. Everything is
    checked before anything is segmented or written.

    Raises:
        FsmisInputError: ``dataset_dir`` missing or not a folder; nothing matches (with a hint when the folder
            holds DICOM series, which must be converted to NIfTI first) or only earlier predictions; a match is
            a folder; a query outside ``dataset_dir`` (``..`` in the glob); two queries with one prediction path
            (``case.nii`` and ``case.nii.gz``), naming both; a query file another query's prediction would
            overwrite.
    """
    import glob
    import os

    root = Path(dataset_dir)
    if not root.is_dir():
        raise FsmisInputError(f"{root}: query folder " + ("is a file, not a folder" if root.exists() else "not found"))
    matches = sorted(glob.glob(os.path.join(str(root), query_glob)))
    folders = [m for m in matches if os.path.isdir(m)]
    if folders:
        raise FsmisInputError(f"{folders[0]}: is a folder, not a NIfTI file (matched by query_glob '{query_glob}')"
                              + _dicom_hint(Path(folders[0])))
    if not matches:
        raise FsmisInputError(f"{root}: no file matches '{query_glob}'" + _dicom_hint(root))
    queries = [m for m in matches if not _is_prediction(m)]  # earlier runs' outputs are never queries
    if not queries:
        raise FsmisInputError(f"{root}: every file matching '{query_glob}' ({len(matches)}) is a prediction of an "
                              "earlier run; no query left")
    layout = prediction_layout(root if output_dir is None else output_dir, root, output_postfix, makedirs=False)
    outputs: dict[str, str] = {}
    for query in queries:
        if os.path.relpath(query, root).startswith(os.pardir):
            raise FsmisInputError(f"{query}: query outside the query folder {root} (query_glob '{query_glob}')")
        out = os.path.normpath(str(layout.filename(subject=query)))
        if out in outputs:
            raise FsmisInputError(f"{outputs[out]}, {query}: two queries, one prediction path {out} (one would "
                                  "overwrite the other); rename one of them")
        outputs[out] = query
    for query in queries:
        owner = outputs.get(os.path.normpath(query))
        if owner is not None:
            raise FsmisInputError(f"{query}: the prediction of the query {owner} would overwrite it; choose another "
                                  "output_dir")
    if len(queries) < len(matches):
        logging.getLogger(__name__).info("%s: %d of the files matching %r are predictions of an earlier run, not "
                                         "queries", root, len(matches) - len(queries), query_glob)
    return [{"image": q} for q in queries]


def _is_prediction(path: str | Path) -> bool:
    """Whether ``path`` is a NIfTI written by :class:`AtomicNibabelWriter` (header ``descrip``)."""
    import nibabel as nib

    try:
        return nib.load(str(path)).header["descrip"].item() == PREDICTION_MARK
    except Exception:  # unreadable: not ours (the loader names the problem when it reads it as a query)
        return False


def _dicom_hint(folder: Path) -> str:
    """``"; ... holds DICOM ..."`` when ``folder`` or one of its first sub-folders holds DICOM files, else ``""``."""
    from fsmis_monai.transforms.checks import dicom_files

    try:
        candidates = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())[:20]
        series = [p for p in candidates if dicom_files(p)]
    except OSError:
        return ""
    if not series:
        return ""
    names = ", ".join(str(p) for p in series[:3]) + (" ..." if len(series) > 3 else "")
    return (f"; DICOM series found ({names}): convert each series to a NIfTI file first (e.g. "
            "`dcm2niix -z y -o OUT SERIES_FOLDER`, or SimpleITK's ImageSeriesReader), then point dataset_dir at them")


def _source(tensor: torch.Tensor) -> str:
    """The file a (batched) MetaTensor was read from, for error messages."""
    name = getattr(tensor, "meta", {}).get("filename_or_obj", "query volume")
    return str(name[0] if isinstance(name, (list, tuple)) and name else name)


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing through :func:`fsmis_monai.io.atomic_path` (``SaveImaged(writer=...)``):
    an interrupted inference leaves the previous prediction or none, never a truncated NIfTI. The header's
    ``descrip`` is :data:`PREDICTION_MARK`."""

    def write(self, filename: Any, verbose: bool = False, **obj_kwargs: Any) -> None:
        with atomic_path(filename) as tmp:
            super().write(tmp, verbose=verbose, **obj_kwargs)

    @classmethod
    def create_backend_obj(cls, data_array: Any, affine: Any = None, dtype: Any = None, **kwargs: Any) -> Any:
        image = super().create_backend_obj(data_array, affine=affine, dtype=dtype, **kwargs)
        image.header["descrip"] = PREDICTION_MARK  # a later run over the same folder knows it (query_datalist)
        return image


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

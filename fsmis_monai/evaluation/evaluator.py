"""Volumetric few-shot evaluation of one model on a dataset folder: folds, protocols, one shared prediction
pass, Dice accounting, reports and NIfTI predictions, resumable.

For every (fold, query scan, class) the requested protocols are planned (:mod:`.protocols`); the union of
their ``(support slices, query slice)`` pairs over all classes is predicted in one pass per query scan
(:func:`predict_query`): each query slice is encoded once for every class, support group and protocol,
each support group once per fold, and each protocol reads its slices from that pass. Finished query scans
are cached under ``<output_dir>/cases`` (written atomically after the scan's NIfTI and PNG outputs), so a
restarted run skips them and ends with the same report.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
from scipy.special import expit
from tqdm.auto import tqdm

from fsmis_monai.data.datalist import ScanFiles, pair_scans
from fsmis_monai.data.registry import DatasetDescriptor, get_dataset, get_fold
from fsmis_monai.data.contract import NORMALIZATIONS, DataContract
from fsmis_monai.data.volumes import IntensityStats, intensity_stats, load_volumes, volume_contract
from fsmis_monai.evaluation.inferer import FewShotSliceInferer
from fsmis_monai.evaluation.metrics import CaseResult, case_status, confusion_counts, dice_from_counts, summarize_cases
from fsmis_monai.evaluation.protocols import ProtocolPlan, SupportGroup, check_protocols, make_plan, merge_requests
from fsmis_monai.evaluation.report import box_plot, overlay_png, write_per_case_csv, write_summary
from fsmis_monai.io import FsmisInputError, read_json, save_nifti, write_json
from fsmis_monai.transforms.whole_scan import DEFAULT_STEPS, SupportPrior, WholeScanSteps

logger = logging.getLogger(__name__)

Normalization = Literal["volume", "global", "slice_minmax", "none"]
DEFAULT_PROTOCOLS = ("ep1", "whole")


@dataclass
class Scan:
    """A scan ready for evaluation: normalised image and canonical label [X, Y, Z] (slice z = ``[..., z]``,
    NIfTI / MONAI ``LoadImage`` order), and the affine its predictions are written with."""

    scan_id: int
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    path: Path


def load_scan(files: ScanFiles, desc: DatasetDescriptor, normalization: Normalization = "volume",
              stats: Optional[IntensityStats] = None, contract: Optional[DataContract] = None) -> Scan:
    """Read, check, remap and normalise a scan with the data contract's pipeline, the one training and
    inference use (:func:`fsmis_monai.data.contract.build_pipeline`).

    ``contract`` (the trained model's, :func:`fsmis_monai.data.contract.load_contract`) wins over
    ``normalization``/``stats``, which describe a contract at the stored grid and size: ``volume``: z-score
    over the whole scan (ADNet, Q-Net, GMRD, PAMI, DIFD; SSL-ALPNet on MR); ``global``: z-score with the
    training scans' ``stats`` (SSL-ALPNet on CT); ``slice_minmax``: each slice scaled to [0, 1] (LSLPN);
    ``none``: stored intensities.
    """
    if files.label is None:
        raise FsmisInputError(f"{files.image}: no label file; evaluation needs label_{files.scan_id}")
    if contract is None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; use volume, global, slice_minmax or none")
        contract = volume_contract(desc, normalization, stats)
    vol = load_volumes([files], desc, contract=contract)[0]
    image = vol.image.transpose(1, 2, 0)  # [Z, X, Y] -> [X, Y, Z] view
    return Scan(files.scan_id, image, vol.label.transpose(1, 2, 0), vol.affine, Path(files.image))


def present_classes(files: Sequence[ScanFiles]) -> tuple[int, ...]:
    """The non-zero label values of ``files`` (the classes of a user's own masks), ascending.

    Raises:
        FsmisInputError: no label holds any non-zero value.
    """
    from fsmis_monai.io import load_nifti
    from fsmis_monai.transforms.checks import label_values

    found: set[int] = set()
    for f in files:
        if f.label is not None:
            found.update(int(v) for v in label_values(load_nifti(f.label)[0])[0].tolist())
    found.discard(0)
    if not found:
        raise FsmisInputError(f"{files[0].label if files else '(no scans)'}: the labels of the evaluated scans hold "
                              "no class (every voxel is 0)")
    return tuple(sorted(found))


def to_channels(image: np.ndarray) -> torch.Tensor:
    """[X, Y, Z] -> [3, X, Y, Z]: single-channel slices repeated to 3 channels
    (docs/reference.md#intensity-normalisation)."""
    return torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)[None].expand(3, -1, -1, -1)


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-1 of the model's state dict, so a resumed run refuses results of other weights."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _support_tensors(support_image: torch.Tensor, support_mask: np.ndarray, group: SupportGroup):
    images = torch.stack([support_image[..., z] for z in group])  # [K, 3, X, Y]
    masks = torch.as_tensor(np.stack([support_mask[..., z] for z in group]).astype(np.float32))  # [K, X, Y]
    return images, masks


ClassGroup = tuple[int, SupportGroup]  # (class, support slices): one support state


def predict_query(
    model: torch.nn.Module,
    inferer: FewShotSliceInferer,
    query_image: torch.Tensor,
    support_image: torch.Tensor,
    support_labels: np.ndarray,
    requests: dict[ClassGroup, list[int]],
    on_batch=None,
    states: Optional[dict[int, dict[SupportGroup, Any]]] = None,
) -> dict[ClassGroup, dict[int, np.ndarray]]:
    """The shared pass of one query scan: foreground logit margins {(class, support group): {z: [X, Y]
    float32}}, ``logit_fg - logit_bg`` (> 0: the argmax's foreground; its sigmoid: the foreground probability).

    Each requested query slice is encoded once, whatever the classes, support groups and protocols asking
    for it (:meth:`.inferer.FewShotSliceInferer.segment_shared`), and segmented against the support state of
    every (class, group) that asks for it. ``support_labels`` is the support scan's label volume; a group is
    encoded (``encode_support``) the first time a slice needs it, into ``states[class][group]``, which may
    be kept across the query scans of a fold: the support slices a protocol picks depend only on the
    support scan, so a fold encodes each group once.
    """
    states = {} if states is None else states

    def state_of(key: ClassGroup):
        c, group = key
        cache = states.setdefault(c, {})
        if group not in cache:
            cache[group] = inferer.encode(model, *_support_tensors(support_image, support_labels == c, group))
        return cache[group]

    def margins(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, 1] - logits[:, 0]).float()  # > 0 as argmax over (bg, fg); a tie goes to background

    out = inferer.segment_shared(model, query_image, requests, state_of, postprocess=margins, on_batch=on_batch)
    return {key: {z: out[key][i].numpy() for i, z in enumerate(zs)} for key, zs in requests.items()}


def assemble_margins(plan: ProtocolPlan, predictions: dict[SupportGroup, dict[int, np.ndarray]],
                     shape: tuple[int, ...]) -> np.ndarray:
    """The protocol's logit-margin volume (float32): its slices from the shared pass, ``-inf`` where it
    predicts nothing."""
    vol = np.full(shape, -np.inf, np.float32)
    for z in np.flatnonzero(plan.predicted):
        vol[..., z] = predictions[plan.support_groups[plan.assignment[z]]][int(z)]
    return vol


def assemble(plan: ProtocolPlan, predictions: dict[SupportGroup, dict[int, np.ndarray]], shape: tuple[int, ...],
             query_image: Optional[np.ndarray] = None, prior: Optional[SupportPrior] = None,
             steps: Optional[WholeScanSteps] = None) -> np.ndarray:
    """The protocol's binary prediction volume (uint8): its slices from the shared pass (margin > 0, the
    argmax), 0 where it predicts nothing. For the ``whole`` protocol, ``steps`` (with the query's
    intensities ``query_image`` and the support's ``prior``) replace the argmax
    (:mod:`fsmis_monai.transforms.whole_scan`); the oracle protocols ignore them."""
    margins = assemble_margins(plan, predictions, shape)
    if plan.protocol != "whole" or steps is None or not steps.steps:
        return (margins > 0).astype(np.uint8)
    prob = expit(margins)
    return steps(np.where(margins > 0, np.maximum(prob, np.nextafter(0.5, 1)), np.minimum(prob, 0.5)),
                 query_image, prior).astype(np.uint8)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class FewShotEvaluator:
    """Evaluate ``model`` on folds of a dataset folder; see :func:`evaluate` for the arguments."""

    def __init__(
        self,
        model: torch.nn.Module,
        dataset_dir: str | Path,
        dataset: str | DatasetDescriptor = "chaos",
        family: str = "qnet",
        protocols: str | Sequence[str] = DEFAULT_PROTOCOLS,
        output_dir: Optional[str | Path] = None,
        device: Optional[str | torch.device] = None,
        sw_batch_size: int = 8,
        classes: Optional[Sequence[int | str]] = None,
        query_ids: Optional[Sequence[int]] = None,
        support_id: Optional[int] = None,
        normalization: Normalization = "volume",
        global_stats: Optional[tuple[float, float]] = None,
        contract: Optional[DataContract] = None,
        faithful: bool = False,
        protocol_options: Optional[dict[str, dict]] = None,
        save_predictions: bool = True,
        overlay_slices: int = 3,
        resume: bool = True,
        progress: bool = True,
        cache_support: bool = True,
        whole_scan_steps: Optional[Sequence[str]] = DEFAULT_STEPS,
    ) -> None:
        self.desc = get_dataset(dataset)
        self.dataset_dir = Path(dataset_dir)
        self.family = family
        self.protocols = check_protocols(protocols)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.model = model.to(self.device).eval()
        self.inferer = FewShotSliceInferer(sw_batch_size=sw_batch_size, device=self.device)
        self.classes = tuple(self.desc.class_id(c) for c in classes) if classes else self.desc.test_classes
        self.query_ids = tuple(int(i) for i in query_ids) if query_ids else None
        self.support_id = support_id
        self.normalization = normalization
        self.global_stats = global_stats
        # the trained model's data contract wins over normalization/global_stats; labels read as this dataset's
        self.contract = None if contract is None else contract.with_labels_of(self.desc.key)
        self.faithful = faithful
        self.protocol_options = protocol_options or {}
        self.save_predictions = save_predictions and self.output_dir is not None
        self.overlay_slices = overlay_slices if self.output_dir is not None else 0
        self.resume = resume
        self.progress = progress
        self.cache_support = cache_support
        self.whole_scan = WholeScanSteps(tuple(whole_scan_steps or ()))

    # ------------------------------------------------------------------------------------ setup

    def _fold_setup(self, fold: int):
        available = [f.scan_id for f in pair_scans(self.dataset_dir, require_pseudolabels=False)]
        if self.desc.own_data:  # no folds (registry.OWN_DATA): the lowest id supports the other scans by default
            support = int(self.support_id) if self.support_id is not None else min(available, default=-1)
            queries = self.query_ids if self.query_ids is not None else tuple(i for i in available if i != support)
            spec = None
        else:
            spec = get_fold(self.desc, fold, self.family)
            support = int(self.support_id) if self.support_id is not None else spec.support_id
            queries = self.query_ids if self.query_ids is not None else spec.query_ids
        missing = [i for i in (support, *queries) if i not in available]
        if missing:
            raise FsmisInputError(f"{self.dataset_dir}: fold {fold} ({self.family}) needs scans {missing}, "
                                  f"which are not in the folder (found ids {available})")
        train = [i for i in available if i == support or i in queries] if spec is None else [
            i for i in spec.train_ids if i in available]
        return support, tuple(queries), train

    def _run_config(self, fold_runs: dict) -> dict:
        return {
            "dataset": self.desc.key, "family": self.family, "protocols": list(self.protocols),
            "classes": list(self.classes), "folds": fold_runs, "normalization": self.normalization,
            "global_stats": list(self.global_stats) if self.global_stats else None, "faithful": self.faithful,
            "contract": None if self.contract is None else self.contract.to_dict(),
            "protocol_options": self.protocol_options, "model": type(self.model).__name__,
            "model_sha1": model_fingerprint(self.model), "whole_scan_steps": list(self.whole_scan.steps),
        }

    def _check_resume(self, config: dict) -> None:
        assert self.output_dir is not None
        path = self.output_dir / "run_config.json"
        if path.is_file() and self.resume:
            previous = read_json(path)
            if previous != config:
                changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
                raise FsmisInputError(
                    f"{path}: the output folder holds a run with different settings ({', '.join(changed)}); "
                    "use another output_dir or resume=False to start over")
        elif path.is_file() and not self.resume:
            shutil.rmtree(self.output_dir / "cases", ignore_errors=True)
        write_json(path, config)

    # -------------------------------------------------------------------------------------- run

    def run(self, folds: int | Sequence[int] = 0) -> dict:
        folds = [int(folds)] if isinstance(folds, (int, np.integer)) else [int(f) for f in folds]
        setups = {f: self._fold_setup(f) for f in folds}
        fold_runs = {str(f): {"support_id": s, "query_ids": list(q)} for f, (s, q, _) in setups.items()}
        files = {f.scan_id: f for f in pair_scans(self.dataset_dir, require_pseudolabels=False)}
        if not self.classes:  # own data (dataset none): the label values its scans hold
            self.classes = present_classes([files[i] for s, q, _ in setups.values() for i in (s, *q)])
        prepared = {f: self._support(f, setups[f], files) for f in folds}  # every class checked before any query
        if self.output_dir is not None:
            self._check_resume(self._run_config(fold_runs))
        cases: list[CaseResult] = []
        for f in folds:
            support_id, query_ids, train_ids = setups[f]
            fold_dir = None if self.output_dir is None else (
                self.output_dir if len(folds) == 1 else self.output_dir / f"fold_{f}")
            stats, support = prepared.pop(f)
            support_image = to_channels(support.image)
            self._states: dict[int, dict] = {}  # encoded support groups per class, kept for the fold
            self._priors: dict[int, SupportPrior] = {}  # the whole protocol's support prior per class
            fold_cases: list[CaseResult] = []
            for n, qid in enumerate(query_ids):
                cached = self._cached(f, qid)
                if cached is not None:
                    fold_cases += cached
                    continue
                query = load_scan(files[qid], self.desc, self.normalization, stats, self.contract)
                rows = self._evaluate_query(f, query, support, support_image, fold_dir, overlays=(n == 0))
                self._cache(f, qid, rows)
                fold_cases += rows
            if fold_dir is not None and len(folds) > 1:
                self._write_reports(fold_dir, fold_cases, f"Fold {f}")
            cases += fold_cases
        summary = summarize_cases(cases)
        summary["config"] = {"dataset": self.desc.key, "family": self.family, "protocols": list(self.protocols),
                             "classes": list(self.classes), "folds": fold_runs}
        if self.output_dir is not None:
            self._write_reports(self.output_dir, cases, f"{self.desc.title}, {self.family} folds", summary)
        return summary

    def _support(self, fold: int, setup: tuple, files: dict[int, ScanFiles]) -> tuple[Optional[IntensityStats], Scan]:
        """The fold's intensity statistics and prepared support scan, which must hold every evaluated class.

        Raises:
            FsmisInputError: the support scan holds no voxel of a class; names the scan (id, label file), the
                class (id, name) and the two ways out (``support_id``, ``classes``).
        """
        support_id, _, train_ids = setup
        stats = None if self.global_stats is None else IntensityStats(*map(float, self.global_stats))
        if self.normalization == "global" and stats is None and self.contract is None:
            stats = intensity_stats([files[i] for i in train_ids])
        support = load_scan(files[support_id], self.desc, self.normalization, stats, self.contract)
        absent = [c for c in self.classes if not (support.label == c).any()]
        if absent:
            held = [c for c in self.classes if c not in absent]
            named = ", ".join(f"{c} ({self.desc.class_name(c)})" for c in absent)
            raise FsmisInputError(
                f"{files[support_id].label}: support scan {support_id} (fold {fold}) holds no voxel of class {named}; "
                f"choose a support scan that holds it (support_id) or evaluate the classes it holds "
                f"(classes: {held or 'none'})")
        return stats, support

    def _write_reports(self, out: Path, cases: list[CaseResult], title: str, summary: Optional[dict] = None) -> None:
        if summary is None:
            summary = summarize_cases(cases)
        write_per_case_csv(out / "per_case.csv", cases)
        write_summary(out, summary, title)
        box_plot(out / "dice_boxplot.png", cases)

    def _case_path(self, fold: int, qid: int) -> Optional[Path]:
        return None if self.output_dir is None else self.output_dir / "cases" / f"fold_{fold}" / f"query_{qid}.json"

    def _cached(self, fold: int, qid: int) -> Optional[list[CaseResult]]:
        path = self._case_path(fold, qid)
        if path is None or not self.resume or not path.is_file():
            return None
        return [CaseResult.from_row(r) for r in read_json(path)["rows"]]

    def _cache(self, fold: int, qid: int, rows: list[CaseResult]) -> None:
        path = self._case_path(fold, qid)
        if path is not None:
            write_json(path, {"rows": [r.as_row() for r in rows]})

    def _evaluate_query(self, fold: int, query: Scan, support: Scan, support_image: torch.Tensor,
                        out_dir: Optional[Path], overlays: bool) -> list[CaseResult]:
        query_image = to_channels(query.image)
        plans: dict[int, dict[str, ProtocolPlan]] = {}
        requests: dict[ClassGroup, list[int]] = {}
        for c in self.classes:
            plans[c] = {p: make_plan(p, query.label == c, support.label == c, faithful=self.faithful,
                                     **self.protocol_options.get(p, {})) for p in self.protocols}
            requests.update({(c, g): zs for g, zs in merge_requests(list(plans[c].values())).items()})
        total = sum(len(zs) for zs in requests.values())
        rows: list[CaseResult] = []
        with tqdm(total=total, desc=f"fold {fold} query {query.scan_id}", unit="slice",
                  disable=not self.progress, leave=False) as bar:
            shared = predict_query(self.model, self.inferer, query_image, support_image, support.label, requests,
                                   on_batch=bar.update, states=self._states if self.cache_support else None)
            for c in self.classes:
                preds = {g: shared[(k, g)] for k, g in requests if k == c}
                truth = query.label == c
                written: dict[bytes, Path] = {}
                volumes = {}
                for p, plan in plans[c].items():
                    vol = assemble(plan, preds, query.label.shape, query.image, self._prior(support, c), self.whole_scan)
                    volumes[p] = vol
                    tp, fp, fn = confusion_counts(vol, truth, plan.scored)
                    status = case_status(tp, fn, fp, p)
                    dice = dice_from_counts(tp, fp, fn, plan.dice_smooth) if status == "ok" else float("nan")
                    rows.append(CaseResult(fold, query.scan_id, support.scan_id, c, self.desc.class_name(c), p, dice,
                                           tp, fp, fn, int(plan.scored.sum()), int(plan.predicted.sum()), status))
                    if self.save_predictions and out_dir is not None:
                        path = out_dir / "predictions" / p / str(query.scan_id) / f"class_{c}.nii.gz"
                        key = hashlib.sha1(vol.tobytes()).digest()
                        if key in written:  # protocols that share the whole prediction share the file
                            _link_or_copy(written[key], path)
                        else:
                            save_nifti(path, vol, affine=query.affine, dtype=np.uint8)
                            written[key] = path
                if overlays and self.overlay_slices and out_dir is not None:
                    self._overlays(out_dir, fold, query, c, truth, volumes)
        return rows

    def _prior(self, support: Scan, c: int) -> Optional[SupportPrior]:
        """The support's prior of class ``c`` for the whole protocol's steps (computed once per fold)."""
        if "whole" not in self.protocols or not self.whole_scan.steps:
            return None
        if c not in self._priors:
            self._priors[c] = SupportPrior.from_volume(support.image, support.label == c, f"{support.path} class {c}")
        return self._priors[c]

    def _overlays(self, out_dir: Path, fold: int, query: Scan, c: int, truth: np.ndarray, volumes: dict) -> None:
        zs = np.flatnonzero(truth.any(axis=(0, 1)))
        if zs.size == 0:
            return
        picks = sorted({int(zs[i]) for i in np.linspace(0, len(zs) - 1, self.overlay_slices).round().astype(int)})
        p = self.protocols[0]
        for z in picks:
            overlay_png(out_dir / "overlays" / f"fold{fold}_query{query.scan_id}_class{c}_z{z}.png",
                        query.image[..., z], truth[..., z], volumes[p][..., z],
                        f"query {query.scan_id}, {self.desc.class_name(c)}, slice {z}, protocol {p}")


def evaluate(
    model: torch.nn.Module,
    dataset_dir: str | Path,
    dataset: str | DatasetDescriptor = "chaos",
    fold: int | Sequence[int] = 0,
    family: str = "qnet",
    protocols: str | Sequence[str] = DEFAULT_PROTOCOLS,
    output_dir: Optional[str | Path] = None,
    device: Optional[str | torch.device] = None,
    sw_batch_size: int = 8,
    **options: Any,
) -> dict:
    """Evaluate a few-shot ``model`` (the :class:`~fsmis_monai.networks.methods.base.FewShotSegmenter`
    contract) on ``fold`` (one or several) of the scans in ``dataset_dir`` and return the summary.

    ``family`` picks the fold lists and the support scan (``qnet``, ``adnet`` or ``alp``, see
    :func:`fsmis_monai.data.registry.get_fold`); ``protocols`` any of ``alp, ep1, ep2, senet, whole``.
    With ``output_dir`` the run writes ``per_case.csv``, ``summary.json``, ``summary.md``,
    ``dice_boxplot.png``, ``overlays/*.png`` and ``predictions/<protocol>/<query_id>/class_<c>.nii.gz``
    (several folds: one ``fold_<k>/`` folder each plus the aggregate) and resumes an interrupted run.
    Further options: see :class:`FewShotEvaluator` (``classes``, ``query_ids``, ``support_id``,
    ``normalization``, ``global_stats``, ``contract`` (the trained model's data contract, which wins over
    both: orientation, spacing, intensity, in-plane size), ``faithful``, ``protocol_options``, ``save_predictions``,
    ``overlay_slices``, ``resume``, ``progress``, ``cache_support``: keep each fold's encoded support
    groups for all its query scans; turn off for methods whose support state is large, then a query scan's
    groups, of all classes, are kept only while that scan is segmented). Each query slice is encoded once
    for all classes, support groups and protocols (methods implementing ``encode_query``).
    """
    evaluator = FewShotEvaluator(model, dataset_dir, dataset=dataset, family=family, protocols=protocols,
                                 output_dir=output_dir, device=device, sw_batch_size=sw_batch_size, **options)
    return evaluator.run(fold)

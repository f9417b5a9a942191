"""Training-data preconditions a bundle checks before it builds its episode dataset.

Self-supervised training needs one pseudolabel file ``superpix-<tag>_<id>.nii.gz`` per scan in
``pseudolabel_dir`` (3D supervoxels for ADNet and the Q-Net family, 2D superpixels for SSL-ALPNet).
:func:`ensure_pseudolabels` returns the folder once every scan has its file. Missing files are generated
with :mod:`fsmis_monai.data.pseudolabel_folder` and cached on disk (written atomically, so an interrupted run never
leaves a truncated file), or, with ``generate=False``, reported with the command that makes them. Under
``torch.distributed`` (``torchrun``) rank 0 alone checks and generates; the other ranks wait for it and
share its outcome (:func:`on_rank_zero`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional

from fsmis_monai.data.datalist import pair_scans, scan_id_of
from fsmis_monai.data.registry import get_dataset
from fsmis_monai.distributed import on_rank_zero
from fsmis_monai.io import FsmisInputError

logger = logging.getLogger(__name__)

PseudolabelKind = Literal["supervoxels", "superpixels"]


def _existing(pseudolabel_dir: Path) -> set[int]:
    if not pseudolabel_dir.is_dir():
        return set()
    parsed = [scan_id_of(p) for p in pseudolabel_dir.iterdir()]
    return {sid for kind, sid in filter(None, parsed) if kind.startswith("superpix")}


_CLI_DATASET = {"chaos_mr_t2": "chaos", "cmr_bssfp": "cmr", "synapse_ct": "synapse"}


def pseudolabel_command(dataset_dir: str | Path, pseudolabel_dir: str | Path, kind: PseudolabelKind = "supervoxels",
                        dataset: str = "chaos", min_size: Optional[int] = None, workers: int = 1) -> list[str]:
    """The ``fsmis`` arguments that create the pseudolabels (the command line of what :func:`ensure_pseudolabels` runs)."""
    cli_dataset, size = _pseudolabel_settings(kind, dataset, min_size)
    return [kind, "--src", str(dataset_dir), "--dst", str(pseudolabel_dir),
            *(["--dataset", cli_dataset] if cli_dataset else []), "--workers", str(int(workers)),
            "--min-size", str(size)]


def _pseudolabel_settings(kind: str, dataset: Optional[str], min_size: Optional[int]) -> tuple[Optional[str], int]:
    """``(dataset name of the command line, min_size)``; ``min_size`` None: the dataset's reference value (own
    data, dataset ``none``: no dataset name and :data:`~fsmis_monai.data.registry.OWN_DATA`'s stated default)."""
    if kind not in ("supervoxels", "superpixels"):
        raise ValueError(f"unknown pseudolabel kind {kind!r}; use 'supervoxels' or 'superpixels'")
    desc = get_dataset(dataset)
    return _CLI_DATASET.get(desc.key), desc.pseudolabel_min_size(kind) if min_size is None else int(min_size)


def ensure_pseudolabels(
    dataset_dir: str | Path,
    pseudolabel_dir: str | Path,
    kind: PseudolabelKind = "supervoxels",
    dataset: str = "chaos",
    generate: bool = True,
    min_size: Optional[int] = None,
    workers: int = 1,
) -> str:
    """Make sure every ``image_<id>`` of ``dataset_dir`` has its pseudolabel in ``pseudolabel_dir``.

    Missing ones are made by :func:`fsmis_monai.data.pseudolabel_folder.supervoxel_folder` /
    :func:`~fsmis_monai.data.pseudolabel_folder.superpixel_folder` (what ``fsmis supervoxels`` /
    ``fsmis superpixels`` run; ``min_size`` None: the dataset's reference value,
    :meth:`DatasetDescriptor.pseudolabel_min_size`); with ``generate=False`` the error names that command.
    Nothing is written into ``dataset_dir`` (it may be read-only) unless ``pseudolabel_dir`` lies inside it.
    Returns ``pseudolabel_dir`` as a string (for bundle configs).

    Under ``torchrun`` only rank 0 generates; the others wait for it (:func:`on_rank_zero`).

    Raises:
        FsmisInputError: pseudolabels are missing and ``generate`` is False, or a scan failed (the message
            names its file and the summary file); on every rank.
    """
    return on_rank_zero(lambda: _ensure_here(dataset_dir, pseudolabel_dir, kind, dataset, generate, min_size, workers))


def _ensure_here(dataset_dir: str | Path, pseudolabel_dir: str | Path, kind: PseudolabelKind, dataset: str,
                 generate: bool, min_size: Optional[int], workers: int) -> str:
    """:func:`ensure_pseudolabels` in this process."""
    from fsmis_monai.data.pseudolabel_folder import superpixel_folder, supervoxel_folder

    out = Path(pseudolabel_dir)
    missing = [s.scan_id for s in pair_scans(dataset_dir, require_labels=False) if s.scan_id not in _existing(out)]
    if not missing:
        return str(out)
    args = pseudolabel_command(dataset_dir, out, kind, dataset, min_size, workers)
    if not generate:
        raise FsmisInputError(f"{out}: no {kind} for scans {missing}. Create them with\n  fsmis {' '.join(args)}\n"
                              "or set generate_pseudolabels to true in the bundle config to have training make them.")
    logger.warning(f"{out}: generating {kind} for {len(missing)} scan(s) (cached for later runs): fsmis {' '.join(args)}")
    cli_dataset, size = _pseudolabel_settings(kind, dataset, min_size)
    make = supervoxel_folder if kind == "supervoxels" else superpixel_folder
    summary = make(dataset_dir, out, dataset=cli_dataset, min_size=size, workers=int(workers))
    failed = [s["error"] for s in summary["scans"] if s["status"] != "ok"]
    if failed:
        raise FsmisInputError(f"{failed[0]} ({kind} generation failed for {len(failed)} scan(s); "
                              f"see {summary['summary_path']})")
    return str(out)

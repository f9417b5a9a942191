"""Pair image, label and pseudolabel files **by scan id** and write MONAI-style datalists.

The reference loaders sort each file kind separately and pair them by list position, so a missing
file silently shifts every pair after it (docs/reference.md#quirk-pairing-by-position). Here every file is keyed by the
id in its name; a file without a partner is an error that names it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from fsmis_monai.io import FsmisInputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_ID_PATTERN = re.compile(r"^(?P<kind>image|label|superpix-[A-Za-z0-9]+)_(?P<id>\d+)\.nii(\.gz)?$")


@dataclass(frozen=True)
class ScanFiles:
    """The files of one scan."""

    scan_id: int
    image: Path
    label: Path | None = None
    pseudolabel: Path | None = None

    def as_dict(self) -> dict:
        d = {"id": self.scan_id, "image": str(self.image)}
        if self.label is not None:
            d["label"] = str(self.label)
        if self.pseudolabel is not None:
            d["pseudolabel"] = str(self.pseudolabel)
        return d


def scan_id_of(path: str | Path) -> tuple[str, int] | None:
    """``("image", 3)`` for ``image_3.nii.gz``; ``None`` when the name does not follow the convention."""
    m = _ID_PATTERN.match(Path(path).name)
    if not m:
        return None
    return m.group("kind"), int(m.group("id"))


def _index(folder: Path, kind_prefix: str) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for p in sorted(folder.iterdir()):
        parsed = scan_id_of(p)
        if parsed is None or not parsed[0].startswith(kind_prefix):
            continue
        kind, sid = parsed
        if sid in found:
            raise FsmisInputError(f"{folder}: two {kind_prefix} files for scan {sid}: {found[sid].name} and {p.name}")
        found[sid] = p
    return found


def pair_scans(
    image_dir: str | Path,
    label_dir: str | Path | None = None,
    pseudolabel_dir: str | Path | None = None,
    require_labels: bool = True,
    require_pseudolabels: bool = True,
    ids: Iterable[int] | None = None,
) -> list[ScanFiles]:
    """Pair ``image_<id>`` with ``label_<id>`` and ``superpix-*_<id>`` by id, sorted by id.

    ``label_dir`` defaults to ``image_dir``. Pseudolabels are looked up only when ``pseudolabel_dir``
    is given. Any image without its label (or pseudolabel), or any label/pseudolabel without its image,
    raises :class:`FsmisInputError` naming the file. ``ids`` restricts the result (all must exist).
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FsmisInputError(f"{image_dir}: data folder not found")
    images = _index(image_dir, "image")
    if not images:
        raise FsmisInputError(f"{image_dir}: no image_<id>.nii[.gz] files")
    labels = _index(Path(label_dir) if label_dir else image_dir, "label") if (label_dir or require_labels) else {}
    pseudo = _index(Path(pseudolabel_dir), "superpix") if pseudolabel_dir else {}

    problems: list[str] = []
    if require_labels:
        problems += [f"{images[i]}: no matching label_{i} file" for i in sorted(set(images) - set(labels))]
    problems += [f"{labels[i]}: no matching image_{i} file" for i in sorted(set(labels) - set(images))]
    if pseudolabel_dir and require_pseudolabels:
        problems += [f"{images[i]}: no matching superpix-*_{i} file in {pseudolabel_dir}"
                     for i in sorted(set(images) - set(pseudo))]
    problems += [f"{pseudo[i]}: no matching image_{i} file" for i in sorted(set(pseudo) - set(images))]
    if problems:
        raise FsmisInputError("file pairing failed:\n  " + "\n  ".join(problems))

    wanted: Sequence[int] = sorted(images) if ids is None else [int(i) for i in ids]
    missing = [i for i in wanted if i not in images]
    if missing:
        raise FsmisInputError(f"{image_dir}: requested scan ids not found: {missing}")
    return [ScanFiles(i, images[i], labels.get(i), pseudo.get(i)) for i in wanted]


def build_datalist(folder: str | os.PathLike[str], dataset: str | None = None, pseudolabels: str | None = None,
                   family: str = "qnet", subset: bool = False, relative_to: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The datalist of ``folder`` as a dict (keys: see ``fsmis datalist``), paths relative to ``relative_to`` if given.

    ``dataset`` adds the folds of that registry dataset under the ``family`` convention; ``subset`` builds
    them over the scans present instead of requiring all of the dataset's scans.

    Raises:
        FsmisInputError: an unpaired or missing file (named), a scan the folds need is missing, too few
            scans for the folds, or ``dataset`` is not in the registry.
    """
    from fsmis_monai.data.registry import NUM_FOLDS, get_dataset, get_fold

    scans = pair_scans(folder, pseudolabel_dir=pseudolabels)

    def item(s) -> dict[str, Any]:
        d = s.as_dict()
        if relative_to is not None:
            for k in ("image", "label", "pseudolabel"):
                if k in d:
                    d[k] = os.path.relpath(d[k], relative_to)
        return d

    by_id = {s.scan_id: item(s) for s in scans}
    out: dict[str, Any] = {"name": Path(folder).name, "training": [by_id[i] for i in sorted(by_id)]}
    if dataset is None:
        return out
    try:
        desc = get_dataset(dataset)
    except KeyError as e:
        raise FsmisInputError(str(e.args[0])) from e
    if desc.own_data:  # no benchmark folds to write
        return out
    ids = None
    if subset:
        ids = sorted(by_id)
    else:
        missing = [i for i in desc.known_ids if i not in by_id]
        if missing:
            raise FsmisInputError(
                f"{folder}: the {desc.key} folds need image_<id>/label_<id> for ids {missing} (missing); "
                "use --subset to build folds over the scans present")
    out.update({"dataset": desc.key, "family": family, "folds": {}})
    for k in range(NUM_FOLDS):
        try:
            f = get_fold(desc, k, family, ids=ids)
        except ValueError as e:
            raise FsmisInputError(f"{folder}: {e}") from e
        out["folds"][str(k)] = {"support_id": f.support_id, "query_ids": list(f.query_ids), "train_ids": list(f.train_ids)}
        out[f"fold{k}_training"] = [by_id[i] for i in f.train_ids if i in by_id]
        out[f"fold{k}_validation"] = [by_id[i] for i in f.query_ids if i in by_id]
        out[f"fold{k}_support"] = [by_id[f.support_id]]
    return out

"""Pair image, label and pseudolabel files **by scan id** and write MONAI-style datalists.

The reference loaders sort each file kind separately and pair them by list position, so a missing
file silently shifts every pair after it (docs/reference.md#quirk-pairing-by-position). Here every file is keyed by the
id in its name; a file without a partner is an error that names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

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

"""The raw files of a download paired by scan id through a recipe's ``raw.image`` / ``raw.label`` patterns."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fsmis_monai.io import FsmisInputError


@dataclass(frozen=True)
class RawScan:
    """One raw scan: its id in the raw layout, the id it is written under, and its files."""

    raw_id: int
    out_id: int
    image: str
    label: str


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = [re.escape(p).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*") for p in pattern.split("{id}")]
    return re.compile("^" + r"(?P<id>\d+)".join(parts) + "$")


def _find(src: Path, pattern: str) -> dict[int, Path]:
    regex = _pattern_regex(pattern)
    found: dict[int, Path] = {}
    for p in sorted(src.glob(pattern.replace("{id}", "*"))):
        m = regex.match(p.relative_to(src).as_posix())
        if m is None:
            continue
        sid = int(m.group("id"))
        if sid in found:
            raise FsmisInputError(f"{p}: a second file for raw scan {sid} (first: {found[sid]})")
        found[sid] = p
    return found


def find_raw_scans(recipe: Mapping[str, Any], src: str | os.PathLike[str]) -> list[RawScan]:
    """Pair the recipe's image and label patterns under ``src`` by id; unpaired files are an error naming them."""
    src = Path(src)
    if not src.is_dir():
        raise FsmisInputError(f"{src}: raw data folder not found")
    raw = recipe["raw"]
    images, labels = _find(src, raw["image"]), _find(src, raw["label"])
    if not images:
        raise FsmisInputError(f"{src}: no raw image matches the pattern {raw['image']!r} of recipe {recipe['name']}")
    problems = [f"{images[i]}: no matching label ({raw['label'].replace('{id}', str(i))})"
                for i in sorted(set(images) - set(labels))]
    problems += [f"{labels[i]}: no matching image ({raw['image'].replace('{id}', str(i))})"
                 for i in sorted(set(labels) - set(images))]
    id_map = {int(k): int(v) for k, v in (raw.get("ids") or {}).items()}
    if id_map:
        problems += [f"{images[i]}: raw id {i} is not in the recipe's id table" for i in sorted(images) if i not in id_map]
    if problems:
        raise FsmisInputError("raw file pairing failed:\n  " + "\n  ".join(problems))
    return [RawScan(i, id_map.get(i, i), str(images[i]), str(labels[i])) for i in sorted(images)]

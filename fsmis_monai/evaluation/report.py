"""Readable outputs of an evaluation: ``per_case.csv``, ``summary.json``, ``summary.md``, a box plot of
per-case Dice and overlay PNGs (query slice, ground truth, prediction). Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fsmis_monai.evaluation.metrics import STATUS_OK, CaseResult
from fsmis_monai.io import atomic_path, write_json, write_text

CSV_COLUMNS = ("fold", "query_id", "support_id", "class", "class_name", "protocol", "dice", "tp", "fp", "fn",
               "scored_slices", "predicted_slices", "status")


def write_per_case_csv(path: str | Path, cases: Sequence[CaseResult]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for c in cases:
        row = c.as_row()
        row["dice"] = "" if math.isnan(row["dice"]) else repr(float(row["dice"]))
        writer.writerow(row)
    return write_text(path, buf.getvalue())


def read_per_case_csv(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _fmt(mean: float, std: float | None = None) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    if std is None or math.isnan(std):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def summary_markdown(summary: Mapping[str, Any], title: str = "Few-shot evaluation") -> str:
    """Dice (%) table: rows classes, columns protocols; mean ± std over query scans (one fold) or folds."""
    protocols = list(summary["protocols"])
    folds = list(summary["folds"])
    single = len(folds) == 1
    classes: dict[str, str] = {}
    for p in protocols:
        for k, v in summary["protocols"][p]["classes"].items():
            classes.setdefault(k, v["name"])
    spread = "std over query scans" if single else f"std over {len(folds)} folds"
    lines = [f"# {title}", "", f"Dice (%) per class, mean ± {spread}. Folds: {', '.join(folds)}.", "",
             "| class | " + " | ".join(protocols) + " |", "|---|" + "---|" * len(protocols)]
    for k in sorted(classes, key=int):
        cells = []
        for p in protocols:
            if single:
                c = summary["folds"][folds[0]][p]["classes"].get(k)
                cells.append(_fmt(c["mean"], c["std"]) if c else "n/a")
            else:
                c = summary["protocols"][p]["classes"].get(k)
                cells.append(_fmt(c["mean"], c["std_over_folds"]) if c else "n/a")
        lines.append(f"| {k} {classes[k]} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(
        _fmt(summary["protocols"][p]["mean"], None if single else summary["protocols"][p]["std_over_folds"])
        for p in protocols) + " |")
    empties = {p: summary["protocols"][p]["n_empty"] for p in protocols if summary["protocols"][p]["n_empty"]}
    lines.append("")
    if empties:
        lines.append("Cases with no ground truth on the scored slices (Dice undefined, left out of the means): "
                     + ", ".join(f"{p}: {n}" for p, n in empties.items()) + ".")
    else:
        lines.append("Every case had ground truth on its scored slices.")
    lines.append("Protocols alp, ep1, senet choose the scored slices from the query's labels (oracle); "
                 "ep2 and whole score every slice.")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path, summary: Mapping[str, Any], title: str = "Few-shot evaluation") -> None:
    out = Path(out_dir)
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", summary_markdown(summary, title))


def _savefig(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def box_plot(path: str | Path, cases: Sequence[CaseResult]) -> Path:
    """Per-case Dice, one box per (class, protocol)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    protocols = list(dict.fromkeys(c.protocol for c in cases))
    classes = sorted({(c.class_id, c.class_name) for c in cases})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(classes) * len(protocols)), 4))
    colors = plt.get_cmap("tab10")
    pos, data, ticks, labels = 0, [], [], []
    for k, name in classes:
        start = pos
        for j, p in enumerate(protocols):
            vals = [c.dice for c in cases if c.class_id == k and c.protocol == p and c.status == STATUS_OK]
            bp = ax.boxplot([vals if vals else [np.nan]], positions=[pos], widths=0.7, patch_artist=True)
            for box in bp["boxes"]:
                box.set_facecolor(colors(j % 10))
            data.append(vals)
            pos += 1
        ticks.append((start + pos - 1) / 2)
        labels.append(name)
        pos += 1
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels)
    ax.set_ylabel("Dice per query scan")
    ax.set_ylim(0, 1)
    handles = [matplotlib.patches.Patch(color=colors(j % 10), label=p) for j, p in enumerate(protocols)]
    ax.legend(handles=handles, loc="lower right", fontsize="small")
    return _savefig(fig, path)


def overlay_png(path: str | Path, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, title: str) -> Path:
    """Three panels: the query slice, its ground truth and the prediction (both drawn over the slice)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    shown = np.rot90(image)  # NIfTI [x, y] -> display rows top to bottom
    for ax, mask, name, color in ((axes[0], None, "query", None), (axes[1], truth, "ground truth", "lime"),
                                  (axes[2], pred, "prediction", "red")):
        ax.imshow(shown, cmap="gray")
        if mask is not None:
            m = np.rot90(np.asarray(mask, bool))
            ax.imshow(np.ma.masked_where(~m, m), cmap=matplotlib.colors.ListedColormap([color]), alpha=0.45)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return _savefig(fig, path)

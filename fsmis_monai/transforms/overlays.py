"""Overlay PNGs of a volume prediction, as a postprocessing transform of an inference bundle.

MONAI's ``SaveImaged`` writes the prediction volume; a user who wants to look at the result without a viewer
gets ``<query>_overlay.png`` next to it: the ``n_slices`` axial slices with the largest predicted area (the
middle slice when nothing is predicted), each as the query slice and the prediction drawn over it.
MONAI has no PNG overlay writer for 3D volumes (``plot_2d_or_3d_image`` targets TensorBoard).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import FolderLayout, FolderLayoutBase
from monai.transforms import MapTransform


def overlay_slices(pred: np.ndarray, n_slices: int) -> list[int]:
    """Indices z of the ``n_slices`` slices of ``pred`` [H, W, D] with the most foreground, ascending."""
    area = (np.asarray(pred) > 0).reshape(-1, pred.shape[-1]).sum(0)
    if not area.any():
        return [pred.shape[-1] // 2]
    top = np.argsort(-area, kind="stable")[: max(1, n_slices)]
    return sorted(int(z) for z in top if area[z] > 0)


def save_overlay_png(path: str | Path, image: np.ndarray, pred: np.ndarray, slices: list[int], title: str) -> Path:
    """One row per slice: the image slice, and the prediction (red) over it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from fsmis_monai.evaluation.report import _savefig

    fig, axes = plt.subplots(len(slices), 2, figsize=(6, 3 * len(slices)), squeeze=False)
    red = matplotlib.colors.ListedColormap(["red"])
    for row, z in zip(axes, slices):
        shown = np.rot90(image[..., z])  # NIfTI [x, y] -> display rows top to bottom
        mask = np.rot90(pred[..., z] > 0)
        for ax, name in ((row[0], f"slice {z}"), (row[1], "prediction")):
            ax.imshow(shown, cmap="gray")
            ax.set_title(name, fontsize=9)
            ax.axis("off")
        row[1].imshow(np.ma.masked_where(~mask, mask), cmap=red, alpha=0.45)
    fig.suptitle(title, fontsize=9)
    return _savefig(fig, path)


class SaveOverlayd(MapTransform):
    """Write ``<output_dir>/<query name>_overlay.png`` from ``image`` [C, H, W, D] and ``pred`` [1, H, W, D].

    Args:
        keys: the image key and the prediction key, in that order.
        output_dir: folder of the PNGs (created), when no ``folder_layout`` is given.
        n_slices: slices shown (those with the largest predicted area).
        folder_layout: MONAI ``FolderLayout`` naming the PNG from the query file (as ``SaveImaged(folder_layout=...)``
            names the prediction, e.g. keeping the query's sub-folder); default: ``output_dir/<name>_overlay.png``.
    """

    def __init__(self, keys: KeysCollection = ("image", "pred"), output_dir: str | Path = ".", n_slices: int = 3,
                 folder_layout: FolderLayoutBase | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must be (image key, prediction key), got {self.keys}")
        self.folder_layout = folder_layout or FolderLayout(str(output_dir), postfix="overlay", extension=".png",
                                                           parent=False, makedirs=True)
        self.n_slices = n_slices

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_key, pred_key = self.keys
        image, pred = d[image_key], d[pred_key]
        meta = getattr(pred, "meta", None) or getattr(image, "meta", None) or {}
        source = str(meta.get("filename_or_obj", "query"))
        name = Path(source).name.split(".")[0]
        image_np = torch.as_tensor(image).detach().cpu().numpy()[0]
        pred_np = torch.as_tensor(pred).detach().cpu().numpy()[0]
        slices = overlay_slices(pred_np, self.n_slices)
        save_overlay_png(self.folder_layout.filename(subject=source), image_np, pred_np, slices, name)
        return d

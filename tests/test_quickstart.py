"""``fsmis quickstart`` runs the whole pipeline on the shipped sample scans (a few iterations here; the
README's figures come from the default 600, see bench/RESULTS.md)."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from fsmis_monai.cli import main
from fsmis_monai.commands.quickstart import QUERY_ID, SAMPLE_DIR


REPO = Path(__file__).resolve().parents[1]


def test_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--output", str(out), "--iterations", "3", "--image-size", "64", "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "held-out mean Dice: trained" in printed
    assert (out / "report.md").is_file() and "| **mean** |" in (out / "report.md").read_text(encoding="utf-8")
    # next to the short run: the held-out figure of the weights shipped with the trained method (ADNet, the
    # default), as its bundle metadata records it
    shipped = json.loads((REPO / "bundles" / "adnet" / "configs" / "metadata.json").read_text())["key_metrics"]["default"]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "shipped adnet weights" in report and f"mean Dice {shipped['protocols']['ep1']['mean_dice']:.3f}" in report
    assert (out / "model.pt").is_file()

    # supervoxels keep the scan's geometry and cover the body
    image = nib.load(str(SAMPLE_DIR / "image_2.nii.gz"))
    sv = nib.load(str(out / "supervoxels" / "superpix-MIDDLE_2.nii.gz"))
    assert sv.shape == image.shape and np.allclose(sv.affine, image.affine)
    assert len(np.unique(np.asarray(sv.dataobj))) > 5

    # both evaluations scored the held-out query on every class, with masks in the query's geometry
    for which in ("trained", "untrained"):
        rows = list(csv.DictReader((out / f"evaluation_{which}" / "per_case.csv").open(encoding="utf-8")))
        assert {int(r["query_id"]) for r in rows} == {QUERY_ID}
        assert {int(r["class"]) for r in rows} == {1, 2, 3, 4}
        assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
        pred = nib.load(str(out / f"evaluation_{which}" / "predictions" / "ep1" / str(QUERY_ID) / "class_1.nii.gz"))
        query = nib.load(str(SAMPLE_DIR / f"image_{QUERY_ID}.nii.gz"))
        assert pred.shape == query.shape and np.allclose(pred.affine, query.affine)

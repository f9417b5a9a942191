"""``fsmis evaluate`` reads classes by name or id and datasets by registry key or alias; an unknown one is a
single error line that lists the known values."""

from __future__ import annotations

import json

import pytest

from fsmis_monai.cli import main


def _evaluate(data, out, *extra: str) -> int:
    # the prototype method builds the small encoder by default (fast, untrained: only the plumbing is checked)
    return main(["evaluate", "--dataset-dir", str(data), "--output-dir", str(out), "--query-ids", "20",
                 "--support-id", "15", "--protocols", "ep1", "--method", "prototype",
                 "--no-progress", "--device", "cpu", *extra])


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_classes_by_name_and_dataset_by_registry_key(chaos_pair, tmp_path):
    out = tmp_path / "out"
    assert _evaluate(chaos_pair, out, "--dataset", "chaos_mr_t2", "--classes", "Liver,4") == 0
    summaries = list(out.rglob("summary.json"))
    assert summaries, sorted(p.name for p in out.rglob("*"))
    config = json.loads(summaries[0].read_text())["config"]
    assert config["dataset"] == "chaos_mr_t2"
    assert config["classes"] == [1, 4]  # CHAOS: liver 1, spleen 4


@pytest.mark.parametrize(
    "option, value, named, known",
    [("--classes", "kidney", "'kidney'", "right_kidney"), ("--dataset", "synapse_mr", "'synapse_mr'", "cmr_bssfp")],
)
def test_unknown_class_or_dataset_is_one_line_listing_known(chaos_pair, tmp_path, capsys, option, value, named, known):
    assert _evaluate(chaos_pair, tmp_path / "out", option, value) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {option}: ") and named in line and known in line
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_prototype_baseline_takes_an_encoder_name():
    """`--method prototype --method-kwargs '{"encoder": "small"}'` used to keep the string as the encoder."""
    from torch import nn

    from fsmis_monai.networks.encoders import SmallEncoder
    from fsmis_monai.networks.methods import build_method

    method = build_method("prototype", encoder="small")
    assert isinstance(method.encoder, SmallEncoder) and isinstance(method.encoder, nn.Module)


def test_support_scan_without_a_class_is_named_before_any_query(chaos_dir, tmp_path, capsys):
    """Support scan 1 without its spleen: one line naming the scan (id, label file), the class (id, name) and
    the ways out, before any query is segmented or anything written."""
    import nibabel as nib
    import numpy as np

    from fsmis_monai.io import save_nifti

    from _real_scans import liver_window

    data = liver_window(chaos_dir, tmp_path / "data", (1, 2), n_slices=6)
    label = data / "label_1.nii.gz"
    img = nib.load(label)
    mask = np.asarray(img.dataobj)
    save_nifti(label, np.where(mask == 4, 0, mask).astype(np.uint8), affine=img.affine)  # no spleen
    out = tmp_path / "out"
    code = main(["evaluate", "--dataset-dir", str(data), "--output-dir", str(out), "--query-ids", "2",
                 "--support-id", "1", "--protocols", "ep1", "--method", "prototype", "--no-progress",
                 "--device", "cpu", "--dataset", "chaos", "--classes", "liver,spleen"])
    assert code == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {label}: support scan 1 ") and "class 4 (spleen)" in line, line
    assert "support_id" in line and "classes: [1]" in line, line
    assert not out.exists()  # nothing segmented, nothing written

"""``fsmis datalist``: pairing by id over the real CHAOS files, folds as in docs/reference.md#folds-and-support-scans,
errors naming files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.data import load_decathlon_datalist

from fsmis_monai.cli import main

CHAOS_IDS = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39]
# docs/reference.md#folds-and-support-scans, Q-Net family: fold 1 lists scans 8, 10, 13, 15, 19; the support is the 3rd (13)
FOLD1_SUPPORT, FOLD1_QUERIES = 13, [8, 10, 15, 19]


def link_chaos(chaos_dir: Path, dst: Path, ids=CHAOS_IDS, pseudo: Path | None = None) -> Path:
    """A data folder of links to the real scans (the datalist reads names, the links keep it cheap)."""
    dst.mkdir(parents=True, exist_ok=True)
    for i in ids:
        for kind in ("image", "label"):
            (dst / f"{kind}_{i}.nii.gz").symlink_to(chaos_dir / f"{kind}_{i}.nii.gz")
        if pseudo is not None:
            pseudo.mkdir(exist_ok=True)
            (pseudo / f"superpix-MIDDLE_{i}.nii.gz").symlink_to(chaos_dir / f"label_{i}.nii.gz")
    return dst


def test_datalist_folds_pair_by_id_and_load_with_monai(tmp_path, chaos_dir):
    data = link_chaos(chaos_dir, tmp_path / "chaos", pseudo=tmp_path / "sv")
    out = tmp_path / "lists" / "chaos.json"
    assert main(["datalist", str(data), "--dataset", "chaos", "--pseudolabels", str(tmp_path / "sv"),
                 "--output", str(out)]) == 0
    raw = json.loads(out.read_text())
    assert [d["id"] for d in raw["training"]] == CHAOS_IDS
    assert raw["folds"]["1"]["support_id"] == FOLD1_SUPPORT
    support = load_decathlon_datalist(str(out), data_list_key="fold1_support")
    queries = load_decathlon_datalist(str(out), data_list_key="fold1_validation")
    train = load_decathlon_datalist(str(out), data_list_key="fold1_training")
    assert [d["id"] for d in support] == [FOLD1_SUPPORT]
    assert sorted(d["id"] for d in queries) == FOLD1_QUERIES
    assert sorted(d["id"] for d in train) == sorted(set(CHAOS_IDS) - {8, 10, 13, 15, 19})
    for d in support + queries + train:  # every item's files belong to its own id and exist
        for key, prefix in (("image", "image_"), ("label", "label_"), ("pseudolabel", "superpix-MIDDLE_")):
            assert Path(d[key]).name == f"{prefix}{d['id']}.nii.gz" and Path(d[key]).exists()
    assert not Path(raw["training"][0]["image"]).is_absolute()  # relative to the datalist file


def test_missing_and_extra_files_are_named(tmp_path, chaos_dir, capsys):
    data = link_chaos(chaos_dir, tmp_path / "chaos", ids=[1, 2, 3])
    (data / "label_2.nii.gz").unlink()
    (data / "label_7.nii.gz").symlink_to(chaos_dir / "label_5.nii.gz")
    assert main(["datalist", str(data)]) == 1
    err = capsys.readouterr().err
    assert f"{data / 'image_2.nii.gz'}: no matching label_2" in err
    assert f"{data / 'label_7.nii.gz'}: no matching image_7" in err
    assert not (data / "datalist.json").exists()


def test_missing_pseudolabel_named(tmp_path, chaos_dir, capsys):
    data = link_chaos(chaos_dir, tmp_path / "chaos", ids=[1, 2], pseudo=tmp_path / "sv")
    (tmp_path / "sv" / "superpix-MIDDLE_2.nii.gz").unlink()
    assert main(["datalist", str(data), "--pseudolabels", str(tmp_path / "sv")]) == 1
    assert f"{data / 'image_2.nii.gz'}: no matching superpix-*_2" in capsys.readouterr().err


def test_folds_need_every_scan_unless_subset(tmp_path, chaos_dir, capsys):
    present = [i for i in CHAOS_IDS if i != 13]
    data = link_chaos(chaos_dir, tmp_path / "chaos", ids=present)
    assert main(["datalist", str(data), "--dataset", "chaos"]) == 1
    assert "[13] (missing)" in capsys.readouterr().err
    assert main(["datalist", str(data), "--dataset", "chaos", "--subset", "--family", "alp", "--absolute"]) == 0
    raw = json.loads((data / "datalist.json").read_text())
    # the folds are rebuilt over the 19 present ids; no item refers to the missing scan
    listed = {d["id"] for k, v in raw.items() if k.startswith("fold") and k != "folds" for d in v}
    assert 13 not in listed and listed == set(present)
    assert Path(raw["training"][0]["image"]).is_absolute()


@pytest.mark.parametrize("family", ["qnet", "adnet", "alp"])
def test_families_support_scans(tmp_path, chaos_dir, family):
    # docs/reference.md#folds-and-support-scans, fold 4 (scans 36, 37, 38, 39, 1): support 37 (Q-Net), 39 (ADNet), 1 (ALP)
    data = link_chaos(chaos_dir, tmp_path / "chaos")
    assert main(["datalist", str(data), "--dataset", "chaos", "--family", family]) == 0
    raw = json.loads((data / "datalist.json").read_text())
    assert raw["fold4_support"][0]["id"] == {"qnet": 37, "adnet": 39, "alp": 1}[family]
    assert sorted(d["id"] for d in raw["fold4_validation"] + raw["fold4_support"]) == [1, 36, 37, 38, 39]

"""Issue 19, sections 1-3, through the user's entry points (``python -m monai.bundle run`` of a bundle's
``inference.json`` / ``train.json``, a ``fsmis freeze`` bundle, ``fsmis supervoxels``), on real CHAOS scans cut
to 64 x 64 x 6 (small encoder, random weights):

- one query, one prediction: same file names in sub-folders, ``case.nii`` beside ``case.nii.gz``, ``output_dir``
  equal to the query folder run twice (the run never segments its own outputs);
- nothing matched is an error: a DICOM series folder (or its parent), a glob matching nothing or a folder;
- inputs that are not what they seem: a 4D query of 3 volumes refused, ``(X, Y, Z, 1)`` accepted by every
  command, an all-zero pseudolabel among good ones warned about by name, a folder of them an error.

``monai.bundle.run`` is the function ``python -m monai.bundle run`` calls; one case runs the command itself
in a subprocess to check the exit status and the message a user reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run as bundle_run

from fsmis_monai.cli import main as fsmis_main
from fsmis_monai.data.volumes import training_volumes
from fsmis_monai.io import FsmisInputError, input_error_in, save_nifti
from fsmis_monai.bundles import CPU_OVERRIDES
from fsmis_monai.networks.methods import build_method

from _raw_scans import write_dicom_series
from _real_scans import write_chaos_window
from conftest import REPO_ROOT as REPO

SIZE, DEPTH = 64, 6
ADNET = REPO / "bundles" / "adnet"


@pytest.fixture(scope="module")
def scans(chaos_dir, tmp_path_factory) -> Path:
    """CHAOS scans 1 (the support) and 2, 64 x 64 x 6 through the liver."""
    return write_chaos_window(chaos_dir, tmp_path_factory.mktemp("queries") / "data", size=SIZE, depth=DEPTH)


def _query(scans: Path, path: Path, depth: int = DEPTH, scan: int = 2, volumes: int = 0) -> tuple[int, ...]:
    """Write the first ``depth`` slices of scan ``scan`` to ``path`` (``volumes`` > 0: as a 4D file of that
    many copies, axis 3); returns the stored shape."""
    src = nib.load(scans / f"image_{scan}.nii.gz")
    array = np.asarray(src.dataobj)[..., :depth]
    if volumes:
        array = np.stack([array * (1 + 0.1 * k) for k in range(volumes)], axis=-1)
    save_nifti(path, array, affine=src.affine)
    return array.shape


def _inference(scans: Path, queries: Path, output_dir: Path, bundle: Path = ADNET, **overrides) -> None:
    """``python -m monai.bundle run`` of ``bundle``'s inference.json (random weights, CPU)."""
    configs = bundle / "configs"
    args = dict(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
                logging_file=str(configs / "logging.conf"), bundle_root=str(bundle), dataset_dir=str(queries),
                output_dir=str(output_dir), device="$torch.device('cpu')")
    if bundle == ADNET:
        args.update(encoder="small", ckpt_path="$None", support_image=str(scans / "image_1.nii.gz"),
                    support_label=str(scans / "label_1.nii.gz"), support_class="liver", n_support_slices=1,
                    write_overlays=False)
    bundle_run(**{**args, **overrides})


def _input_error(call, *args, **kwargs) -> str:
    """The message of the :class:`FsmisInputError` the call ends in (MONAI wraps it)."""
    with pytest.raises(Exception) as info:
        call(*args, **kwargs)
    error = input_error_in(info.value)
    assert error is not None, f"not an input error: {info.value!r}"
    return str(error)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------- 1. one query, one prediction


def test_same_names_in_sub_folders_and_output_dir_equal_to_the_query_folder(scans, tmp_path):
    """``p2/image.nii.gz`` and ``p3/image.nii.gz`` each get a prediction (sub-folders kept under output_dir);
    with ``output_dir`` = the query folder, a second run leaves its own predictions out of the queries."""
    queries = tmp_path / "queries"
    shapes = {"p2": _query(scans, queries / "p2" / "image.nii.gz", depth=6),
              "p3": _query(scans, queries / "p3" / "image.nii.gz", depth=4, scan=1)}
    _inference(scans, queries, tmp_path / "out", query_glob="*/image.nii.gz")
    assert _files(tmp_path / "out") == ["p2/image_seg.nii.gz", "p3/image_seg.nii.gz"]
    for sub, shape in shapes.items():  # each its own query's prediction (before: one file, the last query's)
        assert nib.load(tmp_path / "out" / sub / "image_seg.nii.gz").shape == shape

    _query(scans, queries / "a.nii.gz")
    _inference(scans, queries, queries)  # default query_glob '*.nii*'
    first = np.asarray(nib.load(queries / "a_seg.nii.gz").dataobj)
    _inference(scans, queries, queries)  # again: a_seg.nii.gz is this run's output, not a query
    _inference(scans, queries, queries, query_glob="*/*.nii*")  # sub-folders: image_seg.nii.gz left out too
    assert _files(queries) == ["a.nii.gz", "a_seg.nii.gz", "p2/image.nii.gz", "p2/image_seg.nii.gz",
                               "p3/image.nii.gz", "p3/image_seg.nii.gz"]
    np.testing.assert_array_equal(np.asarray(nib.load(queries / "a_seg.nii.gz").dataobj), first)
    (queries / "a.nii.gz").unlink()  # a prediction whose query is gone is still no query
    assert _input_error(_inference, scans, queries, queries) == (
        f"{queries}: every file matching '*.nii*' (1) is a prediction of an earlier run; no query left")
    assert _files(queries) == ["a_seg.nii.gz", "p2/image.nii.gz", "p2/image_seg.nii.gz", "p3/image.nii.gz",
                               "p3/image_seg.nii.gz"]


def test_queries_with_one_prediction_name_are_refused_before_anything_is_written(scans, tmp_path):
    """``case.nii.gz`` and ``case.nii`` (two scans) would both be ``case_seg.nii.gz``: one error names both;
    a user's own file named like another query's prediction is never overwritten."""
    queries = tmp_path / "queries"
    _query(scans, queries / "case.nii.gz")
    _query(scans, queries / "case.nii", scan=1)
    message = _input_error(_inference, scans, queries, tmp_path / "out")
    assert f"{queries / 'case.nii'}, {queries / 'case.nii.gz'}: two queries, one prediction path" in message
    assert not (tmp_path / "out").exists()

    (queries / "case.nii").unlink()
    _query(scans, queries / "case_seg.nii.gz", scan=1)  # the user's scan, not a prediction
    message = _input_error(_inference, scans, queries, queries)
    assert message.startswith(f"{queries / 'case_seg.nii.gz'}: the prediction of the query {queries / 'case.nii.gz'}"
                              " would overwrite it")
    assert _files(queries) == ["case.nii.gz", "case_seg.nii.gz"]


def test_frozen_bundle_inference_follows_the_same_rule(scans, tmp_path):
    """A ``fsmis freeze`` bundle: sub-folders kept, its own outputs never taken for queries."""
    out = tmp_path / "frozen"
    torch.save(build_method("adnet", encoder="small").state_dict(), tmp_path / "adnet.pt")
    assert fsmis_main(["freeze", "--bundle", str(ADNET), "--ckpt_path", str(tmp_path / "adnet.pt"),
                       "--support-image", str(scans / "image_1.nii.gz"), "--support-label",
                       str(scans / "label_1.nii.gz"), "--class", "liver", "--output", str(out),
                       "--protocol", "ep2", "--set", 'encoder="small"']) == 0
    queries = tmp_path / "queries"
    shapes = {"p2": _query(scans, queries / "p2" / "image.nii.gz", depth=6),
              "p3": _query(scans, queries / "p3" / "image.nii.gz", depth=4, scan=1)}
    for _ in range(2):
        _inference(scans, queries, queries, bundle=out, query_glob="*/*.nii*", write_overlays=False)
    assert _files(queries) == ["p2/image.nii.gz", "p2/image_seg.nii.gz", "p3/image.nii.gz", "p3/image_seg.nii.gz"]
    for sub, shape in shapes.items():
        assert nib.load(queries / sub / "image_seg.nii.gz").shape == shape


# ------------------------------------------------------------------------------- 2. nothing matched is an error


def test_a_dicom_series_folder_is_an_error_that_says_to_convert_it(scans, tmp_path):
    """``--dataset_dir`` at a DICOM series (synthesised from the real scan): exit status 1 and the problem
    (before: exit 0, no prediction, only MONAI's line that the data loader is empty)."""
    series = tmp_path / "patient" / "T2SPIR"
    src = nib.load(scans / "image_2.nii.gz")
    write_dicom_series(np.asarray(src.dataobj)[..., :3], src.affine, series)
    configs = ADNET / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "inference.json"),
           "--meta_file", str(configs / "metadata.json"), "--bundle_root", str(ADNET), "--encoder", "small",
           "--ckpt_path", "$None", "--support_image", str(scans / "image_1.nii.gz"),
           "--support_label", str(scans / "label_1.nii.gz"), "--support_class", "liver",
           "--device", "$torch.device('cpu')", "--dataset_dir", str(series), "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{series}: no file matches '*.nii*'; DICOM series found ({series})" in proc.stderr
    assert "convert each series to a NIfTI file first" in proc.stderr
    assert not (tmp_path / "out").exists()

    # its parent (one series per sub-folder), a glob matching nothing, a glob matching a folder
    parent = tmp_path / "patient"
    message = _input_error(_inference, scans, parent, tmp_path / "out")
    assert message.startswith(f"{parent}: no file matches '*.nii*'; DICOM series found ({series})")
    _query(scans, tmp_path / "nifti" / "a.nii.gz")
    assert _input_error(_inference, scans, tmp_path / "nifti", tmp_path / "out", query_glob="*.mha") == (
        f"{tmp_path / 'nifti'}: no file matches '*.mha'")
    assert _input_error(_inference, scans, parent, tmp_path / "out", query_glob="T2*").startswith(
        f"{series}: is a folder, not a NIfTI file (matched by query_glob 'T2*'); DICOM series found")
    assert _input_error(_inference, scans, parent, tmp_path / "out", query_glob="../nifti/*.nii.gz") == (
        f"{parent / '..' / 'nifti' / 'a.nii.gz'}: query outside the query folder {parent} (query_glob "
        "'../nifti/*.nii.gz')")
    assert _input_error(_inference, scans, tmp_path / "missing", tmp_path / "out") == (
        f"{tmp_path / 'missing'}: query folder not found")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- 3. inputs not what they seem


def test_a_query_of_three_volumes_is_refused_and_one_of_a_single_volume_taken(scans, tmp_path):
    """(X, Y, Z, 3) (e.g. three echoes) is refused like (X, Y, Z, 2), not used as the network's 3 channels;
    (X, Y, Z, 1) is one volume for inference, training and ``fsmis supervoxels`` alike."""
    for n in (3, 2):
        queries = tmp_path / f"echoes{n}"
        _query(scans, queries / "echoes.nii.gz", volumes=n)
        assert _input_error(_inference, scans, queries, tmp_path / "out") == (
            f"{queries / 'echoes.nii.gz'}: holds {n} volumes (shape ({SIZE}, {SIZE}, {DEPTH}, {n})); one 3D "
            "volume per file is taken: save the volume to use (e.g. one echo) as a NIfTI of its own")
    assert not (tmp_path / "out").exists()

    single = tmp_path / "single"
    _query(scans, single / "one.nii.gz", volumes=1)
    _inference(scans, single, tmp_path / "out")
    assert nib.load(tmp_path / "out" / "one_seg.nii.gz").shape[:3] == (SIZE, SIZE, DEPTH)

    # training and fsmis supervoxels: the same rule (supervoxels refused (X, Y, Z, 1) before)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("image_1.nii.gz", "label_1.nii.gz"):
        (data / name).write_bytes((scans / name).read_bytes())
    _query(scans, data / "image_2.nii.gz", volumes=1)
    (data / "label_2.nii.gz").write_bytes((scans / "label_2.nii.gz").read_bytes())
    assert fsmis_main(["supervoxels", "--src", str(data), "--dst", str(tmp_path / "sv"), "--dataset", "chaos",
                       "--min-size", "200"]) == 0
    assert nib.load(tmp_path / "sv" / "superpix-MIDDLE_2.nii.gz").shape == (SIZE, SIZE, DEPTH)
    assert len(training_volumes(data, "chaos", fold=None)) == 2
    _query(scans, data / "image_2.nii.gz", volumes=3)
    with pytest.raises(FsmisInputError, match=r"image_2\.nii\.gz: holds 3 volumes"):
        training_volumes(data, "chaos", fold=None)
    assert fsmis_main(["supervoxels", "--src", str(data), "--dst", str(tmp_path / "sv"), "--dataset", "chaos",
                       "--overwrite"]) == 1
    summary = (tmp_path / "sv" / "supervoxels_summary.json").read_text()
    assert "image_2.nii.gz: holds 3 volumes" in summary


def _train(scans: Path, pseudo: Path, out: Path) -> None:
    """``python -m monai.bundle run`` of ADNet's train.json: one iteration at 64 px (random weights, CPU)."""
    configs = ADNET / "configs"
    bundle_run(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
               logging_file=str(configs / "logging.conf"), bundle_root=str(ADNET), dataset_dir=str(scans),
               pseudolabel_dir=str(pseudo), generate_pseudolabels=False, fold="$None", **CPU_OVERRIDES,
               image_size=64, max_iterations=1, num_workers=0, val_interval=0, progress_bar=False,
               output_dir=str(out), ckpt_path=str(out / "model.pt"), device="$torch.device('cpu')")


def test_an_all_zero_pseudolabel_is_named_and_a_folder_of_them_is_an_error(scans, tmp_path):
    pseudo = tmp_path / "pseudo"
    quadrants = np.zeros((SIZE, SIZE, DEPTH), np.int32)
    quadrants[: SIZE // 2, : SIZE // 2] = 1
    quadrants[SIZE // 2:, SIZE // 2:] = 2
    affine = nib.load(scans / "image_1.nii.gz").affine
    save_nifti(pseudo / "superpix-MIDDLE_1.nii.gz", quadrants, affine=affine)
    empty = save_nifti(pseudo / "superpix-MIDDLE_2.nii.gz", np.zeros_like(quadrants),
                       affine=nib.load(scans / "image_2.nii.gz").affine)
    with pytest.warns(UserWarning, match=rf"{empty}: pseudolabel of scan 2 holds no region .*no episode"):
        _train(scans, pseudo, tmp_path / "run")
    assert (tmp_path / "run" / "model.pt").is_file()  # the good scan trains

    save_nifti(pseudo / "superpix-MIDDLE_1.nii.gz", np.zeros_like(quadrants), affine=affine)
    with pytest.raises(Exception) as info:
        _train(scans, pseudo, tmp_path / "run2")
    error = info.value
    while error.__cause__ is not None:
        error = error.__cause__
    assert "no supervoxel ids in any training volume: every pseudolabel is all zeros" in str(error)
    assert "superpix-MIDDLE_1.nii.gz" in str(error)

"""The evaluator end to end on real scans with the prototype baseline: fast path = naive path, every output
file with the query's geometry, the CLI on CMR, resume after an interruption."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from _evaluation_data import SupportMaskModel, load, ref_assignment, subsampled_scans
from fsmis_monai.cli import main as fsmis_main
from fsmis_monai.evaluation import FewShotSliceInferer, evaluate
from fsmis_monai.data.datalist import pair_scans
from fsmis_monai.data.registry import get_dataset
from fsmis_monai.evaluation.evaluator import load_scan, to_channels
from fsmis_monai.evaluation.report import CSV_COLUMNS, read_per_case_csv
from fsmis_monai.io import FsmisInputError, torch_save
from fsmis_monai.networks.methods.prototype import PrototypeSegmenter

PROTOCOLS = ("alp", "ep1", "ep2", "senet", "whole")


def prototype_model(seed: int = 0) -> PrototypeSegmenter:
    torch.manual_seed(seed)
    return PrototypeSegmenter().eval()


def test_fast_path_equals_naive_per_slice_path(chaos_dir, tmp_path):
    """Support encoded once + slices batched (the evaluator) == support re-encoded for every single slice.

    Predictions are compared exactly in float64: in float32 a batched convolution may round differently
    from a single-slice one, which can flip a pixel whose two logits tie to 1e-7 (observed: 1 pixel in 2.4M).
    The float32 logits are compared to a tolerance below.
    """
    model = prototype_model().double()
    qid, sid, c = 1, 3, 2  # CHAOS fold 0 (qnet): support 3; right kidney
    chaos_dir = subsampled_scans(chaos_dir, tmp_path / "data", (qid, sid))  # 128 x 128 in-plane
    out = tmp_path / "eval"
    evaluate(model, chaos_dir, fold=0, protocols=("ep1",), output_dir=out, query_ids=(qid,), classes=(c,),
             sw_batch_size=4, progress=False, overlay_slices=0)
    fast = np.asarray(nib.load(str(out / "predictions" / "ep1" / str(qid) / f"class_{c}.nii.gz")).dataobj)

    _, q_lbl = load(chaos_dir, qid)
    _, s_lbl = load(chaos_dir, sid)
    # [3, X, Y, Z] with the evaluator's own loading and normalisation (this test is about the inference path)
    q, s = (to_channels(load_scan(f, get_dataset("chaos")).image) for f in pair_scans(chaos_dir, ids=(qid, sid)))
    assign, _, _ = ref_assignment("ep1", q_lbl == c, s_lbl == c)
    naive = np.zeros(q_lbl.shape, np.uint8)
    naive_logits = {}
    with torch.inference_mode():
        for z, sz in assign.items():
            mask = torch.as_tensor((s_lbl[..., sz] == c)[None], dtype=torch.float64)
            state = model.encode_support(s[..., sz][None].double(), mask)
            logits = model.segment(q[..., z][None].double(), state)[0]
            naive_logits[z] = logits
            naive[..., z] = logits.argmax(0).numpy()
    assert naive.sum() > 0
    np.testing.assert_array_equal(fast, naive)

    # float32: the batched logits agree with the per-slice ones to rounding
    model = model.float()
    zs = sorted(z for z, sz in assign.items() if sz == assign[min(assign)])
    sz = assign[zs[0]]
    inferer = FewShotSliceInferer(sw_batch_size=4)
    batched = inferer.segment_stack(model, q[..., zs], s[..., sz][None],
                                    torch.as_tensor((s_lbl[..., sz] == c)[None], dtype=torch.float32))
    assert batched.dtype == torch.float32
    for i, z in enumerate(zs):
        torch.testing.assert_close(batched[..., i].double(), naive_logits[z], atol=1e-4, rtol=1e-4)


def test_end_to_end_chaos_outputs_and_geometry(chaos_dir, tmp_path):
    data = subsampled_scans(chaos_dir, tmp_path / "data", (1, 3))
    out = tmp_path / "eval"
    summary = evaluate(prototype_model(), data, dataset="chaos", fold=0, protocols=PROTOCOLS, output_dir=out,
                       query_ids=(1,), classes=(1, 3), sw_batch_size=8, progress=False, overlay_slices=2)
    classes = (1, 3)
    rows = read_per_case_csv(out / "per_case.csv")
    assert set(CSV_COLUMNS) <= set(rows[0]) and len(rows) == len(classes) * len(PROTOCOLS)
    assert {(int(r["class"]), r["protocol"]) for r in rows} == {(c, p) for c in classes for p in PROTOCOLS}
    for r in rows:
        tp, fp, fn = int(r["tp"]), int(r["fp"]), int(r["fn"])
        assert float(r["dice"]) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert json.loads((out / "summary.json").read_text())["protocols"].keys() == set(PROTOCOLS)
    md = (out / "summary.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| class"))
    assert [h.strip() for h in header.strip("|").split("|")][1:] == list(PROTOCOLS)
    assert [line.split("|")[1].strip() for line in md if line.startswith(("| 1 ", "| 3 "))] == ["1 liver", "3 left_kidney"]
    pngs = [out / "dice_boxplot.png", *sorted((out / "overlays").glob("*.png"))]
    assert len(pngs) == 1 + 2 * len(classes)
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    query = nib.load(str(data / "image_1.nii.gz"))
    _, q_lbl = load(data, 1)
    _, s_lbl = load(data, 3)
    for p in PROTOCOLS:
        for c in classes:
            pred_img = nib.load(str(out / "predictions" / p / "1" / f"class_{c}.nii.gz"))
            pred = np.asarray(pred_img.dataobj)
            assert pred.shape == query.shape
            np.testing.assert_allclose(pred_img.affine, query.affine)
            assert set(np.unique(pred).tolist()) <= {0, 1}
            assign, _, _ = ref_assignment(p, q_lbl == c, s_lbl == c)
            unpredicted = [z for z in range(pred.shape[2]) if z not in assign]
            assert not pred[..., unpredicted].any()  # slices the protocol does not predict are 0
    assert summary["protocols"]["ep1"]["n_cases"] == len(classes)


def test_cli_on_cmr_with_and_without_checkpoint(cmr_dir, tmp_path):
    data = subsampled_scans(cmr_dir, tmp_path / "data", (1, 2, 3))  # CMR fold 0 (qnet): support = scan 3
    out = tmp_path / "untrained"
    args = ["evaluate", "--method", "prototype", "--dataset", "cmr", "--dataset-dir", str(data), "--fold", "0",
            "--query-ids", "2", "--protocols", "ep1,whole", "--output-dir", str(out), "--no-progress"]
    with pytest.warns(UserWarning, match="UNTRAINED"):
        assert fsmis_main(args) == 0
    rows = read_per_case_csv(out / "per_case.csv")
    # raw CMR labels 200/500/600 are evaluated as classes 1/2/3, all present in scan 2
    assert {(int(r["class"]), r["status"]) for r in rows} == {(1, "ok"), (2, "ok"), (3, "ok")}
    assert {int(r["support_id"]) for r in rows} == {3}
    query = nib.load(str(data / "image_2.nii.gz"))
    for p in ("ep1", "whole"):
        for c in (1, 2, 3):
            pred = nib.load(str(out / "predictions" / p / "2" / f"class_{c}.nii.gz"))
            assert pred.shape == query.shape and np.allclose(pred.affine, query.affine)

    # a trained checkpoint loads without the warning (weights_only) and changes the predictions' weights
    model = prototype_model(seed=1)
    ckpt = torch_save({"model": model.state_dict()}, tmp_path / "model.pt")
    out2 = tmp_path / "trained"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fsmis_main(args[:-2] + [str(out2), "--ckpt", str(ckpt), "--no-progress"]) == 0
    cfg_a = json.loads((out / "run_config.json").read_text())
    cfg_b = json.loads((out2 / "run_config.json").read_text())
    assert cfg_a["model_sha1"] != cfg_b["model_sha1"]


def test_resume_after_interruption_gives_the_same_report(cmr_dir, tmp_path):
    data = subsampled_scans(cmr_dir, tmp_path / "data", (1, 2, 3, 4))
    kwargs = dict(dataset="cmr", fold=0, protocols=("alp", "ep1", "whole"), query_ids=(1, 2, 4), classes=(1, 3),
                  progress=False, overlay_slices=1)
    full_model = SupportMaskModel()
    evaluate(full_model, data, output_dir=tmp_path / "full", **kwargs)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):  # dies inside the second query scan
        evaluate(SupportMaskModel(fail_after=full_model.calls // 2), data, output_dir=out, **kwargs)
    assert (out / "cases" / "fold_0" / "query_1.json").is_file()
    assert not (out / "cases" / "fold_0" / "query_2.json").exists() and not (out / "per_case.csv").exists()
    resumed_model = SupportMaskModel()
    evaluate(resumed_model, data, output_dir=out, **kwargs)
    assert 0 < resumed_model.calls < full_model.calls  # the finished query scan was skipped
    for name in ("per_case.csv", "summary.json", "summary.md"):
        assert (out / name).read_text() == (tmp_path / "full" / name).read_text()
    for f in (tmp_path / "full" / "predictions").rglob("*.nii.gz"):
        g = out / f.relative_to(tmp_path / "full")
        np.testing.assert_array_equal(np.asarray(nib.load(str(g)).dataobj), np.asarray(nib.load(str(f)).dataobj))

    with pytest.raises(FsmisInputError, match="different settings"):  # never mixes runs
        evaluate(SupportMaskModel(), data, output_dir=out, **{**kwargs, "protocols": ("ep2",)})

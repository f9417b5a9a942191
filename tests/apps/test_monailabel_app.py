"""The MONAI Label app (``apps/monailabel``) as a person uses it: a real ``monailabel start_server`` on
127.0.0.1 with a datastore of two small real CHAOS crops and a small-encoder checkpoint (random init: the
check is that the app runs the bundle's own pipeline, not that it segments well), requests as 3D Slicer's
MONAI Label plugin sends them, answers compared voxel for voxel with ``python -m monai.bundle run`` of the
bundle's ``inference.json`` for the same support.

Needs the ``[label]`` extra (``pip install -e ".[label]"``, a second virtual environment: MONAI Label pins
older libraries). Without it the module is skipped, unless ``FSMIS_REQUIRE_MONAILABEL=1`` (``.ci/run``
sets it in that second environment, so there a missing MONAI Label fails instead of skipping)."""

from __future__ import annotations

import email.parser
import email.policy
import http.client
import json
import mimetypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

if os.environ.get("FSMIS_REQUIRE_MONAILABEL") == "1":
    import monailabel  # noqa: F401  (must be importable here)
else:
    pytest.importorskip("monailabel", reason="MONAI Label app tests need the [label] extra")

import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from _real_scans import chaos_window  # noqa: E402
from fsmis_monai.engines.interactive import PAINTED_STEPS  # noqa: E402
from fsmis_monai.io import save_nifti  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BUNDLE = "adnet"
TASK = f"fsmis_{BUNDLE}"
SETTINGS = {"encoder": "small", "device": "$torch.device('cpu')"}
LIVER, SPLEEN = 1, 4  # CHAOS label values
STARTUP_S, REQUEST_S = 180, 120
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _paint(label: np.ndarray, organs: dict[int, int], z: int) -> np.ndarray:
    """A Slicer labelmap: ``organs`` {CHAOS value: segment id} painted on slice ``z`` only."""
    out = np.zeros(label.shape, np.uint8)
    for organ, segment in organs.items():
        out[..., z][label[..., z] == organ] = segment
    return out


@pytest.fixture(scope="module")
def site(chaos_dir, tmp_path_factory):
    """Datastore (two crops), painted labels, the checkpoint and a running server; stopped afterwards."""
    root = tmp_path_factory.mktemp("monailabel")
    crops = chaos_window(chaos_dir, root / "crops", (1, 2), origin=(40, 64), size=128, depth=10, step=2)
    studies = root / "studies"
    studies.mkdir()
    for i in (1, 2):
        os.link(crops / f"image_{i}.nii.gz", studies / f"chaos_{i}.nii.gz")
    truth = np.asarray(nib.load(crops / "label_1.nii.gz").dataobj)
    affine = nib.load(crops / "image_1.nii.gz").affine
    z = int(np.flatnonzero((truth == LIVER).any(axis=(0, 1))).mean())
    # Slicer's export: segment ids in segment order (liver 1, spleen 2); the person picked "liver"
    painted = save_nifti(root / "painted.nii.gz", _paint(truth, {LIVER: 1, SPLEEN: 2}, z), affine=affine)
    liver_only = save_nifti(root / "liver_only.nii.gz", _paint(truth, {LIVER: 1}, z), affine=affine)

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / BUNDLE / "configs" / "inference.json"))
    parser["encoder"] = "small"
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    ckpt = root / "model.pt"
    torch.save(net.state_dict(), ckpt)

    # an encoded support of `fsmis freeze` (the liver painted on chaos_1), offered by the server (--conf frozen)
    frozen = root / "frozen_liver"
    subprocess.run([sys.executable, "-m", "fsmis_monai", "freeze", "--bundle", str(REPO / "bundles" / BUNDLE),
                    "--ckpt_path", str(ckpt), "--support-image", str(crops / "image_1.nii.gz"),
                    "--support-label", str(liver_only), "--class", "1", "--dataset", "none", "--protocol", "ep2",
                    "--output", str(frozen), "--set", 'encoder="small"'], check=True, capture_output=True,
                   timeout=REQUEST_S, env=ENV)

    port = _free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO / "apps" / "monailabel"),
         "--studies", str(studies), "--conf", "bundle", BUNDLE, "--conf", "ckpt_path", str(ckpt),
         "--conf", "frozen", str(frozen), "--conf", "set", json.dumps(SETTINGS), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                with urllib.request.urlopen(url + "/info/", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"server did not start: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": url, "port": port, "root": root, "crops": crops, "studies": studies, "ckpt": ckpt,
               "painted": painted, "liver_only": liver_only, "z": z, "frozen": frozen}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


# ------------------------------------------------------------------------------------------------ helpers


def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[str, bytes]:
    """The body the Slicer plugin builds (``MONAILabelUtils.encode_multipart_formdata``): its boundary, the
    fields, then each file with its temp-file name and the mimetypes content type, CRLF line ends."""
    limit = "----------lImIt_of_THE_fIle_eW_$"
    lines: list[bytes] = []
    for key, value in fields.items():
        lines += [f"--{limit}".encode(), f'Content-Disposition: form-data; name="{key}"'.encode(), b"",
                  value.encode()]
    for key, path in files.items():
        kind = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
        lines += [f"--{limit}".encode(), f'Content-Disposition: form-data; name="{key}"; filename="{path}"'.encode(),
                  f"Content-Type: {kind}".encode(), b"", path.read_bytes()]
    lines += [f"--{limit}--".encode(), b""]
    return f"multipart/form-data; boundary={limit}", b"\r\n".join(lines) + b"\r\n"


def _post(site, path: str, params: dict, label: Path | None = None) -> tuple[int, str, bytes]:
    content_type, body = _multipart({"params": json.dumps(params)}, {"label": label} if label else {})
    conn = http.client.HTTPConnection("127.0.0.1", site["port"], timeout=REQUEST_S)
    conn.request("POST", path, body, {"content-type": content_type, "content-length": str(len(body))})
    r = conn.getresponse()
    return r.status, r.getheader("content-type", ""), r.read()


def _answer(content_type: str, body: bytes, out: Path) -> tuple[dict, nib.Nifti1Image]:
    """The multipart answer: ``params`` (JSON) and the result image, written to ``out``."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
    out.write_bytes(parts["image"].get_payload(decode=True))
    return json.loads(parts["params"].get_content()), nib.load(out)


def _bundle_run(tmp: Path, query: Path, overrides: dict, bundle: Path | None = None) -> np.ndarray:
    """``python -m monai.bundle run`` of a bundle's inference.json on ``query`` -> the written prediction."""
    bundle = bundle or REPO / "bundles" / BUNDLE
    queries, out = tmp / "queries", tmp / "pred"
    queries.mkdir(parents=True)
    os.link(query, queries / query.name)
    args = {"dataset_dir": str(queries), "output_dir": str(out), "write_overlays": False, **overrides}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle)]
    for k, v in args.items():
        cmd += [f"--{k}", v if isinstance(v, str) else repr(v)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=REQUEST_S, cwd=tmp,
                   env=ENV)
    (pred,) = out.glob("*_seg.nii.gz")
    return np.asarray(nib.load(pred).dataobj)


def _painted_support_run(site, tmp: Path, query: int) -> np.ndarray:
    """The bundle's inference.json with the liver painted on chaos_1 as the support (every painted slice, the
    label read as the user's own mask), segmenting chaos_``query``."""
    return _bundle_run(tmp, site["crops"] / f"image_{query}.nii.gz", {
        "support_image": str(site["crops"] / "image_1.nii.gz"), "support_label": str(site["liver_only"]),
        "support_class": 1, "n_support_slices": None, "dataset_name": None,
        "whole_scan_steps": list(PAINTED_STEPS),
        "ckpt_path": str(site["ckpt"]),
        **SETTINGS})


def _slicer_params(site) -> dict:
    """What ``onUpdateScribbles`` sends: the task's config, roi, label_info, selected_label_name, client_id."""
    info = json.loads(urllib.request.urlopen(site["url"] + "/info/", timeout=10).read())
    params = {k: v[0] if isinstance(v, list) else v for k, v in info["models"][TASK]["config"].items()}
    params.update(roi=[], label_info=[{"name": "liver", "id": 1}, {"name": "spleen", "id": 2}],
                  selected_label_name="liver", client_id="user-xyz")
    return params


# -------------------------------------------------------------------------------------------------- tests


def test_info_lists_the_scribbles_task(site):
    info = json.loads(urllib.request.urlopen(site["url"] + "/info/", timeout=10).read())
    task = info["models"][TASK]
    assert task["type"] == "scribbles" and task["dimension"] == 3  # Slicer uploads the label only for scribbles
    assert "liver" in task["labels"] and "spleen" in task["labels"]


def test_slicer_request_matches_inference_json(site, tmp_path):
    status, kind, body = _post(site, f"/infer/{TASK}?image=chaos_1", _slicer_params(site), site["painted"])
    assert status == 200, body[:500]
    params, result = _answer(kind, body, tmp_path / "result.nii.gz")
    image = nib.load(site["studies"] / "chaos_1.nii.gz")
    assert result.shape == image.shape and np.allclose(result.affine, image.affine)
    expected = _painted_support_run(site, tmp_path, query=1)
    got = np.asarray(result.dataobj)
    # the painted slice comes back exactly as painted (the crops' slice axis is the stored last one), every
    # other slice is inference.json's prediction
    z, paint = site["z"], np.asarray(nib.load(site["liver_only"]).dataobj) == 1
    assert np.array_equal(got[..., z], paint[..., z].astype(got.dtype))
    others = np.arange(got.shape[-1]) != z
    assert np.array_equal(got[..., others], expected[..., others])
    assert params["painted_slices"] == 1 and params["support_image"] == "chaos_1"
    assert params["labelled_slices"] == int((got > 0).any(axis=(0, 1)).sum())


def test_support_applied_to_another_image(site, tmp_path):
    """The second use: the label painted on chaos_1 segments chaos_2 (one request)."""
    params = {"support_image": "chaos_1", "support_class": 1}
    status, kind, body = _post(site, f"/infer/{TASK}?image=chaos_2", params, site["liver_only"])
    assert status == 200, body[:500]
    answer, result = _answer(kind, body, tmp_path / "result.nii.gz")
    image = nib.load(site["studies"] / "chaos_2.nii.gz")
    assert result.shape == image.shape and np.allclose(result.affine, image.affine)
    expected = _painted_support_run(site, tmp_path, query=2)
    assert np.array_equal(np.asarray(result.dataobj), expected)
    assert answer["support_image"] == "chaos_1"


def _refusal(site, path: str, params: dict, label: Path | None) -> tuple[int, str]:
    status, _, body = _post(site, path, params, label)
    detail = json.loads(body)["detail"]
    # the server keeps serving
    assert urllib.request.urlopen(site["url"] + "/info/", timeout=10).status == 200
    return status, detail


def test_bad_requests_get_a_one_line_reason(site, tmp_path):
    image = nib.load(site["studies"] / "chaos_1.nii.gz")
    empty = save_nifti(tmp_path / "empty.nii.gz", np.zeros(image.shape, np.uint8), affine=image.affine)
    small = save_nifti(tmp_path / "small.nii.gz", np.ones((8, 8, 4), np.uint8), affine=image.affine)
    not_nifti = tmp_path / "scribble.nii.gz"
    not_nifti.write_bytes(b"not an image")
    cases = [
        (f"/infer/{TASK}?image=chaos_1", None, 422, "no label uploaded"),
        (f"/infer/{TASK}?image=chaos_1", empty, 422, "is empty"),
        (f"/infer/{TASK}?image=chaos_1", small, 422, "shape (8, 8, 4) differs"),
        (f"/infer/{TASK}?image=chaos_1", small, 422, "params.support_image"),  # the other use, named
        (f"/infer/{TASK}?image=chaos_1", not_nifti, 422, "not a NIfTI image"),
        (f"/infer/{TASK}?image=nobody", site["painted"], 404, "'nobody': no such image"),
    ]
    for path, label, code, reason in cases:
        status, detail = _refusal(site, path, _slicer_params(site), label)
        assert (status, "\n" in detail) == (code, False) and reason in detail, (path, label, status, detail)
        assert "/tmp" not in detail, detail  # never the server's temp-file name of the upload
    # a segment Slicer names that the label does not hold
    status, detail = _refusal(site, f"/infer/{TASK}?image=chaos_1",
                              {**_slicer_params(site), "selected_label_name": "kidney"}, site["painted"])
    assert status == 422 and "'kidney' is not one of the uploaded segments" in detail


def test_frozen_support_from_fsmis_freeze(site, tmp_path):
    """An encoded support of ``fsmis freeze`` the server offers (no label uploaded) segments another image of
    the datastore as the frozen bundle's own inference.json does; a folder the server does not offer is
    refused (bundle configs execute Python: a request must not pick any folder of the server's disk)."""
    frozen = site["frozen"]
    status, kind, body = _post(site, f"/infer/{TASK}?image=chaos_2", {"frozen": frozen.name})
    assert status == 200, body[:500]
    answer, result = _answer(kind, body, tmp_path / "result.nii.gz")
    expected = _bundle_run(tmp_path, site["crops"] / "image_2.nii.gz", {"device": SETTINGS["device"]}, bundle=frozen)
    assert np.array_equal(np.asarray(result.dataobj), expected)
    assert answer["frozen"] == str(frozen) and "labelled_slices" in answer
    status, detail = _refusal(site, f"/infer/{TASK}?image=chaos_2", {"frozen": str(REPO / "bundles" / BUNDLE)}, None)
    assert status == 422 and "not one of the frozen supports the server was started with" in detail


def test_batch_applies_a_saved_label_to_every_other_image(site, tmp_path):
    """Slicer's "Submit Label" saves the painted label of chaos_1; a batch request segments chaos_2 with it
    and saves the result in the datastore (label tag ``original``), equal to inference.json's prediction."""
    content_type, body = _multipart({"params": "{}"}, {"label": site["liver_only"]})
    conn = http.client.HTTPConnection("127.0.0.1", site["port"], timeout=REQUEST_S)
    conn.request("PUT", "/datastore/label?image=chaos_1&tag=final", body, {"content-type": content_type})
    r = conn.getresponse()
    assert r.status == 200, r.read()[:500]
    r.read()
    req = urllib.request.Request(
        f"{site['url']}/batch/infer/{TASK}?images=unlabeled&run_sync=true", method="POST",
        # no multi_gpu / device keys: the app defaults them on a machine without GPU (MONAI Label 0.8.5's batch
        # infer divides by the GPU count otherwise)
        data=json.dumps({"support_image": "chaos_1", "support_class": 1}).encode(),
        headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=STARTUP_S) as r:
        assert r.status == 200
    saved = site["studies"] / "labels" / "original" / "chaos_2.nii.gz"
    assert saved.is_file()
    assert np.array_equal(np.asarray(nib.load(saved).dataobj), _painted_support_run(site, tmp_path, query=2))

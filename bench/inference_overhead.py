"""What the few-shot inference pipeline costs around the network (issue 12).

``inference.json`` prepares each query volume with the model's data contract (load, orientation, spacing,
intensity, in-plane fit), runs the network slice by slice against the encoded support
(:class:`fsmis_monai.engines.inference.FewShotVolumeInferer`), then argmax, ``Invertd`` back to the query
file's own geometry, the NIfTI write and the overlay PNG. This bench runs exactly those transform objects
(``query_preprocessing`` / ``prediction_postprocessing``, one by one so each is timed) on real CHAOS scan 20,
stored as it is (256 x 256 x 31, 1.25 x 1.25 x 7.7 mm: the spatial steps have nothing to do) and re-gridded to
0.8 x 0.8 x 4 mm (400 x 400 x 59, as a user's own scan may come: spacing and inversion resample), and reports
the overhead (everything but the network) as a ratio to the network's own time, in CPU seconds
(``time.process_time``, all threads) and wall seconds, ``--repeats`` times in one process.

Command (see bench/RESULTS.md):

    python bench/inference_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import LoadImage, Spacing

from fsmis_monai.data.contract import contract_from_scans
from fsmis_monai.engines.inference import (
    FewShotVolumeInferer,
    load_support,
    prediction_postprocessing,
    query_preprocessing,
)
from fsmis_monai.networks.methods import build_method

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chaos_mr_t2"
NETWORK = "network"


def _stage(t) -> str:
    return type(t).__name__.removesuffix("d").replace("LoadNifti", "Load")


def _queries(out: Path) -> dict[str, Path]:
    src = DATA / "image_20.nii.gz"
    img = LoadImage(image_only=True, ensure_channel_first=True)(str(src))
    zooms = nib.load(str(src)).header.get_zooms()[:3]
    pixdim = (0.8, 0.8, 4.0)
    cover = [int(np.ceil((n - 1) * z / p - 1e-6)) + 1 for n, z, p in zip(img.shape[1:], zooms, pixdim)]
    regrid = Spacing(pixdim=pixdim, mode="bilinear")(img, output_spatial_shape=cover)
    out.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(regrid[0].numpy(), regrid.affine.numpy()), str(out / "regridded.nii.gz"))
    return {"stored": src, "regridded": out / "regridded.nii.gz"}


def _time(fn, times: dict, name: str):
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    c, w = time.process_time() - c0, time.perf_counter() - w0
    prev = times.get(name, (0.0, 0.0))
    times[name] = (prev[0] + c, prev[1] + w)
    return result


def run_once(path: Path, pre, post, inferer, net) -> dict[str, tuple[float, float]]:
    times: dict[str, tuple[float, float]] = {}
    d = {"image": str(path)}
    for t in pre.transforms:
        d = _time(lambda: t(d), times, _stage(t))
    with torch.no_grad():
        d["pred"] = _time(lambda: inferer(d["image"][None], net)[0], times, NETWORK)
    for t in post.transforms:
        d = _time(lambda: t(d), times, _stage(t))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="adnet")
    parser.add_argument("--encoder", default="deeplabv3_resnet101", help="the bundle's encoder (small: tiny)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_method(args.method, encoder=args.encoder).eval()  # the weights do not change the time
    contract = contract_from_scans([DATA / f"image_{i}.nii.gz" for i in (1, 2, 3)], "chaos")
    inferer = FewShotVolumeInferer(*load_support(DATA / "image_15.nii.gz", DATA / "label_15.nii.gz", "liver", 3,
                                                 contract=contract))
    pre = query_preprocessing(contract)
    with tempfile.TemporaryDirectory() as tmp:
        queries = _queries(Path(tmp) / "queries")
        post = prediction_postprocessing(pre, Path(tmp) / "pred", "fewshot", False, True)
        print(f"{args.method} ({args.encoder}), {args.threads} threads; contract {contract.orientation} "
              f"{contract.spacing} mm, {contract.normalization}; CPU s / wall s per stage")
        for name, path in queries.items():
            shape = nib.load(str(path)).shape
            ratios, rows = [], []
            for r in range(args.repeats):
                times = run_once(path, pre, post, inferer, net)
                cpu_net, wall_net = times[NETWORK]
                cpu_over = sum(c for k, (c, _) in times.items() if k != NETWORK)
                wall_over = sum(w for k, (_, w) in times.items() if k != NETWORK)
                ratios.append(cpu_over / cpu_net)
                rows.append(times)
                print(f"{name} {shape} repeat {r + 1}: network {cpu_net:.2f} / {wall_net:.2f}, overhead "
                      f"{cpu_over:.2f} / {wall_over:.2f}, ratio CPU {cpu_over / cpu_net:.3f} wall "
                      f"{wall_over / wall_net:.3f}")
            stages = rows[0].keys()
            print(f"  median per stage (CPU s): " + ", ".join(
                f"{k} {statistics.median(t[k][0] for t in rows):.3f}" for k in stages))
            print(f"  overhead / network (CPU time), median of {args.repeats}: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()

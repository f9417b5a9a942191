"""The MONAI Label app's two figures (issue 22): quality against the no-learning floor, and latency.

Both run the code path of the app's infer task, :func:`fsmis_monai.engines.interactive.segment_with_bundle`
(the bundle's ``inference.json`` with a painted support), in this process (no HTTP: the server adds the
upload, the request parsing and the NIfTI download, a few tens of ms for these volumes).

    # quality: paint each organ on its middle slice of a held-out CHAOS scan, segment the scan
    python bench/label_app.py quality --bundle qnet --ckpt PATH [--set '{"encoder": "small"}'] --ids 1 2 5 8
    # latency: painted slice in, volume out, a 256 x 256 x 40 scan, small encoder and a paper encoder
    python bench/label_app.py latency --bundle qnet [--ckpt PATH] [--encoders small qnet_resnet101]

Quality: the app against the floor "copy the painted mask to every slice", both scored with Dice over the
scan's slices holding the organ (the floor has nothing to say outside them), and the app's Dice over the
whole scan. Latency without ``--ckpt``: the bundle's network at random init (time does not depend on the
weights), saved to a temporary checkpoint; CPU seconds (``time.process_time``) beside wall seconds, since
on a shared machine the wall time measures the other processes too (``--threads 1``: CPU time = the wall
time of an idle core). Tables are printed as Markdown; ``--json`` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "chaos_mr_t2"
ORGANS = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}  # CHAOS raw label values


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def paint_middle(label: np.ndarray, value: int) -> tuple[np.ndarray, int]:
    """The organ ``value`` on its middle slice only (what a person paints), as a 0/1 mask; and that slice."""
    zs = np.flatnonzero((label == value).any(axis=(0, 1)))
    z = int(zs[len(zs) // 2])
    painted = np.zeros(label.shape, np.uint8)
    painted[..., z] = label[..., z] == value
    return painted, z


def segment(bundle: Path, image: Path, painted: Path, overrides: dict, out: Path) -> Path:
    from fsmis_monai.engines.interactive import segment_with_bundle, support_overrides

    return segment_with_bundle(bundle, image, out, {**overrides, **support_overrides(image, painted, 1)})


def quality(args: argparse.Namespace) -> dict:
    from fsmis_monai.io import save_nifti

    bundle, rows = REPO / "bundles" / args.bundle, []
    overrides = {**json.loads(args.set), "ckpt_path": str(args.ckpt)}
    with tempfile.TemporaryDirectory() as tmp:
        for i in args.ids:
            image = args.data / f"image_{i}.nii.gz"
            nii = nib.load(args.data / f"label_{i}.nii.gz")
            label = np.asarray(nii.dataobj)
            for organ in args.organs:
                truth = label == ORGANS[organ]
                painted, z = paint_middle(label, ORGANS[organ])
                painted_file = save_nifti(Path(tmp) / f"painted_{i}_{organ}.nii.gz", painted, affine=nii.affine)
                pred = np.asarray(nib.load(segment(bundle, image, painted_file, overrides, Path(tmp) / f"{i}_{organ}")).dataobj) > 0
                organ_slices = truth.any(axis=(0, 1))
                copy = np.broadcast_to(painted[..., z:z + 1].astype(bool), truth.shape)
                rows.append({"scan": i, "organ": organ, "slice": z,
                             "copy": dice(copy[..., organ_slices], truth[..., organ_slices]),
                             "app": dice(pred[..., organ_slices], truth[..., organ_slices]),
                             "app_whole": dice(pred, truth),
                             "labelled_slices": int(pred.any(axis=(0, 1)).sum()),
                             "organ_slices": int(organ_slices.sum())})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nweights: {args.ckpt} ({args.bundle}, {args.set})\n")
    print("| organ | scans | copy (organ slices) | app (organ slices) | app (whole scan) | slices labelled / organ |")
    print("|---|---|---|---|---|---|")
    for organ in args.organs + ["mean"]:
        rs = [r for r in rows if organ in (r["organ"], "mean")]
        m = {k: statistics.mean(r[k] for r in rs) for k in ("copy", "app", "app_whole", "labelled_slices",
                                                             "organ_slices")}
        print(f"| {organ} | {len({r['scan'] for r in rs})} | {m['copy']:.3f} | {m['app']:.3f} | {m['app_whole']:.3f} "
              f"| {m['labelled_slices']:.1f} / {m['organ_slices']:.1f} |")
    return {"weights": str(args.ckpt), "bundle": args.bundle, "set": args.set, "rows": rows}


def latency(args: argparse.Namespace) -> dict:
    import torch
    from monai.bundle import ConfigParser

    from fsmis_monai.io import save_nifti

    torch.set_num_threads(args.threads)
    bundle, results = REPO / "bundles" / args.bundle, []
    nii = nib.load(args.data / f"image_{args.scan}.nii.gz")
    label = np.asarray(nib.load(args.data / f"label_{args.scan}.nii.gz").dataobj)
    image = np.asarray(nii.dataobj).astype(np.float32)
    depth = args.depth  # the scan padded (edge) or cut to 256 x 256 x depth
    image = np.pad(image, ((0, 0), (0, 0), (0, max(0, depth - image.shape[2]))), mode="edge")[..., :depth]
    label = np.pad(label, ((0, 0), (0, 0), (0, max(0, depth - label.shape[2]))))[..., :depth]
    with tempfile.TemporaryDirectory() as tmp:
        scan = save_nifti(Path(tmp) / "scan.nii.gz", image, affine=nii.affine)
        painted = save_nifti(Path(tmp) / "painted.nii.gz", paint_middle(label, ORGANS["liver"])[0], affine=nii.affine)
        paper = json.loads((bundle / "configs" / "inference.json").read_text())["encoder"]
        for encoder in args.encoders or ["small", paper]:
            ckpt = args.ckpt
            if ckpt is None:
                parser = ConfigParser()
                parser.read_config(str(bundle / "configs" / "inference.json"))
                parser["encoder"] = encoder
                ckpt = Path(tmp) / f"{encoder}.pt"
                torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
            overrides = {**json.loads(args.set), "encoder": encoder, "ckpt_path": str(ckpt), "device": "$torch.device('cpu')"}
            times, cpu = [], []
            for r in range(args.repeats + 1):  # the first run warms caches (imports, page cache); not counted,
                # unless --repeats 0
                t, c = time.perf_counter(), time.process_time()
                segment(bundle, scan, painted, overrides, Path(tmp) / f"out_{encoder}_{r}")
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            results.append({"encoder": encoder, "seconds": times[1:] or times, "cpu_seconds": cpu[1:] or cpu,
                            "first": times[0],
                            "load_average": os.getloadavg()[0]})
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{args.bundle}, 256 x 256 x {depth} scan, liver painted on 1 slice, CPU, {args.threads} threads\n")
    print("| encoder | weights | CPU s (median) | wall s (median) | first call wall s | load average |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['encoder']} | {args.ckpt or 'random init'} | {statistics.median(r['cpu_seconds']):.2f} "
              f"| {statistics.median(r['seconds']):.2f} | {r['first']:.2f} | {r['load_average']:.1f} |")
    return {"bundle": args.bundle, "depth": depth, "threads": args.threads, "results": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--ckpt", type=Path, required=True)
    q.add_argument("--ids", type=int, nargs="+", default=[1, 2, 5, 8])  # fold 0's query scans (Q-Net family)
    q.add_argument("--organs", nargs="+", default=list(ORGANS), choices=list(ORGANS))
    lat = sub.add_parser("latency")
    lat.add_argument("--ckpt", type=Path, default=None)
    lat.add_argument("--encoders", nargs="+", default=None, help="default: small and the bundle's paper encoder")
    lat.add_argument("--scan", type=int, default=1)
    lat.add_argument("--depth", type=int, default=40)
    lat.add_argument("--repeats", type=int, default=3)
    lat.add_argument("--threads", type=int, default=2)
    for s in (q, lat):
        s.add_argument("--bundle", default="qnet")
        s.add_argument("--set", default="{}", help="JSON object of inference.json overrides (e.g. the encoder)")
        s.add_argument("--data", type=Path, default=DATA)
        s.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    out = quality(args) if args.command == "quality" else latency(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

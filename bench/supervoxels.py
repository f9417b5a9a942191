"""Benchmark of the supervoxel / superpixel pseudolabels (issue 3). One command, ratios measured in one run.

Per scan (CHAOS: min_size 5000, CMR: 1000):
  * ``cmd s``: wall time of the whole ``fsmis supervoxels`` command on a folder holding only that scan
    (fresh process: interpreter start, imports, load, compute, body mask, atomic write);
  * ``argsort s``: one ``np.argsort`` (float64, default kind) of that scan's 13*N edge costs, in this
    process, right after the command: the yardstick of the issue's target (ratio <= 1.5);
  * ``peak MiB``: peak RSS of the command's process (target <= 1024 for CHAOS);
  * ``n``: supervoxels written.
With ``--reference DIR`` (the Q-Net repository's ``data`` folder, extracted outside the project) also:
  * ``mask``: body mask identical to the published file; ``ARI``: adjusted Rand index against the published
    partition over the whole volume (background is one region), ``ARI body``: inside the body only;
  * ``faithful == pub``: ``make_supervoxels(faithful=True)`` (NumPy 1.x argsort tie order) is byte-identical
    to the published array; ``faithful cpu ratio``: its CPU time over the argsort's;
  * ``ARI argsort``: the same merging run on the reference's own edge order (NumPy ``argsort`` of float64
    costs in the reference's layout, i.e. the published algorithm on today's NumPy) against the published
    file: how far tie order alone moves the result.
Then: ``--workers 1`` vs ``--workers 2`` on a folder of CHAOS scans, and 2D superpixels vs a plain
per-slice scikit-image loop.

Other processes share the machine, so absolute times fluctuate; each ratio compares two timings taken
back to back in the same run.

    python bench/supervoxels.py --reference /work/qnet_ref/data
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FSMIS_DATA", REPO.parent / "shared" / "data"))
DATASETS = {  # name -> (folder, --dataset, min_size, published folder under --reference)
    "chaos": (DATA / "chaos_mr_t2", "chaos", 5000, "CHAOST2/supervoxels_5000"),
    "cmr": (DATA / "cmr_bssfp", "cmr", 1000, "CMR/supervoxels_1000"),
}
# the reference's 13 directions as (dz, dy, dx) in the order it concatenates them (docs/reference.md#supervoxels)
REFERENCE_DIRECTIONS = [(0, 1, 0), (0, 1, 1), (0, 0, 1), (0, 1, -1), (1, 1, 0), (1, 1, 1), (1, 0, 1), (1, -1, 0),
                        (1, -1, -1), (1, 0, -1), (1, 1, -1), (1, -1, 1), (1, 0, 0)]


# runs the CLI and reports the process's own peak RSS (VmHWM): ru_maxrss would include the memory of this
# (large) benchmark process, which the child inherits until exec
_WRAPPER = (
    "import sys\n"
    "from fsmis_monai.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "sys.stderr.write(f'\\nPEAK_KB {hwm}\\n')\n"
    "sys.exit(rc)\n"
)


def run_command(args: list[str]) -> dict[str, float]:
    """Wall and CPU seconds and peak RSS (MiB) of the ``fsmis`` CLI with ``args`` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"fsmis {' '.join(args)} failed:\n{stderr}")
    peak = [line.split()[1] for line in stderr.splitlines() if line.startswith("PEAK_KB")]
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak": int(peak[0]) / 1024 if peak else float("nan")}


def reference_costs(image_xyz: np.ndarray, spacing_xyz) -> tuple[np.ndarray, np.ndarray]:
    """The reference's float64 edge costs (rescaled volume, its direction order and weights, spacing read
    as ITK prints it) and, for each, our edge id ``direction * N + voxel`` of the same voxel pair."""
    from fsmis_monai._felzenszwalb3d import OFFSETS

    img = 255.0 * (image_xyz - image_xyz.min()) / np.ptp(image_xyz)
    vol = np.ascontiguousarray(img.transpose(2, 1, 0))
    sz, sx = (np.float64(float(str(np.float32(v)))) for v in (spacing_xyz[2], spacing_xyz[0]))
    s = sz / sx
    voxel = np.arange(vol.size, dtype=np.int64).reshape(vol.shape)
    costs, ids = [], []
    for off in REFERENCE_DIRECTIONS:
        moved = sum(o != 0 for o in off)
        w = 1.0 if off[0] == 0 else (s ** 2 if moved == 1 else (np.sqrt(moved - 1 + s ** 2) / np.sqrt(moved)) ** 2)
        low = tuple(slice(1 if o < 0 else 0, n - (1 if o > 0 else 0)) for o, n in zip(off, vol.shape))
        high = tuple(slice(1 if o > 0 else 0, n - (1 if o < 0 else 0)) for o, n in zip(off, vol.shape))
        costs.append(np.sqrt(w * (vol[high] - vol[low]) ** 2).ravel())
        ids.append((OFFSETS.index(off) * vol.size + voxel[low]).ravel())
    return np.concatenate(costs), np.concatenate(ids)


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """ARI of two labelings from their contingency table (Hubert & Arabie 1985)."""
    _, ai = np.unique(a.ravel(), return_inverse=True)
    _, bi = np.unique(b.ravel(), return_inverse=True)
    table = np.unique(ai.astype(np.int64) * (bi.max() + 1) + bi, return_counts=True)[1].astype(np.float64)
    pairs = lambda counts: float(np.sum(counts * (counts - 1) / 2))  # noqa: E731
    index = pairs(table)
    rows, cols = pairs(np.bincount(ai).astype(np.float64)), pairs(np.bincount(bi).astype(np.float64))
    expected = rows * cols / pairs(np.array([float(a.size)]))
    return (index - expected) / ((rows + cols) / 2 - expected)


def argsort_order_supervoxels(costs, ids, order, shape_zyx, min_size, rescaled_xyz) -> np.ndarray:
    """The published algorithm's result on today's NumPy: our merge code on the reference's argsort order."""
    from fsmis_monai import _felzenszwalb3d
    from fsmis_monai.pseudolabels import body_mask_volume

    words = (np.arange(order.size, dtype=np.uint64) << np.uint64(32)) | ids[order].astype(np.uint64)
    seg = _felzenszwalb3d.merge_in_order(words, costs[order], shape_zyx, 1.0 / 255.0, min_size)
    seg = seg.transpose(2, 1, 0).copy()
    seg[seg == 0] = seg.max() + 1
    seg[~body_mask_volume(rescaled_xyz, 10.0)] = 0
    return seg


def bench_scans(name: str, limit: int | None, reference: Path | None, tmp: Path) -> list[dict]:
    from fsmis_monai.pseudolabels import make_supervoxels

    folder, dataset, min_size, ref_sub = DATASETS[name]
    images = sorted(folder.glob("image_*.nii.gz"), key=lambda p: int(p.name.split("_")[1].split(".")[0]))[:limit]
    rows = []
    for path in images:
        sid = int(path.name.split("_")[1].split(".")[0])
        src, dst = tmp / f"{name}_{sid}_src", tmp / f"{name}_{sid}_dst"
        src.mkdir()
        (src / path.name).symlink_to(path)
        cmd = run_command(["supervoxels", "--src", str(src), "--dst", str(dst), "--dataset", dataset, "--workers", "1"])
        img = nib.load(str(path))
        image = np.asarray(img.dataobj)
        costs, ids = reference_costs(image, img.header.get_zooms()[:3])
        start, cpu_start = time.perf_counter(), time.process_time()
        order = np.argsort(costs)
        yardstick, yardstick_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        ours = np.asarray(nib.load(str(dst / f"superpix-MIDDLE_{sid}.nii.gz")).dataobj)
        row = {"scan": f"{name} {sid}", "voxels": image.size, "edges": costs.size, "cmd s": cmd["wall"],
               "argsort s": yardstick, "ratio": cmd["wall"] / yardstick, "cpu ratio": cmd["cpu"] / yardstick_cpu,
               "peak MiB": cmd["peak"], "n": len(np.unique(ours)) - 1}
        if reference is not None:
            published = np.asarray(nib.load(str(reference / ref_sub / f"superpix-MIDDLE_{sid}.nii.gz")).dataobj)
            body = published > 0
            rescaled = 255.0 * (image - image.min()) / np.ptp(image)
            theirs = argsort_order_supervoxels(costs, ids, order, image.shape[::-1], min_size, rescaled)
            start = time.process_time()
            faithful = make_supervoxels(image, img.header.get_zooms()[:3], min_size=min_size, faithful=True)
            faithful_cpu = time.process_time() - start
            row.update({"n pub": len(np.unique(published)) - 1, "mask": bool(np.array_equal(ours > 0, body)),
                        "faithful == pub": bool(np.array_equal(faithful, published)),
                        "faithful cpu ratio": faithful_cpu / yardstick_cpu,
                        "ARI": adjusted_rand_index(ours, published), "ARI body": adjusted_rand_index(ours[body], published[body]),
                        "ARI argsort": adjusted_rand_index(theirs, published),
                        "ARI argsort body": adjusted_rand_index(theirs[body], published[body])})
        del costs, ids, order
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def bench_folder(count: int, tmp: Path) -> dict:
    folder = DATASETS["chaos"][0]
    src = tmp / "folder_src"
    src.mkdir()
    for path in sorted(folder.glob("image_*.nii.gz"))[:count]:
        (src / path.name).symlink_to(path)
    out = {}
    load = os.getloadavg()[0]
    for workers in (1, 2):
        out[workers] = run_command(["supervoxels", "--src", str(src), "--dst", str(tmp / f"folder_w{workers}"),
                                    "--dataset", "chaos", "--workers", str(workers)])["wall"]
    return {"scans": count, "workers 1 s": out[1], "workers 2 s": out[2], "speed-up": out[1] / out[2],
            "load avg (2 cores)": load}


def plain_superpixel_loop(volume_xyz: np.ndarray, threshold: float, with_masking: bool) -> np.ndarray:
    """A plain per-slice loop as the SSL-ALPNet notebook writes it (optionally with its mask + relabelling)."""
    from scipy import ndimage
    from skimage.measure import label
    from skimage.segmentation import felzenszwalb

    zyx = np.ascontiguousarray(volume_xyz.transpose(2, 1, 0))  # the reference reads (z, y, x) SimpleITK arrays
    out = np.zeros(zyx.shape)
    for z in range(zyx.shape[0]):
        img = zyx[z]
        seg = felzenszwalb(img, min_size=400, sigma=1)
        if with_masking:
            fg = img > threshold
            if fg.any():
                comp = label(fg)
                fg = ndimage.binary_fill_holes(comp == np.argmax(np.bincount(comp.flat)[1:]) + 1)
            ids = list(np.unique(seg))
            top = max(ids)
            shifted = np.where(seg == 0, top + 1, seg) * fg
            new_seg = np.zeros(seg.shape)
            for new, v in enumerate([i for i in ids + [top] if i != 0], start=1):
                new_seg[shifted == v] = new
            seg = new_seg
        out[z] = seg
    return out.transpose(2, 1, 0)


def bench_superpixels(count: int) -> list[dict]:
    from fsmis_monai.pseudolabels import make_superpixels

    rows = []
    threshold = 1e-4 + 50
    for path in sorted(DATASETS["chaos"][0].glob("image_*.nii.gz"))[:count]:
        vol = np.asarray(nib.load(str(path)).dataobj)
        best = {"ours": np.inf, "bare loop": np.inf, "loop + masking": np.inf}
        for _ in range(2):  # interleaved, best of 2
            for key, fn in (("ours", lambda: make_superpixels(vol, body_threshold=threshold)),
                            ("bare loop", lambda: plain_superpixel_loop(vol, threshold, False)),
                            ("loop + masking", lambda: plain_superpixel_loop(vol, threshold, True))):
                start = time.perf_counter()
                fn()
                best[key] = min(best[key], time.perf_counter() - start)
        row = {"scan": path.name, **{f"{k} s": v for k, v in best.items()},
               "ours / bare": best["ours"] / best["bare loop"], "ours / loop+masking": best["ours"] / best["loop + masking"]}
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def summary(rows: list[dict], label: str) -> str:
    ratio = np.array([r["ratio"] for r in rows])
    cpu = np.array([r["cpu ratio"] for r in rows])
    peak = np.array([r["peak MiB"] for r in rows])
    text = (f"{label}: {len(rows)} scans, ratio cmd/argsort median {np.median(ratio):.2f} max {ratio.max():.2f} "
            f"(CPU time: median {np.median(cpu):.2f} max {cpu.max():.2f}); peak RSS max {peak.max():.0f} MiB")
    if "ARI" in rows[0]:
        ari = np.array([r["ARI"] for r in rows])
        text += (f"; faithful == published {sum(r['faithful == pub'] for r in rows)}/{len(rows)} (CPU ratio median "
                 f"{np.median([r['faithful cpu ratio'] for r in rows]):.2f}); default vs published: "
                 f"mask identical {sum(r['mask'] for r in rows)}/{len(rows)}; ARI min {ari.min():.3f} median "
                 f"{np.median(ari):.3f}; ARI body median {np.median([r['ARI body'] for r in rows]):.3f} "
                 f"(argsort order: ARI median {np.median([r['ARI argsort'] for r in rows]):.3f}, body "
                 f"{np.median([r['ARI argsort body'] for r in rows]):.3f})")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, default=None,
                        help="published supervoxels root holding CHAOST2/supervoxels_5000 and CMR/supervoxels_1000")
    parser.add_argument("--scans", type=int, default=None, help="first N scans of each dataset (default: all)")
    parser.add_argument("--folder-scans", type=int, default=6, help="CHAOS scans in the workers 1 vs 2 timing")
    parser.add_argument("--superpixel-scans", type=int, default=3, help="CHAOS scans in the 2D superpixel timing")
    parser.add_argument("--datasets", nargs="+", default=["chaos", "cmr"], choices=sorted(DATASETS))
    parser.add_argument("--no-extras", action="store_true", help="skip the folder and superpixel timings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        per_dataset = {name: bench_scans(name, args.scans, args.reference, tmp) for name in args.datasets}
        folder = None if args.no_extras else bench_folder(args.folder_scans, tmp)
    superpixels = None if args.no_extras else bench_superpixels(args.superpixel_scans)
    for name, rows in per_dataset.items():
        print(f"\n### {name.upper()} supervoxels\n\n" + markdown(rows))
    if folder is not None:
        print("\n### Folder: --workers 1 vs 2\n\n" + markdown([folder]))
        print("\n### 2D superpixels vs a plain per-slice scikit-image loop\n\n" + markdown(superpixels))
    print("\n" + "\n".join(summary(rows, name.upper()) for name, rows in per_dataset.items()))


if __name__ == "__main__":
    main()

"""Cost of building training episodes against a ResNet-101 training step on the same episode (issue 5).

For each episodic dataset (real CHAOS-T2 scans at 256^2, pseudolabels made here with
``fsmis_monai.pseudolabels``), the mean time to build one episode in a single process (``time_episodes``),
without and with the reference augmentation, and through a DataLoader with 2 workers (time the training
loop waits per episode). Side by side, in the same run: copying the two slices out of memory and nothing
else (the floor of any loader) and one forward + backward + SGD step of torchvision's ResNet-101 on the
episode's two 256^2 images (the floor of a training step at the papers' size). Ratios are what to read:
``x floor`` (episode / slice copy) and ``% of step`` (episode / ResNet-101 step, goal < 5 %).

    python bench/data_loading.py --scans 3 --episodes 30 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FSMIS_DATA", REPO.parent / "shared" / "data")) / "chaos_mr_t2"


def time_episodes(dataset, n: int = 20, start: int = 0) -> float:
    """Mean wall-clock seconds to build one episode (``dataset[i]`` for ``n`` consecutive indices)."""
    t0 = time.perf_counter()
    for i in range(start, start + n):
        dataset[i]
    return (time.perf_counter() - t0) / n


def make_pseudolabels(files, out: Path) -> tuple[Path, Path]:
    """Supervoxels (ADNet, min_size 5000) and superpixels (ALP) of ``files``, written with the image geometry."""
    from fsmis_monai.io import load_nifti, save_nifti
    from fsmis_monai.pseudolabels import make_superpixels, make_supervoxels

    sv, sp = out / "supervoxels", out / "superpixels"
    for f in files:
        image, img = load_nifti(f.image)
        spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
        supervoxels = make_supervoxels(image, spacing, min_size=5000)
        superpixels = make_superpixels(image, body_threshold=1e-4 + 50)
        save_nifti(sv / f"superpix-MIDDLE_{f.scan_id}.nii.gz", supervoxels, img.affine)
        save_nifti(sp / f"superpix-MIDDLE_{f.scan_id}.nii.gz", superpixels, img.affine)
    return sv, sp


def resnet_step_seconds(repeats: int) -> float:
    """Median time of one forward + backward + SGD step of ResNet-101 on two 256^2 images."""
    from torchvision.models import resnet101

    net = resnet101(weights=None)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(2, 3, 256, 256)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        net(x).mean().backward()
        opt.step()
        if i:  # the first step warms up allocators
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def slice_copy_seconds(volumes, n: int) -> float:
    """Copy a support and a query slice (3 channels) out of memory into tensors: no sampling at all."""
    t0 = time.perf_counter()
    for i in range(n):
        v = volumes[i % len(volumes)]
        z = i % (v.num_slices - 1)
        torch.from_numpy(np.stack([v.image_slice(z)])), torch.from_numpy(v.image_slice(z + 1))
        torch.from_numpy((v.label[z] > 0).astype(np.float32)), torch.from_numpy(v.label[z + 1].astype(np.int64))
    return (time.perf_counter() - t0) / n


def loader_wait_seconds(dataset, n: int, workers: int) -> float:
    from fsmis_monai.data.seeding import seed_worker

    loader = DataLoader(dataset, batch_size=1, num_workers=workers, worker_init_fn=seed_worker)
    it = iter(loader)
    next(it)  # worker start-up is paid once per epoch, not per episode
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return (time.perf_counter() - t0) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scans", type=int, default=3)
    p.add_argument("--episodes", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--step-repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from fsmis_monai.data.datalist import pair_scans
    from fsmis_monai.data.episodes import (
        GroundTruthEpisodeDataset,
        SuperpixelEpisodeDataset,
        SupervoxelEpisodeDataset,
    )
    from fsmis_monai.data.volumes import load_volumes

    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: CHAOS-T2 scans not found (set FSMIS_DATA)")
    files = pair_scans(DATA)[: args.scans]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sv_dir, sp_dir = make_pseudolabels(files, Path(tmp))
        prep = time.perf_counter() - t0
        ids = [f.scan_id for f in files]
        sv_vols = load_volumes(pair_scans(DATA, pseudolabel_dir=sv_dir, require_pseudolabels=False, ids=ids), "chaos")
        sp_vols = load_volumes(pair_scans(DATA, pseudolabel_dir=sp_dir, require_pseudolabels=False, ids=ids), "chaos")

    n = args.episodes
    step = resnet_step_seconds(args.step_repeats)
    floor = slice_copy_seconds(sv_vols, 200)
    rows = []
    for name, build in (
        ("supervoxel (ADNet/Q-Net)", lambda aug: SupervoxelEpisodeDataset(sv_vols, length=n + 1, augmentation=aug)),
        ("superpixel (SSL-ALPNet)", lambda aug: SuperpixelEpisodeDataset(sp_vols, length=n + 1, augmentation=aug)),
        ("ground truth (LSLPN-style)", lambda aug: GroundTruthEpisodeDataset(sv_vols, classes=(1, 4), min_size=200,
                                                                             length=n + 1, augmentation=aug)),
    ):
        for aug in (False, True):
            ds = build(aug)
            ds[0]  # first call pays MONAI's lazy imports
            rows.append((name, "yes" if aug else "no", "1 process", time_episodes(ds, n, start=1)))
        rows.append((name, "yes", "DataLoader, 2 workers", loader_wait_seconds(build(True), n, 2)))

    print(f"{args.scans} CHAOS-T2 scans at 256^2, {n} episodes per row, torch threads {args.threads}; "
          f"pseudolabels made in {prep:.0f} s (not counted)")
    print(f"slice copy only (floor): {floor * 1000:.2f} ms/episode; ResNet-101 f+b+SGD step, 2 x 256^2: {step:.2f} s\n")
    print("| dataset | augmentation | loading | ms / episode | x floor | % of ResNet-101 step (goal < 5) |")
    print("|---|---|---|---|---|---|")
    for name, aug, how, sec in rows:
        print(f"| {name} | {aug} | {how} | {sec * 1000:.1f} | {sec / floor:.0f} | {100 * sec / step:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

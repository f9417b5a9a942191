"""Frozen segmenter: what freezing and tracing cost or save per query slice (issue 7).

For every method (small encoder, random init, a real CHAOS support slice and query slices, 1-shot):
  * ``per-call s``: ``encode_support`` + ``segment`` for each query batch (what a support-taking network pays);
  * ``frozen s``: :class:`fsmis_monai.export.FrozenFewShotSegmenter` (support encoded once, in buffers);
  * ``traced s``: its ``torch.jit.trace`` (what ``ckpt_export --use_trace True`` writes);
  * ratios ``frozen/per-call`` and ``traced/frozen``: fastest over fastest of alternating repeats, in CPU time
    of this process (less sensitive to other processes than wall time).

    python bench/export_speed.py --size 128 --batch 4 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from fsmis_monai.export import FrozenFewShotSegmenter, trace
from fsmis_monai.networks.methods import build_method
from fsmis_monai.networks.prototypes import resize_to

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FSMIS_DATA", REPO.parent / "shared" / "data")) / "chaos_mr_t2"
METHODS = ("ssl_alpnet", "adnet", "qnet", "lslpn", "gmrd", "pami", "difd")


def slices(scan: int, size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` liver slices of a real scan, z-scored, resized to ``size``, 3 channels; and their liver masks."""
    vol = np.asarray(nib.load(DATA / f"image_{scan}.nii.gz").dataobj, dtype=np.float32)
    lab = np.asarray(nib.load(DATA / f"label_{scan}.nii.gz").dataobj)
    zs = np.flatnonzero((lab == 1).any(axis=(0, 1)))
    zs = zs[len(zs) // 2 - n // 2 :][:n]
    img = torch.as_tensor((vol[..., zs] - vol.mean()) / vol.std()).permute(2, 0, 1)[:, None]
    mask = torch.as_tensor((lab[..., zs] == 1).astype(np.float32)).permute(2, 0, 1)[:, None]
    img, mask = resize_to(img, (size, size)), (resize_to(mask, (size, size)) > 0.5).float()
    return img.repeat(1, 3, 1, 1), mask[:, 0]


def cpu_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    support, support_mask = slices(1, args.size, 1)
    queries, _ = slices(2, args.size, args.batch)
    print(f"| method | per-call s | frozen s | traced s | frozen/per-call | traced/frozen |  ({args.size}^2, "
          f"batch {args.batch}, CPU time, fastest of {args.repeats})")
    print("|---|---|---|---|---|---|")
    for name in args.methods:
        kwargs = {"image_size": args.size} if name == "gmrd" else {"refine_steps": 0} if name == "qnet" else {}
        method = build_method(name, encoder="small", **kwargs).eval()
        frozen = FrozenFewShotSegmenter.from_support(method, support, support_mask)
        traced = trace(frozen, queries)
        with torch.no_grad():
            per_call = cpu_time(lambda: method.segment(queries, method.encode_support(support, support_mask)),
                                args.repeats)
            eager = cpu_time(lambda: frozen(queries), args.repeats)
            jit = cpu_time(lambda: traced(queries), args.repeats)
        print(f"| {name} | {per_call:.3f} | {eager:.3f} | {jit:.3f} | {eager / per_call:.2f} | {jit / eager:.2f} |")


if __name__ == "__main__":
    main()

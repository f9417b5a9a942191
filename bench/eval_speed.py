"""Few-shot evaluation cost of a whole CHAOS fold with all five protocols (issues 4 and 14).

One run, on the real CHAOS-T2 scans of one fold (``--fold``, Q-Net family; fold 0: support scan 3, query
scans 1, 2, 5, 8), 4 classes each, all of ``alp, ep1, ep2, senet, whole``, 256^2 slices, with a method (default: the prototype
baseline, MAP + cosine) on an encoder (default: the small CPU encoder, so the run takes minutes):

  * ``floor``: one encoder forward of a single query slice, back to back (median over slices, measured before
    and after the passes; the unit the other rows are expressed in);
  * ``old``: the prediction pass before issue 14, per (query scan, class, support group):
    ``FewShotSliceInferer`` runs ``segment`` on the group's slices, so a query slice is encoded again for
    every class and support group that asks for it (support groups encoded once per fold, as before);
  * ``new``: :func:`fsmis_monai.evaluation.evaluator.predict_query`, one pass per query scan: each query slice
    encoded once (``encode_query``) and segmented against every (class, support group) that needs it
    (``segment_encoded``);
  * ``evaluate()``: the public API on the same fold (loading, planning, Dice; no files written).

Encoder forwards are counted by a forward hook (images through the encoder). Targets: the new pass costs
at most 1.1 x (distinct query slices + support groups) forwards, and its wall time is at most 1.2 x that many
floor forwards of the same run. The old and new predictions are compared pixel by pixel.

    python bench/eval_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fsmis_monai.data.datalist import pair_scans
from fsmis_monai.data.registry import get_dataset, get_fold
from fsmis_monai.evaluation import evaluate
from fsmis_monai.evaluation.evaluator import _support_tensors, load_scan, predict_query, to_channels
from fsmis_monai.evaluation.inferer import FewShotSliceInferer, inference_context
from fsmis_monai.evaluation.protocols import PROTOCOLS, make_plan, merge_requests
from fsmis_monai.networks.encoders import build_encoder
from fsmis_monai.networks.methods import build_method

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FSMIS_DATA", REPO.parent / "shared" / "data")) / "chaos_mr_t2"


class Counter:
    """Forward hook: encoder calls and images."""

    def __init__(self) -> None:
        self.calls = self.images = 0

    def __call__(self, module, args, output) -> None:
        self.calls += 1
        self.images += int(args[0].shape[0])

    def reset(self) -> None:
        self.calls = self.images = 0


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def old_pass(model, inferer, queries, support_image, support_label, requests, states):
    """The evaluator's pass before issue 14: per (class, support group), ``segment`` its own query slices."""
    out = {}
    for key, zs in requests.items():
        c, group = key
        if key not in states:
            states[key] = inferer.encode(model, *_support_tensors(support_image, support_label == c, group))
        logits = inferer(model, queries[..., zs], states[key])  # [2, X, Y, n]
        labels = (logits[1] > logits[0]).numpy()
        out[key] = {z: labels[..., i] for i, z in enumerate(zs)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="prototype")
    parser.add_argument("--encoder", default="small")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--sw-batch-size", type=int, default=8)
    parser.add_argument("--floor-slices", type=int, default=12, help="single-slice forwards timed, before and after")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not DATA.is_dir():
        raise SystemExit(f"real CHAOS scans not found at {DATA} (set FSMIS_DATA)")

    desc = get_dataset("chaos")
    files = {f.scan_id: f for f in pair_scans(DATA, require_pseudolabels=False)}
    spec = get_fold(desc, args.fold, "qnet")
    support = load_scan(files[spec.support_id], desc)
    s_img = to_channels(support.image)
    queries, requests = {}, {}
    for q in spec.query_ids:
        scan = load_scan(files[q], desc)
        queries[q] = to_channels(scan.image)
        requests[q] = {}
        for c in desc.test_classes:
            plans = [make_plan(p, scan.label == c, support.label == c) for p in PROTOCOLS]
            requests[q].update({(c, g): zs for g, zs in merge_requests(plans).items()})
    distinct = sum(len({z for zs in r.values() for z in zs}) for r in requests.values())
    groups = len({key for r in requests.values() for key in r})
    pairs = sum(len(zs) for r in requests.values() for zs in r.values())

    model = build_method(args.method, encoder=build_encoder(args.encoder)).eval()
    counter = Counter()
    model.encoder.register_forward_hook(counter)
    inferer = FewShotSliceInferer(sw_batch_size=args.sw_batch_size, device="cpu")
    probe = queries[spec.query_ids[0]]
    picks = np.linspace(0, probe.shape[-1] - 1, args.floor_slices).round().astype(int)

    def floor_times():
        with inference_context(model):
            model.encoder(probe[..., picks[0]][None])  # warm-up
            return [timed(lambda z=z: model.encoder(probe[..., int(z)][None]))[1:] for z in picks]

    floor = floor_times()
    rows = {}
    for name, run in (("old", old_pass), ("new", None)):
        counter.reset()
        states: dict = {}
        preds = {}

        def fold_pass():
            for q, reqs in requests.items():
                if run is None:
                    preds[q] = predict_query(model, inferer, queries[q], s_img, support.label, reqs,
                                             states=states.setdefault("by_class", {}))
                else:
                    preds[q] = run(model, inferer, queries[q], s_img, support.label, reqs, states)

        _, w, cpu = timed(fold_pass)
        rows[name] = (counter.images, counter.calls, w, cpu, preds)
    floor += floor_times()
    f_wall = statistics.median(t for t, _ in floor)
    f_cpu = statistics.median(t for _, t in floor)

    counter.reset()
    _, e_wall, e_cpu = timed(lambda: evaluate(model, DATA, fold=args.fold, family="qnet", protocols=PROTOCOLS,
                                              device="cpu", sw_batch_size=args.sw_batch_size, progress=False))
    e_images, e_calls = counter.images, counter.calls

    differ = sum(int((rows["old"][4][q][k][z] != rows["new"][4][q][k][z]).sum())
                 for q in requests for k in requests[q] for z in requests[q][k])
    target = distinct + groups
    print(f"\n{args.method} on encoder {args.encoder}, {args.threads} threads, CHAOS fold {args.fold} (qnet: support "
          f"{spec.support_id}, queries {list(spec.query_ids)}), {len(desc.test_classes)} classes, protocols "
          f"{', '.join(PROTOCOLS)}, 256x256, sw_batch_size {args.sw_batch_size}")
    print(f"distinct query slices {distinct}, support groups {groups}, (class, group, slice) predictions {pairs}; "
          f"floor forward {f_wall * 1e3:.1f} ms wall, {f_cpu * 1e3:.1f} ms CPU (median of {len(floor)})\n")
    print("| path | encoder forwards | / (slices + groups) | encoder calls | wall s | wall / (forwards x floor) "
          "| wall / ((slices + groups) x floor) | CPU s | CPU / ((slices + groups) x CPU floor) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (images, calls, w, cpu) in (("old: per (class, group) segment", rows["old"][:4]),
                                          ("new: shared query encoding", rows["new"][:4]),
                                          ("evaluate() (new, incl. loading, planning, Dice)",
                                           (e_images, e_calls, e_wall, e_cpu))):
        print(f"| {name} | {images} | {images / target:.2f} | {calls} | {w:.1f} | {w / (images * f_wall):.2f} | "
              f"{w / (target * f_wall):.2f} | {cpu:.1f} | {cpu / (target * f_cpu):.2f} |")
    old, new = rows["old"], rows["new"]
    print(f"\nold / new: {old[0] / new[0]:.1f}x fewer encoder forwards, {old[2] / new[2]:.1f}x less wall time; "
          f"predictions differing between old and new: {differ} pixels of {pairs * 256 * 256}")


if __name__ == "__main__":
    main()

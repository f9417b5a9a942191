"""Few-shot evaluation speed against the encoder's own forward (issue 4).

On a real CHAOS query scan (fold 0, Q-Net family: support scan 3, query scan 1) and one class, with the
prototype baseline (masked average pooling + cosine, no per-slice refinement) on a ResNet-101 Q-Net-layout
encoder (random init; timings do not depend on the weights), 256^2 slices:

  * ``floor``: one forward of the encoder on a single query slice (per slice, back to back);
  * ``naive``: the reference test loop without refinement: support re-encoded for every query slice, batch 1;
  * ``fast, cold``: the evaluator's shared pass (support group encoded once, ``sw_batch_size`` slices per
    call through MONAI's SliceInferer), first query scan of a fold;
  * ``fast, cached``: the same for the fold's other query scans (support groups already encoded);
  * ``evaluate() overhead``: the rest of the public API (loading, normalisation, planning, Dice, NIfTI and
    report writing) on that query and class, timed with a model that costs nothing, per predicted slice.

The ratio to the floor (goal <= 1.15 for methods without per-slice refinement) compares timings of the
same run; process CPU time ratios, less sensitive to other processes on the machine, sit beside them.
The fold estimate multiplies the per-slice time (fast path with the fold's support groups encoded once
each, plus the ``evaluate()`` overhead) by the number of predicted slices of a full CHAOS fold (4 query scans x 4 classes) for the EP1 protocol (the Q-Net reference's loop:
4.35 s per slice, ~20 min per fold on this machine) and for all five protocols sharing one pass.

The machine is shared, so ``--slices`` keeps the run short (the first N EP1 slices of the class).

    python bench/eval_speed.py --threads 2 --slices 8
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

from fsmis_monai.data.datalist import pair_scans
from fsmis_monai.data.registry import get_dataset, get_fold
from fsmis_monai.evaluation import evaluate
from fsmis_monai.evaluation.evaluator import load_scan, predict_pass, to_channels
from fsmis_monai.evaluation.inferer import FewShotSliceInferer
from fsmis_monai.evaluation.protocols import PROTOCOLS, make_plan, merge_requests
from fsmis_monai.networks.encoders import build_encoder
from fsmis_monai.networks.methods.base import FewShotSegmenter
from fsmis_monai.networks.methods.prototype import PrototypeSegmenter

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FSMIS_DATA", REPO.parent / "shared" / "data")) / "chaos_mr_t2"


class FreeModel(FewShotSegmenter):
    """Costs nothing: isolates the evaluator's own overhead."""

    def encode_support(self, support_images, support_masks):
        return {}

    def segment(self, query_images, state):
        return query_images[:, :2]


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def fold_slice_counts(fold: int = 0) -> dict[str, int]:
    """Predicted slices of a full CHAOS fold: EP1 alone, and all protocols sharing one pass."""
    desc = get_dataset("chaos")
    files = {f.scan_id: f for f in pair_scans(DATA, require_pseudolabels=False)}
    spec = get_fold(desc, fold, "qnet")
    support = load_scan(files[spec.support_id], desc)
    counts = {"ep1": 0, "all": 0, "groups": 0, "groups_ep1": 0}
    groups, groups_ep1 = set(), set()
    for q in spec.query_ids:
        query = load_scan(files[q], desc)
        for c in desc.test_classes:
            plans = [make_plan(p, query.label == c, support.label == c) for p in PROTOCOLS]
            counts["ep1"] += int(plans[1].predicted.sum())
            merged = merge_requests(plans)
            counts["all"] += sum(len(z) for z in merged.values())
            groups |= {(c, g) for g in merged}
            groups_ep1 |= {(c, g) for g in plans[1].support_groups}
    counts["groups"], counts["groups_ep1"] = len(groups), len(groups_ep1)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encoder", default="qnet_resnet101")
    parser.add_argument("--feature-key", default="down2")
    parser.add_argument("--class-id", type=int, default=1, help="CHAOS class (1 liver: 24 EP1 slices in query 1)")
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--slices", type=int, default=8, help="EP1 query slices timed (0: all of the class)")
    parser.add_argument("--naive-slices", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not DATA.is_dir():
        raise SystemExit(f"real CHAOS scans not found at {DATA} (set FSMIS_DATA)")

    desc = get_dataset("chaos")
    files = {f.scan_id: f for f in pair_scans(DATA, require_pseudolabels=False)}
    query, support = load_scan(files[1], desc), load_scan(files[3], desc)
    q_img, s_img = to_channels(query.image), to_channels(support.image)
    c = args.class_id
    plan = make_plan("ep1", query.label == c, support.label == c)
    zs = [int(z) for z in np.flatnonzero(plan.predicted)]
    zs = zs[: args.slices] if args.slices else zs
    requests = {g: [z for z in zz if z in zs] for g, zz in plan.requests().items()}
    requests = {g: zz for g, zz in requests.items() if zz}

    model = PrototypeSegmenter(encoder=build_encoder(args.encoder), feature_key=args.feature_key).eval()
    inferer = FewShotSliceInferer(sw_batch_size=args.sw_batch_size)
    with torch.inference_mode():  # warm-up
        model.encoder(q_img[..., zs[0]][None])

    rows = []
    with torch.inference_mode():
        floor = [timed(lambda z=z: model.encoder(q_img[..., z][None])) for z in zs]
    f_wall = statistics.median(t for _, t, _ in floor)
    f_cpu = statistics.median(t for _, _, t in floor)
    rows.append(("floor: encoder forward, 1 query slice", f_wall, f_cpu, len(zs)))

    naive_z = zs[:: max(1, len(zs) // args.naive_slices)][: args.naive_slices]
    group_of = {z: g for g, zz in requests.items() for z in zz}

    def naive():
        with torch.inference_mode():
            for z in naive_z:
                g = group_of[z]
                state = model.encode_support(s_img[..., list(g)].permute(3, 0, 1, 2),
                                             torch.as_tensor((support.label[..., list(g)] == c).transpose(2, 0, 1), dtype=torch.float32))
                model.segment(q_img[..., z][None], state).argmax(1)

    _, w, cpu = timed(naive)
    rows.append(("naive: support re-encoded per slice, batch 1", w / len(naive_z), cpu / len(naive_z), len(naive_z)))

    states: dict = {}
    _, w, cpu = timed(lambda: predict_pass(model, inferer, q_img, s_img, support.label == c, requests, states=states))
    rows.append((f"fast, cold support (batch {args.sw_batch_size})", w / len(zs), cpu / len(zs), len(zs)))
    _, w, cpu = timed(lambda: predict_pass(model, inferer, q_img, s_img, support.label == c, requests, states=states))
    rows.append((f"fast, support cached (batch {args.sw_batch_size})", w / len(zs), cpu / len(zs), len(zs)))

    n_all = int(plan.predicted.sum())
    with tempfile.TemporaryDirectory() as out:
        _, w, cpu = timed(lambda: evaluate(FreeModel(), DATA, fold=0, protocols=("ep1",), output_dir=out,
                                           query_ids=(1,), classes=(c,), progress=False))
    overhead, overhead_cpu = w / n_all, cpu / n_all
    rows.append(("evaluate() overhead (model costs nothing), ep1", overhead, overhead_cpu, n_all))
    cached_wall = rows[3][1]
    per_slice = cached_wall + overhead
    rows.append(("estimated evaluate() per slice (cached + overhead)", per_slice, rows[3][2] + overhead_cpu, n_all))

    print(f"\nencoder {args.encoder} ({args.feature_key}), {args.threads} threads, CHAOS query 1 / support 3, "
          f"class {c}, 256x256\n")
    print("| path | slices | s / slice | ratio to floor | CPU s / slice | CPU ratio |")
    print("|---|---|---|---|---|---|")
    for name, w, cpu, n in rows:
        print(f"| {name} | {n} | {w:.3f} | {w / f_wall:.2f} | {cpu:.3f} | {cpu / f_cpu:.2f} |")

    counts = fold_slice_counts(0)
    print(f"\nCHAOS fold 0 (qnet: 4 queries x 4 classes): EP1 predicts {counts['ep1']} slices; all 5 protocols "
          f"share a pass of {counts['all']} slices ({counts['groups']} support groups).")
    # In floor units (encoder forwards), which do not depend on the machine's load.
    units = {"ep1": counts["ep1"] * per_slice / f_wall + counts["groups_ep1"],
             "all": counts["all"] * per_slice / f_wall + counts["groups"]}
    # The reference loop runs at least two encoder forwards per query slice (its support slice re-encoded,
    # then the query) before its refinement, so where it took 4.35 s / slice the floor is <= 4.35 / 2 s.
    floor_bound = 4.35 / 2 if args.encoder == "qnet_resnet101" else float("nan")  # the reference's encoder
    print("| fold estimate | encoder forwards | minutes at this run's floor "
          f"({f_wall:.2f} s) | minutes at floor <= {floor_bound:.2f} s (reference machine) |")
    print("|---|---|---|---|")
    for key, name in (("ep1", "EP1 (Q-Net family protocol)"), ("all", "all 5 protocols, one shared pass")):
        print(f"| {name} | {units[key]:.0f} | {units[key] * f_wall / 60:.1f} | <= {units[key] * floor_bound / 60:.1f} |")
    ref_units = counts["ep1"] * 2
    print(f"| reference Q-Net test loop, EP1 (4.35 s / slice) | >= {ref_units:.0f} | "
          f"{ref_units * f_wall / 60:.1f} (no refinement) | {counts['ep1'] * 4.35 / 60:.1f} |")


if __name__ == "__main__":
    main()

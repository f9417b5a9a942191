"""``fsmis preprocess``: run a dataset recipe over a raw download (see ``preprocessing/README.md``)."""

from __future__ import annotations

import argparse
import sys

HELP = "preprocess a raw dataset with a recipe (preprocessing/<dataset>.yaml) into image_<id>/label_<id> NIfTIs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True,
                        help="recipe file, or a short name: chaos_mr_t2, synapse_ct, cmr_bssfp, generic (aliases: chaos, sabs, cmr)")
    parser.add_argument("--src", required=True, help="raw data folder (the layout the recipe's patterns describe)")
    parser.add_argument("--dst", required=True, help="output folder")
    parser.add_argument("--workers", type=int, default=1, help="scans processed in parallel (processes)")
    parser.add_argument("--overwrite", action="store_true", help="redo scans whose outputs already exist")
    parser.add_argument("--faithful", action="store_true",
                        help="resample as the reference notebooks: labels per class linear + round, size int(n*s/t+1)")
    parser.add_argument("--keep-raw-labels", action="store_true", default=None,
                        help="write the raw label values (e.g. CMR 200/500/600) instead of canonical ids")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="class pixels a slice needs to be listed in classmap.json (default: recipe, else 1)")
    parser.add_argument("--ids", type=int, nargs="+", default=None, help="only these raw scan ids")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from fsmis_monai.preprocess import run_preprocessing

    report = run_preprocessing(args.recipe, args.src, args.dst, workers=args.workers, overwrite=args.overwrite,
                               faithful=args.faithful, keep_raw=args.keep_raw_labels, min_pixels=args.min_pixels,
                               progress=not args.no_progress, ids=args.ids)
    written = sum(s["status"] == "written" for s in report.scans.values())
    print(f"{written} scans written, {len(report.scans) - written} already done, {len(report.failed)} failed "
          f"-> {args.dst} (classmap.json, dataset_summary.json)")
    for sid, message in sorted(report.failed.items()):
        print(f"FAILED {sid}: {message}", file=sys.stderr)
    return 0 if report.ok else 1

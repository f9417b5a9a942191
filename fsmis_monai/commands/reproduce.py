"""``fsmis reproduce``: a paper's experiment in one command (every fold trained, evaluated, aggregated)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "train and evaluate every fold of a paper's protocol through its bundle; table beside the published Dice"


def _override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a JSON value (a bare word stays a string), as the bundles' config keys take them."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, help="bundle: ssl_alpnet, adnet, qnet, lslpn, gmrd, pami, difd")
    parser.add_argument("--dataset", default="chaos", help="chaos_mr_t2, synapse_ct or cmr_bssfp (or an alias)")
    parser.add_argument("--dataset-dir", type=Path, required=True, help="the preprocessed scans (fsmis preprocess)")
    parser.add_argument("--setting", type=int, choices=(1, 2), default=1)
    parser.add_argument("--output", type=Path, required=True, help="output folder (run again to resume)")
    parser.add_argument("--folds", default=None, help="comma-separated fold indices (default: all five)")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids; folds run concurrently, one per GPU")
    parser.add_argument("--nproc-per-fold", type=int, default=1, help="GPUs per fold (torchrun, multi_gpu_train.json)")
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU switch: small encoder, random init, on the CPU (fsmis_monai.bundles.CPU_OVERRIDES)")
    parser.add_argument("--jobs", type=int, default=1, help="folds at once without GPUs (default 1)")
    parser.add_argument("--iterations", type=int, default=None, help="override the paper's max_iterations")
    parser.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                        help="any other bundle key (JSON value), for training and evaluation; repeatable")


def run(args: argparse.Namespace) -> int:
    from fsmis_monai.reproduce import reproduce

    overrides = dict(args.overrides)
    if args.iterations is not None:
        overrides["max_iterations"] = args.iterations
    folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    reproduce(args.method, args.dataset_dir, args.output, dataset=args.dataset, setting=args.setting, folds=folds,
              gpus=gpus, nproc_per_fold=args.nproc_per_fold, overrides=overrides, cpu=args.cpu, jobs=args.jobs)
    return 0

"""``fsmis evaluate``: volumetric few-shot evaluation of a method on one or more folds."""

from __future__ import annotations

import argparse
import json
import logging

HELP = "evaluate a few-shot method on a dataset folder (protocols alp, ep1, ep2, senet, whole)"


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _dataset_and_classes(dataset: str, classes: str | None):
    """The registry descriptor of ``--dataset`` (key or alias) and the ids of ``--classes`` (names or ids, as
    :meth:`~fsmis_monai.data.registry.DatasetDescriptor.class_id` reads them; None: the dataset's test classes).
    Raises :class:`~fsmis_monai.io.FsmisInputError` naming the option and the known values."""
    from fsmis_monai.data.registry import get_dataset
    from fsmis_monai.io import FsmisInputError

    try:
        desc = get_dataset(dataset)
    except KeyError as e:
        raise FsmisInputError(f"--dataset: {e.args[0]}") from None
    if not classes:
        return desc, None
    try:
        return desc, [desc.class_id(t.strip()) for t in classes.split(",") if t.strip()]
    except KeyError as e:
        raise FsmisInputError(f"--classes: {e.args[0]}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="prototype", help="registered method name (default: prototype)")
    parser.add_argument("--method-kwargs", default="{}", help="JSON object of method constructor arguments")
    parser.add_argument("--dataset-dir", required=True, help="folder with image_<id>.nii.gz and label_<id>.nii.gz")
    parser.add_argument(
        "--dataset",
        default="chaos",
        help="registry key (chaos_mr_t2, synapse_ct, cmr_bssfp) or alias (chaos, sabs, cmr); default: chaos",
    )
    parser.add_argument("--fold", default="0", help="fold index, or several separated by commas")
    parser.add_argument("--family", default="qnet", choices=("qnet", "adnet", "alp"), help="fold/support convention")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--ckpt", default=None, help="checkpoint (state dict); omitted: untrained network")
    parser.add_argument("--protocols", default="ep1,whole", help="comma-separated subset of alp,ep1,ep2,senet,whole")
    parser.add_argument(
        "--classes",
        default=None,
        help="class names or ids, comma-separated, e.g. liver,spleen or 1,4 (default: the dataset's test classes)",
    )
    parser.add_argument("--query-ids", default=None, help="restrict the fold's query scans (ids)")
    parser.add_argument("--support-id", type=int, default=None, help="override the fold's support scan")
    parser.add_argument("--normalization", default="volume", choices=("volume", "global", "slice_minmax", "none"))
    parser.add_argument("--faithful", action="store_true", help="reproduce the reference protocol bugs")
    parser.add_argument("--whole-scan-steps", default=None,
                        help="oracle-free steps of the whole protocol, comma-separated subset of range,presence,"
                             "consistency; 'none' for every slice's argmax (default: "
                             "fsmis_monai.transforms.whole_scan.DEFAULT_STEPS)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--sw-batch-size", type=int, default=8)
    parser.add_argument("--no-resume", action="store_true", help="start over even if OUT holds finished cases")
    parser.add_argument("--no-progress", action="store_true")


def _whole_scan_option(text: str | None) -> dict:
    """``--whole-scan-steps`` -> evaluator keyword (absent: the library default)."""
    if text is None:
        return {}
    return {"whole_scan_steps": [] if text.strip().lower() == "none" else [s for s in text.split(",") if s.strip()]}


def run(args: argparse.Namespace) -> int:
    from fsmis_monai.evaluation.report import summary_markdown
    from fsmis_monai.evaluation.runner import run_evaluation

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    desc, classes = _dataset_and_classes(args.dataset, args.classes)
    folds = _ints(args.fold)
    summary = run_evaluation(
        dataset_dir=args.dataset_dir, output_dir=args.output_dir, method=args.method, ckpt_path=args.ckpt,
        method_kwargs=json.loads(args.method_kwargs), dataset=desc.key,
        fold=folds[0] if len(folds) == 1 else folds, family=args.family, protocols=args.protocols,
        device=args.device, sw_batch_size=args.sw_batch_size,
        classes=classes,
        query_ids=_ints(args.query_ids) if args.query_ids else None, support_id=args.support_id,
        normalization=args.normalization, faithful=args.faithful, resume=not args.no_resume,
        progress=not args.no_progress, **_whole_scan_option(args.whole_scan_steps),
    )
    print(summary_markdown(summary))
    return 0

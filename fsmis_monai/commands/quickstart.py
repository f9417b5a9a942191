"""``fsmis quickstart``: the whole pipeline on the three CHAOS-T2 scans shipped with the package, on CPU.

supervoxels (``fsmis supervoxels``) -> a short self-supervised training run of a bundle (``train.json``
through MONAI's ``ConfigWorkflow``, small encoder) -> evaluation of the trained network and of the same
network untrained (same seed) on the held-out scan -> report (Dice table, overlay PNGs, per-case CSVs).

Scans 2 and 15 are the (unlabelled) training scans; scan 20 is held out as the query, with scan 15 as the
annotated support. Labels are used only by the evaluation.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

from fsmis_monai.resources import shipped_dir

HELP = "Run the whole pipeline (supervoxels, CPU training, evaluation, report) on the bundled sample scans."

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_data" / "chaos_mr_t2"
BUNDLES_DIR = shipped_dir("bundles")
TRAIN_IDS, SUPPORT_ID, QUERY_ID = (2, 15), 15, 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=Path("fsmis_quickstart"), help="output folder")
    parser.add_argument("--method", default="adnet", help="bundle to train (default adnet)")
    parser.add_argument("--iterations", type=int, default=600, help="training iterations (default 600)")
    parser.add_argument("--learning-rate", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    parser.add_argument("--image-size", type=int, default=256, help="training slice size (default 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the episodes (default 0)")


def training_folder(output: Path) -> Path:
    """The training scans (symbolic links into the sample folder, so the held-out query is not among them)."""
    folder = output / "train_scans"
    folder.mkdir(parents=True, exist_ok=True)
    for i in TRAIN_IDS:
        for kind in ("image", "label"):
            link = folder / f"{kind}_{i}.nii.gz"
            if not link.exists():
                link.symlink_to(SAMPLE_DIR / f"{kind}_{i}.nii.gz")
    return folder


def _mean_dice(summary: dict, protocol: str) -> float:
    return float(summary["protocols"][protocol]["mean"])


def _table(untrained: dict, trained: dict, protocol: str) -> str:
    lines = [f"| class | untrained | trained ({protocol}) |", "|---|---|---|"]
    for c, stats in trained["protocols"][protocol]["classes"].items():
        before = untrained["protocols"][protocol]["classes"][c]["mean"]
        lines.append(f"| {c} {stats['name']} | {100 * before:.1f} | {100 * stats['mean']:.1f} |")
    lines.append(f"| **mean** | **{100 * _mean_dice(untrained, protocol):.1f}** | "
                 f"**{100 * _mean_dice(trained, protocol):.1f}** |")
    return "\n".join(lines)


def _shipped_line(method: str) -> str:
    """The held-out figure of the weights shipped with ``method``'s bundle (its metadata ``key_metrics``; Q-Net's
    when that bundle ships none), beside this short run's."""
    import json

    for name in (method, "qnet"):
        meta = BUNDLES_DIR / name / "configs" / "metadata.json"
        shipped = json.loads(meta.read_text()).get("key_metrics", {}).get("default") if meta.is_file() else None
        if shipped:
            ep1 = shipped["protocols"]["ep1"]["mean_dice"]
            return (f"\nFor comparison, the shipped {name} weights (`bundles/{name}/{shipped['file']}`, "
                    f"{shipped['cpu_hours']:.2f} CPU hours, {shipped['iterations']} iterations, CHAOS-T2 fold "
                    f"{shipped['fold']}): held-out EP1 mean Dice {ep1:.3f}; segment a scan with them: "
                    f"`fsmis demo --bundle {name}`.\n")
    return ""


def run(args: argparse.Namespace) -> int:
    import torch
    from monai.bundle import ConfigWorkflow

    from fsmis_monai.bundles import CPU_OVERRIDES
    from fsmis_monai.engines import ensure_pseudolabels
    from fsmis_monai.evaluation import evaluate
    from fsmis_monai.io import FsmisInputError, write_text

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(max(1, args.threads))
    bundle = BUNDLES_DIR / args.method
    if not (bundle / "configs" / "train.json").is_file():
        raise FsmisInputError(f"{bundle}: bundle not found (bundles: {sorted(p.parent.name for p in BUNDLES_DIR.glob('*/configs'))})")
    out = args.output.resolve()
    start = time.perf_counter()

    print(f"[1/4] supervoxels of the training scans -> {out / 'supervoxels'}")
    train_dir = training_folder(out)
    pseudo = ensure_pseudolabels(train_dir, out / "supervoxels", "supervoxels", "chaos", workers=args.threads)

    print(f"[2/4] training {args.method} (small encoder, {args.iterations} iterations, CPU) on scans {TRAIN_IDS}")
    configs = bundle / "configs"
    workflow = ConfigWorkflow(
        config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"), workflow_type="train", bundle_root=str(bundle),
        dataset_dir=str(train_dir), pseudolabel_dir=pseudo, fold=None, **CPU_OVERRIDES,
        image_size=args.image_size, max_iterations=args.iterations, learning_rate=args.learning_rate,
        lr_milestones=[args.iterations // 2], lr_gamma=0.1, num_workers=0, val_interval=0, seed=args.seed,
        device="$torch.device('cpu')", output_dir=str(out / "training"), ckpt_path=str(out / "model.pt"),
        save_interval=max(1, args.iterations // 4), log_interval=max(1, args.iterations // 10),
        image_interval=max(1, args.iterations // 5), progress_bar=False, resume=False,
    )
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network_def")
    untrained_state = copy.deepcopy(network.state_dict())  # a copy that keeps the layout record
    t0 = time.perf_counter()
    workflow.run()
    workflow.finalize()
    train_seconds = time.perf_counter() - t0

    print(f"[3/4] evaluating on held-out scan {QUERY_ID} (support scan {SUPPORT_ID}, protocol ep1)")
    common = dict(dataset="chaos", family="qnet", protocols=["ep1"], query_ids=[QUERY_ID], support_id=SUPPORT_ID,
                  device="cpu", progress=False, resume=False)
    trained = evaluate(network, SAMPLE_DIR, output_dir=out / "evaluation_trained", **common)
    network.load_state_dict(untrained_state)
    untrained = evaluate(network, SAMPLE_DIR, output_dir=out / "evaluation_untrained", **common)

    gain = _mean_dice(trained, "ep1") - _mean_dice(untrained, "ep1")
    total = time.perf_counter() - start
    report = (f"# fsmis quickstart\n\nMethod `{args.method}`, small encoder, {args.iterations} iterations at "
              f"{args.image_size}^2 on CPU ({train_seconds / 60:.1f} min of training, {total / 60:.1f} min in total).\n"
              f"Training scans {list(TRAIN_IDS)} (supervoxels, no labels); evaluation: query scan {QUERY_ID}, "
              f"support scan {SUPPORT_ID}, Q-Net EP1 protocol (Dice %, organ slices of the query).\n\n"
              f"{_table(untrained, trained, 'ep1')}\n\nGain of training: {100 * gain:+.1f} Dice points.\n\n"
              f"Overlays: `evaluation_trained/overlays/`, `evaluation_untrained/overlays/`; per-case Dice: "
              f"`evaluation_*/per_case.csv`; TensorBoard: `tensorboard --logdir {out / 'training' / 'tensorboard'}`.\n")
    report += _shipped_line(args.method)
    write_text(out / "report.md", report)
    print("[4/4] report")
    print(report)
    print(f"held-out mean Dice: trained {_mean_dice(trained, 'ep1'):.3f}, untrained {_mean_dice(untrained, 'ep1'):.3f}"
          f" (gain {gain:+.3f}); report: {out / 'report.md'}")
    return 0

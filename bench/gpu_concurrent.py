"""Issue 20 part 3: the seven bundles trained at once on one GPU for a fixed budget, then held-out Dice.

Each bundle runs its own ``train.json`` in its own process (paper encoder, RANDOM initialisation: the device
machine cannot download torchvision's weights, so these numbers are not the papers' COCO/ImageNet-initialised
ones), the paper's schedule, on the training scans of the shipped CHAOS-T2 sample (or ``--dataset-dir``), all
processes sharing the GPU until ``--budget-s`` (~8 minutes) ends them (:class:`gpu_check.RunProbe`'s time cap);
then each trained network is evaluated with the EP1 and whole-volume protocols on the held-out scan(s).
Writes ``<out>/<bundle>.json`` (iterations, step time, the loss of every iteration, Dice per protocol and
class), ``gpu_concurrent.md`` (the table) and ``learning_curves.png``.

    python bench/gpu_concurrent.py --out /tmp/concurrent                 # the device run (CUDA), ~8 min + eval
    python bench/gpu_concurrent.py --out /tmp/concurrent --tiny          # CPU smoke (tests/bench/test_gpu_concurrent.py)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_check import BUNDLES, QUERY_ID, SAMPLE_DIR, SUPPORT_ID, RunProbe, training_folder  # noqa: E402

PROTOCOLS = ("ep1", "whole")


def train_and_evaluate(args: argparse.Namespace, bundle: str) -> dict[str, Any]:
    """One bundle: train until the deadline, then EP1/whole Dice of the network as it stands."""
    import torch
    from monai.bundle import ConfigWorkflow

    from fsmis_monai.bundles import CPU_OVERRIDES
    from fsmis_monai.data.contract import load_contract
    from fsmis_monai.evaluation import evaluate

    work = args.out / "work"
    run_dir = work / bundle
    configs = REPO / "bundles" / bundle / "configs"
    over: dict[str, Any] = {
        "dataset_dir": str(args.train_dir), "fold": None, "pretrained_weights": None,  # random init (offline)
        "val_interval": 0, "progress_bar": False, "resume": False, "save_interval": 0, "image_interval": 10 ** 9,
        "output_dir": str(run_dir), "ckpt_path": str(run_dir / "model.pt"), "device": f"$torch.device('{args.device}')",
        "cache_dir": str(args.pseudolabels or work),
    }
    if args.tiny:
        over.update(CPU_OVERRIDES, image_size=64, num_workers=0, min_size=20)
    deadline = time.perf_counter() + (args.start + args.budget_s - time.time())  # RunProbe's clock is per process
    workflow = ConfigWorkflow(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
                              logging_file=False, workflow_type="train", bundle_root=str(configs.parent), **over)
    workflow.initialize()
    trainer, network = workflow.parser.get_parsed_content("train#trainer"), workflow.parser.get_parsed_content("network")
    probe = RunProbe(torch.device(args.device), deadline)
    probe.attach(trainer, network)
    t0 = time.perf_counter()
    workflow.run()
    workflow.finalize()
    probe.detach()
    result: dict[str, Any] = {"bundle": bundle, "encoder": workflow.parser.get_parsed_content("encoder"),
                              "train_s": round(time.perf_counter() - t0, 1),
                              **probe.summary(min(args.warmup, 1 if args.tiny else args.warmup),
                                              workflow.parser.get_parsed_content("batch_size"))}
    summary = evaluate(network.eval(), args.eval_dir, dataset="chaos", family="qnet", protocols=list(PROTOCOLS),
                       query_ids=args.query_ids, support_id=args.support_id, device=args.device, progress=False,
                       resume=False, output_dir=args.out / "evaluation" / bundle,
                       contract=load_contract(run_dir / "checkpoints" / "data_contract.json"))
    result["dice"] = {p: {"mean": summary["protocols"][p]["mean"],
                          "classes": {c: s["mean"] for c, s in summary["protocols"][p]["classes"].items()}}
                      for p in PROTOCOLS}
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| bundle | encoder (random init) | iterations | step ms | loss first -> last | EP1 mean | whole mean |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['bundle']} | ERROR {r['error'][:120]} | | | | | |")
            continue
        losses = r["losses"]
        lines.append(f"| {r['bundle']} | {r['encoder']} | {r['iterations']} | {1000 * r['step_s']:.1f} | "
                     f"{losses[0]:.3f} -> {losses[-1]:.3f} | {100 * r['dice']['ep1']['mean']:.1f} | "
                     f"{100 * r['dice']['whole']['mean']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        if "losses" in r:
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["bundle"], lw=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bundles", nargs="+", default=list(BUNDLES), choices=BUNDLES)
    p.add_argument("--budget-s", type=float, default=480.0, help="training wall-clock budget, all bundles at once")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dataset-dir", type=Path, default=None,
                   help="CHAOS scans (default: the shipped sample, trained on 2 and 15, scan 20 held out)")
    p.add_argument("--query-ids", type=int, nargs="+", default=[QUERY_ID])
    p.add_argument("--support-id", type=int, default=SUPPORT_ID)
    p.add_argument("--pseudolabels", type=Path, default=None, help="the bundles' cache_dir (default: generated)")
    p.add_argument("--warmup", type=int, default=15, help="iterations left out of the step time")
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: the CPU switch, 64^2")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: the process of one bundle
    p.add_argument("--start", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    if args.pseudolabels is None and (REPO / ".devdata").is_dir():
        args.pseudolabels = REPO / ".devdata"
    if args.dataset_dir is None:
        args.train_dir, args.eval_dir = training_folder(args.out / "work"), SAMPLE_DIR
    else:  # training on every scan but the held-out query scans
        args.train_dir, args.eval_dir = args.out / "work" / "train_scans", args.dataset_dir
        args.train_dir.mkdir(parents=True, exist_ok=True)
        for f in args.dataset_dir.glob("*_*.nii.gz"):
            if not f.name.endswith(tuple(f"_{q}.nii.gz" for q in args.query_ids)) and not (args.train_dir / f.name).exists():
                (args.train_dir / f.name).symlink_to(f)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.one:
        try:
            result = train_and_evaluate(args, args.one)
        except Exception as e:  # reported in the table, the other bundles go on
            result = {"bundle": args.one, "error": f"{type(e).__name__}: {e}"}
        (args.out / f"{args.one}.json").write_text(json.dumps(result, indent=1))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pseudolabels is None:  # made once, before the processes that would race to write them
        from fsmis_monai.data.registry import get_dataset
        from fsmis_monai.engines import ensure_pseudolabels

        args.pseudolabels = args.out / "work"
        for kind in ("supervoxels", "superpixels"):
            ensure_pseudolabels(args.train_dir, args.pseudolabels / get_dataset("chaos").pseudolabel_folder(kind),
                                kind, "chaos")
    child = ["--out", str(args.out), "--budget-s", repr(args.budget_s), "--device", args.device, "--warmup",
             str(args.warmup), "--query-ids", *map(str, args.query_ids), "--support-id", str(args.support_id),
             "--pseudolabels", str(args.pseudolabels), "--start", repr(time.time())]
    child += (["--dataset-dir", str(args.dataset_dir)] if args.dataset_dir else []) + (["--tiny"] if args.tiny else [])
    procs = [subprocess.Popen([sys.executable, __file__, *child, "--one", b]) for b in args.bundles]
    for proc in procs:
        proc.wait()
    results = [json.loads((args.out / f"{b}.json").read_text()) if (args.out / f"{b}.json").is_file()
               else {"bundle": b, "error": "no result written"} for b in args.bundles]
    text = table(results)
    (args.out / "gpu_concurrent.md").write_text(text)
    plot(results, args.out / "learning_curves.png")
    print(text)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

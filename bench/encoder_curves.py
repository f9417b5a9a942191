"""Which CPU encoder and recipe learn most per CPU hour? Learning curves side by side (issue 21).

Q-Net's bundle (``train.json`` through MONAI's ``ConfigWorkflow``) trains on the supervoxels of CHAOS-T2 fold 0's
training scans with each configuration below, for the same CPU-time budget, same data, same seed. Every
``budget / points`` of training the network is evaluated on fold 0's held-out query scans (Q-Net EP1, support =
the fold's support scan); at the end also without the slice oracle (``whole``). The table puts the
configurations side by side with the no-learning floor (``support_copy``, the support mask copied onto the
paired query slice) and the ratio of each final Dice to the baseline configuration's.

    python bench/encoder_curves.py --cpu-minutes 15 --jobs 2            # all configurations, then the table
    python bench/encoder_curves.py --report                              # the table (+ PNG) of what ran so far

Each configuration runs in its own process with one thread (``nice``), so ``--jobs 2`` compares two at a time
on two cores; CPU time is the process's own (``time.process_time``: data loading included, evaluation
excluded). A killed run resumes from its last checkpoint (``--save-every`` iterations) with its CPU clock.
The iteration count of a configuration is fixed on its first start from a 30-step probe of its step cost,
so that its LR schedule spans the budget; it is kept in ``plan.json`` for resumes. A larger ``--cpu-minutes``
later continues a configuration to the scaled iteration count (``--configs NAME --cpu-minutes 30``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "chaos_mr_t2"

#: name -> encoder, LR schedule ("constant" or "decay": x0.3 at 50 %, 75 %, 90 % of the iterations), base LR,
#: training (and so inference: the data contract records it) in-plane size (default 256)
CONFIGS: Dict[str, dict] = {
    "small_const": {"encoder": "small", "schedule": "constant", "lr": 0.01},  # the 40-minute run's recipe
    "small_decay": {"encoder": "small", "schedule": "decay", "lr": 0.01},
    "dilated_decay": {"encoder": "small_dilated", "schedule": "decay", "lr": 0.01},
    "wide_decay": {"encoder": "small_wide", "schedule": "decay", "lr": 0.01},
    "dilated_decay_128": {"encoder": "small_dilated", "schedule": "decay", "lr": 0.01, "image_size": 128},
    # at the 128 px that won: is it the encoder or the size? (the plain and the widened small encoder)
    "small_decay_128": {"encoder": "small", "schedule": "decay", "lr": 0.01, "image_size": 128},
    "wide_decay_128": {"encoder": "small_wide", "schedule": "decay", "lr": 0.01, "image_size": 128},
}
BASELINE = "small_const"


def schedule(config: dict, iterations: int) -> dict:
    """Bundle overrides of the LR schedule (``lr_milestones``, ``lr_gamma``) for ``iterations`` steps."""
    if config["schedule"] == "constant":
        return {"lr_milestones": [iterations + 1], "lr_gamma": 1.0}
    return {"lr_milestones": [int(iterations * f) for f in (0.5, 0.75, 0.9)], "lr_gamma": 0.3}


def workflow(config: dict, out: Path, args: argparse.Namespace, iterations: int):
    from monai.bundle import ConfigWorkflow

    from fsmis_monai.bundles import CPU_OVERRIDES

    configs = REPO / "bundles" / "qnet" / "configs"
    return ConfigWorkflow(
        config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"), workflow_type="train", bundle_root=str(REPO / "bundles" / "qnet"),
        dataset_dir=str(args.dataset_dir), pseudolabel_dir=str(args.pseudolabels), generate_pseudolabels=False,
        fold=0, **{**CPU_OVERRIDES, "encoder": config["encoder"]}, image_size=config.get("image_size", 256),
        max_iterations=iterations, learning_rate=config["lr"],
        num_workers=0, val_interval=0, seed=args.seed, device="$torch.device('cpu')", output_dir=str(out),
        ckpt_path=str(out / "model.pt"), save_interval=args.save_every, log_interval=200, image_interval=10**9,
        progress_bar=False, resume=True, **schedule(config, iterations),
    )


def held_out(network, protocols: List[str], args: argparse.Namespace, contract_file: Optional[Path] = None) -> dict:
    """EP1 (and other protocols) on fold 0's held-out scans, prepared as the run's data contract says (its
    in-plane size): {protocol: {"mean", per-class names}}."""
    from fsmis_monai.data.contract import load_contract
    from fsmis_monai.evaluation import evaluate

    options = {"contract": load_contract(contract_file)} if contract_file is not None else {}
    summary = evaluate(network, args.dataset_dir, dataset="chaos", fold=0, family="qnet", protocols=protocols,
                       device="cpu", progress=False, resume=False, save_predictions=False, **options)
    network.train()
    return {p: {"mean": s["mean"], **{c["name"]: c["mean"] for c in s["classes"].values()}}
            for p, s in summary["protocols"].items()}


def probe_step(config: dict, out: Path, args: argparse.Namespace) -> float:
    """CPU seconds per training step of ``config`` (steps 10-30 of a throwaway run)."""
    from ignite.engine import Events

    probe = out / "probe"
    shutil.rmtree(probe, ignore_errors=True)
    wf = workflow(config, probe, args, 30)
    wf.initialize()
    marks = {}
    wf.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: marks.setdefault(e.state.iteration, time.process_time()))
    wf.run()
    wf.finalize()
    shutil.rmtree(probe, ignore_errors=True)
    return (marks[30] - marks[10]) / 20


def run_config(name: str, args: argparse.Namespace) -> None:
    """Train ``name`` for its budget (resuming), evaluating every budget/points; appends to ``curve.jsonl``."""
    import torch
    from ignite.engine import Events

    torch.set_num_threads(1)
    config, out = CONFIGS[name], args.output / name
    out.mkdir(parents=True, exist_ok=True)
    plan_file, progress_file, curve_file = out / "plan.json", out / "progress.json", out / "curve.jsonl"
    if not plan_file.exists():
        step = probe_step(config, out, args)
        plan = {"step_cpu_s": step, "iterations": int(args.cpu_minutes * 60 / step), "cpu_minutes": args.cpu_minutes}
        plan_file.write_text(json.dumps(plan))
    plan = json.loads(plan_file.read_text())
    if args.cpu_minutes > plan["cpu_minutes"]:
        # continue a finished (or running) configuration to a larger budget: the bundle resumes from its last
        # checkpoint with the LR schedule of the new count (milestones already passed count as passed)
        plan = {**plan, "iterations": int(plan["iterations"] * args.cpu_minutes / plan["cpu_minutes"]),
                "cpu_minutes": args.cpu_minutes, "extended_from": plan.get("extended_from", plan["iterations"])}
        plan_file.write_text(json.dumps(plan))
    iterations = plan["iterations"]
    every = max(1, iterations // args.points)
    done = {json.loads(line)["iteration"] for line in curve_file.read_text().splitlines()} if curve_file.exists() else set()
    wf = workflow(config, out, args, iterations)
    wf.initialize()
    wf.parser.get_parsed_content("train#volumes")  # builds the volumes, which writes the run's data contract
    network = wf.parser.get_parsed_content("network_def")
    progress = json.loads(progress_file.read_text()) if progress_file.exists() else {"iteration": 0, "cpu_s": 0.0}
    clock = {"start": time.process_time(), "offset": progress["cpu_s"], "eval": 0.0}

    def cpu() -> float:
        return clock["offset"] + time.process_time() - clock["start"] - clock["eval"]

    def record(iteration: int, protocols: List[str]) -> None:
        if iteration in done:
            return
        now, t0 = cpu(), time.process_time()
        scores = held_out(network, protocols, args, out / "checkpoints" / "data_contract.json")
        row = {"config": name, "iteration": iteration, "cpu_s": round(now, 1), **{p: s for p, s in scores.items()}}
        clock["eval"] += time.process_time() - t0
        with open(curve_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        done.add(iteration)
        print(json.dumps({"config": name, "iteration": iteration, "cpu_min": round(row["cpu_s"] / 60, 1),
                          "ep1": round(scores["ep1"]["mean"], 4)}), flush=True)

    def on_iteration(engine) -> None:
        it = engine.state.iteration
        if it % args.save_every == 0:  # the bundle's checkpoint of this iteration is written: keep its CPU clock
            tmp = progress_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"iteration": it, "cpu_s": cpu()}))
            os.replace(tmp, progress_file)
        if it % every == 0 and it < iterations:
            record(it, ["ep1"])

    if 0 not in done and progress["iteration"] == 0:
        record(0, ["ep1", "whole"])
    wf.trainer.add_event_handler(Events.ITERATION_COMPLETED, on_iteration)
    if progress["iteration"] < iterations:
        wf.run()
    wf.finalize()
    record(iterations, ["ep1", "whole"])


def copy_floor(args: argparse.Namespace) -> dict:
    """The no-learning floor on the same scans and protocols (cached in ``copy_baseline.json``)."""
    cache = args.output / "copy_baseline.json"
    if not cache.exists():
        from fsmis_monai.networks.methods import build_method

        cache.write_text(json.dumps(held_out(build_method("support_copy"), ["ep1", "whole"], args)))
    return json.loads(cache.read_text())


def load_curves(args: argparse.Namespace) -> Dict[str, List[dict]]:
    curves = {}
    for name in CONFIGS:
        f = args.output / name / "curve.jsonl"
        if f.exists():
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            curves[name] = sorted({r["iteration"]: r for r in rows}.values(), key=lambda r: r["iteration"])
    return curves


def at_fraction(rows: List[dict], total_s: float, fraction: float) -> Optional[float]:
    """EP1 mean of the last evaluation at or before ``fraction`` of the CPU budget."""
    before = [r for r in rows if r["cpu_s"] <= fraction * total_s + 1e-6]
    return before[-1]["ep1"]["mean"] if before else None


def report(args: argparse.Namespace) -> str:
    curves, floor = load_curves(args), copy_floor(args)
    classes = ["liver", "right_kidney", "left_kidney", "spleen"]
    base = curves.get(BASELINE, [{}])[-1].get("ep1", {}).get("mean")
    lines = [
        f"CHAOS-T2 fold 0, Q-Net, 4 held-out scans, EP1 mean Dice (support = fold's support scan); one thread each; "
        f"budget {args.cpu_minutes:g} CPU min",
        "",
        "| config | encoder | LR | iterations | CPU min | EP1 @25% | @50% | @75% | final EP1 | "
        + " | ".join(classes) + " | whole | final / baseline |",
        "|" + "---|" * (10 + len(classes)),
    ]
    from fsmis_monai.networks.encoders import build_encoder

    for name, rows in curves.items():
        cfg, last = CONFIGS[name], rows[-1]
        total = json.loads((args.output / name / "plan.json").read_text())["cpu_minutes"] * 60
        fr = [at_fraction(rows, total, f) for f in (0.25, 0.5, 0.75)]
        final = "ep1" in last and "whole" in last
        params = sum(p.numel() for p in build_encoder(cfg["encoder"]).parameters())
        ratio = last["ep1"]["mean"] / base if base else float("nan")
        lines.append(
            f"| {name} | {cfg['encoder']} ({params / 1e6:.2f} M) | {cfg['lr']:g} {cfg['schedule']} | {last['iteration']} | "
            f"{last['cpu_s'] / 60:.1f} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in fr)
            + f" | {last['ep1']['mean']:.3f} | " + " | ".join(f"{last['ep1'][c]:.3f}" for c in classes)
            + f" | {last['whole']['mean']:.3f} | {ratio:.2f}x |" if final else
            f"| {name} (running) | {cfg['encoder']} | {cfg['lr']:g} {cfg['schedule']} | {last['iteration']} | "
            f"{last['cpu_s'] / 60:.1f} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in fr)
            + f" | {last['ep1']['mean']:.3f} | " + " | ".join(f"{last['ep1'][c]:.3f}" for c in classes) + " | - | - |"
        )
    lines.append(
        "| support_copy (no learning) | - | - | 0 | 0 | - | - | - | "
        + f"{floor['ep1']['mean']:.3f} | " + " | ".join(f"{floor['ep1'][c]:.3f}" for c in classes)
        + f" | {floor['whole']['mean']:.3f} | {floor['ep1']['mean'] / base if base else float('nan'):.2f}x |"
    )
    plot(curves, floor, args.output / "encoder_curves.png")
    return "\n".join(lines)


def plot(curves: Dict[str, List[dict]], floor: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in curves.items():
        ax.plot([r["cpu_s"] / 60 for r in rows], [r["ep1"]["mean"] for r in rows], marker="o", label=name)
    ax.axhline(floor["ep1"]["mean"], color="grey", linestyle="--", label="support_copy (no learning)")
    ax.set_xlabel("training CPU minutes (one thread)")
    ax.set_ylabel("held-out EP1 mean Dice")
    ax.set_title("Q-Net on CHAOS-T2 fold 0: encoders and recipes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", type=Path, default=DATA)
    parser.add_argument("--pseudolabels", type=Path, default=Path("/tmp/fsmis_cache/chaos_mr_t2_supervoxels_5000"),
                        help="supervoxels of the dataset (made with `fsmis supervoxels` when missing)")
    parser.add_argument("--output", type=Path, default=Path("/tmp/fsmis_encoder_curves"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--cpu-minutes", type=float, default=15.0, help="training CPU budget per configuration")
    parser.add_argument("--points", type=int, default=6, help="evaluations along the curve (plus start and end)")
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint interval (iterations)")
    parser.add_argument("--jobs", type=int, default=1, help="configurations trained at once (one process each)")
    parser.add_argument("--seed", type=int, default=2021)
    parser.add_argument("--report", action="store_true", help="only print the table of what has run")
    parser.add_argument("--run", choices=list(CONFIGS), help=argparse.SUPPRESS)  # one configuration, in-process
    args = parser.parse_args()
    args.output = args.output.resolve()
    args.output.mkdir(parents=True, exist_ok=True)
    if args.run:
        run_config(args.run, args)
        return
    if not args.report:
        from fsmis_monai.engines import ensure_pseudolabels

        ensure_pseudolabels(args.dataset_dir, args.pseudolabels, "supervoxels", "chaos")
        pending = list(args.configs)
        running: List[subprocess.Popen] = []
        while pending or running:
            while pending and len(running) < args.jobs:
                name = pending.pop(0)
                cmd = ["nice", "-n", "5", sys.executable, __file__, "--run", name,
                       "--dataset-dir", str(args.dataset_dir), "--pseudolabels", str(args.pseudolabels),
                       "--output", str(args.output), "--cpu-minutes", str(args.cpu_minutes),
                       "--points", str(args.points), "--save-every", str(args.save_every), "--seed", str(args.seed)]
                log = open(args.output / f"{name}.log", "a")
                running.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            time.sleep(5)
            running = [p for p in running if p.poll() is None]
    print(report(args))


if __name__ == "__main__":
    main()

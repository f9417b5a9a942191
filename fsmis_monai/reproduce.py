"""Reproduce a paper's experiment: every fold of its protocol trained through the bundle, evaluated, aggregated.

For a method (bundle), a dataset and a setting: each fold's ``train.json`` runs as its own
``python -m monai.bundle run`` process (one fold per GPU through ``CUDA_VISIBLE_DEVICES``, or one fold over
several GPUs through ``torchrun`` and ``multi_gpu_train.json``); each trained fold is evaluated with the bundle's
``evaluate.json`` (the paper's protocol, ``val_protocols``, and its support choice, ``fold_family``), and the
parameter-free ``support_copy`` floor with the same protocol. Output folder::

    commands.sh                   the commands, in order (evaluation runs in this process: the equivalent command)
    fold<k>/training/             the bundle's output_dir (checkpoints, TensorBoard); fold<k>/model.pt
    fold<k>/evaluation/           the fold's evaluation (per_case.csv, summary.json, overlays)
    fold<k>/support_copy/         the no-learning floor on the same fold and protocol
    results.md, results.csv       per class and mean: mean +/- std over folds, the floor, the published value
    learning_curves.png           training loss of every fold

Resuming: a fold whose ``model.pt`` exists is not trained again, a finished evaluation is read back; a fold
killed mid-training continues from its checkpoints (the bundle's ``resume``). Published numbers:
``fsmis_monai/data/published_results.csv`` (paper, table, row for every value; "not published" where none).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from fsmis_monai.bundles import cpu_cli_args
from fsmis_monai.io import FsmisInputError, atomic_path, write_text
from fsmis_monai.resources import shipped_dir

PUBLISHED_FILE = Path(__file__).resolve().parent / "data" / "published_results.csv"
BASELINE = "support_copy"
NOT_PUBLISHED = "not published"
#: median FP32 training step on one H200 at 256 x 256, paper encoder (bench/RESULTS.md "GPU training", run 1;
#: DIFD run 3), used for the time estimate printed before a run
GPU_STEP_MS = {"ssl_alpnet": 48.1, "adnet": 39.3, "qnet": 52.9, "lslpn": 67.3, "gmrd": 74.0, "pami": 142.7,
               "difd": 98.7}


@dataclass
class FoldRun:
    """One fold: its folder, training command and the overrides its evaluation shares with the training."""

    fold: int
    folder: Path
    train_command: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> Path:
        return self.folder / "model.pt"


def published(method: str, dataset: str, setting: int, path: Path = PUBLISHED_FILE) -> dict[str, tuple[float, str]]:
    """``{class id or "mean": (Dice %, source)}`` the paper of ``method`` reports for ``dataset`` and ``setting``."""
    with open(path, newline="") as f:
        return {r["class"]: (float(r["dice"]), r["source"]) for r in csv.DictReader(f)
                if r["method"] == method and r["dataset"] == dataset and int(r["setting"]) == int(setting)}


def estimate_seconds(method: str, iterations: int, n_folds: int, n_parallel: int) -> Optional[float]:
    """Training wall time on H200-class GPUs from :data:`GPU_STEP_MS` (None for an unmeasured method)."""
    if method not in GPU_STEP_MS or n_folds == 0:
        return None if n_folds else 0.0
    waves = math.ceil(n_folds / max(1, n_parallel))
    return waves * iterations * GPU_STEP_MS[method] / 1000.0


def bundle_settings(bundle: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The bundle's protocol keys after ``overrides``: iterations, fold family, protocols, pseudolabels."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle), **overrides})
    keys = ("max_iterations", "fold_family", "val_protocols", "pseudolabel_kind", "pseudolabel_min_size",
            "pseudolabel_dir")
    return {k: parser.get_parsed_content(k) for k in keys}


def _arg(value: Any) -> str:
    """A config value as ``monai.bundle run`` reads it from the command line."""
    if value is None:
        return "$None"
    return value if isinstance(value, str) else json.dumps(value)


def bundle_command(bundle: Path, configs: Sequence[str], overrides: Mapping[str, Any], nproc: int = 1) -> list[str]:
    """``python -m monai.bundle run`` (``torchrun`` with ``nproc`` > 1) of ``configs`` with ``overrides``."""
    files = [str(bundle / "configs" / c) for c in configs]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    command = [*launcher, "-m", "monai.bundle", "run",
               "--config_file", files[0] if len(files) == 1 else json.dumps(files),
               "--meta_file", str(bundle / "configs" / "metadata.json"),
               "--logging_file", str(bundle / "configs" / "logging.conf"), "--bundle_root", str(bundle)]
    for key, value in overrides.items():
        command += [f"--{key}", _arg(value)]
    return command


def plan_folds(method: str, dataset_dir: Path, output: Path, dataset: str, setting: int, folds: Sequence[int],
               overrides: Mapping[str, Any], cpu: bool = False, nproc_per_fold: int = 1) -> list[FoldRun]:
    """The training command and evaluation overrides of each fold."""
    bundle = shipped_dir("bundles") / method
    runs = []
    for k in folds:
        folder = output / f"fold{k}"
        over = {"dataset_dir": str(dataset_dir), "dataset_name": dataset, "fold": k, "setting": setting,
                "ckpt_path": str(folder / "model.pt"), "progress_bar": False, **overrides}
        configs = ["train.json", "multi_gpu_train.json"] if nproc_per_fold > 1 else ["train.json"]
        command = bundle_command(bundle, configs, {**over, "output_dir": str(folder / "training")}, nproc_per_fold)
        if cpu:
            command += [*cpu_cli_args(), "--device", "$torch.device('cpu')"]
        runs.append(FoldRun(k, folder, command, over))
    return runs


def _train(run: FoldRun, devices: Optional[str]) -> int:
    """Run a fold's training process (``devices``: its ``CUDA_VISIBLE_DEVICES``); output in ``train.log``."""
    env = dict(os.environ)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    run.folder.mkdir(parents=True, exist_ok=True)
    with open(run.folder / "train.log", "a") as log:
        return subprocess.run(run.train_command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def evaluate_fold(run: FoldRun, bundle: Path, cpu: bool, device: str) -> tuple[Path, Path]:
    """The fold's trained network (bundle ``evaluate.json``) and the ``support_copy`` floor, same protocol and
    support; returns their folders. A finished evaluation is read back by the evaluator (resume)."""
    from monai.bundle import ConfigWorkflow

    from fsmis_monai.bundles import CPU_OVERRIDES
    from fsmis_monai.evaluation.runner import run_evaluation

    configs = bundle / "configs"
    net_dir, floor_dir = run.folder / "evaluation", run.folder / BASELINE
    over = {**run.overrides, **(CPU_OVERRIDES if cpu else {}), "output_dir": str(net_dir),
            "device": f"$torch.device('{device}')"}
    workflow = ConfigWorkflow(config_file=[str(configs / "train.json"), str(configs / "evaluate.json")],
                              meta_file=str(configs / "metadata.json"), workflow_type=None,
                              bundle_root=str(bundle), **over)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    get = workflow.parser.get_parsed_content
    run_evaluation(run.overrides["dataset_dir"], floor_dir, method=BASELINE, dataset=run.overrides["dataset_name"],
                   fold=run.fold, family=get("fold_family"), protocols=get("protocols"), device=device,
                   classes=get("classes"), progress=False)
    return net_dir, floor_dir


def _summary(folders: Sequence[Path]) -> dict:
    from fsmis_monai.evaluation.metrics import CaseResult, summarize_cases
    from fsmis_monai.evaluation.report import read_per_case_csv

    return summarize_cases(CaseResult.from_row(r) for d in folders for r in read_per_case_csv(d / "per_case.csv"))


def results_table(method: str, dataset: str, setting: int, protocol: str, nets: Sequence[Path],
                  floors: Sequence[Path]) -> tuple[str, list[dict]]:
    """Markdown and CSV rows: per class and mean, Dice % mean +/- std over folds of the trained network and of
    the floor, each fold's value, and the published value with its source."""
    net, floor = _summary(nets)["protocols"][protocol], _summary(floors)["protocols"][protocol]
    per_fold = _summary(nets)["folds"]
    paper = published(method, dataset, setting)
    rows = []
    for key, stats in [*net["classes"].items(), ("mean", {"name": "mean", **net})]:
        base = floor if key == "mean" else floor["classes"].get(key, {})
        std = stats.get("std_over_folds", math.nan)
        value, source = paper.get(key, (math.nan, NOT_PUBLISHED))
        rows.append({"class": key, "name": stats["name"], "dice_mean": 100 * stats["mean"], "dice_std": 100 * std,
                     "support_copy_mean": 100 * base.get("mean", math.nan),
                     "support_copy_std": 100 * base.get("std_over_folds", math.nan),
                     **{f"fold{f}": 100 * (v[protocol]["mean"] if key == "mean" else
                                           v[protocol]["classes"].get(key, {}).get("mean", math.nan))
                        for f, v in per_fold.items()},
                     "published": value, "published_source": source})
    lines = [f"# {method} on {dataset}, setting {setting}: {len(nets)} folds, protocol {protocol} (Dice %)", "",
             f"| class | {method} (mean +/- std over folds) | {BASELINE} floor | published | source |",
             "|---|---|---|---|---|"]
    for r in rows:
        pub = NOT_PUBLISHED if math.isnan(r["published"]) else f"{r['published']:.2f}"
        src = "" if math.isnan(r["published"]) else r["published_source"]
        lines.append(f"| {r['name']} | {r['dice_mean']:.2f} +/- {r['dice_std']:.2f} | "
                     f"{r['support_copy_mean']:.2f} +/- {r['support_copy_std']:.2f} | {pub} | {src} |")
    return "\n".join(lines) + "\n", rows


def learning_curves(folders: Sequence[Path], path: Path) -> Path:
    """Training loss per iteration of every fold (from its TensorBoard events) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fsmis_monai.evaluation.report import _savefig

    fig, ax = plt.subplots(figsize=(7, 4))
    for folder in folders:
        events = EventAccumulator(str(folder / "training" / "tensorboard"))
        events.Reload()
        tag = next((t for t in events.Tags()["scalars"] if t.endswith("loss")), None)
        if tag is not None:
            points = events.Scalars(tag)
            ax.plot([p.step for p in points], [p.value for p in points], label=folder.name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.legend()
    return _savefig(fig, path)


def reproduce(method: str, dataset_dir: str | Path, output: str | Path, dataset: str = "chaos", setting: int = 1,
              folds: Optional[Sequence[int]] = None, gpus: Sequence[str] = (), nproc_per_fold: int = 1,
              overrides: Optional[Mapping[str, Any]] = None, cpu: bool = False, jobs: int = 1) -> list[dict]:
    """Train, evaluate and aggregate every fold (see the module docstring); returns the table's rows.

    ``gpus``: device ids; folds run concurrently, one per device (``nproc_per_fold`` > 1: that many devices per
    fold with torchrun). ``cpu``: the CPU switch (:data:`fsmis_monai.bundles.CPU_OVERRIDES`), ``jobs`` folds at
    once. Raises :class:`~fsmis_monai.io.FsmisInputError` for an unknown bundle and when a fold's training fails
    (naming its log).
    """
    from fsmis_monai.data.registry import NUM_FOLDS, get_dataset
    from fsmis_monai.engines import ensure_pseudolabels

    bundle = shipped_dir("bundles") / method
    if not (bundle / "configs" / "train.json").is_file():
        raise FsmisInputError(f"{bundle}: no such bundle")
    dataset_dir, output = Path(dataset_dir).resolve(), Path(output).resolve()
    dataset = get_dataset(dataset).key
    folds = list(range(NUM_FOLDS)) if folds is None else [int(f) for f in folds]
    overrides = {"dataset_name": dataset, "cache_dir": str(output), **dict(overrides or {})}
    settings = bundle_settings(bundle, {**overrides, "dataset_dir": str(dataset_dir)})
    # the pseudolabels are made once, here, for every fold (their folds would race to write the same folder)
    overrides["pseudolabel_dir"] = str(ensure_pseudolabels(
        dataset_dir, settings["pseudolabel_dir"], settings["pseudolabel_kind"], dataset, True,
        settings["pseudolabel_min_size"]))
    overrides["generate_pseudolabels"] = False
    runs = plan_folds(method, dataset_dir, output, dataset, setting, folds, overrides, cpu, nproc_per_fold)
    todo = [r for r in runs if not r.model.is_file()]
    slots = [",".join(gpus[i:i + nproc_per_fold]) for i in range(0, len(gpus), nproc_per_fold)] if gpus else []
    parallel = len(slots) if slots else max(1, jobs)
    estimate = estimate_seconds(method, settings["max_iterations"], len(todo), parallel)
    where = f"{len(slots)} GPU slot(s)" if slots else f"CPU, {parallel} at once"
    if estimate is None or not slots:
        print(f"{method}: {len(todo)} of {len(runs)} folds to train ({where}); estimated time: no GPU figure applies "
              f"(bench/RESULTS.md)", flush=True)
    else:
        print(f"{method}: {len(todo)} of {len(runs)} folds to train ({where}), {settings['max_iterations']} "
              f"iterations each; estimated time {estimate / 3600:.1f} h (H200 step times, bench/RESULTS.md)",
              flush=True)
    output.mkdir(parents=True, exist_ok=True)
    protocol = settings["val_protocols"][0]
    script = ["#!/bin/sh", f"# fsmis reproduce {method} {dataset} setting {setting}, {time.strftime('%Y-%m-%d %H:%M')}"]
    for r in runs:
        script.append(shlex.join(r.train_command) + ("   # done before, skipped" if r not in todo else ""))
        eval_over = {**r.overrides, "output_dir": str(r.folder / "evaluation")}
        script.append("# evaluation (run in-process, same as): " +
                      shlex.join(bundle_command(bundle, ["train.json", "evaluate.json"], eval_over)))
        script.append(f"# {BASELINE} floor (run in-process, same as): " + shlex.join(
            [sys.executable, "-m", "fsmis_monai", "evaluate", "--method", BASELINE, "--dataset-dir", str(dataset_dir),
             "--dataset", dataset, "--fold", str(r.fold), "--family", settings["fold_family"], "--protocols",
             ",".join(settings["val_protocols"]), "--output-dir", str(r.folder / BASELINE)]))
    write_text(output / "commands.sh", "\n".join(script) + "\n")

    free = list(slots) or [None] * parallel
    nets, floors = {}, {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        def train(run: FoldRun) -> FoldRun:
            slot = free.pop()
            try:
                print(f"fold {run.fold}: training" + (f" on GPU {slot}" if slot else ""), flush=True)
                if _train(run, slot) != 0 or not run.model.is_file():
                    raise FsmisInputError(f"{run.folder / 'train.log'}: fold {run.fold} training failed (see the log)")
            finally:
                free.append(slot)
            return run

        futures = [pool.submit(train, r) for r in todo]
        done = [r for r in runs if r not in todo] + [f.result() for f in as_completed(futures)]
    for run in sorted(done, key=lambda r: r.fold):
        device = "cpu" if cpu or not slots else f"cuda:{slots[0].split(',')[0]}"
        nets[run.fold], floors[run.fold] = evaluate_fold(run, bundle, cpu, device)
        print(f"fold {run.fold}: evaluated ({protocol})", flush=True)
    markdown, rows = results_table(method, dataset, setting, protocol, [nets[f] for f in sorted(nets)],
                                   [floors[f] for f in sorted(floors)])
    write_text(output / "results.md", markdown)
    with atomic_path(output / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    learning_curves([r.folder for r in runs], output / "learning_curves.png")
    print(markdown)
    return rows

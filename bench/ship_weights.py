"""Measure a trained bundle run like a paper and ship its weights in the bundle (issue 21).

Takes the output folder of a bundle training run (``model.pt`` + ``data_contract.json`` written by
``train.json``, its ``validation/iteration_<N>/summary.json`` learning curve) and:

1. evaluates the weights on the fold's held-out query scans with the fold's support scan (EP1 and ``whole``,
   per class), beside the untrained network (same bundle, same seed) and the no-learning floor
   (``support_copy``), and prints the table;
2. copies ``model.pt`` and its data contract into ``bundles/<method>/models/[<variant>/]``;
3. writes the figures to the bundle's metadata source (``bundles/_source/methods/<method>/metadata.json``:
   ``key_metrics`` with per-class and per-scan Dice, the training command, CPU hours; ``eval_metrics``) and
   re-renders the bundles;
4. draws the learning curve (held-out EP1 against iterations, the floor as a line) into the bundle's
   ``docs/learning_curve[_<variant>].png``.

    python bench/ship_weights.py --method qnet --run-dir /work/cache/ship/qnet_chaos \\
        --dataset-dir ../shared/data/chaos_mr_t2 --dataset chaos_mr_t2 --cpu-hours 0.9 \\
        --command "python -m monai.bundle run ..."
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = ["ep1", "whole"]


def bundle_network(method: str, ckpt: Path | None):
    """The bundle's ``inference.json`` network, in ``ckpt``'s recorded encoder (untrained when ``ckpt`` is None)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / method / "configs" / "inference.json"))
    parser["bundle_root"] = str(REPO / "bundles" / method)
    parser["ckpt_path"] = None if ckpt is None else str(ckpt)
    return parser, parser.get_parsed_content("network_def")


def evaluate_run(network, ckpt: Path | None, args: argparse.Namespace, out: Path, family: str, seed: int) -> dict:
    """Summary + per-case rows of ``network`` (weights from ``ckpt``) on the fold's held-out scans."""
    from fsmis_monai.evaluation.runner import run_evaluation

    summary = run_evaluation(dataset_dir=args.dataset_dir, output_dir=out, network=network, ckpt_path=ckpt,
                             dataset=args.dataset, fold=args.fold, family=family, protocols=PROTOCOLS, device="cpu",
                             seed=seed, progress=False, resume=False, save_predictions=False)
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    return {"summary": summary, "rows": rows}


def table(results: Dict[str, dict]) -> str:
    names = [c["name"] for c in next(iter(results.values()))["summary"]["protocols"]["ep1"]["classes"].values()]
    lines = ["| weights | protocol | " + " | ".join(names) + " | mean |", "|---|---|" + "---|" * (len(names) + 1)]
    for who, res in results.items():
        for p in PROTOCOLS:
            s = res["summary"]["protocols"][p]
            lines.append(f"| {who} | {p} | " + " | ".join(f"{c['mean']:.3f}" for c in s["classes"].values())
                         + f" | {s['mean']:.3f} |")
    return "\n".join(lines)


def key_metrics(results: Dict[str, dict], args: argparse.Namespace, record: dict, iterations: int) -> dict:
    from fsmis_monai.transforms.whole_scan import DEFAULT_STEPS

    def per_class(summary: dict, p: str) -> dict:
        return {c["name"]: round(c["mean"], 4) for c in summary["protocols"][p]["classes"].values()}

    trained = results["trained"]
    per_case: Dict[str, Dict[str, Dict[str, float]]] = {}
    for row in trained["rows"]:
        per_case.setdefault(row["protocol"], {}).setdefault(str(row["query_id"]), {})[row["class_name"]] = \
            round(float(row["dice"]), 6)
    return {
        "dataset": args.dataset, "fold": args.fold, "fold_family": args.family,
        "support_scan": int(trained["rows"][0]["support_id"]),
        "query_scans": sorted({int(r["query_id"]) for r in trained["rows"]}),
        "protocols": {p: {"mean_dice": round(trained["summary"]["protocols"][p]["mean"], 4),
                          "classes": per_class(trained["summary"], p)} for p in PROTOCOLS},
        "per_case_dice": per_case,
        "untrained_network": {p: round(results["untrained"]["summary"]["protocols"][p]["mean"], 4) for p in PROTOCOLS},
        "support_copy_floor": {p: {"mean_dice": round(results["support_copy"]["summary"]["protocols"][p]["mean"], 4),
                                   "classes": per_class(results["support_copy"]["summary"], p)} for p in PROTOCOLS},
        "whole_scan_steps": list(DEFAULT_STEPS),
        "encoder": record.get("encoder"), "initialisation": "random (no pretrained weights)",
        "iterations": iterations, "cpu_hours": args.cpu_hours, "threads": 1,
        "training_command": args.command,
        **({"remark": args.remark} if args.remark else {}),
    }


README_BLOCK = ("<!-- shipped-weights -->", "<!-- /shipped-weights -->")


def readme_section(method: str, key_metrics: Dict[str, dict]) -> str:
    """The bundle README's "Shipped weights" block, written from ``key_metrics`` (the one place of the figures)."""
    lines = [README_BLOCK[0], "## Shipped weights", "",
             "**CPU-trained, randomly initialised weights** (no ImageNet/COCO pretraining; one CPU thread), measured on "
             "held-out scans with the fold's support scan. The papers' figures come from pretrained ResNet-101 "
             "encoders trained on a GPU (~0.75-0.83 mean Dice): these weights are far from them, but above the "
             "no-learning floor (`support_copy`: the support mask copied onto the paired query slice) and the "
             "untrained network. Figures: `configs/metadata.json` `key_metrics`; learning curves: "
             "`docs/learning_curve*.png`.", ""]
    for variant, m in key_metrics.items():
        classes = list(m["protocols"]["ep1"]["classes"])
        lines += [f"`{m['file']}`: {m['dataset']} fold {m['fold']} (support scan {m['support_scan']}, query scans "
                  f"{', '.join(map(str, m['query_scans']))}), encoder `{m['encoder']}`, {m['iterations']} iterations, "
                  f"{m['cpu_hours']:.2f} CPU hours." + (f" {m['remark']}" if m.get("remark") else ""), "",
                  "| Dice | " + " | ".join(classes) + " | mean |", "|---|" + "---|" * (len(classes) + 1)]
        for p in ("ep1", "whole"):
            trained, floor = m["protocols"][p], m["support_copy_floor"][p]
            lines.append(f"| this file, {p} | " + " | ".join(f"{trained['classes'][c]:.3f}" for c in classes)
                         + f" | **{trained['mean_dice']:.3f}** |")
            lines.append(f"| support_copy floor, {p} | " + " | ".join(f"{floor['classes'][c]:.3f}" for c in classes)
                         + f" | {floor['mean_dice']:.3f} |")
        lines += [f"| untrained network, ep1 / whole | " + " | ".join("" for _ in classes)
                  + f" | {m['untrained_network']['ep1']:.3f} / {m['untrained_network']['whole']:.3f} |", "",
                  "Reproduce the file:", "", "    " + m["training_command"], ""]
    lines.append(README_BLOCK[1])
    return "\n".join(lines) + "\n"


def write_readme_section(bundle: Path, method: str, key_metrics: Dict[str, dict]) -> None:
    readme = bundle / "docs" / "README.md"
    text, block = readme.read_text(), readme_section(method, key_metrics)
    if README_BLOCK[0] in text:
        start, end = text.index(README_BLOCK[0]), text.index(README_BLOCK[1]) + len(README_BLOCK[1]) + 1
        text = text[:start] + block + text[end:]
    else:
        text = text.replace("## Citations\n", block + "\n## Citations\n", 1)
    readme.write_text(text)


def curve(run_dir: Path) -> Tuple[List[tuple], str]:
    """(iteration, held-out mean Dice) along the run and the protocol it was measured with:
    ``bench/encoder_curves.py``'s ``curve.jsonl`` (EP1) or the bundle's ``FewShotValidation`` summaries
    (``validation/iteration_<N>/summary.json``: the bundle's ``val_protocols``, EP1 where measured, else the first,
    e.g. SSL-ALPNet's ``alp``)."""
    if (run_dir / "curve.jsonl").is_file():
        rows = [json.loads(line) for line in (run_dir / "curve.jsonl").read_text().splitlines() if line.strip()]
        return sorted({r["iteration"]: r["ep1"]["mean"] for r in rows}.items()), "ep1"
    points, protocol = [], "ep1"
    for f in sorted((run_dir / "validation").glob("iteration_*/summary.json")):
        measured = json.loads(f.read_text())["protocols"]
        protocol = "ep1" if "ep1" in measured else next(iter(measured))
        points.append((int(f.parent.name.split("_")[1]), measured[protocol]["mean"]))
    return sorted(points), protocol


def plot_curve(points: List[tuple], protocol: str, floor: float, final: tuple, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    if protocol == "ep1" and final not in points:
        points = sorted(points + [final])
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"held-out {protocol.upper()} mean Dice")
    if protocol != "ep1":
        ax.plot([final[0]], [final[1]], marker="*", markersize=12, linestyle="none", label="shipped file, EP1")
    ax.axhline(floor, color="grey", linestyle="--", label="support_copy (no learning), EP1")
    ax.set_xlabel("training iteration (episodes)")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True)
    parser.add_argument("--run-dir", type=Path, required=True, help="the training run's output_dir (model.pt inside)")
    parser.add_argument("--dataset-dir", type=Path, required=True)
    parser.add_argument("--dataset", default="chaos_mr_t2")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--family", default=None, help="fold family (default: the bundle's fold_family)")
    parser.add_argument("--variant", default="", help="ship under models/<variant>/ (e.g. cmr_bssfp); '' = models/")
    parser.add_argument("--cpu-hours", type=float, required=True, help="training CPU time of the run (one thread)")
    parser.add_argument("--command", required=True, help="the command that trained the run")
    parser.add_argument("--remark", default="", help="one sentence on how the run departs from the paper's recipe "
                        "beyond encoder and initialisation (e.g. the self-supervision), kept in key_metrics and the README")
    parser.add_argument("--no-ship", action="store_true", help="measure and print only")
    args = parser.parse_args()

    import torch

    from fsmis_monai.bundles import render_all
    from fsmis_monai.networks.layout import read_layout
    from fsmis_monai.networks.methods import build_method

    ckpt = args.run_dir / "model.pt"
    record = read_layout(ckpt) or {}
    cfg, network = bundle_network(args.method, ckpt)
    family = args.family or cfg.get("fold_family", "qnet")
    args.family = family
    seed = int(cfg.get("seed", 0))
    work = args.run_dir / "ship_eval"
    results = {"trained": evaluate_run(network, ckpt, args, work / "trained", family, seed)}
    _, untrained = bundle_network(args.method, None)
    if record.get("encoder"):
        untrained = build_method(args.method, encoder=record["encoder"])
    results["untrained"] = evaluate_run(untrained, None, args, work / "untrained", family, seed)
    results["support_copy"] = evaluate_run(build_method("support_copy"), None, args, work / "support_copy", family, seed)
    print(table(results))
    points, protocol = curve(args.run_dir)
    iterations = max([p[0] for p in points] + [0])
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    n_params = sum(v.numel() for v in state.values() if torch.is_tensor(v))
    print(f"\n{args.method}: {record.get('encoder')} encoder, {n_params / 1e6:.2f} M values, "
          f"{ckpt.stat().st_size / 2**20:.1f} MiB")
    if args.no_ship:
        return
    bundle = REPO / "bundles" / args.method
    dest = bundle / "models" / args.variant if args.variant else bundle / "models"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckpt, dest / "model.pt")
    shutil.copyfile(args.run_dir / "data_contract.json", dest / "data_contract.json")
    metrics = key_metrics(results, args, record, iterations)
    metrics["file"] = str((dest / "model.pt").relative_to(bundle))
    source = REPO / "bundles" / "_source" / "methods" / args.method / "metadata.json"
    meta = json.loads(source.read_text())
    meta.setdefault("key_metrics", {})[args.variant or "default"] = metrics
    if not args.variant:
        meta["eval_metrics"] = {"mean_dice": metrics["protocols"]["ep1"]["mean_dice"],
                                "mean_dice_whole": metrics["protocols"]["whole"]["mean_dice"]}
    source.write_text(json.dumps(meta, indent=4) + "\n")
    if not args.variant and record.get("encoder"):
        # inference.json falls back to this encoder when it cannot read --ckpt_path's record (MONAI's
        # monai.bundle.load parses the config without a bundle_root, so "./models/model.pt" is not found)
        infer = source.with_name("inference.json")  # the method layer of inference.json alone
        layer = json.loads(infer.read_text()) if infer.is_file() else {}
        layer["encoder"] = record["encoder"]
        infer.write_text(json.dumps(layer, indent=4) + "\n")
    render_all(REPO / "bundles")
    write_readme_section(bundle, args.method, meta["key_metrics"])
    final = (iterations, metrics["protocols"]["ep1"]["mean_dice"])
    name = f"learning_curve_{args.variant}.png" if args.variant else "learning_curve.png"
    plot_curve(points, protocol, metrics["support_copy_floor"]["ep1"]["mean_dice"], final, bundle / "docs" / name,
               f"{args.method} ({record.get('encoder')}), {args.dataset} fold {args.fold}, CPU-trained")
    print(f"shipped {dest / 'model.pt'}; key_metrics in {source.relative_to(REPO)}; curve in docs/{name}")


if __name__ == "__main__":
    main()

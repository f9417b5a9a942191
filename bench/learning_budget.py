"""How much does each method learn in a fixed CPU budget? (issues 5 and 6)

For every method: the bundle's ``train.json`` (through MONAI's ``ConfigWorkflow``) with the CPU override set
(small encoder, SGD lr 0.01) trains on the supervoxels of CHAOS fold 0's training scans until the wall-clock
budget runs out; the trained network and the same network untrained (same seed, same initial weights)
are then evaluated on fold 0's held-out query scans (Q-Net EP1 protocol, support = the fold's support scan).
One table, side by side: mean Dice untrained vs trained, the gain and the ratio.

    python bench/learning_budget.py --dataset-dir ../shared/data/chaos_mr_t2 --minutes 20 --methods adnet qnet
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from fsmis_monai.bundles import CPU_OVERRIDES
from fsmis_monai.engines import ensure_pseudolabels
from fsmis_monai.evaluation import evaluate

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ssl_alpnet", "adnet", "qnet", "lslpn", "gmrd", "pami", "difd")


def train_for(method: str, args: argparse.Namespace, pseudo: dict, out: Path):
    """Train ``method`` until the budget is spent; return (network, untrained state, iterations, seconds)."""
    configs = REPO / "bundles" / method / "configs"
    kind = "superpixels" if method == "ssl_alpnet" else "supervoxels"
    wf = ConfigWorkflow(
        config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"), workflow_type="train", bundle_root=str(REPO / "bundles" / method),
        dataset_dir=str(args.dataset_dir), pseudolabel_dir=pseudo[kind], fold=args.fold, **CPU_OVERRIDES,
        image_size=args.image_size, max_iterations=100000, learning_rate=args.learning_rate,
        lr_milestones=[100000], num_workers=0, val_interval=0, seed=args.seed, device="$torch.device('cpu')",
        output_dir=str(out / method), ckpt_path=str(out / method / "model.pt"), save_interval=100000,
        log_interval=50, image_interval=200, progress_bar=False, resume=False, generate_pseudolabels=False,
    )
    wf.initialize()
    network = wf.parser.get_parsed_content("network_def")
    untrained = {k: v.detach().clone() for k, v in network.state_dict().items()}
    start = time.perf_counter()
    budget = args.minutes * 60

    def stop_when_spent(engine):
        if time.perf_counter() - start > budget:
            engine.terminate()

    wf.trainer.add_event_handler(Events.ITERATION_COMPLETED, stop_when_spent)
    wf.run()
    wf.finalize()
    return network, untrained, wf.trainer.state.iteration, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", type=Path, default=REPO.parent / "shared" / "data" / "chaos_mr_t2")
    parser.add_argument("--output", type=Path, default=Path("/tmp/fsmis_learning_budget"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget per method")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.output.resolve()
    pseudo = {}
    if "ssl_alpnet" in args.methods:
        pseudo["superpixels"] = ensure_pseudolabels(args.dataset_dir, out / "superpixels", "superpixels", "chaos",
                                                    workers=args.threads)
    if set(args.methods) - {"ssl_alpnet"}:
        pseudo["supervoxels"] = ensure_pseudolabels(args.dataset_dir, out / "supervoxels", "supervoxels", "chaos",
                                                    workers=args.threads)
    rows = []
    for method in args.methods:
        network, untrained_state, iterations, seconds = train_for(method, args, pseudo, out)
        common = dict(dataset="chaos", fold=args.fold, family="qnet", protocols=["ep1"], device="cpu",
                      progress=False, resume=False, save_predictions=False)
        trained = evaluate(network, args.dataset_dir, output_dir=out / method / "eval_trained", **common)
        network.load_state_dict(untrained_state)
        before = evaluate(network, args.dataset_dir, output_dir=out / method / "eval_untrained", **common)
        a, b = before["protocols"]["ep1"]["mean"], trained["protocols"]["ep1"]["mean"]
        rows.append({"method": method, "iterations": iterations, "train_minutes": round(seconds / 60, 1),
                     "untrained": round(a, 4), "trained": round(b, 4), "gain": round(b - a, 4),
                     "ratio": round(b / a, 2) if a > 0 else float("inf")})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nCHAOS-T2 fold {args.fold}, EP1 mean Dice on the fold's 4 held-out scans, small encoder, "
          f"{args.image_size}^2, {args.minutes:g} min CPU budget per method, {args.threads} threads\n")
    print("| method | iterations | train min | untrained | trained | gain | trained/untrained |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['iterations']} | {r['train_minutes']} | {r['untrained']:.3f} | "
              f"{r['trained']:.3f} | {r['gain']:+.3f} | {r['ratio']}x |")


if __name__ == "__main__":
    main()

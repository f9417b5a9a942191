"""Training-step cost of each few-shot method against its encoder's own forward + backward (issues 5, 6).

For every method (paper encoder layout, random init, 256^2, 1-shot, batch 1, SGD as the references):
  * ``floor s``: a plain forward + backward + SGD step of the method's encoder alone on the episode's two
    images (support and query in one batch), loss = sum of the means of its outputs;
  * ``step s``: the method's full training step on the same episode (forward with all its loss terms,
    backward, SGD step);
  * ``ratio``: median over steps of step / floor, each pair measured back to back (goal <= 1.15);
    beside it the same ratio of the process's CPU time and the fastest step over the fastest floor, both
    less sensitive to other processes on the machine;
  * ``data %``: building one episode (the episodic dataset with its augmentation, single process) as a
    share of the step (goal < 5 %), when the real scans are found.
Other processes share the machine, so absolute times fluctuate; the ratio compares timings taken in
alternation in the same run. Add a method by its registry name (``--methods qnet gmrd``).

    python bench/train_step.py --threads 2 --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from fsmis_monai.networks.methods import METHODS, build_method

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FSMIS_DATA", REPO.parent / "shared" / "data")) / "chaos_mr_t2"
DEFAULT_METHODS = ("ssl_alpnet", "adnet", "qnet", "lslpn", "gmrd", "pami", "difd")


def real_episode(size: int, shots: int, scans: int = 2):
    """One CHAOS ground-truth episode and the dataset that made it (None, None without the data)."""
    if not DATA.is_dir():
        return None, None
    from fsmis_monai.data.datalist import pair_scans
    from fsmis_monai.data.episodes import GroundTruthEpisodeDataset
    from fsmis_monai.data.volumes import load_volumes

    files = pair_scans(DATA, require_pseudolabels=False)[:scans]
    volumes = load_volumes(files, "chaos_mr_t2", image_size=(size, size), resize_mode="resize")
    min_size = max(1, round(200 * (size / 256) ** 2))  # the references' 200 pixels at 256^2
    dataset = GroundTruthEpisodeDataset(volumes, classes=(1, 4), n_shots=shots, length=100, min_size=min_size, seed=0)
    item = dataset[0]
    batch = {k: item[k][None] for k in ("support_images", "support_masks", "query_images", "query_labels")}
    return batch, dataset


def synthetic_episode(size: int, shots: int):
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(1, shots, size, size)
    masks[..., size // 4 : size // 2, size // 4 : size // 2] = 1.0
    labels = torch.zeros(1, size, size, dtype=torch.long)
    labels[:, size // 4 + 8 : size // 2 + 8, size // 4 : size // 2] = 1
    return {
        "support_images": torch.randn(1, shots, 3, size, size, generator=g),
        "support_masks": masks,
        "query_images": torch.randn(1, 3, size, size, generator=g),
        "query_labels": labels,
    }


def sgd(params):
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=1e-3, momentum=0.9, weight_decay=5e-4)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_method(name: str, batch: dict, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = build_method(name).train()
    encoder = model.encoder
    images = torch.cat([batch["support_images"].flatten(0, 1), batch["query_images"]])
    enc_opt, opt = sgd(encoder.parameters()), sgd(model.parameters())

    def floor_step():
        out = encoder(images)
        sum(v.float().mean() for v in out.values()).backward()
        enc_opt.step()
        enc_opt.zero_grad(set_to_none=True)

    def method_step():
        model.total_loss(model(**batch)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    floors, totals = [], []
    for i in range(warmup + steps):
        f, s = timed(floor_step), timed(method_step)
        if i >= warmup:
            floors.append(f)
            totals.append(s)
    return {
        "method": name,
        "encoder": type(encoder).__name__,
        "floor": statistics.median(f[0] for f in floors),
        "step": statistics.median(s[0] for s in totals),
        "ratio": statistics.median(s[0] / f[0] for s, f in zip(totals, floors)),
        "cpu_ratio": statistics.median(s[1] / f[1] for s, f in zip(totals, floors)),
        "min_ratio": min(s[0] for s in totals) / min(f[0] for f in floors),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    batch, dataset = real_episode(args.size, args.shots)
    source = "CHAOS-T2 ground-truth episode" if batch is not None else "synthetic episode"
    batch = batch if batch is not None else synthetic_episode(args.size, args.shots)
    data_s = None
    if dataset is not None:
        from data_loading import time_episodes  # bench/ is the script's folder, first on sys.path

        data_s = time_episodes(dataset, n=10, start=1)

    print(f"{args.size}^2, {args.shots}-shot, batch 1, {args.threads} threads, {source}, "
          f"{args.steps} timed steps (+{args.warmup} warm-up) per method")
    print("| method | encoder | floor s | step s | ratio (goal <= 1.15) | CPU-time ratio | fastest / fastest "
          "| data % (goal < 5) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.methods:
        r = bench_method(name, batch, args.steps, args.warmup)
        data = f"{100 * data_s / r['step']:.1f}" if data_s is not None else "n/a"
        print(f"| {r['method']} | {r['encoder']} | {r['floor']:.2f} | {r['step']:.2f} | {r['ratio']:.2f} | {r['cpu_ratio']:.2f} | {r['min_ratio']:.2f} | {data} |",
              flush=True)
    if data_s is not None:
        print(f"episode build (GroundTruthEpisodeDataset + augmentation, one process): {data_s * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

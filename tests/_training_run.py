"""A tiny ADNet bundle training run shared by the hardening and engine tests: its overrides and a script that
runs it in a subprocess (optionally killed mid-run)."""

from __future__ import annotations

from pathlib import Path

from fsmis_monai.bundles import CPU_OVERRIDES

from conftest import REPO_ROOT as REPO  # noqa: F401 (the repository the run script reads bundles from)


def prepare_run_data(chaos_dir: Path, root: Path) -> Path:
    """``root/data``: a small window of real CHAOS scans, and ``root/supervoxels``: their pseudolabels (min size
    500 at this size), the inputs :func:`train_overrides` expects; returns ``root``."""
    from fsmis_monai.engines import ensure_pseudolabels

    from _real_scans import write_chaos_window

    write_chaos_window(chaos_dir, root / "data")
    ensure_pseudolabels(root / "data", root / "supervoxels", "supervoxels", "chaos", min_size=500)
    return root


def train_overrides(data: Path, pseudo: Path, out: Path, **extra) -> dict:
    """A tiny ADNet bundle run: the CPU switch (small encoder, random init), 64 x 64, a few iterations, no validation or images."""
    return {"dataset_dir": str(data), "pseudolabel_dir": str(pseudo), "fold": None, **CPU_OVERRIDES,
            "image_size": 64, "max_iterations": 6, "save_interval": 2, "num_workers": 0, "val_interval": 0,
            "progress_bar": False, "output_dir": str(out), "ckpt_path": str(out / "model.pt"),
            "generate_pseudolabels": False, "log_interval": 1000, "image_interval": 1000, "min_size": 20,
            **extra}


# Run in a subprocess by the fault tests: one ADNet bundle training run (configs from the repository), printing
# the iteration it starts at and every loss; optionally SIGKILLs itself after an iteration or half-way through
# writing the checkpoint of an iteration (a crash mid-save).
TRAIN_SCRIPT = r'''
import io, json, os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

cfg = json.loads(sys.argv[1])
configs = Path(cfg["repo"]) / "bundles" / "adnet" / "configs"
wf = ConfigWorkflow(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
                    logging_file=str(configs / "logging.conf"), workflow_type="train",
                    bundle_root=str(configs.parent), **cfg["overrides"])
wf.initialize()
trainer = wf.trainer
trainer.add_event_handler(Events.STARTED, lambda e: print(f"started_at {e.state.iteration}", flush=True))
trainer.add_event_handler(Events.ITERATION_COMPLETED,
                          lambda e: print(f"loss {e.state.iteration} {e.state.output['loss'].item()!r}", flush=True))
if cfg.get("kill_after"):
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=cfg["kill_after"]),
                              lambda e: os.kill(os.getpid(), signal.SIGKILL))
if cfg.get("kill_in_save"):
    real_save = torch.save

    def half_save_then_die(obj, f, *args, **kwargs):
        if trainer.state.iteration == cfg["kill_in_save"]:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            fh = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = half_save_then_die
wf.run()
wf.finalize()
print("finished", flush=True)
'''

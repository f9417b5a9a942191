"""Small real-scan material shared by the hardening tests: CHAOS windows and a tiny training run script."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from fsmis_monai.io import save_nifti

REPO = Path(__file__).resolve().parents[1]


def write_chaos_window(chaos_dir: Path, out: Path, ids=(1, 2), size: int = 96, depth: int = 10) -> Path:
    """Real CHAOS scans cut to ``size x size x depth`` through the liver (image float32, label uint8)."""
    for i in ids:
        image = nib.load(chaos_dir / f"image_{i}.nii.gz")
        label = np.asarray(nib.load(chaos_dir / f"label_{i}.nii.gz").dataobj)
        zs = np.flatnonzero((label == 1).any(axis=(0, 1)))
        z0 = int(zs[len(zs) // 2]) - depth // 2
        window = (slice(56, 56 + size), slice(72, 72 + size), slice(z0, z0 + depth))
        save_nifti(out / f"image_{i}.nii.gz", np.asarray(image.dataobj)[window].astype(np.float32), affine=image.affine)
        save_nifti(out / f"label_{i}.nii.gz", label[window].astype(np.uint8), affine=image.affine)
    return out


def train_overrides(data: Path, pseudo: Path, out: Path, **extra) -> dict:
    """A tiny ADNet bundle run: small encoder, 64 x 64, a few iterations, no validation or images."""
    return {"dataset_dir": str(data), "pseudolabel_dir": str(pseudo), "fold": None, "encoder": "small",
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

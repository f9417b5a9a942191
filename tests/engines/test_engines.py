"""The few-shot engine pieces on MONAI's SupervisedTrainer, with episodes cut from a real CHAOS scan:
prepare_batch/inferer/loss wiring, learning actually happening, resumable episode order and checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.engines import SupervisedTrainer
from ignite.engine import Events
from monai.handlers import CheckpointLoader, CheckpointSaver, LrScheduleHandler
from torch.utils.data import DataLoader, Dataset

from fsmis_monai.engines import (
    ResumableEpisodeSampler,
    FewShotInferer,
    FewShotLoss,
    FewShotPrepareBatch,
    ResumeEpisodes,
    checkpoint_iteration,
    latest_checkpoint,
    loss_terms,
    prediction_overlay,
    query_overlays,
)
from fsmis_monai.io import load_nifti
from fsmis_monai.networks.encoders import SmallEncoder
from fsmis_monai.networks.methods.prototype import PrototypeSegmenter

SIZE = 64


class RealSliceEpisodes(Dataset):
    """Ground-truth episodes from one real scan: episode i = (class, support slice, adjacent query slice),
    a fixed function of (seed, i); ``served`` records the indices handed out (to check the resume order)."""

    def __init__(self, image: np.ndarray, label: np.ndarray, length: int, seed: int = 0) -> None:
        img = torch.as_tensor((image - image.mean()) / image.std(), dtype=torch.float32).permute(2, 0, 1)[:, None]
        self.image = F.interpolate(img, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
        lab = torch.as_tensor(label.astype(np.int64)).permute(2, 0, 1)[:, None].float()
        self.label = F.interpolate(lab, size=(SIZE, SIZE), mode="nearest")[:, 0].long()
        self.length, self.seed, self.served = length, seed, []
        self.slices = {c: [z for z in range(self.label.shape[0] - 1) if (self.label[z] == c).sum() > 20
                           and (self.label[z + 1] == c).sum() > 20] for c in (1, 4)}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        self.served.append(int(i))
        rng = np.random.default_rng([self.seed, int(i)])
        c = (1, 4)[int(rng.integers(2))]
        z = int(rng.choice(self.slices[c]))
        rgb = lambda t: t[None].repeat(3, 1, 1)  # noqa: E731
        return {"support_images": rgb(self.image[z])[None], "support_masks": (self.label[z] == c).float()[None],
                "query_images": rgb(self.image[z + 1]), "query_labels": (self.label[z + 1] == c).long()}


@pytest.fixture(scope="module")
def scan(chaos_dir):
    image, _ = load_nifti(chaos_dir / "image_1.nii.gz", dtype=np.float32)
    label, _ = load_nifti(chaos_dir / "label_1.nii.gz")
    return image, label


def _trainer(dataset, lr=1e-2, seed=0):
    torch.manual_seed(seed)
    net = PrototypeSegmenter(SmallEncoder(channels=16, width=8))
    sampler = ResumableEpisodeSampler(dataset)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=DataLoader(dataset, batch_size=1, sampler=sampler),
        network=net, optimizer=torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9), loss_function=FewShotLoss(),
        inferer=FewShotInferer(), prepare_batch=FewShotPrepareBatch(), train_handlers=[ResumeEpisodes(sampler)], decollate=False)
    return trainer, net


def test_prepare_batch_routes_support_as_keywords(scan):
    ds = RealSliceEpisodes(*scan, length=2)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    inputs, targets, args, kwargs = FewShotPrepareBatch()(batch, torch.device("cpu"))
    assert torch.equal(inputs, batch["query_images"]) and torch.equal(targets, batch["query_labels"])
    assert args == () and set(kwargs) == {"support_images", "support_masks", "query_labels"}
    assert kwargs["support_images"].shape == (2, 1, 3, SIZE, SIZE) and targets.dtype == torch.long
    net = PrototypeSegmenter(SmallEncoder(channels=16, width=8))
    out = FewShotInferer()(inputs, net, **kwargs)
    assert out["logits"].shape == (2, 2, SIZE, SIZE)
    # the loss is the method's own term: recompute the CE independently of the method
    expected = F.cross_entropy(out["logits"], targets)
    assert torch.allclose(FewShotLoss()(out, targets), expected)
    with pytest.raises(KeyError, match="query_labels"):
        FewShotPrepareBatch()({k: v for k, v in batch.items() if k != "query_labels"})


def test_trainer_learns_on_real_episodes(scan):
    """30 SGD steps on real liver/spleen episodes lower the query loss on fixed held-out episodes."""
    torch.set_num_threads(1)
    train = RealSliceEpisodes(*scan, length=30, seed=1)
    held = RealSliceEpisodes(*scan, length=6, seed=99)
    trainer, net = _trainer(train)

    def held_loss():
        net.eval()
        with torch.no_grad():
            b = next(iter(DataLoader(held, batch_size=6)))
            inputs, targets, _, kw = FewShotPrepareBatch()(b)
            return float(FewShotLoss()(FewShotInferer()(inputs, net, **kw), targets))

    before = held_loss()
    trainer.run()
    assert trainer.state.iteration == 30
    assert np.isfinite(trainer.state.output["loss"].item())
    terms = loss_terms(trainer.state.output)
    assert set(terms) == {"loss", "query_ce"} and terms["loss"] == pytest.approx(terms["query_ce"], rel=1e-5)
    assert held_loss() < before - 0.05
    overlay, mask = query_overlays(trainer.state.batch)
    assert overlay.shape == (1, 3, SIZE, SIZE) and mask.shape == (1, 1, SIZE, SIZE) and prediction_overlay(trainer.state.output).shape == (1, 3, SIZE, SIZE)


def test_resume_continues_iteration_lr_and_episodes(scan, tmp_path):
    """A run of 2 epochs x 4 episodes stopped at iteration 6 (inside epoch 2) and resumed from its checkpoint
    ends exactly like an uninterrupted run: same weights, same LR schedule position, and only episodes 6, 7
    served after the resume (the test dataset has no ``set_epoch``: both epochs serve indices 0..3)."""
    torch.set_num_threads(1)

    def make(ds, ckpt_dir, resume_from=None):
        torch.manual_seed(0)
        net = PrototypeSegmenter(SmallEncoder(channels=16, width=8))
        opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 5], gamma=0.5)
        sampler = ResumableEpisodeSampler(ds)
        trainer = SupervisedTrainer(
            device=torch.device("cpu"), max_epochs=2, train_data_loader=DataLoader(ds, batch_size=1, sampler=sampler),
            network=net, optimizer=opt, loss_function=FewShotLoss(), inferer=FewShotInferer(),
            prepare_batch=FewShotPrepareBatch(), decollate=False)
        state = {"network": net, "optimizer": opt, "lr_scheduler": sched, "trainer": trainer}
        handlers = [CheckpointLoader(resume_from, state, map_location="cpu")] if resume_from else []
        handlers += [ResumeEpisodes(sampler), LrScheduleHandler(sched, epoch_level=False, print_lr=False),
                     CheckpointSaver(str(ckpt_dir), state, save_interval=3, epoch_level=False, n_saved=None)]
        for h in handlers:
            h.attach(trainer)
        return trainer, net, opt

    full_ds = RealSliceEpisodes(*scan, length=4, seed=3)
    full, full_net, full_opt = make(full_ds, tmp_path / "full")
    full.run()
    assert full_ds.served == [0, 1, 2, 3] * 2

    part_ds = RealSliceEpisodes(*scan, length=4, seed=3)
    part, _, _ = make(part_ds, tmp_path / "part")
    part.add_event_handler(Events.ITERATION_COMPLETED(once=6), lambda e: e.terminate())
    part.run()
    ckpt = latest_checkpoint(tmp_path / "part")
    assert ckpt is not None and checkpoint_iteration(ckpt) == 6
    assert part_ds.served == [0, 1, 2, 3, 0, 1]

    resumed_ds = RealSliceEpisodes(*scan, length=4, seed=3)
    resumed, resumed_net, resumed_opt = make(resumed_ds, tmp_path / "part", resume_from=ckpt)
    resumed.run()
    assert resumed.state.iteration == 8
    assert resumed_ds.served == [2, 3]
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(full_opt.param_groups[0]["lr"]) == pytest.approx(2.5e-3)
    for a, b in zip(full_net.state_dict().values(), resumed_net.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_latest_checkpoint_picks_highest_iteration(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    for name in ("checkpoint_iteration=900.pt", "checkpoint_iteration=1000.pt", "checkpoint_final_iteration=950.pt",
                 "model.pt", "checkpoint_iteration=x.pt"):
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_iteration=1000.pt")
    assert checkpoint_iteration("model.pt") is None


def test_periodic_validation_runs_the_evaluator_and_logs(chaos_dir, tmp_path):
    """Every ``interval`` iterations the few-shot evaluator scores the network on held-out scans; the mean Dice
    reaches ``engine.state.metrics`` and TensorBoard, and the network is back in training mode afterwards."""
    from ignite.engine import Engine

    from fsmis_monai.engines import FewShotValidation

    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    from fsmis_monai.io import save_nifti

    for i in (1, 2):  # two real scans cut to a 96 x 96 x 8 window through the liver (fast to evaluate)
        image, nifti = load_nifti(chaos_dir / f"image_{i}.nii.gz")
        label, _ = load_nifti(chaos_dir / f"label_{i}.nii.gz")
        z = int(np.flatnonzero((label == 1).any(axis=(0, 1))).mean())
        window = (slice(48, 144), slice(80, 176), slice(z - 4, z + 4))
        save_nifti(tmp_path / f"image_{i}.nii.gz", image[window].astype(np.float32), affine=nifti.affine)
        save_nifti(tmp_path / f"label_{i}.nii.gz", label[window].astype(np.uint8), affine=nifti.affine)
    torch.manual_seed(0)
    net = PrototypeSegmenter(SmallEncoder(channels=16, width=8)).train()
    writer = Writer()
    engine = Engine(lambda e, b: None)
    FewShotValidation(net, tmp_path, interval=2, protocols=["ep1"], summary_writer=writer, device="cpu",
                      query_ids=[2], support_id=1, classes=[1]).attach(engine)
    engine.run(range(3), max_epochs=1)
    dice = engine.state.metrics["val_ep1_mean_dice"]
    assert 0.0 <= dice <= 1.0
    assert [(t, s) for t, _, s in writer.scalars] == [("val/ep1/mean_dice", 2), ("val/ep1/liver", 2)]
    assert writer.scalars[0][1] == pytest.approx(dice)
    assert net.training


def test_non_finite_loss_stops_training_with_the_terms_named():
    import pytest
    import torch

    from fsmis_monai.engines import FewShotLoss

    good = {"logits": torch.zeros(1, 2, 4, 4), "losses": {"query_nll": torch.tensor(0.5), "align": torch.tensor(0.25)}}
    assert float(FewShotLoss()(good)) == pytest.approx(0.75)
    bad = {"logits": torch.zeros(1, 2, 4, 4), "losses": {"query_nll": torch.tensor(0.5), "align": torch.tensor(float("nan"))}}
    with pytest.raises(FloatingPointError, match="align.*learning_rate"):
        FewShotLoss()(bad)

"""Episodic training datasets: supervoxel, superpixel and ground-truth episodes; settings 1 and 2.

Every dataset is a map-style ``torch.utils.data.Dataset`` of fixed epoch length ``length`` whose item
``i`` is a pure function of ``(seed, epoch, i)`` (:func:`fsmis_monai.data.seeding.episode_rng`): the
episode does not depend on the worker that builds it, on ``num_workers`` or on what came before, so
runs, resumed runs and multi-worker runs see the same episodes. The index only selects the episode
(the draw itself is random, as in the references, which ignore it), so no shuffling is needed. Call
``dataset.set_epoch(e)`` when epoch ``e`` starts (before its DataLoader iterator is created, e.g. on
ignite's ``EPOCH_STARTED`` with ``e = engine.state.epoch - 1``) to get fresh episodes every epoch;
without it every epoch replays the episodes of epoch 0 (with ``persistent_workers=True`` the workers keep
the epoch they started with, so leave that off). Pass ``worker_init_fn=seed_worker``
(:mod:`fsmis_monai.data.seeding`) to the DataLoader for any other randomness.

Batch format (one item; DataLoader default collation adds the leading batch axis B):

==========================  ==================================  =======================================
key                         item                                 after collation
==========================  ==================================  =======================================
``support_images``          float32 ``[K, 3, H, W]``             ``[B, K, 3, H, W]``
``support_masks``           float32 ``[K, H, W]``, {0, 1}        ``[B, K, H, W]``
``query_images``            float32 ``[3, H, W]``                ``[B, 3, H, W]``
``query_labels``            int64 ``[H, W]``, {0, 1} (255 =      ``[B, H, W]``
                            ignore, never produced here)
``scan_id``                 int (query's scan)                   int64 ``[B]``
``slice_index``             int (query's axial slice z)          int64 ``[B]``
``label_id``                int (supervoxel / superpixel id or   int64 ``[B]``
                            class id)
``support_scan_ids``        int64 ``[K]``                        ``[B, K]``
``support_slice_indices``   int64 ``[K]``                        ``[B, K]``
==========================  ==================================  =======================================

With ``n_queries = Q > 1`` the query entries gain a query axis: ``query_images`` ``[Q, 3, H, W]``,
``query_labels`` ``[Q, H, W]``, ``scan_id`` and ``slice_index`` int64 ``[Q]``. The shapes after
collation are those of :class:`fsmis_monai.networks.methods.base.FewShotSegmenter.forward`. Images are
z-scored (:mod:`fsmis_monai.data.volumes`) and the single channel is repeated to 3
(docs/reference.md#intensity-normalisation).

Setting 2 (docs/reference.md#settings-1-and-2, docs/reference.md#quirk-setting-2-and): ``exclude_classes`` removes every
training slice whose ground truth contains **any** of them (OR, correct, as SSL-ALPNet does). ``faithful=True``
reproduces the released ADNet-style code, which removes only slices containing **all** of them at once (AND). Setting 1:
no exclusion (``exclude_classes=()``); see :func:`setting_exclusions`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fsmis_monai.data.augment import EpisodeAugmentation
from fsmis_monai.data.registry import DatasetDescriptor, get_dataset
from fsmis_monai.data.seeding import episode_rng
from fsmis_monai.data.volumes import Volume

__all__ = [
    "EpisodeDataset",
    "SupervoxelEpisodeDataset",
    "SuperpixelEpisodeDataset",
    "GroundTruthEpisodeDataset",
    "excluded_slices",
    "setting_exclusions",
]


def excluded_slices(label: np.ndarray, classes: Sequence[int], faithful: bool = False) -> np.ndarray:
    """Boolean ``[Z]``: slices of a ``[Z, H, W]`` label removed by setting 2.

    Corrected (default): a slice containing any of ``classes``. Faithful: only a slice containing all of
    them (the ADNet-style loaders' logical AND, docs/reference.md#quirk-setting-2-and).
    """
    if len(classes) == 0:
        return np.zeros(label.shape[0], dtype=bool)
    present = np.stack([(label == int(c)).any(axis=(1, 2)) for c in classes], axis=1)
    return present.all(axis=1) if faithful else present.any(axis=1)


def setting_exclusions(
    dataset: str | DatasetDescriptor, setting: int, test_classes: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Classes whose slices training must drop: none in setting 1; the test classes in setting 2.

    ``test_classes`` defaults to all of the dataset's test classes; SSL-ALPNet trains once per group
    (``descriptor.setting2_groups``, e.g. CHAOS kidneys (2, 3) or liver+spleen (1, 4)).
    """
    if setting == 1:
        return ()
    if setting == 2:
        return tuple(int(c) for c in (test_classes if test_classes is not None else get_dataset(dataset).test_classes))
    raise ValueError(f"setting must be 1 or 2, got {setting}")


def _slice_counts(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, counts)``: the non-zero ids of a ``[Z, H, W]`` map and their pixel count per slice ``[Z, n_ids]``."""
    ids, inverse = np.unique(arr, return_inverse=True)
    inverse = inverse.reshape(arr.shape[0], -1)
    counts = np.stack([np.bincount(row, minlength=ids.size) for row in inverse])
    keep = ids != 0
    return ids[keep], counts[:, keep].astype(np.int32)


def _runs(flags: np.ndarray, min_length: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each run of consecutive True entries at least ``min_length`` long."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2]) if e - s >= min_length]


@dataclass(frozen=True)
class _Draw:
    supports: list  # [(volume index, z)]
    queries: list
    label_id: int


class EpisodeDataset(Dataset):
    """Shared machinery: seeding per item, mask extraction, augmentation, emptiness check, batch assembly.

    Args (every dataset):
        volumes: training :class:`Volume` s (with ``pseudolabel`` or ``label`` as the dataset draws from,
            and ``label`` for setting 2), all of one in-plane size.
        length: episodes per epoch (``max_iters_per_load`` in the references).
        n_shots, n_queries: slices in the support / query set (the references: 1 and 1).
        exclude_classes: setting-2 classes (see the module docstring); ``()`` for setting 1.
        augmentation: True for the dataset's reference scheme (:class:`EpisodeAugmentation` with
            :attr:`augmentation_policy`), False/None for none, or an :class:`EpisodeAugmentation`.
        seed: episodes are a function of ``(seed, epoch, index)``.
        faithful: as released: setting-2 AND exclusion (docs/reference.md#quirk-setting-2-and), labels warped bilinear +
            rounded (docs/reference.md#quirk-label-warping), plus the dataset's own documented quirk.
        max_tries: draws per episode before giving up with an error.
    """

    #: which array of a :class:`Volume` holds the ids drawn: ``"pseudolabel"`` or ``"label"``
    source = "pseudolabel"
    #: :class:`EpisodeAugmentation` policy of ``augmentation=True``
    augmentation_policy = "one_side"

    def __init__(
        self,
        volumes: Sequence[Volume],
        length: int = 1000,
        n_shots: int = 1,
        n_queries: int = 1,
        exclude_classes: Sequence[int] = (),
        augmentation: bool | EpisodeAugmentation | None = True,
        seed: int = 0,
        faithful: bool = False,
        max_tries: int = 1000,
    ) -> None:
        if not volumes:
            raise ValueError("no training volumes")
        if n_shots < 1 or n_queries < 1:
            raise ValueError(f"n_shots and n_queries must be >= 1, got {n_shots} and {n_queries}")
        if length < 1:
            raise ValueError(f"length (episodes per epoch; max_iterations x batch_size in the bundles) must be >= 1, "
                             f"got {length}")
        shapes = {v.spatial_shape for v in volumes}
        if len(shapes) > 1:
            raise ValueError(f"volumes differ in in-plane size {sorted(shapes)}: load them with one image_size")
        missing = [v.files.image.name for v in volumes if getattr(v, self.source) is None]
        if missing:
            raise ValueError(f"{type(self).__name__} needs {self.source}s; none loaded for {missing[:5]}")
        self.exclude_classes = tuple(int(c) for c in exclude_classes)
        if self.exclude_classes and any(v.label is None for v in volumes):
            raise ValueError("setting-2 exclusion needs the ground-truth labels of every training volume")
        if augmentation is True:
            augmentation = EpisodeAugmentation(self.augmentation_policy, faithful=faithful)
        self.augmentation = augmentation or None
        self.volumes = list(volumes)
        self.length, self.n_shots, self.n_queries = int(length), int(n_shots), int(n_queries)
        self.seed, self.faithful, self.max_tries = int(seed), faithful, int(max_tries)
        self.epoch = 0
        #: per volume, boolean [Z]: slices training may use (setting-2 exclusion applied)
        self.allowed = [
            ~excluded_slices(v.label, self.exclude_classes, faithful) if self.exclude_classes
            else np.ones(v.num_slices, dtype=bool)
            for v in self.volumes
        ]
        id_counts = [_slice_counts(getattr(v, self.source)) for v in self.volumes]
        self.ids = [ic[0] for ic in id_counts]
        self.counts = [ic[1] for ic in id_counts]
        empty = [v for v, ids in zip(self.volumes, self.ids) if not ids.size]
        if self.source == "pseudolabel" and 0 < len(empty) < len(self.volumes):  # none at all: the subclass's error
            for v in empty:
                warnings.warn(f"{v.files.pseudolabel or v.files.image}: pseudolabel of scan {v.scan_id} holds no "
                              "region (all zeros on the training grid), so that scan gives no episode; regenerate "
                              "it (fsmis supervoxels / superpixels --overwrite) or leave the scan out")

    def _pseudolabel_files(self, n: int = 3) -> str:
        """The first ``n`` pseudolabel files, for error messages."""
        names = [str(v.files.pseudolabel) for v in self.volumes[:n]]
        return ", ".join(names) + (f" and {len(self.volumes) - n} more" if len(self.volumes) > n else "")

    @property
    def allowed_slices(self) -> dict[int, list[int]]:
        """``{scan_id: [z, ...]}`` of the slices left after the setting-2 exclusion."""
        return {v.scan_id: np.flatnonzero(a).tolist() for v, a in zip(self.volumes, self.allowed)}

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Serve the episodes of ``epoch`` (episode = function of ``(seed, epoch, index)``)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def _draw(self, rng: np.random.Generator) -> _Draw | None:
        raise NotImplementedError

    def _pair(self, vz: tuple[int, int], label_id: int) -> tuple[np.ndarray, np.ndarray]:
        vol = self.volumes[vz[0]]
        ids = getattr(vol, self.source)[vz[1]]
        return vol.image[vz[1]][None].copy(), (ids == label_id).astype(np.float32)[None]

    def __getitem__(self, index: int) -> dict:
        rng = episode_rng(self.seed, self.epoch, int(index))
        for _ in range(self.max_tries):
            draw = self._draw(rng)
            if draw is None:
                continue
            supports = [self._pair(vz, draw.label_id) for vz in draw.supports]
            queries = [self._pair(vz, draw.label_id) for vz in draw.queries]
            if self.augmentation is not None:
                supports, queries = self.augmentation(supports, queries, rng)
            # an episode whose support (or query) mask vanished under augmentation teaches nothing; the
            # references did not check (SSL-ALPNet's `faithful` id draw may even yield empty masks on purpose)
            if not self._keep_empty and any(m.max() <= 0 for _, m in supports + queries):
                continue
            return self._assemble(draw, supports, queries)
        raise RuntimeError(
            f"{type(self).__name__}: no valid episode after {self.max_tries} draws (index {index}); check the "
            f"pseudolabels, min_size and the setting-2 exclusion {self.exclude_classes}"
        )

    @property
    def _keep_empty(self) -> bool:
        return False

    def _assemble(self, draw: _Draw, supports: list, queries: list) -> dict:
        scans = [self.volumes[v].scan_id for v, _ in draw.queries]
        slices = [z for _, z in draw.queries]
        q_img = torch.from_numpy(np.stack([np.repeat(img, 3, axis=0) for img, _ in queries]))
        q_lab = torch.from_numpy(np.stack([m[0] for _, m in queries]).astype(np.int64))
        one = self.n_queries == 1
        return {
            "support_images": torch.from_numpy(np.stack([np.repeat(img, 3, axis=0) for img, _ in supports])),
            "support_masks": torch.from_numpy(np.stack([m[0] for _, m in supports]).astype(np.float32)),
            "query_images": q_img[0] if one else q_img,
            "query_labels": q_lab[0] if one else q_lab,
            "scan_id": scans[0] if one else torch.tensor(scans, dtype=torch.int64),
            "slice_index": slices[0] if one else torch.tensor(slices, dtype=torch.int64),
            "label_id": int(draw.label_id),
            "support_scan_ids": torch.tensor([self.volumes[v].scan_id for v, _ in draw.supports], dtype=torch.int64),
            "support_slice_indices": torch.tensor([z for _, z in draw.supports], dtype=torch.int64),
        }


class SupervoxelEpisodeDataset(EpisodeDataset):
    """ADNet / Q-Net self-supervised episodes from 3D supervoxels (docs/reference.md#supervoxel-episodes).

    Each episode: a training volume uniformly, one of its supervoxel ids uniformly, the slices where the
    id occurs (minus setting-2 exclusions) split into runs of consecutive slices; a random run long enough,
    a random start in it, and ``n_shots + n_queries`` consecutive slices: the first ``n_shots`` are the
    support, the rest the queries, the order reversed with p = 0.5 (so the query lies above or below).
    The episode is kept when the largest mask of the window has at least ``min_size`` pixels (the Q-Net
    rule, 200 at 256^2), otherwise a new draw is made. Masks are the supervoxel id on each slice.
    Augmentation: the Q-Net scheme (gamma on one side, geometric on one side). Other arguments: see
    :class:`EpisodeDataset`.
    """

    source = "pseudolabel"
    augmentation_policy = "one_side"

    def __init__(self, volumes: Sequence[Volume], min_size: int = 200, **kwargs) -> None:
        super().__init__(volumes, **kwargs)
        self.min_size = int(min_size)
        self._volumes_with_ids = [i for i, ids in enumerate(self.ids) if ids.size]
        if not self._volumes_with_ids:
            raise ValueError(f"no supervoxel ids in any training volume: every pseudolabel is all zeros "
                             f"({self._pseudolabel_files()})")
        window, longest = self.n_shots + self.n_queries, max(v.num_slices for v in self.volumes)
        if window > longest:  # fail here, not after max_tries empty draws per item
            raise ValueError(f"n_shots + n_queries = {window} consecutive slices per episode, but the longest "
                             f"training volume has {longest} slices; lower n_shots")

    def _draw(self, rng: np.random.Generator) -> _Draw | None:
        v = self._volumes_with_ids[rng.integers(len(self._volumes_with_ids))]
        j = int(rng.integers(self.ids[v].size))
        window_length = self.n_shots + self.n_queries
        runs = _runs((self.counts[v][:, j] > 0) & self.allowed[v], window_length)
        if not runs:
            return None
        start, length = runs[rng.integers(len(runs))]
        first = start + int(rng.integers(length - window_length + 1))
        window = list(range(first, first + window_length))
        if self.counts[v][window, j].max() < self.min_size:
            return None
        if rng.random() < 0.5:
            window.reverse()
        return _Draw([(v, z) for z in window[: self.n_shots]], [(v, z) for z in window[self.n_shots:]],
                     int(self.ids[v][j]))


class SuperpixelEpisodeDataset(EpisodeDataset):
    """SSL-ALPNet self-supervised episodes from 2D superpixels (docs/reference.md#superpixel-episodes).

    Each episode: a training slice uniformly (among slices holding a superpixel and not excluded), one of
    its superpixels, and ``n_shots + n_queries`` independently augmented copies of that slice and mask
    (the first ``n_shots`` are the support). Augmentation: the ALP scheme (every copy independently).

    Superpixel id: corrected (default) draws uniformly among the ids present in the slice. ``faithful``
    draws ``randint(1, max id of the slice)`` as released (docs/reference.md#quirk-superpixel-ids): the top id is never
    drawn and an id missing from the slice gives an empty mask, kept as is (the slice is redrawn only when its top id is
    1, where the released code fails). ``faithful`` also selects the AND setting-2 exclusion.
    """

    source = "pseudolabel"
    augmentation_policy = "both"

    def __init__(self, volumes: Sequence[Volume], **kwargs) -> None:
        super().__init__(volumes, **kwargs)
        self.slices = [(v, int(z)) for v in range(len(self.volumes))
                       for z in np.flatnonzero((self.counts[v] > 0).any(axis=1) & self.allowed[v])]
        if not self.slices:
            raise ValueError(f"no training slice holds a superpixel (after the setting-2 exclusion) in "
                             f"{self._pseudolabel_files()}")

    @property
    def _keep_empty(self) -> bool:
        return self.faithful

    def _draw(self, rng: np.random.Generator) -> _Draw | None:
        v, z = self.slices[rng.integers(len(self.slices))]
        present = self.ids[v][self.counts[v][z] > 0]
        if self.faithful:
            top = int(present.max())
            if top <= 1:
                return None
            label_id = int(rng.integers(1, top))
        else:
            label_id = int(present[rng.integers(present.size)])
        return _Draw([(v, z)] * self.n_shots, [(v, z)] * self.n_queries, label_id)


class GroundTruthEpisodeDataset(EpisodeDataset):
    """Supervised episodes on ground-truth classes (LSLPN / PANet style pairs, docs/reference.md#ground-truth-episodes).

    Each episode: one of ``classes`` uniformly, then ``n_shots + n_queries`` distinct slices drawn from all
    training slices holding at least ``min_size`` pixels of it, in any scans (support and query usually come
    from different patients). Masks are ``label == class``. ``classes`` must leave out the test classes;
    ``exclude_classes`` additionally drops their slices (setting 2). Augmentation: ``one_side``.
    """

    source = "label"
    augmentation_policy = "one_side"

    def __init__(self, volumes: Sequence[Volume], classes: Sequence[int], min_size: int = 1, **kwargs) -> None:
        super().__init__(volumes, **kwargs)
        clash = set(int(c) for c in classes) & set(self.exclude_classes)
        if clash:
            raise ValueError(f"classes {sorted(clash)} are both trained on and excluded")
        self.min_size = int(min_size)
        need = self.n_shots + self.n_queries
        self.class_slices: dict[int, list[tuple[int, int]]] = {}
        for c in classes:
            found = []
            for v, (ids, counts) in enumerate(zip(self.ids, self.counts)):
                hit = np.flatnonzero(ids == int(c))
                if hit.size:
                    big_enough = (counts[:, hit[0]] >= self.min_size) & self.allowed[v]
                    found += [(v, int(z)) for z in np.flatnonzero(big_enough)]
            if len(found) < need:
                raise ValueError(f"class {c}: {len(found)} training slices with >= {min_size} pixels, need {need}")
            self.class_slices[int(c)] = found
        self.classes = tuple(self.class_slices)
        if not self.classes:
            raise ValueError("no training classes given")

    def _draw(self, rng: np.random.Generator) -> _Draw | None:
        c = self.classes[rng.integers(len(self.classes))]
        pool = self.class_slices[c]
        picks = [pool[i] for i in rng.choice(len(pool), size=self.n_shots + self.n_queries, replace=False)]
        return _Draw(picks[: self.n_shots], picks[self.n_shots:], c)

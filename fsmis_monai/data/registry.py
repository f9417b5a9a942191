"""Descriptors of the three FSMIS benchmarks and their cross-validation folds.

All facts come from the published pipelines (docs/reference.md#data-layer: datasets, preprocessing,
folds, settings 1 and 2): label ids and names, the canonical label maps, target spacing,
test classes, the supervoxel ``min_size`` and the two families of 5-fold splits.

Folds are expressed over the dataset's scan ids **sorted as integers** (the order every reference
repository uses), and returned as ids, never as positions, so that callers pair files by id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

FoldFamily = Literal["qnet", "adnet", "alp"]


@dataclass(frozen=True)
class DatasetDescriptor:
    """What the pipeline needs to know about one benchmark."""

    key: str
    title: str
    modality: Literal["MR", "CT"]
    label_names: Mapping[int, str]  # canonical id -> name (0 = background)
    raw_label_map: Mapping[int, int]  # raw value on disk -> canonical id (identity when already canonical)
    target_spacing: tuple[float, float, float]  # (x, y, z) mm
    spatial_size: tuple[int, int] = (256, 256)
    test_classes: tuple[int, ...] = ()
    # Setting 2 (Ouyang et al.): the two test groups trained separately (training excludes the group)
    setting2_groups: tuple[tuple[int, ...], ...] = ()
    supervoxel_min_size: int = 5000  # 3D Felzenszwalb min_size, voxels (ADNet/Q-Net release)
    superpixel_min_size: int = 400  # 2D Felzenszwalb min_size, pixels (SSL-ALPNet release)
    superpixel_body_threshold: float = 1e-4
    fold_test_size: int = 4  # query scans per fold; a fold lists test_size + 1 scans (one is the support)
    known_ids: tuple[int, ...] = ()
    citation: str = ""
    licence: str = ""

    @property
    def classes(self) -> tuple[int, ...]:
        return tuple(sorted(c for c in self.label_names if c != 0))

    @property
    def own_data(self) -> bool:
        """A user's own scans and masks (:data:`OWN_DATA`): every non-zero label value is a class, named by value."""
        return not self.raw_label_map

    def class_name(self, c: int) -> str:
        return self.label_names.get(int(c), str(int(c))) if self.own_data else self.label_names[int(c)]

    def class_id(self, name_or_id: str | int) -> int:
        """Accept a class id or a (case-insensitive) name such as ``"LIVER"`` or ``"liver"`` (own data: a label
        value)."""
        if isinstance(name_or_id, int) or str(name_or_id).isdigit():
            c = int(name_or_id)
            if c not in self.label_names and not self.own_data:
                raise KeyError(f"{self.key}: unknown class id {c}; known: {dict(self.label_names)}")
            return c
        for c, n in self.label_names.items():
            if n.lower() == str(name_or_id).lower():
                return c
        if self.own_data:
            raise KeyError(f"unknown class {name_or_id!r}: with no dataset (none) a class is a label value, e.g. 255")
        raise KeyError(f"{self.key}: unknown class {name_or_id!r}; known: {dict(self.label_names)}")

    def pseudolabel_min_size(self, kind: str) -> int:
        """The reference ``min_size`` of the pseudolabels of ``kind`` (``"supervoxels"`` or ``"superpixels"``)."""
        sizes = {"supervoxels": self.supervoxel_min_size, "superpixels": self.superpixel_min_size}
        if kind not in sizes:
            raise ValueError(f"unknown pseudolabel kind {kind!r}; use 'supervoxels' or 'superpixels'")
        return sizes[kind]

    def pseudolabel_folder(self, kind: str, min_size: int | None = None) -> str:
        """Folder name of this dataset's pseudolabels of ``kind``, e.g. ``chaos_mr_t2_supervoxels_5000``
        (``min_size`` None: the reference size). Bundles put it under their ``cache_dir``, never inside the
        dataset folder, so training works on read-only data and one cache can hold several datasets."""
        size = self.pseudolabel_min_size(kind) if min_size is None else int(min_size)
        return f"{self.key}_{kind}_{size}"


CHAOS_MR_T2 = DatasetDescriptor(
    key="chaos_mr_t2",
    title="CHAOS MRI T2-SPIR (abdominal)",
    modality="MR",
    label_names={0: "background", 1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"},
    raw_label_map={0: 0, 1: 1, 2: 2, 3: 3, 4: 4},
    target_spacing=(1.25, 1.25, 7.7),
    test_classes=(1, 2, 3, 4),
    setting2_groups=((2, 3), (1, 4)),
    supervoxel_min_size=5000,
    superpixel_body_threshold=1e-4 + 50,
    fold_test_size=4,
    known_ids=(1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39),
    citation="Kavur et al., CHAOS Challenge - combined (CT-MR) healthy abdominal organ segmentation, "
    "Medical Image Analysis 69, 2021",
    licence="CC BY-SA 4.0",
)

SYNAPSE_CT = DatasetDescriptor(
    key="synapse_ct",
    title="Synapse / SABS multi-organ abdominal CT (BTCV)",
    modality="CT",
    label_names={
        0: "background", 1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus",
        6: "liver", 7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_splenic_vein",
        11: "pancreas", 12: "right_adrenal_gland", 13: "left_adrenal_gland",
    },
    raw_label_map={i: i for i in range(14)},
    target_spacing=(1.75, 1.75, 0.0),  # in-plane 448 -> 256 px (x1.75 of the source spacing); z kept (0 = keep)
    test_classes=(1, 2, 3, 6),
    setting2_groups=((2, 3), (1, 6)),
    supervoxel_min_size=5000,
    superpixel_body_threshold=1e-4,
    fold_test_size=6,
    known_ids=tuple(range(30)),
    citation="Landman et al., MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault (Synapse), 2015",
    licence="Synapse terms of use",
)

CMR_BSSFP = DatasetDescriptor(
    key="cmr_bssfp",
    title="MS-CMRSeg 2019 cardiac MRI, bSSFP",
    modality="MR",
    label_names={0: "background", 1: "lv_myocardium", 2: "lv_blood_pool", 3: "right_ventricle"},
    raw_label_map={0: 0, 200: 1, 500: 2, 600: 3},
    target_spacing=(1.25, 1.25, 7.99),
    test_classes=(1, 2, 3),
    setting2_groups=(),  # reported under setting 1 only
    supervoxel_min_size=1000,
    superpixel_body_threshold=1e-4,
    fold_test_size=7,
    known_ids=tuple(range(1, 36)),
    citation="Zhuang, Multivariate mixture model for myocardial segmentation combining multi-source images, "
    "IEEE TPAMI 41(12), 2019 (MS-CMRSeg 2019)",
    licence="research use (MS-CMRSeg terms)",
)

#: ``dataset_name none`` (or null): a user's own scans and masks (e.g. 0/255), no benchmark. Every non-zero label
#: value is a class named by its value; there are no folds (training uses every scan; evaluation takes
#: ``support_id``, default the lowest scan id, and ``query_ids``, default every other scan); pseudolabels use the
#: ADNet/Q-Net release's supervoxel ``min_size`` 5000 and SSL-ALPNet's superpixel defaults.
OWN_DATA = DatasetDescriptor(
    key="none",
    title="own data (no benchmark dataset)",
    modality="MR",  # only picks the default normalisation of training_volumes: per-volume z-score
    label_names={0: "background"},
    raw_label_map={},
    target_spacing=(0.0, 0.0, 0.0),  # unused: own scans keep their spacing unless they differ (then kept each)
    supervoxel_min_size=5000,
    superpixel_min_size=400,
    superpixel_body_threshold=1e-4,
    fold_test_size=0,
)

DATASETS: dict[str, DatasetDescriptor] = {d.key: d for d in (CHAOS_MR_T2, SYNAPSE_CT, CMR_BSSFP)}
_ALIASES = {"chaos": "chaos_mr_t2", "chaost2": "chaos_mr_t2", "sabs": "synapse_ct", "synapse": "synapse_ct",
            "cmr": "cmr_bssfp", "ms_cmrseg": "cmr_bssfp"}


def get_dataset(name: str | DatasetDescriptor | None) -> DatasetDescriptor:
    """Look a descriptor up by key or alias (``chaos``, ``sabs``, ``cmr``...); ``None``, ``"none"`` or ``""``:
    :data:`OWN_DATA`."""
    if isinstance(name, DatasetDescriptor):
        return name
    if name is None or str(name).strip().lower() in ("none", ""):
        return OWN_DATA
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} (aliases {sorted(_ALIASES)})")
    return DATASETS[key]


# ------------------------------------------------------------------------------------------- folds


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: the support scan, the query scans and the training scans (ids)."""

    index: int
    family: str
    support_id: int
    query_ids: tuple[int, ...]
    train_ids: tuple[int, ...]
    test_ids: tuple[int, ...] = field(default=())  # fold list as the reference prints it (queries + support)


NUM_FOLDS = 5


def _circular(ids: Sequence[int], start: int, count: int) -> list[int]:
    return [ids[(start + i) % len(ids)] for i in range(count)]


def get_fold(
    dataset: str | DatasetDescriptor,
    fold: int,
    family: FoldFamily = "qnet",
    ids: Sequence[int] | None = None,
    support_index: int | None = None,
) -> Fold:
    """The fold ``fold`` (0-4) of ``dataset`` in a reference family's convention.

    - ``"qnet"`` (Q-Net, GMRD, PAMI, DIFD released scripts) and ``"adnet"``: overlapping folds of
      ``test_size + 1`` consecutive scans (the last fold wraps round to the first scan); training uses
      every other scan. Support: the 3rd scan of the fold (``supp_idx=2`` in the Q-Net-family scripts) or
      the last one (ADNet).
    - ``"alp"`` (SSL-ALPNet): ``test_size`` query scans starting at ``fold * test_size`` plus the next scan
      (circular) as support.

    ``support_index`` overrides the position of the support inside the fold list.
    ``ids`` defaults to the dataset's known ids; the order used is always ascending integer order.
    """
    desc = get_dataset(dataset)
    if desc.own_data:
        raise ValueError("own data (dataset none) has no benchmark folds; choose the scans (support_id, query_ids)")
    if not 0 <= int(fold) < NUM_FOLDS:
        raise ValueError(f"fold must be in 0..{NUM_FOLDS - 1}, got {fold}")
    pool = sorted(int(i) for i in (ids if ids is not None else desc.known_ids))
    size = desc.fold_test_size + 1
    if len(pool) < size:
        raise ValueError(f"{desc.key}: {len(pool)} scans cannot make folds of {size} scans")
    # All families hold the same scans (ADNet's get_folds and ALP's _SEP windows coincide, the last
    # fold wrapping round to the first scan). They differ in the order of the list, which decides the
    # support: ADNet/Q-Net list the wrapped fold in ascending order (first scan first), ALP circularly.
    default_supports = {"qnet": 2, "adnet": size - 1, "alp": size - 1}
    if family not in default_supports:
        raise ValueError(f"unknown fold family {family!r}; use 'qnet', 'adnet' or 'alp'")
    listed = _circular(pool, fold * desc.fold_test_size, size)
    if family != "alp":
        listed = sorted(listed, key=pool.index)
    default_support = default_supports[family]
    s = default_support if support_index is None else int(support_index)
    if not -size <= s < size:
        raise ValueError(f"support_index {s} outside a fold of {size} scans")
    support = listed[s]
    queries = tuple(i for i in listed if i != support)
    train = tuple(i for i in pool if i not in listed)
    return Fold(index=int(fold), family=family, support_id=support, query_ids=queries, train_ids=train,
                test_ids=tuple(listed))

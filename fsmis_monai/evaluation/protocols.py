"""The published volumetric few-shot evaluation protocols as data: which support slices, which query
slice uses which support, and which query slices are scored.

Every protocol is reduced to a :class:`ProtocolPlan` computed from the binary class masks of the support
and the query scan. The evaluator predicts the union of the ``(support group, query slice)`` pairs that the
requested protocols need, once, and each protocol reads its own slices from that shared pass.

Protocols (docs/reference.md#evaluation-protocols; z is the last array axis):

- ``alp`` (SSL-ALPNet, Ouyang et al. ECCV 2020): 3 support slices at positions ``int(p * C)``,
  ``p = 1/6, 1/2, 5/6`` of the C support slices holding the class; every query slice is predicted with
  support ``clip(int((z - z_min) // ((z_max - z_min) / 3)), 0, 2)``; only ``z_min <= z <= z_max`` (the
  class's slice range in the query, gaps included) is scored.
- ``ep1`` (ADNet EP1, Hansen et al. MedIA 2022; Q-Net, GMRD, PAMI, DIFD): the same 3 support slices; only
  the query slices holding the class are predicted and scored, split at ``np.linspace(0, C_q, 4).astype(int)``
  (chunk k uses support k).
- ``ep2`` (ADNet EP2): one support slice ``int(0.5 * C)``; every query slice is predicted and scored.
- ``senet`` (Roy et al. MedIA 2020 "squeeze & excite" protocol as LSLPN, Yu et al. ISBI 2021, runs it):
  support and query cut to the class's organ range (slices with more than 200 class pixels), both split in
  n = 12 chunks at ``floor(i / n * L)``; query chunk i uses the middle slice of support chunk i.
- ``whole`` (no oracle, this toolkit): every query slice is predicted and scored, so false positives away
  from the organ count. Support slices as ``ep1``; the query's labels are not looked at: slice z uses the
  support slice whose relative position in the support scan, ``s / (Z_s - 1)``, is nearest to
  ``z / (Z_q - 1)``. The evaluator then applies the oracle-free whole-scan steps (support-guided range,
  slice presence, 3D consistency: :mod:`fsmis_monai.transforms.whole_scan`, option ``whole_scan_steps``) to
  the plan's prediction. This is the number a user segmenting a new scan gets.

A query scan without the class gives the oracle protocols (``alp``, ``ep1``, ``senet``) nothing to predict
or score (the references crash there); the evaluator reports such cases as empty ground truth. Under
``whole`` and ``ep2`` its false positives score Dice 0 and the case is averaged; only a volume with neither
ground truth nor prediction is undefined (:mod:`.metrics`).

``faithful=True`` reproduces the released reference behaviour where it is a bug
(docs/reference.md#quirk-lslpn-evaluation): the SENet organ range drops the scan's last slice and the last organ slice,
an empty support chunk is an error and Dice is smoothed by 0.001. The default (corrected) keeps the full organ range,
falls back to the support slice at the chunk's centre position when a support chunk is empty (short organs such as the
kidneys in 12 chunks) and uses the plain Dice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from fsmis_monai.io import FsmisInputError

PROTOCOLS: tuple[str, ...] = ("alp", "ep1", "ep2", "senet", "whole")
#: Protocols that score only slices chosen with the query's ground truth (an oracle of the organ's extent).
ORACLE_PROTOCOLS: frozenset[str] = frozenset({"alp", "ep1", "senet"})

SupportGroup = tuple[int, ...]  # support-scan slice indices segmented together as one k-shot support set


@dataclass(frozen=True)
class ProtocolPlan:
    """What one protocol predicts and scores for one (query scan, class).

    ``assignment[z]`` is the index into ``support_groups`` used for query slice z, or -1 when the protocol
    does not predict slice z; ``scored[z]`` says whether slice z enters the Dice. ``dice_smooth`` is added
    to the numerator and denominator of the Dice (0 except the faithful ``senet`` protocol).
    """

    protocol: str
    support_groups: tuple[SupportGroup, ...]
    assignment: np.ndarray
    scored: np.ndarray
    dice_smooth: float = 0.0
    notes: tuple[str, ...] = field(default=())

    @property
    def predicted(self) -> np.ndarray:
        return self.assignment >= 0

    def requests(self) -> dict[SupportGroup, list[int]]:
        """Query slices each support group must segment for this plan."""
        out: dict[SupportGroup, list[int]] = {}
        for z in np.flatnonzero(self.predicted):
            out.setdefault(self.support_groups[self.assignment[z]], []).append(int(z))
        return out


# ------------------------------------------------------------------------------------- arithmetic


def class_slices(mask: np.ndarray, min_pixels: int = 1) -> np.ndarray:
    """Indices z (ascending) of the slices ``mask[..., z]`` holding at least ``min_pixels`` foreground pixels."""
    counts = np.asarray(mask).reshape(-1, mask.shape[-1]).sum(0)
    return np.flatnonzero(counts >= min_pixels)


def part_fractions(n_parts: int) -> list[float]:
    """Chunk-centre fractions ``1/(2n) + i (1 - 1/n)/(n - 1)``: [1/6, 1/2, 5/6] for 3 parts (SSL-ALPNet's formula)."""
    if n_parts == 1:
        return [0.5]
    half, interval = 1.0 / (2 * n_parts), (1.0 - 1.0 / n_parts) / (n_parts - 1)
    return [half + interval * i for i in range(n_parts)]


def fraction_picks(n_slices: int, n_parts: int = 3) -> list[int]:
    """Positions ``int(p * C)`` among C labelled slices: C = 11 -> [1, 5, 9], C = 24 -> [4, 12, 20]."""
    return [int(p * n_slices) for p in part_fractions(n_parts)]


def linspace_bounds(n_slices: int, n_parts: int = 3) -> np.ndarray:
    """EP1 chunk boundaries ``np.linspace(0, C_q, n + 1).astype(int)``: C_q = 11 -> [0, 3, 7, 11]."""
    return np.linspace(0, n_slices, n_parts + 1).astype(int)


def alp_part(z: int, z_min: int, z_max: int, n_parts: int = 3) -> int:
    """SSL-ALPNet's chunk of query slice z from its relative position in [z_min, z_max], clipped to [0, n-1].

    A single-slice organ (z_max == z_min, a division by zero in the reference) uses the middle part.
    """
    if z_max == z_min:
        return n_parts // 2
    part = int((z - z_min) // ((z_max - z_min) / n_parts))
    return min(max(part, 0), n_parts - 1)


def floor_bounds(n_slices: int, n_parts: int) -> list[int]:
    """SENet/LSLPN chunk boundaries ``floor(i / n * L)`` for i = 0..n (float arithmetic as the reference)."""
    return [math.floor(i / n_parts * n_slices) for i in range(n_parts + 1)]


def senet_range(mask: np.ndarray, min_pixels: int = 200, faithful: bool = False) -> np.ndarray:
    """The organ range of the SENet protocol: slices from the first to the last with > ``min_pixels`` pixels.

    ``faithful`` reproduces LSLPN's off-by-one twice over: the scan's last slice is never tested and the
    last organ slice is excluded from the range.
    """
    counts = np.asarray(mask).reshape(-1, mask.shape[-1]).sum(0)
    n = mask.shape[-1] - 1 if faithful else mask.shape[-1]
    idx = [z for z in range(n) if counts[z] > min_pixels]
    if not idx:
        return np.zeros(0, dtype=int)
    return np.arange(idx[0], idx[-1] + (0 if faithful else 1))


# ---------------------------------------------------------------------------------------- plans


def _support_slices(support_mask: np.ndarray, what: str) -> np.ndarray:
    zs = class_slices(support_mask)
    if zs.size == 0:
        raise FsmisInputError(f"{what}: the support scan holds no slice of this class; choose another support scan")
    return zs


def plan_alp(query_mask: np.ndarray, support_mask: np.ndarray, n_parts: int = 3, **_: object) -> ProtocolPlan:
    zs = _support_slices(support_mask, "alp")
    groups = tuple((int(zs[i]),) for i in fraction_picks(len(zs), n_parts))
    depth = query_mask.shape[-1]
    q = class_slices(query_mask)
    assignment = np.full(depth, -1)
    scored = np.zeros(depth, bool)
    if q.size:  # the reference predicts every slice but needs the query's class range to chunk
        z_min, z_max = int(q.min()), int(q.max())
        assignment[:] = [alp_part(z, z_min, z_max, n_parts) for z in range(depth)]
        scored[z_min : z_max + 1] = True
    return ProtocolPlan("alp", groups, assignment, scored)


def plan_ep1(query_mask: np.ndarray, support_mask: np.ndarray, n_parts: int = 3, **_: object) -> ProtocolPlan:
    zs = _support_slices(support_mask, "ep1")
    groups = tuple((int(zs[i]),) for i in fraction_picks(len(zs), n_parts))
    q = class_slices(query_mask)
    assignment = np.full(query_mask.shape[-1], -1)
    bounds = linspace_bounds(len(q), n_parts)
    for k in range(n_parts):
        assignment[q[bounds[k] : bounds[k + 1]]] = k
    scored = np.zeros(query_mask.shape[-1], bool)
    scored[q] = True
    return ProtocolPlan("ep1", groups, assignment, scored)


def plan_ep2(query_mask: np.ndarray, support_mask: np.ndarray, **_: object) -> ProtocolPlan:
    zs = _support_slices(support_mask, "ep2")
    depth = query_mask.shape[-1]
    return ProtocolPlan("ep2", ((int(zs[int(0.5 * len(zs))]),),), np.zeros(depth, int), np.ones(depth, bool))


def plan_senet(
    query_mask: np.ndarray,
    support_mask: np.ndarray,
    n_chunks: int = 12,
    min_pixels: int = 200,
    faithful: bool = False,
    **_: object,
) -> ProtocolPlan:
    s_range = senet_range(support_mask, min_pixels, faithful)
    if s_range.size == 0:
        raise FsmisInputError(f"senet: no support slice has more than {min_pixels} pixels of this class")
    q_range = senet_range(query_mask, min_pixels, faithful)
    depth = query_mask.shape[-1]
    assignment = np.full(depth, -1)
    scored = np.zeros(depth, bool)
    scored[q_range] = True
    s_bounds, q_bounds = floor_bounds(len(s_range), n_chunks), floor_bounds(len(q_range), n_chunks)
    groups: list[SupportGroup] = []
    notes: list[str] = []
    for i in range(n_chunks):
        q_chunk = q_range[q_bounds[i] : q_bounds[i + 1]]
        if q_chunk.size == 0:
            continue
        s_chunk = s_range[s_bounds[i] : s_bounds[i + 1]]
        if s_chunk.size:
            s = int(s_chunk[len(s_chunk) // 2])
        elif faithful:
            raise FsmisInputError(
                f"senet (faithful): support organ range of {len(s_range)} slices leaves chunk {i} of {n_chunks} "
                "empty; the reference crashes here. Use faithful=False."
            )
        else:
            s = int(s_range[min(math.floor((i + 0.5) / n_chunks * len(s_range)), len(s_range) - 1)])
            notes.append(f"support chunk {i} empty: centre slice {s} used")
        if (s,) not in groups:
            groups.append((s,))
        assignment[q_chunk] = groups.index((s,))
    return ProtocolPlan("senet", tuple(groups), assignment, scored, 0.001 if faithful else 0.0, tuple(notes))


def plan_whole(query_mask: np.ndarray, support_mask: np.ndarray, n_parts: int = 3, **_: object) -> ProtocolPlan:
    zs = _support_slices(support_mask, "whole")
    picks = [int(zs[i]) for i in fraction_picks(len(zs), n_parts)]
    depth, s_depth = query_mask.shape[-1], support_mask.shape[-1]
    s_rel = np.array(picks, float) / max(s_depth - 1, 1)
    q_rel = np.arange(depth, dtype=float) / max(depth - 1, 1)
    assignment = np.abs(q_rel[:, None] - s_rel[None, :]).argmin(1)  # ties -> the lower support
    return ProtocolPlan("whole", tuple((p,) for p in picks), assignment, np.ones(depth, bool))


PLANNERS: dict[str, Callable[..., ProtocolPlan]] = {
    "alp": plan_alp,
    "ep1": plan_ep1,
    "ep2": plan_ep2,
    "senet": plan_senet,
    "whole": plan_whole,
}


def check_protocols(protocols: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise ``"ep1,whole"`` or a list to a tuple of known protocol names (order kept, no repeats)."""
    names = protocols.split(",") if isinstance(protocols, str) else list(protocols)
    out: list[str] = []
    for p in (str(n).strip().lower() for n in names):
        if p not in PLANNERS:
            raise ValueError(f"unknown protocol {p!r}; known: {', '.join(PROTOCOLS)}")
        if p and p not in out:
            out.append(p)
    if not out:
        raise ValueError("no evaluation protocol given")
    return tuple(out)


def make_plan(protocol: str, query_mask: np.ndarray, support_mask: np.ndarray, faithful: bool = False,
              **options: object) -> ProtocolPlan:
    """Plan ``protocol`` for one query and class from binary masks shaped [..., Z]."""
    if protocol not in PLANNERS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    return PLANNERS[protocol](np.asarray(query_mask, bool), np.asarray(support_mask, bool), faithful=faithful, **options)


def merge_requests(plans: Sequence[ProtocolPlan]) -> dict[SupportGroup, list[int]]:
    """The shared prediction pass: for each support group, the sorted union of query slices it segments."""
    merged: dict[SupportGroup, set[int]] = {}
    for plan in plans:
        for group, zs in plan.requests().items():
            merged.setdefault(group, set()).update(zs)
    return {g: sorted(zs) for g, zs in merged.items()}

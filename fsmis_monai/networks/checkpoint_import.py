"""Convert checkpoints released with the original repositories into this project's state dicts.

Each :class:`ReferenceLayout` says how the parameter names of one reference model (read from its public
code; no code copied) become ours: prefix ``rules`` (reference prefix -> our prefix, each applied once, the
longest matching prefix wins) and ``dropped`` reference tensors this project intentionally has no place for,
each with the reason. A key that no rule or drop recognises is *unknown*.

:func:`convert_checkpoint` unwraps the file (plain state dict, ``{"model"|"state_dict"|"network": ...}``,
DataParallel ``module.`` prefixes), checks that the checkpoint is one of the requested method (every rule of
its layout used, no key that only another method's layout knows), renames, checks every shape against the
method built at the paper layout (:func:`~fsmis_monai.networks.methods.build_method`, on the ``meta`` device,
so nothing is computed), and returns the new state dict with a :class:`ImportReport`. The state dict carries
the layout record of the target network (:mod:`fsmis_monai.networks.layout`; ``faithful=True``: the
reference's encoder layout too), so it loads only into a network of that layout.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from fsmis_monai.io import FsmisInputError, state_dict_from_checkpoint, torch_load, torch_save

logger = logging.getLogger(__name__)

Rule = Tuple[str, str]

# The Q-Net encoder (shared by Q-Net, GMRD, PAMI and DIFD): a torchvision ResNet-101 in a ModuleDict named
# ``backbone`` (same child names as ours), reduce1 / reduce2 (1x1 convs of layer3 / layer4) and reduce1d
# (the threshold head on fc's 1000 outputs).
_QNET_ENCODER: Tuple[Rule, ...] = (
    ("encoder.backbone.", "encoder.backbone."),
    ("encoder.reduce1.", "encoder.reduce2."),
    ("encoder.reduce2.", "encoder.reduce3."),
    ("encoder.reduce1d.", "encoder.tau_head."),
)

# The SSL-ALPNet / ADNet encoder: torchvision DeepLabV3-ResNet-101's backbone (an IntermediateLayerGetter,
# same child names as ours) and ``localconv`` (1x1 conv 2048 -> 256).
_DEEPLAB_ENCODER: Tuple[Rule, ...] = (
    ("encoder.backbone.", "encoder.backbone."),
    ("encoder.localconv.", "encoder.reduce."),
)
_DEEPLAB_DROPPED: Tuple[Rule, ...] = (
    ("encoder.aspp_out.", "ASPP head of DeepLabV3 (use_aspp=False in the released model: never used; not built here)"),
    ("encoder.asppconv.", "1x1 conv after the ASPP head, never used by the released forward (not built here)"),
)


def _matches(key: str, prefix: str) -> bool:
    """``key`` lies under ``prefix`` ("encoder.reduce1." or, for a bare parameter such as ADNet's "t.", is it)."""
    return key.startswith(prefix) or key == prefix.rstrip(".")


@dataclass(frozen=True)
class ReferenceLayout:
    """How one reference model's state dict maps onto one of our methods (see the module docstring)."""

    method: str
    source: str
    rules: Callable[[bool], Tuple[Rule, ...]]
    dropped: Tuple[Rule, ...] = ()
    notes: Optional[Callable[[Sequence[str], bool], List[str]]] = None

    def target_name(self, key: str, faithful: bool = False) -> Optional[str]:
        """Our name for a reference key (None when no rule matches)."""
        matches = [(ref, ours) for ref, ours in self.rules(faithful) if _matches(key, ref)]
        if not matches:
            return None
        ref, ours = max(matches, key=lambda r: len(r[0]))
        if key == ref.rstrip("."):
            return ours.rstrip(".")
        return ours + key[len(ref) :]

    def drop_reason(self, key: str) -> Optional[str]:
        return next((why for prefix, why in self.dropped if key.startswith(prefix)), None)

    def recognises(self, key: str) -> bool:
        return self.target_name(key) is not None or self.drop_reason(key) is not None

    def unused_rules(self, keys: Sequence[str], faithful: bool = False) -> List[str]:
        """Reference prefixes of this layout that no key of the checkpoint has (a sign of another model).
        Rules sharing a target are alternatives (reference versions): one of them used is enough."""
        used: Dict[str, List[str]] = {}
        for ref, ours in self.rules(faithful):
            present = any(_matches(k, ref) for k in keys)
            used.setdefault(ours, [])
            if present:
                used[ours].append(ref)
        missing = {ours: [ref for ref, o in self.rules(faithful) if o == ours] for ours in used if not used[ours]}
        return [" or ".join(refs) for refs in missing.values()]


def _fixed(*rules: Rule) -> Callable[[bool], Tuple[Rule, ...]]:
    return lambda faithful: tuple(rules)


def _gmrd_rules(faithful: bool) -> Tuple[Rule, ...]:
    # Descriptor MLP: Linear -> Dropout (-> ReLU) -> Linear. The released HEAD has no ReLU (second Linear at
    # index 2); commit 45ba5c2 (the paper) has it (index 3). Ours: index 3 by default, 2 with faithful=True.
    last = "2" if faithful else "3"
    rules: List[Rule] = list(_QNET_ENCODER)
    for ref, ours in (("mlp1", "fg_mlp"), ("mlp2", "bg_mlp")):
        rules += [(f"{ref}.reduce.0.", f"{ours}.0.")]
        rules += [(f"{ref}.reduce.{i}.", f"{ours}.{last}.") for i in (2, 3)]
    for ref, ours in (("decoder1", "fg_decoder"), ("decoder2", "bg_decoder")):
        rules += [(f"{ref}.res1.", f"{ours}.reduce."), (f"{ref}.res2.", f"{ours}.residual.")]
        rules += [(f"{ref}.down.", f"{ours}.head.")]
    return tuple(rules)


def _gmrd_notes(keys: Sequence[str], faithful: bool) -> List[str]:
    released_head = any(k.startswith("mlp1.reduce.2.") for k in keys)
    if released_head and not faithful:
        return [
            "the descriptor MLP of this checkpoint has no ReLU (released HEAD): run the bundle with "
            "faithful=true and convert with --faithful so the weights meet the layers they were trained with"
        ]
    if not released_head and faithful:
        return ["the descriptor MLP of this checkpoint has a ReLU (paper, commit 45ba5c2): use faithful=false"]
    return []


def _pami_rules(faithful: bool) -> Tuple[Rule, ...]:
    return _QNET_ENCODER + (
        ("MHA.w_qs.", "debias.attention.q."),
        ("MHA.w_ks.", "debias.attention.k."),
        ("MHA.w_vs.", "debias.attention.v."),
        ("MHA.fc.", "debias.attention.out."),
        ("MHA.layer_norm.", "debias.attention.norm."),
        ("MLP.", "debias.mlp."),
        ("layer_norm.", "debias.norm."),
        ("query_token.", "debias.query_injection."),
        ("spatial_scale.", "debias.spatial_weight."),
        ("SELayer.fc.", "debias.channel_se.fc."),
        ("fusion_1.", "debias.fuse_regions."),
        ("fusion_2.", "debias.fuse_channels."),
        ("supp_scale.", "debias.merge."),
    )


def _difd_rules(faithful: bool) -> Tuple[Rule, ...]:
    return _QNET_ENCODER + (
        ("fuse.", "fuse."),
        ("decoder1.", "fg_decoder."),
        ("decoder2.", "bg_decoder."),
    )


def _lslpn_notes(keys: Sequence[str], faithful: bool) -> List[str]:
    if faithful:
        return []
    return [
        "the released ResNet-50 is Caffe-style (layer2's stride on its 1x1 conv, ceil-mode max pool) and these "
        "weights were converted onto the torchvision layout: to reproduce the released outputs convert with "
        "--faithful and run the bundle with faithful=true (the file records its layout; loading it into the "
        "other one is refused)"
    ]


LAYOUTS: Dict[str, ReferenceLayout] = {
    "ssl_alpnet": ReferenceLayout(
        "ssl_alpnet",
        "cheng-01037/Self-supervised-Fewshot-Medical-Image-Segmentation models/grid_proto_fewshot.py (FewShotSeg)",
        _fixed(*_DEEPLAB_ENCODER),
        _DEEPLAB_DROPPED,
    ),
    "adnet": ReferenceLayout(
        "adnet",
        "sha168/ADNet models/fewshot_anom.py (FewShotSeg; saved from nn.DataParallel)",
        _fixed(*_DEEPLAB_ENCODER, ("t.", "threshold.")),
        _DEEPLAB_DROPPED,
    ),
    "lslpn": ReferenceLayout(
        "lslpn",
        "CSCYQJ/LOCATION-SENSITIVE-LOCAL-PROTOTYPE-NETWORK code/models/fewshot_grid.py (FewShotSeg)",
        # the reference ResNet keeps torchvision's child names at the top of ``encoder`` and calls its
        # fusion head (3x3 conv on concat(layer2, layer3)) ``layer4``
        _fixed(("encoder.layer4.", "encoder.head."), ("encoder.", "encoder.backbone.")),
        notes=_lslpn_notes,
    ),
    "qnet": ReferenceLayout("qnet", "shenqq377/Q-Net models/fewshot.py (FewShotSeg)", _fixed(*_QNET_ENCODER)),
    "gmrd": ReferenceLayout(
        "gmrd", "zmcheng9/GMRD models/fewshot_GMRD.py (FewShotSeg)", _gmrd_rules, notes=_gmrd_notes
    ),
    "pami": ReferenceLayout(
        "pami",
        "YazhouZhu19/Partition-A-Medical-Image models/fewshot.py (FewShotSeg)",
        _pami_rules,
        (
            ("kc_computation.", "threshold-k_c layer whose only use is commented out in the released forward"),
            ("postprocess_layer.", "built but never called by the released forward"),
            ("pred_conv.", "built but never called by the released forward"),
        ),
    ),
    "difd": ReferenceLayout(
        "difd",
        "zmcheng9/DIFD models/fewshot_DIFD.py (FewShotSeg)",
        _difd_rules,
        (("criterion.weight", "NLL class weights [0.1, 1] (a constant, ours is the non-persistent class_weights)"),),
    ),
}


@dataclass
class ImportReport:
    """What a conversion did: ``mapped`` (reference key -> ours), ``dropped`` (reference key -> reason),
    ``unknown`` reference keys (ignored), ``initialised`` project tensors the checkpoint did not fill
    (left at their initial values) and free-text ``notes``."""

    source: str
    method: str
    mapped: Dict[str, str] = field(default_factory=dict)
    dropped: Dict[str, str] = field(default_factory=dict)
    unknown: List[str] = field(default_factory=list)
    initialised: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    layout: Dict[str, Any] = field(default_factory=dict)

    def lines(self) -> List[str]:
        out = [f"{self.source} -> {self.method}: {len(self.mapped)} tensors mapped"]
        if self.layout:
            from fsmis_monai.networks.layout import describe

            out.append(f"layout recorded in the file: {describe(self.layout)}")
        reasons: Dict[str, List[str]] = {}
        for key, why in self.dropped.items():
            reasons.setdefault(why, []).append(key)
        for why, keys in reasons.items():
            out.append(f"dropped {len(keys)} tensors ({keys[0]}{', ...' if len(keys) > 1 else ''}): {why}")
        if self.unknown:
            out.append(f"ignored {len(self.unknown)} unknown tensors: {self.unknown[:5]}")
        if self.initialised:
            out.append(
                f"{len(self.initialised)} project tensors not in the checkpoint (initial values kept): "
                f"{self.initialised[:5]}"
            )
        out += [f"note: {n}" for n in self.notes]
        return out


def reference_state_dict(path: "str | os.PathLike[str]") -> Dict[str, torch.Tensor]:
    """The tensors of a released checkpoint (weights_only), unwrapped from ``model``/``state_dict``/``network``
    and from DataParallel's ``module.`` prefix."""
    state = state_dict_from_checkpoint(torch_load(path), keys=("model", "state_dict", "network"))
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if not tensors:
        raise FsmisInputError(f"{path}: holds no tensors (keys: {list(state)[:5]}); expected a model state dict")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def identify(keys: Sequence[str]) -> List[str]:
    """Methods whose reference layout recognises every key and uses every rule (usually exactly one)."""
    return [m for m, lay in LAYOUTS.items() if all(lay.recognises(k) for k in keys) and not lay.unused_rules(keys)]


def target_network(method: str, faithful: bool = False, **method_kwargs: Any) -> torch.nn.Module:
    """``build_method(method, faithful=..., **method_kwargs)`` on the meta device (no memory, no compute)."""
    from fsmis_monai.networks.methods import build_method

    with torch.device("meta"):
        return build_method(method, faithful=faithful, **method_kwargs)


def target_shapes(method: str, faithful: bool = False, **method_kwargs: Any) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of :func:`target_network`'s state dict."""
    net = target_network(method, faithful, **method_kwargs)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def convert_state_dict(
    state: Mapping[str, torch.Tensor],
    method: str,
    faithful: bool = False,
    strict: bool = False,
    source: str = "<state dict>",
    **method_kwargs: Any,
) -> Tuple[Dict[str, torch.Tensor], ImportReport]:
    """Rename a reference state dict to ``method``'s names; see :func:`convert_checkpoint`."""
    if method not in LAYOUTS:
        raise FsmisInputError(f"no reference checkpoint layout for method {method!r}; known: {sorted(LAYOUTS)}")
    layout, keys = LAYOUTS[method], list(state)
    report = ImportReport(source=source, method=method)
    missing_rules = layout.unused_rules(keys, faithful)
    others = [m for m in identify(keys) if m != method]
    if others or missing_rules:
        looks = f"it looks like a checkpoint of {' or '.join(others)}" if others else "it matches no known model"
        raise FsmisInputError(
            f"{source}: not a {method} checkpoint of {layout.source}: {looks}"
            + (f" (no tensors named {missing_rules[:4]})" if missing_rules else "")
            + (f"; convert it with --method {others[0]}" if others else "")
        )
    network = target_network(method, faithful, **method_kwargs)
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    converted: Dict[str, torch.Tensor] = {}
    mismatched = []
    for key, value in state.items():
        target = layout.target_name(key, faithful)
        if target is None:
            why = layout.drop_reason(key)
            if why is not None:
                report.dropped[key] = why
            else:
                report.unknown.append(key)
            continue
        if target not in shapes:
            report.unknown.append(key)
        elif tuple(value.shape) != shapes[target]:
            mismatched.append(f"{key} {tuple(value.shape)} -> {target} {shapes[target]}")
        elif target in converted:
            raise FsmisInputError(f"{source}: two tensors map onto {target} (the second is {key})")
        else:
            converted[target] = value
            report.mapped[key] = target
    if mismatched:
        raise FsmisInputError(
            f"{source}: {len(mismatched)} tensors do not fit the {method} layout"
            f"{' (faithful=True)' if faithful else ''}: {mismatched[:3]}"
        )
    report.initialised = [k for k in shapes if k not in converted]
    if layout.notes is not None:
        report.notes = layout.notes(keys, faithful)
    if strict and (report.unknown or report.initialised):
        raise FsmisInputError(
            f"{source}: --strict: {len(report.unknown)} unknown checkpoint tensors {report.unknown[:3]}, "
            f"{len(report.initialised)} {method} tensors not filled {report.initialised[:3]}"
        )
    if report.initialised:
        # keep the file loadable with strict=True: the missing tensors take the method's own initial values
        from fsmis_monai.networks.methods import build_method

        fresh = build_method(method, faithful=faithful, **method_kwargs).state_dict()
        converted.update({k: fresh[k] for k in report.initialised})
    # the target's layout record (method, encoder layout, shape switches) travels in the state dict's metadata
    from fsmis_monai.networks.layout import network_layout, with_layout

    report.layout = network_layout(network)
    return with_layout({k: converted[k] for k in shapes}, network), report


def convert_checkpoint(
    path: "str | os.PathLike[str]",
    method: str,
    output: "str | os.PathLike[str] | None" = None,
    faithful: bool = False,
    strict: bool = False,
    **method_kwargs: Any,
) -> Tuple[Dict[str, torch.Tensor], ImportReport]:
    """Convert the released checkpoint at ``path`` into ``build_method(method, faithful=faithful)``'s state dict.

    Raises :class:`~fsmis_monai.io.FsmisInputError` naming the file for a checkpoint of another method, a
    shape that does not fit, or (``strict``) any unknown reference tensor or unfilled project tensor. Writes
    the result atomically to ``output`` when given. Returns ``(state_dict, report)``.
    """
    state = reference_state_dict(path)
    converted, report = convert_state_dict(state, method, faithful, strict, source=str(path), **method_kwargs)
    if output is not None:
        torch_save(converted, output)
    for line in report.lines():
        logger.info(line)
    return converted, report


__all__ = ["LAYOUTS", "ImportReport", "ReferenceLayout", "convert_checkpoint", "convert_state_dict", "identify"]

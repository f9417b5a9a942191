"""Which layout a checkpoint belongs to: recorded in every saved state dict, checked on every load.

A *layout record* says what a few-shot network's weights were shaped for::

    {"method": "lslpn", "encoder": "lslpn_resnet50", "encoder_layout": "caffe", "switches": {}}

``encoder_layout`` is the encoder's ``layout`` (strides, pooling: LSLPN's Caffe-style ResNet-50 and the
torchvision one have the same parameter names and shapes, so only the record tells their checkpoints apart)
and ``switches`` the method switches that change parameter names or shapes (:data:`SHAPE_SWITCHES`).

Where the record lives: in the state dict's own ``_metadata`` (PyTorch's per-module metadata, which already
holds each module's ``version``), as ``state_dict._metadata[prefix]["fsmis_layout"]``. ``torch.save`` keeps it,
``torch.load(weights_only=True)`` restores it, and ``load_state_dict`` hands it to the module's load hooks.
So :class:`~fsmis_monai.networks.methods.base.FewShotSegmenter` registers two hooks
(:func:`record_and_check_layout`): ``state_dict()`` writes the record, ``load_state_dict()`` checks it with
:func:`check_layout`, the one place the check is made. The loaders are covered without change: MONAI's
``CheckpointLoader`` in the bundles' ``inference.json`` and in training resume, and :func:`load_weights`
(evaluation, ``fsmis freeze``); ``model.pt`` stays a plain state dict that every loader reads. A sidecar
file would need each loader to know its path (MONAI's ``CheckpointLoader`` does not) and would be lost when
the file alone is copied. MONAI's ``copy_model_state`` (``monai.bundle.load``, ``ckpt_export``) copies the
tensors into a new dict without the metadata: those loads are not checked and warn.

A state dict without a record (an older file, one built in memory) loads with a warning. A record that
differs is a :class:`LayoutMismatchError` naming both layouts, raised before any tensor is copied. A
non-strict load (a deliberate partial transfer, e.g. a Q-Net checkpoint into GMRD) checks the encoder only.
To load across layouts on purpose, drop the record: ``model.load_state_dict(dict(torch.load(path)))``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from fsmis_monai.io import FsmisInputError, state_dict_from_checkpoint, torch_load

RECORD_KEY = "fsmis_layout"

# Method switches that change parameter names or shapes (beyond the encoder's layout), read off a built
# network. The other ``faithful`` switches change computations only; their checkpoints are interchangeable.
SHAPE_SWITCHES: Dict[str, Callable[[nn.Module], Dict[str, Any]]] = {
    # GM:models/fewshot_GMRD.py: the released descriptor MLP has no ReLU (its second Linear moves from index 3 to 2)
    "gmrd": lambda net: {"descriptor_mlp_relu": any(isinstance(m, nn.ReLU) for m in net.fg_mlp)},
    # DF:models/Decoders.py: the released decoder takes 2C + 1 input channels, the intended one 2C + 3
    "difd": lambda net: {"decoder_inputs": net.decoder_inputs},
}

_SOURCE: "contextvars.ContextVar[Optional[str]]" = contextvars.ContextVar("fsmis_layout_source", default=None)


class LayoutMismatchError(FsmisInputError):
    """A checkpoint recorded for one layout is loaded into a network of another."""


def network_layout(network: nn.Module) -> Dict[str, Any]:
    """The layout record of a few-shot network (see the module docstring); plain values only, so the record
    loads with ``weights_only=True``."""
    from fsmis_monai.networks.encoders import encoder_name

    method = str(getattr(network, "name", type(network).__name__))
    encoder = getattr(network, "encoder", None)
    switches = SHAPE_SWITCHES.get(method)
    return {
        "method": method,
        "encoder": encoder_name(encoder) if isinstance(encoder, nn.Module) else None,
        "encoder_layout": str(getattr(encoder, "layout", "default")) if isinstance(encoder, nn.Module) else None,
        "switches": dict(switches(network)) if switches is not None else {},
    }


def describe(record: Mapping[str, Any]) -> str:
    """One line for a record: ``lslpn, encoder lslpn_resnet50 (caffe layout)[, switch=value...]``."""
    text = f"{record.get('method')}, encoder {record.get('encoder')} ({record.get('encoder_layout')} layout)"
    return text + "".join(f", {k}={v}" for k, v in sorted(dict(record.get("switches") or {}).items()))


def check_layout(network: nn.Module, found: Optional[Mapping[str, Any]], strict: bool = True,
                 source: Optional[str] = None) -> None:
    """Check a checkpoint's layout record ``found`` against ``network``'s; the one check every load makes.

    Raises :class:`LayoutMismatchError` naming both layouts (and ``source``, the file, when known) when they
    differ: the method, the encoder, its layout or a shape switch (``strict=False``: the encoder and its layout
    only). ``found=None`` (no record) warns and returns.
    """
    source = source or _SOURCE.get() or "state dict"
    expected = network_layout(network)
    if found is None:
        warnings.warn(
            f"{source}: no layout record (a plain state dict, or a copy without PyTorch's metadata such as "
            f"monai.networks.copy_model_state makes); loading into {describe(expected)} without checking that "
            "the checkpoint was made for this layout",
            UserWarning,
            stacklevel=2,
        )
        return
    fields = ("method", "encoder", "encoder_layout", "switches") if strict else ("encoder", "encoder_layout")
    differ = [f for f in fields if found.get(f) != expected.get(f)]
    if differ:
        raise LayoutMismatchError(
            f"{source}: does not fit the {expected['method']} network: the checkpoint was made for "
            f"{describe(found)}, the network is {describe(expected)} "
            f"(they differ in {', '.join(differ)}); build the network in the checkpoint's layout: {_fix(found, differ)}"
        )


def _fix(found: Mapping[str, Any], differ: Sequence[str]) -> str:
    """What a bundle user changes to build the checkpoint's layout, for the fields that differ."""
    fixes = []
    if "method" in differ:
        fixes.append(f"use the {found.get('method')} bundle")
    if "encoder" in differ:
        fixes.append(f"set encoder to {found.get('encoder')!r} (bundle: --encoder {found.get('encoder')}; "
                     f"fsmis freeze: --set encoder='\"{found.get('encoder')}\"')")
    if ("encoder_layout" in differ and "encoder" not in differ) or "switches" in differ:  # same encoder, other layout
        fixes.append("use the faithful setting it was trained or imported with (e.g. faithful=true for weights "
                     "converted with fsmis import-checkpoint --faithful)")
    return "; ".join(fixes)


def _record_hook(module: nn.Module, state_dict: Any, prefix: str, local_metadata: Dict[str, Any]) -> None:
    local_metadata[RECORD_KEY] = network_layout(module)


def _check_hook(module: nn.Module, state_dict: Any, prefix: str, local_metadata: Dict[str, Any], strict: bool,
                *_: Any) -> None:
    check_layout(module, local_metadata.get(RECORD_KEY), strict)


def record_and_check_layout(network: nn.Module) -> nn.Module:
    """Make ``network.state_dict()`` record its layout and ``network.load_state_dict()`` check it (PyTorch's
    state-dict hooks; the record sits in the module's own ``_metadata`` entry, so wrappers such as
    ``DataParallel`` or a frozen segmenter keep it under their prefix)."""
    network.register_state_dict_post_hook(_record_hook)
    network.register_load_state_dict_pre_hook(_check_hook)
    return network


def with_layout(state: Mapping[str, torch.Tensor], network: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """``state`` carrying ``network``'s metadata, layout record included (for state dicts assembled by hand,
    e.g. converted reference checkpoints; ``network`` may live on the ``meta`` device)."""
    out = OrderedDict(state)
    out._metadata = network.state_dict()._metadata  # type: ignore[attr-defined]
    return out


def _strip_prefix(state: Mapping[str, Any], prefix: str = "module.") -> Mapping[str, Any]:
    """``state`` without DataParallel's ``module.`` key prefix, its metadata renamed alike."""
    if not any(k.startswith(prefix) for k in state):
        return state
    out = OrderedDict((k[len(prefix):] if k.startswith(prefix) else k, v) for k, v in state.items())
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        inner = prefix[:-1]
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if k == inner else k[len(prefix):], v) for k, v in meta.items() if k == inner or k.startswith(prefix)
        )
    return out


def read_layout(path: "str | os.PathLike[str]") -> Optional[Dict[str, Any]]:
    """The layout record of a checkpoint file (the outermost one), or None when it has none."""
    meta = getattr(_strip_prefix(state_dict_from_checkpoint(torch_load(path))), "_metadata", None) or {}
    records = [(k, v[RECORD_KEY]) for k, v in meta.items() if isinstance(v, Mapping) and RECORD_KEY in v]
    return dict(min(records, key=lambda r: r[0].count(".") + bool(r[0]))[1]) if records else None


def recorded_encoder(ckpt_path: "str | os.PathLike[str] | None", configured: str) -> str:
    """The encoder a checkpoint was trained with (its layout record), else ``configured``.

    Bundles' ``inference.json`` and ``evaluate.json`` build their network with it, so a shipped or shared
    ``model.pt`` trained with another encoder than the paper's (e.g. the CPU-trained ``small_dilated``
    weights) loads without an ``--encoder`` flag. A missing file or a file without a record gives
    ``configured`` (the load then reports what does not fit).
    """
    if ckpt_path is None or not os.path.isfile(os.fspath(ckpt_path)):
        return configured
    record = read_layout(ckpt_path)
    return str(record["encoder"]) if record and record.get("encoder") else configured


@contextlib.contextmanager
def _loading_from(source: str) -> Iterator[None]:
    token = _SOURCE.set(source)
    try:
        yield
    finally:
        _SOURCE.reset(token)


def load_weights(network: nn.Module, path: "str | os.PathLike[str]", strict: bool = True,
                 map_location: Any = "cpu") -> nn.Module:
    """Load the checkpoint at ``path`` into ``network`` (a state dict, or one wrapped under
    ``model``/``network``/``state_dict``, DataParallel ``module.`` keys allowed), checking its layout record.

    Raises :class:`LayoutMismatchError` (another layout) or :class:`~fsmis_monai.io.FsmisInputError` (names or
    shapes that do not fit), both naming the file. Returns ``network``.
    """
    state = _strip_prefix(state_dict_from_checkpoint(torch_load(path, map_location=map_location)))
    with _loading_from(str(path)):
        try:
            network.load_state_dict(state, strict=strict)
        except RuntimeError as e:
            name = getattr(network, "name", type(network).__name__)
            raise FsmisInputError(f"{path}: does not fit the {name} network: {e}") from e
    return network


def load_bundle_network(bundle_dir: "str | os.PathLike[str]", model_file: str = "models/model.pt",
                        config_file: str = "configs/inference.json", map_location: Any = "cpu") -> nn.Module:
    """The network of a training bundle folder with its ``models/model.pt``, built in the checkpoint's layout.

    ``monai.bundle.load`` builds the network the bundle's config names (the paper encoder) and copies the
    weights with ``copy_model_state``, which drops the layout record and skips every tensor whose shape
    differs: a ``model.pt`` trained with ``--encoder small`` then loads 1 of 626 tensors into an untrained
    network, with only a log line to say so. Here the encoder comes from the checkpoint's layout record
    (:func:`read_layout`; the config's when the file has none) and the weights load with :func:`load_weights`:
    every key, checked against the record.

    Raises :class:`LayoutMismatchError` when the record differs in more than the encoder (e.g. the ``faithful``
    layout; the message names the setting to change) and :class:`~fsmis_monai.io.FsmisInputError` when the
    file is missing or its tensors do not fit, both naming the file.
    """
    from monai.bundle import ConfigParser

    root = os.fspath(bundle_dir)
    path = os.path.join(root, model_file)
    if not os.path.isfile(path):
        raise FsmisInputError(f"{path}: no such checkpoint (a training bundle ships its weights as {model_file})")
    parser = ConfigParser()
    parser.read_config(os.path.join(root, config_file))
    parser["bundle_root"] = root
    record = read_layout(path)
    if record and record.get("encoder"):
        parser["network_def#encoder"] = record["encoder"]
    return load_weights(parser.get_parsed_content("network_def"), path, strict=True, map_location=map_location)


__all__ = [
    "RECORD_KEY", "SHAPE_SWITCHES", "LayoutMismatchError", "check_layout", "describe", "load_bundle_network",
    "load_weights", "network_layout", "read_layout", "record_and_check_layout", "recorded_encoder",
    "with_layout",
]

"""One module per few-shot method; :func:`build_method` creates one by registry name."""

from __future__ import annotations

import importlib
from typing import Any

from fsmis_monai.networks.methods.base import FewShotOutput, FewShotSegmenter, SupportState

# registry name -> "module:ClassName" (imported lazily so a method's dependencies load only when used)
METHODS: dict[str, str] = {
    "prototype": "fsmis_monai.networks.methods.prototype:PrototypeSegmenter",
    "ssl_alpnet": "fsmis_monai.networks.methods.alpnet:ALPNet",
    "adnet": "fsmis_monai.networks.methods.adnet:ADNet",
    "qnet": "fsmis_monai.networks.methods.qnet:QNet",
    "lslpn": "fsmis_monai.networks.methods.lslpn:LSLPN",
    "gmrd": "fsmis_monai.networks.methods.gmrd:GMRD",
    "pami": "fsmis_monai.networks.methods.pami:PAMI",
    "difd": "fsmis_monai.networks.methods.difd:DIFD",
}


#: parameter-free baselines (no encoder, nothing to train), built by name like a method; kept apart from
#: :data:`METHODS` (the networks) so everything that trains, imports or encodes iterates networks only
BASELINES: dict[str, str] = {
    "support_copy": "fsmis_monai.networks.methods.copy_baseline:SupportMaskCopy",
}


def method_class(name: str) -> type:
    registry = {**METHODS, **BASELINES}
    if name not in registry:
        raise KeyError(f"unknown method {name!r}; known: {sorted(registry)}")
    module, cls = registry[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(name: str, **kwargs: Any) -> FewShotSegmenter:
    """Instantiate the method registered as ``name`` (e.g. ``build_method("qnet", encoder="small")``)."""
    return method_class(name)(**kwargs)


__all__ = ["BASELINES", "FewShotOutput", "FewShotSegmenter", "SupportState", "METHODS", "build_method", "method_class"]

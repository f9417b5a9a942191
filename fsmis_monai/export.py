"""A "frozen organ segmenter": one few-shot method with one encoded support set, as a plain MONAI network.

:class:`FrozenFewShotSegmenter` holds a method (see ``networks/methods/base.py``) and the output of its
``encode_support`` as registered buffers, so ``image [N, C, H, W] -> pred logits [N, 2, H, W]`` needs no
support input. Its ``state_dict`` is the method's weights plus the encoded support, and the structure of the
support state (which entries are tensors, their shapes and dtypes, and the plain-Python constants such as
``image_size``) is a JSON-serialisable ``support_spec`` that a bundle config passes to the constructor, so
``monai.bundle`` can rebuild the module and load ``models/model.pt`` into it like any network.

Export (TorchScript via ``ckpt_export``, ONNX via ``onnx_export``) is by ``torch.jit.trace``
(``--use_trace True``): the methods' ``segment`` take a dict of mixed tensors and constants, which
``torch.jit.script`` cannot type. Tracing records the operations for the traced input size: the in-plane
size is fixed anyway (the support's size), and the batch size is free for the vectorised methods; PAMI
refines its prototypes query by query (a Python loop over the batch), so its traced graph is fixed to the
traced batch size (export it with ``--input_shape "[1, 3, H, W]"`` and feed one slice at a time; another
batch size fails with an error, it is never silently wrong). The eager frozen module has no such limit.

Q-Net refines its prototypes at test time with Adam steps (autograd inside ``segment``), which neither a
trace nor ONNX can record. Such a method (``test_time_grad`` true) runs eagerly with its refinement, but
tracing it raises an error that names the switch: freeze it with ``refine=False`` (``fsmis freeze
--no-refinement``, i.e. ``refine_steps=0``) to export the unrefined Q-Net.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn

from fsmis_monai.networks.methods.base import FewShotSegmenter, SupportState

_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                                     torch.int64, torch.int32, torch.uint8, torch.bool)}


def _leaf_name(path: tuple[str, ...]) -> str:
    return "support_" + "_".join(re.sub(r"\W", "_", p) for p in path)


def _is_tensor_or_container(value: Any) -> bool:
    return torch.is_tensor(value) or isinstance(value, (Mapping, list, tuple))


def support_spec(state: Any, path: tuple[str, ...] = ()) -> dict:
    """The JSON-serialisable structure of a support state: tensors become ``{"tensor": buffer name, "shape",
    "dtype"}``, dicts ``{"dict": {...}}``, lists and tuples holding tensors ``{"list"|"tuple": [...]}``, and
    everything else (sizes, flags, numbers) ``{"value": v}`` (tuples of plain values come back as tuples)."""
    if torch.is_tensor(state):
        return {"tensor": _leaf_name(path), "shape": list(state.shape), "dtype": str(state.dtype).replace("torch.", "")}
    if isinstance(state, Mapping):
        return {"dict": {str(k): support_spec(v, path + (str(k),)) for k, v in state.items()}}
    if isinstance(state, (list, tuple)) and any(_is_tensor_or_container(v) for v in state):
        kind = "tuple" if isinstance(state, tuple) else "list"
        return {kind: [support_spec(v, path + (str(i),)) for i, v in enumerate(state)]}
    if isinstance(state, tuple):
        return {"tuple_value": list(state)}
    if state is None or isinstance(state, (bool, int, float, str)):
        return {"value": state}
    raise TypeError(f"support state entry {'/'.join(path)} of type {type(state).__name__} cannot be frozen")


def _tensor_leaves(spec: Mapping) -> list[Mapping]:
    if "tensor" in spec:
        return [spec]
    children = spec.get("dict", {}).values() if "dict" in spec else spec.get("list", spec.get("tuple", []))
    return [leaf for child in children for leaf in _tensor_leaves(child)]


def _leaf_values(state: Any, spec: Mapping) -> list[torch.Tensor]:
    if "tensor" in spec:
        return [state]
    if "dict" in spec:
        return [t for k, s in spec["dict"].items() for t in _leaf_values(state[k], s)]
    if "list" in spec or "tuple" in spec:
        return [t for v, s in zip(state, spec.get("list", spec.get("tuple"))) for t in _leaf_values(v, s)]
    return []


class FrozenFewShotSegmenter(nn.Module):
    """``image [N, C, H, W] -> pred logits [N, 2, H, W]`` of ``method`` against a support set frozen in buffers.

    Args:
        method: the few-shot method (its weights are this module's ``method.*`` parameters).
        support_spec: structure of the encoded support (:func:`support_spec`); the buffers start as zeros
            and are filled by ``load_state_dict`` (or use :meth:`from_support`).
        refine: keep a test-time refinement that uses autograd (Q-Net). ``False`` sets the method's
            ``refine_steps`` to 0 so the module can be traced and exported; ``True`` runs eagerly only.
    """

    def __init__(self, method: FewShotSegmenter, support_spec: Mapping, refine: bool = True) -> None:
        super().__init__()
        if not refine and method.test_time_grad:
            if not hasattr(method, "refine_steps"):
                raise ValueError(f"{type(method).__name__} optimises at test time and has no refine_steps to turn off")
            method.refine_steps = 0
        self.method = method
        self.support_spec = dict(support_spec)
        for leaf in _tensor_leaves(self.support_spec):
            self.register_buffer(leaf["tensor"], torch.zeros(leaf["shape"], dtype=_DTYPES[leaf["dtype"]]))

    @classmethod
    def from_support(cls, method: FewShotSegmenter, support_images: torch.Tensor, support_masks: torch.Tensor,
                     refine: bool = True) -> "FrozenFewShotSegmenter":
        """Encode ``support_images`` [K, C, H, W] / ``support_masks`` [K, H, W] once with ``method`` (eval mode)."""
        from fsmis_monai.evaluation.inferer import FewShotSliceInferer

        method.eval()
        state = FewShotSliceInferer(device="cpu").encode(method, support_images, support_masks)
        spec = support_spec(state)
        frozen = cls(method, spec, refine=refine)
        with torch.no_grad():
            for leaf, value in zip(_tensor_leaves(spec), _leaf_values(state, spec)):
                getattr(frozen, leaf["tensor"]).copy_(value)
        return frozen.eval()

    @property
    def exportable(self) -> bool:
        """Whether ``torch.jit.trace`` / ONNX can record the whole forward (no autograd at test time)."""
        return not self.method.test_time_grad

    def support_state(self) -> SupportState:
        """The method's support state rebuilt from the buffers and the constants of the spec."""
        return self._build(self.support_spec)

    def _build(self, spec: Mapping) -> Any:
        if "tensor" in spec:
            return getattr(self, spec["tensor"])
        if "dict" in spec:
            return {k: self._build(s) for k, s in spec["dict"].items()}
        if "list" in spec:
            return [self._build(s) for s in spec["list"]]
        if "tuple" in spec:
            return tuple(self._build(s) for s in spec["tuple"])
        if "tuple_value" in spec:
            return tuple(spec["tuple_value"])
        return spec["value"]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() and not self.exportable:
            raise RuntimeError(
                f"{type(self.method).__name__} refines its prototypes with autograd at test time, which "
                "torch.jit.trace / ONNX cannot record; freeze it with refine=False (fsmis freeze --no-refinement, "
                "refine_steps=0) to export it without the refinement"
            )
        if image.dim() != 4:
            raise ValueError(f"image must be [N, C, H, W], got shape {tuple(image.shape)}")
        return self.method.segment(image, self.support_state())


def trace(frozen: FrozenFewShotSegmenter, example: torch.Tensor) -> torch.jit.ScriptModule:
    """TorchScript of ``frozen`` by ``torch.jit.trace`` on ``example`` [N, C, H, W] (what ``ckpt_export
    --use_trace True`` does)."""
    frozen.eval()
    with torch.no_grad():
        return torch.jit.trace(frozen, example, check_trace=False)

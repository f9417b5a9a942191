"""File input/output shared by every stage: atomic writes, checked reads, safe checkpoint loading.

Every file the project writes goes through :func:`atomic_path`: the content is written to a temporary
file in the destination folder and renamed over the target only once it is complete, so a crash
mid-write leaves the previous file (or none), never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

PathLike = "str | os.PathLike[str]"

_MULTI_SUFFIXES = (".nii.gz", ".tar.gz")


class FsmisInputError(ValueError):
    """A user-supplied file or setting is unusable; the message names the file and the problem."""


def input_error_in(error: BaseException | None) -> FsmisInputError | None:
    """The :class:`FsmisInputError` behind ``error``: itself or one in its cause/context chain, else None.

    MONAI's ``Compose`` and ``ConfigParser`` wrap the errors of a transform or a config expression in
    ``RuntimeError``; the input error inside is the one to report.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, FsmisInputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def input_error_line(error: BaseException) -> str | None:
    """``"<file>: <problem>"`` when ``error`` is bad input, else None (a bug). Bad input: a
    :class:`FsmisInputError` anywhere in the chain (:func:`input_error_in`), or an ``OSError`` naming a file.
    The one rule of the ``fsmis`` commands and of bundles (:mod:`fsmis_monai.bundle_errors`)."""
    found = input_error_in(error)
    if found is not None:
        return str(found)
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return None


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (``mkstemp`` creates files readable by the owner only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in _MULTI_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The temporary keeps the target's suffix (``.nii.gz``, ``.pt``...) so writers that choose a format
    by extension behave the same. On error the temporary is removed and the target is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + _suffix(target), dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FsmisInputError(f"{p}: file not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FsmisInputError(f"{p}: not valid JSON ({e})") from e


# ----------------------------------------------------------------------------------------- NIfTI


def load_nifti(path: str | os.PathLike[str], dtype: Any = None):
    """Load a NIfTI file fully, returning ``(array, nibabel_image)``.

    Errors name the file: missing, zero bytes, not a NIfTI, truncated/corrupt data, NaN/Inf voxels
    are *not* rejected here (callers decide) but everything unreadable is.
    """
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise FsmisInputError(f"{p}: file not found")
    if p.stat().st_size == 0:
        raise FsmisInputError(f"{p}: file is empty (0 bytes)")
    try:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, OSError)
        raise FsmisInputError(f"{p}: cannot read as NIfTI ({type(e).__name__}: {e})") from e
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return data, img


def volume_shape(shape: Sequence[int], source: Any) -> tuple[int, int, int]:
    """``(X, Y, Z)`` of a scan stored with ``shape``: the one rule every command applies (training, evaluation,
    inference, ``fsmis freeze`` bundles, ``fsmis supervoxels`` / ``superpixels``).

    A scan is one 3D volume: ``(X, Y, Z)``, or ``(X, Y, Z, 1, ...)`` (one volume saved 4D, trailing axes of
    length 1). A 4D file of ``n > 1`` volumes (echoes, phases, channels) is refused rather than taken for the
    network's 3 input channels; a 2D image too.

    Raises:
        FsmisInputError: ``"<source>: holds 3 volumes (shape ...)"`` or ``"<source>: expected a 3D volume ..."``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) >= 3 and all(s == 1 for s in shape[3:]):
        return shape[0], shape[1], shape[2]
    if len(shape) == 4:
        raise FsmisInputError(f"{source}: holds {shape[3]} volumes (shape {shape}); one 3D volume per file is "
                              "taken: save the volume to use (e.g. one echo) as a NIfTI of its own")
    raise FsmisInputError(f"{source}: expected a 3D volume, got shape {shape}")


def save_nifti(
    path: str | os.PathLike[str],
    array: np.ndarray,
    affine: np.ndarray | None = None,
    header: Any = None,
    dtype: Any = None,
) -> Path:
    """Write ``array`` as NIfTI atomically with the given geometry (``affine``; header copied if given)."""
    import nibabel as nib

    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(arr, np.eye(4) if affine is None else affine, header=hdr)
    img.set_data_dtype(arr.dtype)
    if header is None or affine is not None:
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


# ------------------------------------------------------------------------------------- checkpoints


def torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def torch_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, never code.

    A checkpoint that needs arbitrary unpickling is refused with a message naming the file.
    """
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise FsmisInputError(f"{p}: checkpoint not found")
    if p.stat().st_size == 0:
        raise FsmisInputError(f"{p}: checkpoint is empty (0 bytes)")
    with open(p, "rb") as fh:
        head = fh.read(2)
    if not (head == b"PK" or head[:1] == b"\x80"):  # torch.save's zip, or a legacy (pre-1.6) pickle
        raise FsmisInputError(f"{p}: not a PyTorch checkpoint (neither torch.save's zip format nor a legacy one)")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise FsmisInputError(
            f"{p}: refused to load: the checkpoint contains objects other than tensors and plain "
            f"containers (weights_only=True). Only load checkpoints you trust. Detail: {e}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise FsmisInputError(f"{p}: cannot read checkpoint ({type(e).__name__}: {e})") from e


def state_dict_from_checkpoint(ckpt: Mapping[str, Any], keys: tuple[str, ...] = ("model", "network", "state_dict")) -> dict:
    """Return the model state dict from a checkpoint that is either a state dict or wraps one (a copy that
    keeps PyTorch's ``_metadata``, where the layout record of :mod:`fsmis_monai.networks.layout` lives)."""
    from collections import OrderedDict

    state = next((ckpt[k] for k in keys if isinstance(ckpt, Mapping) and isinstance(ckpt.get(k), Mapping)), ckpt)
    out = OrderedDict(state)
    if getattr(state, "_metadata", None) is not None:
        out._metadata = state._metadata  # type: ignore[attr-defined]
    return out

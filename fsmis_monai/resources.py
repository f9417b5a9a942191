"""Where the project's data folders are: the preprocessing recipes (``preprocessing/``) and the MONAI
bundles (``bundles/``).

In a clone (an editable install) they sit beside the package. A built wheel carries copies inside the
package, ``fsmis_monai/_shipped/<name>/`` (copied by the ``build_py`` step of ``setup.py``), so short
recipe names and ``fsmis quickstart`` work from any installation.
"""

from __future__ import annotations

from pathlib import Path

from fsmis_monai.io import FsmisInputError

__all__ = ["SHIPPED", "shipped_dir"]

SHIPPED = ("preprocessing", "bundles")  # setup.py copies the same folders into the wheel
_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """The folder ``name`` (one of :data:`SHIPPED`): the copy inside an installed package, else the clone's.

    Raises:
        ValueError: ``name`` is not a shipped folder.
        FsmisInputError: neither copy exists (a broken installation).
    """
    if name not in SHIPPED:
        raise ValueError(f"{name!r} is not a shipped folder; one of {SHIPPED}")
    candidates = (_PACKAGE / "_shipped" / name, _PACKAGE.parent / name)
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise FsmisInputError(f"{candidates[0]}: folder not found (nor {candidates[1]}); reinstall fsmis-monai")

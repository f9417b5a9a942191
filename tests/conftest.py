"""Shared fixtures: where the real scans are, and small helpers to read a few of them.

The suite is laid out as the package is (``tests/networks``, ``tests/losses``, ``tests/bundles``, ...; the
hardening suite is the cross-cutting ``tests/hardening``). Test folders are not packages: pytest's default
``prepend`` import mode puts each test file's folder on ``sys.path`` (so a folder's own helper modules, e.g.
``networks/method_checks.py``, import by name) and test file names are unique across folders. This folder is
put on ``sys.path`` below so the helpers shared by several folders (``_real_scans``, ``_training_run``) and
``conftest`` itself import by name from any depth."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
# The real scans live beside the repository (../shared/data), never inside it. FSMIS_DATA overrides.
DATA_ROOT = Path(os.environ.get("FSMIS_DATA", REPO_ROOT.parent / "shared" / "data"))
CHAOS_DIR = DATA_ROOT / "chaos_mr_t2"
CMR_DIR = DATA_ROOT / "cmr_bssfp"


def _require(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"real test data not found at {path}; set FSMIS_DATA to the folder holding chaos_mr_t2/ and cmr_bssfp/"
        )
    return path


@pytest.fixture(scope="session")
def chaos_dir() -> Path:
    return _require(CHAOS_DIR)


@pytest.fixture(scope="session")
def cmr_dir() -> Path:
    return _require(CMR_DIR)


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    """Two cores on CI: keep torch from oversubscribing them."""
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:  # pragma: no cover
        pass
    yield


@pytest.fixture()
def chaos_pair(tmp_path: Path, chaos_dir: Path) -> Path:
    """Support scan 15 and query scan 20 of the real CHAOS-T2 folder (image + label), copied into a fresh
    folder so that a test may damage them; the shared data is never written."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for sid in (15, 20):
        for kind in ("image", "label"):
            shutil.copy(chaos_dir / f"{kind}_{sid}.nii.gz", data / f"{kind}_{sid}.nii.gz")
    return data

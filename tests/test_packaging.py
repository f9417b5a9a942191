"""An installed (non-editable) package finds its recipes and bundles: setup.py copies the folders of
``fsmis_monai.resources.SHIPPED`` into ``fsmis_monai/_shipped/``; here that layout is rebuilt in a
temporary site folder, away from the clone, and resolved by a fresh interpreter."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

from conftest import REPO_ROOT
from fsmis_monai.resources import SHIPPED


def _setup_py_shipped() -> tuple[str, ...]:
    tree = ast.parse((REPO_ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SHIPPED" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("setup.py defines no SHIPPED")


def test_setup_py_ships_the_folders_the_package_reads():
    assert _setup_py_shipped() == SHIPPED == ("preprocessing", "bundles")
    manifest = (REPO_ROOT / "MANIFEST.in").read_text(encoding="utf-8")
    assert all(f"graft {name}" in manifest for name in SHIPPED)  # an sdist carries them to the wheel build


def _resolve(site, cwd) -> list[str]:
    code = ("from fsmis_monai.preprocess import resolve_recipe\n"
            "from fsmis_monai.commands.quickstart import BUNDLES_DIR\n"
            "print(resolve_recipe('chaos')); print(BUNDLES_DIR / 'adnet' / 'configs' / 'train.json')\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("FSMIS_RECIPES", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_installed_layout_resolves_short_recipe_names_and_bundles(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(REPO_ROOT / "fsmis_monai", site / "fsmis_monai",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "_shipped"))
    for name in SHIPPED:
        shutil.copytree(REPO_ROOT / name, site / "fsmis_monai" / "_shipped" / name)
    recipe, train = _resolve(site, tmp_path)
    assert recipe == str(site / "fsmis_monai" / "_shipped" / "preprocessing" / "chaos_mr_t2.yaml")
    assert train == str(site / "fsmis_monai" / "_shipped" / "bundles" / "adnet" / "configs" / "train.json")
    assert os.path.isfile(recipe) and os.path.isfile(train)

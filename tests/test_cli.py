"""The command line sits on the library: bad input is one line ``error: <file>: <problem>`` (exit 1) for
every command, and no library module imports the command layer."""

from __future__ import annotations

import ast

import nibabel as nib
import numpy as np

from conftest import REPO_ROOT
from fsmis_monai.cli import main

PACKAGE = REPO_ROOT / "fsmis_monai"
COMMAND_LAYER = ("fsmis_monai.cli", "fsmis_monai.commands")


def _imported_modules(path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_library_module_imports_the_command_layer():
    library = [p for p in PACKAGE.rglob("*.py")
               if p.name not in ("cli.py", "__main__.py") and "commands" not in p.relative_to(PACKAGE).parts]
    assert len(library) > 40  # the walk found the package
    upward = {str(p.relative_to(REPO_ROOT)): sorted(m for m in _imported_modules(p) if m.startswith(COMMAND_LAYER))
              for p in library}
    assert {k: v for k, v in upward.items() if v} == {}




def _evaluate(data, out) -> int:
    return main(["evaluate", "--dataset-dir", str(data), "--output-dir", str(out), "--query-ids", "20",
                 "--support-id", "15", "--protocols", "ep1", "--method-kwargs", '{"encoder": "small"}',
                 "--no-progress", "--device", "cpu"])


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_evaluate_truncated_nifti_is_one_line(chaos_pair, tmp_path, capsys):
    image = chaos_pair / "image_20.nii.gz"
    image.write_bytes(image.read_bytes()[:200_000])
    assert _evaluate(chaos_pair, tmp_path / "out") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {image}: ") and "NIfTI" in line


def test_evaluate_label_of_wrong_shape_is_one_line(chaos_pair, tmp_path, capsys):
    label = chaos_pair / "label_20.nii.gz"
    img = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-8], img.affine, img.header), str(label))
    assert _evaluate(chaos_pair, tmp_path / "out") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {label}: ") and "shape" in line


def test_missing_file_of_any_command_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["supervoxels", "--src", str(missing), "--dst", str(tmp_path / "out")]) == 1
    assert _one_error_line(capsys.readouterr().err).startswith(f"error: {missing}: ")

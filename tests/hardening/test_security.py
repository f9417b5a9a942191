"""Security: checkpoints are read with ``weights_only=True`` everywhere (a pickle payload is refused before
it runs), the package has no ``eval``/``exec``/``pickle`` of user data, and the README says that bundle
configs execute Python."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch

from fsmis_monai.io import FsmisInputError, torch_load

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: proof that code ran during loading."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def malicious_checkpoint(tmp_path):
    """A real ``torch.save`` checkpoint (zip format) whose state dict carries a code-running object."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "model.pt"
    torch.save({"network": {"weight": torch.zeros(2)}, "extra": _Payload(marker)}, path)
    # sanity: the payload really runs under a full unpickler
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_torch_load_refuses_a_pickle_payload(malicious_checkpoint):
    path, marker = malicious_checkpoint
    with pytest.raises(FsmisInputError, match="refused to load") as err:
        torch_load(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_every_checkpoint_reader_refuses_a_pickle_payload(malicious_checkpoint, tmp_path):
    """The evaluation runner, the encoder weight loader, checkpoint import, and MONAI's CheckpointLoader
    (bundle inference configs and training resume) all refuse the same file."""
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    from fsmis_monai.evaluation.runner import load_checkpoint
    from fsmis_monai.networks.checkpoint_import import reference_state_dict
    from fsmis_monai.networks.encoders import build_encoder

    path, marker = malicious_checkpoint
    net = torch.nn.Linear(2, 1)
    with pytest.raises(FsmisInputError, match="refused"):
        load_checkpoint(net, path)
    with pytest.raises(FsmisInputError, match="refused"):
        build_encoder("small", pretrained_weights=str(path))
    with pytest.raises(FsmisInputError, match="refused"):
        reference_state_dict(path)
    engine = Engine(lambda e, b: None)
    CheckpointLoader(str(path), {"network": net}).attach(engine)
    with pytest.raises(pickle.UnpicklingError):  # MONAI 1.6 reads with weights_only=True
        engine.run([0], max_epochs=1)
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            yield node, (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")), ast.unparse(f)


def _unsafe(source: str, name: str) -> list[str]:
    """``name:line what`` for each unsafe load or code execution in ``source``."""
    tree = ast.parse(source)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in {"pickle", "dill", "marshal", "shelve", "cloudpickle"} for n in names):
                # io.torch_load imports pickle only to catch UnpicklingError
                if not (name.endswith("fsmis_monai/io.py") and isinstance(node, ast.Import)):
                    problems.append(f"{name}:{node.lineno} imports {names}")
    for node, func, full in _calls(tree):
        kw = {k.arg: k.value for k in node.keywords}
        bad = None
        if func in {"eval", "exec", "compile"} and isinstance(node.func, ast.Name):
            bad = f"{full}()"
        elif full.endswith("torch.load") or full == "load" and "weights_only" in kw:
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad = "torch.load without weights_only=True"
        elif func == "load" and full.startswith("np") and isinstance(kw.get("allow_pickle"), ast.Constant) \
                and kw["allow_pickle"].value:
            bad = "np.load(allow_pickle=True)"
        elif full in {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "os.system"}:
            bad = f"{full}()"
        elif isinstance(kw.get("shell"), ast.Constant) and kw["shell"].value is True:
            bad = f"{full}(shell=True)"
        if bad:
            problems.append(f"{name}:{node.lineno} {bad}")
    return problems


def test_the_scan_finds_each_unsafe_pattern():
    bad = """import pickle
from dill import loads
torch.load(p)
torch.load(p, weights_only=False)
eval(text)
exec(code)
np.load(f, allow_pickle=True)
yaml.load(stream)
subprocess.run(cmd, shell=True)
torch.load(p, weights_only=True)
yaml.safe_load(stream)
"""
    found = _unsafe(bad, "x.py")
    assert [int(f.split(":")[1].split()[0]) for f in found] == list(range(1, 10)), found


def test_no_unsafe_loading_or_code_execution_in_the_package():
    """``torch.load`` only with ``weights_only=True`` (literal); no eval/exec/pickle/marshal/np.load(allow_pickle),
    no unsafe YAML loading, no shell commands."""
    problems = []
    for path in sorted([*(REPO / "fsmis_monai").rglob("*.py"), *(REPO / "bench").rglob("*.py")]):
        problems += _unsafe(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert not problems, "\n".join(problems)


def test_bundle_inference_configs_load_checkpoints_through_monai_checkpoint_loader():
    """Bundles read weights only with MONAI's CheckpointLoader (weights_only=True in MONAI 1.6), never
    with a ``$torch.load`` expression of their own."""
    for cfg in sorted((REPO / "bundles").glob("*/configs/*.json")):
        text = cfg.read_text(encoding="utf-8")
        assert "torch.load" not in text and "pickle" not in text, cfg
        if cfg.name == "inference.json":
            targets = [h.get("_target_") for h in json.loads(text).get("handlers", [])]
            assert "CheckpointLoader" in targets, cfg


def test_readme_says_bundle_configs_execute_python():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Security"):]
    assert "execute" in section and "weights_only" in section


def test_damaged_checkpoint_is_a_clear_error(malicious_checkpoint, tmp_path):
    """Truncated, zero-byte, missing and non-checkpoint files: errors naming the file, never a traceback."""
    good = tmp_path / "good.pt"
    torch.save({"weight": torch.ones(3)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    for path, problem in ((truncated, "cannot read checkpoint"), (empty, "empty"), (text, "not a PyTorch checkpoint"),
                          (tmp_path / "missing.pt", "not found")):
        with pytest.raises(FsmisInputError, match=problem) as err:
            torch_load(path)
        assert str(path) in str(err.value)
    assert torch.equal(torch_load(good)["weight"], torch.ones(3))

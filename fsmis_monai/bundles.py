"""Render the shipped bundles (``bundles/<method>/``) from one source (``bundles/_source/``).

Every fact about a bundle is written once: ``_source/common/`` holds what all methods share (the training
machinery, the evaluation override, the inference pipeline, the multi-GPU override, the metadata skeleton,
``logging.conf``, ``LICENSE`` and the shared sections of ``docs/README.md``), ``_source/methods/<method>/``
the method's own keys (``network.json``: ``method``, ``encoder``, ``seed``, hyper-parameters and their
``network_def`` arguments; ``train.json``: schedule, fold family, validation protocol, episode sampler;
``trained.json``: what the configs that load trained weights (evaluation, inference) add, e.g. GMRD built at
the size its data contract records;
``metadata.json``: name, task, authors, paper). A shipped config is the merge of its layers, in the order of
:data:`LAYERS`, by MONAI's own ``ConfigParser.load_config_files`` (the semantics of
``--config_file "['a.json','b.json']"``: later keys override, ``a#b`` ids reach into nested items, ``+key``
extends a list or dict). MONAI resolves config lists and ``%file#id`` macros against the working
directory, so a zipped bundle can only stay self-contained if its files are complete: they are rendered and
committed, and ``tests/bundles/test_render.py`` fails when a committed file differs from a fresh rendering.

Two rules are applied after the merge, both on ``train.json`` and ``inference.json`` (the configs that run
alone): a top-level key that no item references and that no workflow reads (:data:`ENTRY_KEYS`) is left
out, so a shared key appears only where it does something (``image_size`` reaches ``inference.json`` only
for GMRD, whose network needs it); ``imports`` comes first and ``initialize``/``run``/``finalize`` last.

Command: ``fsmis render-bundles`` (``--check`` reports stale files without writing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from monai.bundle import ConfigParser
from monai.bundle.properties import InferProperties, TrainProperties
from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.utils import ID_SEP_KEY

__all__ = ["CPU_OVERRIDES", "cpu_cli_args", "LAYERS", "ENTRY_KEYS", "methods", "render_config", "render_bundle", "render_all", "stale_files",
           "unreferenced_keys", "references"]

#: The CPU switch: the one override set with which the quickstart, the tests and ``bench/*.py`` run a bundle's
#: ``train.json`` on a CPU: the small encoder, random initialisation (so nothing is downloaded; the defaults
#: are the paper's encoder and torchvision weights). Command line: ``--encoder small --pretrained_weights '$None'``.
#: Null is written ``"$None"`` (a config expression) because ``monai.bundle.load``'s ``net_override`` drops ``None``.
CPU_OVERRIDES: dict = {"encoder": "small", "pretrained_weights": "$None"}


def cpu_cli_args() -> list[str]:
    """:data:`CPU_OVERRIDES` as ``python -m monai.bundle run`` arguments."""
    return [a for k, v in CPU_OVERRIDES.items() for a in (f"--{k}", str(v))]

SOURCE = "_source"
#: shipped config -> its layers under ``_source`` (``{method}`` is substituted; a missing method layer is skipped)
LAYERS: dict[str, tuple[str, ...]] = {
    "train.json": ("common/network.json", "common/train.json", "methods/{method}/network.json",
                   "methods/{method}/train.json"),
    "evaluate.json": ("common/evaluate.json", "methods/{method}/evaluate.json", "methods/{method}/trained.json"),
    "inference.json": ("common/network.json", "common/inference.json", "methods/{method}/network.json",
                       "methods/{method}/trained.json", "methods/{method}/inference.json"),
    "multi_gpu_train.json": ("common/multi_gpu_train.json", "methods/{method}/multi_gpu_train.json"),
    "metadata.json": ("common/metadata.json", "methods/{method}/metadata.json"),
}
#: configs that run alone, pruned of unreferenced keys; overrides of train.json, merged key by key
STANDALONE = ("train.json", "inference.json")
OVERRIDES = ("evaluate.json", "multi_gpu_train.json")
#: files copied unchanged from ``_source/common`` (bundle-relative path -> source path)
COPIED = {"configs/logging.conf": "common/logging.conf", "LICENSE": "common/LICENSE"}
#: the project's reference pages, shipped in every bundle so that a zipped bundle keeps the facts its README
#: cites (bundle-relative path -> path under the repository's ``docs/``, the folder beside ``bundles/``)
SHIPPED_DOCS = {"docs/reference.md": "reference.md", "docs/faithful.md": "faithful.md"}
README = "docs/README.md"
SHARED_SECTION = "<!-- shared:{name} -->"  # a README line naming a section of _source/common/README.md
LIFECYCLE = ("initialize", "run", "finalize")
#: top-level ids a workflow reads without any config item referring to them: the lifecycle and imports, and
#: the first level of the ids of MONAI's train/inference workflow properties (``monai.bundle.properties``)
ENTRY_KEYS = frozenset(("imports", "+imports", *LIFECYCLE)) | frozenset(
    ReferenceResolver.split_id(p["id"])[0] for props in (TrainProperties, InferProperties) for p in props.values())


def methods(bundles_dir: str | Path) -> list[str]:
    """The methods with a source folder under ``<bundles_dir>/_source/methods``."""
    return sorted(p.name for p in (Path(bundles_dir) / SOURCE / "methods").iterdir() if p.is_dir())


def references(config: Any) -> set[str]:
    """Ids referenced (``@id`` or ``@id#sub`` in a reference or ``$`` expression) anywhere in ``config``,
    by MONAI's own pattern (``ReferenceResolver.match_refs_pattern``)."""
    if isinstance(config, dict):
        return set().union(*map(references, config.values())) if config else set()
    if isinstance(config, list):
        return set().union(*map(references, config)) if config else set()
    if isinstance(config, str):
        return {ReferenceResolver.normalize_id(r) for r in ReferenceResolver.match_refs_pattern(config)}
    return set()


def unreferenced_keys(config: dict, allowed: Iterable[str] = ()) -> list[str]:
    """Top-level keys of ``config`` that no item references and that are neither entry points
    (:data:`ENTRY_KEYS`) nor in ``allowed``, nor ``a#b`` overrides of nested items."""
    used = {ReferenceResolver.split_id(r)[0] for r in references(config)} | ENTRY_KEYS | set(allowed)
    return [k for k in config if k not in used and ID_SEP_KEY not in k and "::" not in k]


def _prune(config: dict) -> dict:
    while True:  # dropping a key can orphan the keys only it referred to
        unused = unreferenced_keys(config)
        if not unused:
            return config
        config = {k: v for k, v in config.items() if k not in unused}


def _order(config: dict) -> dict:
    first = {k: config[k] for k in ("imports", "+imports") if k in config}
    last = {k: config[k] for k in LIFECYCLE if k in config}
    return {**first, **{k: v for k, v in config.items() if k not in first and k not in last}, **last}


def render_config(bundles_dir: str | Path, method: str, name: str) -> dict:
    """The content of ``bundles/<method>/configs/<name>`` merged from its source layers."""
    src = Path(bundles_dir) / SOURCE
    files = [src / layer.format(method=method) for layer in LAYERS[name]]
    files = [str(f) for f in files if f.is_file() or "methods" not in f.parts]  # a method may omit its layer
    if name in OVERRIDES:  # stays an override: its ``a#b`` and ``+key`` entries are for MONAI to apply at run time
        config: dict = {}
        for f in files:
            config.update(ConfigParser.load_config_file(f))
        return config
    config = ConfigParser.load_config_files(files)
    return _order(_prune(config) if name in STANDALONE else config)


def _readme(bundles_dir: Path, method: str, current: str) -> str:
    """``current`` with every shared section (from ``<!-- shared:NAME -->`` to the next heading of the same
    level or the next marker) replaced by ``_source/common/README.md``'s section ``NAME``, ``{method}``
    substituted. Method-specific text around the markers is kept as written."""
    sections: dict[str, str] = {}
    name = None
    for line in (bundles_dir / SOURCE / "common" / "README.md").read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("<!-- section:"):
            name = line.strip()[len("<!-- section:"):-len(" -->")].strip()
            sections[name] = ""
        elif name is not None:
            sections[name] += line
    out, skipping = [], False
    for line in current.splitlines(keepends=True):
        if line.startswith("<!-- shared:"):
            key = line.strip()[len("<!-- shared:"):-len(" -->")].strip()
            if key not in sections:
                raise KeyError(f"{method}/{README}: unknown shared section {key!r}; known: {sorted(sections)}")
            out += [line, sections[key].strip("\n").replace("{method}", method) + "\n"]
            skipping = True
        elif line.startswith("<!-- /shared -->"):
            out.append(line)
            skipping = False
        elif not skipping:
            out.append(line)
    return "".join(out)


def _dump(config: dict) -> str:
    return json.dumps(config, indent=4, ensure_ascii=False) + "\n"


def render_bundle(bundles_dir: str | Path, method: str) -> dict[str, str]:
    """Every rendered file of one bundle: bundle-relative path -> text (nothing is written)."""
    bundles_dir = Path(bundles_dir)
    files = {f"configs/{name}": _dump(render_config(bundles_dir, method, name)) for name in LAYERS}
    for rel, src in COPIED.items():
        files[rel] = (bundles_dir / SOURCE / src).read_text(encoding="utf-8")
    for rel, src in SHIPPED_DOCS.items():
        files[rel] = (bundles_dir.parent / "docs" / src).read_text(encoding="utf-8")
    readme = bundles_dir / method / README
    if readme.is_file():
        files[README] = _readme(bundles_dir, method, readme.read_text(encoding="utf-8"))
    return files


def stale_files(bundles_dir: str | Path) -> list[str]:
    """Bundle files (``<method>/<path>``) that differ from a fresh rendering, or are missing."""
    bundles_dir = Path(bundles_dir)
    stale = []
    for method in methods(bundles_dir):
        for rel, text in render_bundle(bundles_dir, method).items():
            target = bundles_dir / method / rel
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                stale.append(f"{method}/{rel}")
    return stale


def render_all(bundles_dir: str | Path) -> list[str]:
    """Write every bundle's rendered files (only those that change); returns them as ``<method>/<path>``."""
    from fsmis_monai.io import write_text

    bundles_dir = Path(bundles_dir)
    written = []
    for method in methods(bundles_dir):
        for rel, text in render_bundle(bundles_dir, method).items():
            target = bundles_dir / method / rel
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                write_text(target, text)
                written.append(f"{method}/{rel}")
    return written

"""Citations that ship: every ``docs/reference.md#<anchor>`` pointer in the repository resolves to a heading of
docs/reference.md, and nothing points at the unshipped digest the code was first written from."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO_ROOT

REFERENCE = REPO_ROOT / "docs" / "reference.md"
# where pointers live: the package, the bundles, benchmarks, docs, recipes, the Cython source, tests, README
ROOTS = ("fsmis_monai", "bundles", "bench", "docs", "preprocessing", "supervoxels", "tests", "README.md")
SUFFIXES = {".py", ".pyx", ".md", ".json", ".yaml", ".yml", ".txt", ".cfg", ".toml", ".sh", ".conf"}
SKIP_DIRS = {"__pycache__", ".git", ".venv", "build", "dist", "runs", "models", ".pytest_cache"}
POINTER = re.compile(r"(?<![\w/.-])(?:[\w./-]*/)?reference\.md#([\w-]+)")
UNSHIPPED = "methods" + ".md"  # split so that this file does not match itself


def github_anchor(heading: str) -> str:
    """GitHub's heading id: markup dropped, lower case, punctuation removed, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](link) -> text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_anchors(markdown: str) -> list[str]:
    """Anchors of every ATX heading outside fenced code, with GitHub's -1, -2 suffixes for repeats."""
    anchors, seen, fenced = [], {}, False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = github_anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            anchors.append(base if n == 0 else f"{base}-{n}")
    return anchors


def shipped_files() -> list[Path]:
    files = []
    for root in ROOTS:
        path = REPO_ROOT / root
        candidates = [path] if path.is_file() else path.rglob("*") if path.is_dir() else []
        for f in candidates:
            rel = f.relative_to(REPO_ROOT).parts
            if f.is_file() and f.suffix in SUFFIXES and not SKIP_DIRS.intersection(rel[:-1]):
                files.append(f)
    return sorted(files)


def pointers() -> list[tuple[str, int, str]]:
    found = []
    for f in shipped_files():
        for lineno, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            found += [(str(f.relative_to(REPO_ROOT)), lineno, m.group(1)) for m in POINTER.finditer(line)]
    return found


def test_github_anchor_rules():
    # written out from GitHub's behaviour, not from the function
    assert github_anchor("Quirk: setting 2 AND") == "quirk-setting-2-and"
    assert github_anchor("Q-Net ResNet-101") == "q-net-resnet-101"
    assert github_anchor("Slice index (classmap)") == "slice-index-classmap"
    assert github_anchor("`faithful` and [MONAI](https://monai.io)") == "faithful-and-monai"
    assert heading_anchors("# A\n```\n# not a heading\n```\n## A\n### A") == ["a", "a-1", "a-2"]


def test_reference_headings_are_unique():
    anchors = heading_anchors(REFERENCE.read_text(encoding="utf-8"))
    assert len(anchors) > 40
    repeated = sorted({a for a in anchors if anchors.count(a) > 1})
    assert not repeated, f"docs/reference.md: repeated headings make unstable anchors: {repeated}"


def test_every_reference_pointer_resolves():
    anchors = set(heading_anchors(REFERENCE.read_text(encoding="utf-8")))
    found = pointers()
    # the package and the bundles cite it (guards against a scan that finds nothing)
    cited_from = {path.split("/")[0] for path, _, _ in found}
    assert {"fsmis_monai", "bundles"} <= cited_from, cited_from
    broken = [f"{path}:{lineno}: #{anchor}" for path, lineno, anchor in found if anchor not in anchors]
    assert not broken, "pointers to missing docs/reference.md headings:\n" + "\n".join(broken)


def test_reference_internal_links_resolve():
    text = REFERENCE.read_text(encoding="utf-8")
    anchors = set(heading_anchors(text))
    links = re.findall(r"\]\(#([\w-]+)\)", text)
    assert links
    assert not sorted(set(links) - anchors)


def test_nothing_points_at_the_unshipped_digest():
    hits = []
    for path in shipped_files():
        if path == Path(__file__).resolve():
            continue
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        hits += [f"{path.relative_to(REPO_ROOT)}:{n}" for n, line in enumerate(lines, 1) if UNSHIPPED in line]
    assert not hits, f"cite docs/reference.md#<anchor> instead of {UNSHIPPED}:\n" + "\n".join(hits)

"""``bench/gpu_concurrent.py`` (issue 20 part 3, the seven bundles at once on one GPU) in its CPU tiny mode:
two bundles trained concurrently under a short budget, then EP1 and whole-volume Dice on the held-out scan."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_tiny_mode_trains_bundles_concurrently_then_evaluates(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_concurrent", REPO / "bench" / "gpu_concurrent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    status = module.main(["--tiny", "--out", str(tmp_path), "--bundles", "adnet", "ssl_alpnet", "--budget-s", "25"])
    results = {b: json.loads((tmp_path / f"{b}.json").read_text()) for b in ("adnet", "ssl_alpnet")}
    assert status == 0, results
    for r in results.values():
        assert r["encoder"] == "small" and r["capped"] is True  # stopped by the budget, not by max_iterations
        assert r["iterations"] == len(r["losses"]) >= 1 and all(math.isfinite(x) for x in r["losses"])
        assert set(r["dice"]) == {"ep1", "whole"}
        assert all(0 <= d <= 1 for p in r["dice"].values() for d in p["classes"].values())
        summary = json.loads((tmp_path / "evaluation" / r["bundle"] / "summary.json").read_text())
        assert r["dice"]["ep1"]["mean"] == summary["protocols"]["ep1"]["mean"]
    rows = [line for line in (tmp_path / "gpu_concurrent.md").read_text().splitlines() if line.startswith("| adnet")]
    assert len(rows) == 1 and f"| {results['adnet']['iterations']} |" in rows[0]
    assert (tmp_path / "learning_curves.png").stat().st_size > 0

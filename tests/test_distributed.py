"""``fsmis_monai.distributed.on_rank_zero`` in a real group of two gloo processes (``torch.distributed.run``)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO_ROOT as REPO


# Run under torch.distributed.run by the test below: rank 0's task runs once; every rank prints what it got.
RANK_ZERO_SCRIPT = r'''
import os
import sys
import torch.distributed as dist
from fsmis_monai.distributed import on_rank_zero
from fsmis_monai.io import FsmisInputError

dist.init_process_group("gloo")
rank = dist.get_rank()

def say(line):
    # one write per line: the two ranks share the pipe, and print's separate writes of text and newline can
    # interleave ("rank 1 got folderrank 0 got folder")
    os.write(1, (line + "\n").encode())

def task(result):
    def run():
        say(f"rank {rank} ran the task")
        if result == "input error":
            raise FsmisInputError("scan_7.nii.gz: no voxel")
        return result
    return run

say(f"rank {rank} got {on_rank_zero(task('folder'))}")
try:
    on_rank_zero(task("input error"))
except FsmisInputError as e:
    say(f"rank {rank} raised {e}")
dist.destroy_process_group()
'''


def test_on_rank_zero_runs_once_and_shares_the_outcome(tmp_path):
    """Two gloo processes: the task runs on rank 0 only; both ranks return its result, and both raise its input
    error (the other rank must not hang at a barrier rank 0 never reaches)."""
    script = tmp_path / "rank_zero.py"
    script.write_text(RANK_ZERO_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = set(proc.stdout.splitlines())
    assert {"rank 0 got folder", "rank 1 got folder", "rank 0 raised scan_7.nii.gz: no voxel",
            "rank 1 raised scan_7.nii.gz: no voxel"} <= lines, proc.stdout
    assert sum("ran the task" in line for line in lines) == 1 and "rank 0 ran the task" in lines

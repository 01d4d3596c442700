"""`scripts/gpu_training.sh`, the recipe a GPU lease runs: it parses, and what it carries fits the device tool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_training.sh"

#: The device tool carries at most this much a call: every tracked file, plus `.carry/`.
DEVICE_CARRY_MIB = 64
#: What `prepare` puts in `.carry/`: SimpleITK 2.5.3 as an xz archive (27.97 MB) and the real data (2.5 MB).
CARRY_MIB = 29.2


def test_the_recipe_parses_and_names_its_commands():
    if shutil.which("bash") is None:
        pytest.skip("no bash on this machine")
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "prepare|run|seg" in usage.stderr


def test_the_tracked_tree_leaves_room_for_what_a_gpu_lease_carries():
    """A GPU lease sends the tracked tree and `.carry/` together: a tree grown past what the limit leaves (committed
    training states, report images) would make the next lease fail before it trains."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = [REPO / name.decode() for name in listed.stdout.split(b"\0") if name]
    tracked_mib = sum(path.stat().st_size for path in files if path.is_file()) / 2**20
    assert tracked_mib + CARRY_MIB < DEVICE_CARRY_MIB - 1, f"tracked files: {tracked_mib:.1f} MiB"

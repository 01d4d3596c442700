"""Facts about the machine and the checkout, read in one place: ``/proc`` fields and the git commit.

Each reader returns ``None`` (or ``"unknown"``) where the fact is not available (no ``/proc``, not a git checkout),
never raises.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

#: The repository's root in a development checkout (``SpineRigidReg/SpineRigidRegLib/system.py`` -> root).
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def proc_field(path: str, name: str) -> str | None:
    """The value after ``name:`` on the first such line of a ``/proc`` file (e.g. ``("/proc/meminfo",
    "MemTotal")`` -> ``"131072 kB"``), or None."""
    try:
        with open(path, encoding="ascii", errors="replace") as stream:
            for line in stream:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        return None
    return None


def proc_kb(path: str, name: str) -> int | None:
    """A ``kB`` field of a ``/proc`` file as an integer (``VmRSS``/``VmHWM`` of ``/proc/self/status``,
    ``MemAvailable`` of ``/proc/meminfo``), or None."""
    value = proc_field(path, name)
    try:
        return int(value.split()[0]) if value else None
    except ValueError:
        return None


def process_status_kb(name: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None without ``/proc``."""
    return proc_kb("/proc/self/status", name)


def available_memory_bytes() -> int | None:
    """Memory available to a new allocation (``MemAvailable``), or None without ``/proc``."""
    kb = proc_kb("/proc/meminfo", "MemAvailable")
    return None if kb is None else kb * 1024


def total_memory_gb() -> float | None:
    """Installed memory in GiB (one decimal), or None without ``/proc``."""
    kb = proc_kb("/proc/meminfo", "MemTotal")
    return None if kb is None else round(kb / 2**20, 1)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else :func:`platform.processor`, else the machine type)."""
    return proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine() or "unknown"


def git_commit(short: bool = False, folder: Path | None = None) -> str:
    """The checkout's HEAD commit (abbreviated with ``short``), ``"unknown"`` outside a git checkout."""
    command = ["git", "-C", str(folder or REPOSITORY_ROOT), "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


__all__ = [
    "available_memory_bytes",
    "cpu_name",
    "git_commit",
    "proc_field",
    "proc_kb",
    "process_status_kb",
    "total_memory_gb",
]

"""The ablation manifest: the one writer (``srr-ablation``) and the one reader (``srr-benchmark --manifest``).

Format (``OUT/manifest.json``; paths are relative to the manifest's folder)::

    {"format": "spinerigidreg-ablation", "version": 1, "base_config": "...", "milestone_step": N,
     "baseline_steps": S, "finetune_steps": F,
     "identity": {validation figures of the initial alignment},
     "rows": [{"name": "pc", "label": "PC", "loss": {...}, "checkpoint": "pc/best.pt", "config": "pc/config.yaml",
               "best_step": S, "validation": {"dice": ..., "rigid_dice": ..., "abs_volume_change_percent": ...,
               "folding_percent": ...}, "wall_time_s": T}, ...]}

The reader also takes the hand-written forms ``[{"name": ..., "checkpoint": ...}, ...]`` and
``{"models": [...]}``, so that a benchmark of any set of checkpoints needs no training run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

MANIFEST_FORMAT = "spinerigidreg-ablation"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ManifestModel:
    """One trained model of a manifest.

    Attributes:
        name: Row name (the config name of an ablation row, e.g. ``"pc_rigid_field"``).
        label: Row label in tables (Table 1's, e.g. ``"PC + rigid field"``); the name where none is given.
        checkpoint: The checkpoint, resolved against the manifest's folder; it exists.
    """

    name: str
    label: str
    checkpoint: Path


def write_manifest(folder: str | os.PathLike, manifest: Mapping) -> Path:
    """Write ``manifest`` (see the module docstring; ``format``/``version`` are added) to ``folder/manifest.json``.

    Raises:
        InputError: A row without ``name`` or ``checkpoint``.
    """
    body = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **manifest}
    _entries(body, Path(folder) / MANIFEST_NAME)  # what is written must read back
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(body, indent=2), encoding="utf-8")
    return path


def load_manifest(path: str | os.PathLike) -> dict:
    """The manifest as a dictionary (``{"rows": [...]}`` for the hand-written list forms).

    Raises:
        InputError: Missing file, invalid JSON, another format or a newer version.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except FileNotFoundError:
        raise InputError(f"ablation manifest not found: {path}") from None
    except json.JSONDecodeError as error:
        raise InputError(f"ablation manifest {path} is not valid JSON ({error})") from None
    if isinstance(data, list):
        data = {"rows": data}
    if not isinstance(data, Mapping):
        raise InputError(f"ablation manifest {path} must hold a list of {{name, checkpoint}} entries or 'rows'")
    data = dict(data)
    if "models" in data and "rows" not in data:
        data["rows"] = data.pop("models")
    fmt = data.get("format", MANIFEST_FORMAT)
    if fmt != MANIFEST_FORMAT:
        raise InputError(f"{path} is a {fmt!r} file, not an ablation manifest ({MANIFEST_FORMAT!r})")
    version = data.get("version", MANIFEST_VERSION)
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise InputError(
            f"ablation manifest {path} has version {version!r}; this reader knows up to {MANIFEST_VERSION}"
        )
    _entries(data, path)
    return data


def read_manifest(path: str | os.PathLike) -> list[ManifestModel]:
    """The models of a manifest (any of the forms of the module docstring), checkpoints resolved and checked.

    Raises:
        InputError: See :func:`load_manifest`; an entry without ``name``/``checkpoint``; a missing checkpoint.
    """
    path = Path(path)
    models = []
    for entry in load_manifest(path)["rows"]:
        checkpoint = Path(entry["checkpoint"])
        if not checkpoint.is_absolute():
            checkpoint = path.parent / checkpoint
        if not checkpoint.is_file():
            raise InputError(f"checkpoint of {entry['name']!r} not found: {checkpoint}")
        name = str(entry["name"])
        models.append(ManifestModel(name, str(entry.get("label") or name), checkpoint))
    return models


def _entries(data: Mapping, path: Path) -> list:
    entries = data.get("rows")
    if not isinstance(entries, list):
        raise InputError(f"ablation manifest {path} must hold a list of {{name, checkpoint}} entries under 'rows'")
    for entry in entries:
        if not isinstance(entry, Mapping) or "name" not in entry or "checkpoint" not in entry:
            raise InputError(f"every entry of {path} needs 'name' and 'checkpoint', got {entry!r}")
    return entries


__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ManifestModel",
    "load_manifest",
    "read_manifest",
    "write_manifest",
]

"""The core package never imports Slicer, VTK or Qt: it must run in plain Python and inside Slicer alike."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

CORE = REPO_ROOT / "SpineRigidReg" / "SpineRigidRegLib"
FORBIDDEN = ("slicer", "vtk", "qt", "ctk", "pythonqt", "mrml")
#: Other names of the same toolkits: VTK's split modules, Qt bindings, Slicer's wrapped MRML/CTK libraries.
FORBIDDEN_PREFIXES = ("vtk", "slicer", "mrml", "ctk", "pythonqt", "pyqt", "pyside", "qsl")


def forbidden(module: str) -> bool:
    """True for a forbidden top-level package (``vtk``, ``vtkmodules``, ``qt``, ``PythonQt``, ``MRMLCore``...)."""
    top = module.split(".")[0].lower()
    return top in FORBIDDEN or top.startswith(FORBIDDEN_PREFIXES)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an ``import``/``from ... import`` statement or an ``importlib.import_module("...")`` names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def test_the_checker_sees_every_kind_of_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nimport vtk\nfrom slicer.util import x\nimport qt as q\nfrom MRMLCore import y\n"
        "def f():\n    import ctk\n    importlib.import_module('vtkmodules.all')\nfrom . import sibling\n",
        encoding="utf-8",
    )
    bad = [name for _, name in imported_modules(sample) if forbidden(name)]
    assert bad == ["vtk", "slicer.util", "qt", "MRMLCore", "ctk", "vtkmodules.all"]


def test_no_core_file_imports_slicer_vtk_or_qt():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) >= 10, f"the core package was not found under {CORE}"
    offenders = [
        f"{path.relative_to(CORE)}:{line} imports {name}"
        for path in files
        for line, name in imported_modules(path)
        if forbidden(name)
    ]
    assert not offenders, "the core package must not import Slicer/VTK/Qt:\n" + "\n".join(offenders)


@pytest.mark.slow
def test_importing_every_core_module_loads_no_slicer_vtk_or_qt():
    modules = sorted(
        ".".join(("SpineRigidRegLib", *path.relative_to(CORE).with_suffix("").parts)).removesuffix(".__init__")
        for path in CORE.rglob("*.py")
        if path.name != "__main__.py"
    )
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "SpineRigidRegLib.warp" in loaded
    assert not [name for name in loaded if forbidden(name)]

"""The Slicer extension's files, checked without Slicer: module classes, build lists, the .ui and its bindings."""

from __future__ import annotations

import ast
import fnmatch
import re
import xml.etree.ElementTree as ET

import pytest
from conftest import REPO_ROOT as REPO

MODULE_DIR = REPO / "SpineRigidReg"
MODULE_FILE = MODULE_DIR / "SpineRigidReg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SpineRigidReg.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"


@pytest.fixture(scope="module")
def module_ast() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


@pytest.fixture(scope="module")
def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def base_names(node: ast.ClassDef) -> list[str]:
    return [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]


def python_files() -> list[str]:
    """Every .py of the module folder (module file, logic package, core), relative to the module folder."""
    return sorted(
        p.relative_to(MODULE_DIR).as_posix()
        for p in MODULE_DIR.rglob("*.py")
        if "__pycache__" not in p.parts and not any(part.endswith(".egg-info") for part in p.parts)
    )


def test_module_file_declares_the_four_slicer_classes(module_ast):
    found = classes(module_ast)
    expected = {
        "SpineRigidReg": "ScriptedLoadableModule",
        "SpineRigidRegWidget": "ScriptedLoadableModuleWidget",
        "SpineRigidRegLogic": "ScriptedLoadableModuleLogic",
        "SpineRigidRegTest": "ScriptedLoadableModuleTest",
    }
    for name, base in expected.items():
        assert name in found, f"SpineRigidReg.py lacks class {name}"
        assert base in base_names(found[name]), f"{name} must derive from {base}"
    methods = {n.name for n in found["SpineRigidRegTest"].body if isinstance(n, ast.FunctionDef)}
    assert {"runTest", "setUp"} <= methods and any(m.startswith("test_") for m in methods)
    assert "SpineRigidRegParameterNode" in found
    decorators = [ast.unparse(d) for d in found["SpineRigidRegParameterNode"].decorator_list]
    assert "parameterNodeWrapper" in decorators


def test_only_the_module_file_sits_at_the_top_of_the_module_folder():
    """Slicer loads every top-level .py of a scripted-module folder as a module of its own."""
    top_level = sorted(p.name for p in MODULE_DIR.glob("*.py"))
    assert top_level == ["SpineRigidReg.py"]


def test_opening_the_panel_imports_no_heavy_or_installable_package(module_ast):
    """torch and the core load only on Apply, after the dependency check (nothing is installed on open)."""
    top_imports = set()
    for node in module_ast.body:
        if isinstance(node, ast.Import):
            top_imports |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_imports.add(node.module.split(".")[0])
    assert not top_imports & {"torch", "numpy", "SimpleITK", "SpineRigidRegLib", "SpineRigidRegLogic", "scipy"}
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "pip_install" not in source  # torch comes from the PyTorch extension, installed on consent
    assert "installTorch" in source and "confirmOkCancelDisplay" in source


def test_the_logic_package_imports_no_qt_or_gui_classes():
    for path in (MODULE_DIR / "SpineRigidRegLogic").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"qt", "ctk", "PythonQt"}, f"{path.name} imports {name}"
                assert "ScriptedLoadableModule" not in name and "parameterNodeWrapper" not in name


def cmake_entries(text: str) -> tuple[list[str], list[str]]:
    """(GLOB_RECURSE patterns relative to the module folder, explicit .py entries) of the module's CMakeLists."""
    patterns = [
        p.replace("${CMAKE_CURRENT_SOURCE_DIR}/", "")
        for block in re.findall(r"file\(GLOB_RECURSE\s+MODULE_PACKAGE_SCRIPTS(.*?)\)", text, re.S)
        for p in re.findall(r"\$\{CMAKE_CURRENT_SOURCE_DIR\}/\S+\.py", block)
    ]
    scripts_block = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1)
    explicit = [e.replace("${MODULE_NAME}", "SpineRigidReg") for e in re.findall(r"\S+\.py", scripts_block)]
    return patterns, explicit


def test_module_cmakelists_builds_every_python_file_and_resource():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in text
    assert "${MODULE_PACKAGE_SCRIPTS}" in re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1)
    patterns, explicit = cmake_entries(text)
    assert explicit == ["SpineRigidReg.py"]
    assert sorted(patterns) == ["SpineRigidRegLib/*.py", "SpineRigidRegLogic/*.py"]
    files = python_files()
    assert "SpineRigidRegLib/pipeline.py" in files and "SpineRigidRegLogic/logic.py" in files
    for path in files:
        # GLOB_RECURSE "dir/*.py" matches any depth below dir.
        covered = path in explicit or any(fnmatch.fnmatch(path, p.replace("/*.py", "/**.py")) for p in patterns)
        assert covered, f"{path} is not built by SpineRigidReg/CMakeLists.txt"
    resources = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", text, re.S).group(1)
    for entry in re.findall(r"Resources/\S+", resources):
        assert (MODULE_DIR / entry.replace("${MODULE_NAME}", "SpineRigidReg")).is_file(), entry
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_cmakelists_and_s4ext_agree():
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    s4ext = (REPO / "extension.s4ext").read_text(encoding="utf-8")
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"?PyTorch"?\)', cmake)
    assert "add_subdirectory(SpineRigidReg)" in cmake
    assert "find_package(Slicer REQUIRED)" in cmake and "${Slicer_EXTENSION_CPACK}" in cmake
    fields = dict(line.split(" ", 1) for line in s4ext.splitlines() if line.strip() and not line.startswith("#"))
    assert fields["depends"].strip() == "PyTorch"
    assert fields["category"].strip() == re.search(r'EXTENSION_CATEGORY "([^"]+)"', cmake).group(1)
    assert fields["description"].strip() == re.search(r'EXTENSION_DESCRIPTION "([^"]+)"', cmake).group(1)
    for key in ("scmurl", "homepage", "iconurl", "screenshoturls"):
        assert fields[key].startswith("https://")
    assert (REPO / "Resources" / "Icons" / "SpineRigidReg.png").is_file()
    assert (REPO / "Resources" / "Screenshots" / "panel.png").is_file()


def test_icons_are_128_pixel_pngs():
    for path in (REPO / "Resources" / "Icons" / "SpineRigidReg.png", MODULE_DIR / "Resources/Icons/SpineRigidReg.png"):
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(header[16:20], "big") == int.from_bytes(header[20:24], "big") == 128


def test_ui_is_valid_and_every_widget_the_module_uses_exists(module_ast, ui_root):
    widgets = {w.get("name"): w.get("class") for w in ui_root.iter("widget")}
    used = {
        node.attr
        for node in ast.walk(module_ast)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id in ("self", "widget")
    }
    assert len(used) > 15
    missing = sorted(used - set(widgets))
    assert not missing, f"SpineRigidReg.py uses widgets absent from the .ui: {missing}"
    assert widgets["applyButton"] == "QPushButton" and widgets["progressBar"] == "QProgressBar"
    # Every MRML widget gets the scene through a connection, as in Slicer's template.
    receivers = {c.findtext("receiver") for c in ui_root.iter("connection")}
    mrml = {n for n, c in widgets.items() if c in ("qMRMLNodeComboBox", "qMRMLTableView", "qSlicerMarkupsPlaceWidget")}
    assert mrml <= receivers


def test_every_bound_widget_names_a_parameter_of_the_parameter_node(module_ast, ui_root):
    node = classes(module_ast)["SpineRigidRegParameterNode"]
    parameters = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    bound = {prop.findtext("string") for prop in ui_root.iter("property") if prop.get("name") == "SlicerParameterName"}
    assert bound and bound <= parameters, sorted(bound - parameters)
    assert {"ctVolume", "ctSegmentation", "mrVolume", "refineSteps", "device", "rigidityPreset"} <= bound


def test_the_panels_presets_and_custom_weights_are_the_cores(module_ast, ui_root):
    """The module file imports no core before its dependency check, so it repeats these; they must not drift."""
    from SpineRigidRegLib.choices import CUSTOM, preset_names
    from SpineRigidRegLib.refine import RefineWeights

    node = classes(module_ast)["SpineRigidRegParameterNode"]
    assigned = {s.target.id: s for s in node.body if isinstance(s, ast.AnnAssign)}
    defaults = {name: ast.literal_eval(assigned[name].value) for name in ("rigidField", "pc", "oc", "rigidDice")}
    core = RefineWeights()
    expected = {"rigidField": core.rigid_field, "pc": core.pc, "oc": core.oc, "rigidDice": core.rigid_dice}
    assert defaults == expected
    spin_boxes = {
        widget.find("property[@name='SlicerParameterName']/string").text: float(
            widget.find("property[@name='value']/double").text
        )
        for widget in ui_root.iter("widget")
        if widget.get("class") == "QDoubleSpinBox" and widget.find("property[@name='SlicerParameterName']") is not None
    }
    assert {name: spin_boxes[name] for name in expected} == expected
    choice = assigned["rigidityPreset"].annotation.slice.elts[1]  # Annotated[str, Choice([...])]
    assert set(ast.literal_eval(choice.args[0])) == {*preset_names(), CUSTOM}
    combo = next(w for w in ui_root.iter("widget") if w.get("name") == "rigidityPresetComboBox")
    assert {item.findtext("property/string") for item in combo.iter("item")} == {*preset_names(), CUSTOM}


def test_sample_case_files_match_the_core_and_the_help_explains_the_workflow(module_ast):
    from SpineRigidRegLib.cli.register import SAMPLE_FILES

    sample = next(
        n.value
        for n in module_ast.body
        if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "SAMPLE_CASE" for t in n.targets)
    )
    files = {entry.elts[0].value for entry in sample.elts}
    assert files == set(SAMPLE_FILES.values())
    help_text = next(
        n.value.value
        for n in module_ast.body
        if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "HELP_TEXT" for t in n.targets)
    )
    for word in ("Apply", "Cancel", "Undo", "Re-run refinement", "transform", "det J", "Sample Data", "PyTorch"):
        assert word in help_text, word


#: Widget classes Slicer's parameterNodeWrapper can connect, per parameter kind (exact classes, as its connectors
#: compare ``type(widget)``; a ctkDoubleSpinBox, for instance, is not connectable).
CONNECTABLE = {
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "int": {"QSpinBox", "QSlider"},
    "choice": {"QComboBox"},
    "node": {"qMRMLNodeComboBox"},
    "bool": {"QCheckBox", "QPushButton"},
}


def parameter_kind(annotation: ast.expr) -> str:
    text = ast.unparse(annotation)
    if "Choice(" in text:
        return "choice"
    if text.startswith("Annotated[float") or text == "float":
        return "float"
    if text.startswith("Annotated[int") or text == "int":
        return "int"
    if text in ("bool",):
        return "bool"
    if "vtkMRML" in text:
        return "node"
    return "other"


def test_bound_widgets_are_of_a_class_the_parameter_node_wrapper_connects(module_ast, ui_root):
    node = classes(module_ast)["SpineRigidRegParameterNode"]
    kinds = {s.target.id: parameter_kind(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    for widget in ui_root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                name = prop.findtext("string")
                assert widget.get("class") in CONNECTABLE.get(kinds[name], set()), (
                    f"{widget.get('name')} ({widget.get('class')}) cannot be bound to {name} ({kinds[name]})"
                )
                assert prop.get("stdset") == "0"  # a dynamic property, as Qt Designer writes it
    # Node parameters with several node types must be typing.Union[..., None] (the wrapper's requirement).
    for statement in node.body:
        if isinstance(statement, ast.AnnAssign) and "|" in ast.unparse(statement.annotation):
            raise AssertionError(f"{statement.target.id}: use typing.Union/Optional, not X | Y")
        if isinstance(statement, ast.AnnAssign) and ast.unparse(statement.annotation).startswith("Union["):
            assert ast.unparse(statement.annotation).endswith(", None]"), statement.target.id

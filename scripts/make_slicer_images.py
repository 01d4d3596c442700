"""Draw the extension's icons and render the module panel for the README, from the module's own ``.ui`` file.

    .venv/bin/python scripts/make_slicer_images.py                 # icons + panel (panel needs PySide6)
    .venv/bin/python scripts/make_slicer_images.py --icons-only
    .venv/bin/python scripts/make_slicer_images.py --vertebrae out/sample/vertebrae.csv   # QA table from a real run

Icons (matplotlib): ``SpineRigidReg/Resources/Icons/SpineRigidReg.png`` (module) and
``Resources/Icons/SpineRigidReg.png``
(extension), 128 x 128.

Panel (``Resources/Screenshots/panel.png``): the Slicer application is not available here, so the panel is rendered
with Qt for Python (``pip install PySide6-Essentials``, not a project dependency) from
``SpineRigidReg/Resources/UI/SpineRigidReg.ui``: every widget, label, tooltip-free text, layout and order comes from
that file. Slicer's own widget classes (MRML node selectors, CTK collapsible buttons and sliders, the MRML table view,
the markups place widget) are swapped for the plain Qt widgets they derive from or look like, filled with the node
names the sample case gets in Slicer. All sections are drawn expanded. The QA table shows the sample case's vertebrae;
its figures come from ``--vertebrae`` (an ``srr-register`` ``vertebrae.csv``) when given, and are left empty otherwise.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UI_FILE = REPO / "SpineRigidReg" / "Resources" / "UI" / "SpineRigidReg.ui"
MODULE_ICON = REPO / "SpineRigidReg" / "Resources" / "Icons" / "SpineRigidReg.png"
EXTENSION_ICON = REPO / "Resources" / "Icons" / "SpineRigidReg.png"
PANEL = REPO / "Resources" / "Screenshots" / "panel.png"
SAMPLE_LABELS = REPO / "Resources" / "SampleData" / "ct_vertebrae.nii.gz"

#: What each node selector shows: the node names of the bundled sample case once loaded in Slicer.
SELECTOR_TEXT = {
    "ctVolumeSelector": "SpineRigidReg CT",
    "ctSegmentationSelector": "SpineRigidReg CT vertebrae",
    "mrVolumeSelector": "SpineRigidReg MR",
    "mrSegmentationSelector": "SpineRigidReg MR vertebrae",
    "ctCentresSelector": "SpineRigidReg CT centres",
    "mrCentresSelector": "SpineRigidReg MR centres",
    "ctPointsSelector": "CT correction points",
    "mrPointsSelector": "MR correction points",
}
#: Slicer/CTK class -> the Qt class drawn in its place.
STAND_INS = {
    "qMRMLWidget": "QWidget",
    "qSlicerWidget": "QWidget",
    "ctkCollapsibleButton": "QGroupBox",
    "ctkCollapsibleGroupBox": "QGroupBox",
    "qMRMLNodeComboBox": "QComboBox",
    "ctkDoubleSpinBox": "QDoubleSpinBox",
    "ctkSliderWidget": "QWidget",
    "qMRMLTableView": "QTableWidget",
    "qSlicerMarkupsPlaceWidget": "QToolButton",
}
QA_COLUMNS = [
    ("name", "Vertebra"),
    ("rigid_dice", "Rigid DSC"),
    ("volume_change_percent", "Volume change (%)"),
    ("pc", "PC"),
    ("oc", "OC"),
    ("folding_voxels", "Folding voxels"),
    ("dice", "DSC"),
    ("tre_mm", "TRE (mm)"),
]


# ------------------------------------------------------------------------------------------------------ icons


def draw_icon(path: Path, size_px: int = 128) -> None:
    """A spine of rigid vertebrae over a deforming grid: the method in one picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import FancyBboxPatch

    fig = plt.figure(figsize=(1, 1), dpi=size_px)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.add_patch(
        FancyBboxPatch(
            (0.03, 0.03), 0.94, 0.94, boxstyle="round,pad=0,rounding_size=0.16", facecolor="#183a5a", edgecolor="none"
        )
    )
    t = np.linspace(0.08, 0.92, 60)
    for c in np.linspace(0.14, 0.86, 7):  # a smooth deformation of a regular grid
        ax.plot(c + 0.035 * np.sin(3.2 * t + 4 * c), t, color="#47b5c4", lw=0.8, alpha=0.8)
        ax.plot(t, c + 0.035 * np.sin(3.0 * t + 5 * c), color="#47b5c4", lw=0.8, alpha=0.8)
    centres = [(0.47, 0.80), (0.52, 0.615), (0.545, 0.43), (0.53, 0.245)]
    angles = [12, 5, -3, -10]
    for (x, y), angle in zip(centres, angles):
        body = FancyBboxPatch(
            (-0.15, -0.065),
            0.30,
            0.13,
            boxstyle="round,pad=0,rounding_size=0.035",
            facecolor="#f3ead3",
            edgecolor="#8a6d3b",
            lw=1.0,
        )
        spine = FancyBboxPatch(
            (0.12, -0.03),
            0.12,
            0.06,
            boxstyle="round,pad=0,rounding_size=0.02",
            facecolor="#e6d7b0",
            edgecolor="#8a6d3b",
            lw=0.8,
        )
        transform = matplotlib.transforms.Affine2D().rotate_deg(angle).translate(x, y) + ax.transData
        for patch in (spine, body):
            patch.set_transform(transform)
            ax.add_patch(patch)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=size_px, transparent=True)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ panel


def qt_ready_ui(ui_text: str) -> str:
    """The module's .ui with Slicer's widget classes replaced by the Qt classes drawn in their place."""
    root = ET.fromstring(ui_text)
    for widget in root.iter("widget"):
        cls = widget.get("class")
        if cls in STAND_INS:
            widget.set("class", STAND_INS[cls])
            for prop in list(widget.findall("property")):
                name = prop.get("name")
                if cls in ("ctkCollapsibleButton",) and name == "text":
                    prop.set("name", "title")
                elif name in (
                    "nodeTypes",
                    "showChildNodeTypes",
                    "addEnabled",
                    "removeEnabled",
                    "renameEnabled",
                    "noneEnabled",
                    "collapsed",
                    "singleStep",
                    "maximum",
                    "value",
                    "buttonsVisible",
                ):
                    if cls in (
                        "qMRMLNodeComboBox",
                        "ctkCollapsibleButton",
                        "ctkCollapsibleGroupBox",
                        "ctkSliderWidget",
                        "qSlicerMarkupsPlaceWidget",
                    ):
                        widget.remove(prop)
    custom = root.find("customwidgets")
    if custom is not None:
        root.remove(custom)
    connections = root.find("connections")
    if connections is not None:
        root.remove(connections)
    return ET.tostring(root, encoding="unicode")


def sample_vertebrae() -> list[str]:
    """Vertebra names of the sample case's CT labels, cranial first (empty without the sample data)."""
    try:
        import SimpleITK as sitk
        from SpineRigidRegLib.data.vertebrae import detect_scheme, label_names, spine_order
    except ImportError:
        return []
    if not SAMPLE_LABELS.is_file():
        return []
    names = label_names(sitk.ReadImage(str(SAMPLE_LABELS)))
    return [names[v] for v in spine_order(names, detect_scheme(names))]


def read_rows(csv_path: Path | None, names: list[str]) -> list[dict]:
    if csv_path is None:
        return [{"name": name} for name in names]
    with open(csv_path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def render_panel(path: Path, vertebrae_csv: Path | None, width: int = 440) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import (
        QApplication,
        QCheckBox,
        QComboBox,
        QDoubleSpinBox,
        QGroupBox,
        QHBoxLayout,
        QHeaderView,
        QPushButton,
        QSlider,
        QTableWidget,
        QTableWidgetItem,
        QToolButton,
        QWidget,
    )

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setStyle("Fusion")
    data = QByteArray(qt_ready_ui(UI_FILE.read_text(encoding="utf-8")).encode("utf-8"))
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    panel = QUiLoader().load(buffer)
    buffer.close()

    for name, text in SELECTOR_TEXT.items():
        combo = panel.findChild(QComboBox, name)
        combo.addItem(text)
    for box in panel.findChildren(QGroupBox):
        box.setStyleSheet("QGroupBox { font-weight: bold; }")
    for button in panel.findChildren(QToolButton):
        button.setText("Place")
    panel.findChild(QPushButton, "applyButton").setEnabled(True)

    slider_host = panel.findChild(QWidget, "opacitySliderWidget")
    row = QHBoxLayout(slider_host)
    row.setContentsMargins(0, 0, 0, 0)
    slider = QSlider(Qt.Horizontal)
    slider.setRange(0, 100)
    slider.setValue(50)
    spin = QDoubleSpinBox()
    spin.setRange(0.0, 1.0)
    spin.setValue(0.5)
    row.addWidget(slider)
    row.addWidget(spin)

    names = sample_vertebrae()
    rows = read_rows(vertebrae_csv, names)
    table = panel.findChild(QTableWidget, "qaTableView")
    table.setColumnCount(len(QA_COLUMNS))
    table.setHorizontalHeaderLabels([title for _, title in QA_COLUMNS])
    table.setRowCount(len(rows))
    for r, values in enumerate(rows):
        for c, (key, _) in enumerate(QA_COLUMNS):
            text = values.get(key, "")
            if text and key not in ("name", "folding_voxels"):
                text = f"{float(text):.3f}"
            table.setItem(r, c, QTableWidgetItem(text))
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
    table.setMinimumHeight(60 + 24 * max(len(rows), 3))

    weights = panel.findChild(QTableWidget, "vertebraTable")
    weights.setRowCount(len(names))
    for r, name in enumerate(names):
        weights.setItem(r, 0, QTableWidgetItem(name))
        box = QDoubleSpinBox()
        box.setValue(1.0)
        weights.setCellWidget(r, 1, box)
        weights.setCellWidget(r, 2, QCheckBox())
    weights.horizontalHeader().setStretchLastSection(True)
    weights.setMinimumHeight(60 + 28 * max(len(names), 3))

    panel.resize(width, 100)
    panel.adjustSize()
    panel.resize(width, panel.sizeHint().height())
    path.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(path)):
        raise RuntimeError(f"could not write {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--icons-only", action="store_true", help="draw the icons, skip the panel")
    parser.add_argument("--vertebrae", type=Path, help="vertebrae.csv of an srr-register run, to fill the QA table")
    args = parser.parse_args(argv)
    draw_icon(MODULE_ICON)
    draw_icon(EXTENSION_ICON)
    if not args.icons_only:
        try:
            render_panel(PANEL, args.vertebrae)
        except ImportError:
            print("the panel needs Qt for Python: pip install PySide6-Essentials", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

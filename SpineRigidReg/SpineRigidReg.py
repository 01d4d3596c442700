"""SpineRigidReg: register a spine CT onto an MR so that soft tissue deforms and every vertebra stays rigid.

The module file holds the Qt side only (panel, background run, progress, cancel, error display, sample data and the
self-test). The MRML work lives in the ``SpineRigidRegLogic`` package beside this file and the maths in the core
package ``SpineRigidRegLib``; both import torch, so they are imported only when a registration starts, after the
PyTorch dependency has been checked (nothing is installed or downloaded when the panel opens).
"""

import hashlib
import importlib.util
import json
import logging
import os
import threading
import traceback
from pathlib import Path
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Files of the bundled sample case (same names as ``SpineRigidRegLib.cli.register.SAMPLE_FILES``), with how Slicer
#: loads them and the node names they get.
SAMPLE_CASE = (
    ("ct.nii.gz", "VolumeFile", "SpineRigidReg CT"),
    ("ct_vertebrae.nii.gz", "SegmentationFile", "SpineRigidReg CT vertebrae"),
    ("mr.nii.gz", "VolumeFile", "SpineRigidReg MR"),
    ("mr_vertebrae.nii.gz", "SegmentationFile", "SpineRigidReg MR vertebrae"),
    ("ct_landmarks.mrk.json", "MarkupsFile", "SpineRigidReg CT centres"),
    ("mr_landmarks.mrk.json", "MarkupsFile", "SpineRigidReg MR centres"),
)
SAMPLE_NAME = "SpineRigidRegSample"

HELP_TEXT = """
<p>Registers a spine <b>CT</b> (moving) onto an <b>MR</b> (fixed) of the same patient with a deep network that keeps
<b>every vertebra rigid</b> and its volume intact while soft tissue deforms (Jian et al., MICCAI 2022), followed by a
vertebra-wise rigid alignment to the MR (one rigid motion per vertebra, blended smoothly through the discs and soft
tissue) and optional dense refinement.</p>
<p><b>Workflow</b></p>
<ol>
<li><b>Inputs</b>: the CT volume, its vertebra segmentation (one segment per vertebra, e.g. from TotalSegmentator;
a label map volume works too) and the MR volume. Optional: an MR vertebra segmentation (only to report Dice) and
two point lists with the vertebra centres on the CT and on the MR, labelled alike (L1, T12...), for the initial
rigid alignment; without them the alignment is automatic.</li>
<li><b>Options</b>: the rigidity preset (default = four times the paper's training weights, strict = x4, soft = x0.25, or custom weights
for the rigid-field, properness, orthonormality and rigid-Dice terms of the dense refinement), the vertebra
alignment steps (0 = network only), the dense refinement steps and the device (auto uses a GPU when there is one; the device used is shown).</li>
<li><b>Apply</b> runs in the background with a progress bar; the button turns into <b>Cancel</b>, and a cancelled
run leaves the scene as it was. The first Apply checks that PyTorch is installed (Slicer's PyTorch extension)
and offers to install it.</li>
<li><b>Results</b>: a transform node (rigid + grid transform, MR space: apply it to any node, harden or invert it in
the Transforms module), the registered CT shown over the MR (adjust its opacity), the registered segmentation as
outlines coloured by how rigid each vertebra stayed (green = rigid, red = deformed), the det J map (white = volume
kept, blue = compressed, red = expanded, gold = folding) with its legend, and a QA table with one row per vertebra
(rigid DSC, volume change, PC, OC, folding voxels, displacement, DSC/TRE when MR labels or centres exist). Click a row
to centre the views on that vertebra; <i>Show plot</i> charts the figures.</li>
<li><b>Manual correction</b>: add corresponding points (a CT point and the MR point it must reach, same label or same
order), raise or lower the rigidity of chosen vertebrae or exclude one (fracture, cut by the field of view), then
<i>Re-run refinement</i>: it starts from the current result; each vertebra with point pairs on it first moves
rigidly onto them (the others stay exactly where they were), then the refinement steps (0 = none) bend what lies
between. <i>Undo</i> returns to the previous
result.</li>
</ol>
<p>The same engine runs without Slicer: <code>srr-register --help</code>. Sample data: Sample Data module,
category SpineRigidReg.</p>
"""

ACKNOWLEDGEMENT_TEXT = """
Method: B. Jian, M. Azampour, F. De Benetti, J. Oberreuter, C. Bukas, A. Gersing, S. Foreman, A.-S. Dietrich,
J. Rischewski, J. Kirschke, N. Navab, T. Wendler, "Weakly-supervised Biomechanically-constrained CT/MRI Registration
of the Spine", MICCAI 2022. The sample CT and its labels derive from the TotalSegmentator test files (Apache-2.0).
Module layout after the 3D Slicer scripted module template.
"""


def moduleDir() -> Path:
    return Path(__file__).resolve().parent


def resourcesDir() -> Path | None:
    """The extension's top-level Resources folder (models, sample data), in a build tree or an installed extension."""
    override = os.environ.get("SPINERIGIDREG_RESOURCES")
    if override:
        return Path(override)
    for parent in (moduleDir(), *moduleDir().parents[:2]):
        if (parent / "Resources" / "SampleData").is_dir() or (parent / "Resources" / "Models").is_dir():
            return parent / "Resources"
    return None


#
# Module
#


class SpineRigidReg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Spine Rigid Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["SpineRigidReg developers"]
        self.parent.helpText = _(HELP_TEXT)
        self.parent.acknowledgementText = _(ACKNOWLEDGEMENT_TEXT)
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Add the bundled CT/MR case to the Sample Data module (local files; nothing is downloaded)."""
    import SampleData

    resources = resourcesDir()
    folder = resources / "SampleData" if resources else None
    if folder is None or not all((folder / name).is_file() for name, _kind, _node in SAMPLE_CASE):
        logging.debug("SpineRigidReg sample case not found; not registered with Sample Data")
        return
    checksums = []
    for name, _kind, _node in SAMPLE_CASE:  # lets Sample Data refresh its cache when a file changes
        checksums.append("SHA256:" + hashlib.sha256((folder / name).read_bytes()).hexdigest())
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="SpineRigidReg",
        sampleName=SAMPLE_NAME,
        thumbnailFileName=str(moduleDir() / "Resources" / "Icons" / "SpineRigidReg.png"),
        uris=[(folder / name).as_uri() for name, _kind, _node in SAMPLE_CASE],
        fileNames=[f"SpineRigidReg_{name}" for name, _kind, _node in SAMPLE_CASE],
        nodeNames=[node for _file, _kind, node in SAMPLE_CASE],
        loadFileType=[kind for _file, kind, _node in SAMPLE_CASE],
        checksums=checksums,
    )


#
# Parameter node
#


@parameterNodeWrapper
class SpineRigidRegParameterNode:
    """Panel settings, saved with the scene."""

    ctVolume: vtkMRMLScalarVolumeNode
    ctSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007, UP045 (parameterNodeWrapper reads typing.Union)
    mrVolume: vtkMRMLScalarVolumeNode
    mrSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007, UP045 (parameterNodeWrapper reads typing.Union)
    ctCentres: Optional[vtkMRMLMarkupsFiducialNode]  # noqa: UP007, UP045 (parameterNodeWrapper reads typing.Union)
    mrCentres: Optional[vtkMRMLMarkupsFiducialNode]  # noqa: UP007, UP045 (parameterNodeWrapper reads typing.Union)
    # The core's RefineWeights defaults and the core's preset files (SpineRigidRegLib/presets) + "custom": this file
    # imports no core before the dependency check, so they are repeated here, and Testing/module/test_module_files.py
    # checks that they (and the .ui's) equal the core's.
    rigidityPreset: Annotated[str, Choice(["default", "strict", "soft", "custom"])] = "default"
    rigidField: Annotated[float, WithinRange(0.0, 10.0)] = 0.04
    pc: Annotated[float, WithinRange(0.0, 10.0)] = 0.4
    oc: Annotated[float, WithinRange(0.0, 10.0)] = 0.2
    rigidDice: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    vertebraSteps: Annotated[int, WithinRange(0, 500)] = 30
    refineSteps: Annotated[int, WithinRange(0, 500)] = 0
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    foregroundOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    ctCorrectionPoints: Optional[vtkMRMLMarkupsFiducialNode]  # noqa: UP007, UP045 (parameterNodeWrapper reads typing.Union)
    mrCorrectionPoints: Optional[vtkMRMLMarkupsFiducialNode]  # noqa: UP007, UP045 (parameterNodeWrapper reads typing.Union)
    correctionSteps: Annotated[int, WithinRange(0, 500)] = 30
    #: JSON {vertebra name: rigidity weight}; 0 excludes. Edited through the vertebra table.
    vertebraWeights: str = "{}"


#
# Background run
#


class BackgroundRun:
    """Runs ``function(progress, shouldCancel)`` on a Python thread; the GUI polls it from a QTimer.

    Only the core's computation runs on the thread; MRML and Qt stay on the main thread.
    """

    def __init__(self, function):
        self._function = function
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self.fraction = 0.0
        self.message = ""
        self.result = None
        self.error = None
        self.details = ""
        self.done = False
        self.thread = threading.Thread(target=self._main, name="SpineRigidReg", daemon=True)

    def start(self):
        self.thread.start()

    def progress(self, fraction, message):
        with self._lock:
            self.fraction, self.message = float(fraction), str(message)

    def status(self):
        with self._lock:
            return self.fraction, self.message

    def shouldCancel(self):
        return self._cancel.is_set()

    def cancel(self):
        self._cancel.set()

    def _main(self):
        try:
            self.result = self._function(self.progress, self.shouldCancel)
        except BaseException as error:  # reported on the main thread
            self.error = error
            self.details = traceback.format_exc()
        finally:
            self.done = True


#
# Widget
#


class SpineRigidRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobKind = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SpineRigidReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SpineRigidRegLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.refineButton.connect("clicked(bool)", self.onRefineButton)
        self.ui.undoButton.connect("clicked(bool)", self.onUndoButton)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.showJacobianCheckBox.connect("toggled(bool)", self.onShowJacobian)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.qaTableView.connect("clicked(QModelIndex)", self.onTableClicked)
        self.ui.ctSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateVertebraTable)
        self.ui.ctPointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.ctPointsPlaceWidget.setCurrentNode)
        self.ui.mrPointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.mrPointsPlaceWidget.setCurrentNode)
        self.ui.rigidityPresetComboBox.connect("currentIndexChanged(int)", self.onPresetChanged)
        self.ui.vertebraTable.setColumnCount(3)
        self.ui.vertebraTable.horizontalHeader().setStretchLastSection(True)

        self.initializeParameterNode()
        self.updateGUIFromResults()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        self.removeObservers()
        if self._timer is not None:
            self._timer.stop()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self.logic.resetResults()
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.updateGUIFromResults()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.ctVolume:
            self._parameterNode.ctVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()
            self.updateVertebraTable()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._job is not None
        ready = bool(p and p.ctVolume and p.ctSegmentation and p.mrVolume)
        if running:
            return
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = (
            _("Register the CT onto the MR; turns into Cancel while running.")
            if ready
            else _("Select the CT volume, its vertebra segmentation and the MR volume.")
        )
        self.ui.customWeightsGroupBox.enabled = bool(p and p.rigidityPreset == "custom")

    def onPresetChanged(self, index=None) -> None:
        if self._parameterNode and self._parameterNode.rigidityPreset == "custom":
            self.ui.customWeightsGroupBox.collapsed = False
        self._checkCanApply()

    # ------------------------------------------------------------------------------------ vertebra table

    def _storedWeights(self) -> dict:
        try:
            return {str(k): float(v) for k, v in json.loads(self._parameterNode.vertebraWeights or "{}").items()}
        except (ValueError, AttributeError):
            return {}

    def _vertebraNames(self) -> list:
        """Vertebra names of the CT segmentation (segment names; for a label map, from the last result)."""
        node = self._parameterNode.ctSegmentation if self._parameterNode else None
        if node is None:
            return []
        if node.IsA("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        return self.logic.resultVertebraNames()

    def updateVertebraTable(self, node=None) -> None:
        if not self._parameterNode:
            return
        table = self.ui.vertebraTable
        weights = self._storedWeights()
        names = self._vertebraNames()
        table.blockSignals(True)
        table.clearContents()
        table.setRowCount(len(names))
        table.setHorizontalHeaderLabels([_("Vertebra"), _("Rigidity weight"), _("Exclude")])
        for row, name in enumerate(names):
            item = qt.QTableWidgetItem(name)
            item.setFlags(qt.Qt.ItemIsEnabled)
            table.setItem(row, 0, item)
            spin = qt.QDoubleSpinBox()
            spin.setRange(0.0, 20.0)
            spin.setSingleStep(0.25)
            spin.setValue(weights.get(name, 1.0) or 1.0)
            spin.connect("valueChanged(double)", self.onVertebraWeightsEdited)
            table.setCellWidget(row, 1, spin)
            check = qt.QCheckBox()
            check.checked = weights.get(name, 1.0) == 0.0
            check.connect("toggled(bool)", self.onVertebraWeightsEdited)
            table.setCellWidget(row, 2, check)
        table.blockSignals(False)

    def vertebraWeights(self) -> dict:
        """{vertebra name: weight} from the table (0 for excluded vertebrae, entries of 1 left out)."""
        out = {}
        table = self.ui.vertebraTable
        for row in range(table.rowCount):
            name = table.item(row, 0).text()
            weight = 0.0 if table.cellWidget(row, 2).checked else float(table.cellWidget(row, 1).value)
            table.cellWidget(row, 1).enabled = not table.cellWidget(row, 2).checked
            if weight != 1.0:
                out[name] = weight
        return out

    def onVertebraWeightsEdited(self, *args) -> None:
        if self._parameterNode:
            self._parameterNode.vertebraWeights = json.dumps(self.vertebraWeights())

    # ------------------------------------------------------------------------------------------- running

    def onApplyButton(self) -> None:
        if self._job is not None:
            self.cancelJob()
            return
        if not ensureDependencies():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("The registration could not start."), waitCursor=True):
            inputs = self.logic.prepareInputs(
                p.ctVolume, p.ctSegmentation, p.mrVolume, p.mrSegmentation, p.ctCentres, p.mrCentres
            )
            settings = self.logic.settingsFromParameters(p, inputs, self.vertebraWeights())
            self.startJob(
                "register",
                lambda progress, cancel: self.logic.compute(inputs, settings, progress=progress, shouldCancel=cancel),
            )

    def onRefineButton(self) -> None:
        if self._job is not None or not ensureDependencies():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("The refinement could not start."), waitCursor=True):
            inputs, settings, pairs, velocity = self.logic.refinementRequest(
                p.ctCorrectionPoints, p.mrCorrectionPoints, self.vertebraWeights(), p.correctionSteps
            )
            self.startJob(
                "refine",
                lambda progress, cancel: self.logic.compute(
                    inputs, settings, pairs, velocity, progress=progress, shouldCancel=cancel
                ),
            )

    def onUndoButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            self.logic.undo()
        self.updateGUIFromResults()

    def startJob(self, kind, function) -> None:
        self._job = BackgroundRun(function)
        self._jobKind = kind
        self.ui.applyButton.text = _("Cancel")
        self.ui.applyButton.enabled = True
        self.ui.refineButton.enabled = False
        self.ui.undoButton.enabled = False
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = True
        self.ui.statusLabel.text = _("Starting...")
        self._job.start()
        self._timer.start()

    def cancelJob(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.applyButton.text = _("Cancelling...")
            self.ui.applyButton.enabled = False

    def onPoll(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        fraction, message = job.status()
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        if not job.done:
            return
        self._timer.stop()
        self._job = None
        self.ui.applyButton.text = _("Apply")
        self.ui.progressBar.visible = False
        self._checkCanApply()
        if job.error is not None:
            self.reportError(job.error, job.details)
        elif job.shouldCancel():  # cancelled after the computation ended: still nothing is added
            self.ui.statusLabel.text = _("Cancelled; the scene is unchanged.")
        else:
            with slicer.util.tryWithErrorDisplay(_("The result could not be shown."), waitCursor=True):
                self.logic.commit(job.result, updateViews=self._jobKind == "register")
                self.logic.showForeground(
                    jacobian=self.ui.showJacobianCheckBox.checked, opacity=self._parameterNode.foregroundOpacity
                )
                if self._jobKind == "register":
                    slicer.util.resetSliceViews()
                self.ui.statusLabel.text = _("Done: ") + self.logic.summaryText()
        self.updateGUIFromResults()

    def reportError(self, error, details) -> None:
        from SpineRigidRegLib.errors import CancelledError, InputError

        if isinstance(error, CancelledError):
            self.ui.statusLabel.text = _("Cancelled; the scene is unchanged.")
            return
        if isinstance(error, InputError):
            self.ui.statusLabel.text = str(error)
            slicer.util.errorDisplay(_("The registration cannot run: ") + str(error))
            return
        logging.error(details)
        self.ui.statusLabel.text = _("Failed: ") + str(error)
        slicer.util.errorDisplay(_("The registration failed: ") + str(error), detailedText=details)

    # -------------------------------------------------------------------------------------------- results

    def updateGUIFromResults(self) -> None:
        outputs = self.logic.outputs if self.logic else None
        hasResult = outputs is not None
        self.ui.refineButton.enabled = hasResult and self._job is None
        self.ui.undoButton.enabled = bool(self.logic and self.logic.canUndo()) and self._job is None
        self.ui.showPlotButton.enabled = hasResult
        self.ui.resultsCollapsibleButton.enabled = hasResult
        self.ui.qaTableView.setMRMLTableNode(slicer.mrmlScene.GetNodeByID(outputs.table) if hasResult else None)
        self.ui.summaryLabel.text = self.logic.summaryText() if hasResult else ""
        device = self.logic.resultDevice() if hasResult else None
        self.ui.deviceLabel.text = _("used: ") + (device or "-")
        node = self._parameterNode.ctSegmentation if self._parameterNode else None
        if node is not None and not node.IsA("vtkMRMLSegmentationNode"):
            self.updateVertebraTable()

    def onShowPlot(self) -> None:
        if self.logic.outputs is not None:
            slicer.modules.plots.logic().ShowChartInLayout(slicer.mrmlScene.GetNodeByID(self.logic.outputs.chart))

    def onShowJacobian(self, checked) -> None:
        self.logic.showForeground(jacobian=checked, opacity=self._parameterNode.foregroundOpacity)

    def onOpacityChanged(self, value) -> None:
        if self.logic and self.logic.outputs is not None:
            self.logic.showForeground(jacobian=self.ui.showJacobianCheckBox.checked, opacity=value)

    def onTableClicked(self, index) -> None:
        self.logic.centreOnRow(index.row())


def ensureDependencies() -> bool:
    """Make sure torch is importable, offering Slicer's PyTorch extension install with consent (on Apply only)."""
    if importlib.util.find_spec("torch") is not None:
        return True
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay(
            _(
                "SpineRigidReg needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, restart "
                "Slicer and press Apply again."
            )
        )
        return False
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if torchLogic.torchInstalled():
        return True
    if not slicer.util.confirmOkCancelDisplay(
        _(
            "SpineRigidReg needs PyTorch, which is not installed yet. Install it now through the PyTorch extension? "
            "This downloads about 1-3 GB and can take several minutes."
        )
    ):
        return False
    with slicer.util.tryWithErrorDisplay(_("PyTorch could not be installed."), waitCursor=True):
        if torchLogic.installTorch(askConfirmation=False) is not None:
            return True
    return False


#
# Logic
#


class SpineRigidRegLogic(ScriptedLoadableModuleLogic):
    """The module logic: the parameter node, plus the MRML logic (``SpineRigidRegLogic`` package), imported on
    first use because it needs torch."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._mrml = None

    def getParameterNode(self):
        return SpineRigidRegParameterNode(super().getParameterNode())

    @property
    def mrml(self):
        if self._mrml is None:
            from SpineRigidRegLogic import SpineRigidRegLogic as MRMLLogic

            self._mrml = MRMLLogic()
        return self._mrml

    # Results exist only after a run, so these need no torch before it.
    @property
    def outputs(self):
        return self._mrml.outputs if self._mrml is not None else None

    @property
    def history(self):
        return self._mrml.history if self._mrml is not None else []

    def canUndo(self) -> bool:
        return self._mrml is not None and self._mrml.canUndo()

    def summaryText(self) -> str:
        return self._mrml.summaryText() if self._mrml is not None else ""

    def resultVertebraNames(self) -> list:
        return self._mrml.resultVertebraNames() if self._mrml is not None else []

    def resultDevice(self):
        return self._mrml.resultDevice() if self._mrml is not None else None

    def resetResults(self) -> None:
        if self._mrml is not None:
            self._mrml.history.clear()
            self._mrml.outputs = None

    def prepareInputs(self, *nodes):
        return self.mrml.prepareInputs(*nodes)

    def settingsFromParameters(self, parameters, inputs, weightsByName):
        from SpineRigidRegLogic import makeSettings

        weights = None
        if parameters.rigidityPreset == "custom":
            weights = {
                "rigid_field": parameters.rigidField,
                "pc": parameters.pc,
                "oc": parameters.oc,
                "rigid_dice": parameters.rigidDice,
            }
        return makeSettings(
            parameters.rigidityPreset,
            parameters.refineSteps,
            parameters.device,
            weights=weights,
            vertebraWeights=self.mrml.labelWeights(inputs, weightsByName),
            vertebraSteps=parameters.vertebraSteps,
        )

    def compute(self, *args, **kwargs):
        return self.mrml.compute(*args, **kwargs)

    def refinementRequest(self, *args, **kwargs):
        return self.mrml.refinementRequest(*args, **kwargs)

    def commit(self, run, updateViews=True):
        return self.mrml.commit(run, updateViews=updateViews)

    def undo(self):
        return self.mrml.undo()

    def centreOnRow(self, row: int) -> bool:
        return self._mrml is not None and self._mrml.centreOnRow(row)

    def showForeground(self, jacobian: bool, opacity: float) -> None:
        if self._mrml is not None:
            self._mrml.showForeground(jacobian=jacobian, opacity=opacity)

    def process(self, ctVolume, ctSegmentation, mrVolume, **kwargs):
        """Register without the GUI (scripts): see ``SpineRigidRegLogic.SpineRigidRegLogic.run``."""
        return self.mrml.run(ctVolume, ctSegmentation, mrVolume, **kwargs)


#
# Test
#


class SpineRigidRegTest(ScriptedLoadableModuleTest):
    """The whole workflow on the bundled sample case, inside Slicer (run from the Reload & Test button)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SpineRigidReg_workflow()

    def test_SpineRigidReg_workflow(self):
        self.delayDisplay("Loading the sample case")
        self.assertTrue(ensureDependencies(), "PyTorch is needed for this test")
        import SampleData
        import SimpleITK as sitk
        from SpineRigidRegLib.errors import CancelledError

        registerSampleData()
        loaded = SampleData.downloadSample(SAMPLE_NAME)
        nodes = {node.GetName(): node for node in (loaded if isinstance(loaded, list) else [loaded])}
        ct, ctSeg, mr, mrSeg, ctCentres, mrCentres = (nodes.get(name) for _file, _kind, name in SAMPLE_CASE)
        self.assertIsNotNone(ct)
        self.assertIsNotNone(mr)
        self.assertIsNotNone(ctSeg)

        logic = SpineRigidRegLogic()
        from SpineRigidRegLogic import makeSettings

        settings = makeSettings(refineSteps=5)
        before = slicer.mrmlScene.GetNumberOfNodes()
        ctArray = slicer.util.arrayFromVolume(ct).copy()

        self.delayDisplay("A cancelled run leaves no node")
        with self.assertRaises(CancelledError):
            logic.process(ct, ctSeg, mr, settings=settings, shouldCancel=lambda: True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

        self.delayDisplay("Registering")
        outputs = logic.process(
            ct, ctSeg, mr, mrSegmentation=mrSeg, ctLandmarks=ctCentres, mrLandmarks=mrCentres, settings=settings
        )
        self.assertTrue((slicer.util.arrayFromVolume(ct) == ctArray).all(), "the CT input was modified")
        for nodeId in outputs.all():
            self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(nodeId))
        table = slicer.mrmlScene.GetNodeByID(outputs.table)
        self.assertGreaterEqual(table.GetNumberOfRows(), 2)
        result = logic.history[-1].result
        for row in result.vertebrae:
            self.assertGreater(row["rigid_dice"], 0.8, f"vertebra {row['name']} lost its shape")
        warped = slicer.mrmlScene.GetNodeByID(outputs.warpedVolume)
        self.assertEqual(warped.GetImageData().GetDimensions(), mr.GetImageData().GetDimensions())
        transform = slicer.mrmlScene.GetNodeByID(outputs.transform)
        ijkToRas = vtk.vtkMatrix4x4()
        mr.GetIJKToRASMatrix(ijkToRas)
        centre = ijkToRas.MultiplyPoint([*[(d - 1) / 2 for d in mr.GetImageData().GetDimensions()], 1])[:3]
        mapped = transform.GetTransformFromParent().TransformPoint(centre)
        lps = [-centre[0], -centre[1], centre[2]]
        expected = result.transform.TransformPoint(lps)
        self.assertLess(max(abs(a - b) for a, b in zip([-mapped[0], -mapped[1], mapped[2]], expected)), 0.5)

        self.delayDisplay("Manual correction and undo")
        firstJacobian = sitk.GetArrayFromImage(result.jacobian).copy()
        name = result.vertebrae[0]["name"]
        logic.mrml.refine(vertebraWeights={name: 0.0}, refineSteps=3)
        self.assertTrue(logic.canUndo())
        logic.undo()
        jacobian = slicer.mrmlScene.GetNodeByID(outputs.jacobianVolume)
        self.assertTrue((slicer.util.arrayFromVolume(jacobian) == firstJacobian).all())

        self.delayDisplay("Panel")
        widget = slicer.modules.spinerigidreg.widgetRepresentation().self()
        widget.ui.qaTableView.setMRMLTableNode(table)
        self.assertTrue(logic.centreOnRow(0))
        self.delayDisplay("SpineRigidReg workflow passed")

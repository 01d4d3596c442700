"""The module's logic: inputs from MRML nodes, the core pipeline, outputs as MRML nodes, corrections and undo.

A registration has three steps so that the GUI can run the middle one off the main thread:

1. :meth:`SpineRigidRegLogic.prepareInputs` reads the nodes (main thread; MRML is not thread-safe);
2. :meth:`SpineRigidRegLogic.compute` runs :func:`SpineRigidRegLib.pipeline.register` (any thread; no MRML);
3. :meth:`SpineRigidRegLogic.commit` creates or updates the output nodes (main thread).

:meth:`SpineRigidRegLogic.run` does the three in a row (scripts, tests). A cancelled or failed step 2 creates no
node; step 3 removes what it created if it fails half-way. Input nodes are only read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import slicer
import torch
from SpineRigidRegLib.choices import CUSTOM, label_weights, make_settings, preset_names, update_settings
from SpineRigidRegLib.data.vertebrae import label_names
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.geometry import lps_points_to_ras
from SpineRigidRegLib.network import RegistrationNet
from SpineRigidRegLib.pipeline import NetworkCache, RegistrationResult, RegistrationSettings, register, resolve_network
from SpineRigidRegLib.prealign import label_centroids

from . import nodes, outputs

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]
CancelCallback = Callable[[], bool]

#: The panel's rigidity presets: the core's preset files (``SpineRigidRegLib/presets``) and "custom".
RIGIDITY_PRESETS: tuple[str, ...] = (*preset_names(), CUSTOM)
#: Results kept for undo.
HISTORY_LENGTH = 10


@dataclass
class RegistrationInputs:
    """What the core needs, read from the nodes (SimpleITK images in LPS, points in LPS mm)."""

    fixed: sitk.Image
    moving: sitk.Image
    movingLabels: sitk.Image
    labelNames: dict[int, str]
    fixedLabels: sitk.Image | None = None
    fixedLandmarks: dict[str, np.ndarray] | None = None
    movingLandmarks: dict[str, np.ndarray] | None = None
    nodeIds: dict[str, str] = field(default_factory=dict)
    nodeNames: dict[str, str] = field(default_factory=dict)
    #: Other names of a label (the segment names as the user sees them, e.g. "Segment_31"), upper case.
    aliases: dict[str, int] = field(default_factory=dict)


@dataclass
class RegistrationRun:
    """One result with what produced it (an entry of the undo history)."""

    inputs: RegistrationInputs
    settings: RegistrationSettings
    result: RegistrationResult
    pointPairs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


@dataclass
class OutputNodes:
    """IDs of the output nodes of the current result."""

    transform: str
    warpedVolume: str
    warpedSegmentation: str
    jacobianVolume: str
    jacobianColors: str
    table: str
    chart: str
    series: list[str]
    mrVertebrae: str | None = None

    def all(self) -> list[str]:
        return [
            self.transform,
            self.warpedVolume,
            self.warpedSegmentation,
            self.jacobianVolume,
            self.jacobianColors,
            self.table,
            self.chart,
            *self.series,
            *([self.mrVertebrae] if self.mrVertebrae else []),
        ]


def makeSettings(
    preset: str = "default",
    refineSteps: int = 0,
    device: str = "auto",
    weights: Mapping[str, float] | None = None,
    vertebraWeights: Mapping[int, float] | None = None,
    modelPath: str | None = None,
    vertebraSteps: int | None = None,
) -> RegistrationSettings:
    """Core settings from the panel's choices (:func:`SpineRigidRegLib.choices.make_settings` in Slicer's names).

    Args:
        preset: A :data:`RIGIDITY_PRESETS` name (a core preset file, or ``"custom"``: the default with ``weights``).
        refineSteps: Test-time refinement steps.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        weights: For ``"custom"`` (or to override a preset): ``rigid_field``, ``pc``, ``oc``, ``rigid_dice``.
        vertebraWeights: Label -> multiplier of the rigidity terms (0 excludes the vertebra).
        modelPath: A checkpoint instead of the bundled model.
        vertebraSteps: Steps of the vertebra-wise rigid alignment after the network (``None``: the core's default;
            0 = off).
    """
    return make_settings(
        preset,
        device=device,
        model_path=modelPath or None,
        refine_steps=refineSteps,
        vertebra_steps=vertebraSteps,
        rigidity=weights,
        vertebra_weights=vertebraWeights or {},
    )


class SpineRigidRegLogic:
    """MRML side of the module; usable without the GUI (``slicer.mrmlScene`` or any ``vtkMRMLScene``).

    Attributes:
        network: A network to use instead of loading ``settings.model_path`` or the bundled model (tests inject a
            tiny one).
        history: Results, oldest first; the last one is shown by the output nodes.
        outputs: The output nodes of the current result, or None.
    """

    def __init__(self, scene: slicer.vtkMRMLScene | None = None) -> None:
        self._scene = scene
        self.network: RegistrationNet | None = None
        self._networkCache = NetworkCache()
        self.history: list[RegistrationRun] = []
        self.outputs: OutputNodes | None = None

    @property
    def scene(self) -> slicer.vtkMRMLScene:
        scene = self._scene if self._scene is not None else slicer.mrmlScene
        if scene is None:
            raise RuntimeError("no MRML scene: pass one to SpineRigidRegLogic(scene) or set slicer.mrmlScene")
        return scene

    # ------------------------------------------------------------------------------------------- inputs

    def prepareInputs(
        self,
        ctVolume: slicer.vtkMRMLScalarVolumeNode,
        ctSegmentation: slicer.vtkMRMLNode,
        mrVolume: slicer.vtkMRMLScalarVolumeNode,
        mrSegmentation: slicer.vtkMRMLNode | None = None,
        ctLandmarks: slicer.vtkMRMLMarkupsNode | None = None,
        mrLandmarks: slicer.vtkMRMLMarkupsNode | None = None,
    ) -> RegistrationInputs:
        """Read the input nodes (main thread). Nothing is modified.

        Raises:
            InputError: A missing input or one that cannot be used, named in plain words.
        """
        if ctVolume is None or mrVolume is None or ctSegmentation is None:
            missing = [
                name
                for name, node in (
                    ("CT volume", ctVolume),
                    ("CT vertebra segmentation", ctSegmentation),
                    ("MR volume", mrVolume),
                )
                if node is None
            ]
            raise InputError(f"select the {', '.join(missing)}")
        if ctVolume is mrVolume:
            raise InputError("the CT and the MR are the same volume; select two different volumes")
        moving = nodes.volumeToImage(ctVolume, "CT volume")
        fixed = nodes.volumeToImage(mrVolume, "MR volume")
        labels, segmentNames = nodes.segmentationToLabelImage(ctSegmentation, ctVolume, "CT vertebra segmentation")
        names = _completeNames(labels, segmentNames)
        fixedLabels = None
        if mrSegmentation is not None:
            fixedLabels, mrNames = nodes.segmentationToLabelImage(mrSegmentation, mrVolume, "MR vertebra segmentation")
            fixedLabels = _matchLabelsByName(fixedLabels, _completeNames(fixedLabels, mrNames), names)
        ctPoints = nodes.markupsToPoints(ctLandmarks, "CT vertebra centres")
        mrPoints = nodes.markupsToPoints(mrLandmarks, "MR vertebra centres")
        if bool(ctPoints) != bool(mrPoints) and ctLandmarks is not None and mrLandmarks is not None:
            raise InputError("one vertebra centre list is empty; fill both or leave both unset")
        nodeIds = {"ct": ctVolume.GetID(), "ctSegmentation": ctSegmentation.GetID(), "mr": mrVolume.GetID()}
        return RegistrationInputs(
            fixed=fixed,
            moving=moving,
            movingLabels=labels,
            labelNames=names,
            fixedLabels=fixedLabels,
            fixedLandmarks=mrPoints or None,
            movingLandmarks=ctPoints or None,
            nodeIds=nodeIds,
            nodeNames={"ct": ctVolume.GetName(), "mr": mrVolume.GetName(), "ctSegmentation": ctSegmentation.GetName()},
            aliases={name.upper(): value for value, name in segmentNames.items()},
        )

    def vertebrae(self, segmentationNode: slicer.vtkMRMLNode, referenceVolume=None) -> list[tuple[int, str]]:
        """``(label, name)`` of every vertebra of a segmentation node or label map, for the weights table."""
        if segmentationNode is None:
            return []
        if segmentationNode.IsA("vtkMRMLSegmentationNode"):
            _, names = nodes.segmentLabelValues(segmentationNode)
            return sorted(names.items())
        image = nodes.volumeToImage(segmentationNode, "vertebra label map")
        return sorted(_completeNames(image, {}).items())

    @staticmethod
    def labelWeights(inputs: RegistrationInputs, weights: Mapping[int | str, float] | None) -> dict[int, float]:
        """Per-vertebra rigidity multipliers keyed by label value, from keys that are labels or vertebra names.

        Raises:
            InputError: A name that is not a vertebra of the CT segmentation.
        """
        return label_weights(weights, inputs.labelNames, inputs.aliases)

    # ------------------------------------------------------------------------------------------ compute

    def loadNetwork(self, settings: RegistrationSettings) -> RegistrationNet:
        """The network for ``settings`` (injected, cached, or loaded once per model and device)."""
        if self.network is not None:
            return resolve_network(settings, self.network)
        return self._networkCache.get(settings)

    def compute(
        self,
        inputs: RegistrationInputs,
        settings: RegistrationSettings,
        pointPairs: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
        initialVelocity: torch.Tensor | None = None,
        progress: ProgressCallback | None = None,
        shouldCancel: CancelCallback | None = None,
    ) -> RegistrationRun:
        """Run the core pipeline (safe off the main thread: touches no MRML node).

        Raises:
            CancelledError: ``shouldCancel`` returned True.
            InputError: The core refused the inputs (message in plain words).
        """
        if progress:
            progress(0.0, "loading the network")
        network = self.loadNetwork(settings)
        result = register(
            inputs.fixed,
            inputs.moving,
            inputs.movingLabels,
            fixed_labels=inputs.fixedLabels,
            fixed_landmarks=inputs.fixedLandmarks,
            moving_landmarks=inputs.movingLandmarks,
            settings=settings,
            network=network,
            initial_velocity=initialVelocity,
            point_pairs=list(pointPairs) if pointPairs else None,
            progress=progress,
            should_cancel=shouldCancel,
        )
        for row in result.vertebrae:
            row["name"] = nodes.displayName(row["label"], inputs.labelNames, str(row.get("name", row["label"])))
        return RegistrationRun(inputs, settings, result, list(pointPairs or []))

    def refinementRequest(
        self,
        ctPoints: slicer.vtkMRMLMarkupsNode | None = None,
        mrPoints: slicer.vtkMRMLMarkupsNode | None = None,
        vertebraWeights: Mapping[int | str, float] | None = None,
        refineSteps: int | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> tuple[RegistrationInputs, RegistrationSettings, list, torch.Tensor]:
        """What :meth:`compute` needs to re-run the refinement from the current result (main thread): with point
        pairs the vertebra-wise rigid stage runs again and moves each vertebra rigidly onto the pairs on it, then
        ``refineSteps`` dense steps (0 = none) bend what lies between.

        Returns:
            ``(inputs, settings, point pairs, initial velocity)``.

        Raises:
            InputError: There is no result yet, or the point lists do not pair up.
        """
        if not self.history:
            raise InputError("run a registration first; corrections refine the current result")
        current = self.history[-1]
        pairs = nodes.pointPairs(ctPoints, mrPoints)
        byLabel = None if vertebraWeights is None else self.labelWeights(current.inputs, vertebraWeights)
        settings = update_settings(
            current.settings, refine_steps=refineSteps, rigidity=weights, vertebra_weights=byLabel
        )
        if settings.refine_steps < 1 and not pairs:
            raise InputError("place CT/MR point pairs or set at least one refinement step to re-run the refinement")
        return current.inputs, settings, pairs, current.result.velocity

    # ---------------------------------------------------------------------------------------------- outputs

    def commit(self, run: RegistrationRun, updateViews: bool = True) -> OutputNodes:
        """Show ``run`` in the output nodes (created on the first result, updated afterwards) and add it to
        the history (main thread)."""
        self.outputs = self.showResult(run, self.outputs if self._outputsExist() else None)
        self.history.append(run)
        del self.history[:-HISTORY_LENGTH]
        if updateViews:
            outputs.setupFusionViews(
                self.scene,
                run.inputs.nodeIds.get("mr", ""),
                self.outputs.warpedVolume,
                0.5,
                self.scene.GetNodeByID(self.outputs.warpedSegmentation),
            )
        return self.outputs

    def run(
        self,
        ctVolume: slicer.vtkMRMLScalarVolumeNode,
        ctSegmentation: slicer.vtkMRMLNode,
        mrVolume: slicer.vtkMRMLScalarVolumeNode,
        mrSegmentation: slicer.vtkMRMLNode | None = None,
        ctLandmarks: slicer.vtkMRMLMarkupsNode | None = None,
        mrLandmarks: slicer.vtkMRMLMarkupsNode | None = None,
        settings: RegistrationSettings | None = None,
        progress: ProgressCallback | None = None,
        shouldCancel: CancelCallback | None = None,
    ) -> OutputNodes:
        """Register and show the result, all on the calling thread (scripts and tests)."""
        inputs = self.prepareInputs(ctVolume, ctSegmentation, mrVolume, mrSegmentation, ctLandmarks, mrLandmarks)
        run = self.compute(inputs, settings or makeSettings(), progress=progress, shouldCancel=shouldCancel)
        if shouldCancel is not None and shouldCancel():
            from SpineRigidRegLib.errors import CancelledError

            raise CancelledError("registration cancelled")
        return self.commit(run)

    def refine(
        self,
        ctPoints: slicer.vtkMRMLMarkupsNode | None = None,
        mrPoints: slicer.vtkMRMLMarkupsNode | None = None,
        vertebraWeights: Mapping[int | str, float] | None = None,
        refineSteps: int | None = None,
        progress: ProgressCallback | None = None,
        shouldCancel: CancelCallback | None = None,
    ) -> OutputNodes:
        """Re-run the refinement from the current result with corrections, on the calling thread."""
        inputs, settings, pairs, velocity = self.refinementRequest(ctPoints, mrPoints, vertebraWeights, refineSteps)
        run = self.compute(inputs, settings, pairs, velocity, progress=progress, shouldCancel=shouldCancel)
        return self.commit(run, updateViews=False)

    def canUndo(self) -> bool:
        return len(self.history) > 1

    def undo(self) -> OutputNodes:
        """Go back to the previous result (the output nodes show it again)."""
        if not self.canUndo():
            raise InputError("nothing to undo")
        self.history.pop()
        self.outputs = self.showResult(self.history[-1], self.outputs if self._outputsExist() else None)
        return self.outputs

    def _outputsExist(self) -> bool:
        return self.outputs is not None and all(self.scene.GetNodeByID(i) is not None for i in self.outputs.all())

    def showResult(self, run: RegistrationRun, existing: OutputNodes | None = None) -> OutputNodes:
        """Fill output nodes with ``run``'s result: new nodes when ``existing`` is None (all removed again if
        anything fails), else the existing ones."""
        scene = self.scene
        before = self._nodeIds()
        scene.StartState(scene.BatchProcessState)
        try:
            shown = self._fillOutputs(run, existing)
        except Exception:
            self._removeNodesAddedSince(before)
            raise
        finally:
            scene.EndState(scene.BatchProcessState)
        return shown

    def _fillOutputs(self, run: RegistrationRun, existing: OutputNodes | None) -> OutputNodes:
        """Create (``existing`` None) or update every output node, in a fixed order; their IDs."""
        result = run.result
        ct = run.inputs.nodeNames.get("ct", "CT")
        mr = run.inputs.nodeNames.get("mr", "MR")
        transformNode = self._showTransform(result, existing and existing.transform, f"{ct} to {mr} transform")
        warped = self._showWarpedVolume(result, existing and existing.warpedVolume, f"{ct} registered")
        segmentation = self._showWarpedSegmentation(
            run, existing and existing.warpedSegmentation, f"{ct} vertebrae registered"
        )
        colorNode, jacobian = self._showJacobian(result, existing, f"{ct} to {mr} det J")
        table, chart, series = self._showRigidityTable(result, existing, f"{ct} to {mr}")
        mrVertebrae = None
        if result.mr_vertebrae is not None:
            mrVertebrae = self._showMrVertebrae(run, existing and existing.mrVertebrae, f"{mr} vertebrae (predicted)")
        return OutputNodes(
            transform=transformNode.GetID(),
            warpedVolume=warped.GetID(),
            warpedSegmentation=segmentation.GetID(),
            jacobianVolume=jacobian.GetID(),
            jacobianColors=colorNode.GetID(),
            table=table.GetID(),
            chart=chart.GetID(),
            series=[s.GetID() for s in series],
            mrVertebrae=mrVertebrae.GetID() if mrVertebrae is not None else None,
        )

    def _outputNode(self, nodeId: str | None, className: str, name: str) -> slicer.vtkMRMLNode:
        """The node ``nodeId``, or without an ID a new ``className`` node named ``name`` (made unique)."""
        scene = self.scene
        if nodeId is not None:
            return scene.GetNodeByID(nodeId)
        return scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))

    def _mrNode(self, run: RegistrationRun) -> slicer.vtkMRMLNode | None:
        """The input MR volume node of ``run``, if it is still in the scene."""
        return self.scene.GetNodeByID(run.inputs.nodeIds.get("mr", ""))

    def _showTransform(self, result: RegistrationResult, nodeId: str | None, name: str) -> slicer.vtkMRMLTransformNode:
        """The transform node: pre-alignment and displacement as one MR-to-CT transform."""
        transformNode = self._outputNode(nodeId, "vtkMRMLTransformNode", name)
        composite = nodes.compositeTransform(result.prealign, result.displacement)
        transformNode.SetAndObserveTransformFromParent(composite)
        transformNode.SetAttribute("SpineRigidReg.Role", "Transform")
        transformNode.SetDescription("MR (world) point -> CT point: put the CT under this transform to align it")
        return transformNode

    def _showWarpedVolume(
        self, result: RegistrationResult, nodeId: str | None, name: str
    ) -> slicer.vtkMRMLScalarVolumeNode:
        """The registered CT on the MR's grid."""
        warped = self._outputNode(nodeId, "vtkMRMLScalarVolumeNode", name)
        nodes.updateVolumeFromImage(warped, result.warped_moving)
        if warped.GetDisplayNode() is None:
            warped.CreateDefaultDisplayNodes()
        return warped

    def _showWarpedSegmentation(
        self, run: RegistrationRun, nodeId: str | None, name: str
    ) -> slicer.vtkMRMLSegmentationNode:
        """The registered CT vertebrae, one segment each, coloured by their rigidity (rigid DSC)."""
        result = run.result
        segmentation = self._outputNode(nodeId, "vtkMRMLSegmentationNode", name)
        if segmentation.GetDisplayNode() is None:
            segmentation.CreateDefaultDisplayNodes()
        names = {int(r["label"]): str(r["name"]) for r in result.vertebrae}
        names.update({k: v for k, v in run.inputs.labelNames.items() if k not in names})
        colors = {int(r["label"]): outputs.rigidityColor(r.get("rigid_dice")) for r in result.vertebrae}
        nodes.updateSegmentationFromLabelImage(segmentation, result.warped_labels, names, colors)
        mrNode = self._mrNode(run)
        if mrNode is not None:
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(mrNode)
        return segmentation

    def _showJacobian(
        self, result: RegistrationResult, existing: OutputNodes | None, name: str
    ) -> tuple[slicer.vtkMRMLColorTableNode, slicer.vtkMRMLScalarVolumeNode]:
        """The det J map and its colour table: ``(colour node, det J volume)``."""
        colorNode = self._outputNode(
            existing and existing.jacobianColors, "vtkMRMLColorTableNode", "SpineRigidReg det J colours"
        )
        outputs.fillJacobianColorTable(colorNode)
        jacobian = self._outputNode(existing and existing.jacobianVolume, "vtkMRMLScalarVolumeNode", name)
        nodes.updateVolumeFromImage(jacobian, result.jacobian)
        outputs.showJacobian(jacobian, colorNode)
        return colorNode, jacobian

    def _showRigidityTable(
        self, result: RegistrationResult, existing: OutputNodes | None, prefix: str
    ) -> tuple[slicer.vtkMRMLTableNode, slicer.vtkMRMLPlotChartNode, list[slicer.vtkMRMLPlotSeriesNode]]:
        """The per-vertebra QA table and its plot: ``(table, chart, one series per PLOT_SERIES)``."""
        table = self._outputNode(existing and existing.table, "vtkMRMLTableNode", f"{prefix} rigidity QA")
        outputs.fillTable(table, result.vertebrae, self.vertebraCentres(result))
        chart = self._outputNode(existing and existing.chart, "vtkMRMLPlotChartNode", f"{prefix} rigidity plot")
        series = [
            self._outputNode(existing.series[i] if existing else None, "vtkMRMLPlotSeriesNode", title)
            for i, (title, _) in enumerate(outputs.PLOT_SERIES)
        ]
        outputs.fillChart(chart, table, series)
        return table, chart, series

    def _showMrVertebrae(self, run: RegistrationRun, nodeId: str | None, name: str) -> slicer.vtkMRMLSegmentationNode:
        """The vertebral bone that the segmentation network found in the MR (runs without MR labels)."""
        mrVertebrae = self._outputNode(nodeId, "vtkMRMLSegmentationNode", name)
        if mrVertebrae.GetDisplayNode() is None:
            mrVertebrae.CreateDefaultDisplayNodes()
        mrVertebrae.SetDescription("vertebral bone found in the MR by the segmentation network (no MR labels)")
        nodes.updateSegmentationFromLabelImage(
            mrVertebrae, run.result.mr_vertebrae, {1: "vertebral bone (MR, predicted)"}, {1: (0.95, 0.85, 0.3)}
        )
        mrNode = self._mrNode(run)
        if mrNode is not None:
            mrVertebrae.SetReferenceImageGeometryParameterFromVolumeNode(mrNode)
        return mrVertebrae

    def _nodeIds(self) -> set[str]:
        """IDs of every node in the scene."""
        scene = self.scene
        return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}

    def _removeNodesAddedSince(self, before: set[str]) -> None:
        """Remove every node not in ``before`` (outputs and their display/legend nodes), newest first."""
        scene = self.scene
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for new in reversed([n for n in added if n.GetID() not in before]):
            if new.GetScene() is not None:
                scene.RemoveNode(new)

    @staticmethod
    def vertebraCentres(result: RegistrationResult) -> dict[int, np.ndarray]:
        """RAS centre (mm) of every warped vertebra, in MR space."""
        centres = label_centroids(result.warped_labels)
        if not centres:
            return {}
        labels = list(centres)
        ras = lps_points_to_ras(np.stack([centres[v] for v in labels]))
        return dict(zip(labels, ras))

    # ---------------------------------------------------------------------------------------------- views

    def centreOnRow(self, row: int) -> bool:
        """Centre the slice views on the vertebra of QA table row ``row``; False when it has no centre."""
        if self.outputs is None:
            return False
        table = self.scene.GetNodeByID(self.outputs.table)
        if table is None or not 0 <= row < table.GetNumberOfRows():
            return False
        vtkTable = table.GetTable()
        ras = [vtkTable.GetColumnByName(name).GetValue(row) for name in outputs.CENTRE_COLUMNS]
        if not np.all(np.isfinite(ras)):
            return False
        outputs.jumpSlicesTo(self.scene, ras)
        return True

    def showForeground(self, jacobian: bool = False, opacity: float = 0.5) -> int:
        """Show the registered CT (or the det J map) over the MR in every slice view; returns the views set up."""
        if self.outputs is None or not self.history:
            return 0
        foreground = self.outputs.jacobianVolume if jacobian else self.outputs.warpedVolume
        return outputs.setupFusionViews(self.scene, self.history[-1].inputs.nodeIds.get("mr", ""), foreground, opacity)

    def resultVertebraNames(self) -> list[str]:
        """The vertebra names of the current result, in its table's order (none before a run)."""
        return [str(row["name"]) for row in self.history[-1].result.vertebrae] if self.history else []

    def resultDevice(self) -> str | None:
        """The device the current result was computed on (``None`` before a run)."""
        return self.history[-1].result.summary.get("device") if self.history else None

    def summaryText(self) -> str:
        """One line about the current result: device, pre-alignment, folding, timing."""
        if not self.history:
            return ""
        result = self.history[-1].result
        s = result.summary
        text = (
            f"device {s.get('device')} (networks in {s.get('network_arithmetic', 'float32')}); "
            f"pre-alignment: {result.prealign_method}; "
            f"folding voxels {s.get('folding_voxels')}; mean rigid DSC {s.get('rigid_dice_mean', float('nan')):.3f}; "
            f"{result.timings.get('total', float('nan')):.1f} s"
        )
        outside = s.get("vertebrae_outside_mr") or []
        if outside:
            text += f"; mostly outside the MR's view (check them): {', '.join(outside)}"
        return text


def _completeNames(labels: sitk.Image, names: Mapping[int, str]) -> dict[int, str]:
    """Names of every label of ``labels``: the given ones, else the vertebra name of its numbering, else the value."""
    return {v: nodes.displayName(v, names, fallback) for v, fallback in label_names(labels).items()}


def _matchLabelsByName(labels: sitk.Image, names: Mapping[int, str], reference: Mapping[int, str]) -> sitk.Image:
    """Renumber MR labels so that a vertebra has the CT's label value when both are named (for DSC per vertebra)."""
    if not names or not reference:
        return labels
    byName = {name.upper(): value for value, name in reference.items()}
    mapping = {value: byName.get(name.upper(), 0) for value, name in names.items()}
    if not any(mapping.values()):
        raise InputError("the MR segmentation names no vertebra of the CT segmentation")
    array = sitk.GetArrayFromImage(labels)
    lookup = np.zeros(int(array.max()) + 1, dtype=np.uint16)
    for value, target in mapping.items():
        if value < len(lookup):
            lookup[value] = target
    out = sitk.GetImageFromArray(lookup[array.astype(np.int64)])
    out.CopyInformation(labels)
    return out

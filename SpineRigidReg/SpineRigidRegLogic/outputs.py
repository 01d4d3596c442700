"""Output nodes of a registration: transform, warped CT and segmentation, Jacobian map, QA table and plot.

Every function here fills or creates standard MRML nodes; none reads or modifies an input node. Colours are a
presentation choice of this layer (the numbers come from the core).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import slicer
import vtk
from SpineRigidRegLib.metrics import present_columns

#: Window of the Jacobian colour table: symmetric about 1, with det J = 0 on an entry boundary.
JACOBIAN_RANGE = (-1.0, 3.0)
JACOBIAN_COLORS = 256
#: Colour of folded voxels (det J <= 0): gold, far from the blue-white-red scale.
FOLDING_COLOR = (1.0, 0.8, 0.0)
#: Rigid DSC at which a vertebra turns red (and 1.0 is green).
RIGIDITY_RED_AT = 0.85

#: Columns holding the warped vertebra's centre (RAS mm), used to centre the views on a row.
CENTRE_COLUMNS = ("R", "A", "S")
#: Plot series: table column -> colour.
PLOT_SERIES = (("Rigid DSC", (0.2, 0.5, 0.8)), ("Volume change (%)", (0.85, 0.4, 0.1)))


def jacobianColor(value: float) -> tuple[float, float, float]:
    """Colour of a det J value: folding (<= 0) gold; 0 -> 1 dark blue to white; 1 -> 2 white to dark red."""
    if value <= 0.0:
        return FOLDING_COLOR
    blue, white, red = np.array([0.1, 0.2, 0.7]), np.ones(3), np.array([0.7, 0.05, 0.05])
    if value < 1.0:
        color = blue + (white - blue) * value
    else:
        color = white + (red - white) * min(value - 1.0, 1.0)
    return tuple(float(c) for c in color)  # type: ignore[return-value]


def fillJacobianColorTable(colorNode: slicer.vtkMRMLColorTableNode) -> slicer.vtkMRMLColorTableNode:
    """A diverging table over :data:`JACOBIAN_RANGE`: white at det J = 1, folding in :data:`FOLDING_COLOR`."""
    low, high = JACOBIAN_RANGE
    step = (high - low) / JACOBIAN_COLORS
    colorNode.SetTypeToUser()
    colorNode.SetNumberOfColors(JACOBIAN_COLORS)
    for index in range(JACOBIAN_COLORS):
        centre = low + (index + 0.5) * step
        r, g, b = jacobianColor(centre)
        name = "folding" if centre <= 0 else f"{centre:.2f}"
        colorNode.SetColor(index, name, r, g, b, 1.0)
    colorNode.SetAttribute("SpineRigidReg.Role", "JacobianColors")
    return colorNode


def showJacobian(volumeNode: slicer.vtkMRMLScalarVolumeNode, colorNode: slicer.vtkMRMLColorTableNode) -> None:
    """Display ``volumeNode`` through the Jacobian colour table over its fixed window, with a colour legend."""
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    display = volumeNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(colorNode.GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(*JACOBIAN_RANGE)
    display.SetInterpolate(False)
    scene = volumeNode.GetScene()
    for i in range(volumeNode.GetNumberOfDisplayNodes()):
        if volumeNode.GetNthDisplayNode(i).IsA("vtkMRMLColorLegendDisplayNode"):
            return
    if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
        # Registered by Slicer's Colors module; a bare scene (slicer-core) does not know the class yet.
        scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
    legend = scene.AddNewNodeByClass("vtkMRMLColorLegendDisplayNode", volumeNode.GetName() + " legend")
    legend.SetAndObservePrimaryDisplayNode(display)
    legend.SetTitleText("det J (1 = volume kept, gold = folding)")
    legend.SetLabelFormat("%.2f")
    volumeNode.AddAndObserveDisplayNodeID(legend.GetID())


def rigidityColor(rigidDice: float | None) -> tuple[float, float, float]:
    """Segment colour for how rigid a vertebra stayed: green at rigid DSC 1, yellow, red at or below 0.85."""
    if rigidDice is None or not np.isfinite(rigidDice):
        return (0.6, 0.6, 0.6)
    t = float(np.clip((rigidDice - RIGIDITY_RED_AT) / (1.0 - RIGIDITY_RED_AT), 0.0, 1.0))
    if t < 0.5:
        return (0.9, 0.15 + 1.5 * t, 0.1)
    return (0.9 - 1.6 * (t - 0.5), 0.9, 0.1 + 0.2 * (t - 0.5))


def _column(kind: str, name: str) -> vtk.vtkAbstractArray:
    array = {"string": vtk.vtkStringArray, "int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray}[kind]()
    array.SetName(name)
    return array


def fillTable(
    tableNode: slicer.vtkMRMLTableNode, rows: Sequence[Mapping], centresRas: Mapping[int, np.ndarray]
) -> slicer.vtkMRMLTableNode:
    """One row per vertebra with the core's figures (``nan`` where a figure does not exist) and its RAS centre."""
    columns = [(c.key, c.title, c.kind) for c in present_columns(rows)]
    table = vtk.vtkTable()
    arrays = [_column(kind, title) for _, title, kind in columns]
    centres = [_column("double", name) for name in CENTRE_COLUMNS]
    for row in rows:
        for (key, _, kind), array in zip(columns, arrays):
            value = row.get(key)
            if kind == "string":
                array.InsertNextValue(str(value if value is not None else ""))
            elif kind == "int":
                array.InsertNextValue(int(value) if value is not None else -1)
            else:
                array.InsertNextValue(float(value) if value is not None else float("nan"))
        centre = centresRas.get(int(row["label"]), np.full(3, np.nan))
        for axis, array in enumerate(centres):
            array.InsertNextValue(float(centre[axis]))
    for array in arrays + centres:
        table.AddColumn(array)
    tableNode.SetAndObserveTable(table)
    tableNode.SetUseColumnTitleAsColumnHeader(True)
    tableNode.SetLocked(True)
    for name in CENTRE_COLUMNS:
        tableNode.SetColumnDescription(name, "centre of the warped vertebra, RAS mm")
        tableNode.SetColumnUnitLabel(name, "mm")
    return tableNode


def fillChart(
    chartNode: slicer.vtkMRMLPlotChartNode,
    tableNode: slicer.vtkMRMLTableNode,
    seriesNodes: Sequence[slicer.vtkMRMLPlotSeriesNode],
) -> None:
    """Bar plot of the per-vertebra rigid DSC and volume change, one bar group per table row."""
    chartNode.SetTitle("Per-vertebra rigidity")
    chartNode.SetXAxisTitle("vertebra")
    chartNode.SetYAxisTitle("rigid DSC / volume change (%)")
    chartNode.RemoveAllPlotSeriesNodeIDs()
    for series, (column, color) in zip(seriesNodes, PLOT_SERIES):
        series.SetAndObserveTableNodeID(tableNode.GetID())
        series.SetXColumnName("Label")
        series.SetYColumnName(column)
        series.SetLabelColumnName("Vertebra")
        series.SetPlotType(series.PlotTypeBar)
        series.SetColor(*color)
        chartNode.AddAndObservePlotSeriesNodeID(series.GetID())


def setupFusionViews(
    scene: slicer.vtkMRMLScene,
    backgroundVolumeId: str,
    foregroundVolumeId: str,
    opacity: float = 0.5,
    segmentationNode: slicer.vtkMRMLSegmentationNode | None = None,
) -> int:
    """Show the MR as background and the warped CT as foreground in every slice view, segments as outlines.

    Returns:
        The number of slice views set up (0 without views, e.g. in a test scene).
    """
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    count = composites.GetNumberOfItems()
    for i in range(count):
        composite = composites.GetItemAsObject(i)
        composite.SetBackgroundVolumeID(backgroundVolumeId)
        composite.SetForegroundVolumeID(foregroundVolumeId)
        composite.SetForegroundOpacity(float(opacity))
        composite.SetLabelVolumeID(None)
    if segmentationNode is not None and segmentationNode.GetDisplayNode() is not None:
        display = segmentationNode.GetDisplayNode()
        display.SetVisibility2DFill(False)
        display.SetVisibility2DOutline(True)
        display.SetSliceIntersectionThickness(2)
    return count


def jumpSlicesTo(scene: slicer.vtkMRMLScene, ras: Sequence[float]) -> None:
    """Centre every slice view on a RAS point (mm)."""
    if not np.all(np.isfinite(np.asarray(ras, dtype=float))):
        return
    slicer.vtkMRMLSliceNode.JumpAllSlices(
        scene, float(ras[0]), float(ras[1]), float(ras[2]), slicer.vtkMRMLSliceNode.CenteredJumpSlice
    )

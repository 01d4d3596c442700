"""The Slicer module's Logic against a real MRML scene (the ``slicer-core`` wheel: Slicer's MRML and logic libraries).

What is real here: the scene, volume / label map / segmentation / markups / transform / colour / table / plot nodes,
Slicer's segmentation import and rasterisation logic, VTK's oriented grid transform. What is not: Qt, the module
panel and the application (see ``SpineRigidReg.py``'s self-test, which needs Slicer).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import REPO_ROOT

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel (test extra) is not installed")
vtk = pytest.importorskip("vtk")

sys.path.insert(0, str(REPO_ROOT / "SpineRigidReg"))

from SpineRigidRegLib.data.phantom import make_phantom  # noqa: E402
from SpineRigidRegLib.errors import CancelledError, InputError  # noqa: E402
from SpineRigidRegLib.geometry import Geometry, lps_points_to_ras  # noqa: E402
from SpineRigidRegLib.network import NetworkConfig, RegistrationNet  # noqa: E402
from SpineRigidRegLib.prealign import label_centroids  # noqa: E402
from SpineRigidRegLogic import SpineRigidRegLogic, makeSettings, nodes, outputs  # noqa: E402

TINY = NetworkConfig(encoder_channels=(4, 4, 4, 4), decoder_channels=(4, 4, 4, 4), final_channels=(4,))
NAMES = {20: "L1", 21: "L2", 22: "L3"}  # the phantom's VerSe labels


def new_scene() -> slicer.vtkMRMLScene:
    """A scene with Slicer's default colour tables, as the application has."""
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    colors.SetMRMLScene(None)
    slicer.mrmlScene = scene
    return scene


def oblique_direction(angles_deg=(20.0, -15.0, 30.0)) -> np.ndarray:
    t = sitk.Euler3DTransform()
    t.SetRotation(*np.deg2rad(angles_deg))
    return np.asarray(t.GetMatrix()).reshape(3, 3)


def oblique_image(shape=(6, 7, 8), spacing=(0.7, 1.3, 2.9), seed=0, dtype=np.float32) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray((rng.normal(size=shape) * 100).astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin((12.5, -40.25, 7.125))
    image.SetDirection(tuple(oblique_direction().ravel()))
    return image


def euler(angles_deg, shift, centre=(0.0, 0.0, 0.0)) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(float(c) for c in centre))
    t.SetRotation(*[float(np.deg2rad(a)) for a in angles_deg])
    t.SetTranslation(tuple(float(s) for s in shift))
    return t


def mr_of(phantom, truth: sitk.Transform, spacing=(1.2, 1.2, 2.5)) -> sitk.Image:
    """An MR-like view of the phantom through ``truth`` (MR point -> CT point) on an oblique, anisotropic grid."""
    ct = phantom.ct
    contrast = sitk.Cast(sitk.InvertIntensity(sitk.Cast(ct, sitk.sitkFloat32), maximum=1500.0), sitk.sitkFloat32)
    direction = oblique_direction((4.0, -3.0, 6.0))
    centre = np.asarray(ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()]))
    extent = np.asarray(ct.GetSize()) * np.asarray(ct.GetSpacing())
    size = [int(e / s) for e, s in zip(extent, spacing)]
    origin = centre - direction @ ((np.asarray(size) - 1) * np.asarray(spacing) / 2)
    return sitk.Resample(
        contrast, size, truth, sitk.sitkLinear, tuple(origin), spacing, tuple(direction.ravel()), 0.0, sitk.sitkFloat32
    )


def add_points(scene, name: str, points_lps: dict[str, np.ndarray]) -> slicer.vtkMRMLMarkupsFiducialNode:
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for label, point in points_lps.items():
        node.AddControlPoint(*lps_points_to_ras(np.asarray(point, dtype=float)[None])[0], label)
    return node


def snapshot(node) -> tuple:
    """Everything of an input node the logic could modify."""
    if node.IsA("vtkMRMLVolumeNode"):
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        return (
            nodes.vtkMatrixToArray(matrix).tobytes(),
            slicer.util.arrayFromVolume(node).tobytes(),
            node.GetParentTransformNode(),
        )
    if node.IsA("vtkMRMLSegmentationNode"):
        s = node.GetSegmentation()
        segments = []
        for i in range(s.GetNumberOfSegments()):
            segment = s.GetNthSegment(i)
            segments.append((s.GetNthSegmentID(i), segment.GetName(), tuple(segment.GetColor())))
        arrays = [slicer.util.arrayFromSegmentInternalBinaryLabelmap(node, sid).sum() for sid, _, _ in segments]
        return tuple(segments), tuple(int(a) for a in arrays)
    if node.IsA("vtkMRMLMarkupsNode"):
        return slicer.util.arrayFromMarkupsControlPoints(node).tobytes()
    raise TypeError(node.GetClassName())


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def network() -> RegistrationNet:
    torch.manual_seed(0)
    return RegistrationNet(TINY).eval()


@pytest.fixture(scope="module")
def case():
    """Phantom CT (VerSe L1-L3) and an oblique MR of it after a known rigid motion, with vertebra centres."""
    phantom = make_phantom(num_vertebrae=3, shape=(48, 40, 40), seed=1)
    truth = euler((3.0, -2.0, 4.0), (4.0, -3.0, 2.0))  # MR point -> CT point
    inverse = truth.GetInverse()
    ct_points = {NAMES[v]: c for v, c in label_centroids(phantom.labels).items()}
    mr_points = {k: np.asarray(inverse.TransformPoint(tuple(c))) for k, c in ct_points.items()}
    return phantom, mr_of(phantom, truth), ct_points, mr_points


def build_scene(case):
    """A fresh scene holding the case as Slicer nodes: CT and MR volumes, a named CT segmentation, centre lists."""
    phantom, mr, ct_points, mr_points = case
    scene = new_scene()
    ct = nodes.addVolumeFromImage(scene, phantom.ct, "CT")
    mr_node = nodes.addVolumeFromImage(scene, mr, "MR")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT vertebrae")
    segmentation.CreateDefaultDisplayNodes()
    nodes.updateSegmentationFromLabelImage(segmentation, phantom.labels, NAMES)
    ct_centres = add_points(scene, "CT centres", ct_points)
    mr_centres = add_points(scene, "MR centres", mr_points)
    return scene, ct, segmentation, mr_node, ct_centres, mr_centres


@pytest.fixture
def scene_case(case):
    return build_scene(case)


FAST = replace(makeSettings(refineSteps=2, device="cpu", vertebraSteps=3), margin_mm=8.0)


def registered(scene_case, network):
    scene, ct, segmentation, mr, ct_centres, mr_centres = scene_case
    logic = SpineRigidRegLogic(scene)
    logic.network = network
    out = logic.run(ct, segmentation, mr, ctLandmarks=ct_centres, mrLandmarks=mr_centres, settings=FAST)
    return logic, out, scene_case


@pytest.fixture(scope="module")
def shared_run(case, network):
    """One registration shared by the tests that only read its outputs."""
    return registered(build_scene(case), network)


@pytest.fixture
def logic_run(scene_case, network):
    """A registration of its own, for tests that change the result."""
    return registered(scene_case, network)


# ---------------------------------------------------------------------------------------------- geometry


def test_volume_round_trip_keeps_oblique_ijk_to_ras_and_voxels_exactly():
    scene = new_scene()
    image = oblique_image()
    node = nodes.addVolumeFromImage(scene, image, "oblique")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = nodes.vtkMatrixToArray(matrix)
    # Voxel (i, j, k) of the node sits at the RAS flip of the image's LPS point for that index.
    for index in [(0, 0, 0), (7, 0, 0), (0, 6, 0), (3, 2, 5)]:
        lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
        ras = ijk_to_ras @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
    back = nodes.volumeToImage(node)
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert sitk.GetArrayFromImage(back).dtype == np.float32


def test_volume_made_by_slicer_util_reads_with_its_ijk_to_ras():
    scene = new_scene()
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = oblique_direction((0.0, 30.0, 10.0)) @ np.diag([0.5, 0.9, 3.0])
    ijk_to_ras[:3, 3] = [-10.0, 22.0, 5.5]
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    node = slicer.util.addVolumeFromArray(array, ijkToRAS=ijk_to_ras, name="from array")
    image = nodes.volumeToImage(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    point = np.asarray(image.TransformIndexToPhysicalPoint((5, 4, 3)))
    np.testing.assert_allclose(point * [-1, -1, 1], (ijk_to_ras @ [5, 4, 3, 1])[:3], atol=1e-9)
    del scene


def test_parent_transform_is_honoured_when_linear_and_refused_when_not():
    scene = new_scene()
    image = oblique_image()
    node = nodes.addVolumeFromImage(scene, image, "moved")
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = np.eye(4)
    shift[:3, 3] = [5.0, -2.0, 1.0]  # RAS
    linear.SetMatrixTransformToParent(nodes.arrayToVtkMatrix(shift))
    node.SetAndObserveTransformNodeID(linear.GetID())
    moved = nodes.volumeToImage(node)
    expected = np.asarray(image.GetOrigin()) + np.array([-5.0, 2.0, 1.0])  # the RAS shift, in LPS
    np.testing.assert_allclose(moved.GetOrigin(), expected, atol=1e-9)
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "bend")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="non-linear"):
        nodes.volumeToImage(node, "CT volume")


def test_named_segmentation_round_trips_labels_and_names():
    scene = new_scene()
    reference = nodes.addVolumeFromImage(scene, oblique_image(shape=(10, 12, 14), seed=3), "reference")
    geometry = Geometry.of(nodes.volumeToImage(reference))
    array = np.zeros(geometry.shape, np.uint16)
    array[1:4, 2:6, 3:9] = 31  # TotalSegmentator L1
    array[5:9, 4:10, 2:7] = 32  # T12
    array[2:8, 8:11, 10:13] = 30  # L2
    labels = geometry.apply_to(sitk.GetImageFromArray(array))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "vertebrae")
    nodes.updateSegmentationFromLabelImage(segmentation, labels, {31: "L1", 32: "T12", 30: "L2"})
    s = segmentation.GetSegmentation()
    assert sorted(s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())) == ["L1", "L2", "T12"]
    back, names = nodes.segmentationToLabelImage(segmentation, reference)
    assert names == {31: "L1", 32: "T12", 30: "L2"}  # vertebra names -> TotalSegmentator numbering
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    assert Geometry.of(back).same_grid(geometry, tol_mm=1e-9)
    # Renamed to VerSe-only names (L6 has no TotalSegmentator id): the VerSe numbering is chosen.
    for i, name in enumerate(["L6", "T13", "L5"]):
        s.GetNthSegment(i).SetName(name)
    _, names = nodes.segmentationToLabelImage(segmentation, reference)
    assert sorted(names.values()) == ["L5", "L6", "T13"] and sorted(names) == [24, 25, 28]


def test_segments_without_vertebra_names_keep_their_recorded_label_values():
    scene = new_scene()
    image = oblique_image(shape=(6, 8, 8), seed=4)
    reference = nodes.addVolumeFromImage(scene, image, "reference")
    array = np.zeros((6, 8, 8), np.uint16)
    array[:2] = 7
    array[3:] = 9
    labels = Geometry.of(image).apply_to(sitk.GetImageFromArray(array))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "generic")
    nodes.updateSegmentationFromLabelImage(segmentation, labels, {7: "Segment_7", 9: "Segment_9"})
    back, names = nodes.segmentationToLabelImage(segmentation, reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    assert nodes.displayName(7, names, "C7") == "C7" and nodes.displayName(9, {9: "bone"}, "x") == "bone"


def test_label_map_volume_is_accepted_as_segmentation_and_fractions_are_refused():
    scene = new_scene()
    image = oblique_image(shape=(4, 5, 6))
    array = np.zeros((4, 5, 6), np.int16)
    array[1:3] = 20
    labels = Geometry.of(image).apply_to(sitk.GetImageFromArray(array))
    node = nodes.addVolumeFromImage(scene, labels, "labels", "vtkMRMLLabelMapVolumeNode")
    back, names = nodes.segmentationToLabelImage(node, node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    assert names == {}
    fractional = nodes.addVolumeFromImage(scene, image, "not labels")
    with pytest.raises(InputError, match="fractional"):
        nodes.segmentationToLabelImage(fractional, fractional)


def test_composite_transform_node_maps_points_as_the_core_field_says(tmp_path):
    """Oblique, anisotropic field grid + a rigid pre-alignment: node mapping == ITK composite to < 0.5 mm."""
    scene = new_scene()
    grid = Geometry(
        shape=(9, 10, 11),
        spacing=(2.0, 2.5, 3.0),
        origin=(-20.0, 10.0, -15.0),
        direction=tuple(oblique_direction((10.0, 25.0, -20.0)).ravel()),
    )
    k, j, i = np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij")
    lps = np.stack([4.0 * np.sin(k / 3.0), -3.0 * np.cos(j / 4.0), 2.5 * np.sin(i / 2.0 + k / 5.0)], -1)
    field = grid.apply_to(sitk.GetImageFromArray(lps.astype(np.float64), isVector=True))
    rigid = euler((5.0, -7.0, 12.0), (6.0, -4.0, 3.0), centre=(1.0, 2.0, 3.0))
    prealign = np.eye(4)
    prealign[:3, :3] = np.asarray(rigid.GetMatrix()).reshape(3, 3)
    centre = np.asarray(rigid.GetCenter())
    prealign[:3, 3] = np.asarray(rigid.GetTranslation()) + centre - prealign[:3, :3] @ centre
    itk = sitk.CompositeTransform([rigid, sitk.DisplacementFieldTransform(sitk.Image(field))])
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", "registration")
    node.SetAndObserveTransformFromParent(nodes.compositeTransform(prealign, field))
    rng = np.random.default_rng(0)
    points = grid.array_index_to_lps_points(rng.uniform(1, np.asarray(grid.shape) - 2, size=(50, 3)))
    expected = np.array([itk.TransformPoint(tuple(p)) for p in points])
    mapped = np.array([node.GetTransformFromParent().TransformPoint(tuple(p)) for p in lps_points_to_ras(points)])
    error = np.linalg.norm(lps_points_to_ras(mapped) - expected, axis=1)
    assert error.max() < 0.5
    assert error.max() < 1e-4  # both interpolate the same grid linearly
    assert np.linalg.norm(expected - points, axis=1).min() > 2.0  # a map that is far from the identity
    # Saved by Slicer's transform storage node (as when the scene is saved): ITK reads the same map, Slicer reloads it.
    storage = slicer.vtkMRMLTransformStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "registration.h5"))
    assert storage.WriteData(node)
    from_file = sitk.ReadTransform(str(tmp_path / "registration.h5"))
    written = np.array([from_file.TransformPoint(tuple(p)) for p in points])
    assert np.linalg.norm(written - expected, axis=1).max() < 1e-3
    reloaded = scene.AddNewNodeByClass("vtkMRMLTransformNode", "reloaded")
    storage.ReadData(reloaded)
    again = np.array([reloaded.GetTransformFromParent().TransformPoint(tuple(p)) for p in lps_points_to_ras(points)])
    assert np.linalg.norm(lps_points_to_ras(again) - expected, axis=1).max() < 0.5  # Slicer reloads grids as cubic
    # A volume placed under the node is resampled the same way (world point -> point in the volume's frame).
    general = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, node, general)
    again = np.array([general.TransformPoint(tuple(p)) for p in lps_points_to_ras(points[:5])])
    np.testing.assert_allclose(lps_points_to_ras(again), expected[:5], atol=1e-4)


# ------------------------------------------------------------------------------------------ whole workflow


def _known_mr_vertebrae(fixed: sitk.Image, device, precision) -> sitk.Image:
    """A stand-in for the segmentation network: a known block, so the output node's voxels can be checked."""
    array = np.zeros(sitk.GetArrayViewFromImage(fixed).shape, np.uint8)
    array[3:9, 4:12, 5:15] = 1
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(fixed)
    return mask


def test_run_creates_outputs_whose_transform_matches_the_core_and_leaves_inputs_unchanged(
    scene_case, network, monkeypatch
):
    monkeypatch.setattr("SpineRigidRegLib.pipeline.predict_mr_bone", _known_mr_vertebrae)
    scene, ct, segmentation, mr, ct_centres, mr_centres = scene_case
    inputs = [ct, segmentation, mr, ct_centres, mr_centres]
    before = [snapshot(n) for n in inputs]
    count = scene.GetNumberOfNodes()
    logic = SpineRigidRegLogic(scene)
    logic.network = network
    out = logic.run(ct, segmentation, mr, ctLandmarks=ct_centres, mrLandmarks=mr_centres, settings=FAST)
    assert [snapshot(n) for n in inputs] == before
    assert all(scene.GetNodeByID(i) is not None for i in out.all())
    assert scene.GetNumberOfNodes() > count
    result = logic.history[-1].result
    assert result.prealign_method == "landmarks"
    assert logic.resultVertebraNames() == [str(row["name"]) for row in result.vertebrae] != []
    assert logic.resultDevice() == "cpu"
    assert f"(networks in {result.summary['network_arithmetic']})" in logic.summaryText()
    # The transform node maps MR points where the core's composite (pre-alignment + field) does, on the MR grid.
    transform = scene.GetNodeByID(out.transform).GetTransformFromParent()
    fixed = nodes.volumeToImage(mr)
    rng = np.random.default_rng(1)
    index = rng.uniform(2, np.asarray(fixed.GetSize()) - 3, size=(40, 3))
    points = np.array([fixed.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in index])
    expected = np.array([result.transform.TransformPoint(tuple(p)) for p in points])
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in lps_points_to_ras(points)])
    assert np.linalg.norm(lps_points_to_ras(mapped) - expected, axis=1).max() < 0.5
    # The warped volume is the core's, on the MR grid, and the warped segmentation keeps the vertebra names.
    warped = nodes.volumeToImage(scene.GetNodeByID(out.warpedVolume))
    assert Geometry.of(warped).same_grid(Geometry.of(fixed), tol_mm=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(result.warped_moving))
    s = scene.GetNodeByID(out.warpedSegmentation).GetSegmentation()
    assert sorted(s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())) == ["L1", "L2", "L3"]
    # The MR vertebrae the segmentation network found: a segmentation node whose voxels are the core's mask.
    predicted = scene.GetNodeByID(out.mrVertebrae)
    assert predicted.IsA("vtkMRMLSegmentationNode") and "predicted" in predicted.GetName()
    expected = int(sitk.GetArrayViewFromImage(result.mr_vertebrae).sum())
    segmentation = predicted.GetSegmentation()
    voxels = sum(
        int(slicer.util.arrayFromSegmentInternalBinaryLabelmap(predicted, segmentation.GetNthSegmentID(i)).sum())
        for i in range(segmentation.GetNumberOfSegments())
    )
    assert voxels == expected == 6 * 8 * 10


def test_qa_table_holds_the_core_rows_and_vertebra_centres(shared_run):
    logic, out, (scene, *_rest) = shared_run
    result = logic.history[-1].result
    table = scene.GetNodeByID(out.table)
    assert table.GetNumberOfRows() == len(result.vertebrae) == 3
    column = {table.GetColumnName(c): c for c in range(table.GetNumberOfColumns())}
    for key in ("Vertebra", "Rigid DSC", "Volume change (%)", "PC", "OC", "Folding voxels", "TRE (mm)", "R", "A", "S"):
        assert key in column, key
    centres = logic.vertebraCentres(result)
    for r, row in enumerate(result.vertebrae):
        assert table.GetCellText(r, column["Vertebra"]) == row["name"]
        assert float(table.GetCellText(r, column["Rigid DSC"])) == pytest.approx(row["rigid_dice"], rel=1e-5)
        assert float(table.GetCellText(r, column["OC"])) == pytest.approx(row["oc"], rel=1e-5)
        assert int(table.GetCellText(r, column["Folding voxels"])) == row["folding_voxels"]
        ras = [float(table.GetCellText(r, column[a])) for a in "RAS"]
        np.testing.assert_allclose(ras, centres[row["label"]], atol=1e-4)
    assert sorted(result.vertebrae[r]["name"] for r in range(3)) == ["L1", "L2", "L3"]
    # Clicking a row centres the slice views on that vertebra.
    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_node.SetLayoutName("Red")
    assert logic.centreOnRow(1)
    slice_to_ras = nodes.vtkMatrixToArray(slice_node.GetSliceToRAS())
    np.testing.assert_allclose(slice_to_ras[:3, 3], centres[result.vertebrae[1]["label"]], atol=1e-3)
    # The plot shows the table's columns.
    chart = scene.GetNodeByID(out.chart)
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    assert chart.GetNthPlotSeriesNode(0).GetTableNode() is table


def test_jacobian_volume_uses_a_diverging_colour_table_centred_at_one_with_distinct_folding(shared_run):
    logic, out, (scene, *_rest) = shared_run
    volume = scene.GetNodeByID(out.jacobianVolume)
    colors = scene.GetNodeByID(out.jacobianColors)
    display = volume.GetDisplayNode()
    assert display.GetColorNodeID() == colors.GetID()
    low, high = outputs.JACOBIAN_RANGE
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (low, high)
    assert (low + high) / 2 == 1.0  # the window is centred at det J = 1

    def color_at(value: float) -> np.ndarray:
        index = int((value - low) / (high - low) * colors.GetNumberOfColors())
        rgba = [0.0] * 4
        colors.GetColor(index, rgba)
        return np.asarray(rgba[:3])

    np.testing.assert_allclose(color_at(1.0), [1.0, 1.0, 1.0], atol=0.02)  # white at volume kept
    assert color_at(0.5)[2] > color_at(0.5)[0]  # compression: blue
    assert color_at(1.5)[0] > color_at(1.5)[2]  # expansion: red
    for folded in (-0.9, -0.3, -0.02):
        np.testing.assert_allclose(color_at(folded), outputs.FOLDING_COLOR)
    for valid in (0.02, 0.3, 1.0, 2.5):
        assert np.abs(color_at(valid) - outputs.FOLDING_COLOR).max() > 0.3
    legends = [volume.GetNthDisplayNode(i) for i in range(volume.GetNumberOfDisplayNodes())]
    assert any(n.IsA("vtkMRMLColorLegendDisplayNode") for n in legends)
    values = slicer.util.arrayFromVolume(volume)
    np.testing.assert_allclose(values, sitk.GetArrayFromImage(logic.history[-1].result.jacobian))


def test_cancelled_run_leaves_the_scene_as_it_was(scene_case, network):
    scene, ct, segmentation, mr, ct_centres, mr_centres = scene_case
    ids = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
    logic = SpineRigidRegLogic(scene)
    logic.network = network
    for cancel_after in (1, 4, 7):
        calls = {"n": 0}

        def should_cancel(limit=cancel_after, calls=calls) -> bool:
            calls["n"] += 1
            return calls["n"] >= limit

        with pytest.raises(CancelledError):
            logic.run(
                ct,
                segmentation,
                mr,
                ctLandmarks=ct_centres,
                mrLandmarks=mr_centres,
                settings=FAST,
                shouldCancel=should_cancel,
            )
        assert [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())] == ids
    assert logic.history == [] and logic.outputs is None


def test_failure_while_creating_outputs_removes_the_new_nodes(scene_case, network, monkeypatch):
    scene, ct, segmentation, mr, ct_centres, mr_centres = scene_case
    count = scene.GetNumberOfNodes()
    logic = SpineRigidRegLogic(scene)
    logic.network = network

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(outputs, "fillTable", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        logic.run(ct, segmentation, mr, ctLandmarks=ct_centres, mrLandmarks=mr_centres, settings=FAST)
    assert scene.GetNumberOfNodes() == count


def test_output_nodes_are_named_after_the_inputs_and_take_the_mr_geometry(shared_run):
    logic, out, (scene, ct, segmentation, mr, *_rest) = shared_run
    names = {
        "transform": "CT to MR transform",
        "warpedVolume": "CT registered",
        "warpedSegmentation": "CT vertebrae registered",
        "jacobianVolume": "CT to MR det J",
        "jacobianColors": "SpineRigidReg det J colours",
        "table": "CT to MR rigidity QA",
        "chart": "CT to MR rigidity plot",
        "mrVertebrae": "MR vertebrae (predicted)",
    }
    assert {key: scene.GetNodeByID(getattr(out, key)).GetName() for key in names} == names
    assert [scene.GetNodeByID(i).GetName() for i in out.series] == [title for title, _ in outputs.PLOT_SERIES]
    transform = scene.GetNodeByID(out.transform)
    assert transform.GetAttribute("SpineRigidReg.Role") == "Transform"
    assert "put the CT under this transform" in transform.GetDescription()
    for nodeId in (out.warpedSegmentation, out.mrVertebrae):
        assert scene.GetNodeByID(nodeId).GetNodeReferenceID("referenceImageGeometryRef") == mr.GetID()
    for nodeId in (out.warpedVolume, out.warpedSegmentation, out.jacobianVolume, out.mrVertebrae):
        assert scene.GetNodeByID(nodeId).GetDisplayNode() is not None


def test_a_deleted_output_node_makes_the_next_result_a_new_set_of_nodes(logic_run):
    logic, out, (scene, ct, segmentation, mr, ct_centres, mr_centres) = logic_run
    scene.RemoveNode(scene.GetNodeByID(out.chart))
    again = logic.run(ct, segmentation, mr, ctLandmarks=ct_centres, mrLandmarks=mr_centres, settings=FAST)
    assert set(again.all()).isdisjoint(out.all())
    assert all(scene.GetNodeByID(i) is not None for i in again.all())
    assert scene.GetNodeByID(again.transform).GetName() == "CT to MR transform_1"  # the old one is kept
    assert scene.GetNodeByID(out.transform) is not None


def test_refinement_with_point_pairs_updates_outputs_in_place_and_undo_restores(logic_run):
    logic, out, (scene, ct, segmentation, mr, ct_centres, mr_centres) = logic_run
    table = scene.GetNodeByID(out.table)
    before_oc = table.GetCellText(0, 5)
    first = logic.history[-1].result
    ct_pairs = add_points(scene, "CT fix", {"a": np.array([0.0, 0.0, 0.0])})
    mr_pairs = add_points(scene, "MR fix", {"a": np.array([1.0, 1.0, 0.0])})
    out2 = logic.refine(ct_pairs, mr_pairs, vertebraWeights={"L1": 0.0, "l2": 2.0, "L3": 1.0}, refineSteps=2)
    assert out2 == out  # same nodes, new content
    assert len(logic.history) == 2 and logic.canUndo()
    second = logic.history[-1]
    assert second.settings.vertebra_weights == {31: 0.0, 30: 2.0}  # by name -> TotalSegmentator label ids
    assert len(second.pointPairs) == 1
    assert second.result.summary["started_from"] == "previous result"
    assert not torch.equal(second.result.velocity, first.velocity)
    logic.undo()
    assert len(logic.history) == 1 and not logic.canUndo()
    assert table.GetCellText(0, 5) == before_oc
    restored = nodes.volumeToImage(scene.GetNodeByID(out.jacobianVolume))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(first.jacobian))
    with pytest.raises(InputError):
        logic.undo()
    with pytest.raises(InputError, match="T4"):
        logic.refinementRequest(vertebraWeights={"T4": 0.0})
    # No dense step: allowed with point pairs (the vertebrae then move rigidly onto them), refused without.
    assert len(logic.refinementRequest(ct_pairs, mr_pairs, refineSteps=0)[2]) == 1
    with pytest.raises(InputError, match="point pairs or set at least one refinement step"):
        logic.refinementRequest(refineSteps=0)


def test_point_pairs_pair_by_label_then_by_order_and_refuse_mismatches():
    scene = new_scene()
    ct = add_points(scene, "ct", {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([4.0, 5.0, 6.0])})
    mr = add_points(scene, "mr", {"b": np.array([0.0, 0.0, 1.0]), "a": np.array([0.0, 0.0, 2.0])})
    pairs = nodes.pointPairs(ct, mr)
    np.testing.assert_allclose(pairs[0][0], [1, 2, 3])
    np.testing.assert_allclose(pairs[0][1], [0, 0, 2])  # matched by label "a", in LPS
    other = add_points(scene, "mr2", {"x": np.zeros(3), "y": np.ones(3)})
    np.testing.assert_allclose(nodes.pointPairs(ct, other)[1][1], [1, 1, 1])  # by order
    short = add_points(scene, "mr3", {"x": np.zeros(3)})
    with pytest.raises(InputError, match="2 CT point"):
        nodes.pointPairs(ct, short)
    assert nodes.pointPairs(None, None) == []


def test_settings_presets_scale_the_rigidity_weights():
    default, strict, soft = (makeSettings(p).refine_weights for p in ("default", "strict", "soft"))
    assert strict.pc == pytest.approx(4 * default.pc) and soft.oc == pytest.approx(0.25 * default.oc)
    assert strict.smooth == default.smooth and strict.similarity_weight == default.similarity_weight
    custom = makeSettings("custom", weights={"pc": 0.5}, vertebraWeights={20: 0.0, 21: 1.0})
    assert custom.refine_weights.pc == 0.5 and custom.vertebra_weights == {20: 0.0}
    with pytest.raises(InputError):
        makeSettings("extreme")
    with pytest.raises(InputError):
        makeSettings("custom", weights={"stiffness": 1.0})
    # the vertebra-wise rigid alignment is on by default; the panel's spin box sets or disables it
    assert makeSettings().vertebra_rigid.steps > 0 and makeSettings(vertebraSteps=0).vertebra_rigid.steps == 0
    with pytest.raises(InputError, match="vertebra alignment steps"):
        makeSettings(vertebraSteps=-1)


def test_segments_are_coloured_by_rigidity_and_views_are_set_up_for_fusion(shared_run):
    assert outputs.rigidityColor(1.0)[1] > 0.8 and outputs.rigidityColor(1.0)[0] < 0.2  # green
    assert outputs.rigidityColor(0.8)[0] > 0.8 and outputs.rigidityColor(0.8)[1] < 0.2  # red
    greens = [outputs.rigidityColor(v)[1] - outputs.rigidityColor(v)[0] for v in np.linspace(0.85, 1.0, 7)]
    assert np.all(np.diff(greens) > 0)
    logic, out, (scene, ct, segmentation, mr, *_rest) = shared_run
    s = scene.GetNodeByID(out.warpedSegmentation).GetSegmentation()
    for row in logic.history[-1].result.vertebrae:
        segment = s.GetSegment(s.GetSegmentIdBySegmentName(row["name"]))
        np.testing.assert_allclose(segment.GetColor(), outputs.rigidityColor(row["rigid_dice"]), atol=1e-6)
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    assert outputs.setupFusionViews(scene, mr.GetID(), out.warpedVolume, 0.4) == 1
    assert composite.GetBackgroundVolumeID() == mr.GetID()
    assert composite.GetForegroundVolumeID() == out.warpedVolume
    assert composite.GetForegroundOpacity() == pytest.approx(0.4)


def test_missing_or_unusable_inputs_are_refused_in_plain_words(scene_case):
    scene, ct, segmentation, mr, *_ = scene_case
    logic = SpineRigidRegLogic(scene)
    with pytest.raises(InputError, match="CT vertebra segmentation"):
        logic.prepareInputs(ct, None, mr)
    with pytest.raises(InputError, match="same volume"):
        logic.prepareInputs(ct, segmentation, ct)
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    with pytest.raises(InputError, match="no segment"):
        logic.prepareInputs(ct, empty, mr)
    assert logic.vertebrae(segmentation) == [(29, "L3"), (30, "L2"), (31, "L1")]  # TotalSegmentator ids


# ------------------------------------------------------------------------------- the sample case, via Slicer readers

SAMPLE = REPO_ROOT / "Resources" / "SampleData"


def read_with_slicer(scene, node_class: str, storage: object, path: Path, name: str):
    """Load a file the way Slicer does: a node plus its storage node (no application needed)."""
    node = scene.AddNewNodeByClass(node_class, name)
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), f"Slicer could not read {path.name}"
    return node


@pytest.fixture
def sample_scene():
    if not (SAMPLE / "mr.nii.gz").is_file():
        pytest.skip(f"the bundled sample case is absent ({SAMPLE})")
    scene = new_scene()
    loaded = {
        "ct": read_with_slicer(
            scene,
            "vtkMRMLScalarVolumeNode",
            slicer.vtkMRMLVolumeArchetypeStorageNode(),
            SAMPLE / "ct.nii.gz",
            "SpineRigidReg CT",
        ),
        "mr": read_with_slicer(
            scene,
            "vtkMRMLScalarVolumeNode",
            slicer.vtkMRMLVolumeArchetypeStorageNode(),
            SAMPLE / "mr.nii.gz",
            "SpineRigidReg MR",
        ),
        "ctSeg": read_with_slicer(
            scene,
            "vtkMRMLSegmentationNode",
            slicer.vtkMRMLSegmentationStorageNode(),
            SAMPLE / "ct_vertebrae.nii.gz",
            "SpineRigidReg CT vertebrae",
        ),
        "mrSeg": read_with_slicer(
            scene,
            "vtkMRMLSegmentationNode",
            slicer.vtkMRMLSegmentationStorageNode(),
            SAMPLE / "mr_vertebrae.nii.gz",
            "SpineRigidReg MR vertebrae",
        ),
        "ctPts": read_with_slicer(
            scene,
            "vtkMRMLMarkupsFiducialNode",
            slicer.vtkMRMLMarkupsJsonStorageNode(),
            SAMPLE / "ct_landmarks.mrk.json",
            "SpineRigidReg CT centres",
        ),
        "mrPts": read_with_slicer(
            scene,
            "vtkMRMLMarkupsFiducialNode",
            slicer.vtkMRMLMarkupsJsonStorageNode(),
            SAMPLE / "mr_landmarks.mrk.json",
            "SpineRigidReg MR centres",
        ),
    }
    return scene, loaded


def test_sample_case_read_by_slicer_matches_the_core_reader_and_names_its_vertebrae(sample_scene):
    from SpineRigidRegLib import io

    scene, n = sample_scene
    logic = SpineRigidRegLogic(scene)
    inputs = logic.prepareInputs(n["ct"], n["ctSeg"], n["mr"], n["mrSeg"], n["ctPts"], n["mrPts"])
    for image, name in ((inputs.fixed, "mr.nii.gz"), (inputs.moving, "ct.nii.gz")):
        reference = io.read_image(SAMPLE / name)
        # Slicer's NIfTI reader and SimpleITK agree on the (oblique) geometry, through our RAS <-> LPS conversion.
        assert Geometry.of(image).same_grid(Geometry.of(reference), tol_mm=1e-3)
        np.testing.assert_allclose(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference), atol=1e-3)
    labels = io.read_image(SAMPLE / "ct_vertebrae.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(inputs.movingLabels), sitk.GetArrayFromImage(labels))
    # Segments read from a label map file are called "Segment_30"...: the numbering names them instead.
    assert sorted(inputs.labelNames.values()) == ["L1", "L2", "T12"]
    assert set(inputs.fixedLandmarks) == set(inputs.movingLandmarks) >= {"L1", "L2"}
    points = io.read_landmarks(SAMPLE / "mr_landmarks.mrk.json")
    for key, value in points.items():
        np.testing.assert_allclose(inputs.fixedLandmarks[key], value, atol=1e-6)
    mr_labels = io.read_image(SAMPLE / "mr_vertebrae.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(inputs.fixedLabels), sitk.GetArrayFromImage(mr_labels))


@pytest.mark.slow
def test_whole_workflow_on_the_sample_case_through_slicer_nodes(sample_scene, network):
    """The self-test's path without the application: readers, registration, outputs, a correction and undo."""
    scene, n = sample_scene
    logic = SpineRigidRegLogic(scene)
    logic.network = network  # untrained: geometry and plumbing are checked here, accuracy by the benchmark
    count = scene.GetNumberOfNodes()
    out = logic.run(
        n["ct"],
        n["ctSeg"],
        n["mr"],
        n["mrSeg"],
        n["ctPts"],
        n["mrPts"],
        settings=replace(makeSettings(refineSteps=1, device="cpu"), margin_mm=8.0),
    )
    result = logic.history[-1].result
    assert result.prealign_method == "landmarks"
    table = scene.GetNodeByID(out.table)
    assert table.GetNumberOfRows() == 3
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert "DSC" in columns and "TRE (mm)" in columns  # MR labels and centres were given
    names = [table.GetCellText(r, columns.index("Vertebra")) for r in range(3)]
    assert sorted(names) == ["L1", "L2", "T12"]
    logic.refine(vertebraWeights={"L2": 0.0, "Segment_32": 2.0}, refineSteps=1)  # by vertebra or segment name
    assert logic.history[-1].settings.vertebra_weights == {30: 0.0, 32: 2.0}
    logic.undo()
    assert scene.GetNumberOfNodes() > count and len(logic.history) == 1

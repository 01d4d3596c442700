"""MRML nodes <-> SimpleITK images, label maps, points and transforms, with exact geometry.

Slicer stores volumes as ``vtkImageData`` (voxel ``i`` fastest) plus a 4x4 IJK-to-RAS matrix; the core works on
SimpleITK images in LPS. Every conversion goes through :class:`SpineRigidRegLib.geometry.Geometry`, the one place
that knows the RAS <-> LPS flip, so that a volume round-trips with its voxel-to-world mapping unchanged (oblique and
anisotropic grids included). Parent transforms of input nodes are honoured when they are linear; a non-linear parent
transform is refused with a plain message (harden it first).

This file imports only MRML/vtk classes (``slicer`` from the ``slicer-core`` wheel or the Slicer application), numpy,
SimpleITK and the core; no Qt.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from SpineRigidRegLib.data.vertebrae import TOTALSEGMENTATOR, VERSE, vertebra_label
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.geometry import Geometry, lps_points_to_ras, lps_to_ras_matrix, ras_points_to_lps
from vtk.util import numpy_support

log = logging.getLogger(__name__)

#: Segment names Slicer gives when a label map is imported without a colour table ("Label_31", "Segment_2").
_GENERIC_NAME = re.compile(r"^((label|segment)[ _-]?)?\d+$", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------- matrices


def vtkMatrixToArray(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a (4, 4) float64 array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def arrayToVtkMatrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """A (4, 4) array as a new ``vtkMatrix4x4``."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def parentToWorldMatrix(node: slicer.vtkMRMLTransformableNode, role: str) -> np.ndarray:
    """4x4 RAS matrix that maps the node's local coordinates to world, or identity without a parent transform.

    Raises:
        InputError: The node sits under a non-linear transform (it must be hardened first).
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            f"{role} '{node.GetName()}' is under the non-linear transform '{parent.GetName()}': harden the "
            "transform (Transforms module) or remove it before registering"
        )
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return vtkMatrixToArray(matrix)


# ------------------------------------------------------------------------------------------------ volumes


def volumeGeometry(volumeNode: slicer.vtkMRMLVolumeNode, role: str = "volume") -> Geometry:
    """The world (RAS, parent transform included) geometry of a volume node, expressed in LPS."""
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None:
        raise InputError(f"{role} has no image data")
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    world = parentToWorldMatrix(volumeNode, role) @ vtkMatrixToArray(ijkToRas)
    ni, nj, nk = imageData.GetDimensions()
    try:
        return Geometry.from_ijk_to_ras((nk, nj, ni), world)
    except InputError as error:
        raise InputError(f"{role} '{volumeNode.GetName()}': {error}") from None


def volumeToImage(volumeNode: slicer.vtkMRMLVolumeNode, role: str = "volume") -> sitk.Image:
    """Copy a scalar volume node into a SimpleITK image (LPS geometry, voxel values and type kept).

    Args:
        volumeNode: A ``vtkMRMLScalarVolumeNode`` or ``vtkMRMLLabelMapVolumeNode`` (not modified).
        role: How the volume is named in error messages ("CT volume", ...).

    Raises:
        InputError: No node, no voxels, several components per voxel, or an unsupported parent transform.
    """
    if volumeNode is None:
        raise InputError(f"no {role} selected")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{role} '{volumeNode.GetName()}' must be a scalar volume, not a {volumeNode.GetClassName()}")
    geometry = volumeGeometry(volumeNode, role)
    imageData = volumeNode.GetImageData()
    if imageData.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{role} '{volumeNode.GetName()}' has several values per voxel; a scalar volume is needed")
    scalars = imageData.GetPointData().GetScalars()
    array = numpy_support.vtk_to_numpy(scalars).reshape(geometry.shape).copy()
    image = sitk.GetImageFromArray(array)
    return geometry.apply_to(image)


def updateVolumeFromImage(volumeNode: slicer.vtkMRMLVolumeNode, image: sitk.Image) -> slicer.vtkMRMLVolumeNode:
    """Fill a volume node with a SimpleITK scalar image: voxels (deep copy) and IJK-to-RAS from the LPS geometry."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("only scalar images can fill a volume node")
    array = sitk.GetArrayFromImage(image)
    if array.dtype == np.int64:
        array = array.astype(np.int32)  # VTK does not render "long long" volumes correctly
    vtkArray = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*image.GetSize())
    imageData.GetPointData().SetScalars(vtkArray)
    volumeNode.SetIJKToRASMatrix(arrayToVtkMatrix(Geometry.of(image).ijk_to_ras()))
    volumeNode.SetAndObserveImageData(imageData)
    return volumeNode


def addVolumeFromImage(
    scene: slicer.vtkMRMLScene, image: sitk.Image, name: str, className: str = "vtkMRMLScalarVolumeNode"
) -> slicer.vtkMRMLVolumeNode:
    """A new volume node in ``scene`` holding ``image`` (with its display node)."""
    node = scene.AddNewNodeByClass(className, name)
    updateVolumeFromImage(node, image)
    node.CreateDefaultDisplayNodes()
    return node


# --------------------------------------------------------------------------------------------- label maps


def _vertebraScheme(names: Sequence[str]) -> str | None:
    """The numbering in which every name is a vertebra (TotalSegmentator first), or None."""
    for scheme in (TOTALSEGMENTATOR, VERSE):
        try:
            for name in names:
                vertebra_label(name, scheme)
        except InputError:
            continue
        return scheme
    return None


def segmentLabelValues(segmentationNode: slicer.vtkMRMLSegmentationNode) -> tuple[list[str], dict[int, str]]:
    """Decide the integer label of every segment of a vertebra segmentation.

    Segments named after vertebrae (``L1``, ``T12``, ``S1``, ``sacrum`` ...) get the vertebra numbering that holds
    all the names (TotalSegmentator, else VerSe), so that the core names them the same way. Otherwise the label value
    Slicer recorded when the segmentation was imported from a label map is used, or 1..N in segment order.

    Returns:
        ``(segment ids in order, {label value: segment name})``.

    Raises:
        InputError: No segment, or duplicated segment names or label values.
    """
    segmentation = segmentationNode.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not ids:
        raise InputError(f"segmentation '{segmentationNode.GetName()}' has no segment")
    names = [segmentation.GetSegment(segmentId).GetName() for segmentId in ids]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(
            f"segmentation '{segmentationNode.GetName()}' has several segments named {', '.join(duplicates)}: "
            "give each vertebra its own name"
        )
    scheme = _vertebraScheme(names)
    if scheme is not None:
        values = [vertebra_label(name, scheme) for name in names]
    else:
        recorded = [int(segmentation.GetSegment(segmentId).GetLabelValue()) for segmentId in ids]
        values = recorded if min(recorded) > 0 and len(set(recorded)) == len(recorded) else list(range(1, len(ids) + 1))
    return ids, dict(zip(values, names))


def segmentationToLabelImage(
    segmentationNode: slicer.vtkMRMLNode, referenceVolumeNode: slicer.vtkMRMLVolumeNode, role: str = "segmentation"
) -> tuple[sitk.Image, dict[int, str]]:
    """A vertebra segmentation (segmentation node or label map volume) as an integer label image.

    Args:
        segmentationNode: ``vtkMRMLSegmentationNode`` (one segment per vertebra) or ``vtkMRMLLabelMapVolumeNode``.
            Not modified.
        referenceVolumeNode: The volume whose grid a segmentation node is rasterised on (the CT).
        role: Name used in error messages.

    Returns:
        ``(uint16 label image, {label value: name})``; names come from the segments, or are empty for a label map
        volume (the core then names the labels from their numbering).
    """
    if segmentationNode is None:
        raise InputError(f"no {role} selected")
    if segmentationNode.IsA("vtkMRMLLabelMapVolumeNode") or segmentationNode.IsA("vtkMRMLScalarVolumeNode"):
        image = volumeToImage(segmentationNode, role)
        array = sitk.GetArrayViewFromImage(image)
        if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
            raise InputError(f"{role} '{segmentationNode.GetName()}' holds fractional values, not labels")
        return sitk.Cast(image, sitk.sitkUInt16), {}
    if not segmentationNode.IsA("vtkMRMLSegmentationNode"):
        kind = segmentationNode.GetClassName()
        raise InputError(f"{role} must be a segmentation or a label map volume, not a {kind}")
    ids, names = segmentLabelValues(segmentationNode)
    segmentIds = vtk.vtkStringArray()
    labelValues = vtk.vtkIntArray()
    for segmentId, value in zip(ids, names):
        segmentIds.InsertNextValue(segmentId)
        labelValues.InsertNextValue(int(value))
    merged = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        segmentationNode, referenceVolumeNode, segmentIds, 0, merged, labelValues
    )
    geometry = volumeGeometry(referenceVolumeNode, "reference volume")
    extent = merged.GetExtent()
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    scalars = merged.GetPointData().GetScalars()
    if scalars is None or min(shape) < 1:
        raise InputError(
            f"{role} '{segmentationNode.GetName()}' could not be rasterised on '{referenceVolumeNode.GetName()}' "
            "(does it have a binary labelmap representation?)"
        )
    # The merged label map lies on the reference's voxel grid, possibly on a sub-extent of it.
    array = np.zeros(geometry.shape, dtype=np.uint16)
    values = numpy_support.vtk_to_numpy(scalars).reshape(shape)
    k0, j0, i0 = max(extent[4], 0), max(extent[2], 0), max(extent[0], 0)
    k1, j1, i1 = (min(e + 1, s) for e, s in zip((extent[5], extent[3], extent[1]), geometry.shape))
    array[k0:k1, j0:j1, i0:i1] = values[
        k0 - extent[4] : k1 - extent[4], j0 - extent[2] : j1 - extent[2], i0 - extent[0] : i1 - extent[0]
    ]
    labels = geometry.apply_to(sitk.GetImageFromArray(array))
    return labels, names


def displayName(label: int, names: Mapping[int, str], fallback: str) -> str:
    """The name to show for a label: its segment name unless that is a generic one ("Label_3"), else ``fallback``."""
    name = names.get(int(label))
    if name and not _GENERIC_NAME.match(name):
        return name
    return fallback or (name or str(label))


def updateSegmentationFromLabelImage(
    segmentationNode: slicer.vtkMRMLSegmentationNode,
    labels: sitk.Image,
    names: Mapping[int, str],
    colors: Mapping[int, Sequence[float]] | None = None,
) -> dict[int, str]:
    """Replace the segments of ``segmentationNode`` by one segment per non-zero label of ``labels``.

    Returns:
        ``{label value: segment id}``.
    """
    image = sitk.Cast(labels, sitk.sitkUInt16)
    oriented = slicer.vtkOrientedImageData()
    oriented.SetDimensions(*image.GetSize())
    oriented.SetImageToWorldMatrix(arrayToVtkMatrix(Geometry.of(image).ijk_to_ras()))
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image)).ravel()
    oriented.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array, deep=True, array_type=vtk.VTK_UNSIGNED_SHORT))
    segmentation = segmentationNode.GetSegmentation()
    segmentation.RemoveAllSegments()
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(oriented, segmentationNode):
        raise RuntimeError("could not convert the warped label map into segments")
    segmentIds: dict[int, str] = {}
    for i in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segmentId)
        value = int(segment.GetLabelValue())
        segmentIds[value] = segmentId
        segment.SetName(names.get(value, str(value)))
        if colors and value in colors:
            segment.SetColor(*[float(c) for c in colors[value][:3]])
    return segmentIds


# ------------------------------------------------------------------------------------------------ markups


def markupsToPoints(markupsNode: slicer.vtkMRMLMarkupsNode | None, role: str = "point list") -> dict[str, np.ndarray]:
    """Control points of a markups node as ``{label: (3,) LPS mm}`` in world coordinates.

    Points without a defined position are skipped; an empty label becomes the point's 1-based index.

    Raises:
        InputError: Two points share a label.
    """
    if markupsNode is None:
        return {}
    points: dict[str, np.ndarray] = {}
    position = [0.0, 0.0, 0.0]
    for i in range(markupsNode.GetNumberOfControlPoints()):
        if markupsNode.GetNthControlPointPositionStatus(i) == markupsNode.PositionUndefined:
            continue
        label = markupsNode.GetNthControlPointLabel(i).strip() or str(i + 1)
        if label in points:
            raise InputError(f"{role} '{markupsNode.GetName()}' has two points labelled {label!r}")
        markupsNode.GetNthControlPointPositionWorld(i, position)
        points[label] = ras_points_to_lps(np.asarray([position], dtype=np.float64))[0]
    return points


def pointPairs(
    ctMarkups: slicer.vtkMRMLMarkupsNode | None, mrMarkups: slicer.vtkMRMLMarkupsNode | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Corresponding ``(CT point, MR point)`` pairs in LPS mm from two point lists.

    Points are paired by label when both lists use the same labels, otherwise by order (the lists must then have
    the same number of points).
    """
    ct = markupsToPoints(ctMarkups, "CT correction points")
    mr = markupsToPoints(mrMarkups, "MR correction points")
    if not ct and not mr:
        return []
    if set(ct) == set(mr):
        return [(ct[name], mr[name]) for name in ct]
    if len(ct) != len(mr):
        raise InputError(
            f"correction points: {len(ct)} CT point(s) but {len(mr)} MR point(s); add the missing ones or give "
            "both lists the same labels"
        )
    return list(zip(ct.values(), mr.values()))


# ---------------------------------------------------------------------------------------------- transforms


def rasMatrixFromLps(matrix: np.ndarray) -> np.ndarray:
    """A 4x4 LPS -> LPS map expressed as RAS -> RAS (``C M C`` with ``C = diag(-1, -1, 1, 1)``)."""
    c = lps_to_ras_matrix()
    return c @ np.asarray(matrix, dtype=np.float64) @ c


def gridTransformFromField(field: sitk.Image) -> slicer.vtkOrientedGridTransform:
    """An oriented VTK grid transform from an ITK displacement-field image (LPS mm, fixed -> moving).

    The grid keeps the field's spacing, origin and direction (converted to RAS); the vectors are converted from LPS
    to RAS, so the transform maps a world RAS point ``x`` to ``x + u(x)``, i.e. Slicer's "from parent" direction.
    """
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise InputError("a displacement field must be a 3D image with 3 components per voxel")
    geometry = Geometry.of(field)
    vectors = sitk.GetArrayFromImage(field).astype(np.float64)  # (D, H, W, 3) LPS
    vectors = lps_points_to_ras(vectors.reshape(-1, 3))
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*field.GetSize())
    imageData.SetSpacing(*geometry.spacing)
    ijkToRas = geometry.ijk_to_ras()
    imageData.SetOrigin(*ijkToRas[:3, 3])
    array = numpy_support.numpy_to_vtk(np.ascontiguousarray(vectors), deep=True, array_type=vtk.VTK_DOUBLE)
    array.SetNumberOfComponents(3)
    imageData.GetPointData().SetScalars(array)
    direction = np.eye(4)
    direction[:3, :3] = ijkToRas[:3, :3] / np.asarray(geometry.spacing)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(imageData)
    transform.SetGridDirectionMatrix(arrayToVtkMatrix(direction))
    transform.SetInterpolationModeToLinear()
    return transform


def compositeTransform(prealignLps: np.ndarray, field: sitk.Image) -> vtk.vtkGeneralTransform:
    """The registration's whole map as one VTK transform, RAS world -> RAS world, MR point -> CT point.

    The core's composite applies the displacement field first and then the rigid pre-alignment
    (``y = P(x + u(x))``); VTK's pre-multiplied concatenation applies the last-added transform first.
    """
    linear = vtk.vtkTransform()
    linear.SetMatrix(arrayToVtkMatrix(rasMatrixFromLps(prealignLps)))
    general = vtk.vtkGeneralTransform()
    general.PreMultiply()
    general.Concatenate(linear)
    general.Concatenate(gridTransformFromField(field))
    return general

"""Axis order, units, sampling convention and physical geometry: the one place that defines them.

Conventions used by every other module:

Array axis order
    numpy arrays and torch tensors are indexed ``[k, j, i]`` (slowest to fastest), exactly as
    ``SimpleITK.GetArrayFromImage`` returns them. Torch volumes are ``(B, C, D, H, W)`` with ``D = k``, ``H = j``,
    ``W = i``. Anything "in array order" lists the three spatial axes as ``(D, H, W)``.
ITK order
    ``spacing``, ``origin`` and the columns of ``direction`` follow ITK's ``(i, j, k)`` = ``(x, y, z)`` order, as
    SimpleITK and file headers store them.
Displacement fields
    ``(B, 3, D, H, W)`` tensors in *voxels of the grid they are defined on*, channel ``c`` displacing along array
    axis ``c`` (``k, j, i``). A field ``u`` maps a fixed-grid voxel ``x`` to the moving-grid voxel ``x + u(x)``
    (pull-back / backward mapping, as resampling needs).
Physical space
    Millimetres in ITK's LPS frame. Slicer's RAS frame appears only through :func:`lps_to_ras_matrix` and the
    ``*_ras`` helpers below.
Sampling
    ``torch.nn.functional.grid_sample`` with ``align_corners=True``: normalised coordinates -1 and +1 are the centres
    of the first and last voxel, so voxel ``n`` of an axis of size ``N`` sits at ``2 n / (N - 1) - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .validation import check_image, check_points, check_tensor

ALIGN_CORNERS = True

#: Multiplying an LPS point by this (and back) gives RAS: the first two axes flip sign.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """The physical placement of a 3D voxel grid.

    Attributes:
        shape: Grid size in array order ``(D, H, W)`` = ``(nk, nj, ni)``.
        spacing: Voxel size in mm, ITK order ``(i, j, k)``.
        origin: LPS position in mm of the centre of voxel ``(0, 0, 0)``.
        direction: 3x3 matrix whose columns are the LPS unit vectors of the ``i``, ``j``, ``k`` axes.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major, as SimpleITK's GetDirection()

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1 or not all(float(s).is_integer() for s in self.shape):
            raise InputError(f"a 3D grid needs three positive sizes, got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0 or not np.all(np.isfinite(self.spacing)):
            raise InputError(f"spacing must be three positive numbers (mm), got {self.spacing}")
        if len(self.origin) != 3 or not np.all(np.isfinite(self.origin)):
            raise InputError(f"origin must be three finite numbers (mm), got {self.origin}")
        if (
            len(self.direction) != 9
            or not np.all(np.isfinite(self.direction))
            or abs(abs(np.linalg.det(self.direction_matrix)) - 1.0) > 1e-3
        ):
            raise InputError(f"direction must be an orthonormal 3x3 matrix, got {self.direction}")

    @property
    def direction_matrix(self) -> np.ndarray:
        """(3, 3) float64, columns = LPS directions of the ``i, j, k`` axes."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def spacing_array_order(self) -> tuple[float, float, float]:
        """Voxel size in mm in array order ``(D, H, W)`` = ``(k, j, i)``."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        """The geometry of a 3D SimpleITK image."""
        check_image(image, components=None)
        size = image.GetSize()
        return cls(
            shape=(size[2], size[1], size[0]),
            spacing=tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in image.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @classmethod
    def from_index_to_lps(cls, shape: Sequence[int], matrix: np.ndarray) -> Geometry:
        """Build a geometry from an array-order shape and a 4x4 ``(i, j, k, 1) -> LPS`` matrix."""
        m = np.asarray(matrix, dtype=np.float64)
        if m.shape not in ((4, 4), (3, 4)):
            raise InputError(f"an index-to-physical matrix must be 4x4, got shape {m.shape}")
        if not np.all(np.isfinite(m)):
            raise InputError("the index-to-physical matrix contains NaN or infinite values")
        linear = m[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        if np.any(spacing <= 0):
            raise InputError("index-to-physical matrix has a zero-length axis")
        direction = linear / spacing
        return cls(
            shape=tuple(int(s) for s in shape),  # type: ignore[arg-type]
            spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in m[:3, 3]),  # type: ignore[arg-type]
            direction=tuple(float(d) for d in direction.ravel()),
        )

    @classmethod
    def from_ijk_to_ras(cls, shape: Sequence[int], ijk_to_ras: np.ndarray) -> Geometry:
        """Build a geometry from Slicer's 4x4 IJK-to-RAS matrix and an array-order shape."""
        m = np.asarray(ijk_to_ras, dtype=np.float64)
        if m.shape != (4, 4):
            raise InputError(f"an IJK-to-RAS matrix must be 4x4, got shape {m.shape}")
        return cls.from_index_to_lps(shape, lps_to_ras_matrix() @ m)

    def index_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping ITK-order voxel indices ``(i, j, k, 1)`` to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def array_index_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping array-order voxel indices ``(k, j, i, 1)`` to LPS mm."""
        return self.index_to_lps() @ _ARRAY_TO_ITK_ORDER

    def ijk_to_ras(self) -> np.ndarray:
        """Slicer's 4x4 IJK-to-RAS matrix for this grid."""
        return lps_to_ras_matrix() @ self.index_to_lps()

    def lps_to_array_index(self, points: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` LPS points (mm) to continuous array-order indices ``(N, 3)`` = ``(k, j, i)``."""
        return apply_matrix(np.linalg.inv(self.array_index_to_lps()), points)

    def array_index_to_lps_points(self, indices: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` array-order indices ``(k, j, i)`` to LPS points (mm)."""
        return apply_matrix(self.array_index_to_lps(), indices)

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry's spacing, origin and direction on ``image`` (in place) and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference_image(self, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
        """An empty SimpleITK image on this grid (a resampling reference)."""
        size = (self.shape[2], self.shape[1], self.shape[0])
        return self.apply_to(sitk.Image(size, pixel_type))

    def same_grid(self, other: Geometry, tol_mm: float = 1e-3) -> bool:
        """True when both grids have the same shape and voxel centres agree within ``tol_mm``."""
        if self.shape != other.shape:
            return False
        corners = np.array([[0, 0, 0], [s - 1 for s in self.shape]], dtype=np.float64)
        a = self.array_index_to_lps_points(corners)
        b = other.array_index_to_lps_points(corners)
        return bool(
            np.abs(a - b).max() <= tol_mm
            and np.allclose(self.direction_matrix, other.direction_matrix, atol=1e-4)
            and np.allclose(self.spacing, other.spacing, atol=tol_mm)
        )

    def corners_lps(self) -> np.ndarray:
        """(8, 3) LPS positions (mm) of the outer voxel centres."""
        d, h, w = (s - 1 for s in self.shape)
        idx = np.array([[k, j, i] for k in (0, d) for j in (0, h) for i in (0, w)], dtype=np.float64)
        return self.array_index_to_lps_points(idx)


_ARRAY_TO_ITK_ORDER = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def lps_to_ras_matrix() -> np.ndarray:
    """4x4 matrix converting LPS to RAS (it is its own inverse)."""
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS
    return m


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 homogeneous matrix to ``(N, 3)`` points."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise InputError(f"matrix must be 4x4 (homogeneous), got shape {matrix.shape}")
    pts = check_points(points)
    return pts @ matrix[:3, :3].T + matrix[:3, 3]


def lps_points_to_ras(points: np.ndarray) -> np.ndarray:
    """``(N, 3)`` LPS points to RAS (or RAS to LPS: the conversion is symmetric)."""
    return check_points(points) @ LPS_TO_RAS


ras_points_to_lps = lps_points_to_ras


def image_to_tensor(image: sitk.Image, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 3D SimpleITK scalar image as a ``(1, 1, D, H, W)`` tensor (array order)."""
    check_image(image)
    array = sitk.GetArrayFromImage(image)
    if dtype.is_floating_point:
        array = array.astype(np.float32)
    else:
        array = array.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)[None, None]


def tensor_to_image(tensor: torch.Tensor | np.ndarray, geometry: Geometry) -> sitk.Image:
    """A ``(D, H, W)``, ``(1, D, H, W)`` or ``(1, 1, D, H, W)`` tensor or array as a SimpleITK image on ``geometry``."""
    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be a Geometry, got {type(geometry).__name__}")
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    if array.ndim < 3 or array.ndim > 5 or any(n != 1 for n in array.shape[:-3]):
        raise InputError(f"expected a (D, H, W), (1, D, H, W) or (1, 1, D, H, W) array, got shape {array.shape}")
    array = array.reshape(array.shape[-3:])
    if tuple(array.shape) != geometry.shape:
        raise InputError(f"array shape {array.shape} does not match the grid {geometry.shape}")
    return geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))


def voxel_to_normalized(coords: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Convert voxel coordinates to ``grid_sample``'s normalised grid.

    Args:
        coords: ``(B, 3, D', H', W')`` absolute voxel coordinates, channels in array order ``(k, j, i)``.
        sizes: ``(D, H, W)`` of the volume the coordinates index; defaults to the coordinates' own grid.

    Returns:
        ``(B, D, H, W, 3)`` normalised coordinates with the last axis in ``grid_sample``'s ``(x, y, z)`` =
        ``(i, j, k)`` order, for ``align_corners=True``.
    """
    check_tensor(coords, "voxel coordinates", ndim=5, channels=3, floating=True)
    sizes = coords.shape[2:] if sizes is None else sizes
    scale = torch.tensor([2.0 / max(int(s) - 1, 1) for s in sizes], dtype=coords.dtype, device=coords.device)
    normalized = coords * scale.view(1, 3, 1, 1, 1) - 1.0
    return normalized.permute(0, 2, 3, 4, 1).flip(-1)


def displacement_to_lps(displacement: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Convert a voxel displacement field on ``geometry`` to LPS millimetres.

    Args:
        displacement: ``(B, 3, D, H, W)`` voxels, channels in array order ``(k, j, i)``.
        geometry: The grid the field lives on.

    Returns:
        ``(B, 3, D, H, W)`` displacement in mm, channels ``(L, P, S)`` (ITK's x, y, z), ready for an ITK
        displacement-field transform.
    """
    _check_field_on(displacement, geometry, "displacement")
    # Array-order voxel steps -> LPS: columns of direction @ diag(spacing), reordered to (k, j, i).
    m = geometry.array_index_to_lps()[:3, :3]
    m_t = torch.as_tensor(m, dtype=displacement.dtype, device=displacement.device)
    return torch.einsum("pc,bcdhw->bpdhw", m_t, displacement)


def displacement_from_lps(displacement_lps: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Inverse of :func:`displacement_to_lps`: LPS mm ``(B, 3, D, H, W)`` to voxels in array order."""
    _check_field_on(displacement_lps, geometry, "displacement (LPS mm)")
    m = np.linalg.inv(geometry.array_index_to_lps()[:3, :3])
    m_t = torch.as_tensor(m, dtype=displacement_lps.dtype, device=displacement_lps.device)
    return torch.einsum("cp,bpdhw->bcdhw", m_t, displacement_lps)


def displacement_field_image(displacement: torch.Tensor, geometry: Geometry) -> sitk.Image:
    """A voxel displacement field ``(1, 3, D, H, W)`` as an ITK vector image in LPS mm (float64).

    The result can be wrapped in ``sitk.DisplacementFieldTransform`` or written as a ``.nii.gz``/``.nrrd`` that
    Slicer loads as a grid transform (fixed -> moving, the resampling direction).
    """
    _check_field_on(displacement, geometry, "displacement")
    if displacement.shape[0] != 1:
        raise InputError(f"displacement must be (1, 3, D, H, W), got {tuple(displacement.shape)}")
    lps = displacement_to_lps(displacement.double(), geometry)[0].permute(1, 2, 3, 0).cpu().numpy()
    image = sitk.GetImageFromArray(np.ascontiguousarray(lps), isVector=True)
    return geometry.apply_to(image)


def displacement_from_field_image(image: sitk.Image) -> tuple[torch.Tensor, Geometry]:
    """Read an ITK displacement-field vector image (LPS mm) back to ``(1, 3, D, H, W)`` voxels and its grid."""
    check_image(image, "a displacement field", components=3)
    geometry = Geometry.of(image)
    lps = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float64)).permute(3, 0, 1, 2)[None]
    return displacement_from_lps(lps, geometry).float(), geometry


def _check_field_on(field: torch.Tensor, geometry: Geometry, name: str) -> None:
    """Raise unless ``field`` is a finite ``(B, 3, D, H, W)`` float tensor on ``geometry``'s grid."""
    check_tensor(field, name, ndim=5, channels=3, floating=True, finite=True)
    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be a Geometry, got {type(geometry).__name__}")
    if tuple(field.shape[2:]) != geometry.shape:
        raise InputError(f"{name} grid {tuple(field.shape[2:])} does not match the image grid {geometry.shape}")

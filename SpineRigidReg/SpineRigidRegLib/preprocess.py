"""Resampling, intensity normalisation, and crop/pad with an exact inverse.

Every resampling goes through :func:`resample_to_reference` (SimpleITK, physical coordinates), so label maps are
placed by physical position and never assumed to share an image's grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import InputError
from .geometry import Geometry
from .validation import check_image, check_shape3, check_tensor

#: Lower and upper percentiles mapped to 0 and 1 by :func:`normalize_intensity`.
NORMALIZATION_PERCENTILES = (0.5, 99.5)


def resample_to_reference(
    image: sitk.Image,
    reference: sitk.Image | Geometry,
    transform: sitk.Transform | None = None,
    is_label: bool = False,
    default_value: float = 0.0,
) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid.

    Args:
        image: Any 3D scalar image.
        reference: The target grid (an image or a :class:`Geometry`).
        transform: Maps reference (output) physical points to ``image`` physical points (ITK's resampling
            direction); ``None`` is the identity.
        is_label: Nearest-neighbour interpolation and the input's integer pixel type; otherwise linear, float32.
        default_value: Value outside ``image``.
    """
    check_image(image)
    if isinstance(reference, Geometry):
        ref = reference.reference_image()
    else:
        ref = check_image(reference, "reference image", components=None)
    if transform is not None and not isinstance(transform, sitk.Transform):
        raise TypeError(f"transform must be a SimpleITK.Transform, got {type(transform).__name__}")
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    pixel = image.GetPixelID() if is_label else sitk.sitkFloat32
    source = image if is_label else sitk.Cast(image, sitk.sitkFloat32)
    return sitk.Resample(source, ref, transform or sitk.Transform(), interpolator, default_value, pixel)


def field_of_view(
    image: sitk.Image, reference: sitk.Image | Geometry, transform: sitk.Transform | None = None
) -> sitk.Image:
    """uint8 mask on ``reference``'s grid: 1 where resampling ``image`` (through ``transform``, as in
    :func:`resample_to_reference`) reads data from inside it, 0 where it falls outside ``image``'s field of view."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return resample_to_reference(ones, reference, transform, is_label=True)


def isotropic_geometry(geometry: Geometry, spacing: float = 1.0) -> Geometry:
    """The grid of the same extent and direction as ``geometry`` with cubic voxels of ``spacing`` mm."""
    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be a Geometry, got {type(geometry).__name__}")
    if isinstance(spacing, bool) or not isinstance(spacing, (int, float, np.floating, np.integer)):
        raise TypeError(f"spacing must be a number (mm), got {type(spacing).__name__}")
    if not np.isfinite(spacing) or spacing <= 0:
        raise InputError(f"spacing must be a positive finite number (mm), got {spacing}")
    extent = [(n - 1) * s for n, s in zip(geometry.shape[::-1], geometry.spacing)]  # ITK order
    size_itk = [max(int(np.floor(e / spacing + 1e-6)) + 1, 1) for e in extent]
    return Geometry(
        shape=(size_itk[2], size_itk[1], size_itk[0]),
        spacing=(spacing, spacing, spacing),
        origin=geometry.origin,
        direction=geometry.direction,
    )


def resample_isotropic(image: sitk.Image, spacing: float = 1.0, is_label: bool = False) -> sitk.Image:
    """Resample to cubic voxels of ``spacing`` mm, keeping the image's origin, direction and extent."""
    return resample_to_reference(image, isotropic_geometry(Geometry.of(image), spacing), is_label=is_label)


def normalize_intensity(
    volume: torch.Tensor, mask: torch.Tensor | None = None, percentiles: Sequence[float] = NORMALIZATION_PERCENTILES
) -> torch.Tensor:
    """Map the robust intensity range of ``volume`` to [0, 1] (clipped), as the paper's preprocessing.

    Args:
        volume: ``(B, 1, D, H, W)`` any intensities (HU for CT, arbitrary for MR); each sample separately.
        mask: Optional ``(B, 1, D, H, W)`` boolean region over which the percentiles are computed.
        percentiles: The lower and upper percentile mapped to 0 and 1.

    Returns:
        ``(B, 1, D, H, W)`` float32 in [0, 1].
    """
    check_tensor(volume, "image", ndim=5)
    if volume.dtype == torch.bool or volume.is_complex():
        raise TypeError(f"image must hold real numbers, got {volume.dtype}")
    if volume.is_floating_point() and not bool(torch.isfinite(volume).all()):
        raise InputError("image contains NaN or infinite values")
    if mask is not None:
        check_tensor(mask, "normalisation mask", ndim=5)
        if mask.dtype != torch.bool:
            raise TypeError(f"normalisation mask must be a boolean tensor, got {mask.dtype}")
        if mask.shape != volume.shape:
            raise InputError(f"normalisation mask {tuple(mask.shape)} and image {tuple(volume.shape)} differ in shape")
    if len(percentiles) != 2 or not 0.0 <= percentiles[0] < percentiles[1] <= 100.0:
        raise InputError(f"percentiles must be two increasing values in [0, 100], got {tuple(percentiles)}")
    out = torch.empty_like(volume, dtype=torch.float32)
    q = torch.tensor([p / 100.0 for p in percentiles], dtype=torch.float32, device=volume.device)
    for b in range(volume.shape[0]):
        values = volume[b].float()
        sample = values[mask[b]] if mask is not None else values.reshape(-1)
        if sample.numel() == 0:
            raise InputError("the normalisation region is empty")
        if sample.numel() > 2_000_000:  # quantile() has an input size limit; a strided subsample is plenty
            sample = sample[:: sample.numel() // 1_000_000 + 1]
        lo, hi = quantiles(sample, q)
        scale = (hi - lo) if hi > lo else torch.ones((), device=volume.device)
        out[b] = ((values - lo) / scale).clamp(0.0, 1.0)
    return out


def quantiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) of a 1-D ``values``, bit for bit, found by selection
    rather than a full sort on a CPU: numpy's introselect of the few order statistics needed, several times faster
    on a registration's millions of voxels (issue 16's closing note, session 14), twice in every registration."""
    if values.device.type != "cpu" or values.dtype != q.dtype or values.numel() < 2 or bool(values.isnan().any()):
        return torch.quantile(values, q)
    ranks = q * (values.numel() - 1)  # as torch.quantile computes them, in q's dtype
    below, above = ranks.floor().long(), ranks.ceil().long()
    order = np.unique(np.concatenate([below.numpy(), above.numpy()]))
    selected = torch.from_numpy(np.partition(values.detach().numpy(), order))
    return torch.lerp(selected[below], selected[above], ranks - below)


@dataclass(frozen=True)
class CropPad:
    """A box of a grid, possibly reaching outside it (padding); applying and inverting it is exact.

    Attributes:
        source_shape: ``(D, H, W)`` of the grid the box is taken from.
        start: First voxel of the box in array order (negative = padding before).
        shape: ``(D, H, W)`` of the box.
    """

    source_shape: tuple[int, int, int]
    start: tuple[int, int, int]
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        check_shape3(self.source_shape, "crop source shape")
        check_shape3(self.shape, "crop shape")
        if len(self.start) != 3 or not all(float(s).is_integer() for s in self.start):
            raise InputError(f"crop start must be three whole numbers, got {self.start!r}")
        for a in range(3):  # a box that holds no voxel of the grid cannot be inverted
            if self.start[a] >= self.source_shape[a] or self.start[a] + self.shape[a] <= 0:
                raise InputError(
                    f"crop box (start {self.start}, shape {self.shape}) misses the grid {self.source_shape}"
                )

    def apply(self, volume: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """Cut the box out of ``(B, C, *source_shape)``, filling outside voxels with ``value``."""
        check_tensor(volume, "volume", ndim=5)
        if tuple(volume.shape[2:]) != self.source_shape:
            raise InputError(f"volume {tuple(volume.shape[2:])} is not on the crop's grid {self.source_shape}")
        pad, slices = self._pads_and_slices()
        cropped = volume[(slice(None), slice(None), *slices)]
        return F.pad(cropped, pad, value=value) if any(pad) else cropped

    def invert(self, volume: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """Put a ``(B, C, *shape)`` box back on the source grid; voxels the box does not cover get ``value``."""
        check_tensor(volume, "volume", ndim=5)
        if tuple(volume.shape[2:]) != self.shape:
            raise InputError(f"volume {tuple(volume.shape[2:])} is not the crop's shape {self.shape}")
        out = volume.new_full((*volume.shape[:2], *self.source_shape), value)
        pad, slices = self._pads_and_slices()
        inner = volume[
            (
                slice(None),
                slice(None),
                *[slice(pad[2 * (2 - a)], self.shape[a] - pad[2 * (2 - a) + 1]) for a in range(3)],
            )
        ]
        out[(slice(None), slice(None), *slices)] = inner
        return out

    def geometry(self, source: Geometry) -> Geometry:
        """The physical grid of the box, given the source grid's geometry."""
        if not isinstance(source, Geometry):
            raise TypeError(f"source must be a Geometry, got {type(source).__name__}")
        if source.shape != self.source_shape:
            raise InputError("geometry does not match the crop's source grid")
        origin = source.array_index_to_lps_points(np.array([self.start], dtype=np.float64))[0]
        return Geometry(shape=self.shape, spacing=source.spacing, origin=tuple(origin), direction=source.direction)

    def _pads_and_slices(self) -> tuple[list[int], list[slice]]:
        pad: list[int] = []
        slices = []
        for a in range(3):
            lo, hi = self.start[a], self.start[a] + self.shape[a]
            slices.append(slice(max(lo, 0), min(hi, self.source_shape[a])))
        for a in (2, 1, 0):  # F.pad lists the last axis first
            lo, hi = self.start[a], self.start[a] + self.shape[a]
            pad += [max(-lo, 0), max(hi - self.source_shape[a], 0)]
        return pad, slices


def crop_around(
    source_shape: Sequence[int], box_start: Sequence[int], box_stop: Sequence[int], multiple: int
) -> CropPad:
    """A :class:`CropPad` containing the voxel box ``[box_start, box_stop)``, grown symmetrically to a multiple.

    The box may extend beyond the source grid (the excess is padding).
    """
    source_shape = check_shape3(source_shape, "source shape")
    _check_multiple(multiple)
    if len(box_start) != 3 or len(box_stop) != 3:
        raise InputError(f"crop box start and stop need three values each, got {box_start!r} and {box_stop!r}")
    start, shape = [], []
    for a in range(3):
        length = int(box_stop[a]) - int(box_start[a])
        if length <= 0:
            raise InputError("crop box is empty")
        target = int(np.ceil(length / multiple) * multiple)
        grow = target - length
        start.append(int(box_start[a]) - grow // 2)
        shape.append(target)
    return CropPad(tuple(int(s) for s in source_shape), tuple(start), tuple(shape))  # type: ignore[arg-type]


def pad_to_multiple(volume: torch.Tensor, multiple: int, value: float = 0.0) -> tuple[torch.Tensor, CropPad]:
    """Pad ``(B, C, D, H, W)`` symmetrically so every spatial size is a multiple; returns the padded volume and
    the :class:`CropPad` whose :meth:`CropPad.invert` undoes it."""
    check_tensor(volume, "volume", ndim=5)
    _check_multiple(multiple)
    shape = tuple(int(s) for s in volume.shape[2:])
    crop = crop_around(shape, (0, 0, 0), shape, multiple)
    return crop.apply(volume, value), crop


def _check_multiple(multiple: object) -> None:
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)):
        raise TypeError(f"multiple must be an int, got {type(multiple).__name__}")
    if multiple < 1:
        raise InputError(f"multiple must be >= 1, got {multiple}")

"""Warping volumes with dense displacement fields, scaling and squaring, composition.

All fields follow :mod:`.geometry`: ``(B, 3, D, H, W)`` displacements in voxels, channels in array order
``(k, j, i)``, pull-back convention (the warped image at ``x`` is the moving image at ``x + u(x)``). Reference grids
are built from each input's shape on the fly, so every function accepts any volume size and nothing grid-shaped is
ever stored in a model's state dict.

Every public function checks its inputs (rank, channel count, floating dtype, finite fields, matching grids, a
field's batch size equal to the volume's or 1, same dtype and device) and raises :class:`.InputError` or
``TypeError`` naming the problem; the loops inside (scaling and squaring, label warping) call unchecked private
helpers so the checks run once per call.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .geometry import ALIGN_CORNERS, voxel_to_normalized
from .point_sampling import WHOLE_STENCIL
from .validation import check_label_tensor, check_shape3, check_tensor

#: The paper's number of scaling-and-squaring steps (velocity divided by 2**7 = 128).
DEFAULT_INTEGRATION_STEPS = 7

INTERPOLATION_MODES = ("bilinear", "nearest")
PADDING_MODES = ("zeros", "border", "reflection")

# ATen's 3-D grid_sample on the CPU runs one thread per batch sample, so a single sample uses one core whatever
# torch.get_num_threads() says. Splitting the sampled points of a lone sample into chunks that share the volume (an
# expanded view, no copy) lets the kernel use every thread; the result is the same (the volume's gradient is summed
# over the chunks, so only its rounding can differ). The volume's gradient then takes one volume per chunk, hence
# the memory cap.
_MAX_CPU_CHUNKS = 8
_MIN_POINTS_PER_CHUNK = 4096
_CHUNK_GRAD_BYTES = 256 * 2**20

# Identity grids by (shape, device, dtype): a small least-recently-used cache of read-only module-level tensors,
# never registered in any nn.Module (so never in a state dict).
_IDENTITY_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_IDENTITY_CACHE_SIZE = 8


def identity_grid(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel coordinates of a grid: ``(1, 3, D, H, W)``, channel ``c`` = index along array axis ``c``.

    Returns a new tensor that the caller may modify.
    """
    return _cached_identity(check_shape3(shape), device, dtype).clone()


def _cached_identity(shape: Sequence[int], device: torch.device | str | None, dtype: torch.dtype) -> torch.Tensor:
    """:func:`identity_grid` from the cache; the result is shared and must not be modified in place."""
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (tuple(int(s) for s in shape), device, dtype)
    grid = _IDENTITY_CACHE.get(key)
    if grid is None:
        axes = [torch.arange(int(s), device=device, dtype=dtype) for s in shape]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]
        _IDENTITY_CACHE[key] = grid
        while len(_IDENTITY_CACHE) > _IDENTITY_CACHE_SIZE:
            _IDENTITY_CACHE.popitem(last=False)
    else:
        _IDENTITY_CACHE.move_to_end(key)
    return grid


def sample_at(
    volume: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Sample ``volume`` ``(B, C, D, H, W)`` at voxel coordinates ``coords`` ``(B, 3, D', H', W')``.

    ``mode`` is ``grid_sample``'s (``"bilinear"`` is trilinear in 3D, or ``"nearest"``); ``padding_mode`` is
    ``"zeros"``, ``"border"`` or ``"reflection"``. Coordinates index ``volume``'s own grid.
    """
    _check_volume(volume, "volume")
    _check_field(coords, "voxel coordinates")
    _check_modes(mode, padding_mode)
    _check_batch_and_dtype(volume, coords, "volume", "voxel coordinates")
    return _sample_at(volume, coords, mode, padding_mode)


def _sample_at(volume: torch.Tensor, coords: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    if coords.shape[0] != volume.shape[0] and coords.shape[0] == 1:
        coords = coords.expand(volume.shape[0], *coords.shape[1:])
    normalized = voxel_to_normalized(coords, volume.shape[2:])
    return _grid_sample(volume, normalized, mode, padding_mode)


def _grid_sample(volume: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """``F.grid_sample`` (``align_corners`` of :mod:`.geometry`) of ``volume`` ``(B, C, D, H, W)`` at a normalised
    ``grid`` ``(B, D', H', W', 3)``, with a single CPU sample split into chunks of ``D'`` to use every thread."""
    chunks = _cpu_chunks(volume, grid)
    if chunks <= 1:
        return F.grid_sample(volume, grid, mode=mode, padding_mode=padding_mode, align_corners=ALIGN_CORNERS)
    depth, rest = grid.shape[1], grid.shape[2:4]
    per = -(-depth // chunks)
    extra = per * chunks - depth
    if extra:  # repeat the last slab so that every chunk has the same size; its samples are dropped below
        grid = torch.cat([grid, grid[:, -1:].expand(1, extra, *grid.shape[2:])], dim=1)
    out = F.grid_sample(
        volume.expand(chunks, *volume.shape[1:]),
        grid.reshape(chunks, per, *grid.shape[2:]),
        mode=mode,
        padding_mode=padding_mode,
        align_corners=ALIGN_CORNERS,
    )
    out = out.transpose(0, 1).reshape(1, volume.shape[1], chunks * per, *rest)
    return out[:, :, :depth] if extra else out


def _cpu_chunks(volume: torch.Tensor, grid: torch.Tensor) -> int:
    if volume.device.type != "cpu" or volume.dim() != 5 or volume.shape[0] != 1 or grid.shape[0] != 1:
        return 1
    points = grid.shape[1:4].numel()
    chunks = min(torch.get_num_threads(), _MAX_CPU_CHUNKS, grid.shape[1], points // _MIN_POINTS_PER_CHUNK)
    if volume.requires_grad:
        chunks = min(chunks, _CHUNK_GRAD_BYTES // max(volume.numel() * volume.element_size(), 1))
    return max(chunks, 1)


def warp(
    volume: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Warp ``volume`` ``(B, C, D, H, W)`` by ``displacement`` ``(B, 3, D, H, W)`` (voxels, same grid).

    Returns ``(B, C, D, H, W)``: ``out[x] = volume[x + u(x)]``, trilinear by default.
    """
    _check_volume(volume, "volume")
    _check_field(displacement, "displacement")
    _check_modes(mode, padding_mode)
    _check_same_grid(volume, displacement, "volume", "displacement")
    return _warp(volume, displacement, mode, padding_mode)


def _warp(volume: torch.Tensor, displacement: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """:func:`warp` without the input checks (for inner loops whose inputs are already checked)."""
    grid = _cached_identity(displacement.shape[2:], displacement.device, displacement.dtype)
    return _sample_at(volume, grid + displacement, mode, padding_mode)


#: Label maps whose largest value is below this are read by a histogram (linear in the voxels) instead of a sort.
_BINCOUNT_LIMIT = 2**16


def present_labels(labels: torch.Tensor) -> list[int]:
    """The sorted non-zero values of a non-negative integer label map (any shape). ``torch.unique`` sorts every
    voxel: 20 ms for a 1 mm processing grid, called several times a registration; the histogram takes a few."""
    if labels.numel() == 0:
        return []
    flat = labels.flatten().long()
    if int(flat.max()) < _BINCOUNT_LIMIT:
        return torch.bincount(flat)[1:].nonzero()[:, 0].add(1).tolist()
    return sorted({int(v) for v in flat.unique().tolist()} - {0})


def warp_labels(
    labels: torch.Tensor, displacement: torch.Tensor, label_values: Sequence[int] | None = None
) -> torch.Tensor:
    """Warp an integer label map and keep it crisp.

    Each label's indicator is interpolated trilinearly and every voxel takes the label with the largest weight
    (background included; ties keep the earlier label), which keeps thin structures better than nearest-neighbour
    sampling and never invents label values.

    Args:
        labels: ``(B, 1, D, H, W)`` integer labels, 0 = background.
        displacement: ``(B, 3, D, H, W)`` voxels.
        label_values: Labels to carry; defaults to every non-zero value present.

    Returns:
        ``(B, 1, D, H, W)`` int64 labels.
    """
    labels = check_label_tensor(labels, "label map")
    _check_field(displacement, "displacement")
    _check_same_grid(labels, displacement, "label map", "displacement", same_dtype=False)
    values = present_labels(labels) if label_values is None else list(label_values)
    out = torch.zeros_like(labels, dtype=torch.int64)
    if not values:
        return out
    grid = _cached_identity(displacement.shape[2:], displacement.device, displacement.dtype)
    points = grid + displacement
    best = _sample_at((labels == 0).to(displacement.dtype), points, "bilinear", "border")
    # A label's weight is zero wherever x + u(x) lies over a voxel from its box, so each label is sampled only on
    # the output voxels within max|u| + 1 of its box: a vertebra costs its neighbourhood, not the whole volume.
    reach = int(math.ceil(float(displacement.abs().amax()))) + 1
    sizes = labels.shape[2:]
    boxes = label_boxes(labels)
    for value in values:
        if value not in boxes:
            continue
        box = list(zip(boxes[value][0].tolist(), boxes[value][1].tolist()))
        source = [slice(max(lo - 1, 0), min(hi + 2, n)) for (lo, hi), n in zip(box, sizes)]
        region = [slice(max(lo - 1 - reach, 0), min(hi + 2 + reach, n)) for (lo, hi), n in zip(box, sizes)]
        offset = torch.tensor([s.start for s in source], dtype=points.dtype, device=points.device)
        weight = _sample_at(
            (labels[(slice(None), slice(None), *source)] == value).to(displacement.dtype),
            points[(slice(None), slice(None), *region)] - offset.view(1, 3, 1, 1, 1),
            "bilinear",
            "zeros",
        )
        region_index = (slice(None), slice(None), *region)
        better = weight > best[region_index]
        out[region_index] = torch.where(better, torch.full_like(weight, value, dtype=torch.int64), out[region_index])
        best[region_index] = torch.where(better, weight, best[region_index])
    return out


def label_boxes(labels: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Bounding box of every non-zero label of a ``(B, 1, D, H, W)`` integer map, over all samples.

    Returns:
        ``{label: (low, high)}``: inclusive voxel indices, int64 tensors of shape ``(3,)`` in array order, found in
        one pass over the labelled voxels.
    """
    index = labels[:, 0].nonzero()[:, 1:]
    if index.numel() == 0:
        return {}
    owner = labels[:, 0][labels[:, 0] != 0].long()
    size = int(owner.max()) + 1
    owner = owner[:, None].expand(-1, 3)
    big = int(max(labels.shape[2:]))
    low = torch.full((size, 3), big, dtype=index.dtype, device=index.device).scatter_reduce(0, owner, index, "amin")
    high = torch.full((size, 3), -1, dtype=index.dtype, device=index.device).scatter_reduce(0, owner, index, "amax")
    present = (high[:, 0] >= 0).nonzero().flatten().tolist()
    return {v: (low[v], high[v]) for v in present if v > 0}


def integrate_velocity(velocity: torch.Tensor, steps: int = DEFAULT_INTEGRATION_STEPS) -> torch.Tensor:
    """Scaling and squaring: the displacement of ``exp(v)`` for a stationary velocity field.

    Args:
        velocity: ``(B, 3, D, H, W)`` voxels.
        steps: ``T``; the field is divided by ``2**T`` and composed with itself ``T`` times.

    Returns:
        ``(B, 3, D, H, W)`` displacement in voxels, a diffeomorphism when ``v / 2**T`` is small.
    """
    _check_field(velocity, "velocity")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"integration steps must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise InputError(f"integration steps must be >= 0, got {steps}")
    displacement = velocity / (2**steps)
    for _ in range(steps):
        displacement = _compose(displacement, displacement)
    return displacement


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``outer ∘ inner``: ``x -> x + inner(x) + outer(x + inner(x))``.

    Both are ``(B, 3, D, H, W)`` voxel fields on the same grid; ``inner`` is applied first (it is sampled at ``x``,
    ``outer`` at the displaced points). Outside the grid ``outer`` is extended by its border values.
    """
    _check_field(outer, "outer displacement")
    _check_field(inner, "inner displacement")
    _check_same_grid(outer, inner, "outer displacement", "inner displacement")
    return _compose(outer, inner)


def _compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    return inner + _warp(outer, inner, "bilinear", "border")


def resize_displacement(displacement: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a voxel displacement field to another grid covering the same extent.

    The grids share their first and last voxel centres (``align_corners=True``), so each component is rescaled by
    ``(new_size - 1) / (old_size - 1)`` along its axis.

    Args:
        displacement: ``(B, 3, d, h, w)`` voxels of the coarse grid.
        shape: Target ``(D, H, W)``.

    Returns:
        ``(B, 3, D, H, W)`` voxels of the target grid.
    """
    _check_field(displacement, "displacement")
    shape = check_shape3(shape, "target shape")
    if shape == tuple(displacement.shape[2:]):
        return displacement
    scale = [(new - 1) / max(old - 1, 1) for new, old in zip(shape, displacement.shape[2:], strict=True)]
    resized = F.interpolate(displacement, size=shape, mode="trilinear", align_corners=ALIGN_CORNERS)
    return resized * torch.tensor(scale, dtype=resized.dtype, device=resized.device).view(1, 3, 1, 1, 1)


def displacement_from_velocity(velocity: torch.Tensor, integration_steps: int, shape: Sequence[int]) -> torch.Tensor:
    """``exp(velocity)`` as a ``(1, 3, *shape)`` displacement (voxels of ``shape``): the velocity ``(1, 3, d, h, w)``
    (voxels of its own grid) integrated by scaling and squaring, then resized; ``-velocity`` gives the inverse map."""
    with torch.no_grad():
        exponential = integrate_velocity(velocity, integration_steps)
    _keep_map(velocity, integration_steps, exponential)
    return resize_displacement(exponential, shape)


def map_of_velocity(velocity: torch.Tensor, integration_steps: int) -> torch.Tensor:
    """``exp(velocity)`` ``(1, 3, d, h, w)`` on the velocity's own grid (voxels), without gradient: a copy of the
    map :func:`displacement_from_velocity` integrated for an equal velocity among its last few calls (a manual
    correction starts from the previous result's velocity, whose map that result's run has just integrated), or a
    new integration."""
    for steps, kept_velocity, kept_map in list(_KEPT_MAPS):
        if steps == integration_steps and _same_tensor(kept_velocity, velocity):
            return kept_map.clone()
    with torch.no_grad():
        return integrate_velocity(velocity, integration_steps)


#: :func:`displacement_from_velocity`'s last :data:`_MAPS_KEPT` integrations, newest first: ``(integration steps,
#: velocity, map on the velocity's grid)``; two, so that a result's inverse map does not push out its map.
_KEPT_MAPS: list[tuple[int, torch.Tensor, torch.Tensor]] = []
_MAPS_KEPT = 2


def _keep_map(velocity: torch.Tensor, integration_steps: int, exponential: torch.Tensor) -> None:
    if velocity.shape[0] != 1:
        return
    _KEPT_MAPS[:] = [
        kept for kept in _KEPT_MAPS if not (kept[0] == integration_steps and _same_tensor(kept[1], velocity))
    ]
    _KEPT_MAPS.insert(0, (integration_steps, velocity.detach().clone(), exponential.clone()))
    del _KEPT_MAPS[_MAPS_KEPT:]


def forget_maps() -> None:
    """Drop the maps :func:`map_of_velocity` would reuse."""
    _KEPT_MAPS.clear()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


def _check_field(field: torch.Tensor, name: str) -> None:
    """A displacement, velocity or coordinate field: finite float ``(B, 3, D, H, W)``."""
    check_tensor(field, name, ndim=5, channels=3, floating=True, finite=True)


def _check_volume(volume: torch.Tensor, name: str) -> None:
    check_tensor(volume, name, ndim=5, floating=True)


def _check_modes(mode: str, padding_mode: str) -> None:
    if mode not in INTERPOLATION_MODES:
        raise InputError(f"interpolation mode must be one of {INTERPOLATION_MODES}, got {mode!r}")
    if padding_mode not in PADDING_MODES:
        raise InputError(f"padding mode must be one of {PADDING_MODES}, got {padding_mode!r}")


def _check_batch_and_dtype(
    volume: torch.Tensor, field: torch.Tensor, name_volume: str, name_field: str, same_dtype: bool = True
) -> None:
    if field.shape[0] not in (1, volume.shape[0]):
        raise InputError(
            f"{name_volume} {tuple(volume.shape)} and {name_field} {tuple(field.shape)} have different batch sizes"
        )
    if same_dtype and volume.dtype != field.dtype:
        raise TypeError(f"{name_volume} ({volume.dtype}) and {name_field} ({field.dtype}) must share a dtype")
    if volume.device != field.device:
        raise InputError(f"{name_volume} is on {volume.device} but {name_field} is on {field.device}")


def _check_same_grid(
    volume: torch.Tensor, field: torch.Tensor, name_volume: str, name_field: str, same_dtype: bool = True
) -> None:
    """Same ``(D, H, W)``; batch sizes equal or the field's 1 (broadcast); same dtype and device."""
    if volume.shape[2:] != field.shape[2:]:
        raise InputError(
            f"{name_volume} grid {tuple(volume.shape[2:])} and {name_field} grid {tuple(field.shape[2:])} differ"
        )
    _check_batch_and_dtype(volume, field, name_volume, name_field, same_dtype)


class SpatialTransformer(nn.Module):
    """``nn.Module`` wrapper of :func:`warp` (no state: the reference grid is built per call)."""

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros") -> None:
        super().__init__()
        self.mode = mode
        self.padding_mode = padding_mode

    def forward(self, volume: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        return warp(volume, displacement, mode=self.mode, padding_mode=self.padding_mode)


class VelocityIntegrator(nn.Module):
    """``nn.Module`` wrapper of :func:`integrate_velocity`."""

    def __init__(self, steps: int = DEFAULT_INTEGRATION_STEPS) -> None:
        super().__init__()
        self.steps = steps

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        return integrate_velocity(velocity, self.steps)


def to_grid(volume: torch.Tensor, shape: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resample ``(B, C, D, H, W)`` onto a grid of ``shape`` spanning the same extent (shared corner voxels)."""
    if tuple(volume.shape[2:]) == tuple(shape):
        return volume
    scale = [(big - 1) / max(small - 1, 1) for big, small in zip(volume.shape[2:], shape)]
    coords = identity_grid(shape, volume.device, torch.float32) * torch.tensor(scale, device=volume.device).view(
        1, 3, 1, 1, 1
    )
    return sample_at(volume.float(), coords, mode=mode, padding_mode="border").to(volume.dtype)


def inside_moving_image(moving_mask: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``(1, 1, ...)`` float 0/1: whether the moving image, sampled at voxel ``coords`` ``(1, 3, ...)`` of
    ``moving_mask``'s grid, reads only data there: the whole trilinear stencil inside ``moving_mask``.

    A sample partly outside interpolates towards the 0 beyond the field of view: an artificial edge inside the mask
    whose gradient pulled the bundled sample's cut vertebra 4 mm along the spine (a 0.5 threshold).
    """
    return (sample_at(moving_mask.float(), coords) > WHOLE_STENCIL).float()


def overlap_mask(
    fixed_mask: torch.Tensor | None, moving_mask: torch.Tensor | None, displacement: torch.Tensor
) -> torch.Tensor | None:
    """``(1, 1, D, H, W)`` float: 1 where the fixed image has data and the moving image, warped by ``displacement``
    (voxels of the masks' grid), has too (:func:`inside_moving_image`); ``None`` when neither mask is given.

    Similarities are compared only there: the edge of a field of view is a strong, artificial feature (the
    processing grid reaches past both images, which read 0 outside) that would hold a vertebra cut by it to the
    edge. Thresholded, so it passes no gradient: a soft weight would pull the images across the CT's edge.
    """
    mask = None if fixed_mask is None else fixed_mask.float()
    if moving_mask is not None:
        moved = inside_moving_image(
            moving_mask, identity_grid(displacement.shape[2:], displacement.device) + displacement
        )
        mask = moved if mask is None else mask * moved
    return mask

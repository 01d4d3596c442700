"""SynthSeg-style MR-like training images drawn from label maps, batched on any device.

For each image: a random patch of a label map (centred near the spine most of the time) is resampled through a
random rotation, scaling, left-right flip and smooth elastic deformation; every label gets a random mean intensity
and spread (cortical bone and air dark with high probability, as in every MR sequence), a smooth multiplicative
texture, optionally dark rims at tissue boundaries (the "India ink" of opposed-phase images); then the acquisition:
blur, thick slices along a random axis, a bias field, a gamma curve, Rician noise, the same [0, 1] normalisation as
inference (:func:`..preprocess.normalize_intensity`), and sometimes a field of view cut by a plane. The target is the
vertebral bone of the deformed labels, where the image has data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.synthesis import _gaussian_blur, _thick_slices
from ..preprocess import normalize_intensity
from .grid import WORKING_SPACING_MM
from .labelmaps import CORTEX, NUM_LABEL_IDS, LabelMap, is_vertebra


@dataclass(frozen=True)
class SynthSettings:
    """Ranges of the random generator (each drawn uniformly per image unless stated).

    Attributes:
        patch: Patch size in voxels, array order ``(S, P, L)``, on the working grid.
        spacing_mm: Working voxel size (mm).
        spine_centre_probability: Chance that a patch is centred on a vertebra voxel (else anywhere).
        rotation_deg: Largest rotation about each axis.
        scale: Isotropic scaling range.
        mirror_probability: Chance of a left-right mirror image.
        elastic_mm: Largest smooth deformation amplitude (mm), control points ``elastic_spacing_mm`` apart.
        intensity_spread: Range of the within-label standard deviation (image in [0, 1] units).
        texture: Range of the amplitude of the smooth multiplicative texture.
        dark_cortex_probability: Chance that cortical bone is drawn dark (< 0.25 of the other labels' range).
        dark_rim_probability: Chance of dark rims at label boundaries.
        blur_mm: Range of the Gaussian blur (sigma, mm) before the slices.
        thick_slice_probability: Chance of thick slices along a random axis.
        slice_mm: Range of the slice thickness (mm).
        bias: Largest bias-field log-amplitude.
        gamma: Range of the gamma exponent.
        noise: Range of the Rician noise level.
        fov_cut_probability: Chance that a random plane cuts the field of view.
        box_probability: Chance that the field of view is a box of ``box_mm`` sides around the patch centre (a
            scan cropped tightly around the spine); the image is normalised again inside it, as at inference.
        box_mm: Range of the box's sides (mm).
    """

    patch: tuple[int, int, int] = (64, 96, 96)
    spacing_mm: float = WORKING_SPACING_MM
    spine_centre_probability: float = 0.8
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.2)
    mirror_probability: float = 0.5
    elastic_mm: float = 4.0
    elastic_spacing_mm: float = 32.0
    intensity_spread: tuple[float, float] = (0.0, 0.12)
    texture: tuple[float, float] = (0.0, 0.3)
    dark_cortex_probability: float = 0.85
    dark_rim_probability: float = 0.25
    blur_mm: tuple[float, float] = (0.0, 1.5)
    thick_slice_probability: float = 0.7
    slice_mm: tuple[float, float] = (2.0, 8.0)
    bias: float = 0.6
    gamma: tuple[float, float] = (0.6, 1.6)
    noise: tuple[float, float] = (0.0, 0.08)
    fov_cut_probability: float = 0.3
    box_probability: float = 0.35
    box_mm: tuple[float, float] = (60.0, 140.0)


def _u(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _rotation(angles: Sequence[float]) -> torch.Tensor:
    """3x3 rotation from three angles (radians) about the array axes."""
    out = torch.eye(3, dtype=torch.float64)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        a, b = [x for x in range(3) if x != axis]
        r = torch.eye(3, dtype=torch.float64)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        out = r @ out
    return out


def _sampling_grid(
    label_map: LabelMap, settings: SynthSettings, generator: torch.Generator, bulk: torch.Generator
) -> torch.Tensor:
    """``(1, D, H, W, 3)`` grid_sample coordinates (x, y, z in [-1, 1]) of a randomly placed, rotated, scaled,
    flipped and elastically deformed patch in ``label_map``."""
    shape = torch.tensor(label_map.labels.shape, dtype=torch.float64)
    bone = torch.nonzero(label_map.bone)
    if bone.shape[0] and float(torch.rand((), generator=generator)) < settings.spine_centre_probability:
        centre = bone[int(torch.randint(bone.shape[0], (), generator=generator))].double()
    else:
        centre = torch.rand(3, generator=generator, dtype=torch.float64) * (shape - 1)
    angle = math.radians(settings.rotation_deg)
    matrix = _rotation([_u(generator, -angle, angle) for _ in range(3)]) / _u(generator, *settings.scale)
    if float(torch.rand((), generator=generator)) < settings.mirror_probability:
        matrix = matrix @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))  # left-right mirror
    device = bulk.device
    # whole-voxel offsets: an untransformed patch samples voxel centres, not the midpoints between them
    axes = [torch.arange(n, dtype=torch.float32, device=device) - n // 2 for n in settings.patch]
    local = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (D, H, W, 3) voxels, array order
    points = local @ matrix.T.float().to(device)
    coarse = [max(int(math.ceil(n * settings.spacing_mm / settings.elastic_spacing_mm)) + 1, 2) for n in settings.patch]
    amplitude = settings.elastic_mm / settings.spacing_mm * float(torch.rand((), generator=generator))
    elastic = torch.randn((1, 3, *coarse), generator=bulk, device=device) * amplitude
    elastic = F.interpolate(elastic, size=settings.patch, mode="trilinear", align_corners=True)[0]
    points = points + elastic.permute(1, 2, 3, 0) + centre.float().to(device)
    normalised = 2.0 * points / (shape.float().to(device) - 1).clamp(min=1) - 1.0
    return normalised.flip(-1)[None]  # grid_sample wants (x, y, z) = (W, H, D)


def _contrast(
    labels: torch.Tensor, settings: SynthSettings, generator: torch.Generator, bulk: torch.Generator
) -> torch.Tensor:
    """``(1, 1, D, H, W)`` clean intensities: a random mean and spread per label, texture, optional dark rims."""
    device = labels.device
    means = torch.rand(NUM_LABEL_IDS, generator=generator).to(device)
    spreads = (torch.rand(NUM_LABEL_IDS, generator=generator) * _u(generator, *settings.intensity_spread)).to(device)
    if float(torch.rand((), generator=generator)) < settings.dark_cortex_probability:
        means[CORTEX] = 0.25 * float(torch.rand((), generator=generator)) * float(means.min() + 0.2)
    if float(torch.rand((), generator=generator)) < 0.9:
        means[0] = 0.05 * float(torch.rand((), generator=generator))
    noise = torch.randn(labels.shape, generator=bulk, device=device)
    image = means[labels] + spreads[labels] * noise
    texture = torch.randn((1, 1, *[max(n // 6, 2) for n in labels.shape[2:]]), generator=bulk, device=device)
    texture = F.interpolate(texture, size=labels.shape[2:], mode="trilinear", align_corners=True)
    image = image * (1.0 + _u(generator, *settings.texture) * texture)
    if float(torch.rand((), generator=generator)) < settings.dark_rim_probability:
        image = image * (1.0 - 0.8 * _boundaries(labels).float())
    return image.clamp(min=0.0)


def _boundaries(labels: torch.Tensor) -> torch.Tensor:
    """Voxels whose label differs from a 6-neighbour's (``(1, 1, D, H, W)`` bool)."""
    edge = torch.zeros_like(labels, dtype=torch.bool)
    for axis in (2, 3, 4):
        differs = labels.narrow(axis, 1, labels.shape[axis] - 1) != labels.narrow(axis, 0, labels.shape[axis] - 1)
        edge.narrow(axis, 1, labels.shape[axis] - 1).logical_or_(differs)
    return edge


def _acquire(
    image: torch.Tensor, settings: SynthSettings, generator: torch.Generator, bulk: torch.Generator
) -> torch.Tensor:
    """Blur, thick slices, bias, gamma, Rician noise and [0, 1] normalisation of ``(1, 1, D, H, W)``."""
    device, step = image.device, settings.spacing_mm
    image = _gaussian_blur(image, [_u(generator, *settings.blur_mm) / step] * 3)
    if float(torch.rand((), generator=generator)) < settings.thick_slice_probability:
        axis = int(torch.randint(3, (), generator=generator))
        width = _u(generator, *settings.slice_mm) / step
        image = _gaussian_blur(image, [0.4 * width if a == axis else 0.0 for a in range(3)])
        image = _thick_slices(image, axis, width)
    bias = torch.randn((1, 1, 4, 4, 4), generator=bulk, device=device)
    bias = F.interpolate(bias, size=image.shape[2:], mode="trilinear", align_corners=True)
    image = image * torch.exp(_u(generator, 0.0, settings.bias) * bias)
    image = normalize_intensity(image, percentiles=(0.0, 100.0)) ** _u(generator, *settings.gamma)
    sigma = _u(generator, *settings.noise)
    real = torch.randn(image.shape, generator=bulk, device=device)
    imaginary = torch.randn(image.shape, generator=bulk, device=device)
    image = torch.sqrt((image + sigma * real) ** 2 + (sigma * imaginary) ** 2)
    return normalize_intensity(image)


def _fov_cut(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``(1, 1, D, H, W)`` bool: the side of a random plane through the patch's middle half that is kept."""
    normal = torch.randn(3, generator=generator)
    normal = (normal / normal.norm()).to(device)
    axes = [torch.linspace(-1.0, 1.0, n, device=device) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return ((grid @ normal) < _u(generator, -0.5, 0.5))[None, None]


def _box(settings: SynthSettings, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``(1, 1, D, H, W)`` bool: a random box of ``settings.box_mm`` sides (each drawn) near the patch's centre."""
    keep = torch.zeros((1, 1, *settings.patch), dtype=torch.bool, device=device)
    box = []
    for n in settings.patch:
        side = min(int(round(_u(generator, *settings.box_mm) / settings.spacing_mm)), n)
        start = int(round((n - side) / 2 + _u(generator, -0.15, 0.15) * side))
        start = min(max(start, 0), n - side)
        box.append(slice(start, start + side))
    keep[(slice(None), slice(None), *box)] = True
    return keep


def synthesize_batch(
    label_maps: Sequence[LabelMap],
    batch: int,
    settings: SynthSettings = SynthSettings(),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of synthetic MR-like images and their vertebral-bone targets.

    Args:
        label_maps: Anatomies to draw from (their ``labels`` may already live on ``device``).
        batch: Number of images.
        settings: Ranges of the generator.
        generator: CPU random source of the per-image choices; it also seeds a generator on ``device`` for the
            voxel-wise noise, so the same seed gives the same batch on the same kind of device.
        device: Where the images are made.

    Returns:
        ``images`` ``(B, 1, D, H, W)`` float32 in [0, 1] and ``targets`` ``(B, 1, D, H, W)`` float32 in {0, 1},
        ``(D, H, W)`` = ``settings.patch`` at ``settings.spacing_mm``, axes ``(S, P, L)``.
    """
    generator = generator or torch.Generator().manual_seed(0)
    device = torch.device(device)
    bulk = torch.Generator(device).manual_seed(int(torch.randint(2**62, (), generator=generator)))
    images, targets = [], []
    for _ in range(batch):
        label_map = label_maps[int(torch.randint(len(label_maps), (), generator=generator))]
        grid = _sampling_grid(label_map, settings, generator, bulk)
        source = label_map.labels.to(device)[None, None].float()
        labels = F.grid_sample(source, grid, mode="nearest", padding_mode="zeros", align_corners=True).long()
        image = _acquire(_contrast(labels, settings, generator, bulk), settings, generator, bulk)
        target = is_vertebra(labels)
        keep = torch.ones_like(target)
        if float(torch.rand((), generator=generator)) < settings.fov_cut_probability:
            keep &= _fov_cut(settings.patch, generator, device)
        if float(torch.rand((), generator=generator)) < settings.box_probability:
            keep &= _box(settings, generator, device)
            image = normalize_intensity(image, mask=keep)
        image, target = image * keep, target & keep
        images.append(image)
        targets.append(target.float())
    return torch.cat(images), torch.cat(targets)

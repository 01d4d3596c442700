"""The fixed image's bone input of a label-guided network during training: the true bone, degraded like a prediction.

At inference the network (``NetworkConfig.use_fixed_bone``) gets the MR segmentation network's bone probability
(:mod:`..segmentation`), which misses bone, takes a disc or the canal for bone, is blurred at its edges, and on some
MRs finds almost nothing (docs/MR_SEGMENTATION.md). Trained on the perfect fixed labels the registration network
would trust that input blindly; trained on degraded ones it learns to combine it with the images, and to fall back
on them when the input is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BoneInputNoise:
    """How a true bone mask is degraded (probabilities per pair, sizes in voxels of the training grid).

    Attributes:
        empty: Probability of an all-zero input (no segmentation model, or nothing found).
        weak: Probability of a faint input (scaled by 0.1-0.4: a prediction below the threshold everywhere).
        dilate, erode: Probability of growing / shrinking the mask by one voxel.
        holes: Largest share of the bone removed in smooth blobs (missed bone).
        false_positive: Largest share of the one- to three-voxel band around the bone added in smooth blobs (discs,
            canal, ligaments taken for bone).
        blob_voxels: Size of the smooth blobs (the noise's correlation length).
    """

    empty: float = 0.1
    weak: float = 0.1
    dilate: float = 0.25
    erode: float = 0.25
    holes: float = 0.4
    false_positive: float = 0.4
    blob_voxels: int = 6


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _blobs(shape: torch.Size, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth noise in [0, 1] of ``shape`` ``(1, 1, D, H, W)`` with features of about ``size`` voxels."""
    coarse = [max(2, s // size + 2) for s in shape[2:]]
    noise = torch.rand((1, 1, *coarse), generator=generator)
    return F.interpolate(noise, size=tuple(shape[2:]), mode="trilinear", align_corners=True)


def _dilate(mask: torch.Tensor, voxels: int = 1) -> torch.Tensor:
    return F.max_pool3d(mask, 2 * voxels + 1, stride=1, padding=voxels)


def degrade_one(bone: torch.Tensor, noise: BoneInputNoise, generator: torch.Generator) -> torch.Tensor:
    """One degraded bone probability.

    Args:
        bone: ``(1, 1, D, H, W)`` float mask in {0, 1} (CPU).
        noise: Degradation settings.
        generator: CPU generator (seeded by the caller: the same seed gives the same input).

    Returns:
        ``(1, 1, D, H, W)`` float in [0, 1].
    """
    draw = float(torch.rand((), generator=generator))
    if draw < noise.empty:
        return torch.zeros_like(bone)
    mask = bone
    if _uniform(generator, 0, 1) < noise.dilate:
        mask = _dilate(mask)
    elif _uniform(generator, 0, 1) < noise.erode:
        mask = 1.0 - _dilate(1.0 - mask)
    removed = _uniform(generator, 0, noise.holes)
    if removed > 0:
        mask = mask * (_blobs(bone.shape, noise.blob_voxels, generator) >= removed).float()
    added = _uniform(generator, 0, noise.false_positive)
    if added > 0:
        band = _dilate(bone, int(torch.randint(1, 4, (), generator=generator))) - bone
        mask = torch.maximum(mask, band * (_blobs(bone.shape, noise.blob_voxels, generator) < added).float())
    probability = F.avg_pool3d(mask, 3, stride=1, padding=1, count_include_pad=False)
    if draw < noise.empty + noise.weak:
        probability = probability * _uniform(generator, 0.1, 0.4)
    return probability.clamp(0.0, 1.0)


def degraded_bone(fixed_labels: torch.Tensor, seed: int, noise: BoneInputNoise = BoneInputNoise()) -> torch.Tensor:
    """The network's bone input for a batch of training pairs.

    Args:
        fixed_labels: ``(B, 1, D, H, W)`` integer vertebra labels of the fixed images (any device).
        seed: Seed of the degradation (the step for training, the pair index for validation).
        noise: Degradation settings.

    Returns:
        ``(B, 1, D, H, W)`` float probability on ``fixed_labels``' device.
    """
    generator = torch.Generator().manual_seed(int(seed))
    bone = (fixed_labels > 0).float().cpu()
    out = [degrade_one(bone[i : i + 1], noise, generator) for i in range(bone.shape[0])]
    return torch.cat(out).to(fixed_labels.device)

"""Vertebral bone in an MR image: the bundled segmentation network, applied on the canonical grid.

The MR is resampled onto the patient-aligned 2 mm grid the network was trained on (:mod:`.grid`), normalised as in
training, padded to the network's multiple, segmented, and the probability is resampled back onto the MR's own grid
(linear), so it overlays the MR in any viewer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..checkpoint import load_weights, read_checkpoint, resources_dir
from ..errors import InputError
from ..geometry import Geometry, image_to_tensor
from ..inference import network_arithmetic
from ..preprocess import field_of_view, normalize_intensity, pad_to_multiple, resample_to_reference
from .grid import WORKING_SPACING_MM, canonical_geometry
from .net import SEGMENTATION_FORMAT, SegmentationConfig, SegmentationNet

#: Card of the bundled MR segmentation model, relative to ``Resources``.
BUNDLED_CARD = "Models/mr_vertebrae.json"

#: Probability above which a voxel counts as vertebral bone.
BONE_THRESHOLD = 0.5

#: Largest working grid (voxels): a wider field of view is segmented at coarser voxels, which bounds time and memory
#: (about 1 GB of activations on a CPU at this size).
MAX_WORKING_VOXELS = 2_500_000


def save_segmentation_checkpoint(path: str | os.PathLike, network: SegmentationNet, **extra: object) -> Path:
    """Write ``network`` with its config (and extra plain values or tensors, e.g. optimiser state) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": SEGMENTATION_FORMAT,
        "version": 1,
        "config": network.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        **extra,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_segmentation_network(
    path: str | os.PathLike, expected_sha256: str | None = None, device: torch.device | str = "cpu"
) -> SegmentationNet:
    """Rebuild a :class:`SegmentationNet` from its checkpoint (``weights_only``, optional sha256, strict)."""
    payload = read_checkpoint(path, expected_sha256, expected_format=SEGMENTATION_FORMAT)
    network = SegmentationNet(SegmentationConfig.from_dict(payload["config"]))
    return load_weights(network, payload, path).to(device).eval()


def bundled_card() -> dict | None:
    """The bundled segmentation model's card, or ``None`` when this installation has none."""
    path = resources_dir() / BUNDLED_CARD
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as stream:
        card = json.load(stream)
    card["_path"] = str(path)
    return card


def load_bundled_segmentation(device: torch.device | str = "cpu") -> SegmentationNet:
    """The bundled MR segmentation network after its sha256 check against the card."""
    card = bundled_card()
    if card is None:
        raise InputError(f"no bundled MR segmentation model ({resources_dir() / BUNDLED_CARD} is missing)")
    weights = Path(card["_path"]).parent / card["weights"]
    return load_segmentation_network(weights, expected_sha256=card["sha256"], device=device)


def predict_bone(
    mr: sitk.Image,
    network: SegmentationNet,
    device: torch.device | str = "cpu",
    spacing_mm: float = WORKING_SPACING_MM,
    precision: str = "float32",
) -> sitk.Image:
    """Probability of vertebral bone at every voxel of ``mr``.

    Args:
        mr: The MR image (any grid, direction and intensity scale; NaN-free).
        network: A :class:`SegmentationNet` (eval mode).
        device: Where the network runs.
        spacing_mm: The network's working voxel size (coarser for fields of view over :data:`MAX_WORKING_VOXELS`).
        precision: The network's arithmetic (:func:`..inference.network_arithmetic`).

    Returns:
        float32 probabilities in [0, 1] on ``mr``'s grid (0 where the MR has no data).
    """
    grid = canonical_geometry(Geometry.of(mr), spacing_mm)
    voxels = float(np.prod(grid.shape))
    if voxels > MAX_WORKING_VOXELS:
        grid = canonical_geometry(Geometry.of(mr), spacing_mm * (voxels / MAX_WORKING_VOXELS) ** (1.0 / 3.0))
    on_grid = resample_to_reference(mr, grid)
    inside = image_to_tensor(field_of_view(mr, grid), torch.float32) > 0
    image = image_to_tensor(on_grid)
    image = normalize_intensity(image, mask=inside) * inside
    padded, crop_pad = pad_to_multiple(image, network.config.required_multiple)
    with network_arithmetic(device, precision):
        logits = network(padded.to(device)).float().cpu()
    probability = torch.sigmoid(crop_pad.invert(logits)) * inside
    canonical = sitk.GetImageFromArray(probability[0, 0].numpy().astype(np.float32))
    grid.apply_to(canonical)
    return resample_to_reference(canonical, mr)


def dice(probability: sitk.Image, truth: sitk.Image, threshold: float = BONE_THRESHOLD) -> float:
    """Dice of ``probability > threshold`` against a binary mask on the same grid (1.0 when both are empty)."""
    predicted = sitk.GetArrayViewFromImage(probability) > threshold
    reference = sitk.GetArrayViewFromImage(truth) > 0
    total = predicted.sum() + reference.sum()
    return 1.0 if total == 0 else float(2.0 * (predicted & reference).sum() / total)

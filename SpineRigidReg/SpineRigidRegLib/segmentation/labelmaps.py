"""Anatomical label maps that synthetic MR images are drawn from, on the canonical grid (:mod:`.grid`).

Each map gives every voxel an anatomical label (one random MR intensity per label and image is drawn later, in
:mod:`.synth`) and marks the target: vertebral bone. The label ids are one scheme for all sources:

- 0 air outside the body; TotalSegmentator v2 "total" ids (1-117) for the organs, muscles and bones it names;
- :data:`FAT`, :data:`SOFT`, :data:`OTHER_BONE`, :data:`GAS` for what the segmentation leaves unnamed, from CT
  numbers; :data:`DISC`, :data:`CSF`, :data:`CORD` around the spine;
- :data:`MARROW` and :data:`CORTEX` for every vertebra (all vertebrae share them: in MR they look alike), the
  target of the segmentation;
- :data:`ORGAN_BASE` + n for smooth random "organs" added to the phantoms' plain soft tissue.

Sources: the real TotalSegmentator CT example (its labelled slices) and procedural phantoms (:mod:`..data.phantom`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..data.phantom import Tissue, make_phantom
from ..data.subjects import TOTALSEGMENTATOR_SPINAL_CORD, bone_aligned_slices, labels_on_image_grid
from ..data.vertebrae import TOTALSEGMENTATOR_VERTEBRAE
from ..errors import InputError
from ..io import read_image
from .grid import WORKING_SPACING_MM, to_canonical

logger = logging.getLogger(__name__)

FAT, SOFT, OTHER_BONE, GAS = 120, 121, 122, 123
DISC, CSF, CORD = 125, 126, TOTALSEGMENTATOR_SPINAL_CORD
MARROW, CORTEX = 160, 161
ORGAN_BASE = 130
#: Label ids are below this (the size of the random intensity tables in :mod:`.synth`).
NUM_LABEL_IDS = 162

#: TotalSegmentator ids that are vertebrae (the sacrum, 25, is not: the MR target is the mobile spine).
_VERTEBRA_IDS = sorted(k for k in TOTALSEGMENTATOR_VERTEBRAE if k != 25)

_PHANTOM_TISSUE_IDS = {
    Tissue.BACKGROUND: 0,
    Tissue.FAT: FAT,
    Tissue.MUSCLE: SOFT,
    Tissue.CORTICAL: CORTEX,
    Tissue.MARROW: MARROW,
    Tissue.DISC: DISC,
    Tissue.CORD: CORD,
    Tissue.CSF: CSF,
}


@dataclass
class LabelMap:
    """One anatomy on the canonical grid.

    Attributes:
        labels: ``(D, H, W)`` int64 label ids (module docstring), array axes ``(S, P, L)``.
        name: Where it came from.
    """

    labels: torch.Tensor
    name: str

    @property
    def bone(self) -> torch.Tensor:
        """``(D, H, W)`` bool: vertebral bone (marrow and cortex)."""
        return is_vertebra(self.labels)


def is_vertebra(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask of vertebral bone in a label-id tensor of any shape."""
    return (labels == MARROW) | (labels == CORTEX)


def _shell(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it (a one-voxel boundary layer)."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    eroded = -F.max_pool3d(-F.pad(m, (1, 1, 1, 1, 1, 1), value=1.0), 3, stride=1)
    return mask & (eroded[0, 0].numpy() < 0.5)


def _discs_and_csf(labels: np.ndarray, spacing_mm: float, disc_gap_mm: float = 12.0, csf_mm: float = 2.5) -> None:
    """In place: soft tissue closing the gaps between vertebrae along S-I becomes :data:`DISC`; soft tissue within
    ``csf_mm`` of the cord becomes :data:`CSF`."""
    bone = is_vertebra(torch.from_numpy(labels)).numpy()
    reach = max(int(round(disc_gap_mm / 2.0 / spacing_mm)), 1)
    closed = sitk.GetArrayFromImage(
        sitk.BinaryMorphologicalClosing(sitk.GetImageFromArray(bone.astype(np.uint8)), [0, 0, reach], sitk.sitkBox)
    )
    soft = labels == SOFT
    labels[(closed > 0) & soft] = DISC
    cord = labels == CORD
    if cord.any():
        grow = max(int(round(csf_mm / spacing_mm)), 1)
        around = sitk.GetArrayFromImage(
            sitk.BinaryDilate(sitk.GetImageFromArray(cord.astype(np.uint8)), [grow] * 3, sitk.sitkBall)
        )
        labels[(around > 0) & (labels == SOFT)] = CSF


def from_totalsegmentator_ct(
    ct: sitk.Image, segmentation: sitk.Image, spacing_mm: float = WORKING_SPACING_MM
) -> LabelMap:
    """A label map from a CT (HU) and its TotalSegmentator "total" segmentation (any grid; placed by position).

    Only the slices the segmentation covers are kept. Unnamed voxels are classed by CT number (air/gas < -500 HU,
    fat < -30, bone > 200, soft tissue otherwise); vertebrae become marrow with a one-voxel cortex.
    """
    seg = labels_on_image_grid(bone_aligned_slices(segmentation, ct, set(_VERTEBRA_IDS)), ct)
    ct_c = sitk.GetArrayFromImage(to_canonical(ct, spacing_mm))
    seg_c = sitk.GetArrayFromImage(to_canonical(sitk.Cast(seg, sitk.sitkUInt16), spacing_mm, is_label=True))
    inside_ct = sitk.GetArrayFromImage(to_canonical(sitk.Cast(ct * 0 + 1, sitk.sitkUInt8), spacing_mm, is_label=True))
    labels = np.where(ct_c < -500, 0, np.where(ct_c < -30, FAT, np.where(ct_c > 200, OTHER_BONE, SOFT)))
    body = _body_mask(ct_c > -500)
    labels[(ct_c < -500) & body] = GAS
    named = (seg_c > 0) & (seg_c < 120)
    labels[named] = seg_c[named]
    vertebra = np.isin(seg_c, _VERTEBRA_IDS)
    labels[vertebra] = MARROW
    labels[_shell(vertebra)] = CORTEX
    _discs_and_csf(labels, spacing_mm)
    rows = np.flatnonzero((seg_c > 0).any(axis=(1, 2)))
    if rows.size == 0:
        raise InputError("the segmentation labels nothing inside its CT")
    labels[inside_ct == 0] = 0
    labels = labels[rows[0] : rows[-1] + 1]
    return LabelMap(torch.from_numpy(labels.astype(np.int64)), "totalsegmentator-ct")


def _body_mask(tissue: np.ndarray) -> np.ndarray:
    """Slice-wise filled body outline (so air inside the body, bowel gas and lungs, is told from air outside)."""
    image = sitk.GetImageFromArray(tissue.astype(np.uint8))
    filled = sitk.BinaryFillhole(image, fullyConnected=False, foregroundValue=1)
    out = sitk.GetArrayFromImage(filled) > 0
    for k in range(out.shape[0]):  # also fill each axial slice (the body is open at the volume's ends)
        out[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(out[k].astype(np.uint8)))) > 0
    return out


def from_phantom(seed: int, spacing_mm: float = WORKING_SPACING_MM, organs: int = 6) -> LabelMap:
    """A label map from a random procedural phantom (:func:`..data.phantom.make_phantom`), its plain soft tissue
    split into ``organs`` smooth random regions so that the background is not one flat class."""
    rng = np.random.default_rng(seed)
    in_plane = int(rng.integers(70, 110))
    count = int(rng.integers(3, 7))
    height = int(round((count + 0.3) * 0.3 * in_plane))
    phantom = make_phantom(
        num_vertebrae=count,
        shape=(height, in_plane, int(round(in_plane * rng.uniform(0.95, 1.3)))),
        spacing=spacing_mm,
        curvature_deg=float(rng.uniform(-10.0, 30.0)),
        seed=seed,
    )
    tissues = sitk.GetArrayFromImage(phantom.tissues).astype(np.int64)
    labels = np.zeros_like(tissues)
    for tissue, label in _PHANTOM_TISSUE_IDS.items():
        labels[tissues == int(tissue)] = label
    labels = _with_organs(labels, organs, rng)
    return LabelMap(torch.from_numpy(labels), f"phantom-{seed}")


def _with_organs(labels: np.ndarray, organs: int, rng: np.random.Generator) -> np.ndarray:
    """Split :data:`SOFT` voxels into ``organs`` + 1 smooth random regions (soft tissue stays one of them)."""
    if organs <= 0:
        return labels
    coarse = rng.standard_normal((organs + 1, *[max(n // 12, 2) for n in labels.shape])).astype(np.float32)
    noise = F.interpolate(torch.from_numpy(coarse)[None], size=labels.shape, mode="trilinear", align_corners=True)
    winner = noise[0].argmax(0).numpy()
    soft = labels == SOFT
    out = labels.copy()
    out[soft & (winner > 0)] = ORGAN_BASE + winner[soft & (winner > 0)] - 1
    return out


def training_label_maps(
    real_data_dir: str | Path | None, phantoms: int, spacing_mm: float = WORKING_SPACING_MM, seed: int = 0
) -> list[LabelMap]:
    """The label maps a training draws from: the real CT example (when ``real_data_dir`` holds it) and
    ``phantoms`` phantoms (seeds ``seed`` ...)."""
    maps: list[LabelMap] = []
    if real_data_dir is not None:
        folder = Path(real_data_dir)
        folder = folder / "totalsegmentator-examples" if (folder / "totalsegmentator-examples").is_dir() else folder
        ct_path, seg_path = folder / "example_ct.nii.gz", folder / "example_seg.nii.gz"
        if ct_path.is_file() and seg_path.is_file():
            maps.append(from_totalsegmentator_ct(read_image(ct_path), read_image(seg_path), spacing_mm))
        else:
            logger.warning("no TotalSegmentator CT example in %s: training on phantoms only", folder)
    maps.extend(from_phantom(seed + i, spacing_mm) for i in range(phantoms))
    if not maps:
        raise InputError("no label maps to train on (give real data or phantoms > 0)")
    return maps

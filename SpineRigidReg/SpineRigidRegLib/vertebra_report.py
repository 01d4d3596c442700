"""Per-vertebra figures of a registration beyond :func:`..metrics.vertebra_table`: MR coverage, landmark errors
and each vertebra's rigid map in patient space."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import SimpleITK as sitk
import torch

from . import metrics
from .geometry import Geometry
from .prealign import Prealignment
from .rigid import fit_rigid
from .warp import present_labels

log = logging.getLogger(__name__)

#: A registered vertebra of which the MR shows less than this (%) is named in a warning and in the summary's
#: ``vertebrae_outside_mr``: MR spine scans often cover fewer levels than the CT.
MR_COVERAGE_WARN_PERCENT = 50.0


def label_interpolator() -> int:
    """SimpleITK's label-preserving interpolator for warping a label map (nearest neighbour on old versions)."""
    return getattr(sitk, "sitkLabelLinear", sitk.sitkNearestNeighbor)


def vertebra_rigid_transforms(
    warped_labels: torch.Tensor, displacement: torch.Tensor, grid: Geometry, pre: Prealignment, max_points: int = 4000
) -> dict[int, np.ndarray]:
    """Per vertebra, the 4x4 LPS rigid map (fixed -> moving) closest to the total map over its warped region
    (``warped_labels``: the moving labels warped by ``displacement``, ``(1, 1, D, H, W)``)."""
    warped = warped_labels[0, 0]
    found = warped.nonzero()
    owner = warped[tuple(found.unbind(1))]
    out: dict[int, np.ndarray] = {}
    generator = torch.Generator().manual_seed(0)
    for value in present_labels(owner):
        idx = found[owner == value]
        if len(idx) < 4:
            continue
        if len(idx) > max_points:
            idx = idx[torch.randperm(len(idx), generator=generator)[:max_points]]
        u = displacement[0, :, idx[:, 0], idx[:, 1], idx[:, 2]].T.double()  # voxels, array order
        x = grid.array_index_to_lps_points(idx.double().numpy())
        y = pre.map_points(grid.array_index_to_lps_points((idx.double() + u).numpy()))
        rotation, translation = fit_rigid(torch.as_tensor(x)[None], torch.as_tensor(y)[None])
        matrix = np.eye(4)
        matrix[:3, :3] = rotation[0].numpy()
        matrix[:3, 3] = translation[0].numpy()
        out[value] = matrix
    return out


def add_mr_coverage(rows: list[dict], warped_labels: torch.Tensor, inside_mr: torch.Tensor) -> None:
    """Add ``mr_coverage_percent`` to each row: how much of the registered vertebra the MR's field of view shows;
    warn about the vertebrae below :data:`MR_COVERAGE_WARN_PERCENT`."""
    shown = metrics.share_on_mask_percent(warped_labels, inside_mr)
    for row in rows:
        row["mr_coverage_percent"] = shown.get(int(row["label"]), 0.0)
        if row["mr_coverage_percent"] < MR_COVERAGE_WARN_PERCENT:
            log.warning(
                "vertebra %s: only %.0f %% of it lies inside the MR's field of view, so the MR shows little of "
                "how it aligns; check it, or leave it out (vertebra weight 0)",
                row["name"],
                row["mr_coverage_percent"],
            )


def add_landmark_errors(
    rows: list[dict], transform: sitk.Transform, fixed: Mapping[str, np.ndarray], moving: Mapping[str, np.ndarray]
) -> None:
    """Landmark residual after registration (mm) per vertebra row whose name has a landmark on both sides."""
    f = {str(k).strip().upper(): np.asarray(v, dtype=float) for k, v in fixed.items()}
    m = {str(k).strip().upper(): np.asarray(v, dtype=float) for k, v in moving.items()}
    for row in rows:
        key = str(row.get("name", "")).upper()
        if key in f and key in m:
            mapped = np.asarray(transform.TransformPoint(tuple(float(c) for c in f[key])))
            row["tre_mm"] = float(np.linalg.norm(mapped - m[key]))

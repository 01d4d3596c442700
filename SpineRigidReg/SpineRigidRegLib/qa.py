"""The QA picture of a registration: MR with the warped vertebra outlines, CT/MR fusion, Jacobian map."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from .preprocess import resample_to_reference

if TYPE_CHECKING:
    from .pipeline import RegistrationResult


def save_qa_figure(result: RegistrationResult, path: str | os.PathLike, fixed: sitk.Image | None = None) -> None:
    """Axial and sagittal slices through the spine centre: fused CT/MR with outlines and det J (PNG).

    The panels are drawn on the processing grid (1 mm, the MR's direction); ``fixed`` adds the MR itself as
    background (without it the warped CT is shown alone).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    grid = result.grid
    ct = sitk.GetArrayFromImage(resample_to_reference(result.warped_moving, grid))
    labels = sitk.GetArrayFromImage(resample_to_reference(result.warped_labels, grid, is_label=True))
    jac = sitk.GetArrayFromImage(result.jacobian)
    mr = sitk.GetArrayFromImage(resample_to_reference(fixed, grid)) if fixed is not None else None
    nz = np.argwhere(labels > 0)
    k, j, i = nz.mean(axis=0).round().astype(int) if len(nz) else np.asarray(labels.shape) // 2
    views = {"axial": (np.s_[k, :, :], "k"), "sagittal": (np.s_[:, :, i], "i")}
    fig, axes = plt.subplots(2, 3, figsize=(12, 8), dpi=90)
    for row, (name, (sl, _)) in enumerate(views.items()):
        ct_sl = np.clip(ct[sl], -200, 1200)
        lab_sl = labels[sl]
        origin = "lower" if name == "sagittal" else "upper"
        ax = axes[row, 0]
        ax.imshow(mr[sl] if mr is not None else ct_sl, cmap="gray", origin=origin)
        ax.contour(lab_sl > 0, levels=[0.5], colors="lime", linewidths=0.8, origin=origin)
        ax.set_title(f"{name}: {'MR' if mr is not None else 'warped CT'} + warped vertebrae")
        ax = axes[row, 1]
        ax.imshow(ct_sl, cmap="gray", origin=origin)
        if mr is not None:
            ax.imshow(mr[sl], cmap="magma", alpha=0.4, origin=origin)
        ax.set_title(f"{name}: warped CT" + (" / MR fusion" if mr is not None else ""))
        ax = axes[row, 2]
        image = ax.imshow(jac[sl], cmap="RdBu_r", norm=TwoSlopeNorm(1.0, vmin=0.5, vmax=1.5), origin=origin)
        folds = jac[sl] <= 0
        if folds.any():
            ax.contour(folds, levels=[0.5], colors="black", linewidths=1.0, origin=origin)
        ax.contour(lab_sl > 0, levels=[0.5], colors="k", linewidths=0.4, origin=origin)
        ax.set_title(f"{name}: det J (1 = volume kept)")
        fig.colorbar(image, ax=ax, fraction=0.046)
    for ax in axes.ravel():
        ax.set_axis_off()
    summary = result.summary
    fig.suptitle(
        f"rigid DSC {summary.get('rigid_dice_mean', float('nan')):.3f}   "
        f"|Δvol| {summary.get('abs_volume_change_percent_mean', float('nan')):.2f}%   "
        f"folding voxels {summary.get('folding_voxels', 0)}   pre-alignment: {result.prealign_method}"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

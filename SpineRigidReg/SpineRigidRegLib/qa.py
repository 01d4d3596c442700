"""The QA picture of a registration: MR with the warped vertebra outlines, CT/MR fusion, Jacobian map.

The panels are true anatomical planes (axial and sagittal in patient space, whatever the MR's voxel grid: an
oblique or sagittally acquired MR is resampled onto them) through the centre of the registered spine, drawn in the
radiological convention with orientation letters and a 10 mm scale bar.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

if TYPE_CHECKING:
    from .result import RegistrationResult

#: Image axes of each panel in LPS: ``(u, v)`` = the direction of increasing column (left to right on screen) and of
#: increasing row (top to bottom). Axial: patient's right on the left, anterior at the top (radiological);
#: sagittal: anterior on the left, superior at the top.
PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}
SCALE_BAR_MM = 10.0
_LETTERS = {0: ("R", "L"), 1: ("A", "P"), 2: ("I", "S")}  # LPS axis -> (letter at -, letter at +)


@dataclass(frozen=True)
class Plane:
    """A square patch of a plane in patient space, as a one-slice SimpleITK reference image.

    Attributes:
        reference: ``(size, size, 1)`` image whose first two axes are the panel's ``u`` and ``v`` (LPS unit vectors).
        u, v: Column and row directions (LPS).
    """

    reference: sitk.Image
    u: np.ndarray
    v: np.ndarray

    @property
    def spacing_mm(self) -> float:
        return float(self.reference.GetSpacing()[0])

    def sample(self, image: sitk.Image, is_label: bool = False, default: float = 0.0) -> np.ndarray:
        """``image`` resampled onto the plane by physical position: ``(rows, columns)``, row 0 at the top."""
        interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
        out = sitk.Resample(image, self.reference, sitk.Transform(), interpolator, default, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out)[0]

    def letters(self) -> dict[str, str]:
        """Orientation letters at the panel's ``left``, ``right``, ``top`` and ``bottom`` edges."""
        return {"left": _letter(-self.u), "right": _letter(self.u), "top": _letter(-self.v), "bottom": _letter(self.v)}


def _letter(direction: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(direction)))
    return _LETTERS[axis][int(direction[axis] > 0)]


def anatomical_plane(name: str, centre_lps: np.ndarray, size_mm: float, spacing_mm: float = 1.0) -> Plane:
    """The ``name`` (:data:`PLANES`) plane through ``centre_lps`` (mm), ``size_mm`` wide and high."""
    u, v = (np.asarray(a, dtype=float) for a in PLANES[name])
    n = max(int(np.ceil(size_mm / spacing_mm)), 2)
    reference = sitk.Image(n, n, 1, sitk.sitkUInt8)
    reference.SetSpacing((spacing_mm, spacing_mm, spacing_mm))
    reference.SetDirection(tuple(np.column_stack([u, v, np.cross(u, v)]).ravel()))
    half = (n - 1) * spacing_mm / 2.0
    reference.SetOrigin(tuple(float(c) for c in np.asarray(centre_lps, dtype=float) - half * u - half * v))
    return Plane(reference, u, v)


def spine_centre(labels: sitk.Image) -> np.ndarray:
    """LPS centroid (mm) of all labelled voxels; the image centre when there are none."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(labels > 0, sitk.sitkUInt8))
    if stats.HasLabel(1):
        return np.asarray(stats.GetCentroid(1))
    size = np.asarray(labels.GetSize(), dtype=float)
    return np.asarray(labels.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2.0)))


def draw_outlined(ax, background: np.ndarray, labels: np.ndarray, plane: Plane, colour: str = "lime") -> None:
    """``background`` in grey with the outline of ``labels > 0``, both ``(rows, columns)`` with row 0 at the top,
    plus the orientation letters and the scale bar."""
    ax.imshow(background, cmap="gray", origin="upper", interpolation="nearest")
    if (labels > 0).any():
        # contour() places row 0 at y = 0, which imshow(origin="upper") already shows at the top: no origin here
        # (passing origin="upper" to both flipped the outlines upside down).
        ax.contour(labels > 0, levels=[0.5], colors=colour, linewidths=0.8)
    decorate(ax, plane, background.shape)


def decorate(ax, plane: Plane, shape: tuple[int, int]) -> None:
    """Orientation letters at the four edges and a :data:`SCALE_BAR_MM` bar at the bottom left."""
    from matplotlib import patheffects

    rows, cols = shape
    style = {"color": "yellow", "fontsize": 10, "fontweight": "bold", "ha": "center", "va": "center"}
    letters = plane.letters()
    ax.text(0.03 * cols, rows / 2, letters["left"], **style)
    ax.text(0.97 * cols, rows / 2, letters["right"], **style)
    ax.text(cols / 2, 0.04 * rows, letters["top"], **style)
    ax.text(cols / 2, 0.96 * rows, letters["bottom"], **style)
    length = SCALE_BAR_MM / plane.spacing_mm
    x0, y0 = 0.06 * cols, 0.9 * rows
    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    ax.plot([x0, x0 + length], [y0, y0], color="white", linewidth=3, solid_capstyle="butt", path_effects=outline)
    ax.text(
        x0 + length / 2,
        y0 - 0.03 * rows,
        f"{SCALE_BAR_MM:.0f} mm",
        color="white",
        fontsize=8,
        ha="center",
        path_effects=outline,
    )
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)


def save_qa_figure(result: RegistrationResult, path: str | os.PathLike, fixed: sitk.Image | None = None) -> None:
    """Axial and sagittal planes through the registered spine's centre: MR with the warped vertebra outlines,
    warped CT / MR fusion, det J (PNG). Without ``fixed`` (the MR) the warped CT is shown alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    grid = result.grid
    centre = spine_centre(result.warped_labels)
    size_mm = float(max(np.asarray(grid.shape) * np.asarray(grid.spacing_array_order)))
    fig, axes = plt.subplots(2, 3, figsize=(12, 8), dpi=90)
    for row, name in enumerate(PLANES):
        plane = anatomical_plane(name, centre, size_mm, spacing_mm=min(grid.spacing))
        ct = np.clip(plane.sample(result.warped_moving, default=-1000.0), -200, 1200)
        labels = plane.sample(result.warped_labels, is_label=True)
        jac = plane.sample(result.jacobian, default=1.0)
        mr = plane.sample(fixed) if fixed is not None else None
        draw_outlined(axes[row, 0], mr if mr is not None else ct, labels, plane)
        axes[row, 0].set_title(f"{name}: {'MR' if mr is not None else 'warped CT'} + warped vertebrae")
        ax = axes[row, 1]
        ax.imshow(ct, cmap="gray", origin="upper")
        if mr is not None:
            ax.imshow(mr, cmap="magma", alpha=0.4, origin="upper")
        decorate(ax, plane, ct.shape)
        ax.set_title(f"{name}: warped CT" + (" / MR fusion" if mr is not None else ""))
        ax = axes[row, 2]
        image = ax.imshow(jac, cmap="RdBu_r", norm=TwoSlopeNorm(1.0, vmin=0.5, vmax=1.5), origin="upper")
        if (jac <= 0).any():
            ax.contour(jac <= 0, levels=[0.5], colors="black", linewidths=1.0)
        if (labels > 0).any():
            ax.contour(labels > 0, levels=[0.5], colors="k", linewidths=0.4)
        decorate(ax, plane, jac.shape)
        ax.set_title(f"{name}: det J (1 = volume kept)")
        fig.colorbar(image, ax=ax, fraction=0.046)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    summary = result.summary
    fig.suptitle(
        f"rigid DSC {summary.get('rigid_dice_mean', float('nan')):.3f}   "
        f"|Δvol| {summary.get('abs_volume_change_percent_mean', float('nan')):.2f}%   "
        f"folding voxels {summary.get('folding_voxels', 0)}   pre-alignment: {result.prealign_method}"
    )
    # Fixed margins: tight_layout draws the whole figure once more to measure it (a sixth of the picture's time).
    fig.subplots_adjust(left=0.01, right=0.97, bottom=0.01, top=0.91, wspace=0.08, hspace=0.1)
    fig.savefig(path, pil_kwargs={"compress_level": 1})  # the default level 6: 3x the encoding time, 2/3 the size
    plt.close(fig)

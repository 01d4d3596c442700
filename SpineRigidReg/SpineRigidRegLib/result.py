"""What a registration produces (:class:`RegistrationResult`) and what a result must satisfy to be written."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .geometry import Geometry, displacement_field_image
from .prealign import Prealignment
from .settings import RegistrationSettings
from .warp import displacement_from_velocity

#: A registered vertebra whose volume changed by more than this (%) stops the run (:func:`check_plausible`). Bone
#: does not change volume, and none of the rigidity settings lets it do so by much: the benchmark's default run
#: changes it by 0.08 % on average, the network alone by 0.07 %, the dense refinement at its default weights by
#: 0.51 %, the "soft" rigidity preset (weights x 0.25) by a few per cent; the worst unshipped training attempt reached
#: 10-14 % (docs/TRAINING.md). A damaged model gave -80 % to +92 %.
MAX_VOLUME_CHANGE_PERCENT = 20.0


@dataclass
class RegistrationResult:
    """Everything :func:`register` produces; see ``docs/ARCHITECTURE.md`` for the transform directions.

    All transforms map fixed (MR) physical points to moving (CT) physical points (ITK's resampling direction,
    Slicer's "FromParent" when the CT is placed under the transform), except :meth:`inverse_transform`.
    """

    warped_moving: sitk.Image
    warped_labels: sitk.Image
    jacobian: sitk.Image
    prealign: np.ndarray
    prealign_method: str
    displacement: sitk.Image
    velocity: torch.Tensor
    transform: sitk.Transform
    vertebrae: list[dict]
    vertebra_rigid_transforms: dict[int, np.ndarray]
    summary: dict
    timings: dict[str, float]
    grid: Geometry
    fixed: sitk.Image | None = None
    mr_vertebrae: sitk.Image | None = None
    #: Scaling-and-squaring steps that integrate :attr:`velocity` (``None``: the result holds no inverse).
    integration_steps: int | None = None
    _inverse: sitk.Image | None = field(default=None, init=False, repr=False)

    def inverse_displacement(self) -> sitk.Image:
        """``exp(-v)`` of the same stationary velocity, LPS mm on :attr:`grid`: the deformable part's inverse.

        Computed on the first call and kept: the Slicer module's runs and corrections never need it, and it cost a
        part of every output stage (issue 16's closing note); ``srr-register`` writes it.
        """
        if self._inverse is None:
            if self.integration_steps is None:
                raise InputError("this result holds no inverse field")
            inverse = displacement_from_velocity(-self.velocity, self.integration_steps, self.grid.shape)
            self._inverse = displacement_field_image(inverse.cpu(), self.grid)
        return self._inverse

    def inverse_transform(self) -> sitk.Transform:
        """The inverse map, moving (CT) point -> fixed (MR) point: the pre-alignment undone, then the deformable
        part's inverse (:meth:`inverse_displacement`).

        It carries CT points (a screw plan, a bone model) into the MR and resamples the MR onto the CT's grid; its
        composition with :attr:`transform` is the identity up to the integration's error (0.02 mm on average, under
        0.1 mm, for a 4.6 mm deformation in the tests).
        """
        undo_prealign = Prealignment(self.prealign, self.prealign_method).transform().GetInverse()
        # A composite applies its last transform first: the pre-alignment's inverse, then the field.
        return sitk.CompositeTransform(
            [sitk.DisplacementFieldTransform(sitk.Image(self.inverse_displacement())), undo_prealign]
        )

    def total_displacement(self) -> sitk.Image:
        """Pre-alignment folded into the field: fixed point ``x`` -> moving point ``x + D(x)``, LPS mm.

        With the pre-alignment ``y = A z + t`` of the field's point ``z = x + d(x)``: ``D = d A^T + x (A^T - I) + t``
        (row vectors), whose middle term is affine in the voxel index and built by broadcasting one row per axis
        (every voxel's position as an array cost 10x the time, most of a writer thread's)."""
        d = sitk.GetArrayViewFromImage(self.displacement)  # (D, H, W, 3) LPS mm
        a, shift = self.prealign[:3, :3], self.prealign[:3, 3]
        to_lps = self.grid.array_index_to_lps()
        per_index = to_lps[:3, :3].T @ (a.T - np.eye(3))  # row n: the term's change per voxel along array axis n
        k, j, i = (np.arange(size, dtype=np.float64)[:, None] * per_index[n] for n, size in enumerate(self.grid.shape))
        affine = k[:, None, None] + j[None, :, None] + i[None, None, :] + (to_lps[:3, 3] @ (a.T - np.eye(3)) + shift)
        total = sitk.GetImageFromArray(affine + d @ a.T, isVector=True)
        return self.grid.apply_to(total)


def check_plausible(rows: Sequence[Mapping], field_stats: Mapping[str, float], settings: RegistrationSettings) -> None:
    """Refuse a result that no registration of a spine can give, before anything is written.

    Limits, from the settings the result was made with: every vertebra's volume within
    :data:`MAX_VOLUME_CHANGE_PERCENT`; no displacement inside the MR's field of view (after the pre-alignment) larger
    than ``settings.margin_mm + settings.vertebra_rigid.max_translation_mm``: the processing grid reaches
    ``margin_mm`` beyond the pre-aligned CT spine, and the vertebra-wise stage moves a vertebra by at most
    ``max_translation_mm``, so a larger one carries a point beyond everything the network was shown.

    Raises:
        InputError: naming the worst vertebra or the largest displacement, and the likely cause.
    """
    worst = max(
        (r for r in rows if math.isfinite(float(r.get("volume_change_percent", float("nan"))))),
        key=lambda r: abs(float(r["volume_change_percent"])),
        default=None,
    )
    problems = []
    if worst is not None and abs(float(worst["volume_change_percent"])) > MAX_VOLUME_CHANGE_PERCENT:
        change = float(worst["volume_change_percent"])
        name = worst.get("name", worst["label"])
        problems.append(f"vertebra {name} changed volume by {change:+.0f} % (limit {MAX_VOLUME_CHANGE_PERCENT:.0f} %)")
    largest = float(field_stats.get("max_displacement_mm", float("nan")))
    limit = settings.margin_mm + settings.vertebra_rigid.max_translation_mm
    if math.isfinite(largest) and largest > limit:
        problems.append(f"a displacement of {largest:.0f} mm (limit {limit:.0f} mm)")
    if problems:
        raise InputError(
            "the registration result is physically impossible (" + "; ".join(problems) + "): the model file is "
            "probably damaged or not meant for these images; nothing was written"
        )

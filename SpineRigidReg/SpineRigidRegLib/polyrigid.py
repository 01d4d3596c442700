"""Vertebra-wise rigid alignment: one rigid motion per vertebra, blended into a diffeomorphic field.

Each vertebra ``k`` gets a translation ``t_k`` (mm) and a rotation vector ``w_k`` (rad) about its centre ``c_k``. Their
velocities ``t_k + w_k x (x - c_k)`` are blended with weights ``W_k(x)`` (:func:`vertebra_frames`): every point
follows its nearest vertebra, the switch-over between neighbours lies in the disc or joint space between them,
and far from the spine the weight fades out, so soft tissue is carried along near the bone and left in place far
from it. The blended stationary velocity is integrated by scaling and squaring, like the network's, so the map
stays diffeomorphic; inside a vertebra it is the exponential of a rigid velocity, i.e. the rigid motion itself.
Halfway through, and at the end, each vertebra's weights move to where it lies midway between the two images.

Only ``6 K`` numbers are optimised, so a few dozen Adam steps align every vertebra without any rigidity penalty:
rigidity holds by construction. Its velocity is added to the network's. With the NMI at sampled voxels (the
default) each step moves the samples by the closed-form rigid motions (:class:`SampledProblem`) instead of
integrating the whole field. NMI is the classic choice for rigid CT/MR alignment: on four benchmark pairs it beat
MIND-SSC here during development (DSC 0.945 vs 0.901, TRE 0.80 vs 1.30 mm), whose strength is dense deformable
matching.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import CancelledError, InputError
from .losses.similarity import SIMILARITY_LOSSES, mind_ssc, parzen_weights
from .point_sampling import points_at, read_with_data_mask, with_data_mask
from .validation import check_settings_fields
from .warp import (
    identity_grid,
    integrate_velocity,
    map_of_velocity,
    overlap_mask,
    present_labels,
    sample_at,
    to_grid,
    warp,
    warp_labels,
)

if TYPE_CHECKING:
    from .processing import ProcessingPair, SliceProfile

#: Midpoint steps integrating the sampled voxels' paths during the optimisation (the result is then integrated by
#: scaling and squaring like every velocity).
_PATH_STEPS = 6

#: Steps between refreshes of which vertebra each sample moves with (:meth:`SampledProblem.owners`) and of the
#: samples' correction to their integrated paths.
_REFRESH_EVERY = 5

#: Histogram of the NMI (the defaults of :func:`.losses.similarity.nmi_loss`).
NMI_BINS, NMI_SIGMA_RATIO = 32, 0.5

#: Rotation parameters are in units of ``1 / ROTATION_RADIUS_MM`` rad, so that one unit moves a point at this distance
#: from the centre by 1 mm, like one unit of translation: Adam then takes steps of comparable size in both.
ROTATION_RADIUS_MM = 30.0


@dataclass(frozen=True)
class VertebraRigidSettings:
    """Settings of :func:`refine_vertebrae_rigidly`.

    Attributes:
        steps: Adam steps (0 = off). 40 instead of 60 since session 18: on 29 clinic-like cases without points
            (one thread each) mean TRE 0.529 -> 0.531 mm, clinical cases 0.536 -> 0.528 mm, the 8 real-MR seeds
            0.625 -> 0.648 mm (one seed +0.16 mm: its cut T12's other optimum), pairs in register 0.249 -> 0.241
            mm; with 45 steps the same within 0.005 mm; a third of the stage's steps.
        correction_steps: Adam steps of a manual-correction re-run (from a previous result, with point pairs): only
            the vertebrae with points on them move, and each starts at its points' mean offset, so fewer steps settle
            it: the sample case's corrections of each vertebra by 1 and 3 mm end as close to their points with 12
            steps as with 20 (with 8 about twice as far; issue 16's closing note of session 17).
        learning_rate: Initial step size in mm (translations) and mm at :data:`ROTATION_RADIUS_MM` (rotations);
            it decays to ``final_step_share`` of it over the steps (cosine, :func:`step_size`).
        final_step_share: The last step's size as a share of ``learning_rate``. Adam takes steps of about this
            size even where the NMI is flat, so it sets how far rounding moves a result (0.05 instead of 0.1: less
            so, at the same mean TRE on every report; issue 16's closing notes of sessions 14 and 15). It does not
            settle a vertebra between two basins of the NMI (Table 1's ``phantom-02``, session 15's note).
        margin_mm: The weights stay whole up to this distance from the spine: a point of a vertebra travels from
            its place in the fixed image to its place in the moving image during the integration, and all of that
            path must lie where the vertebra's rigid velocity acts (with 5 mm the sample case's vertebrae, which
            move 5-6 mm, lost up to 8 % of their rigid DSC; with 8 mm at most 1.5 %).
        sigma_mm: Fall-off of each vertebra's weight beyond the margin.
        partition_mm: Width of the switch-over between neighbouring vertebrae (see :func:`vertebra_frames`).
        similarity: ``"mind"``, ``"nmi"`` or ``"ngf"``.
        max_translation_mm, max_rotation_deg: Limits on each vertebra's motion (a soft clamp keeps the optimiser
            from running away on a vertebra with little image contrast).
        samples: NMI only: compare the images at this many voxels of their own grid, drawn once (seeded) from
            within ``sample_band_mm`` of the vertebrae, as elastix samples its metrics (0 = every voxel of the
            velocity's grid where the weights reach). MIND needs whole neighbourhoods and always uses that grid.
        sample_band_mm: NMI only: how far from the CT vertebrae the samples reach. The bone edges carry the
            alignment; the soft tissue and unlabelled bone farther out, which the weights still carry along, move
            otherwise and pulled the fit (Table 1 benchmark, T1-like MR: TRE 0.64 mm with the whole weighted region,
            0.52 mm with a 3 mm band, 2 mm: 0.57, 5 mm: 0.53). On the clinic-like tiers (T2, thick slices) a wider
            band holds the vertebrae better: 9 tier cases without points 0.66 mm (3 mm) / 0.59 (4.5) / 0.60 (6) /
            0.68 (8), and with the slice model 0.55 mm at 6 mm (session 12, docs/BENCHMARKS_TIERS.md).
        points_weight: Weight of the mean squared distance (mm^2) between the mapped and the target point of each
            point pair (manual correction); it outweighs the similarity, so each vertebra follows the points on it
            and the similarity settles what they leave open (one pair fixes no rotation).
        slice_model: NMI only, on a thick-slice MR: from the midway recentring on, compare the MR at its own voxel
            centres with the CT averaged across its slices (:class:`.processing.SliceProfile`) instead of the MR
            interpolated between slices, whose edges lie up to a tenth of a slice off (same-modality thick slices in
            register: 0.27-0.30 mm -> 0.02-0.10 mm). With the 6 mm band it lowered every tier's mean TRE (9 cases
            without points 0.66 -> 0.55 mm, from points 0.77 -> 0.67 mm; two clinical pairs in register 0.54 ->
            0.30 mm); with the 3 mm band it won and lost by turns (session 11).
    """

    steps: int = 40
    correction_steps: int = 12
    learning_rate: float = 0.4
    final_step_share: float = 0.05
    margin_mm: float = 8.0
    sigma_mm: float = 3.0
    partition_mm: float = 1.0
    similarity: str = "nmi"
    max_translation_mm: float = 15.0
    max_rotation_deg: float = 15.0
    samples: int = 50_000
    sample_band_mm: float = 6.0
    points_weight: float = 0.05
    slice_model: bool = True

    def __post_init__(self) -> None:
        check_settings_fields(self, "vertebra rigid refinement setting", SIMILARITY_LOSSES)
        if self.sigma_mm <= 0 or self.partition_mm <= 0:
            raise InputError("sigma_mm and partition_mm must be > 0")
        if self.final_step_share > 1:
            raise InputError(f"final_step_share must be at most 1, got {self.final_step_share}")


@dataclass
class VertebraFrames:
    """Where each vertebra's rigid velocity acts, on one grid.

    Attributes:
        labels: The ``K`` vertebra label values.
        weights: ``(1, K, D, H, W)`` blending weights in [0, 1].
        centres_mm: ``(K, 3)`` vertebra centres in the grid's array-order mm frame (voxel index times spacing).
        points_mm: ``(1, 3, D, H, W)`` every voxel's position in that frame.
        spacing: mm per voxel, array order.
        sigma_mm, margin_mm, partition_mm: What the weights were built with.
    """

    labels: list[int]
    weights: torch.Tensor
    centres_mm: torch.Tensor
    points_mm: torch.Tensor
    spacing: tuple[float, float, float]
    sigma_mm: float = 4.0
    margin_mm: float = 0.0
    partition_mm: float = 1.0


def vertebra_frames(
    labels: torch.Tensor,
    spacing: Sequence[float],
    sigma_mm: float = 4.0,
    label_values: Sequence[int] | None = None,
    margin_mm: float = 0.0,
    partition_mm: float = 1.0,
) -> VertebraFrames:
    """Blending weights and centres of every vertebra of ``labels`` ``(1, 1, D, H, W)`` on its grid.

    ``W_k = E * softmax_k(-(d_k / partition)^2)``: each point follows its nearest vertebra (``d_k`` = distance in mm
    to vertebra ``k``, 0 inside), switching over within about ``partition_mm`` of the midline between two, so that a
    vertebra stays rigid up to a facet joint a few mm from its neighbour; the envelope
    ``E = exp(-(max(min_k d_k - margin, 0) / sigma)^2)`` is 1 within ``margin_mm`` of the spine and fades to 0 (the
    identity) in the soft tissue beyond.

    Raises:
        InputError: no vertebra in ``labels``.
    """
    step = tuple(float(s) for s in spacing)
    grid = labels[0, 0].detach().cpu().to(torch.int64)
    present = present_labels(grid)
    values = present if label_values is None else [int(v) for v in label_values if int(v) in present]
    if not values:
        raise InputError("vertebra rigid refinement needs at least one vertebra in the label map")
    device, dtype = labels.device, torch.float32
    distances = []
    centres = []
    for value in values:
        mask = grid == value
        image = sitk.GetImageFromArray(mask.numpy().astype("uint8"))
        image.SetSpacing(step[::-1])
        distance = sitk.SignedMaurerDistanceMap(
            image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
        )
        distances.append(torch.from_numpy(sitk.GetArrayFromImage(distance)).clamp_min(0.0).to(dtype))
        centres.append(mask.nonzero().to(torch.float64).mean(0) * torch.tensor(step, dtype=torch.float64))
    d = torch.stack(distances)[None]  # (1, K, D, H, W) mm
    nearest = d.min(dim=1, keepdim=True).values
    envelope = torch.exp(-(((nearest - margin_mm).clamp_min(0.0) / sigma_mm) ** 2))
    weights = envelope * torch.softmax(-((d / partition_mm) ** 2), dim=1)
    points = identity_grid(grid.shape, "cpu", dtype) * torch.tensor(step, dtype=dtype).view(1, 3, 1, 1, 1)
    return VertebraFrames(
        labels=values,
        weights=weights.to(device),
        centres_mm=torch.stack(centres).to(device=device, dtype=dtype),
        points_mm=points.to(device),
        spacing=step,
        sigma_mm=float(sigma_mm),
        margin_mm=float(margin_mm),
        partition_mm=float(partition_mm),
    )


def rigid_velocity(parameters: torch.Tensor, frames: VertebraFrames) -> torch.Tensor:
    """The blended velocity of per-vertebra rigid motions.

    Args:
        parameters: ``(K, 6)``: translation (mm) and rotation vector (units of ``1 / ROTATION_RADIUS_MM`` rad), array
            order.
        frames: From :func:`vertebra_frames`.

    Returns:
        ``(1, 3, D, H, W)`` velocity in voxels of the frames' grid.
    """
    translation = parameters[:, :3]
    rotation = parameters[:, 3:] / ROTATION_RADIUS_MM
    velocity = torch.zeros_like(frames.points_mm)
    for k in range(parameters.shape[0]):
        offset = frames.points_mm - frames.centres_mm[k].view(1, 3, 1, 1, 1)
        w = rotation[k]
        # w x r in array order (k, j, i): a right-handed cross product of the three components as stored.
        cross = torch.stack(
            [
                w[1] * offset[:, 2] - w[2] * offset[:, 1],
                w[2] * offset[:, 0] - w[0] * offset[:, 2],
                w[0] * offset[:, 1] - w[1] * offset[:, 0],
            ],
            dim=1,
        )
        velocity = velocity + frames.weights[:, k : k + 1] * (cross + translation[k].view(1, 3, 1, 1, 1))
    return velocity / torch.tensor(frames.spacing, dtype=velocity.dtype, device=velocity.device).view(1, 3, 1, 1, 1)


def refine_vertebrae_rigidly(
    velocity: torch.Tensor,
    pair: ProcessingPair,
    settings: VertebraRigidSettings = VertebraRigidSettings(),
    integration_steps: int = 7,
    vertebra_weights: Mapping[int, float] | None = None,
    progress: Callable[[float, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, dict[int, list[float]]]:
    """Add one optimised rigid motion per vertebra to ``velocity``.

    With the pair's data masks the images are compared only where both hold data (:func:`.warp.overlap_mask`):
    without them a vertebra cut by the edge of a field of view was held to that edge (the cut top vertebra of the
    four real benchmark pairs: TRE 0.38-2.02 mm without the masks, 0.22-0.64 mm with them); a voxel whose warped
    position falls outside the moving mask is left out of the comparison.

    Args:
        velocity: ``(1, 3, d, h, w)`` starting velocity (the network's) in voxels of its grid.
        pair: The pair on its full grid (:class:`.processing.ProcessingPair`). Its point pairs ``(fixed points,
            targets)`` in full-grid voxels pull each fixed point to its target (``settings.points_weight``); a pair
            away from every vertebra's weights cannot move anything here (the dense refinement can). Its
            ``fixed_slices`` (a thick-slice MR's own voxels on the grid) serve ``settings.slice_model``.
        settings: Steps, step size, fall-off, similarity and limits.
        integration_steps: Scaling-and-squaring steps of the velocity.
        vertebra_weights: Label -> weight; a vertebra with weight 0 keeps the start's motion (the network's or a
            previous result's), and its zone: its neighbours' motions do not reach into it.

    Returns:
        ``(velocity (1, 3, d, h, w) detached, {label: [tx, ty, tz (mm), rotation angle (deg)]})``; the velocity is
        unchanged when ``settings.steps`` is 0.
    """
    if settings.steps <= 0:
        return velocity.detach(), {}
    base = velocity.detach()
    grid = tuple(base.shape[2:])
    labels_g = to_grid(pair.moving_labels.float(), grid, mode="nearest").long()
    free = _weighted_labels(labels_g, vertebra_weights)
    if free is not None and not free:
        return base, {}
    full = tuple(pair.fixed.shape[2:])
    grid_spacing = [s * (f - 1) / max(g - 1, 1) for s, f, g in zip(pair.spacing, full, grid)]
    # Frames of every vertebra, also those held still: a held vertebra keeps its own zone, so that its free
    # neighbour's motion does not reach into it.
    frames = vertebra_frames(labels_g, grid_spacing, settings.sigma_mm, None, settings.margin_mm, settings.partition_mm)
    fit = VertebraFit(settings, frames, base, labels_g, integration_steps, progress, should_cancel, free)
    if settings.similarity == "nmi" and settings.samples > 0:
        problem: _Problem = SampledProblem(fit, pair)
    else:
        problem = _DenseProblem(fit, pair)
    fit.run(problem, recentre_at=settings.steps // 2)
    # No second recentring at the end: the last steps fitted the map of these frames (29 clinic-like cases: the same
    # mean TRE, one x2 capture-range case 0.01 mm worse; a tenth of the stage's time, issue 16 session 18).
    with torch.no_grad():
        parameters = fit.bounded()
        refined = base + rigid_velocity(parameters, fit.frames)
    motions = {
        label: [
            *(float(x) for x in parameters[k, :3]),
            float(parameters[k, 3:].norm() / ROTATION_RADIUS_MM * 180 / torch.pi),
        ]
        for k, label in enumerate(fit.frames.labels)
        if fit.free[k]
    }
    return refined.detach(), motions


def _weighted_labels(labels: torch.Tensor, vertebra_weights: Mapping[int, float] | None) -> list[int] | None:
    """The vertebrae of ``labels`` whose weight is above 0 (``None``: no weights given, every vertebra)."""
    if not vertebra_weights:
        return None
    return [v for v in present_labels(labels) if vertebra_weights.get(v, 1.0) > 0]


class VertebraFit:
    """The optimisation of the ``(K, 6)`` vertebra motions by Adam, the same for every form of the loss.

    The parameters are bounded by a soft clamp (``limit * tanh(p / limit)``, :attr:`limit`) and expressed about the
    centres of :attr:`frames`, which :meth:`recentre` moves to where the vertebrae lie midway along their paths.
    The step size decays over the steps (cosine, :func:`step_size`), so the last steps settle below a voxel.
    """

    def __init__(
        self,
        settings: VertebraRigidSettings,
        frames: VertebraFrames,
        base: torch.Tensor,
        labels: torch.Tensor,
        integration_steps: int,
        progress: Callable[[float, str], None] | None,
        should_cancel: Callable[[], bool] | None,
        free: Sequence[int] | None = None,
    ) -> None:
        self.settings, self.frames, self.base, self.labels = settings, frames, base, labels
        self.integration_steps, self.progress, self.should_cancel = integration_steps, progress, should_cancel
        rotation_limit = settings.max_rotation_deg * math.pi / 180 * ROTATION_RADIUS_MM
        self.limit = torch.tensor([settings.max_translation_mm] * 3 + [rotation_limit] * 3, device=base.device)
        self.parameters = torch.zeros(len(frames.labels), 6, device=base.device)
        #: ``(K,)`` bool: the vertebrae that move; the others keep the start's motion (their rows stay 0).
        self.free = torch.tensor([free is None or label in free for label in frames.labels], device=base.device)
        self.recentred = 0

    @property
    def free_labels(self) -> list[int]:
        """The labels of the vertebrae that move."""
        return [label for label, moves in zip(self.frames.labels, self.free.tolist()) if moves]

    def bounded(self) -> torch.Tensor:
        """``(K, 6)`` the motions: translation (mm) and rotation vector (``1 / ROTATION_RADIUS_MM`` rad)."""
        return self.limit * torch.tanh(self.parameters / self.limit)

    def velocity(self, bounded: torch.Tensor) -> torch.Tensor:
        """``(1, 3, d, h, w)`` the whole velocity (voxels): the start's plus the vertebrae's."""
        return self.base + rigid_velocity(bounded, self.frames)

    def start_at(self, translations: Mapping[int, torch.Tensor]) -> None:
        """Start vertebra ``k`` (row index) at translation ``translations[k]`` (mm)."""
        for k, offset in translations.items():
            if not self.free[k]:
                continue
            self.parameters[k, :3] = self.limit[:3] * torch.atanh((offset / self.limit[:3]).clamp(-0.99, 0.99))

    @torch.no_grad()
    def recentre(self) -> None:
        """Move the frames to where the vertebrae lie midway along their paths (the moving labels carried by half
        the current map) and re-express the motions about the new centres. Midway, a point's path reaches least
        far from its vertebra's rigid zone at either end: on a capture-range case (x2 motion) the final map then
        followed the fitted motions within 0.06 mm on average instead of 0.12 mm with the fixed-image position."""
        self.frames, moved = _midway_frames(self.bounded(), self.frames, self.base, self.labels, self.integration_steps)
        self.parameters = self.limit * torch.atanh((moved / self.limit).clamp(-0.999, 0.999))
        self.recentred += 1

    def run(self, problem: _Problem, recentre_at: int) -> None:
        """Adam on ``problem.loss``, starting each vertebra with point pairs on it at their mean offset (Adam's steps
        are about the step size each, too few to travel a correction of several mm), the frames moved at step
        ``recentre_at`` (:meth:`recentre`; the optimiser restarts there)."""
        steps, rate = self.settings.steps, self.settings.learning_rate
        with torch.no_grad():
            self.start_at(problem.pair_offsets(self.bounded()))
        optimizer = _Adam(self.parameters.requires_grad_(True))
        for step in range(steps):
            if self.should_cancel is not None and self.should_cancel():
                raise CancelledError("registration cancelled")
            if step == recentre_at and step > 0:
                self.recentre()
                optimizer = _Adam(self.parameters.requires_grad_(True))
            self.parameters.grad = None
            problem.loss(self.bounded(), step).backward()
            self.parameters.grad[~self.free] = 0.0
            optimizer.step(step_size(step, steps, rate, self.settings.final_step_share))
            if self.progress is not None:
                self.progress((step + 1) / steps, f"vertebra-wise rigid alignment step {step + 1}/{steps}")
        self.parameters = self.parameters.detach()


def step_size(step: int, steps: int, rate: float, final_share: float) -> float:
    """Step ``step`` of ``steps``: ``rate`` decayed along a cosine towards ``final_share * rate``."""
    return rate * (final_share + (1.0 - final_share) / 2 * (1.0 + math.cos(math.pi * step / steps)))


class _Adam:
    """Adam (Kingma and Ba 2015, torch's defaults) on one tensor, the ``(K, 6)`` motions. ``torch.optim.Adam`` does
    the same, but its first construction in a process imports ``torch._dynamo`` (1-2 s, as long as the whole fit)."""

    def __init__(self, parameters: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.parameters, self.betas, self.eps, self.count = parameters, betas, eps, 0
        self.mean, self.square = torch.zeros_like(parameters), torch.zeros_like(parameters)

    @torch.no_grad()
    def step(self, rate: float) -> None:
        """One update of step size ``rate`` from the parameters' current gradient."""
        (b1, b2), grad = self.betas, self.parameters.grad
        self.count += 1
        self.mean.mul_(b1).add_(grad, alpha=1 - b1)
        self.square.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denominator = (self.square / (1 - b2**self.count)).sqrt_().add_(self.eps)
        self.parameters.sub_(rate / (1 - b1**self.count) * self.mean / denominator)


class _Problem(Protocol):
    def loss(self, bounded: torch.Tensor, step: int) -> torch.Tensor: ...

    def pair_offsets(self, bounded: torch.Tensor) -> dict[int, torch.Tensor]: ...


class SampledProblem:
    """NMI at sampled voxels, each moved by the rigid motion of the vertebra it belongs to, in closed form.

    A voxel ``x`` (fixed image) within the margin of vertebra ``k`` follows ``k``'s velocity all along its path, so
    its place in the moving image is the exponential of that rigid velocity (:func:`rigid_maps`), and its gradient
    needs no integration of the blended field (whose backward pass through every path's grid samples cost most of
    the stage before; docs/SPEED_PROFILE.md). Where two vertebrae meet, a voxel moves with the blend of their
    motions, weighted by how much each vertebra's moved copy of it lies in that vertebra (:meth:`owners`). The
    closed form is not the map the velocity gives where paths cross from one vertebra's zone into another's (large
    motions of neighbours: several mm on a x2 capture-range case), so once the frames have moved midway
    (:meth:`VertebraFit.recentre`) each point's place is corrected to its integrated path every
    :data:`_REFRESH_EVERY` steps (no gradient through the paths): the loss is then that of the map the result will
    be. The network's field enters the closed form as a fixed displacement; the correction makes it exact too.
    """

    def __init__(self, fit: VertebraFit, pair: ProcessingPair) -> None:
        fixed, moving, spacing, fixed_mask = pair.fixed, pair.moving, pair.spacing, pair.fixed_mask
        point_pairs = pair.point_pairs
        settings, frames = fit.settings, fit.frames
        slices = pair.fixed_slices if settings.slice_model else None
        region = _bone_band(pair.moving_labels, fit.free_labels, spacing, settings.sample_band_mm)
        if fixed_mask is not None:
            region = region & (fixed_mask > 0)
        index = _sample_points(region.flatten(), settings.samples)
        if index.numel() == 0:
            raise InputError("the MR's field of view does not reach the CT vertebrae after pre-alignment")
        self.fit, self.moving_frames, self.moving = fit, frames, moving
        self.moving_mask = pair.moving_mask
        self.step_mm = torch.tensor([float(s) for s in spacing], device=fixed.device)
        self.grid_mm = torch.tensor(frames.spacing, device=fixed.device)
        self.fixed, self.slices = fixed, slices
        #: What :meth:`moving_at` reads: ``moving``, or after :meth:`_compare_as_slices` its average across the
        #: slices; with the CT's data mask beside it (:func:`.point_sampling.with_data_mask`) when the pair has one.
        self.readable = self._readable(moving)
        self.base_map = _base_displacement(fit.base, fit.integration_steps)
        self.sources = self.pair_targets_mm = torch.zeros(0, 3, device=fixed.device)
        if point_pairs is not None and len(point_pairs[0]) and settings.points_weight > 0:
            self.sources, targets = (p.to(fixed.device).float() for p in point_pairs)
            self.pair_targets_mm = targets * self.step_mm
        voxels = _unravel(index, tuple(fixed.shape[2:]))
        self._compare_at(voxels, fixed.flatten()[index])

    def _compare_at(self, voxels: torch.Tensor, values: torch.Tensor) -> None:
        """Compare the images at ``voxels`` ``(N, 3)`` (grid indices, array order), where the MR is ``values``."""
        self.fixed_samples = values.view(1, 1, -1, 1, 1)
        self.similarity = partial(
            SIMILARITY_LOSSES["nmi"],
            bins=NMI_BINS,
            sigma_ratio=NMI_SIGMA_RATIO,
            fixed_weights=parzen_weights(self.fixed_samples, NMI_BINS, NMI_SIGMA_RATIO),
        )
        self.sample_count = len(voxels)
        self.points_mm = torch.cat([voxels, self.sources]) * self.step_mm  # (N + M, 3): the samples, pair sources
        self.base_mm = _displacement_mm(self.base_map, self.points_mm, self.moving_frames.spacing)
        self.weights = torch.zeros(len(self.fit.frames.labels), len(self.points_mm), device=values.device)
        self.correction = torch.zeros_like(self.points_mm)

    def _compare_as_slices(self) -> None:
        """From the recentring on, on a thick-slice MR: the MR at its own voxel centres, the CT averaged across its
        slices (:class:`.processing.SliceProfile`). Earlier the interpolated MR's denser samples capture the motion:
        with the slice model from the start a x2 capture-range case from points failed (3.7 mm instead of 1.6 mm)."""
        slices, self.slices = self.slices, None
        voxels = _mr_voxel_centres(self.points_mm[: self.sample_count] / self.step_mm, slices)
        values = sample_at(self.fixed, voxels.T.reshape(1, 3, -1, 1, 1), padding_mode="border").flatten()
        self.readable = self._readable(_across_slices(self.moving, slices.axis, slices.taps))
        self._compare_at(voxels, values)

    def owners(self, bounded: torch.Tensor) -> torch.Tensor:
        """``(K, N + M)`` how much each point moves with each vertebra (summing to the weights' envelope there)."""
        moved = rigid_maps(bounded, self.fit.frames.centres_mm, self.points_mm) + self.base_mm
        weights = self.moving_frames.weights
        claims = torch.stack([_values_at(weights[:, k : k + 1], moved[k] / self.grid_mm) for k in range(len(moved))])
        envelope = _values_at(weights.sum(1, keepdim=True), (self.points_mm + self.base_mm) / self.grid_mm)
        return claims / claims.sum(0).clamp_min(1e-6) * envelope.clamp(0.0, 1.0)

    def closed_form_mm(self, bounded: torch.Tensor) -> torch.Tensor:
        """``(N + M, 3)`` where the points lie in the moving image (mm, array order) by the closed form."""
        blend = blended_motion(self.weights, *rigid_motions(bounded, self.fit.frames.centres_mm))
        return apply_blended(blend, self.points_mm) + self.base_mm

    def integrated_mm(self, bounded: torch.Tensor) -> torch.Tensor:
        """``(N + M, 3)`` where the points lie in the moving image along the paths of the whole velocity."""
        start = (self.points_mm / self.grid_mm).T.reshape(1, 3, -1, 1, 1)
        return _flow(self.fit.velocity(bounded), start).reshape(3, -1).T * self.grid_mm

    def loss(self, bounded: torch.Tensor, step: int) -> torch.Tensor:
        if step % _REFRESH_EVERY == 0:
            with torch.no_grad():
                if self.fit.recentred and self.slices is not None:
                    self._compare_as_slices()
                self.weights = self.owners(bounded)
                if self.fit.recentred:
                    self.correction = self.integrated_mm(bounded) - self.closed_form_mm(bounded)
        moved = self.closed_form_mm(bounded) + self.correction
        values, inside = self.moving_at(moved[: self.sample_count] / self.step_mm)
        loss = self.similarity(self.fixed_samples, values, mask=inside)
        if len(self.pair_targets_mm):
            distances = ((moved[self.sample_count :] - self.pair_targets_mm) ** 2).sum(dim=1)
            loss = loss + self.fit.settings.points_weight * distances.mean()
        return loss

    def _readable(self, moving: torch.Tensor) -> torch.Tensor:
        return moving if self.moving_mask is None else with_data_mask(moving, self.moving_mask)

    def moving_at(self, voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The CT at ``voxels`` ``(N, 3)`` of its grid, ``(1, 1, N, 1, 1)``, and where it holds data there
        (:func:`.warp.inside_moving_image`, the same shape; ``None`` without a data mask). From the switch to the
        MR's own voxels on a thick-slice MR, the CT averaged across the MR's slice thickness (along the grid axis of
        the slices' normal: rotations of a few degrees are left out)."""
        if self.moving_mask is None:
            return points_at(self.readable, voxels).view(1, 1, -1, 1, 1), None
        values, inside = read_with_data_mask(self.readable, voxels)
        return values.view(1, 1, -1, 1, 1), inside.view(1, 1, -1, 1, 1)

    def pair_offsets(self, bounded: torch.Tensor) -> dict[int, torch.Tensor]:
        if not len(self.pair_targets_mm):
            return {}
        self.weights = self.owners(bounded)
        mapped = self.closed_form_mm(bounded)[self.sample_count :]
        return _mean_offsets(self.weights[:, self.sample_count :], mapped, self.pair_targets_mm)


class _DenseProblem:
    """The similarity over the velocity's whole grid after integrating the whole map by scaling and squaring (MIND,
    NGF, or NMI without samples); point pairs follow the velocity (:func:`_flow`). Reads the fit's current frames."""

    def __init__(self, fit: VertebraFit, pair: ProcessingPair) -> None:
        fixed, moving, spacing, point_pairs = pair.fixed, pair.moving, pair.spacing, pair.point_pairs
        fixed_mask, moving_mask = pair.fixed_mask, pair.moving_mask
        grid, full = tuple(fit.base.shape[2:]), tuple(fixed.shape[2:])
        self.fit = fit
        self.fixed, self.moving = to_grid(fixed, grid), to_grid(moving, grid)
        self.fixed_mask = None if fixed_mask is None else to_grid(fixed_mask.float(), grid, mode="nearest")
        self.moving_mask = None if moving_mask is None else to_grid(moving_mask.float(), grid, mode="nearest")
        self.similarity = SIMILARITY_LOSSES[fit.settings.similarity]
        if fit.settings.similarity == "mind":
            self.similarity = partial(self.similarity, fixed_descriptor=mind_ssc(self.fixed))
        scale = [(g - 1) / max(f - 1, 1) for g, f in zip(grid, full)]
        self.to_grid_voxels = torch.tensor(scale, device=fixed.device).view(1, 3, 1, 1, 1)
        self.step_mm = torch.tensor([float(s) for s in spacing], device=fixed.device)
        self.sources = self.targets_mm = None
        if point_pairs is not None and len(point_pairs[0]) and fit.settings.points_weight > 0:
            sources, targets = (p.to(fixed.device).float() for p in point_pairs)
            self.sources = sources.T.reshape(1, 3, -1, 1, 1) * self.to_grid_voxels
            self.targets_mm = targets * self.step_mm

    def _pairs_mm(self, velocity: torch.Tensor) -> torch.Tensor:
        return (_flow(velocity, self.sources) / self.to_grid_voxels).reshape(3, -1).T * self.step_mm

    def loss(self, bounded: torch.Tensor, step: int) -> torch.Tensor:
        velocity = self.fit.velocity(bounded)
        displacement = integrate_velocity(velocity, self.fit.integration_steps)
        mask = overlap_mask(self.fixed_mask, self.moving_mask, displacement)
        loss = self.similarity(self.fixed, warp(self.moving, displacement, padding_mode="border"), mask=mask)
        if self.sources is not None:
            distances = ((self._pairs_mm(velocity) - self.targets_mm) ** 2).sum(dim=1)
            loss = loss + self.fit.settings.points_weight * distances.mean()
        return loss

    def pair_offsets(self, bounded: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.sources is None:
            return {}
        owner = sample_at(self.fit.frames.weights, self.sources).reshape(len(self.fit.frames.labels), -1)
        return _mean_offsets(owner, self._pairs_mm(self.fit.base), self.targets_mm)


def _across_slices(volume: torch.Tensor, axis: int, taps: Sequence[float]) -> torch.Tensor:
    """``volume`` ``(1, 1, D, H, W)`` averaged over shifts by ``taps`` (voxels, linear interpolation, edges repeated)
    along array ``axis``: the CT as a slice of the MR's thickness sees it, at every voxel.

    Computed once per fit, so that each step reads the CT once per sample instead of once per tap (and its
    backward pass likewise); reading this volume trilinearly instead of averaging trilinear reads adds at most a
    voxel's interpolation blur across the slices. Times and the tiers' accuracy before and after: issue 16's closing
    note, docs/SPEED_PROFILE.md, docs/BENCHMARKS_TIERS.md.
    """
    dim = axis + 2
    size = volume.shape[dim]
    along = [size if d == dim else 1 for d in range(volume.dim())]  # a weight per position along the axis
    index = torch.arange(size, device=volume.device, dtype=torch.float64)
    total = torch.zeros_like(volume)
    for tap in taps:
        where = (index + tap).clamp(0, size - 1)
        low = where.floor().long()
        high = (low + 1).clamp_max(size - 1)
        frac = (where - low).to(volume.dtype).view(along)
        total += volume.index_select(dim, low) * (1 - frac) + volume.index_select(dim, high) * frac
    return total / len(taps)


def _mr_voxel_centres(voxels: torch.Tensor, slices: SliceProfile) -> torch.Tensor:
    """``voxels`` ``(N, 3)`` (processing-grid array indices) moved to the nearest voxel centre of the MR
    (``slices``): there the MR is its own value rather than an interpolation between slices."""
    centre = torch.tensor(slices.centre, device=voxels.device)
    step = torch.tensor(slices.step, device=voxels.device)
    return centre + torch.round((voxels - centre) / step) * step


def _mean_offsets(owner: torch.Tensor, mapped_mm: torch.Tensor, targets_mm: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{k: mean of target - mapped point (mm)}`` over the point pairs vertebra ``k`` owns (``owner`` ``(K, M)``
    above 0.5)."""
    offsets = {}
    for k in range(owner.shape[0]):
        on = owner[k] > 0.5
        if bool(on.any()):
            offsets[k] = (targets_mm[on] - mapped_mm[on]).mean(0)
    return offsets


def rigid_motions(bounded: torch.Tensor, centres_mm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each vertebra's rigid velocity integrated over unit time, as ``x -> R x + o``: ``R`` ``(K, 3, 3)``, ``o``
    ``(K, 3)`` mm.

    The velocity ``t + w x (x - c)`` integrates to ``R (x - c) + c + V t`` with ``R = exp([w])`` and
    ``V = I + B [w] + C [w]^2`` (``B = (1 - cos a) / a^2``, ``C = (a - sin a) / a^3``, ``a = |w|``).

    Args:
        bounded: ``(K, 6)`` translation (mm) and rotation vector (``1 / ROTATION_RADIUS_MM`` rad), array order.
        centres_mm: ``(K, 3)`` centres the rotations act about.
    """
    w = bounded[:, 3:] / ROTATION_RADIUS_MM
    zero = torch.zeros_like(w[:, 0])
    skew = torch.stack([zero, -w[:, 2], w[:, 1], w[:, 2], zero, -w[:, 0], -w[:, 1], w[:, 0], zero], 1).view(-1, 3, 3)
    angle2 = (w * w).sum(1)
    angle = angle2.clamp_min(1e-4).sqrt()
    small = angle2 < 1e-4  # Taylor series near 0, where the closed forms lose precision and their gradients diverge
    a = torch.where(small, 1 - angle2 / 6 + angle2**2 / 120, torch.sin(angle) / angle)
    b = torch.where(small, 0.5 - angle2 / 24 + angle2**2 / 720, (1 - torch.cos(angle)) / angle**2)
    c = torch.where(small, 1 / 6 - angle2 / 120 + angle2**2 / 5040, (angle - torch.sin(angle)) / angle**3)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand_as(skew)
    square = skew @ skew
    rotation = eye + a.view(-1, 1, 1) * skew + b.view(-1, 1, 1) * square
    v = eye + b.view(-1, 1, 1) * skew + c.view(-1, 1, 1) * square
    offset = centres_mm - (rotation @ centres_mm[..., None])[..., 0] + (v @ bounded[:, :3, None])[..., 0]
    return rotation, offset


def rigid_maps(bounded: torch.Tensor, centres_mm: torch.Tensor, points_mm: torch.Tensor) -> torch.Tensor:
    """Where each vertebra's rigid velocity carries ``points_mm`` ``(N, 3)`` in unit time (:func:`rigid_motions`):
    ``(K, N, 3)`` mm."""
    rotation, offset = rigid_motions(bounded, centres_mm)
    return points_mm[None] @ rotation.transpose(1, 2) + offset[:, None]


def blended_motion(weights: torch.Tensor, rotation: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``(N, 12)``: at each of ``N`` points the ``weights`` ``(K, N)``-blend of the motions' ``x -> (R - I) x + o``
    (:func:`rigid_motions`), as the 9 entries of ``R - I`` (row-major) and the 3 of ``o``. Blending the ``(K, 12)``
    motions costs one small matrix product; moving every point by every motion and blending the ``K`` results cost
    the vertebra-wise stage a ``(K, N, 3)`` tensor and its backward pass at every step."""
    eye = torch.eye(3, dtype=rotation.dtype, device=rotation.device)
    return weights.T @ torch.cat([(rotation - eye).flatten(1), offset], dim=1)


def apply_blended(blend: torch.Tensor, points_mm: torch.Tensor) -> torch.Tensor:
    """``points_mm`` ``(N, 3)`` moved by their :func:`blended_motion` ``blend`` ``(N, 12)``: ``(N, 3)`` mm."""
    return points_mm + (blend[:, :9].view(-1, 3, 3) @ points_mm[..., None])[..., 0] + blend[:, 9:]


def _values_at(volume: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
    """``volume`` ``(1, 1, D, H, W)`` at ``(N, 3)`` voxel positions (trilinear, 0 outside): ``(N,)``."""
    return sample_at(volume, voxels.T.reshape(1, 3, -1, 1, 1)).flatten()


def _base_displacement(velocity: torch.Tensor, integration_steps: int) -> torch.Tensor | None:
    """The map of the start's ``velocity`` ``(1, 3, d, h, w)`` (voxels): ``None`` for a zero velocity, without
    integrating; a previous result's map when a correction starts from its velocity (:func:`.warp.map_of_velocity`)."""
    return map_of_velocity(velocity, integration_steps) if bool(velocity.any()) else None


def _displacement_mm(
    displacement: torch.Tensor | None, points_mm: torch.Tensor, spacing: Sequence[float]
) -> torch.Tensor:
    """``(N, 3)`` mm: ``displacement`` (voxels of a grid of ``spacing`` mm, ``None`` = 0) at ``points_mm``."""
    if displacement is None:
        return torch.zeros_like(points_mm)
    step = torch.tensor([float(s) for s in spacing], device=displacement.device)
    voxels = (points_mm / step).T.reshape(1, 3, -1, 1, 1)
    return sample_at(displacement, voxels, padding_mode="border").reshape(3, -1).T * step


def _flow(velocity: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Where points ``start`` ``(1, 3, N, 1, 1)`` (voxels of ``velocity``'s grid) are after following the stationary
    ``velocity`` for unit time: :data:`_PATH_STEPS` midpoint steps."""
    moved = start
    step = 1.0 / _PATH_STEPS
    for _ in range(_PATH_STEPS):
        half = moved + 0.5 * step * sample_at(velocity, moved, padding_mode="border")
        moved = moved + step * sample_at(velocity, half, padding_mode="border")
    return moved


def _midway_frames(
    bounded: torch.Tensor, frames: VertebraFrames, base: torch.Tensor, labels: torch.Tensor, integration_steps: int
) -> tuple[VertebraFrames, torch.Tensor]:
    """Frames built on ``labels`` (moving image) carried by half the current map, and the motions ``(K, 6)`` that
    give the same velocity inside each vertebra about its new centre: ``t' = t + w x (c' - c)``. Unchanged when a
    vertebra would vanish."""
    displacement = integrate_velocity(0.5 * (base + rigid_velocity(bounded, frames)), integration_steps)
    moved = warp_labels(labels, displacement, label_values=frames.labels)
    present = set(present_labels(moved))
    if not all(label in present for label in frames.labels):
        return frames, bounded.detach().clone()
    new = vertebra_frames(moved, frames.spacing, frames.sigma_mm, frames.labels, frames.margin_mm, frames.partition_mm)
    rotation = bounded[:, 3:] / ROTATION_RADIUS_MM
    shifted = bounded.detach().clone()
    shifted[:, :3] = bounded[:, :3] + torch.linalg.cross(rotation, new.centres_mm - frames.centres_mm, dim=1)
    return new, shifted


def _bone_band(labels: torch.Tensor, values: Sequence[int], spacing: Sequence[float], band_mm: float) -> torch.Tensor:
    """``(1, 1, D, H, W)`` bool: voxels within ``band_mm`` (along each array axis) of a vertebra in ``values``."""
    bone = torch.isin(labels, torch.tensor(list(values), device=labels.device))
    result = torch.zeros_like(bone)
    found = bone[0, 0].nonzero()
    if not len(found):
        return result
    radii = [max(int(round(band_mm / step)), 0) for step in spacing]
    # The dilation only reaches ``radius`` beyond the bone's box: on the box alone it costs a fraction of the grid's.
    box = tuple(
        slice(max(int(low) - r, 0), min(int(high) + r + 1, size))
        for low, high, r, size in zip(found.min(0).values, found.max(0).values, radii, bone.shape[2:])
    )
    band = bone[(..., *box)]
    for axis, radius in enumerate(radii):  # one axis at a time: a 3D box max-pool cost 2 s on a 1 mm spine crop
        if radius:
            band = _dilated_along(band, axis + 2, radius)
    result[(..., *box)] = band
    return result


def _dilated_along(mask: torch.Tensor, axis: int, radius: int) -> torch.Tensor:
    """``mask`` (bool) dilated by ``radius`` voxels along ``axis``: a voxel is set when any of the ``2 radius + 1``
    around it is, read from a running count (one pass, whatever the radius; a max-pool's cost grows with it)."""
    size = mask.shape[axis]
    count = F.pad(torch.cumsum(mask, dim=axis, dtype=torch.int32).movedim(axis, -1), (1, 0)).movedim(-1, axis)
    index = torch.arange(size, device=mask.device)
    above, below = (index + radius + 1).clamp(max=size), (index - radius).clamp(min=0)
    return count.index_select(axis, above) > count.index_select(axis, below)


def _unravel(index: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``(N, 3)`` float grid indices (array order) of the flat ``index`` ``(N,)`` into ``shape``. Not
    ``torch.unravel_index``, whose argument check imports sympy on first use (0.25 s of every command)."""
    _, h, w = shape
    return torch.stack([index // (h * w), (index // w) % h, index % w], dim=1).float()


def _sample_points(region: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of ``count`` voxels of the boolean ``region`` (all of them when it has fewer), drawn with a fixed
    seed so that a registration is repeatable."""
    index = region.nonzero().flatten()
    if index.numel() <= count:
        return index
    generator = torch.Generator().manual_seed(0)
    pick = torch.randperm(index.numel(), generator=generator)[:count].to(index.device)
    return index[pick.sort().values]

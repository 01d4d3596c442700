"""Test-time refinement: a few gradient steps on one pair's stationary velocity field.

Starting from the network's velocity, minimise eq. (1) of the paper for this pair alone (MIND similarity +
diffusion + the rigidity penalties), plus an optional term that pulls user-given point pairs together. The losses
are evaluated on the velocity's own grid (half resolution for the fast models), which keeps a step cheap on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

from .errors import CancelledError
from .losses.objective import Eq1Weights, eq1_loss
from .losses.similarity import SIMILARITY_LOSSES, mind_ssc
from .warp import integrate_velocity, overlap_mask, sample_at, to_grid, warp

if TYPE_CHECKING:
    from .processing import ProcessingPair


@dataclass(frozen=True)
class RefineWeights(Eq1Weights):
    """Weights of the refinement loss: eq. (1) (:class:`.losses.objective.Eq1Weights`) + point pairs; rigidity terms
    use millimetre units.

    Attributes:
        points: Weight of the mean squared distance (mm^2) between mapped and target points.
        learning_rate: Adam step size, in voxels of the velocity grid.
    """

    # Four times the paper's training weights: after the vertebra-wise rigid stage the dense steps should bend soft
    # tissue, not bone (7 benchmark pairs, 20 steps: DSC 0.966 / rigid DSC 0.991 / |%dvol| 0.37 / TRE 0.42 mm vs
    # 0.957 / 0.979 / 1.36 / 0.47 with the paper's weights; NMI instead of MIND 0.963 / 0.977 / 0.66 / 0.42).
    rigid_field: float = 0.04
    pc: float = 0.4
    oc: float = 0.2
    points: float = 0.05
    learning_rate: float = 0.05


@dataclass
class _PointTerm:
    """User point pairs, ready for the loss on the velocity's grid.

    Attributes:
        sources: ``(1, 3, N, 1, 1)`` fixed points in voxels of the velocity grid.
        targets_mm: ``(N, 3)`` their targets in mm (full-grid voxels times the spacing, array order).
        scale: ``(3,)`` full-grid voxels per velocity-grid voxel.
        spacing: Full-grid voxel size in mm, array order.
    """

    sources: torch.Tensor
    targets_mm: torch.Tensor
    scale: torch.Tensor
    spacing: Sequence[float]


@dataclass
class _Problem:
    """One pair's refinement loss, everything computed once before the steps.

    Attributes:
        fixed, moving: ``(1, 1, d, h, w)`` images on the velocity grid.
        labels: ``(1, 1, d, h, w)`` int64 vertebra labels of the moving image on the velocity grid.
        fixed_mask, moving_mask: ``(1, 1, d, h, w)`` float data masks on the velocity grid, or None.
        spacing: Velocity-grid voxel size in mm, array order.
        similarity: The similarity loss (MIND: with the fixed image's descriptor already computed).
        weights, integration_steps, vertebra_weights: As given to :func:`refine_velocity`.
        points: The point-pair term, or None without point pairs.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    labels: torch.Tensor
    fixed_mask: torch.Tensor | None
    moving_mask: torch.Tensor | None
    spacing: list[float]
    similarity: Callable[..., torch.Tensor]
    weights: RefineWeights
    integration_steps: int
    vertebra_weights: Mapping[int, float] | None
    points: _PointTerm | None


def refine_velocity(
    velocity: torch.Tensor,
    pair: ProcessingPair,
    steps: int,
    weights: RefineWeights = RefineWeights(),
    integration_steps: int = 7,
    vertebra_weights: Mapping[int, float] | None = None,
    progress: Callable[[float, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Optimise a velocity field for one pair.

    Args:
        velocity: ``(1, 3, d, h, w)`` initial velocity in voxels of its grid (often half the image grid).
        pair: The pair on its full grid (:class:`.processing.ProcessingPair`): the normalised images, the moving
            vertebra labels, the spacing (mm, array order), the data masks (:func:`.warp.overlap_mask`) and the point
            pairs ``(fixed points, targets)`` in full-grid voxels: the refined map should send each fixed point to
            its target.
        steps: Number of Adam steps (0 returns ``velocity`` unchanged).
        weights: Loss weights.
        integration_steps: Scaling-and-squaring steps.
        vertebra_weights: Label -> multiplier of the rigidity terms (0 excludes that vertebra).

    Returns:
        ``(1, 3, d, h, w)`` refined velocity (detached).
    """
    if steps <= 0:
        return velocity.detach()
    problem = _prepare_problem(velocity, pair, weights, integration_steps, vertebra_weights)
    v = velocity.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=weights.learning_rate)
    for step in range(steps):
        if should_cancel is not None and should_cancel():
            raise CancelledError("registration cancelled")
        _adam_step(optimizer, v, problem)
        if progress is not None:
            progress((step + 1) / steps, f"refinement step {step + 1}/{steps}")
    return v.detach()


def _prepare_problem(
    velocity: torch.Tensor,
    pair: ProcessingPair,
    weights: RefineWeights,
    integration_steps: int,
    vertebra_weights: Mapping[int, float] | None,
) -> _Problem:
    """The pair, its masks and the point pairs resampled to the velocity's grid (arguments of
    :func:`refine_velocity`)."""
    grid = tuple(velocity.shape[2:])
    full = tuple(pair.fixed.shape[2:])
    ratio = [(f - 1) / max(g - 1, 1) for f, g in zip(full, grid)]
    grid_spacing = [s * r for s, r in zip(pair.spacing, ratio)]
    fixed_g = to_grid(pair.fixed, grid)
    moving_g = to_grid(pair.moving, grid)
    labels_g = to_grid(pair.moving_labels.float(), grid, mode="nearest").long()
    fixed_mask_g, moving_mask_g = (
        None if m is None else to_grid(m.float(), grid, mode="nearest") for m in (pair.fixed_mask, pair.moving_mask)
    )
    points = pair.point_pairs
    return _Problem(
        fixed=fixed_g,
        moving=moving_g,
        labels=labels_g,
        fixed_mask=fixed_mask_g,
        moving_mask=moving_mask_g,
        spacing=grid_spacing,
        similarity=_similarity(weights, fixed_g),
        weights=weights,
        integration_steps=integration_steps,
        vertebra_weights=vertebra_weights,
        points=None if points is None else _point_term(points, ratio, pair.spacing, velocity.device),
    )


def _similarity(weights: RefineWeights, fixed: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The similarity loss of ``weights``; MIND gets ``fixed``'s descriptor, the same at every step."""
    similarity = SIMILARITY_LOSSES[weights.similarity]
    if weights.similarity == "mind":
        similarity = partial(similarity, fixed_descriptor=mind_ssc(fixed))
    return similarity


def _point_term(
    point_pairs: tuple[torch.Tensor, torch.Tensor],
    ratio: Sequence[float],
    spacing: Sequence[float],
    device: torch.device,
) -> _PointTerm:
    """Fixed points on the velocity grid and targets in mm; ``ratio``: full-grid voxels per velocity-grid voxel."""
    scale = torch.tensor(ratio, dtype=torch.float32, device=device)
    sources = (point_pairs[0].float() / scale).T.reshape(1, 3, -1, 1, 1)
    targets_mm = point_pairs[1].float() * torch.tensor(spacing, device=device)
    return _PointTerm(sources=sources, targets_mm=targets_mm, scale=scale, spacing=spacing)


def _adam_step(optimizer: torch.optim.Optimizer, v: torch.Tensor, problem: _Problem) -> None:
    """One step of ``optimizer`` on the velocity ``v`` ``(1, 3, d, h, w)``."""
    optimizer.zero_grad(set_to_none=True)
    loss = _loss(v, problem)
    loss.backward()
    optimizer.step()


def _loss(v: torch.Tensor, problem: _Problem) -> torch.Tensor:
    """Eq. (1) for the velocity ``v`` ``(1, 3, d, h, w)``, plus the point-pair term (scalar tensor)."""
    displacement = integrate_velocity(v, problem.integration_steps)
    # Border padding: zero padding would put an artificial edge into the warped image that MIND latches onto.
    warped = warp(problem.moving, displacement, padding_mode="border")
    mask = overlap_mask(problem.fixed_mask, problem.moving_mask, displacement)
    loss, _ = eq1_loss(
        problem.weights,
        problem.fixed,
        warped,
        v,
        displacement,
        problem.labels,
        problem.spacing,
        mask=mask,
        similarity=problem.similarity,
        vertebra_weights=problem.vertebra_weights,
    )
    if problem.points is not None and problem.weights.points > 0:
        loss = loss + problem.weights.points * _point_distance(problem.points, displacement)
    return loss


def _point_distance(points: _PointTerm, displacement: torch.Tensor) -> torch.Tensor:
    """Mean squared distance (mm^2) between the mapped fixed points and their targets.

    Args:
        points: The point pairs.
        displacement: ``(1, 3, d, h, w)`` displacement in voxels of the velocity grid.
    """
    mapped = points.sources + sample_at(displacement, points.sources, padding_mode="border")
    mapped_mm = (mapped.reshape(3, -1).T * points.scale) * torch.tensor(points.spacing, device=displacement.device)
    return ((mapped_mm - points.targets_mm) ** 2).sum(dim=1).mean()

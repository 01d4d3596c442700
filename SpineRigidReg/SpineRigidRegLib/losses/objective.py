"""Eq. (1) of the paper, written once: ``sim(F, M o phi) + lambda * diffusion(v) + sum_k w_k L_k(labels, phi)``.

Training (:func:`..training.trainer.registration_loss`) and the test-time refinement (:func:`..refine.refine_velocity`)
both minimise it; their weight types (:class:`..training.config.LossConfig`, :class:`..refine.RefineWeights`) extend
:class:`Eq1Weights` with what only they have (auxiliary supervised terms; point pairs and a step size).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..validation import check_settings_fields
from .rigidity import RIGIDITY_TERMS, rigidity_loss
from .similarity import SIMILARITY_LOSSES
from .smoothness import diffusion_loss


@dataclass(frozen=True)
class Eq1Weights:
    """The weights of eq. (1).

    Attributes:
        similarity: ``"mind"`` (the paper's choice), ``"nmi"`` or ``"ngf"``.
        similarity_weight: Weight of the similarity term.
        smooth: Diffusion regularisation of the velocity (the paper's lambda = 0.01).
        rigid_dice, rigid_field, pc, oc, volume: Rigidity penalty weights (0 = off); the losses of
            :mod:`.rigidity`, in mm units.
    """

    similarity: str = "mind"
    similarity_weight: float = 1.0
    smooth: float = 0.01
    rigid_dice: float = 0.0
    rigid_field: float = 0.0
    pc: float = 0.0
    oc: float = 0.0
    volume: float = 0.0

    def __post_init__(self) -> None:
        """Every numeric field (a subclass's too) must be finite and >= 0."""
        check_settings_fields(self, "weight", SIMILARITY_LOSSES)

    def rigidity_weights(self) -> dict[str, float]:
        """``{name: weight}`` of the active rigidity terms (names of :data:`.rigidity.RIGIDITY_TERMS`)."""
        return {name: float(getattr(self, name)) for name in RIGIDITY_TERMS if getattr(self, name) > 0}


def eq1_loss(
    weights: Eq1Weights,
    fixed: torch.Tensor,
    warped: torch.Tensor,
    velocity: torch.Tensor,
    displacement: torch.Tensor,
    moving_labels: torch.Tensor,
    spacing: Sequence[float],
    *,
    mask: torch.Tensor | None = None,
    similarity: Callable[..., torch.Tensor] | None = None,
    vertebra_weights: Mapping[int, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. (1) for a batch.

    Args:
        weights: The weights.
        fixed, warped: ``(B, 1, D, H, W)`` fixed image and moving image warped by ``displacement``.
        velocity: ``(B, 3, d, h, w)`` the stationary velocity (voxels of its grid).
        displacement: ``(B, 3, D, H, W)`` voxels, ``exp(velocity)`` on the images' grid.
        moving_labels: ``(B, 1, D, H, W)`` integer vertebra labels of the moving image.
        spacing: mm per voxel of the images' grid, array order.
        mask: ``(B, 1, D, H, W)`` where both images have data; the similarity is compared there only and scaled
            by the overlap, so it keeps the weight per compared voxel it was tuned with (the regularisers are means
            over the whole grid; a mean over the overlap alone made the bone shrink 2-4 % more).
        similarity: The similarity function (default ``SIMILARITY_LOSSES[weights.similarity]``; the refinement
            passes one with the fixed MIND descriptor precomputed).
        vertebra_weights: Label -> multiplier of the rigidity terms (0 excludes a vertebra).

    Returns:
        The scalar loss and its terms ``similarity``, ``smooth``, ``rigidity`` (tensors, graph attached).
    """
    similarity = similarity or SIMILARITY_LOSSES[weights.similarity]
    zero = displacement.new_zeros(())
    sim = zero
    if weights.similarity_weight > 0:
        sim = similarity(fixed, warped, mask=mask)
        if mask is not None:
            sim = sim * mask.float().mean()
    smooth = diffusion_loss(velocity)
    rigid_weights = weights.rigidity_weights()
    rigidity = zero
    if rigid_weights:
        rigidity = rigidity_loss(
            moving_labels, displacement, rigid_weights, spacing=spacing, vertebra_weights=vertebra_weights
        )
    total = weights.similarity_weight * sim + weights.smooth * smooth + rigidity
    return total, {"similarity": sim, "smooth": smooth, "rigidity": rigidity}

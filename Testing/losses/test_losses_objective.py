"""Eq. (1), written once (losses/objective.py) and used by training and the refinement."""

from __future__ import annotations

import pytest
import torch
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.losses.objective import Eq1Weights, eq1_loss
from SpineRigidRegLib.losses.rigidity import rigidity_loss
from SpineRigidRegLib.losses.similarity import mind_loss
from SpineRigidRegLib.losses.smoothness import diffusion_loss
from SpineRigidRegLib.refine import RefineWeights
from SpineRigidRegLib.training.config import LossConfig
from SpineRigidRegLib.warp import integrate_velocity, warp


def _case():
    gen = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 16, 16, 16, generator=gen)
    moving = torch.rand(1, 1, 16, 16, 16, generator=gen)
    labels = torch.zeros(1, 1, 16, 16, 16, dtype=torch.int64)
    labels[..., 3:8, 4:12, 4:12] = 1
    labels[..., 9:14, 4:12, 4:12] = 2
    velocity = 0.3 * torch.randn(1, 3, 16, 16, 16, generator=gen)
    displacement = integrate_velocity(velocity, 7)
    return fixed, warp(moving, displacement), velocity, displacement, labels


def test_the_objective_is_the_weighted_sum_of_the_papers_terms():
    fixed, warped, velocity, displacement, labels = _case()
    weights = Eq1Weights(similarity_weight=2.0, smooth=0.5, pc=0.3, rigid_field=0.1)
    total, terms = eq1_loss(weights, fixed, warped, velocity, displacement, labels, (1.0, 2.0, 1.0))
    rigid = rigidity_loss(labels, displacement, {"rigid_field": 0.1, "pc": 0.3}, spacing=(1.0, 2.0, 1.0))
    expected = 2.0 * mind_loss(fixed, warped) + 0.5 * diffusion_loss(velocity) + rigid
    torch.testing.assert_close(total, expected)
    assert set(terms) == {"similarity", "smooth", "rigidity"}


def test_a_mask_compares_the_images_only_where_both_have_data_scaled_by_the_overlap():
    fixed, warped, velocity, displacement, labels = _case()
    mask = torch.zeros_like(fixed, dtype=torch.bool)
    mask[..., :8, :, :] = True
    weights = Eq1Weights(smooth=0.0)
    total, _ = eq1_loss(weights, fixed, warped, velocity, displacement, labels, (1.0,) * 3, mask=mask)
    torch.testing.assert_close(total, mind_loss(fixed, warped, mask=mask) * 0.5)


def test_training_and_refinement_weights_are_the_same_type_and_checked_the_same_way():
    assert issubclass(LossConfig, Eq1Weights) and issubclass(RefineWeights, Eq1Weights)
    for cls in (LossConfig, RefineWeights):
        with pytest.raises(InputError, match="pc"):
            cls(pc=-1.0)
        with pytest.raises(InputError, match="similarity"):
            cls(similarity="ssd")
    with pytest.raises(InputError, match="points"):
        RefineWeights(points=float("nan"))

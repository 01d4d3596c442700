"""The dense test-time refinement (refine.py): it optimises eq. (1) for one pair and recovers a known shift."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from SpineRigidRegLib.errors import CancelledError
from SpineRigidRegLib.processing import ProcessingPair
from SpineRigidRegLib.refine import RefineWeights, refine_velocity
from SpineRigidRegLib.warp import integrate_velocity, sample_at


def _blob_pair(shift: float):
    """A smooth blob (fixed) and the same blob moved by ``shift`` voxels along the first axis (moving), 32^3, 1 mm."""
    z, y, x = torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij")

    def blob(cz: float) -> torch.Tensor:
        return torch.exp(-(((z - cz) ** 2 + (y - 16) ** 2 + (x - 16) ** 2) / (2 * 4.0**2)))[None, None]

    labels = torch.zeros(1, 1, 32, 32, 32, dtype=torch.int64)
    return ProcessingPair(blob(16.0), blob(16.0 + shift), labels, (1.0, 1.0, 1.0))


def test_zero_steps_return_the_start_unchanged():
    pair = _blob_pair(2.0)
    start = torch.randn(1, 3, 16, 16, 16)
    out = refine_velocity(start, pair, steps=0)
    assert torch.equal(out, start) and not out.requires_grad


def test_refinement_recovers_most_of_a_known_shift_in_the_right_direction():
    pair = _blob_pair(2.0)  # the fixed point x matches the moving point x + 2 along axis 0
    weights = RefineWeights(learning_rate=0.1)  # MIND-SSC, the paper's similarity
    velocity = refine_velocity(torch.zeros(1, 3, 16, 16, 16), pair, 60, weights)
    displacement = integrate_velocity(velocity, 7)  # voxels of the 16^3 velocity grid: half the image's
    centre = 31 / 15 * displacement[0, :, 6:10, 6:10, 6:10].mean(dim=(1, 2, 3))
    assert 1.0 < float(centre[0]) < 3.0, centre
    assert float(centre[1:].abs().max()) < 0.3, centre


def test_progress_reports_every_step_and_cancel_stops_before_the_next():
    pair = _blob_pair(2.0)
    start = torch.zeros(1, 3, 16, 16, 16)
    messages = []
    refine_velocity(start, pair, 3, progress=lambda f, m: messages.append((f, m)))
    assert messages == [(1 / 3, "refinement step 1/3"), (2 / 3, "refinement step 2/3"), (1.0, "refinement step 3/3")]
    asked = []

    def cancel_at_the_third_question() -> bool:
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(CancelledError, match="registration cancelled"):
        refine_velocity(start, pair, 5, should_cancel=cancel_at_the_third_question)
    assert len(asked) == 3  # asked before each step: two steps ran


def test_point_pairs_pull_the_point_to_its_target_and_weigh_nothing_at_weight_zero():
    pair = _blob_pair(0.0)  # the images agree: only the point pair asks for a motion
    start = torch.zeros(1, 3, 16, 16, 16)
    pairs = (torch.tensor([[16.0, 16.0, 16.0]]), torch.tensor([[18.0, 16.0, 16.0]]))  # full-grid voxels
    weights = RefineWeights(points=1.0, learning_rate=0.1)
    velocity = refine_velocity(start, replace(pair, point_pairs=pairs), 20, weights)
    source = (pairs[0] * 15 / 31).T.reshape(1, 3, 1, 1, 1)  # on the 16^3 velocity grid
    moved = 31 / 15 * sample_at(integrate_velocity(velocity, 7), source).reshape(3)  # full-grid voxels
    assert abs(float(moved[0]) - 2.0) < 1.0, moved  # from 2 voxels away at the start
    assert float(moved[1:].abs().max()) < 0.3, moved

    unweighted = RefineWeights(points=0.0)
    without = refine_velocity(start, pair, 2, unweighted)
    zero_weight = refine_velocity(start, replace(pair, point_pairs=pairs), 2, unweighted)
    assert torch.equal(without, zero_weight)

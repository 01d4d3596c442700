"""The CPU speed-ups of warping and of the refinement step compute what the plain definitions compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from SpineRigidRegLib import warp as warp_module
from SpineRigidRegLib.geometry import voxel_to_normalized
from SpineRigidRegLib.losses import RIGIDITY_LOSSES, diffusion_loss, mind_loss
from SpineRigidRegLib.processing import ProcessingPair
from SpineRigidRegLib.refine import RefineWeights, refine_velocity
from SpineRigidRegLib.warp import identity_grid, integrate_velocity, sample_at


@pytest.fixture
def forced_chunks(monkeypatch):
    """Make the chunked CPU grid_sample path run on tiny volumes, in 3 chunks."""
    monkeypatch.setattr(warp_module, "_MIN_POINTS_PER_CHUNK", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)


def smooth_field(shape, amplitude, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    coarse = amplitude * torch.randn(1, 3, 3, 3, 3, generator=gen, dtype=dtype)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def plain_sample(volume, coords, padding_mode):
    normalized = voxel_to_normalized(coords, volume.shape[2:])
    return F.grid_sample(volume, normalized, mode="bilinear", padding_mode=padding_mode, align_corners=True)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_chunked_sampling_equals_one_grid_sample_call(forced_chunks, padding_mode):
    gen = torch.Generator().manual_seed(1)
    volume = torch.rand(1, 2, 9, 8, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    # 10 slabs of sample points: 3 chunks of 4, the last padded with a repeated slab
    coords = identity_grid((10, 6, 5), dtype=torch.float64) + 3.0 * torch.rand(1, 3, 10, 6, 5, generator=gen) - 1.0
    coords.requires_grad_(True)
    assert warp_module._cpu_chunks(volume, voxel_to_normalized(coords, volume.shape[2:])) == 3
    out = sample_at(volume, coords, padding_mode=padding_mode)
    expected = plain_sample(volume, coords, padding_mode)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    cotangent = torch.rand(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, (volume, coords), cotangent)
    grads_ref = torch.autograd.grad(expected, (volume, coords), cotangent)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-14)


def test_chunking_is_skipped_where_it_cannot_help_or_would_cost_memory(forced_chunks, monkeypatch):
    volume = torch.rand(1, 3, 6, 6, 6, requires_grad=True)
    grid = voxel_to_normalized(identity_grid((6, 6, 6)))
    assert warp_module._cpu_chunks(volume, grid) == 3
    assert warp_module._cpu_chunks(volume.expand(2, -1, -1, -1, -1), grid.expand(2, -1, -1, -1, -1)) == 1  # batch
    assert warp_module._cpu_chunks(volume, grid[:, :1]) == 1  # a single slab of points
    monkeypatch.setattr(warp_module, "_CHUNK_GRAD_BYTES", 2 * volume.numel() * 4)
    assert warp_module._cpu_chunks(volume, grid) == 2  # a copy of the volume's gradient per chunk
    assert warp_module._cpu_chunks(volume.detach(), grid) == 3


def test_integrate_velocity_equals_plain_scaling_and_squaring(forced_chunks):
    velocity = smooth_field((9, 8, 10), amplitude=6.0).requires_grad_(True)
    displacement = integrate_velocity(velocity, steps=5)
    expected = velocity / 32
    for _ in range(5):
        expected = expected + plain_sample(
            expected, identity_grid((9, 8, 10), dtype=torch.float64) + expected, "border"
        )
    torch.testing.assert_close(displacement, expected, rtol=0, atol=0)
    cotangent = smooth_field((9, 8, 10), amplitude=1.0, seed=3)
    (grad,) = torch.autograd.grad(displacement, velocity, cotangent)
    (grad_ref,) = torch.autograd.grad(expected, velocity, cotangent)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-14)


def test_identity_grid_is_a_fresh_tensor_and_the_cache_stays_small():
    grid = identity_grid((3, 4, 5))
    grid.zero_()
    again = identity_grid((3, 4, 5))
    assert float(again[0, 2, 1, 2, 4]) == 4.0 and float(again[0, 0, 2, 0, 0]) == 2.0
    for n in range(2, 2 + 3 * warp_module._IDENTITY_CACHE_SIZE):
        identity_grid((n, 2, 2), dtype=torch.float64)
    assert len(warp_module._IDENTITY_CACHE) <= warp_module._IDENTITY_CACHE_SIZE


def test_refinement_steps_equal_the_separate_loss_definitions():
    # refine_velocity now reuses the fixed MIND descriptor and evaluates the rigidity terms together; its Adam steps
    # must follow the plain sum of the individual losses.
    shape = (14, 12, 13)
    gen = torch.Generator().manual_seed(5)
    labels = torch.zeros(1, 1, *shape, dtype=torch.int64)
    labels[..., 2:6, 3:9, 3:10] = 21
    labels[..., 8:12, 3:9, 3:10] = 22
    fixed = (0.3 + 0.4 * (labels > 0) + 0.1 * torch.rand(1, 1, *shape, generator=gen)).double()
    moving = (0.2 + 0.5 * (labels > 0) + 0.1 * torch.rand(1, 1, *shape, generator=gen)).double()
    velocity = smooth_field(shape, amplitude=1.5, seed=2)
    spacing = (1.5, 1.2, 1.0)
    weights = RefineWeights(rigid_dice=0.2, volume=0.1)
    pair = ProcessingPair(fixed, moving, labels, spacing)
    refined = refine_velocity(velocity, pair, steps=3, weights=weights, integration_steps=4)

    v = velocity.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=weights.learning_rate)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        displacement = integrate_velocity(v, 4)
        loss = mind_loss(fixed, warp_module.warp(moving, displacement, padding_mode="border"))
        loss = loss + weights.smooth * diffusion_loss(v)
        for name in ("rigid_field", "pc", "oc", "rigid_dice", "volume"):
            loss = loss + getattr(weights, name) * RIGIDITY_LOSSES[name](labels, displacement, spacing=spacing)
        loss.backward()
        optimizer.step()
    assert float((refined - velocity).abs().max()) > 0.01
    torch.testing.assert_close(refined, v.detach(), rtol=1e-9, atol=1e-9)

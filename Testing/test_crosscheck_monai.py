"""Numerical cross-checks of the spatial transformer and of scaling and squaring against MONAI (test-only).

MONAI's dense displacement fields use our convention: ``(B, 3, D, H, W)`` in voxels, channel ``c`` along spatial
axis ``c`` of the tensor, pull-back, ``grid_sample`` with ``align_corners=True``. Its ``DVF2DDF`` computes
``ddf + warp(ddf, ddf)`` as we do; our composition extends the field by its border values outside the grid, so the
reference uses ``padding_mode="border"``. (NMI is cross-checked in test_losses_similarity.)

Observed maximum absolute differences (torch 2.13 CPU, MONAI 1.6.1, fields up to 8-9 voxels): trilinear warp 1.7e-6
(float32) / 3.0e-15 (float64) on [0, 1] images, nearest 0; warp gradients 4.0e-15 (float64); 7-step integration
5.7e-6 voxels (float32, displacements up to 12.6 voxels) / 1.1e-14 voxels (float64).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from SpineRigidRegLib.warp import SpatialTransformer, VelocityIntegrator, integrate_velocity, warp

blocks = pytest.importorskip("monai.networks.blocks", reason="MONAI is a test-only dependency")
pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp. Using PyTorch native grid_sample")

SHAPE = (12, 17, 10)  # non-cubic, so that an axis-order mix-up shows
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}  # warp: max |ours - MONAI| in image units


def smooth(amplitude, dtype, seed, batch=2, shape=SHAPE):
    gen = torch.Generator().manual_seed(seed)
    coarse = amplitude * torch.randn(batch, 3, 3, 4, 3, generator=gen, dtype=dtype)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_warp_matches_monai_warp(dtype, padding_mode, mode):
    gen = torch.Generator().manual_seed(1)
    volume = torch.rand(2, 2, *SHAPE, generator=gen, dtype=dtype)
    field = smooth(3.0, dtype, seed=2)  # up to ~8 voxels: samples leave the grid, so padding is exercised
    reference = blocks.Warp(mode=mode, padding_mode=padding_mode)(volume, field)
    ours = warp(volume, field, mode=mode, padding_mode=padding_mode)
    module = SpatialTransformer(mode=mode, padding_mode=padding_mode)(volume, field)
    tolerance = 0.0 if mode == "nearest" else TOLERANCE[dtype]
    assert float((ours - reference).abs().max()) <= tolerance
    assert torch.equal(module, ours)


def test_warp_gradients_match_monai():
    gen = torch.Generator().manual_seed(3)
    volume = torch.rand(1, 1, *SHAPE, generator=gen, dtype=torch.float64, requires_grad=True)
    field = smooth(2.0, torch.float64, seed=4, batch=1).requires_grad_(True)
    cotangent = torch.rand(1, 1, *SHAPE, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad(warp(volume, field, padding_mode="border"), (volume, field), cotangent)
    theirs = torch.autograd.grad(blocks.Warp(padding_mode="border")(volume, field), (volume, field), cotangent)
    for a, b in zip(ours, theirs, strict=True):
        assert float((a - b).abs().max()) <= 1e-11


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.float64, 1e-11)])
def test_scaling_and_squaring_matches_monai_dvf2ddf(dtype, tolerance):
    velocity = smooth(5.0, dtype, seed=5)
    reference = blocks.DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")(velocity)
    ours = integrate_velocity(velocity, steps=7)
    assert float(ours.abs().max()) > 3.0  # a large deformation, so that all seven compositions matter
    assert float((ours - reference).abs().max()) <= tolerance  # voxels
    assert torch.equal(VelocityIntegrator(7)(velocity), ours)
    # the border extension is what differs from MONAI's default zero padding: only near the faces
    zeros = blocks.DVF2DDF(num_steps=7)(velocity)
    assert float((ours - zeros).abs().max()) > 0.1

"""MIND-SSC, NMI and NGF similarity losses (the diffusion regulariser: test_smoothness.py)."""

from __future__ import annotations

import pytest
import torch
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.losses import (
    SIMILARITY_LOSSES,
    MINDSSCLoss,
    NGFLoss,
    NMILoss,
    diffusion_loss,
    joint_histogram,
    mind_loss,
    mind_ssc,
    mutual_information,
    ngf_loss,
    nmi_loss,
)
from SpineRigidRegLib.losses.similarity import parzen_weights
from SpineRigidRegLib.warp import resize_displacement, warp


def tissue_phantom(n: int = 24, shift: int = 0) -> torch.Tensor:
    """Piecewise-constant (1, 1, n, n, n) float64 image with four tissues, moved ``shift`` voxels along axis 0."""
    g = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * 3, indexing="ij"))
    g[0] -= shift
    img = torch.full((n, n, n), 0.1, dtype=torch.float64)
    img[((g[0] - 12) ** 2 / 64 + (g[1] - 12) ** 2 / 49 + (g[2] - 12) ** 2 / 36) < 1] = 0.4
    img[((g[0] - 10) ** 2 + (g[1] - 13) ** 2 + (g[2] - 11) ** 2) < 9] = 0.7
    img[(g[0] - 15).abs().lt(2) & (g[1] - 9).abs().lt(3) & (g[2] - 14).abs().lt(2)] = 0.9
    return img[None, None]


def smooth_phantom(n: int = 24, shift: float = 0.0) -> torch.Tensor:
    """Smooth (1, 1, n, n, n) float64 image in [0, 1] with blobs and a gentle texture."""
    g = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * 3, indexing="ij"))
    c = torch.tensor([n / 2 + shift, n / 2, n / 2], dtype=torch.float64).view(3, 1, 1, 1)
    img = 0.2 + 0.5 * torch.exp(-((g - c) ** 2).sum(0) / 32.0)
    img = img + 0.25 * torch.exp(-((g - c - torch.tensor([3.0, -4.0, 2.0]).view(3, 1, 1, 1).double()) ** 2).sum(0) / 8)
    img = img + 0.1 * torch.sin(g[2] / 3.0) * torch.cos(g[1] / 4.0)
    return img.clamp(0, 1)[None, None]


MONOTONE_REMAPS = {
    "sqrt": lambda x: x.sqrt(),
    "square": lambda x: x**2,
    "sigmoid": lambda x: torch.sigmoid(8 * (x - 0.5)),
    "gamma0.7": lambda x: x**0.7,
}


# ------------------------------------------------------------------------------------------------------ MIND
def test_mind_descriptor_shape_range_and_normalisation():
    img = smooth_phantom(12)
    desc = mind_ssc(img)
    assert desc.shape == (1, 12, 12, 12, 12)
    assert float(desc.min()) > 0 and float(desc.max()) <= 1.0
    # the channel with the smallest patch distance is exactly 1 at every voxel
    assert torch.allclose(desc.max(dim=1).values, torch.ones(1, 12, 12, 12, dtype=torch.float64))
    flat = mind_ssc(torch.full((1, 1, 8, 8, 8), 0.3))
    assert torch.allclose(flat, torch.ones_like(flat))  # a flat image is finite, no 0/0


def test_mind_is_invariant_to_affine_remaps_exactly_and_to_monotone_ones_approximately():
    fixed = tissue_phantom()
    shifted = tissue_phantom(shift=2)
    assert float(mind_loss(fixed, fixed)) == 0.0
    misaligned = float(mind_loss(fixed, shifted))
    assert misaligned > 0.02
    for remapped in (0.3 + 0.5 * fixed, 1.0 - fixed):
        assert float(mind_loss(fixed, remapped)) < 1e-5
    # Non-linear monotone remaps change the ratios of local contrasts where three tissues meet; measured
    # loss(remap) / loss(2-voxel shift) <= 0.085 on this phantom, asserted < 0.15.
    for name, remap in MONOTONE_REMAPS.items():
        assert float(mind_loss(fixed, remap(fixed))) < 0.15 * misaligned, name
        assert float(mind_loss(fixed, remap(shifted))) > float(mind_loss(fixed, remap(fixed))), name


def test_mind_loss_is_minimal_at_alignment_for_translations():
    fixed = tissue_phantom()
    moving = tissue_phantom(shift=2)
    losses = []
    for t in (0.0, 1.0, 2.0, 3.0, 4.0):
        field = torch.zeros(1, 3, 24, 24, 24, dtype=torch.float64)
        field[:, 0] = t
        losses.append(float(mind_loss(fixed, warp(moving, field, padding_mode="border"))))
    assert losses.index(min(losses)) == 2 and losses[2] < 1e-12
    assert losses[0] > losses[1] > losses[2] < losses[3] < losses[4]


def test_mind_mask_ignores_differences_outside():
    fixed = tissue_phantom()
    moving = fixed.clone()
    moving[..., :8] = 0.0
    mask = torch.zeros_like(fixed)
    mask[..., 14:] = 1.0  # far enough (radius + dilation) from the changed slab
    assert float(mind_loss(fixed, moving, mask=mask)) < 1e-12
    assert float(mind_loss(fixed, moving)) > 0.01


@pytest.mark.slow
def test_adam_with_mind_and_diffusion_recovers_a_two_voxel_shift():
    torch.manual_seed(0)
    n = 32
    g = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij"))

    def blob(centre):
        c = torch.tensor(centre).view(3, 1, 1, 1)
        return (0.9 * torch.exp(-(((g - c) ** 2) / torch.tensor([16.0, 12.0, 9.0]).view(3, 1, 1, 1)).sum(0) / 2))[
            None, None
        ]

    fixed, moving = blob([15.0, 16.0, 16.0]), blob([17.0, 16.0, 16.0])  # moving(x + 2 e_0) == fixed(x)
    # A coarse 4^3 displacement upsampled to the grid: MIND only sees the blob's slopes, so a per-voxel field would
    # leave its flat top behind within a few dozen steps.
    control = torch.zeros(1, 3, 4, 4, 4, requires_grad=True)
    optimiser = torch.optim.Adam([control], lr=0.05)
    for _ in range(30):
        field = resize_displacement(control, (n, n, n))
        loss = mind_loss(fixed, warp(moving, field)) + 0.01 * diffusion_loss(field)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    field = resize_displacement(control.detach(), (n, n, n))
    inside = (fixed > 0.3)[:, 0]
    assert float(field[:, 0][inside].mean()) == pytest.approx(2.0, abs=0.5)
    assert float(field[:, 1:].abs().mean(dim=1)[inside].mean()) < 0.3


# ------------------------------------------------------------------------------------------------------ NMI
def test_nmi_is_invariant_to_monotone_remaps_and_minimal_at_alignment():
    fixed = tissue_phantom()
    shifted = tissue_phantom(shift=2)
    aligned = float(nmi_loss(fixed, fixed))
    misaligned = float(nmi_loss(fixed, shifted))
    assert -2.0 <= aligned < misaligned - 0.05 <= -1.0
    # 1 - x mirrors the symmetric bin layout, so the histogram is only permuted: exact invariance.
    assert float(nmi_loss(fixed, 1.0 - fixed)) == pytest.approx(aligned, abs=1e-10)
    # Non-linear remaps move the tissue peaks between bins; measured |change| <= 0.0055 vs a 0.10 shift penalty.
    for name, remap in MONOTONE_REMAPS.items():
        assert float(nmi_loss(fixed, remap(fixed))) == pytest.approx(aligned, abs=0.01), name
        assert float(nmi_loss(fixed, remap(shifted))) > aligned + 0.05, name


def test_joint_histogram_is_a_distribution_and_mask_weights_voxels():
    a, b = smooth_phantom(10), smooth_phantom(10, shift=1.5)
    joint = joint_histogram(a, b, bins=16)
    assert joint.shape == (1, 16, 16)
    assert float(joint.sum()) == pytest.approx(1.0, abs=1e-12) and float(joint.min()) >= 0
    mask = torch.zeros_like(a)
    mask[..., :5] = 1.0
    masked = joint_histogram(a, b, bins=16, mask=mask)
    direct = joint_histogram(a[..., :5].contiguous(), b[..., :5].contiguous(), bins=16)
    assert torch.allclose(masked, direct, atol=1e-12)


def test_mutual_information_matches_monai():
    monai_losses = pytest.importorskip("monai.losses")
    fixed = smooth_phantom()
    others = {
        "same": fixed,
        "shifted": smooth_phantom(shift=2.0),
        "squared": fixed**2,
        "noise": torch.rand(fixed.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
    }
    for bins in (23, 32):
        reference = monai_losses.GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=bins, sigma_ratio=0.5)
        for name, other in others.items():
            expected = -float(reference(fixed, other))
            ours = float(mutual_information(fixed, other, bins=bins, sigma_ratio=0.5))
            # measured relative difference <= 7.4e-4 (MONAI's smoothing constants); asserted < 1 %
            assert ours == pytest.approx(expected, rel=1e-2, abs=1e-5), (bins, name)


# ------------------------------------------------------------------------------------------------------ NGF
def test_ngf_is_minimal_at_alignment_and_ignores_gradient_sign():
    fixed = smooth_phantom()
    aligned = float(ngf_loss(fixed, fixed))
    assert 0.0 <= aligned < 1.0
    assert float(ngf_loss(fixed, 1.0 - fixed)) == pytest.approx(aligned, abs=1e-12)
    # translations of a shifted copy: minimal (and equal to the self-loss) exactly at alignment
    tissues, moving = tissue_phantom(), tissue_phantom(shift=2)
    losses = []
    for t in (0.0, 1.0, 2.0, 3.0, 4.0):
        field = torch.zeros(1, 3, 24, 24, 24, dtype=torch.float64)
        field[:, 0] = t
        losses.append(float(ngf_loss(tissues, warp(moving, field, padding_mode="border"))))
    assert losses[2] == pytest.approx(float(ngf_loss(tissues, tissues)), abs=1e-12)
    assert losses[0] > losses[1] > losses[2] + 0.02 and losses[2] + 0.02 < losses[3] < losses[4]
    # with eps far below every gradient the aligned loss vanishes where gradients exist
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64).view(1, 1, 1, 1, 10).expand(1, 1, 10, 10, 10)
    assert float(ngf_loss(ramp, ramp**2 + 0.1 * ramp, eps=1e-6)) < 1e-8
    # spacing enters through the gradient: a coarser grid weakens gradients relative to eps
    assert float(ngf_loss(fixed, fixed, spacing=(5.0, 5.0, 5.0))) > aligned


# -------------------------------------------------------------------------------------------------- gradients
def test_gradcheck_similarity_losses():
    gen = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 6, 6, 6, generator=gen, dtype=torch.float64)
    warped = torch.rand(1, 1, 6, 6, 6, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: mind_loss(fixed, w, radius=1, dilation=1), (warped,))
    assert torch.autograd.gradcheck(lambda w: ngf_loss(fixed, w, eps=0.1, spacing=(1.0, 2.0, 0.5)), (warped,))
    small = (0.1 + 0.8 * torch.rand(1, 1, 5, 5, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: nmi_loss(fixed[..., :5, :5, :5], w, bins=8), (small,))


@pytest.mark.parametrize("bins, ratio", [(32, 0.5), (16, 0.5), (64, 0.25), (8, 1.0), (5, 3.0)])
def test_parzen_weights_from_the_window_around_each_value_equal_the_whole_formula(bins, ratio):
    """Only the bins near a value are computed; every bin must still get the weight the formula over all bins gives
    (to the floor: 1e-13 of the bin sum per bin left out), at the range's ends too, where the window cannot be
    centred on the value."""
    gen = torch.Generator().manual_seed(bins)
    values = torch.cat([torch.rand(2000, generator=gen, dtype=torch.float64), torch.tensor([0.0, 1.0, 1e-9, 1 - 1e-9])])
    centres = torch.linspace(0.0, 1.0, bins, dtype=torch.float64)
    exponent = (-0.5 * ((values[:, None] - centres) / (ratio / (bins - 1))) ** 2).clamp_min(-30.0)
    expected = torch.exp(exponent) / torch.exp(exponent).sum(-1, keepdim=True)
    weights = parzen_weights(values.view(1, 1, -1, 1, 1), bins, ratio)[0]
    assert torch.allclose(weights, expected, rtol=0, atol=bins * 1e-12)
    assert torch.allclose(weights.sum(-1), torch.ones(len(values), dtype=torch.float64), rtol=0, atol=1e-12)


def test_parzen_weights_closed_form_gradient_equals_autograds_chain():
    """The closed-form backward pass of the Parzen weights gives autograd's gradient through the plain formula,
    also for intensities clamped at 0 and 1 and for bins whose exponent is floored, under any upstream gradient."""
    gen = torch.Generator().manual_seed(1)
    values = torch.cat([torch.rand(500, generator=gen, dtype=torch.float64) * 1.4 - 0.2, torch.tensor([0.0, 1.0])])
    upstream = torch.randn(1, len(values), 16, generator=gen, dtype=torch.float64)
    grads = []
    for closed_form in (True, False):
        image = values.view(1, 1, -1, 1, 1).clone().requires_grad_(True)
        if closed_form:
            weights = parzen_weights(image, 16, 0.5)
        else:  # the formula, differentiated by autograd
            centres = torch.linspace(0.0, 1.0, 16, dtype=torch.float64)
            sigma = 0.5 / 15
            exponent = (-0.5 * ((image.clamp(0.0, 1.0).flatten(1)[..., None] - centres) / sigma) ** 2).clamp_min(-30.0)
            weights = torch.exp(exponent) / torch.exp(exponent).sum(-1, keepdim=True)
        (weights * upstream).sum().backward()
        grads.append(image.grad.flatten())
    assert torch.allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    assert float(grads[0].abs().max()) > 1.0  # the comparison is not between two zeros


# ------------------------------------------------------------------------------------------------------ API
def test_modules_and_registry_match_the_functions():
    a, b = smooth_phantom(10), smooth_phantom(10, shift=1.0)
    assert set(SIMILARITY_LOSSES) == {"mind", "nmi", "ngf"}
    assert float(MINDSSCLoss(radius=1, dilation=2)(a, b)) == float(mind_loss(a, b, radius=1, dilation=2))
    assert float(NMILoss(bins=16)(a, b)) == float(nmi_loss(a, b, bins=16))
    assert float(NGFLoss(eps=0.05, spacing=(2, 1, 1))(a, b)) == float(ngf_loss(a, b, 0.05, (2.0, 1.0, 1.0)))
    mask = torch.ones_like(a)
    for name, fn in SIMILARITY_LOSSES.items():
        assert float(fn(a, b, mask=mask)) == pytest.approx(float(fn(a, b)), abs=1e-12), name


@pytest.mark.parametrize("name", ["mind", "nmi", "ngf"])
def test_bad_inputs_raise(name):
    fn = SIMILARITY_LOSSES[name]
    img = torch.rand(1, 1, 6, 6, 6)
    with pytest.raises(InputError):
        fn(img[0], img[0])  # wrong rank
    with pytest.raises(InputError):
        fn(img, torch.rand(1, 1, 6, 6, 7))  # grids differ
    with pytest.raises(InputError):
        fn(torch.rand(1, 2, 6, 6, 6), torch.rand(1, 2, 6, 6, 6))  # not single-channel
    nan = img.clone()
    nan[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError):
        fn(img, nan)
    with pytest.raises(InputError):
        fn(img, img, mask=-torch.ones_like(img))
    with pytest.raises(TypeError):
        fn(img.numpy(), img)
    with pytest.raises(TypeError):
        fn((img * 10).long(), (img * 10).long())


def test_bad_parameters_raise():
    img = torch.rand(1, 1, 6, 6, 6)
    with pytest.raises(InputError):
        nmi_loss(img, img, bins=1)
    with pytest.raises(TypeError):
        mind_ssc(img, radius=1.5)
    with pytest.raises(InputError):
        mind_ssc(img, dilation=0)
    with pytest.raises(InputError):
        ngf_loss(img, img, eps=0.0)
    with pytest.raises(InputError):
        ngf_loss(img, img, spacing=(1.0, -1.0, 1.0))
    with pytest.raises(InputError):
        mind_loss(img, img, mask=torch.zeros_like(img))


# ------------------------------------------------------------------------- fast MIND == its first definition
def reference_mind_ssc(image: torch.Tensor, radius: int = 2, d: int = 2, eps: float = 1e-6) -> torch.Tensor:
    """MIND-SSC as first written: 3-D average pool over a replicate-padded volume, exp(-D / V)."""
    from SpineRigidRegLib.losses.similarity import _SIX_NEIGHBOURS, _SSC_PAIRS

    size = image.shape[2:]
    padded = torch.nn.functional.pad(image, (d,) * 6, mode="replicate")

    def shifted(offset):
        k, j, i = (d + o * d for o in offset)
        return padded[:, :, k : k + size[0], j : j + size[1], i : i + size[2]]

    ssd = torch.cat([(shifted(_SIX_NEIGHBOURS[a]) - shifted(_SIX_NEIGHBOURS[b])) ** 2 for a, b in _SSC_PAIRS], 1)
    if radius > 0:
        ssd = torch.nn.functional.avg_pool3d(
            torch.nn.functional.pad(ssd, (radius,) * 6, mode="replicate"), 2 * radius + 1, stride=1
        )
    ssd = ssd - ssd.min(dim=1, keepdim=True).values
    variance = ssd.mean(dim=1, keepdim=True)
    level = variance.mean(dim=(2, 3, 4), keepdim=True)
    variance = torch.minimum(torch.maximum(variance, 1e-3 * level), 1e3 * level) + eps
    return torch.exp(-ssd / variance)


@pytest.mark.parametrize("matrix_axis_limit", [192, 8])
def test_separable_box_mean_equals_the_3d_average_pool(monkeypatch, matrix_axis_limit):
    from SpineRigidRegLib.losses import similarity

    # a limit of 8 sends the two longer axes through the grouped-convolution path
    monkeypatch.setattr(similarity, "_MAX_MATRIX_AXIS", matrix_axis_limit)
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand(2, 3, 7, 9, 11, generator=gen, dtype=torch.float64)
    for radius in (1, 2, 5):  # 5: the box is wider than the 7-voxel axis
        padded = torch.nn.functional.pad(volume, (radius,) * 6, mode="replicate")
        expected = torch.nn.functional.avg_pool3d(padded, 2 * radius + 1, stride=1)
        torch.testing.assert_close(similarity._box_mean(volume, radius), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("radius", "dilation"), [(2, 2), (1, 1), (0, 3)])
def test_mind_equals_its_average_pool_definition(radius, dilation):
    fixed = smooth_phantom(16)
    moving = (smooth_phantom(16, shift=1.5) + 0.05 * torch.rand(1, 1, 16, 16, 16, dtype=torch.float64)).clamp(0, 1)
    moving.requires_grad_(True)
    torch.testing.assert_close(
        mind_ssc(moving, radius, dilation), reference_mind_ssc(moving, radius, dilation), rtol=1e-10, atol=1e-12
    )
    value = mind_loss(fixed, moving, radius, dilation)
    expected = (
        (reference_mind_ssc(fixed, radius, dilation) - reference_mind_ssc(moving, radius, dilation)) ** 2
    ).mean()
    (grad,) = torch.autograd.grad(value, moving)
    (grad_ref,) = torch.autograd.grad(expected, moving)
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-10 * float(grad_ref.abs().max()))


def test_mind_loss_reuses_a_precomputed_fixed_descriptor():
    fixed, moving = smooth_phantom(12), smooth_phantom(12, shift=1.0).requires_grad_(True)
    descriptor = mind_ssc(fixed)
    value = mind_loss(fixed, moving, fixed_descriptor=descriptor)
    expected = mind_loss(fixed, moving)
    assert float(value.detach()) == float(expected.detach())
    torch.testing.assert_close(
        torch.autograd.grad(value, moving)[0], torch.autograd.grad(expected, moving)[0], rtol=0, atol=0
    )
    with pytest.raises(InputError):
        mind_loss(fixed, moving, fixed_descriptor=descriptor[:, :6])
    with pytest.raises(InputError):
        mind_loss(fixed, moving, fixed_descriptor=descriptor[..., :-1])

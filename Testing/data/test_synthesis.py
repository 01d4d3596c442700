"""The CT/MR pair synthesiser: exact ground truth, rigid vertebrae, no folding, seeds, T1 contrast, acquisition,
label-only contrast pairs."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from SpineRigidRegLib import metrics
from SpineRigidRegLib.data.phantom import Tissue, make_phantom
from SpineRigidRegLib.data.synthesis import (
    MR_CONTRASTS,
    SynthesisSettings,
    acquire,
    mr_contrast,
    rigid_log,
    sample_vertebra_transforms,
    synthesize_label_contrast_pair,
    synthesize_pair,
    vertebra_motion,
)
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.geometry import Geometry, image_to_tensor
from SpineRigidRegLib.jacobian import jacobian_determinant
from SpineRigidRegLib.rigid import fit_rigid_to_regions, rigid_displacement
from SpineRigidRegLib.warp import warp_labels


def _rotation(degrees) -> np.ndarray:
    w = np.radians(np.asarray(degrees, dtype=np.float64))
    theta = np.linalg.norm(w)
    k = w / theta
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * kx @ kx


PHANTOMS = {
    "axial": dict(num_vertebrae=3, shape=(48, 40, 40), seed=3),
    # Oblique direction, anisotropic voxels, an origin away from 0: the LPS conversions must hold.
    "oblique": dict(
        num_vertebrae=3,
        shape=(40, 36, 36),
        spacing=(1.2, 1.0, 1.5),
        seed=4,
        direction=_rotation([10.0, -5.0, 20.0]).ravel(),
        origin=(10.0, -20.0, 30.0),
    ),
}


@pytest.fixture(scope="module", params=sorted(PHANTOMS))
def case(request):
    phantom = make_phantom(**PHANTOMS[request.param])
    pair = synthesize_pair(phantom.ct, phantom.labels, seed=11, tissues=phantom.tissues)
    return phantom, pair


def _tensors(pair):
    moving = image_to_tensor(pair.moving_labels, torch.int64)
    fixed = image_to_tensor(pair.fixed_labels, torch.int64)
    return moving, fixed, pair.true_displacement, pair.geometry.spacing_array_order


def _kabsch_residuals(fixed_labels, u, spacing) -> dict[int, torch.Tensor]:
    """Per vertebra, the distances (mm) between the field and its least-squares rigid fit over the vertebra."""
    values = [int(v) for v in torch.unique(fixed_labels) if v > 0]
    regions = torch.stack([(fixed_labels[0, 0] == v).double() for v in values])[None]
    r, t = fit_rigid_to_regions(regions, u.double(), spacing)
    scale = torch.tensor(spacing, dtype=torch.float64).view(1, 3, 1, 1, 1)
    out = {}
    for k, v in enumerate(values):
        fitted = rigid_displacement(r[:, k], t[:, k], u.shape[2:], spacing)
        out[v] = ((fitted - u.double()) * scale).norm(dim=1)[0][fixed_labels[0, 0] == v]
    return out


# ------------------------------------------------------------------------------------------ ground truth


def test_true_field_reproduces_fixed_labels(case) -> None:
    _, pair = case
    moving, fixed, u, _ = _tensors(pair)
    dice = metrics.dice_per_label(warp_labels(moving, u), fixed)
    assert sorted(dice) == sorted(int(v) for v in torch.unique(moving) if v > 0)
    assert min(dice.values()) >= 0.98, dice


def test_true_field_as_itk_transform_moves_the_labels(case) -> None:
    """The LPS displacement image, used by SimpleITK as a transform, reproduces the fixed labels (another
    interpolator, so a lower bound: the two nearest-neighbour rules differ on 3-7 % of these small vertebrae); a wrong
    axis order or sign gives a DSC near 0.2."""
    _, pair = case
    transform = sitk.DisplacementFieldTransform(sitk.Cast(pair.displacement_image(), sitk.sitkVectorFloat64))
    warped = sitk.Resample(pair.moving_labels, pair.fixed_labels, transform, sitk.sitkNearestNeighbor, 0)
    dice = metrics.dice_per_label(image_to_tensor(warped, torch.int64), image_to_tensor(pair.fixed_labels, torch.int64))
    assert min(dice.values()) >= 0.9, dice


def test_vertebra_transforms_are_the_field_inside_each_vertebra(case) -> None:
    """``vertebra_transforms`` (LPS, fixed point -> moving point) equal the dense field on the fixed vertebra."""
    _, pair = case
    _, fixed, u, spacing = _tensors(pair)
    geometry = pair.geometry
    index = np.argwhere(fixed[0, 0].numpy() > 0)
    points = geometry.array_index_to_lps_points(index.astype(np.float64))
    displacement = sitk.GetArrayFromImage(pair.displacement_image())[tuple(index.T)]  # LPS mm
    values = fixed[0, 0].numpy()[tuple(index.T)]
    assert sorted(pair.vertebra_transforms) == sorted(set(values.tolist()))
    for value, matrix in pair.vertebra_transforms.items():
        assert np.allclose(matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3), atol=1e-9)
        assert np.linalg.det(matrix[:3, :3]) == pytest.approx(1.0)
        sel = values == value
        moved = points[sel] @ matrix[:3, :3].T + matrix[:3, 3]
        error = np.linalg.norm(moved - (points[sel] + displacement[sel]), axis=1)
        assert error.max() < 0.1, f"vertebra {value}: the field departs from its rigid map by {error.max():.3f} mm"


def test_true_field_is_rigid_per_vertebra(case) -> None:
    _, pair = case
    moving, fixed, u, spacing = _tensors(pair)
    rigid_dice = metrics.rigid_dice_per_label(moving, u, spacing)
    assert min(rigid_dice.values()) >= 0.99, rigid_dice
    for value, residual in _kabsch_residuals(fixed, u, spacing).items():
        assert residual.max() < 0.1, f"vertebra {value}: Kabsch residual up to {float(residual.max()):.3f} mm"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_true_field_has_positive_jacobian_everywhere(seed) -> None:
    phantom = make_phantom(num_vertebrae=4, shape=(48, 36, 36), seed=seed, curvature_deg=25.0)
    labels = image_to_tensor(phantom.labels, torch.int64)
    # Larger motions than the defaults, to stress the poly-rigid blending.
    settings = SynthesisSettings(
        max_flexion_deg=8.0, max_lateral_bending_deg=6.0, max_axial_rotation_deg=4.0, soft_tissue_amplitude_mm=3.0
    )
    u = vertebra_motion(labels, None, settings, torch.Generator().manual_seed(seed))
    det = jacobian_determinant(u)
    assert float(det.min()) > 0.0
    assert metrics.folding_voxels(u) == 0


def test_motion_is_chained_and_bounded() -> None:
    """Neighbouring vertebrae differ by a joint rotation within the configured limits; the vertebrae do move."""
    phantom = make_phantom(num_vertebrae=4, shape=(48, 36, 36), seed=5)
    labels = image_to_tensor(phantom.labels, torch.int64)
    settings = SynthesisSettings()
    _, maps = vertebra_motion(labels, None, settings, torch.Generator().manual_seed(5), return_transforms=True)
    limit = math.radians(
        math.hypot(settings.max_flexion_deg, settings.max_lateral_bending_deg, settings.max_axial_rotation_deg)
    )
    values = sorted(maps)
    angles = []
    for a, b in zip(values[:-1], values[1:]):
        relative = torch.linalg.inv(maps[a]) @ maps[b]
        angles.append(float(rigid_log(relative)[:3, :3].abs().max()))
        cos = float((torch.diagonal(relative[:3, :3]).sum() - 1) / 2)
        assert math.acos(max(min(cos, 1.0), -1.0)) <= limit + 1e-6
    assert max(angles) > math.radians(0.3), "neighbouring vertebrae should move differently"


def test_vertebra_translations_alone_do_not_roll_the_column() -> None:
    """Removing the column's common motion must not invent a rotation: with joint angles and global rotation at
    zero and 3 mm of independent vertebra jitter, no vertebra rolls about the spine (array axis 0) by a degree, and
    none turns by more than the few degrees the best rigid fit of jittered vertebrae may tilt the column. A fit to
    the centroids of a nearly straight 3-vertebra column drew rolls of 12-110 degrees from the jitter alone."""
    phantom = make_phantom(num_vertebrae=3, shape=(56, 40, 40), spacing=2.0, curvature_deg=0.0, seed=7)
    labels = image_to_tensor(phantom.labels, torch.int64)
    settings = replace(SynthesisSettings().without_motion(), max_vertebra_translation_mm=3.0)
    for seed in range(10):
        maps = sample_vertebra_transforms(labels, (2.0, 2.0, 2.0), settings, torch.Generator().manual_seed(seed))
        for m in maps.values():
            w = rigid_log(m)[:3, :3]  # skew matrix of axis * angle (radians)
            assert math.degrees(abs(float(w[2, 1]))) < 1.0, m
            assert math.degrees(float(w.abs().max())) < 5.0, m


def test_without_motion_gives_identity() -> None:
    phantom = make_phantom(num_vertebrae=3, shape=(32, 32, 32), seed=1)
    labels = image_to_tensor(phantom.labels, torch.int64)
    u = vertebra_motion(labels, None, SynthesisSettings().without_motion(), torch.Generator().manual_seed(0))
    assert float(u.abs().max()) < 1e-4


# ----------------------------------------------------------------------------------------------- seeds


def test_seed_reproduces_pairs_bit_exactly() -> None:
    phantom = make_phantom(num_vertebrae=3, shape=(32, 32, 32), seed=2)
    a = synthesize_pair(phantom.ct, phantom.labels, seed=5, tissues=phantom.tissues)
    b = synthesize_pair(phantom.ct, phantom.labels, seed=5, tissues=phantom.tissues)
    c = synthesize_pair(phantom.ct, phantom.labels, seed=6, tissues=phantom.tissues)
    assert a.seed == 5
    assert np.array_equal(sitk.GetArrayFromImage(a.fixed), sitk.GetArrayFromImage(b.fixed))
    assert np.array_equal(sitk.GetArrayFromImage(a.fixed_labels), sitk.GetArrayFromImage(b.fixed_labels))
    assert torch.equal(a.true_displacement, b.true_displacement)
    assert not np.allclose(sitk.GetArrayFromImage(a.fixed), sitk.GetArrayFromImage(c.fixed), atol=1e-3)
    assert float((a.true_displacement - c.true_displacement).abs().max()) > 0.1
    # The settings' seed is used when none is given.
    d = synthesize_pair(phantom.ct, phantom.labels, settings=SynthesisSettings(seed=5), tissues=phantom.tissues)
    assert torch.equal(a.true_displacement, d.true_displacement)


# ------------------------------------------------------------------------------------------- appearance


def _class_means(image: np.ndarray, tissues: np.ndarray) -> dict[Tissue, float]:
    """Mean intensity of each class's interior (eroded once, away from partial-volume edges)."""
    out = {}
    for tissue in Tissue:
        interior = ndimage.binary_erosion(tissues == tissue)
        if interior.sum() >= 10:
            out[tissue] = float(image[interior].mean())
    return out


@pytest.mark.parametrize("use_tissue_map", [True, False])
def test_mr_contrast_is_t1_like(use_tissue_map) -> None:
    """T1 reverses CT's order where it matters: fat brightest (darker than muscle on CT), cortical bone darker than
    marrow (brighter on CT)."""
    phantom = make_phantom(num_vertebrae=3, shape=(40, 48, 48), seed=1, noise_hu=5.0)
    ct = image_to_tensor(phantom.ct)
    labels = image_to_tensor(phantom.labels, torch.int64)
    tissues = image_to_tensor(phantom.tissues, torch.int64) if use_tissue_map else None
    tissue_array = sitk.GetArrayFromImage(phantom.tissues)
    ct_means = _class_means(ct[0, 0].numpy(), tissue_array)
    assert ct_means[Tissue.FAT] < ct_means[Tissue.MUSCLE] and ct_means[Tissue.CORTICAL] > ct_means[Tissue.MARROW]
    settings = SynthesisSettings(bias_strength=0.0)
    for seed in range(3):
        mr = mr_contrast(ct, labels, tissues, settings, torch.Generator().manual_seed(seed))
        assert mr.dtype == torch.float32 and float(mr.min()) >= 0.0 and float(mr.max()) <= 1.0
        means = _class_means(mr[0, 0].numpy(), tissue_array)
        assert means[Tissue.FAT] > means[Tissue.MUSCLE] + 0.1, means
        assert means[Tissue.FAT] > means[Tissue.MARROW], means
        assert means[Tissue.MARROW] > means[Tissue.MUSCLE], means
        assert means[Tissue.BACKGROUND] < means[Tissue.MUSCLE], means
        if use_tissue_map:  # thin cortical shells are only resolved with the phantom's own tissue map
            assert means[Tissue.CSF] < means[Tissue.MUSCLE], means
        # Across the classes CT and MR intensities are not monotonically related.
        order_ct = np.argsort([ct_means[t] for t in (Tissue.FAT, Tissue.MUSCLE, Tissue.MARROW)])
        order_mr = np.argsort([means[t] for t in (Tissue.FAT, Tissue.MUSCLE, Tissue.MARROW)])
        assert not np.array_equal(order_ct, order_mr)
        # Voxel-wise: the CT-MR correlation is positive between air and muscle, negative between fat and muscle
        # and inside bone (dense cortex dark, marrow bright).
        for classes, sign in (
            ((Tissue.BACKGROUND, Tissue.MUSCLE), 1),
            ((Tissue.FAT, Tissue.MUSCLE), -1),
            ((Tissue.CORTICAL, Tissue.MARROW), -1),
        ):
            region = np.isin(tissue_array, classes)
            r = np.corrcoef(ct[0, 0].numpy()[region], mr[0, 0].numpy()[region])[0, 1]
            assert r * sign > 0.3, f"CT-MR correlation over {[c.name for c in classes]}: {r:.2f}"


def test_cortical_bone_is_dark_with_tissue_map() -> None:
    phantom = make_phantom(num_vertebrae=3, shape=(40, 48, 48), seed=1, noise_hu=5.0)
    tissues = image_to_tensor(phantom.tissues, torch.int64)
    mr = mr_contrast(
        image_to_tensor(phantom.ct),
        None,
        tissues,
        SynthesisSettings(bias_strength=0.0, blur_mm=(0.0, 0.0), slice_thickness_mm=0.0),
        torch.Generator().manual_seed(0),
    )
    t = tissues[0, 0].numpy()
    cortical = float(mr[0, 0].numpy()[t == Tissue.CORTICAL].mean())
    marrow = float(mr[0, 0].numpy()[t == Tissue.MARROW].mean())
    assert cortical < marrow - 0.2


def _lag_one_correlation(volume: np.ndarray, axis: int) -> float:
    a = np.moveaxis(volume, axis, 0)
    x, y = a[:-1].ravel(), a[1:].ravel()
    return float(np.corrcoef(x, y)[0, 1])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_thick_slices_blur_along_the_slice_axis_only(axis) -> None:
    generator = torch.Generator().manual_seed(axis)
    noise = torch.rand(1, 1, 32, 32, 32, generator=generator)
    settings = SynthesisSettings(
        slice_thickness_mm=4.0, slice_axis=axis, blur_mm=(0.0, 0.0), bias_strength=0.0, noise_std=(0.0, 0.0)
    )
    out = acquire(noise, (1.0, 1.0, 1.0), settings, torch.Generator().manual_seed(0))[0, 0].numpy()
    assert out.min() >= 0.0 and out.max() <= 1.0
    for a in range(3):
        correlation = _lag_one_correlation(out, a)
        if a == axis:
            assert correlation > 0.6, f"slice axis {a}: lag-1 correlation {correlation:.2f}"
        else:
            assert abs(correlation) < 0.1, f"in-plane axis {a}: lag-1 correlation {correlation:.2f}"
    thin = acquire(
        noise,
        (1.0, 1.0, 1.0),
        SynthesisSettings(
            slice_thickness_mm=0.0, slice_axis=axis, blur_mm=(0.0, 0.0), bias_strength=0.0, noise_std=(0.0, 0.0)
        ),
        torch.Generator(),
    )
    assert abs(_lag_one_correlation(thin[0, 0].numpy(), axis)) < 0.1


def test_slice_thickness_is_in_mm() -> None:
    """4 mm slices on 2 mm voxels average pairs of voxels: a weaker correlation than 4 mm on 1 mm voxels."""
    noise = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    settings = SynthesisSettings(
        slice_thickness_mm=4.0, slice_axis=0, blur_mm=(0.0, 0.0), bias_strength=0.0, noise_std=(0.0, 0.0)
    )
    fine = acquire(noise, (1.0, 1.0, 1.0), settings, torch.Generator())[0, 0].numpy()
    coarse = acquire(noise, (2.0, 1.0, 1.0), settings, torch.Generator())[0, 0].numpy()
    assert _lag_one_correlation(coarse, 0) < _lag_one_correlation(fine, 0) - 0.1


# ------------------------------------------------------------------------------------------ label-only pairs


@pytest.fixture(scope="module")
def label_pairs():
    phantom = make_phantom(num_vertebrae=3, shape=(32, 32, 32), seed=7)
    labels = image_to_tensor(phantom.labels, torch.int64).repeat(2, 1, 1, 1, 1)
    settings = SynthesisSettings(bias_strength=0.0, noise_std=(0.0, 0.0), blur_mm=(0.0, 0.0), slice_thickness_mm=0.0)
    a = synthesize_label_contrast_pair(labels, torch.Generator().manual_seed(1), settings)
    b = synthesize_label_contrast_pair(labels, torch.Generator().manual_seed(2), settings)
    return labels, a, b


def _label_means(image: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    return {int(v): float(image[labels == v].mean()) for v in torch.unique(labels) if v > 0}


def test_label_contrast_pairs_are_label_consistent(label_pairs) -> None:
    labels, (fixed, moving, moving_labels, fixed_labels, u), _ = label_pairs
    assert fixed.shape == moving.shape == labels.shape and u.shape == (2, 3, *labels.shape[2:])
    for image in (fixed, moving):
        assert image.dtype == torch.float32 and float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert torch.equal(moving_labels, labels)
    for b in range(2):
        assert torch.equal(warp_labels(moving_labels[b : b + 1], u[b : b + 1]), fixed_labels[b : b + 1])
        assert float(jacobian_determinant(u[b : b + 1]).min()) > 0
        assert min(metrics.rigid_dice_per_label(moving_labels[b : b + 1], u[b : b + 1]).values()) >= 0.99
        # Each vertebra is one intensity class: its spread is small against the differences between classes.
        for image, lab in ((fixed[b, 0], fixed_labels[b, 0]), (moving[b, 0], moving_labels[b, 0])):
            for value in (int(v) for v in torch.unique(lab) if v > 0):
                interior = torch.from_numpy(ndimage.binary_erosion((lab == value).numpy()))
                assert float(image[interior].std()) < 0.1
    # The two samples of the batch draw their own motion.
    assert float((u[0] - u[1]).abs().max()) > 0.1


def test_label_contrast_is_random(label_pairs) -> None:
    labels, (fixed, moving, _, fixed_labels, _), (fixed_b, _, _, fixed_labels_b, _) = label_pairs
    m = _label_means(moving[0, 0], labels[0, 0])
    f = _label_means(fixed[0, 0], fixed_labels[0, 0])
    g = _label_means(fixed_b[0, 0], fixed_labels_b[0, 0])
    # Fixed and moving images of one pair get different contrasts, and so do pairs from different seeds.
    assert max(abs(m[v] - f[v]) for v in m) > 0.1
    assert max(abs(f[v] - g[v]) for v in f) > 0.1


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input() -> None:
    phantom = make_phantom(num_vertebrae=2, shape=(24, 24, 24), seed=0)
    empty = sitk.Image(phantom.labels)
    empty *= 0
    with pytest.raises(InputError, match="no vertebra"):
        synthesize_pair(phantom.ct, empty)
    with pytest.raises(TypeError):
        synthesize_pair(sitk.GetArrayFromImage(phantom.ct), phantom.labels)
    with pytest.raises(InputError, match="max_flexion_deg"):
        SynthesisSettings(max_flexion_deg=-1.0)
    with pytest.raises(InputError, match="slice_axis"):
        SynthesisSettings(slice_axis=3)
    with pytest.raises(TypeError):
        vertebra_motion(image_to_tensor(phantom.labels, torch.int64), generator=np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------- devices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_pair_on_cuda() -> None:
    """The CPU generator drives the randomness, so a CUDA run gives the CPU pair up to floating-point rounding."""
    phantom = make_phantom(num_vertebrae=3, shape=(32, 32, 32), seed=2)
    cpu = synthesize_pair(phantom.ct, phantom.labels, seed=5, tissues=phantom.tissues)
    gpu = synthesize_pair(phantom.ct, phantom.labels, seed=5, tissues=phantom.tissues, device="cuda")
    assert float((cpu.true_displacement - gpu.true_displacement).abs().max()) < 1e-2
    a, b = sitk.GetArrayFromImage(cpu.fixed), sitk.GetArrayFromImage(gpu.fixed)
    assert float(np.abs(a - b).mean()) < 1e-2
    dice = metrics.dice_per_label(
        image_to_tensor(cpu.fixed_labels, torch.int64), image_to_tensor(gpu.fixed_labels, torch.int64)
    )
    assert min(dice.values()) >= 0.99


# ---------------------------------------------------------------------------------------------- real CT


@pytest.mark.parametrize("spacing", [2.0, pytest.param(1.0, marks=pytest.mark.slow)])
def test_real_ct_pair(shared_data, spacing) -> None:
    """On the real TotalSegmentator CT (touching vertebrae; 2 mm to stay fast, 1 mm as the benchmark uses) the truth
    stays exact and rigid up to the thin seams where vertebrae touch."""
    from SpineRigidRegLib.data.subjects import load_real_case

    case = load_real_case(shared_data, spacing=spacing, margin_mm=10.0)
    pair = synthesize_pair(case.ct, case.labels, seed=3)
    moving, fixed, u, spacing = _tensors(pair)
    assert Geometry.of(pair.fixed).same_grid(Geometry.of(case.ct))
    dice = metrics.dice_per_label(warp_labels(moving, u), fixed)
    assert min(dice.values()) >= 0.98, dice
    assert min(metrics.rigid_dice_per_label(moving, u, spacing).values()) >= 0.99
    for value, residual in _kabsch_residuals(fixed, u, spacing).items():
        rms = float(residual.pow(2).mean().sqrt())
        assert rms < 0.1, f"vertebra {value}: RMS Kabsch residual {rms:.3f} mm"
    assert float(jacobian_determinant(u, spacing).min()) > 0
    mr = sitk.GetArrayFromImage(pair.fixed)
    assert mr.min() >= 0.0 and mr.max() <= 1.0
    # T1 from HU bands: subcutaneous/visceral fat brighter than muscle.
    hu = sitk.GetArrayFromImage(case.ct)
    # The MR is of the moved anatomy; compare the classes well inside (eroded) to stay away from the motion.
    fat = ndimage.binary_erosion((hu > -200) & (hu < -50), iterations=2)
    muscle = ndimage.binary_erosion((hu > 20) & (hu < 80), iterations=2)
    assert mr[fat].mean() > mr[muscle].mean() + 0.1


def test_real_ct_tissue_map_has_discs_cord_and_csf_and_t2_makes_them_bright(shared_data) -> None:
    from SpineRigidRegLib.data.subjects import load_real_case

    case = load_real_case(shared_data, spacing=2.0, margin_mm=10.0)
    tissues = sitk.GetArrayFromImage(case.tissues)
    labels = sitk.GetArrayFromImage(case.labels)
    assert Geometry.of(case.tissues).same_grid(Geometry.of(case.ct))
    for tissue in (Tissue.DISC, Tissue.CORD, Tissue.CSF):
        assert (tissues == int(tissue)).sum() > 50, tissue.name
    # Every disc voxel lies between two vertebrae along the spine (the k axis): bone above and below it.
    k, j, i = np.nonzero(tissues == int(Tissue.DISC))
    column = labels[:, j, i] > 0
    above = np.array([column[:kk, n].any() for n, kk in enumerate(k)])
    below = np.array([column[kk + 1 :, n].any() for n, kk in enumerate(k)])
    assert (above & below).all()
    assert not (labels[tissues == int(Tissue.CSF)] > 0).any()
    # T1: CSF darker than the cord; T2: brighter, and the discs brighter than the marrow.
    images = {}
    for name, ranges in MR_CONTRASTS.items():
        settings = SynthesisSettings(intensity_ranges=ranges).without_motion()
        images[name] = sitk.GetArrayFromImage(synthesize_pair(case.ct, case.labels, settings, 1, case.tissues).fixed)
    mean = {name: {t: float(image[tissues == int(t)].mean()) for t in Tissue} for name, image in images.items()}
    assert mean["t1"][Tissue.CSF] < mean["t1"][Tissue.CORD]
    assert mean["t2"][Tissue.CSF] > mean["t2"][Tissue.CORD] + 0.1
    assert mean["t2"][Tissue.DISC] > mean["t2"][Tissue.MARROW] + 0.05

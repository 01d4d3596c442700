"""The MR's bias field divided out (bias_field.py): shading removed, tissue contrast and geometry kept."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from SpineRigidRegLib.bias_field import MAX_FIT_VOXELS, correct_bias_field, fit_factors


def shaded_mr(shading: float) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """A sagittal-like MR (1.6 mm pixels over 160 mm, 4 mm slices, oblique): soft tissue (600) with vertebra-sized
    bone blocks (250, 26 x 32 mm) along the spine, air around, times ``exp(shading * ramp)`` rising from posterior to
    anterior, with Rician noise. Returns the image and the soft tissue at the two ends of the ramp (array order)."""
    shape = (12, 100, 100)  # slices, rows, columns
    array = np.zeros(shape, dtype=np.float32)
    array[:, 5:95, 5:95] = 600.0
    for top in range(8, 80, 22):
        array[2:10, top : top + 16, 40:60] = 250.0
    ramp = np.linspace(-1.0, 1.0, shape[2], dtype=np.float32)[None, None, :]
    rng, sigma = np.random.default_rng(0), 18.0  # Rician noise, as every MR has (N4 fits noise-free edges badly)
    shaded = array * np.exp(shading * ramp)
    noisy = np.hypot(shaded + sigma * rng.standard_normal(shape), sigma * rng.standard_normal(shape))
    image = sitk.GetImageFromArray(noisy.astype(np.float32))
    image.SetSpacing((1.6, 1.6, 4.0))
    image.SetOrigin((-30.0, 12.0, 140.0))
    angle = np.deg2rad(5.0)
    image.SetDirection((0.0, np.sin(angle), np.cos(angle), 1.0, 0.0, 0.0, 0.0, np.cos(angle), -np.sin(angle)))
    near, far = np.zeros(shape, bool), np.zeros(shape, bool)
    near[:, 5:95, 8:20], far[:, 5:95, 80:92] = True, True
    return image, near, far


def test_the_shading_is_divided_out_and_the_tissue_contrast_kept():
    image, near, far = shaded_mr(0.3)
    before = sitk.GetArrayFromImage(image)
    corrected = correct_bias_field(image)
    after = sitk.GetArrayFromImage(corrected)
    assert np.array_equal(sitk.GetArrayFromImage(image), before)  # the input is not changed
    assert before[far].mean() / before[near].mean() > 1.5
    assert abs(after[far].mean() / after[near].mean() - 1.0) < 0.1
    bone = after[6, 52:66, 42:58].mean()  # a block in the middle, beside soft tissue at the same shading
    soft = after[6, 52:66, 64:70].mean()
    assert 0.3 < bone / soft < 0.55  # 250 / 600 = 0.42: bone stays darker than soft tissue
    assert corrected.GetPixelID() == sitk.sitkFloat32
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(corrected, get)() == getattr(image, get)()


def test_an_unshaded_mr_is_left_nearly_as_it_is_and_an_empty_or_signed_one_exactly():
    image, _, _ = shaded_mr(0.0)
    array = sitk.GetArrayFromImage(image)
    after = sitk.GetArrayFromImage(correct_bias_field(image))
    tissue = array > 100
    ratio = after[tissue] / array[tissue]
    assert np.percentile(ratio, 95) / np.percentile(ratio, 5) < 1.1
    empty = sitk.Image([6, 5, 4], sitk.sitkFloat32)
    assert not sitk.GetArrayFromImage(correct_bias_field(empty)).any()
    signed = sitk.Image(image) - 300.0  # mostly negative, not a magnitude image: N4's model does not apply
    assert np.array_equal(sitk.GetArrayFromImage(correct_bias_field(signed)), array - 300.0)
    dipping = sitk.GetArrayFromImage(image)
    dipping[0, :10, :] = -20.0  # a magnitude MR's background just below 0 (1 % of it) is still corrected
    shaded = sitk.GetImageFromArray(dipping)
    shaded.CopyInformation(image)
    assert not np.array_equal(sitk.GetArrayFromImage(correct_bias_field(shaded)), dipping)


def test_the_fit_grid_is_about_5_mm_and_small_whatever_the_mr():
    """Factors per axis (x, y, z): a clinical series' fine pixels are shrunk, its thick slices kept; a 3 mm isotropic
    MR, whose 5 mm grid rounds down to its own, is shrunk until the fit is small; a tiny MR keeps 8 voxels a side."""
    assert fit_factors((233, 130, 15), (0.64, 0.64, 4.3)) == [7, 7, 1]
    assert fit_factors((117, 91, 20), (3.0, 3.0, 3.0)) == [2, 2, 2]
    assert fit_factors((20, 12, 9), (0.5, 0.5, 0.5)) == [2, 1, 1]
    for size, spacing in [((512, 512, 400), (0.78, 0.78, 1.0)), ((400, 400, 300), (3.0, 3.0, 3.0))]:
        factors = fit_factors(size, spacing)
        assert np.prod([-(-n // f) for n, f in zip(size, factors)]) <= MAX_FIT_VOXELS


def test_a_re_run_on_the_same_mr_reuses_its_correction_and_a_changed_copy_does_not_leak(monkeypatch):
    from SpineRigidRegLib import bias_field

    bias_field.forget_corrections()
    fits = []
    real = bias_field._divided_by_field
    monkeypatch.setattr(bias_field, "_divided_by_field", lambda mr: fits.append(1) or real(mr))
    image, _, _ = shaded_mr(0.3)
    first = correct_bias_field(image)
    first[5, 5, 5] = -1.0  # the caller changes its copy
    second = correct_bias_field(sitk.Image(image))  # the same MR, another object
    assert len(fits) == 1 and second[5, 5, 5] != -1.0
    other = sitk.Image(image)
    other[0, 0, 0] = 7.0
    correct_bias_field(other)  # another MR
    assert len(fits) == 2
    bias_field.forget_corrections()
    correct_bias_field(image)
    assert len(fits) == 3

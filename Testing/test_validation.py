"""The input checks themselves (validation.py): each accepts a valid value unchanged and refuses each kind of bad value
with an InputError (or the TypeError it documents) whose message names the argument and the problem.

Their use at the public entry points is tested with those functions (test_warp.py, test_geometry.py,
test_preprocess.py, test_network.py, test_metrics.py, test_polyrigid.py, losses/test_losses_objective.py)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.validation import (
    all_finite,
    check_image,
    check_label_tensor,
    check_points,
    check_same_spatial_shape,
    check_settings_fields,
    check_shape3,
    check_spacing,
    check_tensor,
)


def _with(value: float, shape=(1, 3, 4, 4, 4), dtype=torch.float32) -> torch.Tensor:
    """A tensor of ones with ``value`` at one voxel."""
    x = torch.ones(shape, dtype=dtype)
    x.view(-1)[-2] = value
    return x


# ------------------------------------------------------------------------------------------------- tensors


def test_check_tensor_returns_a_valid_tensor_itself():
    x = torch.rand(2, 3, 4, 5, 6)
    assert check_tensor(x, "field", ndim=5, channels=3, floating=True, finite=True) is x
    scalar = torch.tensor(float("nan"))
    assert check_tensor(scalar, "anything") is scalar  # nothing asked, nothing checked
    integers = torch.ones((1, 1, 2, 2, 2), dtype=torch.int64)
    assert check_tensor(integers, "labels", ndim=5, channels=1, finite=True) is integers  # no NaN in integers


@pytest.mark.parametrize(
    "value, checks, error, message",
    [
        (np.zeros((1, 3, 4, 4, 4)), {}, TypeError, "moving field must be a torch.Tensor, got ndarray"),
        (torch.zeros(3, 4, 4, 4), {"ndim": 5}, InputError, "moving field must be 5-D (B, C, D, H, W), got shape (3, 4"),
        (torch.zeros(1, 2, 4, 4, 4), {"channels": 3}, InputError, "moving field must have 3 channel(s) in dimension 1"),
        (
            torch.zeros(1, 3, 4, 4, 4, dtype=torch.int32),
            {"floating": True},
            TypeError,
            "moving field must be a floating-point tensor, got torch.int32",
        ),
        (_with(float("nan")), {"finite": True}, InputError, "moving field contains NaN or infinite values"),
        (_with(float("inf")), {"finite": True}, InputError, "moving field contains NaN or infinite values"),
        (_with(-float("inf"), dtype=torch.float64), {"finite": True}, InputError, "contains NaN or infinite"),
    ],
    ids=["not a tensor", "ndim", "channels", "integer", "nan", "inf", "-inf float64"],
)
def test_check_tensor_names_the_argument_and_the_problem(value, checks, error, message):
    with pytest.raises(error, match=re.escape(message)):
        check_tensor(value, "moving field", **checks)


def test_all_finite_finds_one_bad_value_and_is_not_fooled_by_an_overflowing_sum():
    assert all_finite(torch.rand(2, 3, 4, 4, 4))
    assert not all_finite(_with(float("nan")))
    assert not all_finite(_with(float("inf")))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))  # their sum is NaN, each value infinite
    # Large finite values whose sum overflows are finite: the cheap sum alone would say otherwise.
    big = torch.full((4,), 3e38, dtype=torch.float32)
    assert not torch.isfinite(big.sum()) and all_finite(big)
    assert all_finite(torch.full((8,), 60000.0, dtype=torch.float16))


# ---------------------------------------------------------------------------------------- images and points


def test_check_image_accepts_3d_images_with_the_requested_components():
    scalar = sitk.Image(4, 5, 6, sitk.sitkFloat32)
    vector = sitk.Image([4, 5, 6], sitk.sitkVectorFloat32, 3)
    assert check_image(scalar, "CT") is scalar
    assert check_image(vector, "field", components=3) is vector
    assert check_image(vector, "anything", components=None) is vector


@pytest.mark.parametrize(
    "value, components, error, message",
    [
        (np.zeros((4, 5, 6)), 1, TypeError, "CT must be a SimpleITK.Image, got ndarray"),
        (sitk.Image(4, 5, sitk.sitkFloat32), 1, InputError, "CT must be a 3D image, got a 2D image"),
        (sitk.Image([4, 5, 6, 2], sitk.sitkFloat32), 1, InputError, "CT must be a 3D image, got a 4D image"),
        (
            sitk.Image([4, 5, 6], sitk.sitkVectorFloat32, 3),
            1,
            InputError,
            "CT must have 1 component(s) per voxel, got 3",
        ),
        (sitk.Image(4, 5, 6, sitk.sitkFloat32), 3, InputError, "CT must have 3 component(s) per voxel, got 1"),
    ],
    ids=["not an image", "2-D", "4-D", "vector for scalar", "scalar for vector"],
)
def test_check_image_names_the_argument_and_the_problem(value, components, error, message):
    with pytest.raises(error, match=re.escape(message)):
        check_image(value, "CT", components=components)


def test_check_points_returns_the_points_as_float64():
    points = check_points([[1, 2, 3], [4.5, -5, 6]], "landmarks")
    assert points.dtype == np.float64 and points.shape == (2, 3)
    np.testing.assert_array_equal(points, [[1.0, 2.0, 3.0], [4.5, -5.0, 6.0]])


@pytest.mark.parametrize(
    "value, error, message",
    [
        (np.zeros((3, 2)), InputError, "landmarks must be an (N, 3) array, got shape (3, 2)"),
        (np.zeros(3), InputError, "landmarks must be an (N, 3) array, got shape (3,)"),
        (np.zeros((2, 3, 3)), InputError, "landmarks must be an (N, 3) array, got shape (2, 3, 3)"),
        ([[1.0, float("nan"), 3.0]], InputError, "landmarks contain NaN or infinite values"),
        ([[1.0, 2.0, float("inf")]], InputError, "landmarks contain NaN or infinite values"),
        ([["a", "b", "c"]], TypeError, "landmarks must be numbers"),
    ],
    ids=["(N, 2)", "flat", "3-D", "nan", "inf", "text"],
)
def test_check_points_names_the_argument_and_the_problem(value, error, message):
    with pytest.raises(error, match=re.escape(message)):
        check_points(value, "landmarks")


# ------------------------------------------------------------------------------------------ sizes and grids


def test_check_shape3_returns_three_python_ints():
    for shape in ((4, 5, 6), [4, 5, 6], torch.Size([4, 5, 6]), np.array([4, 5, 6])):
        checked = check_shape3(shape, "crop size")
        assert checked == (4, 5, 6) and all(type(v) is int for v in checked), shape


@pytest.mark.parametrize("value", [(4, 5), (4, 5, 6, 7), (0, 5, 6), (4, -5, 6), (4.0, 5, 6), (True, 5, 6)], ids=str)
def test_check_shape3_refuses_anything_but_three_positive_whole_numbers(value):
    with pytest.raises(InputError, match=r"crop size must be three positive whole numbers \(D, H, W\)"):
        check_shape3(value, "crop size")


def test_check_shape3_refuses_a_single_number_with_a_type_error():
    with pytest.raises(TypeError, match="crop size must be a sequence of three sizes, got int"):
        check_shape3(5, "crop size")


def test_check_same_spatial_shape_compares_batch_and_grid_not_channels():
    check_same_spatial_shape(torch.zeros(2, 1, 4, 5, 6), torch.zeros(2, 3, 4, 5, 6), "image", "field")
    for other in (torch.zeros(1, 3, 4, 5, 6), torch.zeros(2, 3, 4, 5, 7)):
        with pytest.raises(InputError, match=r"image \(2, 1, 4, 5, 6\) and field \(.*\) must share batch size"):
            check_same_spatial_shape(torch.zeros(2, 1, 4, 5, 6), other, "image", "field")


def test_check_spacing_returns_three_floats_and_none_means_1mm():
    assert check_spacing(None) == (1.0, 1.0, 1.0)
    checked = check_spacing(np.array([0.5, 1, 2.5]), "MR spacing")
    assert checked == (0.5, 1.0, 2.5) and all(type(v) is float for v in checked)


@pytest.mark.parametrize(
    "value",
    [(0.0, 1.0, 1.0), (1.0, -0.5, 1.0), (1.0, 1.0, float("nan")), (float("inf"), 1.0, 1.0), (1.0, 1.0), (1, 1, 1, 1)],
    ids=["zero", "negative", "nan", "inf", "two", "four"],
)
def test_check_spacing_refuses_anything_but_three_positive_finite_numbers(value):
    with pytest.raises(InputError, match=r"MR spacing must be three positive finite numbers \(mm\), got"):
        check_spacing(value, "MR spacing")


# ------------------------------------------------------------------------------------------------ label maps


def test_check_label_tensor_keeps_integer_labels_and_converts_whole_floats():
    labels = torch.tensor([0, 20, 21, 22], dtype=torch.int64).view(1, 1, 4, 1, 1)
    assert check_label_tensor(labels, "CT labels") is labels
    converted = check_label_tensor(labels.float(), "CT labels")
    assert converted.dtype == torch.int64 and torch.equal(converted, labels)


@pytest.mark.parametrize(
    "value, error, message",
    [
        (torch.full((1, 1, 2, 2, 2), 1.5), InputError, "CT labels must hold integer label values, found non-integer"),
        (_with(float("nan"), (1, 1, 2, 2, 2)), InputError, "CT labels must hold integer label values"),
        (_with(float("inf"), (1, 1, 2, 2, 2)), InputError, "CT labels must hold integer label values"),
        (-torch.ones((1, 1, 2, 2, 2), dtype=torch.int64), InputError, "CT labels must hold non-negative label values"),
        (-torch.ones((1, 1, 2, 2, 2)), InputError, "CT labels must hold non-negative label values"),
        (torch.zeros((1, 2, 2, 2, 2), dtype=torch.int64), InputError, "CT labels must have 1 channel(s)"),
        (torch.zeros((1, 2, 2, 2), dtype=torch.int64), InputError, "CT labels must be 5-D"),
        (np.zeros((1, 1, 2, 2, 2)), TypeError, "CT labels must be a torch.Tensor"),
    ],
    ids=["fractional", "nan", "inf", "negative", "negative float", "two channels", "4-D", "numpy"],
)
def test_check_label_tensor_names_the_argument_and_the_problem(value, error, message):
    with pytest.raises(error, match=re.escape(message)):
        check_label_tensor(value, "CT labels")


# -------------------------------------------------------------------------------------------------- settings

SIMILARITIES = {"mind": None, "ngf": None}


@dataclasses.dataclass
class Settings:
    """Postponed annotations (this module's ``from __future__ import annotations``): field types are strings."""

    similarity: str = "mind"
    weight: float = 0.5
    steps: int = 3
    enabled: bool = True


#: The same fields with their types as classes (a module without postponed annotations).
TypedSettings = dataclasses.make_dataclass(
    "TypedSettings", [("similarity", str, "mind"), ("weight", float, 0.5), ("steps", int, 3), ("enabled", bool, True)]
)


@pytest.mark.parametrize("cls", [Settings, TypedSettings], ids=["string annotations", "class annotations"])
def test_check_settings_fields_accepts_known_similarity_bools_and_numbers_from_zero(cls):
    for values in ({}, {"similarity": "ngf", "weight": 0.0, "steps": 0, "enabled": False}, {"weight": 7}):
        assert check_settings_fields(cls(**values), "refinement setting", SIMILARITIES) is None


@pytest.mark.parametrize("cls", [Settings, TypedSettings], ids=["string annotations", "class annotations"])
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("similarity", "ssd", "unknown similarity 'ssd'; choose from ['mind', 'ngf']"),
        ("enabled", 1, "refinement setting enabled must be true or false, got 1"),
        ("enabled", "yes", "refinement setting enabled must be true or false, got 'yes'"),
        ("weight", -0.1, "refinement setting weight must be a finite non-negative number, got -0.1"),
        ("weight", float("nan"), "refinement setting weight must be a finite non-negative number, got nan"),
        ("weight", float("inf"), "refinement setting weight must be a finite non-negative number, got inf"),
        ("weight", "0.5", "refinement setting weight must be a finite non-negative number, got '0.5'"),
        ("steps", True, "refinement setting steps must be a finite non-negative number, got True"),
    ],
    ids=["similarity", "bool as int", "bool as text", "negative", "nan", "inf", "text", "bool as number"],
)
def test_check_settings_fields_names_the_field_and_the_problem(cls, field, value, message):
    with pytest.raises(InputError, match=re.escape(message)):
        check_settings_fields(cls(**{field: value}), "refinement setting", SIMILARITIES)

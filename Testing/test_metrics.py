"""Evaluation metrics: DSC, rigid DSC, volume change, folding, SD log|J|, PC/OC, TRE and per-vertebra tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.jacobian import jacobian_determinant
from SpineRigidRegLib.metrics import (
    dice_per_label,
    field_summary,
    folding_voxels,
    mean_displacement_mm,
    orthonormality_metric,
    properness_metric,
    rigid_dice_per_label,
    sd_log_jacobian,
    summarize,
    target_registration_error,
    vertebra_table,
    volume_change_percent,
)
from SpineRigidRegLib.warp import warp_labels

SHAPE = (18, 16, 14)
SPACING = (1.2, 1.0, 0.9)


def two_vertebrae() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[3:8, 4:12, 3:10] = 4
    labels[10:15, 4:12, 3:10] = 9
    return labels


def linear_field(matrix, spacing=SPACING, translation=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """(1, 3, D, H, W) float64 voxel field of ``x_mm -> A (x_mm - c) + c + t`` about the grid centre."""
    step = torch.tensor(spacing, dtype=torch.float64).view(3, 1, 1, 1)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in SHAPE], indexing="ij"))
    x = idx * step
    c = torch.tensor([(n - 1) / 2 for n in SHAPE], dtype=torch.float64).view(3, 1, 1, 1) * step
    t = torch.tensor(translation, dtype=torch.float64).view(3, 1, 1, 1)
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    return ((torch.einsum("ce,edhw->cdhw", matrix, x - c) + c + t - x) / step)[None]


def rotation(degrees: float, axis: int) -> torch.Tensor:
    th = math.radians(degrees)
    a, b = [i for i in range(3) if i != axis]
    r = torch.eye(3, dtype=torch.float64)
    r[a, a], r[a, b], r[b, a], r[b, b] = math.cos(th), -math.sin(th), math.sin(th), math.cos(th)
    return r


def test_dice_identical_disjoint_and_partial():
    labels = two_vertebrae()
    assert dice_per_label(labels, labels) == {4: 1.0, 9: 1.0}
    shifted = np.zeros_like(labels)
    shifted[3:8, 4:12, 3:10] = 9  # vertebra 9 where 4 was: 4 and 9 both disjoint now
    scores = dice_per_label(labels, shifted)
    assert scores == {4: 0.0, 9: 0.0}
    a = np.zeros((4, 4, 8), dtype=np.int64)
    b = np.zeros_like(a)
    a[..., 0:4] = 2
    b[..., 2:6] = 2
    assert dice_per_label(torch.from_numpy(a)[None, None], b)[2] == pytest.approx(0.5)
    assert math.isnan(dice_per_label(a, b, label_values=[2, 5])[5])  # absent from both
    assert dice_per_label(labels.astype(np.float32), labels)[4] == 1.0  # whole-number floats are labels too


def test_rigid_dice_is_one_for_a_rotation_and_drops_for_a_stretch():
    labels = two_vertebrae()
    field = linear_field(rotation(7.0, 1) @ rotation(5.0, 0), translation=(0.7, -1.1, 0.4))
    scores = rigid_dice_per_label(labels, field, SPACING)
    assert set(scores) == {4, 9} and min(scores.values()) >= 0.999
    scores32 = rigid_dice_per_label(torch.from_numpy(labels)[None, None], field.float(), SPACING)
    assert min(scores32.values()) >= 0.99
    stretched = rigid_dice_per_label(labels, linear_field(np.diag([1.3, 1.0, 0.8])), SPACING)
    assert max(stretched.values()) < 0.95


def test_volume_change_percent():
    labels = two_vertebrae()
    assert volume_change_percent(labels, torch.zeros(1, 3, *SHAPE)) == {4: 0.0, 9: 0.0}
    scale = 1.25  # pull-back by x / 1.25: every vertebra grows 1.25 times per axis
    change = volume_change_percent(labels, linear_field(np.eye(3) / scale), SPACING)
    for value in change.values():
        assert value == pytest.approx(100 * (scale**3 - 1), abs=12.0)
    shrink = volume_change_percent(labels, linear_field(np.eye(3) * 1.25), SPACING)
    assert all(v < -30 for v in shrink.values())


def test_folding_voxels_and_sd_log_jacobian():
    identity = torch.zeros(1, 3, *SHAPE)
    assert folding_voxels(identity) == 0
    assert sd_log_jacobian(identity) == 0.0
    mirror = linear_field(np.diag([-1.0, 1.0, 1.0]), spacing=(1.0, 1.0, 1.0))  # folds every voxel
    assert folding_voxels(mirror) == int(np.prod(SHAPE))
    mask = np.zeros(SHAPE, dtype=bool)
    mask[:5] = True
    assert folding_voxels(mirror, mask=mask) == int(mask.sum())
    assert math.isnan(sd_log_jacobian(mirror))  # no voxel with det J > 0
    translation = linear_field(np.eye(3), translation=(3.0, -2.0, 1.5))
    assert sd_log_jacobian(translation, SPACING) == pytest.approx(0.0, abs=1e-12)
    gen = torch.Generator().manual_seed(0)
    wobbly = torch.nn.functional.interpolate(
        torch.randn(1, 3, 3, 3, 3, generator=gen), size=SHAPE, mode="trilinear", align_corners=True
    )
    assert sd_log_jacobian(wobbly, SPACING) > 0.01


def test_the_field_summary_over_a_mask_is_the_statistics_of_the_masked_voxels_alone():
    """The summary reads the whole grid with the mask as weights (no selection of the masked voxels): its SD of
    log det J, mean and largest displacement are those of the masked voxels selected by hand, voxels outside the
    mask and folded voxels left out; an empty mask gives nan."""
    gen = torch.Generator().manual_seed(2)
    field = torch.nn.functional.interpolate(
        2.0 * torch.randn(1, 3, 4, 4, 4, generator=gen), size=SHAPE, mode="trilinear", align_corners=True
    )
    lengths = (field * torch.tensor(SPACING).view(1, 3, 1, 1, 1)).norm(dim=1)[0]
    mask = torch.rand(SHAPE, generator=gen) > 0.4
    mask.view(-1)[lengths.argmax()] = False  # the longest displacement lies outside
    summary = field_summary(field, SPACING, mask=mask)
    det = jacobian_determinant(field, SPACING)[0, 0]
    valid = mask & (det > 0)
    assert 0 < int((mask & (det <= 0)).sum()) == summary["folding_voxels"]  # some folds inside, left out below
    assert summary["sd_log_jacobian"] == pytest.approx(float(det[valid].double().log().std(correction=0)), rel=1e-12)
    assert summary["mean_displacement_mm"] == pytest.approx(float(lengths[mask].double().mean()), rel=1e-6)
    assert summary["max_displacement_mm"] == pytest.approx(float(lengths[mask].max()), rel=1e-6)
    assert summary["max_displacement_mm"] < float(lengths.max())
    empty = field_summary(field, SPACING, mask=torch.zeros(SHAPE, dtype=torch.bool))
    assert all(math.isnan(empty[key]) for key in ("sd_log_jacobian", "mean_displacement_mm", "max_displacement_mm"))


def test_properness_and_orthonormality_metrics_are_analytic_for_linear_maps():
    labels = two_vertebrae()
    rotated = linear_field(rotation(9.0, 2))
    assert max(properness_metric(labels, rotated, SPACING).values()) < 1e-12
    assert max(orthonormality_metric(labels, rotated, SPACING).values()) < 1e-12
    e = 0.1
    stretched = linear_field(np.diag([1 + e, 1.0, 1.0]))
    for value in properness_metric(labels, stretched, SPACING).values():
        assert value == pytest.approx(e**2, rel=1e-9)
    for value in orthonormality_metric(labels, stretched, SPACING).values():
        assert value == pytest.approx(((1 + e) ** 2 - 1) ** 2, rel=1e-9)


def test_target_registration_error_and_mean_displacement():
    gen = torch.Generator().manual_seed(1)
    truth = torch.randn(1, 3, *SHAPE, generator=gen, dtype=torch.float64)
    assert target_registration_error(truth, truth, SPACING) == 0.0
    mean_true = mean_displacement_mm(truth, SPACING)
    assert target_registration_error(torch.zeros_like(truth), truth, SPACING) == pytest.approx(mean_true)
    by_hand = (truth * torch.tensor(SPACING, dtype=torch.float64).view(1, 3, 1, 1, 1)).norm(dim=1).mean()
    assert mean_true == pytest.approx(float(by_hand))
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[2:5, 3:9, :] = 1
    region = torch.from_numpy(mask).bool()
    masked_by_hand = (truth * torch.tensor(SPACING).double().view(1, 3, 1, 1, 1)).norm(dim=1)[0][region].mean()
    assert mean_displacement_mm(truth.numpy()[0], SPACING, mask) == pytest.approx(float(masked_by_hand))
    shift = linear_field(np.eye(3), translation=(3.0, 4.0, 0.0))
    assert mean_displacement_mm(shift, SPACING) == pytest.approx(5.0)


def test_vertebra_table_and_summaries():
    labels = two_vertebrae()
    field = linear_field(rotation(5.0, 0), translation=(1.0, 0.0, 0.0))
    fixed = warp_labels(torch.from_numpy(labels.astype(np.int64))[None, None], field)
    rows = vertebra_table(labels, field, SPACING, fixed_labels=fixed, true_displacement=field)
    assert [row["label"] for row in rows] == [4, 9]
    expected = {
        "label",
        "voxels",
        "dice",
        "rigid_dice",
        "volume_change_percent",
        "pc",
        "oc",
        "folding_voxels",
        "mean_displacement_mm",
        "tre_mm",
    }
    for row in rows:
        assert set(row) == expected
        assert row["voxels"] == 5 * 8 * 7
        assert row["dice"] == 1.0 and row["rigid_dice"] >= 0.999 and row["tre_mm"] == 0.0
        assert row["pc"] < 1e-12 and row["oc"] < 1e-12 and row["folding_voxels"] == 0
        assert abs(row["volume_change_percent"]) < 10.0 and row["mean_displacement_mm"] > 0
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row.values())
    assert set(vertebra_table(labels, field)[0]) == expected - {"dice", "tre_mm"}
    assert vertebra_table(np.zeros(SHAPE, dtype=np.int64), field) == []

    whole = field_summary(field, SPACING)
    assert whole["folding_voxels"] == 0 and whole["folding_percent"] == 0.0
    assert whole["sd_log_jacobian"] == pytest.approx(0.0, abs=1e-12)
    assert whole["max_displacement_mm"] >= whole["mean_displacement_mm"] > 0

    table = [
        {"label": 1, "dice": 0.8, "volume_change_percent": -4.0, "folding_voxels": 0},
        {"label": 2, "dice": 0.6, "volume_change_percent": 2.0, "folding_voxels": 3},
        {"label": 3, "dice": float("nan"), "volume_change_percent": 0.0, "folding_voxels": 0},
    ]
    summary = summarize(table, field=whole)
    assert summary["vertebrae"] == 3
    assert summary["dice_mean"] == pytest.approx(0.7) and summary["dice_sd"] == pytest.approx(0.1)  # nan skipped
    assert summary["volume_change_percent_mean"] == pytest.approx(-2 / 3)
    assert summary["abs_volume_change_percent_mean"] == pytest.approx(2.0)
    assert summary["folding_voxels_mean"] == pytest.approx(1.0)
    assert "label_mean" not in summary and summary["sd_log_jacobian"] == whole["sd_log_jacobian"]


def test_bad_inputs_raise():
    labels = two_vertebrae()
    field = torch.zeros(1, 3, *SHAPE)
    per_vertebra = (
        rigid_dice_per_label,
        volume_change_percent,
        properness_metric,
        orthonormality_metric,
        vertebra_table,
    )
    for fn in per_vertebra:
        with pytest.raises(InputError):
            fn(np.stack([labels, labels])[:, None], field)  # two samples
        with pytest.raises(InputError):
            fn(labels + 0.5, field)  # non-integer labels
        with pytest.raises(InputError):
            fn(labels, torch.full_like(field, float("nan")))
        with pytest.raises(InputError):
            fn(labels[:-1], field)  # grids differ
        with pytest.raises(InputError):
            fn(labels[None], field)  # (1, D, H, W) is ambiguous: not accepted
        with pytest.raises(TypeError):
            fn(labels.tolist(), field)
        with pytest.raises(TypeError):
            fn(labels, field.long())
    for fn in (folding_voxels, sd_log_jacobian, mean_displacement_mm, field_summary):
        with pytest.raises(InputError):
            fn(field[:, :2])
        with pytest.raises(InputError):
            fn(torch.full_like(field, float("nan")))
        with pytest.raises(InputError):
            fn(field, mask=np.ones((2, 2, 2)))
        with pytest.raises(InputError):
            fn(field, spacing=(1.0, 1.0, -2.0))
    with pytest.raises(InputError):
        dice_per_label(labels, labels[:-1])
    with pytest.raises(InputError):
        dice_per_label(labels, -labels)
    with pytest.raises(InputError):
        target_registration_error(field, torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(TypeError):
        summarize({"dice": 1.0})


def test_rigid_dice_in_its_box_equals_the_full_grid_definition():
    """The box-restricted rigid DSC must give exactly the full-grid value (Dice of both crisp warps, rigid fit)."""
    from SpineRigidRegLib.rigid import fit_rigid_to_field, rigid_displacement
    from SpineRigidRegLib.warp import warp_labels

    generator = torch.Generator().manual_seed(3)
    labels = torch.zeros(1, 1, 30, 26, 22, dtype=torch.int64)
    labels[0, 0, 4:11, 6:15, 5:13] = 7
    labels[0, 0, 15:23, 8:18, 6:16] = 9
    step = (1.0, 1.3, 0.8)
    for amplitude in (0.5, 2.0, 5.0):
        coarse = torch.randn(1, 3, 4, 4, 4, generator=generator, dtype=torch.float64) * amplitude
        u = torch.nn.functional.interpolate(coarse, size=labels.shape[2:], mode="trilinear", align_corners=True)
        for value in (7, 9):
            mask = (labels == value).long()
            warped = warp_labels(mask, u, label_values=[1]) == 1
            rotation, translation = fit_rigid_to_field(warped.double(), u, step)
            rigid = rigid_displacement(rotation, translation, u.shape[2:], step)
            moved = warp_labels(mask, rigid, label_values=[1]) == 1
            expected = 2 * int((warped & moved).sum()) / (int(warped.sum()) + int(moved.sum()))
            assert rigid_dice_per_label(labels, u, step, [value])[value] == pytest.approx(expected, abs=1e-12)


def test_vertebra_table_equals_the_per_vertebra_functions():
    """The table's one-pass sums must agree with each metric computed on its own, column by column."""
    generator = torch.Generator().manual_seed(5)
    labels = torch.zeros(1, 1, 28, 24, 20, dtype=torch.int64)
    labels[0, 0, 3:9, 5:14, 4:12] = 30
    labels[0, 0, 11:18, 6:16, 5:14] = 31
    labels[0, 0, 20:26, 7:15, 6:13] = 33
    fixed = labels.roll(1, dims=2)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=generator, dtype=torch.float64)
    u = torch.nn.functional.interpolate(coarse, size=labels.shape[2:], mode="trilinear", align_corners=True)
    truth = u * 0.5
    step = (1.1, 0.9, 1.3)
    rows = {row["label"]: row for row in vertebra_table(labels, u, step, fixed_labels=fixed, true_displacement=truth)}
    warped = warp_labels(labels, u)
    expected = {
        "dice": dice_per_label(warped, fixed, [30, 31, 33]),
        "rigid_dice": rigid_dice_per_label(labels, u, step),
        "volume_change_percent": volume_change_percent(labels, u, step),
        "pc": properness_metric(labels, u, step),
        "oc": orthonormality_metric(labels, u, step),
    }
    true_warped = warp_labels(labels, truth)
    for value, row in rows.items():
        for column, per_label in expected.items():
            assert row[column] == pytest.approx(per_label[value], rel=1e-9, abs=1e-12), (value, column)
        region = warped == value
        assert row["mean_displacement_mm"] == pytest.approx(mean_displacement_mm(u, step, mask=region), rel=1e-9)
        assert row["folding_voxels"] == folding_voxels(u, step, mask=region)
        assert row["tre_mm"] == pytest.approx(
            target_registration_error(u, truth, step, mask=true_warped == value), rel=1e-9
        )


def test_a_vertebra_moved_partly_out_of_the_grid_by_a_translation_keeps_its_volume():
    """Cut by the field of view and truly moving out of it: the part that leaves the grid is not a volume change
    (a plain warped-voxel count reported -40 % here for a rigid shift)."""
    labels = torch.zeros(1, 1, 20, 12, 12, dtype=torch.int64)
    labels[..., 10:20, 3:9, 3:9] = 7  # reaches the last slice
    shift = torch.zeros(1, 3, 20, 12, 12, dtype=torch.float64)
    shift[:, 0] = -4.0  # fixed voxel z shows moving voxel z - 4: the vertebra moves up, 4 of its slices leave
    assert int((warp_labels(labels, shift) == 7).sum()) == 6 * 36
    assert volume_change_percent(labels, shift)[7] == pytest.approx(0.0, abs=1e-9)
    row = vertebra_table(labels, shift)[0]
    assert row["volume_change_percent"] == pytest.approx(0.0, abs=1e-9)

"""The clinic-like benchmark tiers (issue 15): real-MR levels and CT, clinical acquisition, truth, success, CLI."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SpineRigidRegLib import pipeline
from SpineRigidRegLib.benchmark import runner, tiers
from SpineRigidRegLib.choices import make_settings
from SpineRigidRegLib.cli import benchmark as benchmark_cli
from SpineRigidRegLib.data.clinical import (
    CLINICAL_MOTION,
    ClinicalAcquisition,
    acquire_clinical,
    clinical_grid,
    scaled_motion,
)
from SpineRigidRegLib.data.real_mr import load_real_mr, split_vertebra_levels
from SpineRigidRegLib.data.synthesis import vertebra_motion
from SpineRigidRegLib.geometry import Geometry
from SpineRigidRegLib.warp import warp_labels


def test_split_vertebra_levels_orders_components_caudal_first_in_lps():
    array = np.zeros((30, 10, 10), np.uint8)
    array[2:10, 3:7, 3:7] = 19  # inferior (small k, LPS z grows superior with an identity direction)
    array[14:24, 3:7, 3:7] = 19
    array[25:26, 0, 0] = 19  # a fragment
    image = sitk.GetImageFromArray(array)
    levels, names = split_vertebra_levels(image, lowest_level="L2")
    out = sitk.GetArrayFromImage(levels)
    assert names == {30: "L2", 31: "L1"}
    assert out[5, 5, 5] == 30 and out[20, 5, 5] == 31 and out[25, 0, 0] == 0


def test_invert_displacement_recovers_a_rigid_motion_inside_the_vertebrae():
    labels = torch.zeros((1, 1, 40, 32, 32), dtype=torch.int64)
    labels[:, :, 8:16, 10:22, 10:22] = 31
    labels[:, :, 22:30, 10:22, 10:22] = 32
    forward = vertebra_motion(
        labels, (1.0, 1.0, 1.0), scaled_motion(CLINICAL_MOTION, 0.3), torch.Generator().manual_seed(1)
    )
    moved = warp_labels(labels, forward)
    back = warp_labels(moved, tiers.invert_displacement(forward))
    for value in (31, 32):
        a, b = labels == value, back == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97


def test_noisy_points_are_two_to_three_mm_from_the_centroids():
    array = np.zeros((30, 20, 20), np.uint16)
    array[3:12, 5:15, 5:15] = 31
    array[16:26, 5:15, 5:15] = 32
    labels = sitk.GetImageFromArray(array)
    truth = runner.named_centroids(labels)
    points = tiers.noisy_points(labels, np.random.default_rng(0))
    assert set(points) == set(truth) == {"L1", "T12"}
    for name, point in points.items():
        assert 2.0 <= np.linalg.norm(point - truth[name]) <= 3.0
    assert set(tiers.noisy_points(labels, np.random.default_rng(0), keep=(31,))) == {"L1"}


def test_clinical_grid_is_oblique_anisotropic_and_cuts_the_cranial_vertebra():
    array = np.zeros((90, 60, 60), np.uint16)
    for index, value in enumerate((30, 31, 32)):
        array[10 + 27 * index : 32 + 27 * index, 20:40, 20:40] = value
    labels = sitk.GetImageFromArray(array)
    geometry, info = clinical_grid(labels, ClinicalAcquisition(), np.random.default_rng(2))
    assert 0.6 <= geometry.spacing[0] <= 0.8 and geometry.spacing[0] == geometry.spacing[1]
    assert 3.0 <= info["slice_thickness_mm"] <= 4.0 and geometry.spacing[2] > 3.0
    direction = geometry.direction_matrix
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-9) and np.linalg.det(direction) > 0
    assert not np.allclose(np.abs(direction), np.round(np.abs(direction)))  # oblique
    mr = geometry.reference_image()
    visible = tiers.visible_vertebrae(labels, mr)
    assert 30 in visible and 31 in visible
    inside = sitk.GetArrayViewFromImage(tiers.field_of_view(mr, labels)) > 0
    assert inside[array == 32].mean() < 0.75  # the cranial end vertebra is cut


def test_success_needs_mean_below_2_and_worst_below_3_mm():
    assert tiers.success({"status": "ok", "tre_mm_mean": 1.9, "tre_mm_max": 2.9})
    assert not tiers.success({"status": "ok", "tre_mm_mean": 1.9, "tre_mm_max": 3.1})
    assert not tiers.success({"status": "ok", "tre_mm_mean": 2.1, "tre_mm_max": 2.5})
    assert not tiers.success({"status": "failed: x"})


def test_tiny_clinical_case_truth_maps_the_ct_labels_onto_the_mr_labels():
    case = tiers.clinical_case(0, 4000, None, tiny=True)
    assert case.grid is not None and not Geometry.of(case.fixed).same_grid(case.grid)
    assert case.evaluated
    rows, _ = runner.evaluate(case, case.true_displacement)
    assert {int(r["label"]) for r in rows} == set(case.evaluated)
    assert all(r["tre_mm"] < 1e-4 and r["dice"] > 0.95 for r in rows)
    same = tiers.clinical_case(0, 4000, None, scale=2.0, tiny=True)
    ratio = same.true_displacement.abs().mean() / case.true_displacement.abs().mean()
    assert 1.5 < float(ratio) < 2.5  # same motion, scaled


@pytest.fixture(scope="module")
def in_register_row(shared_data):
    """The default (no points) on the clinical tier's first case with no motion: the real CT, its sagittal T2-like
    MR of thick oblique slices."""
    if not runner.bundled_model_available():
        pytest.skip("the bundled registration model is absent")
    case = tiers.clinical_case(0, 4000, shared_data, scale=0.0)
    methods = [m for m in tiers.tier_methods(3, 1) if m.name == tiers.DEFAULT]
    return tiers.run_tier([case], methods, "cpu").case_rows[0]


def test_a_real_ct_pair_in_register_stays_within_0_35_mm(in_register_row):
    """Issue 18 item 10's pair in register: 0.52 mm before session 12, 0.27 mm with the 6 mm sample band and the
    slice model (`VertebraRigidSettings`), 0.34 mm after session 16's faster automatic search, 0.27 mm with the MR's
    bias field divided out (session 17, `bias_field`), 0.25 mm with 40 vertebra-wise steps (session 18); this guards
    those gains."""
    assert in_register_row["tre_mm_mean"] < 0.35


@pytest.mark.xfail(
    reason="issue 18 item 10: a pair in register comes out 0.25 mm off (0.52 mm before session 12, 0.34 mm before "
    "session 17 divided the MR's bias field out; the tiny phantom's pair 0.79 mm). Not the geometry (the next "
    "test), not noise (session 15: each vertebra's end beats its start on fresh sample sets, 5 of 6 by 4-22 SDs): "
    "the vertebra-wise stage's NMI optimum lies a few tenths of a mm from the truth on a T2-like MR of thick "
    "slices, whose contrast is not a function of the CT's; without bias field, noise and texture in the synthetic "
    "MR it is still 0.21 mm (docs/BENCHMARKS_TIERS.md)",
    strict=False,
)
def test_a_pair_already_in_register_comes_out_within_a_tenth_of_a_mm(in_register_row):
    assert in_register_row["tre_mm_mean"] < 0.1


@pytest.mark.parametrize("slice_model", [False, True])
def test_a_ct_seen_as_thick_slices_in_register_stays_in_register_with_the_slice_model(slice_model):
    """Same-modality thick slices (the CT through the clinical series' box slice profile). With the slice model
    (`VertebraRigidSettings.slice_model`) the vertebra-wise stage compares the MR at its own voxel centres with the
    CT averaged across a slice and no vertebra moves; comparing the MR interpolated between slices (the default)
    moves them 0.27-0.30 mm along the slice normal."""
    if not runner.bundled_model_available():
        pytest.skip("the bundled registration model is absent")
    case = tiers.clinical_case(0, 4000, None, scale=0.0, tiny=True)
    quiet = ClinicalAcquisition(noise=(0.0, 0.0), bias_strength=0.0)
    thickness = case.fixed.GetSpacing()[2] / (1 + quiet.slice_gap)
    ct = sitk.Cast(case.moving, sitk.sitkFloat32)
    mr = acquire_clinical(ct, Geometry.of(case.fixed), quiet, np.random.default_rng(0), thickness)
    settings = make_settings(device="cpu")
    settings = replace(settings, vertebra_rigid=replace(settings.vertebra_rigid, slice_model=slice_model))
    result = pipeline.register(mr, case.moving, case.moving_labels, settings=settings)
    rows, _ = runner.evaluate(case, runner.displacement_on_grid(result.transform, case.geometry))
    worst = max(r["tre_mm"] for r in rows)
    assert worst < 0.15 if slice_model else worst > 0.2


def test_real_mr_levels_and_synthetic_ct(shared_data):
    real = load_real_mr(shared_data)
    assert real.names == {31: "L1", 32: "T12"}
    case = tiers.real_mr_case(0, 3000, shared_data)
    assert case.fixed.GetSpacing() == (3.0, 3.0, 3.0)  # the real MR itself
    ct = sitk.GetArrayViewFromImage(case.moving)
    moving = sitk.GetArrayViewFromImage(case.moving_labels)
    assert np.median(ct[moving > 0]) > 150 and np.percentile(ct[moving > 0], 95) > 500  # cancellous + cortex
    rows, _ = runner.evaluate(case, case.true_displacement)
    assert len(rows) == 2 and all(r["tre_mm"] < 0.05 and r["dice"] > 0.95 for r in rows)
    assert all(
        2.0 <= np.linalg.norm(p - c) <= 3.0
        for p, c in zip(case.fixed_points.values(), runner.named_centroids(case.fixed_labels).values(), strict=True)
    )


@pytest.mark.slow
def test_srr_benchmark_quick_tiers(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "bundled_model_available", lambda: False)
    monkeypatch.setattr(tiers, "bundled_model_available", lambda: False)
    out, markdown = tmp_path / "tiers", tmp_path / "TIERS.md"
    args = ["--tiers", "real-mr", "clinical", "capture", "--quick", "--threads", "1", "--device", "cpu"]
    assert benchmark_cli.main([*args, "--out", str(out), "--markdown", str(markdown), "--quiet"]) == 0
    text = markdown.read_text(encoding="utf-8")
    for title in (tiers.TIER_TITLES[tiers.CLINICAL], tiers.TIER_TITLES[tiers.CAPTURE]):
        assert f"## {title}" in text
    assert f"| {tiers.NO_REGISTRATION} |" in text and f"| {tiers.STARING_POINTS} |" in text
    assert (out / tiers.CAPTURE_PNG).is_file() and (out / "clinical" / "panels.png").is_file()
    assert "x0.5" in text and "x2" in text


def test_a_candidate_model_adds_its_network_path_and_default_rows_and_must_exist(tmp_path, capsys):
    rows = {m.name: m for m in tiers.tier_methods(3, 1, candidate="runs/lg/label_guided.pt")}
    added = [m for m in rows.values() if m.checkpoint == "runs/lg/label_guided.pt"]
    assert len(added) == 2 and all(m.kind == runner.KIND_MODEL and not m.landmarks for m in added)
    assert sorted(m.vertebra_rigid_steps for m in added if m.vertebra_rigid_steps is not None) == [0]
    assert all(m.checkpoint is None for m in tiers.tier_methods(3, 1))
    missing = tmp_path / "absent.pt"
    code = benchmark_cli.main(
        ["--tiers", "clinical", "--quick", "--candidate-model", str(missing), "--out", str(tmp_path / "o"), "--quiet"]
    )
    err = capsys.readouterr().err
    assert code != 0 and "--candidate-model" in err and "Traceback" not in err

"""The registration pipeline: geometry kept exact through oblique/anisotropic inputs, bad input refused cleanly,
cancellation leaves nothing behind."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SpineRigidRegLib import inference, pipeline, polyrigid
from SpineRigidRegLib import warp as warp_module
from SpineRigidRegLib.data.phantom import make_phantom
from SpineRigidRegLib.errors import CancelledError, InputError
from SpineRigidRegLib.network import NetworkConfig, RegistrationNet
from SpineRigidRegLib.polyrigid import VertebraRigidSettings
from SpineRigidRegLib.prealign import ROTATION_PRIOR_RADIUS_MM, label_centroids, rigid_from_points

TINY = NetworkConfig(encoder_channels=(4, 4, 4, 4), decoder_channels=(4, 4, 4, 4), final_channels=(4,))
FAST = pipeline.RegistrationSettings(
    device="cpu", refine_steps=0, margin_mm=8.0, vertebra_rigid=VertebraRigidSettings(steps=0)
)  # network only


@pytest.fixture(scope="module")
def network() -> RegistrationNet:
    torch.manual_seed(0)
    return RegistrationNet(TINY).eval()


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(num_vertebrae=3, shape=(48, 40, 40), seed=1)


def rotation_about(
    center: np.ndarray, angles_deg: tuple[float, float, float], shift: np.ndarray
) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(float(c) for c in center))
    t.SetRotation(*[float(np.deg2rad(a)) for a in angles_deg])
    t.SetTranslation(tuple(float(s) for s in shift))
    return t


def oblique_mr(phantom, truth: sitk.Transform, spacing=(1.2, 1.2, 2.5)) -> sitk.Image:
    """An MR-like image of the phantom seen through ``truth`` (MR point -> CT point), on an oblique LPS grid."""
    ct = phantom.ct
    contrast = sitk.Cast(sitk.InvertIntensity(sitk.Cast(ct, sitk.sitkFloat32), maximum=1500.0), sitk.sitkFloat32)
    direction = rotation_about(np.zeros(3), (4.0, -3.0, 6.0), np.zeros(3)).GetMatrix()
    centre = np.asarray(ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()]))
    extent = np.asarray(ct.GetSize()) * np.asarray(ct.GetSpacing())
    size = [int(e / s) for e, s in zip(extent, spacing)]
    d = np.asarray(direction).reshape(3, 3)
    origin = centre - d @ ((np.asarray(size) - 1) * np.asarray(spacing) / 2)
    return sitk.Resample(
        contrast, size, truth, sitk.sitkLinear, tuple(origin), spacing, direction, 0.0, sitk.sitkFloat32
    )


def landmarks_from(labels: sitk.Image, transform: sitk.Transform | None = None) -> dict[str, np.ndarray]:
    """Vertebra centroids by label name; with ``transform`` (CT -> MR), their MR positions."""
    points = {}
    for value, c in label_centroids(labels).items():
        points[f"V{value}"] = np.asarray(transform.TransformPoint(tuple(c))) if transform else c
    return points


@pytest.mark.parametrize("mr_spacing", [(1.2, 1.2, 2.5), (0.3, 0.3, 5.0)])
def test_known_rigid_motion_is_recovered_through_oblique_anisotropic_geometry(phantom, network, tmp_path, mr_spacing):
    # MR point -> CT point; the roll about the spine (the phantom's z axis) stays small, as between two supine scans:
    # the centre-point fit keeps the roll of a straight column near zero (see the next test).
    truth = rotation_about(np.zeros(3), (3.0, -2.0, 0.5), np.array([4.0, -3.0, 2.0]))
    mr = oblique_mr(phantom, truth, spacing=mr_spacing)
    ct_points = landmarks_from(phantom.labels)
    mr_points = landmarks_from(phantom.labels, truth.GetInverse())
    result = pipeline.register(
        mr,
        phantom.ct,
        phantom.labels,
        fixed_landmarks=mr_points,
        moving_landmarks=ct_points,
        settings=FAST,
        network=network,
    )
    assert result.prealign_method == "landmarks"
    rng = np.random.default_rng(0)
    centre = np.mean(list(mr_points.values()), axis=0)
    probes = centre + rng.uniform(-10, 10, size=(20, 3))
    expected = np.array([truth.TransformPoint(tuple(p)) for p in probes])
    mapped = np.array([result.transform.TransformPoint(tuple(p)) for p in probes])
    assert np.abs(mapped - expected).max() < 0.5  # mm; the tiny untrained network adds ~nothing

    paths = pipeline.write_outputs(result, tmp_path)
    written = sitk.ReadTransform(str(paths["transform"]))
    reread = np.array([written.TransformPoint(tuple(p)) for p in probes])
    assert np.abs(reread - mapped).max() < 0.5  # the written transform is the one used
    total = sitk.DisplacementFieldTransform(sitk.ReadImage(str(paths["total_displacement"]), sitk.sitkVectorFloat64))
    via_total = np.array([total.TransformPoint(tuple(p)) for p in probes])
    assert np.abs(via_total - mapped).max() < 0.01  # mm: the same map, the field rounded to 1/256 mm when written
    warped = sitk.ReadImage(str(paths["warped_ct"]))
    assert Geometry_equal(warped, mr)
    resampled = sitk.Resample(
        phantom.ct, mr, written, sitk.sitkLinear, float(np.min(sitk.GetArrayViewFromImage(phantom.ct)))
    )
    assert np.abs(sitk.GetArrayFromImage(resampled) - sitk.GetArrayFromImage(warped)).max() < 1e-2


def test_inverse_transform_undoes_the_forward_map_and_is_written(phantom, network, tmp_path):
    truth = rotation_about(np.zeros(3), (3.0, -2.0, 0.5), np.array([4.0, -3.0, 2.0]))
    mr = oblique_mr(phantom, truth)
    first = pipeline.register(mr, phantom.ct, phantom.labels, settings=FAST, network=network)
    # A smooth velocity of about 2 voxels stands in for a real deformation.
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn((1, 3, 3, 3, 3), generator=generator) * 2.0
    velocity = torch.nn.functional.interpolate(coarse, size=first.velocity.shape[2:], mode="trilinear")
    result = pipeline.register(
        mr, phantom.ct, phantom.labels, settings=FAST, network=network, initial_velocity=velocity
    )
    forward, inverse = result.transform, result.inverse_transform()
    centre = np.mean(list(landmarks_from(phantom.labels).values()), axis=0)
    ct_points = centre + np.random.default_rng(1).uniform(-8, 8, size=(40, 3))
    mr_points = np.array([inverse.TransformPoint(tuple(p)) for p in ct_points])
    back = np.array([forward.TransformPoint(tuple(p)) for p in mr_points])
    rigid_only = np.array(
        [result.transform.GetNthTransform(0).GetInverse().TransformPoint(tuple(p)) for p in ct_points]
    )
    assert np.linalg.norm(mr_points - rigid_only, axis=1).max() > 1.0  # the deformable part is not trivial
    assert np.linalg.norm(back - ct_points, axis=1).mean() < 0.05  # mm
    assert np.linalg.norm(back - ct_points, axis=1).max() < 0.2
    written = sitk.ReadTransform(str(pipeline.write_outputs(result, tmp_path)["inverse_transform"]))
    reread = np.array([written.TransformPoint(tuple(p)) for p in ct_points])
    assert np.abs(reread - mr_points).max() < 1e-6
    assert result.inverse_displacement() is result.inverse_displacement()  # computed on first use, then kept


def test_centre_point_fit_does_not_roll_a_straight_column_on_landmark_noise():
    """Three centres of a nearly straight column, tilted by (3, -2, 0) degrees and clicked with 1 mm of error: the
    plain least-squares fit turns about the spine by 16 degrees (median of 20 draws; up to 80), the fit with the
    orientation prior by under 3 degrees, and both find the tilt within 2 degrees."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    tilt = Rotation.from_rotvec(np.radians([3.0, -2.0, 0.0]))
    errors: dict[float, list[np.ndarray]] = {0.0: [], ROTATION_PRIOR_RADIUS_MM: []}
    for _ in range(20):
        centres = np.array([[0.0, 0.0, 32.0 * k] for k in range(3)]) + rng.normal(0.0, 1.0, (3, 3))
        clicked = tilt.apply(centres) + np.array([4.0, -3.0, 2.0]) + rng.uniform(-1.0, 1.0, (3, 3))
        for radius, out in errors.items():
            fitted = Rotation.from_matrix(rigid_from_points(centres, clicked, radius)[:3, :3])
            out.append(np.degrees(np.abs((fitted * tilt.inv()).as_rotvec())))
    plain, prior = np.array(errors[0.0]), np.array(errors[ROTATION_PRIOR_RADIUS_MM])
    assert np.median(plain[:, 2]) > 5.0
    assert prior[:, 2].max() < 3.0
    assert prior[:, :2].max() < 2.0


def Geometry_equal(a: sitk.Image, b: sitk.Image) -> bool:  # noqa: N802 - reads as a predicate in asserts
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetOrigin(), b.GetOrigin())
        and np.allclose(a.GetDirection(), b.GetDirection())
    )


def test_result_reports_rigidity_per_vertebra_and_dice_with_mr_labels(phantom, network):
    mr = oblique_mr(phantom, sitk.Euler3DTransform())
    mr_labels = sitk.Resample(phantom.labels, mr, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    result = pipeline.register(mr, phantom.ct, phantom.labels, fixed_labels=mr_labels, settings=FAST, network=network)
    values = sorted(label_centroids(phantom.labels))
    assert [row["label"] for row in result.vertebrae] == values
    for row in result.vertebrae:
        assert row["rigid_dice"] > 0.95 and row["dice"] > 0.7 and "name" in row
    assert set(result.vertebra_rigid_transforms) == set(values)
    for matrix in result.vertebra_rigid_transforms.values():
        assert np.allclose(matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3), atol=1e-6)
    assert result.summary["folding_voxels"] == 0
    assert {"bias_field", "prealign", "preprocess", "network", "refinement", "total"} <= set(result.timings)


def test_the_summary_says_in_which_arithmetic_the_networks_ran(phantom, network, monkeypatch):
    """``network_precision`` reaches the network stage: float32 is the float32 velocity, bfloat16 differs from it
    (here forced on any CPU; "auto" picks it only on a CPU with bfloat16 units) and is recorded as such."""
    monkeypatch.setattr(inference, "native_bfloat16", lambda device: True)
    mr = oblique_mr(phantom, sitk.Euler3DTransform())
    runs = {
        precision: pipeline.register(
            mr, phantom.ct, phantom.labels, settings=replace(FAST, network_precision=precision), network=network
        )
        for precision in ("float32", "auto")
    }
    assert runs["float32"].summary["network_arithmetic"] == "float32"
    assert runs["auto"].summary["network_arithmetic"] == "bfloat16"
    assert runs["auto"].velocity.dtype == torch.float32
    assert not torch.equal(runs["auto"].velocity, runs["float32"].velocity)


@pytest.mark.parametrize("correct", [True, False])
def test_the_stages_read_the_mr_without_its_bias_field_and_the_result_keeps_the_mr_as_given(
    phantom, network, monkeypatch, correct
):
    """``bias_correction``: the pre-alignment and the processing grid get the corrected MR; the result (outputs, QA
    picture) keeps the user's MR; off, the MR is read as it is."""
    mr = oblique_mr(phantom, sitk.Euler3DTransform())
    before = sitk.GetArrayFromImage(mr).copy()
    corrected, read = [], []
    real_correct, real_prealign = pipeline.correct_bias_field, pipeline.prealign_stage
    monkeypatch.setattr(
        pipeline, "correct_bias_field", lambda image: corrected.append(real_correct(image)) or corrected[-1]
    )
    monkeypatch.setattr(pipeline, "prealign_stage", lambda image, *a: read.append(image) or real_prealign(image, *a))
    settings = replace(FAST, bias_correction=correct)
    result = pipeline.register(mr, phantom.ct, phantom.labels, settings=settings, network=network)
    assert len(corrected) == int(correct)
    assert len(read) == 1 and read[0] is (corrected[0] if correct else mr)
    assert result.fixed is mr and np.array_equal(sitk.GetArrayFromImage(mr), before)


def test_vertebrae_the_mr_does_not_show_are_reported_and_named(phantom, network, caplog):
    """An MR covering fewer levels than the CT: each vertebra's share inside the MR's view is in its row, those
    mostly outside are named in a warning and in the summary; the registration itself runs on what overlaps."""
    mr = oblique_mr(phantom, sitk.Euler3DTransform())
    size = list(mr.GetSize())
    keep = size[2] * 5 // 8
    mr = sitk.RegionOfInterest(mr, [size[0], size[1], keep], [0, 0, 0])
    settings = pipeline.RegistrationSettings(
        device="cpu", refine_steps=0, margin_mm=8.0, vertebra_rigid=VertebraRigidSettings(steps=2)
    )
    with caplog.at_level("WARNING", logger="SpineRigidRegLib.pipeline"):
        result = pipeline.register(mr, phantom.ct, phantom.labels, settings=settings, network=network)
    coverage = {row["name"]: row["mr_coverage_percent"] for row in result.vertebrae}
    assert max(coverage.values()) == 100.0 and min(coverage.values()) < 50.0, coverage
    outside = [name for name, share in coverage.items() if share < pipeline.MR_COVERAGE_WARN_PERCENT]
    assert result.summary["vertebrae_outside_mr"] == outside
    assert all(
        any(name in r.getMessage() and "field of view" in r.getMessage() for r in caplog.records) for name in outside
    )


def test_refinement_steps_change_the_field_and_honour_point_pairs(phantom, network):
    mr = oblique_mr(phantom, sitk.Euler3DTransform())
    ct_point = np.mean(list(landmarks_from(phantom.labels).values()), axis=0)
    mr_point = ct_point + np.array([0.0, 0.0, 0.0])
    target_ct = ct_point + np.array([0.0, 2.0, 0.0])  # user says: this MR point shows that CT point
    settings = pipeline.RegistrationSettings(device="cpu", refine_steps=15, margin_mm=8.0)
    result = pipeline.register(
        mr, phantom.ct, phantom.labels, settings=settings, network=network, point_pairs=[(target_ct, mr_point)]
    )
    before = np.asarray(
        pipeline.register(mr, phantom.ct, phantom.labels, settings=FAST, network=network).transform.TransformPoint(
            tuple(mr_point)
        )
    )
    after = np.asarray(result.transform.TransformPoint(tuple(mr_point)))
    assert np.linalg.norm(after - target_ct) < np.linalg.norm(before - target_ct)


def test_point_pairs_on_a_vertebra_move_it_rigidly_on_a_re_run_without_dense_refinement(phantom, network):
    """The manual correction: point pairs on one vertebra, re-run from the previous result with no dense step. The
    vertebra-wise stage runs again with the pairs: that vertebra follows them (4 mm, more than its optimiser's steps
    travel) and stays rigid; the others are not fitted again and stay exactly where they were."""
    mr = oblique_mr(phantom, sitk.Euler3DTransform())
    settings = pipeline.RegistrationSettings(device="cpu", refine_steps=0, margin_mm=8.0)
    velocity = torch.zeros_like(
        pipeline.register(mr, phantom.ct, phantom.labels, settings=FAST, network=network).velocity
    )
    first = pipeline.register(  # the pre-alignment alone: a rigid map to correct
        mr, phantom.ct, phantom.labels, settings=settings, network=network, initial_velocity=velocity
    )
    centres = label_centroids(phantom.labels)
    chosen = sorted(centres)[1]
    shift = np.array([0.0, 4.0, 0.0])  # mm: the user says the vertebra lies 4 mm further along -y in the MR
    offsets = [np.array(o, dtype=float) for o in ((0, 0, 0), (6, 0, 0), (0, -6, 0), (0, 0, 4))]  # inside it
    mr_points = [np.asarray(centres[chosen]) - shift + o for o in offsets]
    pairs = [(np.asarray(first.transform.TransformPoint(tuple(p))) + shift, p) for p in mr_points]
    second = pipeline.register(
        mr, phantom.ct, phantom.labels, settings=settings, network=network, initial_velocity=velocity, point_pairs=pairs
    )
    errors = [np.linalg.norm(np.asarray(second.transform.TransformPoint(tuple(p))) - ct) for ct, p in pairs]
    assert max(errors) < 0.5, errors  # mm, of a 4 mm correction
    rows = {row["label"]: row for row in second.vertebrae}
    assert rows[chosen]["rigid_dice"] > 0.98
    for value, centre in centres.items():
        if value != chosen:
            moved = np.asarray(second.transform.TransformPoint(tuple(centre))) - first.transform.TransformPoint(
                tuple(centre)
            )
            assert np.linalg.norm(moved) < 0.01, (value, moved)  # mm (re-fitted as well, they moved up to 0.7)


def test_a_correction_reuses_the_map_of_the_result_it_corrects_and_ends_as_without_it(phantom, network, monkeypatch):
    """A re-run from a previous result's velocity starts from that result's map, integrated by its run: the same
    correction after :func:`pipeline.forget_kept_work` integrates it again and ends bit for bit the same."""
    mr = oblique_mr(phantom, sitk.Euler3DTransform())
    settings = pipeline.RegistrationSettings(device="cpu", refine_steps=0, margin_mm=8.0)
    first = pipeline.register(mr, phantom.ct, phantom.labels, settings=settings, network=network)
    centre = np.asarray(label_centroids(phantom.labels)[sorted(label_centroids(phantom.labels))[1]])
    pairs = [(np.asarray(first.transform.TransformPoint(tuple(centre))) + [0.0, 1.0, 0.0], centre)]
    first.inverse_transform()  # the module shows the inverse too: it must not push out the map
    integrated = []
    real = polyrigid.map_of_velocity
    monkeypatch.setattr(
        polyrigid, "map_of_velocity", lambda v, n: integrated.append(warp_module._KEPT_MAPS[:]) or real(v, n)
    )
    run = dict(settings=settings, network=network, initial_velocity=first.velocity, point_pairs=pairs)
    kept = pipeline.register(mr, phantom.ct, phantom.labels, **run)
    assert any(torch.equal(v, first.velocity) for _, v, _ in integrated[0])  # the start's map was there to reuse
    pipeline.forget_kept_work()
    again = pipeline.register(mr, phantom.ct, phantom.labels, **run)
    assert torch.equal(kept.velocity, again.velocity)


def test_forget_kept_work_empties_every_cache_a_run_keeps():
    """What a benchmark calls before timing a first registration: the MR's segmentation and bias correction and the
    kept maps all go."""
    from SpineRigidRegLib import bias_field
    from SpineRigidRegLib.segmentation import stage

    stage._PREDICTIONS["mr"] = (None, sitk.Image(2, 2, 2, sitk.sitkUInt8))
    bias_field._CORRECTED["mr"] = sitk.Image(2, 2, 2, sitk.sitkFloat32)
    warp_module.displacement_from_velocity(torch.zeros(1, 3, 4, 4, 4), 3, (4, 4, 4))
    assert stage._PREDICTIONS and bias_field._CORRECTED and warp_module._KEPT_MAPS
    pipeline.forget_kept_work()
    assert not stage._PREDICTIONS and not bias_field._CORRECTED and not warp_module._KEPT_MAPS


def test_progress_is_monotonic_and_cancel_raises(phantom, network):
    mr = oblique_mr(phantom, sitk.Euler3DTransform())
    fractions = []
    pipeline.register(
        mr, phantom.ct, phantom.labels, settings=FAST, network=network, progress=lambda f, m: fractions.append(f)
    )
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    calls = iter(range(100))
    with pytest.raises(CancelledError):
        pipeline.register(
            mr, phantom.ct, phantom.labels, settings=FAST, network=network, should_cancel=lambda: next(calls) >= 2
        )


def _with(image: sitk.Image, array: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


@pytest.mark.parametrize(
    "case, message",
    [
        ("2d", "3D"),
        ("4d", "3D"),
        ("nan", "no finite value"),
        ("empty", "empty"),
        ("single", "single vertebra"),
        ("fractional", "integer"),
        ("disjoint_labels", "overlap"),
    ],
)
def test_bad_inputs_are_refused_with_a_reason(phantom, network, case, message):
    ct, labels = phantom.ct, phantom.labels
    mr = oblique_mr(phantom, sitk.Euler3DTransform())
    lab = sitk.GetArrayFromImage(labels)
    if case == "2d":
        mr = mr[:, :, 3]
    elif case == "4d":
        mr = sitk.JoinSeries([mr, mr])
    elif case == "nan":
        arr = sitk.GetArrayFromImage(ct).astype(np.float32)
        arr[:] = np.nan  # a few NaN are replaced with a warning (test_cli_bad_input); none finite is refused
        ct = _with(ct, arr)
    elif case == "empty":
        labels = _with(labels, np.zeros_like(lab))
    elif case == "single":
        labels = _with(labels, (lab == lab.max()).astype(lab.dtype) * lab.max())
    elif case == "fractional":
        labels = _with(labels, lab.astype(np.float32) * 0.5)
    elif case == "disjoint_labels":
        labels = sitk.Image(labels)
        labels.SetOrigin(tuple(o + 1000.0 for o in labels.GetOrigin()))
    with pytest.raises(InputError, match=message):
        pipeline.register(mr, ct, labels, settings=FAST, network=network)


def test_labels_on_another_overlapping_grid_are_resampled_by_position(phantom, network):
    coarse = sitk.Resample(
        phantom.labels,
        [s // 2 for s in phantom.labels.GetSize()],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        phantom.labels.GetOrigin(),
        [s * 2 for s in phantom.labels.GetSpacing()],
        phantom.labels.GetDirection(),
        0,
    )
    mr = oblique_mr(phantom, sitk.Euler3DTransform())
    result = pipeline.register(mr, phantom.ct, coarse, settings=FAST, network=network)
    assert len(result.vertebrae) == len(label_centroids(phantom.labels))


def test_unmatched_landmarks_and_non_overlapping_images_are_refused(phantom, network):
    mr = oblique_mr(phantom, sitk.Euler3DTransform())
    ct_points = landmarks_from(phantom.labels)
    mr_points = dict(ct_points)
    mr_points["XX"] = np.zeros(3)
    with pytest.raises(InputError, match="do not match"):
        pipeline.register(
            mr,
            phantom.ct,
            phantom.labels,
            fixed_landmarks=mr_points,
            moving_landmarks=ct_points,
            settings=FAST,
            network=network,
        )
    far = {k: v + 500.0 for k, v in ct_points.items()}
    with pytest.raises(InputError, match="overlap"):
        pipeline.register(
            mr,
            phantom.ct,
            phantom.labels,
            fixed_landmarks=far,
            moving_landmarks=ct_points,
            settings=FAST,
            network=network,
        )


def test_inputs_are_not_modified(phantom, network):
    mr = oblique_mr(phantom, sitk.Euler3DTransform())
    before = [sitk.GetArrayFromImage(i).copy() for i in (mr, phantom.ct, phantom.labels)]
    geometry = [(i.GetOrigin(), i.GetSpacing(), i.GetDirection()) for i in (mr, phantom.ct, phantom.labels)]
    pipeline.register(mr, phantom.ct, phantom.labels, settings=FAST, network=network)
    for image, array, geo in zip((mr, phantom.ct, phantom.labels), before, geometry):
        assert np.array_equal(sitk.GetArrayFromImage(image), array)
        assert (image.GetOrigin(), image.GetSpacing(), image.GetDirection()) == geo


def test_mr_vertebrae_are_predicted_written_and_checked_per_vertebra(phantom, network, tmp_path):
    """The segmentation stage: an output on the MR's grid and the per-vertebra 'on MR bone' check; off on request."""
    mr = sitk.Cast(phantom.ct, sitk.sitkFloat32)
    result = pipeline.register(mr, phantom.ct, phantom.labels, settings=FAST, network=network)
    assert result.mr_vertebrae is not None
    assert result.mr_vertebrae.GetSize() == mr.GetSize() and result.mr_vertebrae.GetOrigin() == mr.GetOrigin()
    assert all(0.0 <= row["mr_bone_percent"] <= 100.0 for row in result.vertebrae)
    assert "mr_vertebrae" in pipeline.write_outputs(result, tmp_path / "on")
    assert (tmp_path / "on" / "mr_vertebrae_predicted.nii.gz").is_file()
    off = replace(FAST, mr_segmentation=False)
    result = pipeline.register(mr, phantom.ct, phantom.labels, settings=off, network=network)
    assert result.mr_vertebrae is None and "mr_bone_percent" not in result.vertebrae[0]
    pipeline.write_outputs(result, tmp_path / "off")
    assert not (tmp_path / "off" / "mr_vertebrae_predicted.nii.gz").exists()


class _Spy(RegistrationNet):
    """A label-guided network that records the bone input it was given."""

    def velocity(self, fixed, moving, moving_labels=None, fixed_bone=None):
        self.seen_bone = fixed_bone
        self.seen_labels = moving_labels
        return super().velocity(fixed, moving, moving_labels, fixed_bone)


def test_a_label_guided_network_gets_the_predicted_mr_bone_on_its_grid(phantom, monkeypatch):
    """The predicted bone reaches the network resampled onto the processing grid, also with the MR segmentation
    output turned off; without a segmentation model it gets an empty input (the one it was trained to ignore)."""
    mr = sitk.Cast(phantom.ct, sitk.sitkFloat32)
    known = sitk.Cast(phantom.labels > 0, sitk.sitkFloat32)
    monkeypatch.setattr(pipeline, "predict_mr_bone", lambda fixed, device, precision: known)
    torch.manual_seed(0)
    spy = _Spy(replace(TINY, use_fixed_bone=True)).eval()
    off = replace(FAST, mr_segmentation=False)
    result = pipeline.register(mr, phantom.ct, phantom.labels, settings=off, network=spy)
    assert result.mr_vertebrae is None  # the output stays off; the network still gets its input
    assert spy.seen_bone.shape == spy.seen_labels.shape
    # The MR here is the CT itself, pre-aligned by the identity: the bone input lies on the CT vertebrae.
    bone, vertebrae = spy.seen_bone > 0.5, spy.seen_labels > 0
    assert 2 * float((bone & vertebrae).sum()) / float(bone.sum() + vertebrae.sum()) > 0.95
    monkeypatch.setattr(pipeline, "predict_mr_bone", lambda fixed, device, precision: None)
    pipeline.register(mr, phantom.ct, phantom.labels, settings=off, network=spy)
    assert float(spy.seen_bone.abs().max()) == 0.0


def test_a_ct_with_much_air_around_the_spine_gives_the_same_result_as_the_spine_alone(phantom, network):
    truth = rotation_about(np.zeros(3), (2.0, 0.0, -3.0), np.array([1.0, -2.0, 0.5]))
    mr = oblique_mr(phantom, truth)
    air = float(sitk.GetArrayViewFromImage(phantom.ct).min())
    wide = sitk.ConstantPad(phantom.ct, (100, 100, 0), (100, 100, 0), air)
    wide_labels = sitk.ConstantPad(phantom.labels, (100, 100, 0), (100, 100, 0), 0)
    points = {
        "fixed_landmarks": landmarks_from(phantom.labels, truth.GetInverse()),
        "moving_landmarks": landmarks_from(phantom.labels),
    }
    alone = pipeline.register(mr, phantom.ct, phantom.labels, settings=FAST, network=network, **points)
    padded = pipeline.register(mr, wide, wide_labels, settings=FAST, network=network, **points)
    assert padded.grid == alone.grid
    difference = sitk.GetArrayViewFromImage(padded.displacement) - sitk.GetArrayViewFromImage(alone.displacement)
    assert np.abs(difference).max() < 1e-4
    bone = sitk.GetArrayViewFromImage(alone.warped_labels)
    assert np.array_equal(sitk.GetArrayViewFromImage(padded.warped_labels), bone) and bone.any()
    warped = (sitk.GetArrayViewFromImage(r.warped_moving)[bone > 0] for r in (padded, alone))
    assert np.allclose(*warped, atol=1e-3)

"""The MR vertebra segmentation: canonical grid, label maps, synthesis, network, inference, training, alignment."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SpineRigidRegLib.data.phantom import make_phantom
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.geometry import Geometry
from SpineRigidRegLib.segmentation import align, labelmaps, stage
from SpineRigidRegLib.segmentation.grid import canonical_geometry, to_canonical
from SpineRigidRegLib.segmentation.net import SegmentationConfig, SegmentationNet
from SpineRigidRegLib.segmentation.predict import (
    bundled_card,
    dice,
    load_bundled_segmentation,
    load_segmentation_network,
    predict_bone,
    save_segmentation_checkpoint,
)
from SpineRigidRegLib.segmentation.stage import add_mr_bone_agreement
from SpineRigidRegLib.segmentation.synth import SynthSettings, synthesize_batch
from SpineRigidRegLib.segmentation.train import SegTrainSettings, train_segmentation

TINY_NET = SegmentationConfig(channels=(4, 8))


def _oblique_geometry(shape=(20, 30, 40), spacing=(0.8, 1.1, 3.0), degrees=25.0, mirrored=False) -> Geometry:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    if mirrored:
        direction[:, 2] *= -1
    return Geometry(shape=shape, spacing=spacing, origin=(-10.0, 20.0, 5.0), direction=tuple(direction.ravel()))


@pytest.mark.parametrize("mirrored", [False, True])
def test_canonical_grid_is_patient_aligned_and_covers_the_whole_field_of_view(mirrored):
    geometry = _oblique_geometry(mirrored=mirrored)
    canonical = canonical_geometry(geometry, 2.0)
    assert np.allclose(canonical.direction_matrix, np.eye(3))
    assert canonical.spacing == (2.0, 2.0, 2.0)
    index = canonical.lps_to_array_index(geometry.corners_lps())
    assert np.all(index >= -1e-6) and np.all(index <= np.asarray(canonical.shape) - 1 + 1e-6)


def test_resampling_to_the_canonical_grid_keeps_a_blob_where_it_is_in_the_patient():
    geometry = _oblique_geometry(shape=(30, 40, 40), spacing=(1.0, 1.0, 1.5))
    array = np.zeros(geometry.shape, np.float32)
    array[10:16, 12:20, 25:31] = 1.0
    image = geometry.apply_to(sitk.GetImageFromArray(array))
    centre = geometry.array_index_to_lps_points(np.argwhere(array > 0).mean(axis=0)[None].astype(float))[0]
    canonical = to_canonical(image, 1.0)
    out = sitk.GetArrayFromImage(canonical)
    weights = out / out.sum()
    index = (np.argwhere(np.ones_like(out, bool)) * weights.reshape(-1, 1)).sum(axis=0)
    found = Geometry.of(canonical).array_index_to_lps_points(index[None])[0]
    assert np.linalg.norm(found - centre) < 0.5


def test_phantom_label_map_marks_vertebral_bone_and_uses_the_shared_ids():
    label_map = labelmaps.from_phantom(seed=3, spacing_mm=3.0)
    ids = torch.unique(label_map.labels)
    assert int(ids.max()) < labelmaps.NUM_LABEL_IDS and int(ids.min()) >= 0
    assert {labelmaps.MARROW, labelmaps.CORTEX, labelmaps.DISC} <= {int(v) for v in ids}
    assert label_map.bone.sum() > 0 and not label_map.bone.all()


def test_real_ct_label_map_has_a_cortex_shell_around_marrow_and_discs_between_vertebrae(shared_data):
    folder = shared_data / "totalsegmentator-examples"
    label_map = labelmaps.from_totalsegmentator_ct(
        sitk.ReadImage(str(folder / "example_ct.nii.gz")), sitk.ReadImage(str(folder / "example_seg.nii.gz"))
    )
    labels = label_map.labels
    assert (labels == labelmaps.MARROW).sum() > (labels == labelmaps.CORTEX).sum() > 0
    assert (labels == labelmaps.DISC).sum() > 0
    # every cortex voxel touches something that is not bone; no marrow voxel does (away from the cut end slices)
    bone = label_map.bone.float()[None, None]
    touches = (-torch.nn.functional.max_pool3d(-torch.nn.functional.pad(bone, [1] * 6, value=1.0), 3, 1))[0, 0] < 0.5
    inner = slice(1, labels.shape[0] - 1)
    assert bool(touches[inner][labels[inner] == labelmaps.CORTEX].all())
    assert not bool(touches[inner][labels[inner] == labelmaps.MARROW].any())


def test_an_untransformed_patch_is_the_label_maps_box_with_its_bone_as_target():
    """With every spatial augmentation off, the patch must be the label map's box around the chosen bone voxel:
    catches axis-order and (x, y, z) mix-ups in the sampling grid."""
    labels = torch.zeros((40, 36, 32), dtype=torch.int64)
    labels[18:22, 10:14, 8:11] = labelmaps.MARROW  # one asymmetric bone block
    labels[5:8, 20:30, 20:22] = labelmaps.FAT
    label_map = labelmaps.LabelMap(labels, "block")
    settings = SynthSettings(
        patch=(16, 16, 16),
        rotation_deg=0.0,
        scale=(1.0, 1.0),
        elastic_mm=0.0,
        mirror_probability=0.0,
        spine_centre_probability=1.0,
        fov_cut_probability=0.0,
        box_probability=0.0,
    )
    images, targets = synthesize_batch([label_map], 3, settings, torch.Generator().manual_seed(0))
    assert images.shape == targets.shape == (3, 1, 16, 16, 16)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    for target in targets:
        box = torch.nonzero(target[0]).amax(0) - torch.nonzero(target[0]).amin(0) + 1
        assert box.tolist() == [4, 4, 3]  # the block's extent, in array order


def test_synthesis_is_reproducible_from_its_seed():
    maps = [labelmaps.from_phantom(seed=1, spacing_mm=3.0)]
    settings = SynthSettings(patch=(16, 16, 16), spacing_mm=3.0)
    a = synthesize_batch(maps, 2, settings, torch.Generator().manual_seed(5))
    b = synthesize_batch(maps, 2, settings, torch.Generator().manual_seed(5))
    c = synthesize_batch(maps, 2, settings, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_network_keeps_the_input_shape_and_refuses_sizes_it_cannot_halve():
    network = SegmentationNet(SegmentationConfig(channels=(4, 8, 8)))
    assert network(torch.rand(1, 1, 8, 12, 16)).shape == (1, 1, 8, 12, 16)
    with pytest.raises(InputError, match="divisible by 4"):
        network(torch.rand(1, 1, 8, 10, 16))
    assert SegmentationConfig.from_dict(network.config.to_dict()) == network.config


def test_checkpoint_round_trip_and_its_checks(tmp_path):
    network = SegmentationNet(TINY_NET)
    path = save_segmentation_checkpoint(tmp_path / "seg.pt", network)
    loaded = load_segmentation_network(path)
    for key, value in network.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    with pytest.raises(InputError, match="checksum"):
        load_segmentation_network(path, expected_sha256="0" * 64)
    from SpineRigidRegLib.checkpoint import load_network

    with pytest.raises(InputError, match="expected 'spinerigidreg-checkpoint'"):
        load_network(path)  # a segmentation file is not a registration model


def test_prediction_lies_on_the_mrs_own_grid_and_is_zero_outside_its_data():
    geometry = _oblique_geometry(shape=(12, 30, 30), spacing=(1.0, 1.2, 4.0))
    mr = geometry.apply_to(sitk.GetImageFromArray(np.random.default_rng(0).random(geometry.shape).astype(np.float32)))
    probability = predict_bone(mr, SegmentationNet(TINY_NET).eval())
    assert Geometry.of(probability) == geometry
    values = sitk.GetArrayFromImage(probability)
    assert values.min() >= 0.0 and values.max() <= 1.0


def test_the_same_mr_is_segmented_once_and_each_caller_gets_its_own_copy(monkeypatch):
    calls = []

    def predict(image, network, device, precision="float32"):
        calls.append(1)
        return sitk.Image(image.GetSize(), sitk.sitkFloat32) + float(len(calls))

    monkeypatch.setattr(stage, "predict_bone", predict)
    monkeypatch.setattr(stage, "_bundled", lambda device: "net")
    monkeypatch.setattr(stage, "bundled_card", lambda: {})
    monkeypatch.setattr(stage, "_PREDICTIONS", type(stage._PREDICTIONS)())
    mr = sitk.Image([8, 9, 10], sitk.sitkFloat32)
    first = stage.predict_mr_bone(mr)
    first[0, 0, 0] = 99.0  # a caller changing its copy
    again = stage.predict_mr_bone(sitk.Image(mr))
    assert len(calls) == 1 and again[0, 0, 0] == 1.0
    moved = sitk.Image(mr)
    moved.SetOrigin((0.0, 0.0, 1.0))  # same voxels elsewhere: another MR
    stage.predict_mr_bone(moved)
    assert len(calls) == 2
    stage.forget_predictions()  # what the benchmarks do before timing a first registration
    stage.predict_mr_bone(mr)
    assert len(calls) == 3
    monkeypatch.setattr(stage, "uses_bfloat16", lambda device, precision: precision == "auto")
    stage.predict_mr_bone(mr, precision="auto")  # another arithmetic: not the float32 prediction
    assert len(calls) == 4


def test_bundled_model_finds_the_vertebrae_of_the_real_mr_it_never_saw(shared_data):
    """The measured figure (docs/BENCHMARKS.md, the model card) with a margin: a broken loader, a wrong grid or
    a wrong normalisation drops it to ~0."""
    card = bundled_card()
    assert card is not None, "Resources/Models/mr_vertebrae.json is missing"
    folder = shared_data / "totalsegmentator-examples"
    mr = sitk.ReadImage(str(folder / "example_mr_sm.nii.gz"))
    truth = sitk.Cast(sitk.ReadImage(str(folder / "example_seg_mr.nii.gz")) == 19, sitk.sitkUInt8)
    score = dice(predict_bone(mr, load_bundled_segmentation()), truth)
    assert score >= 0.6
    assert abs(score - float(card["evaluation"]["real_mr_dice"])) < 0.02


def test_training_resumes_where_it_stopped_and_records_its_curve(tmp_path):
    maps = [labelmaps.from_phantom(seed=2, spacing_mm=4.0)]
    synth = SynthSettings(patch=(16, 16, 16), spacing_mm=4.0)
    settings = SegTrainSettings(steps=2, batch=1, eval_every=1, validation_images=1, network=TINY_NET, synth=synth)
    train_segmentation(tmp_path, settings, label_maps=maps)
    first = torch.load(tmp_path / "last.pt", weights_only=True)
    figures = train_segmentation(tmp_path, replace(settings, steps=4), label_maps=maps)
    second = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (first["step"], second["step"], figures["step"]) == (2, 4, 4)
    assert second["optimiser"]["state"], "the optimiser state must be saved for the next call"
    rows = (tmp_path / "curve.csv").read_text(encoding="utf-8").strip().splitlines()
    assert rows[0].startswith("step,") and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


def test_export_writes_weights_and_a_card_whose_sha256_matches(tmp_path):
    from SpineRigidRegLib.checkpoint import sha256_of
    from SpineRigidRegLib.cli.train_segmentation import main

    save_segmentation_checkpoint(tmp_path / "run" / "last.pt", SegmentationNet(TINY_NET), step=7, optimiser={})
    assert main(["--export", str(tmp_path / "run"), "--to", str(tmp_path / "model")]) == 0
    card = json.loads((tmp_path / "model" / "mr_vertebrae.json").read_text(encoding="utf-8"))
    assert card["sha256"] == sha256_of(tmp_path / "model" / card["weights"])
    assert card["training"]["steps"] == 7
    load_segmentation_network(tmp_path / "model" / card["weights"], expected_sha256=card["sha256"])


def _moved_phantom(shift_mm, degrees):
    phantom = make_phantom(num_vertebrae=3, shape=(72, 56, 56), spacing=2.0, seed=4)
    rotation = sitk.Euler3DTransform()
    centre = np.asarray(phantom.ct.TransformContinuousIndexToPhysicalPoint([27.5, 27.5, 35.5]))
    rotation.SetCenter(tuple(centre))
    rotation.SetRotation(np.radians(degrees), 0.0, 0.0)
    rotation.SetTranslation(tuple(float(v) for v in shift_mm))
    # the MR's bone: the CT's labels seen through the known map (MR point -> CT point)
    mr_bone = sitk.Resample(phantom.labels > 0, phantom.ct, rotation, sitk.sitkNearestNeighbor, 0)
    return phantom, mr_bone, rotation


def test_bone_guided_prealignment_recovers_a_known_rigid_motion():
    phantom, mr_bone, truth = _moved_phantom([9.0, -6.0, 14.0], 4.0)
    pre = align.bone_prealignment(phantom.ct, sitk.Cast(mr_bone, sitk.sitkFloat32), phantom.labels)
    assert pre is not None and pre.method == align.BONE_GUIDED
    points = np.argwhere(sitk.GetArrayFromImage(mr_bone) > 0)[::50][:, ::-1].astype(float)
    mr_points = np.array([phantom.ct.TransformContinuousIndexToPhysicalPoint(p) for p in points])
    expected = np.array([truth.TransformPoint(tuple(p)) for p in mr_points])
    assert np.abs(pre.map_points(mr_points) - expected).max() < 2.0


def test_bone_guided_prealignment_refuses_an_mr_without_visible_bone():
    phantom, mr_bone, _ = _moved_phantom([0.0, 0.0, 0.0], 0.0)
    empty = sitk.Cast(mr_bone * 0, sitk.sitkFloat32)
    assert align.bone_prealignment(phantom.ct, empty, phantom.labels) is None


def test_mr_bone_agreement_is_the_share_of_each_vertebra_on_predicted_bone():
    warped = torch.zeros((1, 1, 4, 4, 4), dtype=torch.int64)
    warped[..., :2, :, :] = 1
    warped[..., 2:, :, :] = 2
    bone = torch.zeros_like(warped, dtype=torch.bool)
    bone[..., 0, :, :] = True  # half of vertebra 1, none of vertebra 2
    rows = [{"label": 1}, {"label": 2}, {"label": 3}]
    add_mr_bone_agreement(rows, warped, bone)
    assert [r["mr_bone_percent"] for r in rows] == [50.0, 0.0, 0.0]


def test_bone_guided_prealignment_refuses_when_the_network_found_one_vertebra_of_three():
    """One found vertebra fits any CT level equally well: the map must be refused, not guessed."""
    phantom, mr_bone, _ = _moved_phantom([0.0, 0.0, 0.0], 0.0)
    labels = sitk.GetArrayFromImage(phantom.labels)
    one = (labels == np.unique(labels[labels > 0])[1]).astype(np.float32)
    probability = sitk.GetImageFromArray(one)
    probability.CopyInformation(phantom.ct)
    assert align.bone_prealignment(phantom.ct, probability, phantom.labels) is None


def test_a_wide_field_of_view_is_segmented_on_a_bounded_grid(monkeypatch):
    from SpineRigidRegLib.segmentation import predict

    seen = []
    network = SegmentationNet(TINY_NET).eval()
    monkeypatch.setattr(predict, "MAX_WORKING_VOXELS", 4000)
    monkeypatch.setattr(network, "forward", lambda x: seen.append(x.shape) or torch.zeros_like(x))
    geometry = Geometry(
        shape=(40, 60, 60), spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0), direction=tuple(np.eye(3).ravel())
    )
    mr = geometry.apply_to(sitk.GetImageFromArray(np.ones(geometry.shape, np.float32)))
    probability = predict_bone(mr, network)
    assert np.prod(seen[0][2:]) <= 2 * 4000  # padding to the network's multiple may add a little
    assert Geometry.of(probability) == geometry


def test_too_little_found_bone_is_said_and_measured_inside_the_mrs_view(caplog):
    from SpineRigidRegLib.segmentation.stage import mr_bone_summary

    warped = torch.zeros((1, 1, 4, 4, 10), dtype=torch.int64)
    warped[..., :5] = 1
    inside = torch.ones_like(warped, dtype=torch.bool)
    inside[..., 4:] = False  # only 4 of the vertebra's 5 columns are in the MR's view
    found = torch.zeros_like(inside)
    found[..., :2] = True
    assert mr_bone_summary(warped, found, inside)["mr_bone_found_ratio"] == pytest.approx(0.5)
    assert "found little" not in caplog.text
    found[..., 1] = False
    assert mr_bone_summary(warped, found, inside)["mr_bone_found_ratio"] == pytest.approx(0.25)
    assert "found little vertebral bone" in caplog.text


def test_a_new_run_can_start_from_given_weights(tmp_path):
    maps = [labelmaps.from_phantom(seed=2, spacing_mm=4.0)]
    synth = SynthSettings(patch=(16, 16, 16), spacing_mm=4.0)
    start = SegmentationNet(TINY_NET)
    save_segmentation_checkpoint(tmp_path / "start.pt", start)
    settings = SegTrainSettings(
        steps=1, batch=1, eval_every=1, validation_images=1, network=TINY_NET, synth=synth, learning_rate=0.0
    )
    train_segmentation(tmp_path / "run", settings, label_maps=maps, init_from=tmp_path / "start.pt")
    trained = load_segmentation_network(tmp_path / "run" / "last.pt")
    for key, value in start.state_dict().items():
        assert torch.equal(value, trained.state_dict()[key]), key  # learning rate 0: the given weights, unchanged

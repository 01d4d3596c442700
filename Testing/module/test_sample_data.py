"""The bundled sample case (``Resources/SampleData``, the README demo): files, geometry, labels, landmarks, truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SpineRigidRegLib.checkpoint import resources_dir, save_checkpoint
from SpineRigidRegLib.cli.register import SAMPLE_FILES
from SpineRigidRegLib.data.vertebrae import TOTALSEGMENTATOR, is_vertebra, vertebra_name
from SpineRigidRegLib.geometry import Geometry
from SpineRigidRegLib.io import read_image, read_landmarks
from SpineRigidRegLib.network import NetworkConfig, RegistrationNet

SAMPLE = resources_dir() / "SampleData"
TRUTH = "true_motion.json"


@pytest.fixture(scope="module")
def sample() -> dict:
    keys = ("fixed", "moving", "moving_labels", "fixed_labels")
    images = {key: read_image(SAMPLE / SAMPLE_FILES[key]) for key in keys}
    landmarks = {key: read_landmarks(SAMPLE / SAMPLE_FILES[key]) for key in ("fixed_landmarks", "moving_landmarks")}
    truth = json.loads((SAMPLE / TRUTH).read_text(encoding="utf-8"))
    return {**images, **landmarks, "truth": truth}


def _affine(matrix) -> sitk.AffineTransform:
    m = np.asarray(matrix, dtype=np.float64)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(m[:3, :3].ravel().tolist())
    transform.SetTranslation(m[:3, 3].tolist())
    return transform


def _centroids(labels: sitk.Image) -> dict[int, np.ndarray]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(labels, sitk.sitkUInt16))
    return {int(v): np.asarray(stats.GetCentroid(v)) for v in stats.GetLabels()}


def _values(labels: sitk.Image) -> list[int]:
    return sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v)


def test_files_present_small_and_documented() -> None:
    names = [*SAMPLE_FILES.values(), TRUTH, "PROVENANCE.md", "LICENSE-TotalSegmentator.txt"]
    missing = [n for n in names if not (SAMPLE / n).is_file()]
    assert not missing, f"sample case lacks {missing} (run scripts/make_sample_data.py)"
    total = sum(p.stat().st_size for p in SAMPLE.iterdir() if p.is_file())
    assert total < 3e6, f"sample folder is {total / 1e6:.1f} MB"
    assert "Apache License" in (SAMPLE / "LICENSE-TotalSegmentator.txt").read_text(encoding="utf-8")
    provenance = (SAMPLE / "PROVENANCE.md").read_text(encoding="utf-8")
    for needed in (
        "Apache",
        "example_ct.nii.gz",
        "example_seg.nii.gz",
        "scripts/make_sample_data.py",
        "seed",
        "synthetic",
    ):
        assert needed in provenance, f"PROVENANCE.md does not mention {needed!r}"


def test_geometry(sample) -> None:
    ct, mr = Geometry.of(sample["moving"]), Geometry.of(sample["fixed"])
    assert ct.same_grid(Geometry.of(sample["moving_labels"]))
    assert mr.same_grid(Geometry.of(sample["fixed_labels"]))
    np.testing.assert_allclose(ct.spacing, (3.0, 3.0, 3.0))  # native TotalSegmentator voxels, not resampled
    in_plane, _, thick = sorted(mr.spacing)  # a clinical sagittal 2D series: fine pixels, thick slices
    assert 0.6 <= in_plane <= 0.8 and 3.0 <= thick <= 4.0
    d = mr.direction_matrix
    np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-6)
    assert np.linalg.det(d) == pytest.approx(1.0, abs=1e-6)
    assert np.abs(d).max(axis=0).min() < 0.995, "the MR direction should be oblique"
    # Sagittal: the thick-slice axis runs left-right (LPS x).
    thick = int(np.argmax(mr.spacing))
    assert abs(d[0, thick]) > 0.95
    assert sample["moving"].GetPixelID() == sitk.sitkInt16 and sample["fixed"].GetPixelID() == sitk.sitkInt16
    hu = sitk.GetArrayViewFromImage(sample["moving"])
    assert hu.min() < -500 and hu.max() > 500, "CT values should be HU"


def test_labels_are_integer_vertebrae(sample) -> None:
    for key in ("moving_labels", "fixed_labels"):
        array = sitk.GetArrayViewFromImage(sample[key])
        assert np.issubdtype(array.dtype, np.integer), f"{key} must be an integer image"
    values = _values(sample["moving_labels"])
    assert len(values) >= 3
    assert all(is_vertebra(v, TOTALSEGMENTATOR) for v in values)
    assert _values(sample["fixed_labels"]) == values
    assert sorted(sample["truth"]["vertebrae"], key=int) == [str(v) for v in values]


def test_landmarks_match_labels(sample) -> None:
    values = _values(sample["moving_labels"])
    names = {vertebra_name(v, TOTALSEGMENTATOR): v for v in values}
    ct_points, mr_points = sample["moving_landmarks"], sample["fixed_landmarks"]
    assert set(ct_points) == set(names) == set(mr_points)
    ct_centres, mr_centres = _centroids(sample["moving_labels"]), _centroids(sample["fixed_labels"])
    for name, value in names.items():
        assert np.linalg.norm(ct_points[name] - ct_centres[value]) < 0.5, name
        # The MR landmark is the CT centre moved by the vertebra's true motion ...
        mr_to_ct = np.asarray(sample["truth"]["vertebrae"][str(value)]["mr_to_ct"])
        mapped = mr_to_ct[:3, :3] @ mr_points[name] + mr_to_ct[:3, 3]
        assert np.linalg.norm(mapped - ct_points[name]) < 1e-3, name
        # ... and lies at the MR label's centre (up to the voxelisation and the field-of-view edge).
        assert np.linalg.norm(mr_points[name] - mr_centres[value]) < 2.5, name


def test_mr_labels_are_ct_labels_moved_by_the_stored_motion(sample) -> None:
    truth = sample["truth"]
    mr_labels = sample["fixed_labels"]
    grid = truth["synthesis_grid"]
    region = sitk.Image([int(s) for s in grid["size"]], sitk.sitkUInt8) + 1
    region.SetOrigin(grid["origin"])
    region.SetSpacing(grid["spacing"])
    region.SetDirection(grid["direction"])
    to_ct_frame = _affine(np.linalg.inv(np.asarray(truth["scanner_frame"])))
    known = sitk.GetArrayFromImage(sitk.Resample(region, mr_labels, to_ct_frame, sitk.sitkNearestNeighbor, 0)) > 0
    assert known.mean() > 0.9
    mr = sitk.GetArrayViewFromImage(mr_labels)
    assert not mr[~known].any(), "labels outside the region with ground truth"
    moved_apart = 0
    for value, entry in truth["vertebrae"].items():
        matrix = np.asarray(entry["mr_to_ct"])
        np.testing.assert_allclose(matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3), atol=1e-9)
        moved = sitk.Resample(sample["moving_labels"], mr_labels, _affine(matrix), sitk.sitkNearestNeighbor, 0)
        a = (sitk.GetArrayViewFromImage(moved) == int(value)) & known
        b = mr == int(value)
        dice = 2.0 * (a & b).sum() / (a.sum() + b.sum())
        assert dice >= 0.99, f"vertebra {entry['name']}: DSC {dice:.3f} between the MR labels and the moved CT labels"
        moved_apart += int(not np.allclose(matrix, truth["vertebrae"][str(_values(mr_labels)[0])]["mr_to_ct"]))
    assert moved_apart >= 2, "the vertebrae should move differently (a non-rigid spine motion)"


def test_mr_looks_like_a_clinical_t2_not_flat_classes(sample) -> None:
    """Scaled as acquire_clinical scales (99th percentile 1000); bone darker than the brightest tissue (discs, CSF
    on T2); texture and noise within the bone (the old sample's flat classes had a relative spread of a few %)."""
    mr = sitk.GetArrayViewFromImage(sample["fixed"]).astype(np.float64)
    labels = sitk.GetArrayViewFromImage(sample["fixed_labels"])
    assert mr.min() >= 0 and np.percentile(mr, 99) == pytest.approx(1000, rel=0.05)
    bone = mr[labels > 0]
    assert 0.1 < bone.mean() / np.percentile(mr, 99) < 0.8
    assert bone.std() / bone.mean() > 0.1


@pytest.mark.slow
def test_register_sample_runs_with_any_model(tmp_path) -> None:
    """``srr-register --sample`` (the README's main command) runs end to end, here with a tiny random network."""
    from SpineRigidRegLib.cli.register import main

    torch.manual_seed(0)
    network = RegistrationNet(NetworkConfig(encoder_channels=(4, 4), decoder_channels=(4, 4), final_channels=(4,)))
    model = save_checkpoint(tmp_path / "tiny.pt", network)
    out = tmp_path / "out"
    args = ["--sample", "--model", str(model), "--refine-steps", "0", "--vertebra-steps", "2", "--device", "cpu"]
    args += ["--out", str(out), "--quiet"]
    code = main(args)
    assert code == 0
    assert (out / "qa.png").is_file() and (out / "transform.h5").is_file()
    rows = json.loads((out / "vertebrae.json").read_text(encoding="utf-8"))
    assert rows


def test_automatic_prealignment_finds_the_sample_without_landmarks(sample) -> None:
    """The sample MR sits in its own scanner frame (rotated ~8 degrees, shifted ~25 mm): without landmarks, the
    automatic pre-alignment must still bring every vertebra centre within 3 mm of where the landmarks put it."""
    from SpineRigidRegLib.prealign import AUTOMATIC, prealign

    found = prealign(sample["fixed"], sample["moving"], sample["moving_labels"])
    assert found.method == AUTOMATIC
    # The search samples its metric (the MR has more voxels than MAX_METRIC_SAMPLES): seeded, so repeatable.
    again = prealign(sample["fixed"], sample["moving"], sample["moving_labels"])
    assert np.array_equal(found.matrix, again.matrix)
    for name, point in sample["fixed_landmarks"].items():
        mapped = found.matrix[:3, :3] @ point + found.matrix[:3, 3]
        assert np.linalg.norm(mapped - sample["moving_landmarks"][name]) < 3.0, name

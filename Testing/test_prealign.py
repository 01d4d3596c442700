"""The automatic rigid pre-alignment (`prealign.py`): where it takes image gradients changes its cost, not what it
finds."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest
import SimpleITK as sitk
from SpineRigidRegLib import prealign
from SpineRigidRegLib.data.phantom import make_phantom
from SpineRigidRegLib.geometry import Geometry


def _pair(shift=(2.0, -1.5, 1.0)):
    """The phantom CT (moving) and an MR-like inverted copy seen through a known translation (MR -> CT points)."""
    phantom = make_phantom(num_vertebrae=3, shape=(48, 40, 40), seed=1)
    ct = sitk.Cast(phantom.ct, sitk.sitkFloat32)
    mr = sitk.Resample(sitk.InvertIntensity(ct, maximum=1500.0), ct, sitk.TranslationTransform(3, shift))
    return mr, ct, phantom.labels


def test_the_metric_value_is_the_same_without_gradient_filters(monkeypatch):
    mr, ct, labels = _pair()
    mask = sitk.BinaryDilate(sitk.Cast(labels > 0, sitk.sitkUInt8), [4, 4, 4])
    transform = sitk.TranslationTransform(3, (0.3, -0.2, 0.1))
    without = prealign._mutual_information(mr, ct, transform, moving_mask=mask)
    monkeypatch.setattr(prealign, "_gradients_at_samples", lambda method: None)  # ITK's filters back on
    assert prealign._mutual_information(mr, ct, transform, moving_mask=mask) == without


@pytest.mark.parametrize("radius", [[25, 25, 25], [32, 32, 25], [7, 3, 11], [1, 1, 1]])
def test_the_spine_region_is_itks_ball_dilation_voxel_for_voxel(radius):
    """The distance-map dilation (linear in the voxels) grows the mask by exactly ITK's ball, per-axis radii too."""
    array = np.zeros((60, 70, 80), np.uint8)
    rng = np.random.default_rng(0)
    array[tuple(rng.integers(20, 45, (3, 12)))] = 1
    array[28:33, 30:40, 35:38] = 1
    mask = sitk.GetImageFromArray(array)
    mask.SetSpacing((0.78, 0.78, 1.2))
    mask.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    expected = sitk.GetArrayFromImage(sitk.BinaryDilate(mask, radius))
    grown = prealign._dilated(mask, radius)
    assert Geometry.of(grown) == Geometry.of(mask)
    assert np.array_equal(sitk.GetArrayFromImage(grown), expected)


def test_candidates_are_compared_on_mr_voxels_about_2_mm_apart_and_the_truth_still_wins():
    clinical = sitk.Image([64, 64, 12], sitk.sitkFloat32)
    clinical.SetSpacing((0.64, 0.64, 3.9))
    assert prealign._evaluation_factors(clinical) == [3, 3, 1]
    mr, ct, labels = _pair(shift=(2.0, -1.5, 1.0))  # 1 mm phantom: every other voxel along each axis
    assert prealign._evaluation_factors(mr) == [2, 2, 2]
    mask = sitk.BinaryDilate(sitk.Cast(labels > 0, sitk.sitkUInt8), [4, 4, 4])
    fixed_mask = sitk.Resample(mask, mr, sitk.TranslationTransform(3, (2.0, -1.5, 1.0)), sitk.sitkNearestNeighbor)
    for offset in ((0.7, 0.0, 0.0), (0.0, 0.0, -0.7)):
        wrong = sitk.TranslationTransform(3, tuple(np.array((2.0, -1.5, 1.0)) + offset))
        for masks in ({"moving_mask": mask}, {"fixed_mask": fixed_mask}):
            truth = prealign._mutual_information(mr, ct, sitk.TranslationTransform(3, (2.0, -1.5, 1.0)), **masks)
            assert truth < prealign._mutual_information(mr, ct, wrong, **masks)  # lower is better


def test_a_ct_beyond_the_voxel_budget_is_still_aligned(monkeypatch):
    shift = np.array([2.0, -1.5, 1.0])
    mr, ct, labels = _pair(tuple(shift))
    monkeypatch.setattr(prealign, "GRADIENT_FILTER_MAX_VOXELS", 1000)  # every CT counts as large
    used = []
    inner = prealign._gradients_at_samples
    monkeypatch.setattr(prealign, "_gradients_at_samples", lambda method: used.append(1) or inner(method))
    found = prealign.automatic_prealignment(mr, ct, labels)
    assert len(used) > 4  # the registrations too, not only the metric values
    centre = np.mean(list(prealign.label_centroids(labels).values()), axis=0)
    moved = found.matrix[:3, :3] @ (centre - shift) + found.matrix[:3, 3]  # the MR point of the spine centre
    assert np.linalg.norm(moved - centre) < 0.5


def test_only_a_ct_beyond_the_voxel_budget_is_registered_without_itks_gradient_filters(monkeypatch):
    """The rule of `GRADIENT_FILTER_MAX_VOXELS`: a small CT keeps the filtered gradients in its 3 registrations (the
    metric values take theirs at the samples either way), a CT of more voxels gives them up. On one thread: on two,
    a rigid stage started ahead from the search that ends first may run too (:func:`_translation_then_rigid`)."""
    mr, ct, labels = _pair()
    monkeypatch.setattr(prealign.torch, "get_num_threads", lambda: 1)
    calls = Counter()
    registration, unfiltered = prealign._mattes_mi, prealign._gradients_at_samples
    monkeypatch.setattr(prealign, "_mattes_mi", lambda *a, **k: calls.update(["run"]) or registration(*a, **k))
    monkeypatch.setattr(prealign, "_gradients_at_samples", lambda m: calls.update(["unfiltered"]) or unfiltered(m))
    counts = []
    for budget in (ct.GetNumberOfPixels(), ct.GetNumberOfPixels() - 1):  # the CT within, then beyond the budget
        calls.clear()
        monkeypatch.setattr(prealign, "GRADIENT_FILTER_MAX_VOXELS", budget)
        prealign.automatic_prealignment(mr, ct, labels)
        counts.append((calls["run"], calls["unfiltered"]))
    (registrations, within), (_, beyond) = counts
    assert registrations == 3 and beyond - within == registrations
    assert prealign.GRADIENT_FILTER_MAX_VOXELS < 5_000_000  # the clinical tier's 1 mm CTs search without them


def test_a_pair_in_register_keeps_the_scanner_frames_when_the_search_ends_worse():
    """The search's starts compete with where it ends: on the tiny clinical-like pair in register (T2-like MR,
    thick oblique slices) ITK's translation stage ended 0.5 mm off with a Mattes MI 7 % worse than the scanner
    frames'; the start is now kept (issue 18 item 10)."""
    from SpineRigidRegLib.benchmark import tiers

    case = tiers.clinical_case(0, 4000, None, scale=0.0, tiny=True)
    found = prealign.automatic_prealignment(case.fixed, case.moving, case.moving_labels)
    assert np.abs(found.matrix - np.eye(4)).max() < 1e-6


def _search_on(threads: int, monkeypatch, keep_patches: bool = False) -> tuple[np.ndarray, set[int], list[int]]:
    """The pre-alignment of :func:`_pair` with ``threads`` ITK threads: its matrix, the threads that ran a
    registration, and those that reported progress."""
    mr, ct, labels = _pair()
    ran, reports = set(), []
    if not keep_patches:
        monkeypatch.undo()  # a second call wraps the registration itself, not the first call's spy
    inner = prealign._mattes_mi
    monkeypatch.setattr(prealign, "_mattes_mi", lambda *a, **k: ran.add(threading.get_ident()) or inner(*a, **k))
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    monkeypatch.setattr(prealign.torch, "get_num_threads", lambda: threads)  # torch may use as many
    try:
        found = prealign.automatic_prealignment(
            mr, ct, labels, progress=lambda *_: reports.append(threading.get_ident())
        )
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    return found.matrix, ran, reports


def test_the_starts_searched_on_two_threads_find_what_one_thread_finds(monkeypatch):
    """With two threads the second start searches beside the first, on its own copies of the images; the matrix
    is the one-thread matrix to the last bit, and progress is reported from the calling thread only (a GUI's
    callbacks must not run on a worker thread)."""
    one, ran_one, _ = _search_on(1, monkeypatch)
    two, ran_two, reports = _search_on(2, monkeypatch)
    assert np.array_equal(one, two)
    assert len(ran_one) == 1 and len(ran_two) >= 2  # the parallel path did run
    assert reports and set(reports) == {threading.get_ident()}


def test_the_rigid_stage_started_ahead_changes_when_the_matrix_is_found_not_which(monkeypatch):
    """Whichever search ends first starts the rigid stage from its best translation on the core it frees. Delaying
    either start's search in turn, the matrix is the one-thread matrix to the last bit; the rigid stage runs once
    when the start whose search ended first wins, and a second time, from the winner, when it loses."""
    one, _, _ = _search_on(1, monkeypatch)
    search, rigid_stage = prealign._search_from, prealign._rigid_stage
    runs = []
    for late_start in (0, 1):
        rigid_runs = []

        def search_from(images, start, progress, late_start=late_start):
            if bool(np.any(start)) == bool(late_start):  # start 0 is the scanner frames (no shift)
                time.sleep(0.5)
            return search(images, start, progress)

        monkeypatch.setattr(prealign, "_search_from", search_from)
        monkeypatch.setattr(prealign, "_rigid_stage", lambda *a, r=rigid_runs, **k: r.append(1) or rigid_stage(*a, **k))
        two, _, _ = _search_on(2, monkeypatch, keep_patches=True)
        assert np.array_equal(one, two)
        runs.append(len(rigid_runs))
        monkeypatch.undo()
    assert sorted(runs) == [1, 2]


def test_a_stopped_rigid_stage_ends_at_its_first_iteration_and_gives_nothing():
    mr, ct, labels = _pair()
    mask = prealign._dilated(sitk.Cast(labels > 0, sitk.sitkUInt8), [4, 4, 4])
    stop, iterations = threading.Event(), []
    stop.set()
    centre = Geometry.of(mr).corners_lps().mean(axis=0)
    found = prealign._rigid_stage(
        (sitk.Cast(mr, sitk.sitkFloat32), ct, mask),
        sitk.TranslationTransform(3),
        lambda *_: iterations.append(1),
        stop,
        fixed_centre=centre,
        spine_centre=centre,
    )
    assert found is None and len(iterations) <= 1


def test_the_spine_region_dilated_on_its_box_is_the_whole_images_dilation():
    """The search's spine region is dilated on the spine's bounding box only (speed): voxel for voxel what
    ``BinaryDilate`` gives on the whole image, with the image's geometry, also for a spine at the image's corner."""
    mask = sitk.Image(40, 30, 20, sitk.sitkUInt8)
    mask.SetSpacing((0.7, 1.1, 2.5))
    mask.SetOrigin((3.0, -2.0, 7.0))
    for index in ((0, 0, 0), (39, 29, 19), (20, 15, 10)):
        mask[index] = 1
    for radius in ([3, 2, 1], [50, 50, 50]):
        expected, got = sitk.BinaryDilate(mask, radius), prealign._dilated(mask, radius)
        assert np.array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(expected))
        assert got.GetOrigin() == mask.GetOrigin() and got.GetSpacing() == mask.GetSpacing()
    assert not sitk.GetArrayFromImage(prealign._dilated(mask * 0, [3, 3, 3])).any()

"""`srr-benchmark --speed` (benchmark/speed.py): the whole-body CT it builds keeps the spine where it was, and the
report shows every situation against its goal."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from SpineRigidRegLib import pipeline
from SpineRigidRegLib.benchmark import report, speed
from SpineRigidRegLib.data.phantom import make_phantom


def test_the_large_ct_holds_the_spine_at_its_physical_place(monkeypatch):
    monkeypatch.setattr(speed, "LARGE_CT_SIZE", (90, 80, 70))
    monkeypatch.setattr(speed, "LARGE_CT_SPACING", (0.78, 0.78, 1.0))
    phantom = make_phantom(num_vertebrae=3, shape=(48, 40, 40), seed=1)
    big, labels = speed.large_ct(phantom.ct, phantom.labels)
    assert big.GetSize() == (90, 80, 70) and big.GetSpacing() == (0.78, 0.78, 1.0)
    for value in (20, 21, 22):
        centres = []
        for image in (phantom.labels, labels):
            stats = sitk.LabelShapeStatisticsImageFilter()
            stats.Execute(sitk.Cast(image == value, sitk.sitkUInt8))
            centres.append(np.asarray(stats.GetCentroid(1)))
        assert np.linalg.norm(centres[0] - centres[1]) < 0.5  # mm, resampled at 0.78 mm
    corner = sitk.GetArrayViewFromImage(big)[0, 0, 0]
    assert corner == -1000


def test_the_report_lists_every_situation_with_its_goal_and_stages():
    stages = {"prealign": 1.5, "network": 0.5, "vertebra_rigid": 2.0, "outputs": 1.0, "total": 6.0}
    rows = [
        {"name": "sample case, no points", "key": "sample_no_points", "registration_s": 5.0, "stages_s": stages,
         "peak_memory_mb": 900.0, "goal_s": 2.0},
        {"name": "512 x 512 x 400 CT, no points", "key": "large_ct", "registration_s": 30.0, "stages_s": stages,
         "peak_memory_mb": 2100.0, "goal_s": 10.0},
    ]  # fmt: skip
    figures = {
        "input_shape": [8, 8, 8], "processing_grid": [8, 8, 8], "device": "cpu", "threads": 2, "weights": "w",
        "pipeline_s": 6.0, "registration_s": 5.0, "stages_s": stages, "elastix_s": 60.0, "speedup_vs_elastix": 10.0,
        "scenarios": rows, "command_s": 12.5, "command_goal_s": 5.0,
    }  # fmt: skip
    text = "\n".join(report._speed_section(figures, "."))
    assert "| sample case, no points | 5.00 | 2 | 0.00 | 0.00 | 1.50 | 0.00 | 0.50 | 2.00 | 1.00 | 900 |" in text
    assert "| 512 x 512 x 400 CT, no points | 30.00 | 10 |" in text
    assert "`srr-register --sample` command" in text and "12.50" in text


def test_a_first_registration_segments_and_corrects_the_mr_again_and_a_correction_keeps_both(monkeypatch):
    """A scenario times a first registration of its MR (what runs keep emptied: segmentation, bias correction,
    maps); the correction re-run keeps those of the run it corrects, as the Slicer module's re-runs do."""
    forgotten = []
    monkeypatch.setattr(pipeline, "forget_kept_work", lambda: forgotten.append(1))

    class Result:
        timings = {"network": 0.5, "outputs": 1.0, "total": 2.0}

    first = speed.timed_registration("first", "first", Result, "cpu")
    assert forgotten == [1] and first["registration_s"] == 1.0
    speed.timed_registration("correction", "correction", Result, "cpu", same_mr=True)
    assert forgotten == [1]


def test_a_repeated_scenario_reports_its_fastest_run_with_the_largest_peak_memory(monkeypatch):
    """A shared machine moves one run's time by tens of per cent: the figure is the fastest run's, whole (its stages
    belong to it), and the memory is the worst run's, so that a lucky run cannot hide a large allocation."""
    runs = iter([(4.0, 900.0), (2.5, 700.0), (3.0, 1200.0)])
    monkeypatch.setattr(pipeline, "forget_kept_work", lambda: None)

    class Memory:
        def __init__(self, device):
            self.peak_mb = 0.0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.peak_mb = self.next_peak

    results = []

    def run():
        seconds, peak = next(runs)
        Memory.next_peak = peak
        result = type("Result", (), {"timings": {"network": seconds / 2, "outputs": 1.0, "total": seconds + 1.0}})
        results.append(result)
        return result

    monkeypatch.setattr(speed, "PeakMemory", Memory)
    row = speed.timed_registration("sample", "sample", run, "cpu", repeats=3)
    assert len(results) == 3 and row["repeats"] == 3
    assert row["registration_s"] == 2.5 and row["stages_s"]["network"] == 1.25 and row["result"] is results[1]
    assert row["peak_memory_mb"] == 1200.0


def test_the_report_says_how_each_figure_was_timed():
    figures = {"input_shape": [8, 8, 8], "processing_grid": [8, 8, 8], "device": "cpu", "threads": 2, "weights": "w",
               "pipeline_s": 6.0, "registration_s": 5.0, "stages_s": {}, "elastix_s": 60.0,
               "speedup_vs_elastix": 10.0}  # fmt: skip
    assert "one run after a warm-up" in "\n".join(report._speed_section(figures, "."))
    assert "the fastest of 3 runs" in "\n".join(report._speed_section(figures | {"repeats": 3}, "."))


def test_the_speed_section_names_the_cpu_and_commit_it_ran_on():
    """The speed run may be on another machine than the Table 1 run whose machine section closes the report (it was
    in session 20: an AMD EPYC beside an earlier Intel Xeon); a run that recorded neither still renders."""
    figures = {"input_shape": [8, 8, 8], "processing_grid": [8, 8, 8], "device": "cpu", "threads": 2, "weights": "w",
               "pipeline_s": 6.0, "registration_s": 5.0, "stages_s": {}, "elastix_s": 60.0,
               "speedup_vs_elastix": 10.0, "date_utc": "2026-12-06 13:41 UTC"}  # fmt: skip
    text = "\n".join(report._speed_section(figures | {"cpu": "AMD EPYC", "git_commit": "abc1234"}, "."))
    assert "device cpu (AMD EPYC, 2 torch threads" in text and "(2026-12-06 13:41 UTC, commit abc1234)" in text
    assert "device cpu (2 torch threads" in "\n".join(report._speed_section(figures, "."))


def test_where_the_networks_ran_in_bfloat16_the_sample_case_is_also_timed_in_float32(monkeypatch):
    """The float32 row is what a CPU without bfloat16 units runs; the correction still corrects the pointed run."""
    monkeypatch.setattr(pipeline, "forget_kept_work", lambda: None)
    landmarks = {"L1": np.zeros(3)}
    monkeypatch.setattr(
        speed,
        "_sample_inputs",
        lambda: {"fixed": 1, "moving": 2, "moving_labels": 3, "fixed_landmarks": landmarks, "moving_landmarks": {}},
    )
    calls = []

    def register(*images, precision=None, **kwargs):
        calls.append((precision, kwargs))
        result = type("Result", (), {"timings": {"outputs": 1.0, "total": 2.0}, "transform": sitk.Transform()})
        result.velocity = len(calls)  # which run made it
        return result

    rows = speed.sample_scenarios(register, "cpu", float32_row=True)
    assert [r["key"] for r in rows] == ["sample_no_points", "sample_no_points_float32", "sample_points", "correction"]
    assert ("float32", {}) in calls and all(p is None for p, kwargs in calls if kwargs)
    assert calls[-1][1]["initial_velocity"] == rows[2]["result"].velocity  # corrects the pointed run
    figures = {"input_shape": [8, 8, 8], "processing_grid": [8, 8, 8], "device": "cpu", "threads": 2, "weights": "w",
               "pipeline_s": 6.0, "stages_s": {}, "elastix_s": 60.0, "speedup_vs_elastix": 10.0,
               "network_arithmetic": "bfloat16"}  # fmt: skip
    assert "the networks' arithmetic in bfloat16" in "\n".join(report._speed_section(figures, "."))

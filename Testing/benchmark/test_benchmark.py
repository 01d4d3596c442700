"""The benchmark: ground-truth cases, the runner's evaluation, the report, ``srr-benchmark`` and ``srr-evaluate``."""

from __future__ import annotations

import importlib.util
import json
import math
import mmap

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SpineRigidRegLib.benchmark import report, runner
from SpineRigidRegLib.benchmark.cases import build_case, case_specs, phantom_case
from SpineRigidRegLib.checkpoint import save_checkpoint
from SpineRigidRegLib.cli import benchmark as benchmark_cli
from SpineRigidRegLib.cli import evaluate as evaluate_cli
from SpineRigidRegLib.cli import register as register_cli
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.geometry import displacement_field_image
from SpineRigidRegLib.network import NetworkConfig, RegistrationNet

HAS_ELASTIX = importlib.util.find_spec("itk") is not None
TINY_NET = NetworkConfig(encoder_channels=(4, 4), decoder_channels=(4, 4), final_channels=(4,))


@pytest.fixture(scope="module")
def tiny_case():
    return phantom_case(0, seed=5, tiny=True)


# ---------------------------------------------------------------------------------------------------- cases


def test_case_specs_put_real_cases_first_and_are_seeded():
    specs = case_specs(5, real_count=2, seed=10)
    assert [s.source for s in specs] == ["real", "real", "phantom", "phantom", "phantom"]
    assert len({s.seed for s in specs}) == 5
    assert case_specs(5, 2, 10) == specs
    with pytest.raises(InputError):
        case_specs(0)
    with pytest.raises(InputError):
        case_specs(2, real_count=3)
    with pytest.raises(InputError, match="contrast"):
        case_specs(2, contrast="flair")


def test_t2_cases_share_the_t1_cases_anatomy_and_motion_but_not_their_contrast():
    t1, t2 = (build_case(spec, tiny=True) for spec in (case_specs(1, contrast=c)[0] for c in ("t1", "t2")))
    assert (t1.description["mr_contrast"], t2.description["mr_contrast"]) == ("t1", "t2")
    assert np.array_equal(sitk.GetArrayFromImage(t1.fixed_labels), sitk.GetArrayFromImage(t2.fixed_labels))
    torch.testing.assert_close(t1.true_displacement, t2.true_displacement)
    assert not np.allclose(sitk.GetArrayFromImage(t1.fixed), sitk.GetArrayFromImage(t2.fixed), atol=0.1)


def test_phantom_case_is_reproducible_and_its_truth_maps_the_labels(tiny_case):
    again = phantom_case(0, seed=5, tiny=True)
    assert torch.equal(again.true_displacement, tiny_case.true_displacement)
    assert np.array_equal(sitk.GetArrayFromImage(again.fixed), sitk.GetArrayFromImage(tiny_case.fixed))
    # The true field scores perfectly against the fixed labels and the truth.
    rows, field = runner.evaluate(tiny_case, tiny_case.true_displacement)
    assert len(rows) == 3
    assert min(r["dice"] for r in rows) >= 0.98
    assert max(r["tre_mm"] for r in rows) == 0.0
    assert field["folding_voxels"] == 0


@pytest.mark.slow
def test_real_case_is_one_mm_with_whole_vertebrae_on_bone(shared_data):
    case = build_case(case_specs(1, real_count=1)[0], shared_data)
    assert case.geometry.spacing == (1.0, 1.0, 1.0)
    assert case.description["vertebrae"] == 3  # L2, L1, T12 (the T11 sliver at the edge is dropped)
    assert case.true_displacement.shape[2:] == case.geometry.shape
    # The example's vertebra labels must lie on the CT's bone (its header alone puts them on the pelvis).
    ct = sitk.GetArrayFromImage(case.moving)
    inside = sitk.GetArrayFromImage(case.moving_labels) > 0
    assert ct[inside].mean() > ct[~inside].mean() + 100.0


# ---------------------------------------------------------------------------------------------------- runner


def test_initial_row_is_the_rigid_prealignment(tiny_case):
    output = runner.run_method(runner.Method(runner.INITIAL, runner.KIND_INITIAL), tiny_case)
    rows, _ = runner.evaluate(tiny_case, output.displacement)
    zero_rows, _ = runner.evaluate(tiny_case, torch.zeros_like(tiny_case.true_displacement))
    # Centre-point pre-alignment brings the vertebrae closer than the identity and stays rigid.
    assert np.mean([r["tre_mm"] for r in rows]) < np.mean([r["tre_mm"] for r in zero_rows])
    assert min(r["rigid_dice"] for r in rows) > 0.97


def test_displacement_on_grid_round_trips_a_field(tiny_case):
    geometry = tiny_case.geometry  # RAS-free LPS grid; the field conversion must be exact
    transform = sitk.DisplacementFieldTransform(
        displacement_field_image(tiny_case.true_displacement.double(), geometry)
    )
    back = runner.displacement_on_grid(transform, geometry)
    assert torch.allclose(back, tiny_case.true_displacement, atol=1e-4)


def test_manifest_paths_are_relative_to_the_manifest(tmp_path):
    save_checkpoint(tmp_path / "m.pt", RegistrationNet(TINY_NET))
    (tmp_path / "manifest.json").write_text(json.dumps([{"name": "pc", "checkpoint": "m.pt"}]))
    methods = runner.read_manifest(tmp_path / "manifest.json")
    assert methods[0].name == "pc" and methods[0].checkpoint == str(tmp_path / "m.pt")
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x", "checkpoint": "missing.pt"}]))
    with pytest.raises(InputError, match="not found"):
        runner.read_manifest(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="JSON"):
        runner.read_manifest(tmp_path / "broken.json")


def test_missing_bundled_model_gives_a_note(monkeypatch):
    monkeypatch.setattr(runner, "bundled_model_available", lambda: False)
    methods, notes = runner.default_methods(elastix_iterations=3)
    assert [m.name for m in methods] == [runner.INITIAL, runner.STARING, runner.ELASTIX]
    assert methods[1].elastix.rigidity_penalty and not methods[2].elastix.rigidity_penalty
    assert any("default.json" in note for note in notes)


def test_peak_memory_sees_a_native_allocation():
    if runner._status_kb("VmRSS") is None:
        pytest.skip("no /proc/self/status on this platform")
    size = 40 * 2**20
    with runner.PeakMemory("cpu") as memory:
        block = mmap.mmap(-1, size)  # fresh anonymous pages (a heap block could reuse resident memory)
        for offset in range(0, size, 4096):
            block[offset] = 1
        block.close()
    assert memory.peak_mb > 30


# ---------------------------------------------------------------------------------------------------- report


def _fake_run() -> runner.BenchmarkRun:
    run = runner.BenchmarkRun()
    for case in ("a", "b"):
        for method, dice, seconds in ((runner.INITIAL, 0.5, 0.0), (runner.STARING, 0.7, 40.0), ("ours", 0.8, 4.0)):
            run.case_rows.append(
                {
                    "case": case,
                    "source": "phantom",
                    "method": method,
                    "status": "ok",
                    "runtime_s": seconds,
                    "peak_memory_mb": 10.0,
                    "device": "cpu",
                    "folding_voxels": 0,
                    "sd_log_jacobian": 0.1,
                }
            )
            for label in (20, 21):
                run.vertebra_rows.append(
                    {
                        "case": case,
                        "source": "phantom",
                        "method": method,
                        "label": label,
                        "dice": dice + (0.1 if label == 21 else 0.0),
                        "rigid_dice": 0.9,
                        "abs_volume_change_percent": 2.0,
                        "pc": 0.01,
                        "tre_mm": 1.0,
                    }
                )
    return run


def test_markdown_table_gives_mean_sd_and_speed_relative_to_staring():
    table = report.summary_table(_fake_run())
    text = report.markdown_table(table)
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert "0.850 (0.050)" in lines["ours"]  # vertebra DSCs 0.8, 0.9, 0.8, 0.9
    assert "10.00x" in lines["ours"]  # 40 s / 4 s
    assert "1.00x" in lines[runner.STARING]
    initial_cells = lines[runner.INITIAL].split(" | ")
    assert initial_cells[8] == "-"  # no runtime for the identity row


def test_merge_replaces_only_the_rerun_rows():
    previous = _fake_run()
    new = runner.BenchmarkRun(
        case_rows=[{"case": "a", "source": "phantom", "method": "ours", "status": "ok", "runtime_s": 2.0}]
    )
    merged = report.merge_results(previous, new, ["ours"])
    assert [r["runtime_s"] for r in merged.case_rows if r["method"] == "ours"] == [2.0]
    assert len([r for r in merged.case_rows if r["method"] == runner.STARING]) == 2
    assert not any(r["method"] == "ours" for r in merged.vertebra_rows)


# ---------------------------------------------------------------------------------------------------- commands


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ELASTIX, reason="itk-elastix is not installed (pip install spinerigidreg[baseline])")
def test_srr_benchmark_end_to_end_on_two_tiny_phantoms(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "bundled_model_available", lambda: False)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "tiny.pt", RegistrationNet(TINY_NET))
    (tmp_path / "manifest.json").write_text(json.dumps([{"name": "tiny net", "checkpoint": "tiny.pt"}]))
    out, markdown = tmp_path / "bench", tmp_path / "BENCHMARKS.md"
    common = [
        "--tiny",
        "--cases",
        "2",
        "--elastix-iterations",
        "3",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--markdown",
        str(markdown),
        "--quiet",
    ]
    assert benchmark_cli.main(common) == 0
    for name in (report.VERTEBRA_CSV, report.CASE_CSV, report.BOXPLOTS, report.PANELS_PNG, report.RUN_JSON):
        assert (out / name).is_file(), name
    text = markdown.read_text(encoding="utf-8")
    for method in (runner.INITIAL, runner.STARING, runner.ELASTIX):
        assert f"| {method} |" in text
    assert "default.json does not exist" in text  # the skipped model rows are noted
    rows = report.load_results(out).vertebra_rows
    assert len(rows) == 2 * 3 * 3  # cases x methods x vertebrae
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    staring_before = [r for r in report.load_results(out).case_rows if r["method"] == runner.STARING]

    # Add the model rows later, reusing the elastix rows of the first run.
    assert benchmark_cli.main([*common, "--only", "model", "--manifest", str(tmp_path / "manifest.json")]) == 0
    after = report.load_results(out)
    assert [r for r in after.case_rows if r["method"] == runner.STARING] == staring_before
    assert len([r for r in after.case_rows if r["method"] == "tiny net"]) == 2
    assert "| tiny net |" in markdown.read_text(encoding="utf-8")


def test_speed_repeats_below_one_are_refused_before_any_run(tmp_path, capsys):
    code = benchmark_cli.main(["--speed", "--speed-repeats", "0", "--out", str(tmp_path), "--quiet"])
    assert code == 2
    assert "--speed-repeats must be >= 1" in capsys.readouterr().err


def test_only_model_without_a_previous_run_is_refused(tmp_path, capsys):
    code = benchmark_cli.main(["--tiny", "--cases", "1", "--out", str(tmp_path), "--only", "model", "--quiet"])
    assert code == 2
    assert "previous run" in capsys.readouterr().err


@pytest.mark.slow
def test_srr_evaluate_on_a_registration_folder_matches_the_pipeline(tmp_path, tiny_case, capsys):
    """srr-register on a ground-truth pair, then srr-evaluate on its folder: the rigidity numbers equal the pipeline's
    own (same grid, same field), and the true field evaluated as a transform has zero TRE."""
    paths = {name: tmp_path / f"{name}.nii.gz" for name in ("mr", "ct", "ct_seg", "mr_seg", "truth")}
    sitk.WriteImage(tiny_case.fixed, str(paths["mr"]))
    sitk.WriteImage(tiny_case.moving, str(paths["ct"]))
    sitk.WriteImage(tiny_case.moving_labels, str(paths["ct_seg"]))
    sitk.WriteImage(tiny_case.fixed_labels, str(paths["mr_seg"]))
    sitk.WriteImage(displacement_field_image(tiny_case.true_displacement, tiny_case.geometry), str(paths["truth"]))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", RegistrationNet(TINY_NET))
    out = tmp_path / "result"
    assert (
        register_cli.main(
            [
                "--fixed",
                str(paths["mr"]),
                "--moving",
                str(paths["ct"]),
                "--moving-labels",
                str(paths["ct_seg"]),
                "--model",
                str(tmp_path / "m.pt"),
                "--device",
                "cpu",
                "--refine-steps",
                "0",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        evaluate_cli.main(
            [
                "--result",
                str(out),
                "--moving-labels",
                str(paths["ct_seg"]),
                "--json",
                str(tmp_path / "eval.json"),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "rigid DSC" in printed and "|J|<=0" in printed
    evaluated = {r["label"]: r for r in json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["vertebrae"]}
    pipeline_rows = {
        r["label"]: r for r in json.loads((out / "vertebrae.json").read_text(encoding="utf-8"))["vertebrae"]
    }
    assert evaluated.keys() == pipeline_rows.keys()
    for label, row in pipeline_rows.items():
        assert math.isclose(evaluated[label]["rigid_dice"], row["rigid_dice"], abs_tol=1e-3)
        assert math.isclose(evaluated[label]["volume_change_percent"], row["volume_change_percent"], abs_tol=0.2)
        assert evaluated[label]["folding_voxels"] == row["folding_voxels"]

    assert (
        evaluate_cli.main(
            [
                "--transform",
                str(paths["truth"]),
                "--moving-labels",
                str(paths["ct_seg"]),
                "--fixed-labels",
                str(paths["mr_seg"]),
                "--true-displacement",
                str(paths["truth"]),
                "--json",
                str(tmp_path / "truth.json"),
                "--quiet",
            ]
        )
        == 0
    )
    truth_rows = json.loads((tmp_path / "truth.json").read_text(encoding="utf-8"))["vertebrae"]
    assert all(r["tre_mm"] < 1e-3 and r["dice"] >= 0.98 for r in truth_rows)


def test_srr_evaluate_rejects_a_folder_without_transform(tmp_path, capsys):
    code = evaluate_cli.main(["--result", str(tmp_path), "--moving-labels", str(tmp_path / "x.nii.gz"), "--quiet"])
    assert code == 2
    assert "transform.h5" in capsys.readouterr().err

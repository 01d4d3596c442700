"""Command lines: the main job end to end, and one-line errors with no output for bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import write_phantom_case
from SpineRigidRegLib import inference
from SpineRigidRegLib.cli import jacobian as jacobian_cli
from SpineRigidRegLib.cli import register as register_cli
from SpineRigidRegLib.cli import warp as warp_cli
from SpineRigidRegLib.io import read_landmarks, write_landmarks
from SpineRigidRegLib.network import NetworkConfig
from SpineRigidRegLib.prealign import label_centroids

TINY = NetworkConfig(encoder_channels=(4, 4, 4, 4), decoder_channels=(4, 4, 4, 4), final_channels=(4,))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A phantom CT, its labels, an MR-like image, and a tiny model, as files."""
    return write_phantom_case(tmp_path_factory.mktemp("case"))


def run_register(case, out, *extra):
    return register_cli.main(
        [
            "--fixed",
            str(case["mr"]),
            "--moving",
            str(case["ct"]),
            "--moving-labels",
            str(case["seg"]),
            "--model",
            str(case["model"]),
            "--device",
            "cpu",
            "--refine-steps",
            "2",
            "--quiet",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_register_writes_every_output_and_the_tools_read_them(case, tmp_path, capsys):
    out = tmp_path / "result"
    assert run_register(case, out, "--rigidity", "pc=0.2,rigid_field=0.02") == 0
    printed = capsys.readouterr().out
    assert "rigid DSC" in printed and "qa.png" in printed
    for name in (
        "warped_ct.nii.gz",
        "warped_labels.nii.gz",
        "jacobian.nii.gz",
        "transform.h5",
        "inverse_transform.h5",
        "displacement.nii.gz",
        "vertebrae.csv",
        "summary.json",
        "qa.png",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert "timings_s" in summary and summary["prealign_method"]

    warped = tmp_path / "warped_seg.nii.gz"
    assert (
        warp_cli.main(
            [
                "--transform",
                str(out / "transform.h5"),
                "--input",
                str(case["seg"]),
                "--reference",
                str(case["mr"]),
                "--out",
                str(warped),
                "--labels",
                "--quiet",
            ]
        )
        == 0
    )
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
    assert np.array_equal(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(warped)))), np.unique(ours))

    # CT points into the MR with the inverse, and back with the forward transform.
    ct_points = tmp_path / "plan.mrk.json"
    write_landmarks({f"P{v}": c for v, c in label_centroids(sitk.ReadImage(str(case["seg"]))).items()}, ct_points)
    in_mr, back = tmp_path / "plan_in_mr.fcsv", tmp_path / "back.csv"
    for transform, source, target in (("inverse_transform.h5", ct_points, in_mr), ("transform.h5", in_mr, back)):
        assert warp_cli.main(["--transform", str(out / transform), "--points", str(source), "--out", str(target)]) == 0
    original, returned = read_landmarks(ct_points), read_landmarks(back)
    assert sorted(returned) == sorted(original)
    assert max(np.linalg.norm(returned[k] - original[k]) for k in original) < 0.1  # mm
    both = ["--points", str(ct_points), "--input", str(case["ct"]), "--out", str(tmp_path / "x.csv")]
    assert warp_cli.main(["--transform", str(out / "transform.h5"), *both]) == 2
    assert warp_cli.main(["--transform", str(out / "transform.h5"), "--out", str(tmp_path / "x.nii.gz")]) == 2

    capsys.readouterr()
    assert jacobian_cli.main(["--field", str(out / "displacement.nii.gz"), "--json", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["folding_voxels"] == 0 and stats["det_min"] > 0


def test_no_qa_picture_writes_every_other_output(case, tmp_path, capsys):
    """A batch run without the picture: the same files but qa.png, and the last line does not point at it."""
    assert run_register(case, tmp_path / "with", "--vertebra-steps", "0") == 0
    capsys.readouterr()
    assert run_register(case, tmp_path / "without", "--vertebra-steps", "0", "--no-qa-picture") == 0
    printed = capsys.readouterr().out
    written = {p.name for p in (tmp_path / "with").iterdir()}
    assert "qa.png" in written
    assert {p.name for p in (tmp_path / "without").iterdir()} == written - {"qa.png"}
    assert "QA picture" not in printed and "transform.h5" in printed


def test_network_precision_reaches_the_networks_and_the_summary_says_it(case, tmp_path, capsys, monkeypatch):
    """``auto`` runs bfloat16 where the CPU has it (forced here on any CPU), ``float32`` keeps float32; an unknown
    choice is refused before any output."""
    monkeypatch.setattr(inference, "native_bfloat16", lambda device: True)
    for choice, arithmetic in (("float32", "float32"), ("auto", "bfloat16")):
        out = tmp_path / choice
        assert run_register(case, out, "--vertebra-steps", "0", "--network-precision", choice) == 0
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        assert summary["network_arithmetic"] == arithmetic
        assert f"(networks in {arithmetic})" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_register(case, tmp_path / "half", "--network-precision", "half")
    assert "invalid choice: 'half'" in capsys.readouterr().err and not (tmp_path / "half").exists()


def test_vertebra_weight_accepts_names_and_rejects_unknown(case, tmp_path, capsys):
    assert run_register(case, tmp_path / "a", "--vertebra-weight", "L1=0") == 0
    assert run_register(case, tmp_path / "b", "--vertebra-weight", "C3=2") == 2
    assert "not a vertebra" in capsys.readouterr().err


def test_vertebra_steps_set_the_rigid_stage_and_reject_negatives(case, tmp_path, capsys):
    assert run_register(case, tmp_path / "a", "--vertebra-steps", "0") == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text(encoding="utf-8"))
    assert summary["vertebra_rigid_steps"] == 0 and summary["refine_steps"] == 2
    assert run_register(case, tmp_path / "b", "--vertebra-steps", "-1") == 2
    assert "--vertebra-steps" in capsys.readouterr().err and not (tmp_path / "b").exists()


@pytest.mark.parametrize("problem", ["missing", "truncated", "not_an_image", "tampered_model"])
def test_bad_files_give_one_line_and_no_output(case, tmp_path, capsys, problem):
    ct, model = case["ct"], case["model"]
    if problem == "missing":
        ct = tmp_path / "nope.nii.gz"
    elif problem == "truncated":
        ct = tmp_path / "cut.nii.gz"
        ct.write_bytes(case["ct"].read_bytes()[:500])
    elif problem == "not_an_image":
        ct = tmp_path / "text.nii.gz"
        ct.write_bytes(gzip.compress(b"hello"))
    elif problem == "tampered_model":
        model = tmp_path / "bad.pt"
        data = bytearray(case["model"].read_bytes())
        model.write_bytes(bytes(data[: len(data) // 2]))
    out = tmp_path / "out"
    code = register_cli.main(
        [
            "--fixed",
            str(case["mr"]),
            "--moving",
            str(ct),
            "--moving-labels",
            str(case["seg"]),
            "--model",
            str(model),
            "--device",
            "cpu",
            "--refine-steps",
            "0",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))


def test_missing_required_inputs_and_cuda_without_gpu(case, tmp_path, capsys):
    assert register_cli.main(["--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--fixed" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run_register(case, tmp_path / "y", "--device", "cuda") == 2
        assert "GPU" in capsys.readouterr().err


def test_console_scripts_have_help():
    for module in ("register", "warp", "jacobian"):
        result = subprocess.run(
            [sys.executable, "-m", f"SpineRigidRegLib.cli.{module}", "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0 and "usage" in result.stdout


def _rewritten(path, array, tmp_path, name):
    """A copy of the image at ``path`` with new voxel values (same geometry), written as ``name``."""
    image = sitk.ReadImage(str(path))
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    target = tmp_path / name
    sitk.WriteImage(out, str(target))
    return target


@pytest.mark.parametrize(
    "problem, message",
    [
        ("2d", "3D"),
        ("4d", "3D"),
        ("empty", "empty"),
        ("single", "single vertebra"),
        ("fractional", "integer"),
        ("disjoint_labels", "overlap"),
        ("unmatched_landmarks", "do not match"),
        ("far_landmarks", "overlap"),
        ("unmatched_point_pairs", "only one of"),
    ],
)
def test_bad_content_gives_one_line_and_no_output(case, tmp_path, capsys, problem, message):
    from SpineRigidRegLib.io import write_landmarks

    paths = {"fixed": case["mr"], "moving": case["ct"], "moving-labels": case["seg"]}
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case["seg"])))
    extra: list[str] = []
    if problem == "2d":
        paths["fixed"] = tmp_path / "mr2d.nrrd"
        sitk.WriteImage(sitk.ReadImage(str(case["mr"]))[:, :, 5], str(paths["fixed"]))
    elif problem == "4d":
        paths["fixed"] = tmp_path / "mr4d.nrrd"
        mr = sitk.ReadImage(str(case["mr"]))
        sitk.WriteImage(sitk.JoinSeries([mr, mr]), str(paths["fixed"]))
    elif problem == "empty":
        paths["moving-labels"] = _rewritten(case["seg"], np.zeros_like(labels), tmp_path, "empty.nii.gz")
    elif problem == "single":
        single = np.where(labels == labels.max(), labels, 0).astype(labels.dtype)
        paths["moving-labels"] = _rewritten(case["seg"], single, tmp_path, "single.nii.gz")
    elif problem == "fractional":
        paths["moving-labels"] = _rewritten(case["seg"], labels * 0.5, tmp_path, "half.nii.gz")
    elif problem == "disjoint_labels":
        moved = sitk.ReadImage(str(case["seg"]))
        moved.SetOrigin(tuple(o + 1000.0 for o in moved.GetOrigin()))
        paths["moving-labels"] = tmp_path / "far_seg.nii.gz"
        sitk.WriteImage(moved, str(paths["moving-labels"]))
    elif problem in ("unmatched_landmarks", "far_landmarks"):
        from SpineRigidRegLib.prealign import label_centroids

        ct_points = label_centroids(sitk.ReadImage(str(case["seg"])))
        ct_points = {str(k): np.asarray(v) for k, v in ct_points.items()}
        if problem == "unmatched_landmarks":
            mr_points = {**ct_points, "99": np.zeros(3)}
        else:
            mr_points = {k: v + 500.0 for k, v in ct_points.items()}
        extra = [
            "--moving-landmarks",
            str(write_landmarks(ct_points, tmp_path / "ct.mrk.json")),
            "--fixed-landmarks",
            str(write_landmarks(mr_points, tmp_path / "mr.mrk.json")),
        ]
    elif problem == "unmatched_point_pairs":
        ct_file = write_landmarks({"a": np.zeros(3), "b": np.ones(3)}, tmp_path / "ct_fix.mrk.json")
        mr_file = write_landmarks({"a": np.zeros(3), "c": np.ones(3)}, tmp_path / "mr_fix.mrk.json")
        extra = ["--point-pairs", str(ct_file), str(mr_file)]
    out = tmp_path / "out"
    args = [f"--{k}={v}" for k, v in paths.items()]
    args += ["--model", str(case["model"]), "--device", "cpu", "--refine-steps", "0", "--quiet", "--out", str(out)]
    code = register_cli.main(args + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert message in err
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))


def test_point_pairs_from_files_are_honoured_rigidly(case, tmp_path):
    """Pairs on one vertebra saying it lies 3 mm further along -y in the MR: the written transform sends each MR
    point to its CT point, with no dense step."""
    from SpineRigidRegLib.io import write_landmarks
    from SpineRigidRegLib.prealign import label_centroids

    centres = label_centroids(sitk.ReadImage(str(case["seg"])))
    centre = np.asarray(centres[sorted(centres)[1]])
    shift = np.array([0.0, 3.0, 0.0])
    offsets = {"p1": (0, 0, 0), "p2": (5, 0, 0), "p3": (0, -5, 0), "p4": (0, 0, 3)}
    ct_points = {k: centre + np.asarray(o, dtype=float) for k, o in offsets.items()}
    mr_points = {k: p - shift for k, p in ct_points.items()}
    extra = [
        "--point-pairs",
        str(write_landmarks(ct_points, tmp_path / "ct.mrk.json")),
        str(write_landmarks(mr_points, tmp_path / "mr.mrk.json")),
    ]
    assert run_register(case, tmp_path / "out", "--refine-steps", "0", *extra) == 0
    transform = sitk.ReadTransform(str(tmp_path / "out" / "transform.h5"))
    errors = [np.linalg.norm(np.asarray(transform.TransformPoint(tuple(mr_points[k]))) - ct_points[k]) for k in offsets]
    assert max(errors) < 0.6, errors  # mm


def test_presets_and_a_config_file_reach_the_pipeline(case, tmp_path, capsys):
    assert register_cli.main(["--list-presets"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{name}:" in listed for name in ("default", "strict", "soft"))
    config = tmp_path / "mine.yaml"
    config.write_text("settings:\n  vertebra_rigid:\n    steps: 0\n", encoding="utf-8")
    # the config sets the rigid stage; the flag --refine-steps 2 still wins over the preset's 0
    assert run_register(case, tmp_path / "a", "--preset", "strict", "--config", str(config)) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text(encoding="utf-8"))
    assert summary["vertebra_rigid_steps"] == 0 and summary["refine_steps"] == 2
    assert summary["mr_bias_corrected"] is True
    assert run_register(case, tmp_path / "c", "--config", str(config), "--no-bias-correction") == 0
    assert json.loads((tmp_path / "c" / "summary.json").read_text(encoding="utf-8"))["mr_bias_corrected"] is False
    assert run_register(case, tmp_path / "b", "--preset", "extreme") == 2
    assert "unknown rigidity preset" in capsys.readouterr().err and not (tmp_path / "b").exists()

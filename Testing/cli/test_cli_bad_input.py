"""What a new user hit (issue #18): a corpus of bad inputs, each refused before any compute with one line, exit code
2, no traceback, no output and the inputs untouched; and the surprises that are warnings instead."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import write_phantom_case
from SpineRigidRegLib.checkpoint import resources_dir, save_checkpoint
from SpineRigidRegLib.cli import common
from SpineRigidRegLib.cli import register as register_cli
from SpineRigidRegLib.io import write_landmarks
from SpineRigidRegLib.network import NetworkConfig, RegistrationNet
from SpineRigidRegLib.pipeline import MAX_VOLUME_CHANGE_PERCENT, RegistrationSettings, check_plausible
from SpineRigidRegLib.prealign import label_centroids

TINY = NetworkConfig(encoder_channels=(4, 4, 4, 4), decoder_channels=(4, 4, 4, 4), final_channels=(4,))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _image_like(reference: sitk.Image, array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The good case as files, and every bad variant: name -> (argument overrides, text the error must contain)."""
    root = tmp_path_factory.mktemp("corpus")
    files = write_phantom_case(root)
    mr = sitk.ReadImage(str(files["mr"]))

    # A damaged copy of the bundled model beside its card: bytes flipped inside a tensor, the zip still readable.
    models = root / "models"
    models.mkdir()
    for name in ("default.pt", "default.json"):
        shutil.copy(resources_dir() / "Models" / name, models / name)
    data = bytearray((models / "default.pt").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0x7F for b in data[middle : middle + 16])
    (models / "default.pt").write_bytes(bytes(data))

    # A model whose output is absurd: a constant 60-voxel velocity carries everything out of the field of view.
    absurd = RegistrationNet(TINY)
    with torch.no_grad():
        absurd.velocity_head.bias.fill_(60.0)
    save_checkpoint(root / "absurd.pt", absurd)

    blank = root / "blank_mr.nrrd"
    sitk.WriteImage(_image_like(mr, np.full(sitk.GetArrayFromImage(mr).shape, 7.0, np.float32)), str(blank))
    a_file = root / "a_file.txt"
    a_file.write_text("not a folder", encoding="utf-8")
    points = {str(k): np.asarray(v) for k, v in label_centroids(sitk.ReadImage(str(files["seg"]))).items()}
    ct_points = write_landmarks(points, root / "ct.mrk.json")
    mr_points = write_landmarks(points, root / "mr.mrk.json")
    landmarks = ["--moving-landmarks", str(ct_points), "--fixed-landmarks", str(mr_points)]
    good_sha = _sha256(models / "default.pt")
    cases = {
        "out_is_a_file": ({"out": a_file}, [], "is an existing file"),
        "out_below_a_file": ({"out": a_file / "result"}, [], "cannot be created"),
        "damaged_model_beside_its_card": ({"model": models / "default.pt"}, [], "fails its checksum"),
        "model_sha256_mismatch": ({}, ["--model-sha256", good_sha], "fails its checksum"),
        "model_sha256_malformed": ({}, ["--model-sha256", "abc"], "64 hexadecimal digits"),
        "absurd_network_output": ({"model": root / "absurd.pt"}, ["--vertebra-steps", "0"], "physically impossible"),
        "blank_mr": ({"mr": blank}, [], "no contrast"),
        "blank_mr_with_landmarks": ({"mr": blank}, landmarks, "no contrast"),
    }
    return root, files, cases


def _argv(files: dict, overrides: dict, extra: list[str], out: Path) -> list[str]:
    paths = {**files, "out": out, **overrides}
    return [
        *("--fixed", str(paths["mr"]), "--moving", str(paths["ct"]), "--moving-labels", str(paths["seg"])),
        *("--model", str(paths["model"]), "--device", "cpu", "--refine-steps", "0", "--quiet"),
        *("--out", str(paths["out"])),
        *extra,
    ]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


CASES = [
    "out_is_a_file",
    "out_below_a_file",
    "damaged_model_beside_its_card",
    "model_sha256_mismatch",
    "model_sha256_malformed",
    "absurd_network_output",
    "blank_mr",
    "blank_mr_with_landmarks",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_one_line_exit_2_no_output_inputs_unchanged(corpus, tmp_path, capsys, name):
    root, files, cases = corpus
    overrides, extra, message = cases[name]
    before = _snapshot(root)
    out = tmp_path / "out"
    code = register_cli.main(_argv(files, overrides, extra, out))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    assert not out.exists() or not any(out.iterdir())
    assert _snapshot(root) == before


@pytest.mark.parametrize("reason", [errno.EROFS, errno.EPERM, errno.EACCES])
def test_unwritable_out_is_refused_before_any_compute(corpus, tmp_path, capsys, monkeypatch, reason):
    """A read-only mount, an immutable folder, a folder without permission (as root none can be made for real, so
    the probe's failure is simulated): refused before the inputs are even read."""
    root, files, _ = corpus

    def refuse(*args, **kwargs):
        raise OSError(reason, __import__("os").strerror(reason))

    monkeypatch.setattr(common.tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(register_cli, "_input_paths", lambda args: pytest.fail("inputs read before --out checked"))
    for out in (tmp_path / "existing", tmp_path / "new" / "deeper"):
        (tmp_path / "existing").mkdir(exist_ok=True)
        assert register_cli.main(_argv(files, {}, [], out)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --out") and "not writable" in err and "\n" not in err, err
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0, reason="root")
def test_read_only_parent_folder_is_refused(corpus, tmp_path, capsys):
    root, files, _ = corpus
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert register_cli.main(_argv(files, {}, [], parent / "out")) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        parent.chmod(0o700)


def test_plausibility_limits_name_the_vertebra_and_the_displacement():
    settings = RegistrationSettings()
    ok = [{"label": 20, "name": "L1", "volume_change_percent": 0.5}]
    check_plausible(ok, {"max_displacement_mm": 12.0}, settings)
    bad = [*ok, {"label": 21, "name": "L2", "volume_change_percent": MAX_VOLUME_CHANGE_PERCENT + 72}]
    with pytest.raises(ValueError, match=r"vertebra L2 changed volume by \+92 %"):
        check_plausible(bad, {"max_displacement_mm": 12.0}, settings)
    limit = settings.margin_mm + settings.vertebra_rigid.max_translation_mm
    with pytest.raises(ValueError, match="displacement of 52 mm"):
        check_plausible(ok, {"max_displacement_mm": 52.0}, settings)
    check_plausible(ok, {"max_displacement_mm": limit - 1}, settings)


def test_nan_in_the_ct_and_a_mirrored_mr_run_with_warnings(corpus, tmp_path, caplog):
    root, files, _ = corpus
    ct = sitk.ReadImage(str(files["ct"]), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(ct)
    array[0, 0, :3] = [np.nan, np.inf, -np.inf]
    ct_nan = tmp_path / "ct_nan.nrrd"
    sitk.WriteImage(_image_like(ct, array), str(ct_nan))
    mr = sitk.ReadImage(str(files["mr"]))
    mirrored = tmp_path / "mr_mirrored.nrrd"
    flipped = sitk.Image(mr)
    flipped.SetDirection((-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    sitk.WriteImage(flipped, str(mirrored))
    before = _sha256(ct_nan), _sha256(mirrored)
    with caplog.at_level(logging.WARNING):
        code = register_cli.main(_argv(files, {"ct": ct_nan, "mr": mirrored}, [], tmp_path / "out"))
    assert code == 0
    text = caplog.text
    assert "1 NaN, 1 +inf and 1 -inf voxels" in text and "lowest finite value" in text
    assert "left-handed direction matrix" in text
    assert (_sha256(ct_nan), _sha256(mirrored)) == before


def test_log_records_print_on_their_own_line_above_the_progress_bar(capsys):
    """Records go through tqdm's writer: never appended to the bar's line."""
    import argparse

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    try:
        common.configure_logging(argparse.Namespace(quiet=False, verbose=False))
        with common.progress_bar(True) as progress:
            progress(0.3, "working")
            logging.getLogger("SpineRigidRegLib.test").warning("L2 outside the MR")
            progress(0.6, "still working")
    finally:
        root.handlers, root.level = saved
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1] for line in err.split("\n")]
    assert "WARNING: L2 outside the MR" in lines, err
    assert logging.getLogger("matplotlib").level >= logging.WARNING


def test_summary_folding_count_is_the_jacobian_maps_and_bounds_the_table(corpus, tmp_path):
    root, files, _ = corpus
    out = tmp_path / "out"
    assert register_cli.main(_argv(files, {}, ["--vertebra-steps", "3"], out)) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    rows = json.loads((out / "vertebrae.json").read_text(encoding="utf-8"))["vertebrae"]
    det = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    assert summary["folding_voxels"] == int((det <= 0).sum())
    assert summary["folding_voxels_in_vertebrae"] == sum(r["folding_voxels"] for r in rows)
    assert summary["folding_voxels"] >= summary["folding_voxels_in_vertebrae"]


def test_two_runs_on_the_same_inputs_write_identical_transforms(corpus, tmp_path):
    """The automatic pre-alignment (no landmarks) and the vertebra-wise stage, twice: byte-identical fields."""
    root, files, _ = corpus
    fields = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert register_cli.main(_argv(files, {}, ["--vertebra-steps", "4"], out)) == 0
        fields.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "total_displacement.nii.gz"))))
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        assert summary["prealign_method"].startswith("automatic")
    assert np.array_equal(fields[0], fields[1])


def test_automatic_prealignment_reports_progress_within_its_stage(corpus):
    """The bar moves during the Mattes-MI search (per optimiser iteration), not only between resolution levels."""
    from SpineRigidRegLib.prealign import automatic_prealignment

    _, files, _ = corpus
    reports: list[tuple[float, str]] = []
    automatic_prealignment(
        sitk.ReadImage(str(files["mr"])),
        sitk.ReadImage(str(files["ct"])),
        sitk.ReadImage(str(files["seg"])),
        progress=lambda fraction, message: reports.append((fraction, message)),
    )
    fractions = [f for f, m in reports if m.startswith("automatic rigid pre-alignment")]
    assert len(set(fractions)) > 10
    assert all(0.0 <= f <= 1.0 for f in fractions)

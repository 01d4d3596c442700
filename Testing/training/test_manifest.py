"""The ablation manifest's one writer and reader (training/manifest.py) and the benchmark's use of it."""

import json

import pytest
from SpineRigidRegLib.benchmark import runner
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.training.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    load_manifest,
    read_manifest,
    write_manifest,
)


def _checkpoints(folder, *names):
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "best.pt").write_bytes(b"weights")


def test_what_the_ablation_writes_the_benchmark_reads(tmp_path):
    _checkpoints(tmp_path, "baseline", "pc")
    rows = [
        {"name": "baseline", "label": "Baseline", "checkpoint": "baseline/best.pt", "loss": {"pc": 0.0}},
        {"name": "pc", "label": "PC", "checkpoint": "pc/best.pt", "loss": {"pc": 0.1}},
    ]
    path = write_manifest(tmp_path, {"milestone_step": 4, "rows": rows})
    written = json.loads(path.read_text(encoding="utf-8"))
    assert written["format"] == MANIFEST_FORMAT and written["version"] == MANIFEST_VERSION
    assert load_manifest(path)["rows"] == rows
    models = read_manifest(path)
    assert [(m.name, m.label) for m in models] == [("baseline", "Baseline"), ("pc", "PC")]
    assert models[1].checkpoint == tmp_path / "pc" / "best.pt"
    methods = runner.read_manifest(path)
    assert [m.name for m in methods] == ["Baseline", "PC"]
    assert all(m.kind == runner.KIND_MODEL and m.vertebra_rigid_steps == 0 for m in methods)


@pytest.mark.parametrize("wrap", [lambda rows: rows, lambda rows: {"models": rows}])
def test_hand_written_lists_are_read_with_paths_relative_to_the_manifest(tmp_path, wrap):
    _checkpoints(tmp_path, "a")
    (tmp_path / "m.json").write_text(json.dumps(wrap([{"name": "net a", "checkpoint": "a/best.pt"}])))
    (model,) = read_manifest(tmp_path / "m.json")
    assert model.name == model.label == "net a" and model.checkpoint == tmp_path / "a" / "best.pt"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "JSON"),
        (json.dumps({"format": "something-else", "rows": []}), "not an ablation manifest"),
        (json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION + 1, "rows": []}), "version"),
        (json.dumps({"format": MANIFEST_FORMAT}), "rows"),
        (json.dumps([{"name": "x"}]), "checkpoint"),
        (json.dumps([{"name": "x", "checkpoint": "missing.pt"}]), "not found"),
    ],
)
def test_bad_manifests_are_refused_with_the_reason(tmp_path, content, message):
    (tmp_path / "m.json").write_text(content)
    with pytest.raises(InputError, match=message):
        read_manifest(tmp_path / "m.json")


def test_the_writer_refuses_what_the_reader_would_refuse(tmp_path):
    with pytest.raises(InputError, match="checkpoint"):
        write_manifest(tmp_path, {"rows": [{"name": "pc"}]})
    assert not (tmp_path / "manifest.json").exists()

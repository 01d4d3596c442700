"""User choices -> RegistrationSettings (choices.py): presets as data files, config files, explicit choices."""

import json
from dataclasses import fields

import pytest
from SpineRigidRegLib.choices import (
    CUSTOM,
    label_weights,
    make_settings,
    parse_assignments,
    preset_names,
    read_preset,
    update_settings,
)
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.losses.rigidity import RIGIDITY_LOSSES, RIGIDITY_TERMS
from SpineRigidRegLib.pipeline import RegistrationSettings
from SpineRigidRegLib.refine import RefineWeights
from SpineRigidRegLib.training.config import LossConfig


def test_the_default_preset_is_the_cores_defaults_and_the_others_scale_its_rigidity():
    assert preset_names()[0] == "default" and {"strict", "soft"} <= set(preset_names())
    assert make_settings() == RegistrationSettings() == make_settings(CUSTOM)
    base = RefineWeights()
    for name, scale in (("strict", 4.0), ("soft", 0.25)):
        weights = make_settings(name).refine_weights
        for term in RIGIDITY_TERMS:
            assert getattr(weights, term) == pytest.approx(scale * getattr(base, term)), (name, term)
        assert weights.smooth == base.smooth and weights.similarity_weight == base.similarity_weight
    for name in preset_names():
        assert read_preset(name)["description"]


def test_one_set_of_rigidity_terms_names_fields_of_both_weight_types():
    assert RIGIDITY_TERMS == tuple(RIGIDITY_LOSSES)
    for weights_type in (RefineWeights, LossConfig):
        assert set(RIGIDITY_TERMS) <= {f.name for f in fields(weights_type)}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_config_file_applies_after_the_preset_and_before_the_flags(tmp_path, suffix):
    body = {
        "rigidity_scale": 2.0,
        "settings": {"refine_steps": 7, "refine_weights": {"smooth": 0.02}, "vertebra_rigid": {"steps": 11}},
    }
    path = tmp_path / f"mine{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(body))
    else:
        import yaml

        path.write_text(yaml.safe_dump(body))
    settings = make_settings("strict", path)
    assert settings.refine_steps == 7 and settings.vertebra_rigid.steps == 11
    assert settings.refine_weights.smooth == 0.02
    assert settings.refine_weights.pc == pytest.approx(8 * RefineWeights().pc)  # strict x4, then the file's x2
    flags = make_settings("strict", path, refine_steps=3, vertebra_steps=0, rigidity={"pc": 0.5}, device="cpu")
    assert (flags.refine_steps, flags.vertebra_rigid.steps, flags.refine_weights.pc, flags.device) == (3, 0, 0.5, "cpu")
    assert flags.refine_weights.oc == settings.refine_weights.oc  # a flag changes only what it names


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "extreme"}, "unknown rigidity preset"),
        ({"config": {"settings": {"stiffness": 1}}}, "unknown setting"),
        ({"config": {"settings": {"refine_weights": {"stiffness": 1}}}}, "invalid settings"),
        ({"config": {"settings": {"refine_steps": -1}}}, "refine_steps"),
        ({"config": {"rigidity_scale": -1.0}}, "rigidity_scale"),
        ({"rigidity": {"smooth": 1.0}}, "unknown rigidity weight"),
        ({"vertebra_steps": -1}, "vertebra alignment steps"),
    ],
)
def test_bad_choices_are_refused_by_name(kwargs, message):
    with pytest.raises(InputError, match=message):
        make_settings(**kwargs)


def test_config_files_are_checked(tmp_path):
    with pytest.raises(InputError, match="not found"):
        make_settings(config=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="cannot be read"):
        make_settings(config=tmp_path / "bad.json")
    (tmp_path / "keys.json").write_text(json.dumps({"refine_steps": 3}))  # outside "settings"
    with pytest.raises(InputError, match="keys among"):
        make_settings(config=tmp_path / "keys.json")


def test_vertebra_weights_by_label_name_or_alias_and_ones_left_out():
    names = {20: "L1", 21: "L2", 22: "L3"}
    weights = label_weights({"l1": 0.0, 21: 2.0, "22": 1.0, "Segment_9": 0.5}, names, {"SEGMENT_9": 20})
    assert weights == {20: 0.5, 21: 2.0, 22: 1.0}
    settings = make_settings(vertebra_weights=weights)
    assert settings.vertebra_weights == {20: 0.5, 21: 2.0}
    assert update_settings(settings, vertebra_weights={}).vertebra_weights is None
    with pytest.raises(InputError, match="not a vertebra"):
        label_weights({"C3": 1.0}, names)
    with pytest.raises(InputError, match=">= 0"):
        label_weights({"L1": -1.0}, names)
    assert parse_assignments(["L1=0", "L2=2,L3=0.5"]) == {"L1": 0.0, "L2": 2.0, "L3": 0.5}
    with pytest.raises(InputError, match="NAME=NUMBER"):
        parse_assignments("L1")

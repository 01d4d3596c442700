"""Training configs (training/config.py): YAML round trip, typos and bad values refused, every shipped config."""

from __future__ import annotations

import pytest
from conftest import REPO_ROOT
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.training import LossConfig, TrainConfig
from SpineRigidRegLib.training.config import DataConfig
from training_helpers import tiny_config

CONFIG_DIR = REPO_ROOT / "SpineRigidReg" / "SpineRigidRegLib" / "configs"
TABLE1_ROWS = {
    "baseline": set(),
    "pc": {"pc"},
    "oc": {"oc"},
    "rigid_dice": {"rigid_dice"},
    "rigid_field": {"rigid_field"},
    "pc_oc": {"pc", "oc"},
    "pc_rigid_dice": {"pc", "rigid_dice"},
    "pc_rigid_field": {"pc", "rigid_field"},
    "volume": {"volume"},
}


def test_config_yaml_round_trip(tmp_path):
    config = tiny_config(loss={"similarity": "ngf", "pc": 0.3, "rigid_field": 0.02}, schedule={"init_from": "a.pt"})
    path = tmp_path / "c.yaml"
    config.to_yaml(path)
    again = TrainConfig.from_yaml(path)
    assert again == config
    assert isinstance(again.data.crop_size, tuple) and isinstance(again.synthesis.intensity_ranges[0], tuple)
    assert again.loss.rigidity_weights() == {"rigid_field": 0.02, "pc": 0.3}


def test_config_rejects_typos_and_bad_values():
    with pytest.raises(InputError, match="unknown training config field.*lerning_rate"):
        TrainConfig.from_dict({"optim": {"lerning_rate": 1.0}})
    with pytest.raises(InputError, match="multiples of 16"):
        DataConfig(crop_size=(40, 48, 48), synth_size=(48, 48, 48))
    with pytest.raises(InputError, match="similarity"):
        LossConfig(similarity="ssd")
    with pytest.raises(InputError, match="pc"):
        LossConfig(pc=-1.0)
    with pytest.raises(InputError, match="real_data_dir"):
        DataConfig(real=1.0)


def test_every_shipped_config_loads_and_table1_rows_have_their_terms():
    paths = sorted(CONFIG_DIR.glob("*.yaml"))
    names = {p.stem for p in paths}
    assert set(TABLE1_ROWS) <= names and "default_cpu" in names
    for path in paths:
        config = TrainConfig.from_yaml(path)
        if path.stem in TABLE1_ROWS:
            assert set(config.loss.rigidity_weights()) == TABLE1_ROWS[path.stem], path.stem
            assert config.loss.similarity == "mind" and config.loss.smooth == 0.01 and config.loss.label_dice == 0
            assert (config.schedule.init_from is None) == (path.stem == "baseline"), path.stem

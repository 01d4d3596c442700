"""Helpers of the training tests (test_config, test_pairs, test_trainer, test_export): a tiny config, CSV logs."""

from __future__ import annotations

import csv
from pathlib import Path

from SpineRigidRegLib.training import TrainConfig

TINY_NETWORK = {"encoder_channels": [4, 8, 8, 8], "decoder_channels": [8, 8, 8, 8], "final_channels": [8]}


def tiny_config(**sections) -> TrainConfig:
    """A config that trains in well under a second per step: 32^3 phantom pairs, an 8-channel network."""
    base = {
        "name": "tiny",
        "network": dict(TINY_NETWORK),
        "data": {
            "phantom": 1.0,
            "crop_size": [32, 32, 32],
            "synth_size": [32, 32, 32],
            "pool_size": 2,
            "refresh_every": 3,
            "phantom_vertebrae": [2, 3],
            "validation_pairs": 0,
        },
        "optim": {"learning_rate": 2e-3},
        "schedule": {"steps": 4, "validate_every": 0, "checkpoint_every": 0, "checkpoint_minutes": 0, "log_every": 1},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return TrainConfig.from_dict(base)


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, encoding="utf-8") as stream:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(stream)]

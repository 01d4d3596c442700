"""The exported and bundled model (training/trainer.py's export_model, checkpoint.py's bundled loading): the card,
tampered or mismatched weights, and what the bundled network and pipeline achieve on phantom pairs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from SpineRigidRegLib import metrics
from SpineRigidRegLib.checkpoint import load_bundled_network, load_network, resources_dir, save_checkpoint, sha256_of
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.network import NetworkConfig, RegistrationNet
from SpineRigidRegLib.training import TrainConfig, train
from SpineRigidRegLib.training.config import DataConfig
from SpineRigidRegLib.training.pairs import center_crop, make_pair
from SpineRigidRegLib.warp import warp_labels
from training_helpers import TINY_NETWORK, tiny_config


@pytest.mark.parametrize("spacing_mm", [1.0, 2.0])
def test_export_ships_the_best_weights_with_a_card_and_runs_them_on_the_pipelines_1mm_grid(tmp_path, spacing_mm):
    from SpineRigidRegLib.training.trainer import export_model

    config = tiny_config(data={"spacing_mm": spacing_mm}, schedule={"steps": 2, "validate_every": 1})
    result = train(config, tmp_path / "run", progress=False, tensorboard=False)
    card = export_model([tmp_path / "run"], tmp_path / "models", name="m", device_label="CPU (test)")
    assert card["sha256"] == sha256_of(tmp_path / "models" / "m.pt") and card["device"] == "CPU (test)"
    assert card["training"]["stages"][0]["steps"] == 2
    shipped = load_bundled_network(card_path=str(tmp_path / "models" / "m.json"))
    trained = load_network(tmp_path / "run" / "best.pt")
    fixed, moving = torch.rand(1, 1, 64, 32, 32), torch.rand(1, 1, 64, 32, 32)
    labels = (torch.rand(1, 1, 64, 32, 32) > 0.8).long()
    with torch.no_grad():
        out = shipped(fixed, moving, labels).displacement
    assert out.shape == (1, 3, 64, 32, 32)
    if spacing_mm == 1.0:
        assert shipped.config == trained.config
        with torch.no_grad():
            torch.testing.assert_close(out, trained(fixed, moving, labels).displacement)
    else:
        # trained on 2 mm pairs: shipped to average the 1 mm inputs to 2 mm, the same weights, a 1 mm field
        assert shipped.config.input_resolution == "half" and trained.config.input_resolution == "full"
        pool = torch.nn.functional.avg_pool3d
        with torch.no_grad():
            coarse = trained(pool(fixed, 2), pool(moving, 2), (pool(labels.float(), 2) >= 0.5).long()).velocity
        torch.testing.assert_close(shipped(fixed, moving, labels).velocity, coarse)
    assert result.step == 2


def test_tampered_or_mismatched_weights_get_a_clear_error(tmp_path):
    network = RegistrationNet(NetworkConfig(**{k: tuple(v) for k, v in TINY_NETWORK.items()}))
    weights = save_checkpoint(tmp_path / "m.pt", network)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"weights": "m.pt", "sha256": sha256_of(weights)}), encoding="utf-8")
    load_bundled_network(card_path=str(card))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum"):
        load_bundled_network(card_path=str(card))
    other = RegistrationNet(NetworkConfig(**{k: tuple(v) for k, v in TINY_NETWORK.items()}))
    state = {
        "format": "spinerigidreg-checkpoint",
        "version": 1,
        "config": NetworkConfig().to_dict(),
        "state_dict": other.state_dict(),
    }
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(InputError, match="does not match its own architecture"):
        load_network(tmp_path / "mismatch.pt")


BUNDLED_CARD = resources_dir() / "Models" / "default.json"


@pytest.fixture(scope="module")
def bundled():
    if not BUNDLED_CARD.is_file():
        pytest.skip(f"no bundled model: {BUNDLED_CARD} is absent (train it with srr-train, see docs)")
    card = json.loads(BUNDLED_CARD.read_text(encoding="utf-8"))
    return card, load_bundled_network()


def test_bundled_model_card_describes_the_weights(bundled):
    card, network = bundled
    assert card["sha256"] == sha256_of(BUNDLED_CARD.parent / card["weights"])
    assert NetworkConfig.from_dict(card["network"]) == network.config
    assert (BUNDLED_CARD.parent / card["weights"]).stat().st_size < 8 * 2**20
    for key in ("training", "validation", "device", "steps", "git_commit"):
        assert key in card, key
    # A tampered copy of the real weights is refused.
    copy = Path(shutil.copy(BUNDLED_CARD.parent / card["weights"], Path(os.environ.get("TMPDIR", "/tmp")) / "d.pt"))
    try:
        data = bytearray(copy.read_bytes())
        data[-100] ^= 0x01
        copy.write_bytes(bytes(data))
        with pytest.raises(InputError, match="checksum"):
            load_network(copy, expected_sha256=card["sha256"])
    finally:
        copy.unlink()


@pytest.fixture(scope="module")
def bundled_scores(bundled) -> dict[str, float]:
    """Mean per-vertebra DSC / rigid DSC of the bundled model on two 64^3 phantom pairs (1 mm, pre-aligned as the
    pipeline pre-aligns): initial alignment, network alone, and the pipeline's default (network + vertebra-wise
    rigid alignment)."""
    from SpineRigidRegLib.pipeline import ProcessingPair, RegistrationSettings, register_prealigned

    _, network = bundled
    torch.set_num_threads(1)
    data = DataConfig(crop_size=(64, 64, 64), synth_size=(64, 64, 64), phantom_vertebrae=(3, 4))
    synthesis = TrainConfig().synthesis
    scores: dict[str, list[float]] = {
        "initial": [],
        "network": [],
        "pipeline": [],
        "rigid_network": [],
        "rigid_pipeline": [],
    }
    for seed in (11, 12):
        pair = center_crop(make_pair("phantom", seed, data, synthesis), data.crop_size)
        values = sorted(int(v) for v in torch.unique(pair.moving_labels).tolist() if v > 0)
        with torch.inference_mode():
            net_field = network(pair.fixed, pair.moving, pair.moving_labels).displacement
        field, _, _ = register_prealigned(
            ProcessingPair(pair.fixed, pair.moving, pair.moving_labels, (1.0, 1.0, 1.0)),
            network,
            RegistrationSettings(device="cpu"),
        )
        for key, u in (("network", net_field), ("pipeline", field)):
            warped = warp_labels(pair.moving_labels, u, label_values=values)
            scores[key] += list(metrics.dice_per_label(warped, pair.fixed_labels, values).values())
        scores["initial"] += list(metrics.dice_per_label(pair.moving_labels, pair.fixed_labels, values).values())
        for key, u in (("rigid_network", net_field), ("rigid_pipeline", field)):
            scores[key] += list(metrics.rigid_dice_per_label(pair.moving_labels, u, label_values=values).values())
    return {key: sum(v) / len(v) for key, v in scores.items()}


def test_bundled_network_keeps_vertebrae_rigid_and_degrades_nothing(bundled_scores):
    assert bundled_scores["rigid_network"] >= 0.95, bundled_scores
    assert bundled_scores["network"] >= bundled_scores["initial"] - 0.01, bundled_scores


def test_default_pipeline_improves_dsc_over_the_initial_alignment_and_keeps_vertebrae_rigid(bundled_scores):
    assert bundled_scores["pipeline"] > bundled_scores["initial"] + 0.02, bundled_scores
    assert bundled_scores["rigid_pipeline"] >= 0.95, bundled_scores


@pytest.mark.xfail(
    reason="the bundled model was trained for about an hour on 2 CPU cores and stays near the identity "
    "(Resources/Models/default.json, 'limitations'); a GPU-trained model should make this pass",
    strict=False,
)
def test_bundled_network_alone_improves_dsc_over_the_initial_alignment(bundled_scores):
    assert bundled_scores["network"] > bundled_scores["initial"] + 0.01, bundled_scores

"""Checkpoints: exact round trip, safe loading (weights only, checksum, strict), device selection."""

from __future__ import annotations

import os

import pytest
import torch
from SpineRigidRegLib.checkpoint import (
    CHECKPOINT_FORMAT,
    load_network,
    read_checkpoint,
    save_checkpoint,
    select_device,
    sha256_of,
)
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.network import NetworkConfig, RegistrationNet

SMALL = NetworkConfig(
    encoder_channels=(4, 4, 8, 8), decoder_channels=(8, 8, 8, 8), final_channels=(4, 4), velocity_resolution="full"
)


class Payload:
    """Unpickling this would create a folder: proof that pickled code ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(3)
    net = RegistrationNet(SMALL)
    with torch.no_grad():  # a non-trivial velocity head, so that outputs differ from the identity
        net.velocity_head.weight.normal_(std=0.05)
    path = save_checkpoint(tmp_path / "models" / "net.pt", net, epoch=4, best_loss=0.25)
    return net, path


def test_round_trip_gives_identical_outputs_and_keeps_extras(trained):
    net, path = trained
    loaded = load_network(path)
    assert loaded.config == net.config and not loaded.training
    gen = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(1, 1, 16, 16, 32, generator=gen), torch.rand(1, 1, 16, 16, 32, generator=gen)
    labels = (fixed > 0.6).long()
    net.eval()
    with torch.no_grad():
        expected, actual = net(fixed, moving, labels), loaded(fixed, moving, labels)
    assert float(expected.displacement.abs().max()) > 1e-3
    torch.testing.assert_close(actual.displacement, expected.displacement, rtol=0, atol=0)
    payload = read_checkpoint(path, expected_sha256=sha256_of(path).upper())
    assert payload["format"] == CHECKPOINT_FORMAT and payload["epoch"] == 4 and payload["best_loss"] == 0.25
    assert not list(path.parent.glob("*.tmp"))  # the temporary file was renamed


def test_loading_runs_no_pickled_code(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    net = RegistrationNet(SMALL)
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "config": SMALL.to_dict(), "state_dict": net.state_dict()}
    torch.save({**payload, "extra": Payload(str(marker))}, path)
    with pytest.raises(InputError, match="cannot read model file evil.pt"):
        load_network(path)
    assert not marker.exists()


def test_checksum_mismatch_names_the_problem(trained):
    _, path = trained
    with pytest.raises(InputError, match="fails its checksum"):
        load_network(path, expected_sha256="0" * 64)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file_is_an_input_error(trained, keep):
    _, path = trained
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match="cannot read model file net.pt"):
        load_network(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(InputError, match="model file not found"):
        load_network(tmp_path / "absent.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="not a SpineRigidReg checkpoint"):
        load_network(tmp_path / "foreign.pt")
    torch.save({"format": CHECKPOINT_FORMAT, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(InputError, match="needs a newer SpineRigidReg"):
        load_network(tmp_path / "future.pt")


@pytest.mark.parametrize("change", ["config", "missing_key", "extra_key"])
def test_config_and_weights_that_disagree_are_refused(trained, tmp_path, change):
    _, path = trained
    payload = torch.load(path, weights_only=True)
    if change == "config":  # wider final convolutions than the stored weights
        payload["config"] = {**payload["config"], "final_channels": [8, 8]}
    elif change == "missing_key":
        payload["state_dict"].pop("velocity_head.bias")
    else:
        payload["state_dict"]["encoder.0.0.scale"] = torch.ones(1)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="does not match its own architecture"):
        load_network(tmp_path / "bad.pt")


def test_unknown_config_key_is_refused(trained, tmp_path):
    _, path = trained
    payload = torch.load(path, weights_only=True)
    payload["config"]["attention"] = True
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="unknown network settings"):
        load_network(tmp_path / "bad.pt")


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("CPU") == torch.device("cpu")
    expected_auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("auto") == expected_auto and select_device(None) == expected_auto
    if torch.cuda.is_available():
        assert select_device("cuda").type == "cuda"
    else:  # documented: an unavailable GPU is an error, never a silent CPU fallback
        with pytest.raises(InputError, match="CUDA GPU was requested but none is available"):
            select_device("cuda")
        with pytest.raises(InputError, match="none is available"):
            select_device("cuda:1")
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        select_device("tpu")


def test_malformed_or_missing_gpu_is_an_input_error(monkeypatch):
    # simulate a machine with one GPU (nothing is allocated on it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("cuda") == torch.device("cuda")
    assert select_device("cuda:0") == torch.device("cuda", 0)
    assert select_device("auto").type == "cuda"
    with pytest.raises(InputError, match="no GPU 'cuda:1'"):
        select_device("cuda:1")
    with pytest.raises(InputError, match="unknown device 'cuda:x'"):
        select_device("cuda:x")

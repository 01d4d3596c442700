"""The training loop (training/trainer.py): loss decreases, exact resume, time limit, fine-tuning, validation
figures, loss terms, DDP, and the srr-train / srr-ablation command lines."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from SpineRigidRegLib import metrics
from SpineRigidRegLib.checkpoint import load_network
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.losses.rigidity import RIGIDITY_LOSSES
from SpineRigidRegLib.network import NetworkConfig, RegistrationNet
from SpineRigidRegLib.training import LossConfig, TrainConfig, registration_loss, train
from SpineRigidRegLib.training.pairs import PairPool, TrainingPair, make_pair
from SpineRigidRegLib.training.trainer import evaluate, pair_figures
from training_helpers import TINY_NETWORK, read_csv, tiny_config

# ------------------------------------------------------------------------------------------------ loop


def test_a_few_steps_lower_the_loss_on_a_fixed_pair(tmp_path):
    config = tiny_config(
        data={
            "pool_size": 1,
            "refresh_every": 0,
            "augment_flip": False,
            "augment_permute": False,
            "augment_gamma": 0.0,
        },
        optim={"learning_rate": 5e-3},
        schedule={"steps": 12},
    )
    pool = PairPool(config.data, config.synthesis, seed=config.schedule.seed)
    pool.sync(0)
    pair = pool.batch(0)  # the one pair every step trains on
    torch.manual_seed(config.schedule.seed)
    start, _ = registration_loss(RegistrationNet(config.network), pair, config.loss, (1.0, 1.0, 1.0))
    result = train(config, tmp_path / "run", progress=False, tensorboard=False)
    end, _ = registration_loss(result.network, pair, config.loss, (1.0, 1.0, 1.0))
    assert float(end.detach()) < 0.97 * float(start.detach())
    rows = read_csv(tmp_path / "run" / "train.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert rows[0]["loss"] == pytest.approx(float(start.detach()), rel=1e-5)
    assert (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "run" / "best.pt").is_file()


def test_resume_continues_from_the_same_step_with_the_same_loss(tmp_path):
    config = tiny_config(schedule={"steps": 6})
    full = train(config, tmp_path / "full", progress=False, tensorboard=False)
    train(config.override(schedule={"steps": 3}), tmp_path / "cut", progress=False, tensorboard=False)
    with pytest.raises(InputError, match="resume"):
        train(config, tmp_path / "cut", progress=False, tensorboard=False)
    resumed = train(config, tmp_path / "cut", resume=True, progress=False, tensorboard=False)
    a, b = read_csv(tmp_path / "full" / "train.csv"), read_csv(tmp_path / "cut" / "train.csv")
    assert [int(r["step"]) for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7)
    assert resumed.step == 6
    for p, q in zip(full.network.parameters(), resumed.network.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU training recipe runs it first)")
def test_training_on_the_gpu_with_mixed_precision_lowers_the_loss_and_exports_cpu_weights(tmp_path):
    config = tiny_config(
        data={"pool_size": 1, "refresh_every": 0, "augment_flip": False, "augment_permute": False, "augment_gamma": 0},
        loss={"pc": 0.1, "rigid_field": 0.01, "label_dice": 1.0, "field": 0.1},
        optim={"learning_rate": 5e-3},
        schedule={"steps": 12, "amp": True},
    )
    result = train(config, tmp_path / "run", device="cuda", progress=False, tensorboard=False)
    losses = [r["loss"] for r in read_csv(tmp_path / "run" / "train.csv")]
    assert all(torch.isfinite(torch.tensor(losses))) and min(losses[-3:]) < losses[0], losses
    assert result.device.startswith("cuda")
    assert load_network(tmp_path / "run" / "best.pt").config == config.network


def test_a_time_limit_stops_cleanly_and_resume_continues(tmp_path):
    # A limit already spent at the first step: that step is trained, validated and checkpointed, then the run stops.
    config = tiny_config(schedule={"steps": 3, "max_minutes": 1e-9})
    stopped = train(config, tmp_path / "run", progress=False, tensorboard=False)
    assert stopped.step == 1 and (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "run" / "best.pt").is_file()
    resumed = train(config.override(schedule={"max_minutes": 0}), tmp_path / "run", resume=True, progress=False)
    assert resumed.step == 3
    assert [int(r["step"]) for r in read_csv(tmp_path / "run" / "train.csv")] == [1, 2, 3]


def test_fine_tuning_starts_from_the_given_checkpoint(tmp_path):
    config = tiny_config(schedule={"steps": 2})
    base = train(config, tmp_path / "base", progress=False, tensorboard=False)
    tuned = config.override(schedule={"steps": 0, "init_from": str(tmp_path / "base" / "best.pt")})
    result = train(tuned, tmp_path / "tuned", progress=False, tensorboard=False)
    for p, q in zip(base.network.parameters(), result.network.parameters()):
        assert torch.equal(p, q)
    other = tiny_config(network={"final_channels": [4]}, schedule={"init_from": str(tmp_path / "base" / "best.pt")})
    with pytest.raises(InputError, match="architecture"):
        train(other, tmp_path / "other", progress=False, tensorboard=False)


def test_validation_figures_of_the_identity_and_of_the_true_field():
    config = tiny_config()
    pair = make_pair("phantom", 5, config.data, config.synthesis)
    identity = evaluate(None, [pair], (1.0, 1.0, 1.0))
    assert identity["rigid_dice"] == 1.0 and identity["abs_volume_change_percent"] == 0.0
    assert 0.0 < identity["dice"] < 1.0
    # A network that moves nothing scores exactly the identity.
    assert evaluate(RegistrationNet(config.network), [pair], (1.0, 1.0, 1.0))["dice"] == pytest.approx(
        identity["dice"], abs=0.02
    )
    assert pair_figures(pair, torch.zeros((1, 3, 32, 32, 32)), (1.0, 1.0, 1.0))["folding_percent"] == 0.0


def test_label_dice_loss_is_zero_when_aligned_one_when_disjoint_and_pulls_toward_the_fixed_labels():
    from SpineRigidRegLib.training.trainer import label_dice_loss

    labels = torch.zeros((1, 1, 16, 16, 16), dtype=torch.int64)
    labels[..., 4:8, 4:12, 4:12] = 3
    zero = torch.zeros((1, 3, 16, 16, 16), requires_grad=True)
    assert float(label_dice_loss(labels, labels, zero).detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(label_dice_loss(labels, torch.zeros_like(labels), zero).detach()) == pytest.approx(1.0)
    shifted = torch.roll(labels, 2, dims=2)  # fixed vertebra 2 voxels further along D: u_D = -2 aligns it
    loss = label_dice_loss(labels, shifted, zero)
    loss.backward()
    assert 0.0 < float(loss.detach()) < 1.0 and float(zero.grad[0, 0].sum()) > 0  # descent direction: u_D decreases
    aligned = torch.zeros((1, 3, 16, 16, 16))
    aligned[:, 0] = -2.0
    assert float(label_dice_loss(labels, shifted, aligned).detach()) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------- rigidity


def _toy_pair() -> TrainingPair:
    """Two bright boxes (vertebrae 1 and 2) that are 50 % taller in the fixed image: plain similarity wants to
    stretch them, which every rigidity term resists."""
    moving_labels = torch.zeros((1, 1, 32, 32, 32), dtype=torch.int64)
    fixed_labels = torch.zeros_like(moving_labels)
    moving_labels[..., 8:14, 10:22, 10:22] = 1
    moving_labels[..., 18:24, 10:22, 10:22] = 2
    fixed_labels[..., 6:15, 10:22, 10:22] = 1
    fixed_labels[..., 17:26, 10:22, 10:22] = 2
    return TrainingPair(
        fixed=(fixed_labels > 0).float() * 0.8 + 0.1,
        moving=(moving_labels > 0).float() * 0.8 + 0.1,
        moving_labels=moving_labels,
        fixed_labels=fixed_labels,
    )


def test_field_term_counts_the_error_over_the_fixed_vertebrae_only():
    pair = _toy_pair()
    network = RegistrationNet(NetworkConfig(**{k: tuple(v) for k, v in TINY_NETWORK.items()}))
    with torch.no_grad():
        predicted = network(pair.fixed, pair.moving, pair.moving_labels).displacement
    bone = pair.fixed_labels > 0
    # The true field: the prediction + 2 voxels along H on the vertebrae, anything at all in the soft tissue.
    truth = predicted + torch.where(bone, 2.0, 40.0) * torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1, 1)
    with_truth = TrainingPair(pair.fixed, pair.moving, pair.moving_labels, pair.fixed_labels, "", truth)
    _, terms = registration_loss(network, with_truth, LossConfig(field=1.0), (1.0, 1.0, 1.0))
    assert terms["field"] == pytest.approx(5.0**0.5 - 1.0, rel=1e-4)  # Charbonnier of a 2-voxel error


def _fit(loss: LossConfig, pair: TrainingPair, steps: int = 15) -> torch.Tensor:
    torch.manual_seed(0)
    network = RegistrationNet(NetworkConfig(**{k: tuple(v) for k, v in TINY_NETWORK.items()}))
    optimizer = torch.optim.AdamW(network.parameters(), lr=5e-3)
    for _ in range(steps):
        total, _ = registration_loss(network, pair, loss, (1.0, 1.0, 1.0))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    with torch.no_grad():
        return network(pair.fixed, pair.moving, pair.moving_labels).displacement


@pytest.mark.slow
def test_each_rigidity_term_lowers_its_own_metric_against_the_baseline():
    torch.set_num_threads(1)
    pair = _toy_pair()
    baseline = _fit(LossConfig(smooth=0.001), pair)
    assert float(baseline.abs().max()) > 1.0  # the baseline does stretch the boxes
    fields = {}
    for name, weight in (("pc", 10.0), ("oc", 2.0), ("rigid_dice", 1.0), ("rigid_field", 1.0), ("volume", 10.0)):
        fields[name] = _fit(LossConfig(smooth=0.001, **{name: weight}), pair)
        own = RIGIDITY_LOSSES[name]
        assert float(own(pair.moving_labels, fields[name])) < 0.8 * float(own(pair.moving_labels, baseline)), name
    # The crisp evaluation metric agrees: rigid DSC of the rigid-Dice model beats the baseline's.
    tuned = metrics.rigid_dice_per_label(pair.moving_labels, fields["rigid_dice"])
    plain = metrics.rigid_dice_per_label(pair.moving_labels, baseline)
    assert min(tuned.values()) > max(plain.values())


# ------------------------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
        }
    )
    torch.set_num_threads(1)
    result = train(
        tiny_config(schedule={"steps": 2}), Path(folder) / "run", device="cpu", progress=False, tensorboard=False
    )
    torch.save(result.network.state_dict(), Path(folder) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_process_gloo_ddp_ends_with_identical_weights(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    torch.manual_seed(0)
    initial = RegistrationNet(tiny_config().network).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # it trained
    assert (tmp_path / "run" / "last.pt").is_file() and not (tmp_path / "run1").exists()


# ------------------------------------------------------------------------------------------------- CLIs


def test_srr_train_command_line(tmp_path, capsys):
    from SpineRigidRegLib.cli.train import main

    path = tmp_path / "tiny.yaml"
    tiny_config().to_yaml(path)
    code = main(
        [
            "--config",
            str(path),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "2",
            "--device",
            "cpu",
            "--quiet",
            "--no-tensorboard",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["device"] == "cpu"
    assert main(["--config", "no_such_config", "--quiet"]) == 2
    assert "shipped configs" in capsys.readouterr().err


@pytest.mark.slow
def test_srr_ablation_trains_the_baseline_then_fine_tunes_rows_from_its_milestone(tmp_path, capsys):
    from SpineRigidRegLib.cli.ablation import main

    path = tmp_path / "tiny.yaml"
    tiny_config().to_yaml(path)
    out = tmp_path / "ablation"
    code = main(
        [
            "--base",
            str(path),
            "--rows",
            "pc_rigid_field",
            "volume",
            "--baseline-steps",
            "3",
            "--finetune-steps",
            "1",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["format"] == "spinerigidreg-ablation" and manifest["milestone_step"] == 2
    assert [row["name"] for row in manifest["rows"]] == ["baseline", "pc_rigid_field", "volume"]
    rows = {row["name"]: row for row in manifest["rows"]}
    assert rows["pc_rigid_field"]["loss"]["pc"] > 0 and rows["pc_rigid_field"]["loss"]["rigid_field"] > 0
    assert rows["baseline"]["loss"]["pc"] == 0 and rows["volume"]["loss"]["volume"] > 0
    for row in manifest["rows"]:
        network = load_network(out / row["checkpoint"])
        assert network.config == tiny_config().network
    tuned = TrainConfig.from_yaml(out / "pc_rigid_field" / "config.yaml")
    assert tuned.schedule.init_from == str(out / "baseline" / "milestone.pt") and tuned.schedule.steps == 1
    assert read_csv(out / "pc_rigid_field" / "train.csv")[0]["rigidity"] > 0
    assert "Initial" in capsys.readouterr().out

    # Round trip: the benchmark takes the manifest the ablation wrote (docs/TRAINING.md's command).
    from SpineRigidRegLib.benchmark import runner

    methods, _ = runner.default_methods(manifest=out / "manifest.json", include_bundled=False)
    models = [m for m in methods if m.kind == runner.KIND_MODEL]
    assert [m.name for m in models] == ["Baseline", "PC + rigid field", "Volume loss"]
    for method, row in zip(models, manifest["rows"], strict=True):
        assert method.checkpoint == str(out / row["checkpoint"]) and method.vertebra_rigid_steps == 0

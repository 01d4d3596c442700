"""How the networks run for inference: the precision choice, and bfloat16 close to float32 where it is used."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SpineRigidRegLib import inference
from SpineRigidRegLib.checkpoint import resources_dir
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.network import NetworkConfig, RegistrationNet
from SpineRigidRegLib.pipeline import RegistrationSettings, network_velocity
from SpineRigidRegLib.processing import ProcessingPair
from SpineRigidRegLib.segmentation.predict import BONE_THRESHOLD, load_bundled_segmentation, predict_bone

SMALL = {"encoder_channels": (8, 8, 16, 16), "decoder_channels": (16, 16, 16, 16), "final_channels": (8, 8)}


@pytest.fixture
def bfloat16_cpu(monkeypatch):
    """Run "auto" in bfloat16 on any CPU (slower without bfloat16 units, the same arithmetic): the tests hold on
    every machine."""
    monkeypatch.setattr(inference, "native_bfloat16", lambda device: torch.device(device).type == "cpu")


def test_an_unknown_precision_is_refused_in_one_line():
    with pytest.raises(InputError, match="network precision must be one of auto, float32, got 'half'"):
        RegistrationSettings(network_precision="half")
    assert RegistrationSettings().network_precision == "auto"


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"), [(True, False, True), (False, True, True), (False, False, False)]
)
def test_auto_is_bfloat16_only_on_a_cpu_with_bfloat16_units_and_float32_is_float32_everywhere(
    monkeypatch, amx, avx512_bf16, expected
):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert inference.uses_bfloat16("cpu", "auto") is expected  # emulated bfloat16 may be slower than float32
    assert not inference.uses_bfloat16("cpu", "float32")
    assert not inference.uses_bfloat16("cuda", "auto")  # not measured on GPUs


def test_a_torch_without_the_cpu_queries_runs_float32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert not inference.native_bfloat16("cpu")


def _trained_like_network() -> RegistrationNet:
    """A registration network whose velocity is far from zero (a fresh one starts at the identity)."""
    torch.manual_seed(0)
    net = RegistrationNet(NetworkConfig(**SMALL)).eval()
    torch.nn.init.normal_(net.velocity_head.weight, std=0.05)
    return inference.with_fast_layout(net)


def test_the_bfloat16_velocity_is_float32_and_within_3_percent_of_the_float32_one(bfloat16_cpu):
    net = _trained_like_network()
    gen = torch.Generator().manual_seed(1)
    fixed, moving = torch.rand(1, 1, 32, 32, 48, generator=gen), torch.rand(1, 1, 32, 32, 48, generator=gen)
    labels = (torch.rand(1, 1, 32, 32, 48, generator=gen) > 0.7).long() * 21
    pair = ProcessingPair(fixed, moving, labels, (1.0, 1.0, 1.0))
    exact = network_velocity(pair, net, "float32")
    fast = network_velocity(pair, net, "auto")
    assert fast.dtype == torch.float32 and fast.is_contiguous()  # what the stages after the network expect
    assert float(exact.abs().max()) > 0.1 and not torch.equal(fast, exact)  # bfloat16 did run
    assert float((fast - exact).norm() / exact.norm()) < 0.03


def test_the_bundled_mr_segmentation_finds_the_same_bone_in_bfloat16(bfloat16_cpu):
    mr = sitk.ReadImage(str(resources_dir() / "SampleData" / "mr.nii.gz"))
    network = inference.with_fast_layout(load_bundled_segmentation())
    exact = sitk.GetArrayFromImage(predict_bone(mr, network, precision="float32")) > BONE_THRESHOLD
    fast = sitk.GetArrayFromImage(predict_bone(mr, network, precision="auto")) > BONE_THRESHOLD
    assert exact.sum() > 1000
    assert 2.0 * np.count_nonzero(exact & fast) / (exact.sum() + fast.sum()) > 0.99


def test_pooling_under_bfloat16_autocast_stays_in_bfloat16_and_exact():
    x = torch.randn(1, 4, 8, 8, 8).to(torch.bfloat16)
    with inference.network_arithmetic("cpu", "float32"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.max_pool3d(x, 2).dtype == torch.float32  # what autocast alone does
        pooled = inference.exact_in_own_dtype(torch.nn.functional.max_pool3d, x, 2)
        grown = inference.exact_in_own_dtype(torch.nn.functional.interpolate, x, scale_factor=2.0, mode="nearest")
    assert pooled.dtype == grown.dtype == torch.bfloat16
    assert torch.equal(pooled.float(), torch.nn.functional.max_pool3d(x.float(), 2))
    assert torch.equal(grown.float(), torch.nn.functional.interpolate(x.float(), scale_factor=2.0, mode="nearest"))

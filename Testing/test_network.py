"""The diffeomorphic VoxelMorph network: the paper's architecture, shapes, identity start, input checks."""

from __future__ import annotations

import pytest
import torch
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.inference import with_fast_layout
from SpineRigidRegLib.network import NetworkConfig, RegistrationNet
from SpineRigidRegLib.pipeline import network_velocity
from SpineRigidRegLib.processing import ProcessingPair

SMALL = {"encoder_channels": (4, 4, 8, 8), "decoder_channels": (8, 8, 8, 8), "final_channels": (4, 4)}


def inputs(shape, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fixed = torch.rand(batch, 1, *shape, generator=gen)
    moving = torch.rand(batch, 1, *shape, generator=gen)
    labels = (torch.rand(batch, 1, *shape, generator=gen) > 0.7).long() * 21
    return fixed, moving, labels


def conv_widths(sequence):
    return [(m.in_channels, m.out_channels) for m in sequence.modules() if isinstance(m, torch.nn.Conv3d)]


def test_default_config_is_the_papers_network():
    config = NetworkConfig()
    assert config.encoder_channels == (32, 32, 64, 64)
    assert config.decoder_channels == (64, 64, 64, 64)
    assert config.final_channels == (32, 32)
    assert config.integration_steps == 7
    assert config.required_multiple == 16
    assert config.in_channels == 3 and NetworkConfig(use_moving_labels=False).in_channels == 2
    net = RegistrationNet(NetworkConfig(velocity_resolution="full"))
    assert [w for _, w in conv_widths(net.encoder)] == [32, 32, 64, 64]
    assert conv_widths(net.encoder)[0][0] == 3
    assert [w for _, w in conv_widths(net.decoder)] == [64, 64, 64, 64]
    # skip connections: each decoder level after the first also sees the matching encoder level
    assert [c for c, _ in conv_widths(net.decoder)] == [64, 64 + 64, 64 + 64, 64 + 32]
    assert conv_widths(net.final) == [(64 + 32, 32), (32, 32)]
    assert (net.velocity_head.in_channels, net.velocity_head.out_channels) == (32, 3)
    assert net.velocity_head.kernel_size == (3, 3, 3)


@pytest.mark.parametrize("input_resolution", ["full", "half"])
@pytest.mark.parametrize("resolution", ["full", "half"])
def test_output_shapes_on_non_cubic_inputs(resolution, input_resolution):
    config = NetworkConfig(velocity_resolution=resolution, input_resolution=input_resolution, **SMALL)
    assert config.required_multiple == (16 if input_resolution == "full" else 32)
    shape = (32, 64, 96)
    net = RegistrationNet(config)
    fixed, moving, labels = inputs(shape, batch=2)
    with torch.no_grad():
        out = net(fixed, moving, labels)
    assert out.displacement.shape == (2, 3, *shape)
    factor = (1 if resolution == "full" else 2) * (1 if input_resolution == "full" else 2)
    assert out.velocity.shape == (2, 3, *(s // factor for s in shape))
    assert out.displacement.dtype == torch.float32 and torch.isfinite(out.displacement).all()
    with torch.no_grad():  # the pipeline's call: the velocity alone, not integrated
        assert torch.equal(net.velocity(fixed, moving, labels), out.velocity)


def test_default_network_runs_on_a_small_non_cubic_input():
    net = RegistrationNet()
    with torch.no_grad():
        out = net(*inputs((16, 16, 32)))
    assert out.displacement.shape == (1, 3, 16, 16, 32) and out.velocity.shape == (1, 3, 8, 8, 16)


def test_the_fast_layout_gives_the_same_velocity():
    """Channels-last weights (the pipeline's CPU inference layout) change only the order of the sums."""
    torch.manual_seed(0)
    net = RegistrationNet(NetworkConfig(**SMALL)).eval()
    torch.nn.init.normal_(net.velocity_head.weight, std=0.05)  # a velocity well away from zero
    fixed, moving, labels = inputs((16, 32, 48))
    with torch.no_grad():
        standard = net.velocity(fixed, moving, labels)
        fast = with_fast_layout(net).velocity(fixed, moving, labels)
    assert net.encoder[0][0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert float(standard.abs().max()) > 0.1
    assert torch.allclose(fast, standard, atol=1e-5, rtol=1e-4)
    # The pipeline hands the stages after it a velocity in the standard layout (their grid reads assume it).
    piped = network_velocity(ProcessingPair(fixed, moving, labels, (1.0, 1.0, 1.0)), net)
    assert piped.is_contiguous() and torch.equal(piped, fast)


@pytest.mark.parametrize("resolution", ["full", "half"])
def test_fresh_network_starts_near_the_identity_and_trains(resolution):
    torch.manual_seed(0)
    net = RegistrationNet(NetworkConfig(velocity_resolution=resolution, **SMALL))
    head = net.velocity_head
    assert float(head.weight.detach().abs().max()) < 1e-3 and float(head.bias.detach().abs().max()) == 0
    fixed, moving, labels = inputs((16, 16, 32))
    out = net(fixed, moving, labels)
    assert float(out.displacement.detach().abs().max()) < 1e-3  # voxels
    out.displacement.square().mean().backward()
    assert net.velocity_head.weight.grad is not None and float(net.velocity_head.weight.grad.abs().sum()) > 0
    assert net.encoder[0][0].weight.grad is not None


def test_features_keep_their_scale_down_to_the_bottleneck_and_back():
    # The paper-size network at initialisation: a default-initialised UNet lost ~10x of its signal by the bottleneck,
    # and with it the gradients of every deep layer.
    torch.manual_seed(0)
    net = RegistrationNet()
    scale = {}

    def record(name):
        return lambda module, inputs_, output: scale.__setitem__(name, float(output.std()))

    for name in ("encoder.0", "encoder.3", "decoder.0", "final"):
        net.get_submodule(name).register_forward_hook(record(name))
    with torch.no_grad():
        net(*inputs((32, 32, 32)))
    assert all(0.3 < scale[name] / scale["encoder.0"] < 4.0 for name in scale), scale


def test_state_dict_holds_only_weights_no_grids():
    for resolution in ("full", "half"):
        net = RegistrationNet(NetworkConfig(velocity_resolution=resolution, **SMALL))
        assert not list(net.buffers())
        params = dict(net.named_parameters())
        assert set(net.state_dict()) == set(params)
        with torch.no_grad():
            net(*inputs((16, 16, 32)))
            net(*inputs((32, 16, 16)))
        assert set(net.state_dict()) == set(params)  # running on new sizes adds nothing


def test_labels_enter_only_as_a_binary_mask_and_are_optional_when_configured():
    net = RegistrationNet(NetworkConfig(**SMALL))
    fixed, moving, labels = inputs((16, 16, 16))
    with torch.no_grad():
        a = net(fixed, moving, labels).velocity
        b = net(fixed, moving, (labels > 0).long()).velocity
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    no_labels = RegistrationNet(NetworkConfig(use_moving_labels=False, **SMALL))
    assert no_labels.encoder[0][0].in_channels == 2
    with torch.no_grad():
        assert no_labels(fixed, moving).displacement.shape == (1, 3, 16, 16, 16)


@pytest.mark.parametrize("input_resolution", ["full", "half"])
def test_a_label_guided_network_reads_the_fixed_bone_and_refuses_to_run_without_it(input_resolution):
    net = RegistrationNet(NetworkConfig(use_fixed_bone=True, input_resolution=input_resolution, **SMALL))
    assert net.encoder[0][0].in_channels == 4
    fixed, moving, labels = inputs((32, 32, 32))
    bone = (labels > 0).float()
    with torch.no_grad():
        torch.nn.init.normal_(net.velocity_head.weight, std=0.1)  # a trained head: the input must reach the output
        a = net(fixed, moving, labels, bone).velocity
        b = net(fixed, moving, labels, torch.zeros_like(bone)).velocity
    assert not torch.allclose(a, b)
    with pytest.raises(InputError, match="bone probability"):
        net(fixed, moving, labels)
    with pytest.raises(InputError, match="fixed bone probability"):
        net(fixed, moving, labels, bone[:, :, :16])


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_divisible", "multiple of 16"),
        ("two_channel_fixed", "fixed image must have 1 channel"),
        ("four_d", "moving image must be 5-D"),
        ("shape_mismatch", "must share batch size"),
        ("missing_labels", "needs the moving vertebra label map"),
        ("label_shape", "must share batch size"),
    ],
)
def test_bad_inputs_give_clear_input_errors(case, message):
    net = RegistrationNet(NetworkConfig(**SMALL))
    fixed, moving, labels = inputs((16, 16, 32))
    args = {
        "not_divisible": (fixed[..., :24], moving[..., :24], labels[..., :24]),
        "two_channel_fixed": (fixed.expand(1, 2, -1, -1, -1), moving, labels),
        "four_d": (fixed, moving[0], labels),
        "shape_mismatch": (fixed, moving[..., :16], labels),
        "missing_labels": (fixed, moving, None),
        "label_shape": (fixed, moving, labels[..., :16]),
    }[case]
    with pytest.raises(InputError, match=message):
        net(*args)


def test_integer_images_are_a_type_error():
    net = RegistrationNet(NetworkConfig(**SMALL))
    fixed, moving, labels = inputs((16, 16, 16))
    with pytest.raises(TypeError, match="floating-point"):
        net(fixed.long(), moving, labels)


def test_config_round_trips_through_a_plain_dict_and_rejects_nonsense():
    config = NetworkConfig(velocity_resolution="full", use_moving_labels=False, **SMALL)
    assert NetworkConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InputError, match="unknown network settings"):
        NetworkConfig.from_dict({**config.to_dict(), "dropout": 0.1})
    with pytest.raises(InputError, match="velocity_resolution"):
        NetworkConfig(velocity_resolution="quarter")
    with pytest.raises(InputError, match="input_resolution"):
        NetworkConfig(input_resolution="quarter")
    with pytest.raises(InputError, match="equal length"):
        NetworkConfig(encoder_channels=(8, 8), decoder_channels=(8,))
    with pytest.raises(InputError, match="positive"):
        NetworkConfig(final_channels=(0,))
    with pytest.raises(InputError, match="integration_steps"):
        NetworkConfig(integration_steps=-1)

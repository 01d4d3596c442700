"""The paper's diffeomorphic VoxelMorph: a 3D UNet predicting a stationary velocity field.

Default sizes are the paper's (encoder 32, 32, 64, 64; decoder 64, 64, 64, 64; two 32-filter convolutions; a
3-channel velocity; 7 scaling-and-squaring steps). The velocity can be predicted at half resolution (the decoder
stops one level early), integrated there and upsampled: about 8x less compute at full-resolution voxel count, the
fast default. The input itself can also be halved (``input_resolution="half"``: both images are averaged over 2x2x2
voxels before the UNet, the bone mask keeps the majority), which widens what the network sees for the same compute; the
displacement is always returned on the input grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .inference import exact_in_own_dtype
from .validation import check_same_spatial_shape, check_tensor
from .warp import DEFAULT_INTEGRATION_STEPS, integrate_velocity, resize_displacement

VELOCITY_RESOLUTIONS = ("full", "half")
INPUT_RESOLUTIONS = ("full", "half")


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of :class:`RegistrationNet`; stored in every checkpoint so a model rebuilds from its file.

    Attributes:
        encoder_channels: Filters per encoder level; each level halves the resolution.
        decoder_channels: Filters per decoder level; same count as the encoder.
        final_channels: Filters of the convolutions between the decoder and the velocity layer.
        use_moving_labels: Feed the moving image's vertebra mask as an input channel.
        use_fixed_bone: Feed a vertebral-bone probability of the fixed image (the MR segmentation network's output,
            :mod:`.segmentation`) as an input channel: registration becomes largely label to label (issue 19).
        velocity_resolution: ``"full"`` or ``"half"`` of the UNet's grid: where the velocity is predicted and
            integrated.
        input_resolution: ``"full"`` or ``"half"``: the UNet's grid relative to the input images.
        integration_steps: Scaling-and-squaring steps ``T``.
    """

    encoder_channels: tuple[int, ...] = (32, 32, 64, 64)
    decoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    final_channels: tuple[int, ...] = (32, 32)
    use_moving_labels: bool = True
    use_fixed_bone: bool = False
    velocity_resolution: str = "half"
    integration_steps: int = DEFAULT_INTEGRATION_STEPS
    input_resolution: str = "full"

    def __post_init__(self) -> None:
        if not self.encoder_channels or len(self.encoder_channels) != len(self.decoder_channels):
            raise InputError("encoder_channels and decoder_channels must be non-empty and of equal length")
        if min(self.encoder_channels + self.decoder_channels + tuple(self.final_channels)) < 1:
            raise InputError("every channel count must be positive")
        if self.velocity_resolution not in VELOCITY_RESOLUTIONS:
            raise InputError(f"velocity_resolution must be one of {VELOCITY_RESOLUTIONS}")
        if self.input_resolution not in INPUT_RESOLUTIONS:
            raise InputError(f"input_resolution must be one of {INPUT_RESOLUTIONS}")
        if self.integration_steps < 0:
            raise InputError("integration_steps must be >= 0")

    @property
    def in_channels(self) -> int:
        return 2 + int(self.use_moving_labels) + int(self.use_fixed_bone)

    @property
    def required_multiple(self) -> int:
        """Each spatial size of the input must be divisible by this."""
        return 2 ** (len(self.encoder_channels) + (self.input_resolution == "half"))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> NetworkConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown network settings: {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


class RegistrationOutput(NamedTuple):
    """What :class:`RegistrationNet` returns.

    Attributes:
        displacement: ``(B, 3, D, H, W)`` voxels of the input grid (fixed -> moving).
        velocity: ``(B, 3, d, h, w)`` stationary velocity in voxels of its own grid (the UNet grid or half of it).
    """

    displacement: torch.Tensor
    velocity: torch.Tensor


_LEAK = 0.2


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)
    # He initialisation for the leaky ReLU: PyTorch's default shrinks the signal about 1.7x per layer, and after the
    # nine layers down to the bottleneck the deep features (and their gradients) had all but vanished, so training
    # on a CPU budget never got past predicting the identity.
    nn.init.kaiming_normal_(conv.weight, a=_LEAK, nonlinearity="leaky_relu")
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.LeakyReLU(_LEAK, inplace=True))


class RegistrationNet(nn.Module):
    """VoxelMorph-style UNet + velocity head + scaling and squaring.

    Inputs are the fixed (MR) and moving (CT) images, each ``(B, 1, D, H, W)`` normalised to [0, 1], and, when
    ``config.use_moving_labels``, the moving image's vertebra label map ``(B, 1, D, H, W)`` (any integers; it
    enters as a binary bone mask) and, when ``config.use_fixed_bone``, the fixed image's bone probability
    ``(B, 1, D, H, W)`` in [0, 1]. ``D, H, W`` must be multiples of ``config.required_multiple``.
    """

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetworkConfig()
        enc, dec = self.config.encoder_channels, self.config.decoder_channels
        self.encoder = nn.ModuleList()
        channels = self.config.in_channels
        for width in enc:
            self.encoder.append(_conv_block(channels, width))
            channels = width
        skips = list(enc)
        self.levels = len(dec) if self.config.velocity_resolution == "full" else len(dec) - 1
        self.decoder = nn.ModuleList()
        for level, width in enumerate(dec):
            self.decoder.append(_conv_block(channels, width))
            channels = width + (skips[-1 - level] if level < self.levels else 0)
        self.final = nn.Sequential(*[_conv_block(c_in, c_out) for c_in, c_out in _pairs(channels, self.config)])
        last = self.config.final_channels[-1] if self.config.final_channels else channels
        self.velocity_head = nn.Conv3d(last, 3, 3, padding=1)
        # A near-zero velocity at initialisation starts training from the identity transform (as VoxelMorph does).
        nn.init.normal_(self.velocity_head.weight, std=1e-5)
        nn.init.zeros_(self.velocity_head.bias)

    def forward(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        moving_labels: torch.Tensor | None = None,
        fixed_bone: torch.Tensor | None = None,
    ) -> RegistrationOutput:
        velocity = self.velocity(fixed, moving, moving_labels, fixed_bone)
        displacement = integrate_velocity(velocity, self.config.integration_steps)
        displacement = resize_displacement(displacement, fixed.shape[2:])
        return RegistrationOutput(displacement=displacement, velocity=velocity)

    def velocity(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        moving_labels: torch.Tensor | None = None,
        fixed_bone: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The stationary velocity ``(B, 3, d, h, w)`` (voxels of its grid) alone, without integrating it: for a
        caller that adds to it before integrating (the pipeline's vertebra-wise stage)."""
        x = self._inputs(fixed, moving, moving_labels, fixed_bone)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = exact_in_own_dtype(F.max_pool3d, x, 2)
        for level, block in enumerate(self.decoder):
            x = block(x)
            if level < self.levels:
                x = exact_in_own_dtype(F.interpolate, x, scale_factor=2.0, mode="nearest")
                x = torch.cat([x, skips[-1 - level]], dim=1)
        return self.velocity_head(self.final(x))

    def _inputs(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        moving_labels: torch.Tensor | None,
        fixed_bone: torch.Tensor | None,
    ) -> torch.Tensor:
        check_tensor(fixed, "fixed image", ndim=5, channels=1, floating=True)
        check_tensor(moving, "moving image", ndim=5, channels=1, floating=True)
        check_same_spatial_shape(fixed, moving, "fixed image", "moving image")
        multiple = self.config.required_multiple
        if any(s % multiple for s in fixed.shape[2:]):
            raise InputError(
                f"image size {tuple(fixed.shape[2:])} must be a multiple of {multiple} on every axis "
                "(use preprocess.pad_to_multiple)"
            )
        half = self.config.input_resolution == "half"
        parts = [F.avg_pool3d(fixed, 2), F.avg_pool3d(moving, 2)] if half else [fixed, moving]
        if self.config.use_moving_labels:
            if moving_labels is None:
                raise InputError("this model needs the moving vertebra label map as input")
            check_tensor(moving_labels, "moving label map", ndim=5, channels=1)
            check_same_spatial_shape(fixed, moving_labels, "fixed image", "moving label map")
            mask = (moving_labels > 0).to(fixed.dtype)
            # Halved, the mask stays binary (majority of the 8 voxels), as a label map resampled to 2 mm would be.
            parts.append((F.avg_pool3d(mask, 2) >= 0.5).to(fixed.dtype) if half else mask)
        if self.config.use_fixed_bone:
            if fixed_bone is None:
                raise InputError("this model needs the fixed image's bone probability as input")
            check_tensor(fixed_bone, "fixed bone probability", ndim=5, channels=1, floating=True)
            check_same_spatial_shape(fixed, fixed_bone, "fixed image", "fixed bone probability")
            parts.append(F.avg_pool3d(fixed_bone, 2) if half else fixed_bone)
        return torch.cat(parts, dim=1)


def _pairs(channels: int, config: NetworkConfig) -> list[tuple[int, int]]:
    widths = [channels, *config.final_channels]
    return list(zip(widths[:-1], widths[1:]))

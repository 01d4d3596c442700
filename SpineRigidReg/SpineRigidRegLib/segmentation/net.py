"""The MR vertebra segmentation network: a small 3D UNet with instance normalisation.

Instance normalisation makes each feature map's statistics independent of the image's overall contrast, which
matters for a network trained on random contrasts and applied to any MR sequence. The output is one logit per voxel
(vertebral bone); :func:`.predict.predict_bone` turns it into a probability on the MR's own grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..errors import InputError

#: ``format`` field of a segmentation checkpoint (:func:`..checkpoint.read_checkpoint`).
SEGMENTATION_FORMAT = "spinerigidreg-mr-segmentation"


@dataclass(frozen=True)
class SegmentationConfig:
    """Architecture of :class:`SegmentationNet`, stored in its checkpoint.

    Attributes:
        channels: Filters per level, top to bottom; each level below the first halves the resolution.
    """

    channels: tuple[int, ...] = (16, 32, 64, 96)

    def __post_init__(self) -> None:
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise InputError("a segmentation UNet needs at least two levels of positive channel counts")

    @property
    def required_multiple(self) -> int:
        """Each spatial size of the input must be divisible by this."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> SegmentationConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown segmentation network settings: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in in (in_channels, out_channels):
        layers += [
            nn.Conv3d(c_in, out_channels, 3, padding=1, bias=False),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(0.1, inplace=True),
        ]
    return nn.Sequential(*layers)


class SegmentationNet(nn.Module):
    """UNet: ``(B, 1, D, H, W)`` image in [0, 1] -> ``(B, 1, D, H, W)`` bone logits.

    ``D, H, W`` must be multiples of ``config.required_multiple``.
    """

    def __init__(self, config: SegmentationConfig | None = None) -> None:
        super().__init__()
        self.config = config or SegmentationConfig()
        c = self.config.channels
        self.down = nn.ModuleList([_block(1, c[0])] + [_block(c[i - 1], c[i]) for i in range(1, len(c))])
        self.up = nn.ModuleList([nn.ConvTranspose3d(c[i], c[i - 1], 2, stride=2) for i in range(len(c) - 1, 0, -1)])
        self.merge = nn.ModuleList([_block(2 * c[i - 1], c[i - 1]) for i in range(len(c) - 1, 0, -1)])
        self.head = nn.Conv3d(c[0], 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        multiple = self.config.required_multiple
        if image.ndim != 5 or image.shape[1] != 1 or any(n % multiple for n in image.shape[2:]):
            raise InputError(f"expected (B, 1, D, H, W) with sizes divisible by {multiple}, got {tuple(image.shape)}")
        skips = []
        x = image
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else nn.functional.max_pool3d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)

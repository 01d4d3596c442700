"""Training and refinement losses: image similarity, smoothness and per-vertebra rigidity."""

from .rigidity import (
    RIGIDITY_LOSSES,
    orthonormality_loss,
    properness_loss,
    rigid_dice_loss,
    rigid_field_loss,
    rigidity_loss,
    vertebra_indicators,
    volume_loss,
)
from .similarity import (
    SIMILARITY_LOSSES,
    MINDSSCLoss,
    NGFLoss,
    NMILoss,
    joint_histogram,
    mind_loss,
    mind_ssc,
    mutual_information,
    ngf_loss,
    nmi_loss,
)
from .smoothness import DiffusionLoss, diffusion_loss

__all__ = [
    "RIGIDITY_LOSSES",
    "SIMILARITY_LOSSES",
    "DiffusionLoss",
    "MINDSSCLoss",
    "NGFLoss",
    "NMILoss",
    "diffusion_loss",
    "joint_histogram",
    "mind_loss",
    "mind_ssc",
    "mutual_information",
    "ngf_loss",
    "nmi_loss",
    "orthonormality_loss",
    "properness_loss",
    "rigid_dice_loss",
    "rigid_field_loss",
    "rigidity_loss",
    "vertebra_indicators",
    "volume_loss",
]

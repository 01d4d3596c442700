"""The user-facing settings of a registration (:func:`..pipeline.register`); presets are data (:mod:`.choices`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .checkpoint import is_sha256
from .errors import InputError
from .inference import check_precision
from .polyrigid import VertebraRigidSettings
from .refine import RefineWeights


@dataclass(frozen=True)
class RegistrationSettings:
    """User-facing settings of :func:`register`.

    Attributes:
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
        vertebra_rigid: One rigid motion per vertebra fitted after the network (:mod:`.polyrigid`;
            ``steps=0`` turns it off).
        refine_steps: Test-time refinement steps of the dense velocity after that (0 = off).
        refine_weights: Loss weights of the refinement.
        vertebra_weights: Label -> multiplier of the rigidity terms during refinement; 0 excludes a vertebra (also
            from the vertebra-wise rigid alignment).
        model_path: A checkpoint to use instead of the bundled model.
        model_sha256: The sha256 ``model_path`` must have; without it the one its model card (``<name>.json``
            beside it) records, when there is such a card.
        margin_mm: Margin around the CT vertebrae included in the processing grid.
        spacing_mm: Processing grid spacing (the paper resamples to 1 mm).
        mr_segmentation: Find the vertebrae in the MR with the bundled segmentation network (an output and the
            per-vertebra ``mr_bone_percent`` check; :mod:`.segmentation.stage`).
        bone_prealign: Without MR points, pre-align the CT's vertebrae onto the MR's predicted bone
            (:mod:`.segmentation.align`) instead of the intensity search; falls back to it when refused. Off by
            default until the segmentation is accurate on every benchmark tier (docs/BENCHMARKS.md).
        bias_correction: Divide the MR's intensity bias field out (:mod:`.bias_field`) before the pre-alignment
            and the registration; the outputs and the QA picture keep the MR as given.
        deterministic: The same inputs give the same result: the automatic pre-alignment's ITK metric runs on one
            thread (its multi-threaded sums differ from run to run); the torch stages are deterministic on the CPU.
        network_precision: The networks' arithmetic at inference (:data:`.inference.PRECISIONS`): ``"auto"``
            runs their convolutions in bfloat16 on a CPU with bfloat16 arithmetic units (Intel AMX, AVX-512 BF16;
            about twice as fast there), ``"float32"`` always in float32.
    """

    device: str = "auto"
    vertebra_rigid: VertebraRigidSettings = field(default_factory=VertebraRigidSettings)
    # Off by default: on the benchmark (docs/BENCHMARKS.md) 20 dense steps after the vertebra-wise rigid stage cost
    # a little accuracy and rigidity (DSC 0.966 -> 0.964, rigid DSC 0.997 -> 0.991, |%dvol| 0.08 -> 0.52) and 2.3x
    # the time; the manual correction uses it for point pairs between vertebrae.
    refine_steps: int = 0
    refine_weights: RefineWeights = field(default_factory=RefineWeights)
    vertebra_weights: Mapping[int, float] | None = None
    model_path: str | None = None
    model_sha256: str | None = None
    margin_mm: float = 20.0
    spacing_mm: float = 1.0
    mr_segmentation: bool = True
    bone_prealign: bool = False
    bias_correction: bool = True
    deterministic: bool = True
    network_precision: str = "auto"

    def __post_init__(self) -> None:
        if self.refine_steps < 0:
            raise InputError("refine_steps must be >= 0")
        if self.margin_mm < 0 or self.spacing_mm <= 0:
            raise InputError("margin_mm must be >= 0 and spacing_mm > 0")
        if self.model_sha256 is not None and not is_sha256(self.model_sha256):
            raise InputError(f"model sha256 must be 64 hexadecimal digits, got {self.model_sha256!r}")
        check_precision(self.network_precision)

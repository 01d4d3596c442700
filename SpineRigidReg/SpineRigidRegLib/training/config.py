"""Training configurations: frozen dataclasses, read from and written to YAML.

A :class:`TrainConfig` holds everything a run needs: the network architecture (:class:`~..network.NetworkConfig`),
the data sources (:class:`DataConfig`), the pair synthesis (:class:`~..data.synthesis.SynthesisSettings`), the loss
of eq. (1) (:class:`LossConfig`), the optimiser (:class:`OptimConfig`) and the schedule (:class:`ScheduleConfig`,
with ``init_from`` for the paper's two-stage schedule: a baseline without rigidity, then a fine-tuning from one of
its checkpoints with the rigidity penalties switched on).

YAML files may leave out any field (its default is used); an unknown field is an error naming it, so a typo never
silently trains something else.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..data.synthesis import MR_CONTRASTS, SynthesisSettings
from ..errors import InputError
from ..losses.objective import Eq1Weights
from ..network import NetworkConfig

#: Pair sources (see :mod:`.pairs`).
PAIR_SOURCES = ("real", "phantom", "label_contrast")

#: Validation figures a best checkpoint can be selected by (higher is better).
SELECTION_METRICS = ("dice", "rigid_dice", "dice_rigid")


def _finite_non_negative(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where training pairs come from and how they are cut and augmented.

    Pairs are synthesised on the fly into a pool (synthesis costs several network steps on a CPU), refreshed one
    pair every ``refresh_every`` steps; every step draws a pool pair, a random crop and a random flip/axis
    permutation.

    Attributes:
        real: Weight of ground-truth pairs synthesised from real CT + vertebra labels (the TotalSegmentator example
            under ``real_data_dir``).
        phantom: Weight of ground-truth pairs synthesised from procedural phantoms of varied anatomy.
        label_contrast: Weight of label-only pairs with a random contrast per image (contrast-agnostic training).
        mr_contrasts: MR contrasts of the real and phantom pairs (keys of :data:`..data.synthesis.MR_CONTRASTS`),
            one drawn per pair; the default ``("t1",)`` uses the synthesis section's ``intensity_ranges`` as given.
        real_data_dir: Shared data folder holding ``totalsegmentator-examples/`` (relative paths are resolved from
            the working directory); needed when ``real > 0``.
        crop_size: Training crop ``(D, H, W)`` voxels; each a multiple of 16.
        synth_size: Grid the pairs are synthesised on ``(D, H, W)`` (crops are cut from it); >= ``crop_size``.
        spacing_mm: Voxel size of the training grid (the pipeline's 1 mm).
        batch_size: Pairs per step (per process under DDP).
        pool_size: Synthesised pairs kept in memory.
        refresh_every: Steps between two new pool pairs (0 never refreshes).
        phantom_vertebrae: Inclusive range of phantom vertebra counts.
        augment_flip: Random flips along each axis.
        augment_permute: Random permutation of the three axes (the processing grid follows the MR's axes, so the
            spine may run along any of them).
        augment_gamma: Largest ``|log gamma|`` of a random intensity gamma per image (0 = off).
        validation_pairs: Number of fixed-seed validation pairs (sources in turn).
        validation_size: Size of the validation pairs ``(D, H, W)`` (multiples of 16, <= ``synth_size``); ``None``
            uses ``crop_size``. Larger than the crops shows how patch training transfers to whole grids.
        validation_seed: Seed of the validation pairs (distinct from every training pair's).
        prealign: Translate each pair's CT by the whole-voxel mean of the true motion over the fixed vertebrae, as
            the pipeline's pre-alignment from vertebra centres does, so the network learns the residual it will be
            given (the synthesised bending of a long spine otherwise leaves offsets of 8 mm and more).
    """

    real: float = 0.0
    phantom: float = 1.0
    label_contrast: float = 0.0
    mr_contrasts: tuple[str, ...] = ("t1",)
    real_data_dir: str | None = None
    crop_size: tuple[int, int, int] = (64, 64, 64)
    synth_size: tuple[int, int, int] = (80, 80, 80)
    spacing_mm: float = 1.0
    batch_size: int = 1
    pool_size: int = 16
    refresh_every: int = 20
    phantom_vertebrae: tuple[int, int] = (3, 6)
    augment_flip: bool = True
    augment_permute: bool = True
    augment_gamma: float = 0.3
    validation_pairs: int = 4
    validation_size: tuple[int, int, int] | None = None
    validation_seed: int = 900_000
    prealign: bool = True

    def __post_init__(self) -> None:
        for name in PAIR_SOURCES:
            _finite_non_negative(f"data.{name}", getattr(self, name))
        if sum(getattr(self, name) for name in PAIR_SOURCES) <= 0:
            raise InputError(f"at least one pair source ({', '.join(PAIR_SOURCES)}) needs a weight > 0")
        if not self.mr_contrasts or any(c not in MR_CONTRASTS for c in self.mr_contrasts):
            raise InputError(f"data.mr_contrasts must be some of {sorted(MR_CONTRASTS)}, got {self.mr_contrasts!r}")
        if self.real > 0 and not self.real_data_dir:
            raise InputError("data.real > 0 needs data.real_data_dir (the folder holding totalsegmentator-examples/)")
        for name in ("crop_size", "synth_size"):
            size = getattr(self, name)
            if len(size) != 3 or any(not isinstance(s, int) or s < 16 for s in size):
                raise InputError(f"data.{name} must be three integers >= 16, got {size!r}")
        if any(s % 16 for s in self.crop_size):
            raise InputError(f"data.crop_size must be multiples of 16, got {self.crop_size}")
        if any(c > s for c, s in zip(self.crop_size, self.synth_size)):
            raise InputError(f"data.synth_size {self.synth_size} must be >= crop_size {self.crop_size} on every axis")
        if self.validation_size is not None and (
            len(self.validation_size) != 3
            or any(s % 16 or s < 16 for s in self.validation_size)
            or any(v > s for v, s in zip(self.validation_size, self.synth_size))
        ):
            raise InputError(
                f"data.validation_size must be multiples of 16 within synth_size, got {self.validation_size}"
            )
        if not self.spacing_mm > 0:
            raise InputError("data.spacing_mm must be > 0")
        for name in ("batch_size", "pool_size"):
            if getattr(self, name) < 1:
                raise InputError(f"data.{name} must be >= 1")
        if self.refresh_every < 0 or self.validation_pairs < 0:
            raise InputError("data.refresh_every and data.validation_pairs must be >= 0")
        lo, hi = self.phantom_vertebrae
        if not 2 <= lo <= hi <= 24:
            raise InputError(f"data.phantom_vertebrae must be a range within 2..24, got {self.phantom_vertebrae}")
        _finite_non_negative("data.augment_gamma", self.augment_gamma)

    def source_weights(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in PAIR_SOURCES if getattr(self, name) > 0}


@dataclass(frozen=True)
class LossConfig(Eq1Weights):
    """Weights of the training loss: eq. (1) (:class:`..losses.objective.Eq1Weights`: similarity, ``smooth``, the
    rigidity penalties) plus two auxiliary terms outside it that only synthesised pairs allow.

    Attributes:
        label_dice: ``1 -`` the mean soft Dice of the warped moving vertebrae with the fixed labels. Only
            synthesised pairs have fixed labels; it speeds up short (CPU) trainings and is 0 in every paper config.
        field: The mean Charbonnier error ``sqrt(|e|^2 + 1) - 1`` (voxels; ``|e|^2 / 2`` for small errors, ``|e|``
            for large ones) between the predicted and the synthesised displacement over the fixed vertebrae
            (skipped for batches without a known field); 0 in every paper config.
    """

    label_dice: float = 0.0
    field: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW settings.

    Attributes:
        learning_rate: Peak learning rate.
        weight_decay: AdamW decoupled weight decay.
        warmup_steps: Linear warm-up from 0.
        schedule: ``"constant"`` or ``"cosine"`` (decays to 10 % of the peak at the last step).
        grad_clip: Largest gradient norm (0 = no clipping).
    """

    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise InputError("optim.learning_rate must be > 0")
        _finite_non_negative("optim.weight_decay", self.weight_decay)
        _finite_non_negative("optim.grad_clip", self.grad_clip)
        if self.warmup_steps < 0:
            raise InputError("optim.warmup_steps must be >= 0")
        if self.schedule not in ("constant", "cosine"):
            raise InputError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Length, checkpoints, validation and seeds of a run.

    Attributes:
        steps: Optimiser steps of this stage.
        init_from: Checkpoint whose weights start this stage (the paper's fine-tuning from the baseline's
            milestone); relative paths are resolved from the working directory. Only the weights are taken: the
            step count and the optimiser start afresh.
        seed: Seed of the weights' initialisation and of every training pair.
        validate_every: Steps between validations (0 = only at the end).
        checkpoint_every: Steps between checkpoints (``last.pt``; 0 = only at the end).
        checkpoint_minutes: Also write ``last.pt`` when this much wall time passed since the previous one (0 = off).
        log_every: Steps between CSV/TensorBoard rows.
        max_minutes: Stop after this much wall time of the run (pair synthesis and validation included; 0 = no
            limit), with a final validation and ``last.pt``, so a lease or a batch job's time limit ends a stage
            cleanly; ``--resume`` continues it.
        select_by: Validation figure of the best checkpoint: ``"dice"``, ``"rigid_dice"`` or ``"dice_rigid"``
            (their mean).
        amp: Mixed precision for the network's forward pass on CUDA (never on CPU); the losses stay float32.
    """

    steps: int = 1000
    init_from: str | None = None
    seed: int = 0
    validate_every: int = 250
    checkpoint_every: int = 250
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    max_minutes: float = 0.0
    select_by: str = "dice"
    amp: bool = True

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise InputError("schedule.steps must be >= 0")
        for name in ("validate_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise InputError(f"schedule.{name} must be >= 0")
        if self.log_every < 1:
            raise InputError("schedule.log_every must be >= 1")
        _finite_non_negative("schedule.checkpoint_minutes", self.checkpoint_minutes)
        _finite_non_negative("schedule.max_minutes", self.max_minutes)
        if self.select_by not in SELECTION_METRICS:
            raise InputError(f"schedule.select_by must be one of {SELECTION_METRICS}, got {self.select_by!r}")


@dataclass(frozen=True)
class TrainConfig:
    """A complete training recipe (see the module docstring)."""

    name: str = "run"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthesis: SynthesisSettings = field(default_factory=SynthesisSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\"):
            raise InputError(f"name must be a non-empty file-name-safe string, got {self.name!r}")
        multiple = self.network.required_multiple
        if any(s % multiple for s in self.data.crop_size):
            raise InputError(f"data.crop_size {self.data.crop_size} must be multiples of {multiple} for this network")

    # ------------------------------------------------------------------------------------------- conversions
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists instead of tuples) for YAML, JSON and checkpoints."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a (partial) plain dict; missing fields take their defaults, unknown ones are an error."""
        if not isinstance(data, dict):
            raise InputError(f"a training config must be a mapping, got {type(data).__name__}")
        return _build(cls, data, "")

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """YAML text of the full config; also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike) -> TrainConfig:
        """Read a YAML file (or YAML text containing a newline)."""
        if isinstance(path_or_text, str) and "\n" in path_or_text:
            text = path_or_text
        else:
            path = Path(path_or_text)
            if not path.is_file():
                raise InputError(f"training config not found: {path}")
            text = path.read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise InputError(f"training config is not valid YAML: {error}") from error
        return cls.from_dict(data)

    def override(self, **sections: dict[str, Any]) -> TrainConfig:
        """A copy with some fields of some sections replaced, e.g. ``override(schedule={"steps": 10})``."""
        data = self.to_dict()
        for section, values in sections.items():
            if section not in data:
                raise InputError(f"unknown config section {section!r}")
            if isinstance(data[section], dict):
                data[section].update(values)
            else:
                data[section] = values
        return TrainConfig.from_dict(data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise InputError(f"unknown training config field(s) {unknown} in {where}; known: {sorted(known)}")
    values = {}
    for name, value in data.items():
        nested = _nested_type(cls, name)
        if nested is not None:
            if not isinstance(value, dict):
                raise InputError(f"config section {prefix}{name} must be a mapping, got {type(value).__name__}")
            values[name] = _build(nested, value, f"{prefix}{name}.")
        else:
            values[name] = _tuples(value)
    try:
        return cls(**values)
    except TypeError as error:
        raise InputError(f"invalid training config {prefix.rstrip('.') or 'values'}: {error}") from error


def _nested_type(cls: type, name: str) -> type | None:
    default = {f.name: f for f in fields(cls)}[name]
    if default.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        candidate = default.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(candidate):
            return type(candidate)
    return None


__all__ = [
    "PAIR_SOURCES",
    "SELECTION_METRICS",
    "DataConfig",
    "LossConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
]

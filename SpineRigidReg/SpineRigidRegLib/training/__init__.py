"""Training: configs (frozen dataclasses, YAML), on-the-fly pairs, the trainer (DDP via torchrun), the ablation."""

from .config import DataConfig, LossConfig, OptimConfig, ScheduleConfig, TrainConfig
from .trainer import TrainResult, evaluate, registration_loss, train

__all__ = [
    "DataConfig",
    "LossConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "registration_loss",
    "train",
]

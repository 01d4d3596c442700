"""Training loop of the MR vertebra segmentation network (CPU or GPU; resumable; bounded in minutes).

Each step draws a fresh batch of synthetic images (:func:`.synth.synthesize_batch`) on the training device and
minimises soft Dice + binary cross-entropy against the vertebral-bone target. Every ``eval_every`` steps it scores a
fixed set of synthetic validation patches and, when the real MR example is present, the real MR (Dice against its
"vertebrae" label): the learning curve (``curve.csv``) shows from the first minutes whether what is learnt on
synthetic images transfers to a real scan. The real MR is never trained on, and it does not choose the checkpoint:
the exported model is the last one.

Run folder: ``last.pt`` (weights, optimiser state, step, elapsed time), ``curve.csv``, ``train.log``.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..checkpoint import load_weights, read_checkpoint
from ..io import read_image
from .labelmaps import LabelMap, training_label_maps
from .net import SEGMENTATION_FORMAT, SegmentationConfig, SegmentationNet
from .predict import dice, predict_bone, save_segmentation_checkpoint
from .synth import SynthSettings, synthesize_batch

logger = logging.getLogger(__name__)

#: The real MR example and its label of the vertebrae (TotalSegmentator "total_mr" id 19), for the curve.
REAL_MR = ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", 19)


@dataclass(frozen=True)
class SegTrainSettings:
    """What one training run does.

    Attributes:
        steps: Last step (a resumed run continues up to it).
        batch: Images per step.
        learning_rate: Peak AdamW learning rate (linear warm-up over ``warmup`` steps, cosine decay to 5 %).
        decay_minutes: When > 0, the cosine decays over this many minutes of training (all calls together) instead
            of over ``steps``: a run bounded by a lease's minutes ends at the low learning rate whatever its speed.
        max_minutes: Stop cleanly after this many minutes of this call (0: no limit).
        eval_every: Steps between evaluations (and checkpoints).
        phantoms: Number of phantom label maps besides the real CT's.
        seed: Seeds the label maps' phantoms and the image generator.
        validation_images: Fixed synthetic validation patches.
        network: Architecture.
        synth: Generator ranges.
    """

    steps: int = 20000
    batch: int = 4
    learning_rate: float = 2e-3
    warmup: int = 200
    decay_minutes: float = 0.0
    max_minutes: float = 0.0
    eval_every: int = 250
    phantoms: int = 12
    seed: int = 0
    validation_images: int = 16
    network: SegmentationConfig = field(default_factory=SegmentationConfig)
    synth: SynthSettings = field(default_factory=SynthSettings)


def loss_function(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice (over the batch) + binary cross-entropy of ``(B, 1, D, H, W)`` logits against {0, 1} targets."""
    probability = torch.sigmoid(logits.float())
    overlap = (probability * target).sum()
    soft_dice = 1.0 - (2.0 * overlap + 1.0) / (probability.sum() + target.sum() + 1.0)
    return soft_dice + F.binary_cross_entropy_with_logits(logits.float(), target)


def learning_rate(settings: SegTrainSettings, step: int, minutes: float = 0.0) -> float:
    """Warm-up then cosine decay to 5 % of the peak, over steps or over ``settings.decay_minutes``."""
    if step < settings.warmup:
        return settings.learning_rate * (step + 1) / settings.warmup
    if settings.decay_minutes > 0:
        progress = min(minutes / settings.decay_minutes, 1.0)
    else:
        progress = min((step - settings.warmup) / max(settings.steps - settings.warmup, 1), 1.0)
    return settings.learning_rate * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _dice_of_batch(logits: torch.Tensor, target: torch.Tensor) -> float:
    predicted = logits > 0
    total = float(predicted.sum() + target.sum())
    return 1.0 if total == 0 else 2.0 * float((predicted & (target > 0.5)).sum()) / total


class _RealMR:
    """The real MR example (if present) and its vertebra mask, scored by :meth:`dice`."""

    def __init__(self, folder: Path | None) -> None:
        self.mr = self.truth = None
        if folder is None:
            return
        folder = folder / "totalsegmentator-examples" if (folder / "totalsegmentator-examples").is_dir() else folder
        image, labels, value = REAL_MR
        if (folder / image).is_file() and (folder / labels).is_file():
            self.mr = read_image(folder / image)
            self.truth = read_image(folder / labels) == value

    def dice(self, network: SegmentationNet, device: torch.device) -> float | None:
        if self.mr is None:
            return None
        return dice(predict_bone(self.mr, network, device), sitk.Cast(self.truth, sitk.sitkUInt8))


def train_segmentation(
    out: str | Path,
    settings: SegTrainSettings = SegTrainSettings(),
    device: torch.device | str = "cpu",
    real_data_dir: str | Path | None = None,
    label_maps: list[LabelMap] | None = None,
    init_from: str | Path | None = None,
) -> dict:
    """Train (or resume from ``out/last.pt``) and return the last evaluation's figures.

    ``init_from``: a segmentation checkpoint whose weights start a new run (fresh optimiser, step 0); ignored when
    ``out/last.pt`` exists (a resume)."""
    out, device = Path(out), torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    real = Path(real_data_dir) if real_data_dir else None
    maps = label_maps or training_label_maps(real, settings.phantoms, settings.synth.spacing_mm, settings.seed)
    maps = [LabelMap(m.labels.to(device), m.name) for m in maps]
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed patch sizes: let cuDNN pick its fastest kernels
    network = SegmentationNet(settings.network).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    step, elapsed = _resume(out / "last.pt", network, optimiser)
    if step == 0 and init_from is not None:
        load_weights(network, read_checkpoint(init_from, expected_format=SEGMENTATION_FORMAT), init_from)
        logger.info("weights from %s", init_from)
    validation = synthesize_batch(
        maps, settings.validation_images, settings.synth, torch.Generator().manual_seed(10**6 + settings.seed), device
    )
    real_mr = _RealMR(real)
    generator = torch.Generator().manual_seed(settings.seed * 7919 + step)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    start = time.time()
    figures: dict = {}
    logger.info("training from step %d on %s with %d label maps", step, device, len(maps))
    while step < settings.steps:
        network.train()
        images, targets = synthesize_batch(maps, settings.batch, settings.synth, generator, device)
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(settings, step, (elapsed + time.time() - start) / 60.0)
        with autocast:
            loss = loss_function(network(images), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        out_of_time = settings.max_minutes > 0 and time.time() - start > 60.0 * settings.max_minutes
        if step % settings.eval_every == 0 or step == settings.steps or out_of_time:
            figures = _evaluate(network, validation, real_mr, device, autocast)
            figures.update(step=step, loss=float(loss.detach()), minutes=(elapsed + time.time() - start) / 60.0)
            _append_curve(out / "curve.csv", figures)
            logger.info(
                "step %d loss %.4f synthetic Dice %.3f real MR Dice %s",
                step,
                figures["loss"],
                figures["synthetic_dice"],
                figures["real_mr_dice"],
            )
            save_segmentation_checkpoint(
                out / "last.pt",
                network,
                optimiser=optimiser.state_dict(),
                step=step,
                elapsed_s=elapsed + time.time() - start,
                settings=_plain(asdict(settings)),
            )
        if out_of_time:
            logger.info("stopping at step %d: max_minutes reached", step)
            break
    return figures


def _evaluate(network, validation, real_mr: _RealMR, device, autocast) -> dict:
    network.eval()
    images, targets = validation
    with torch.inference_mode(), autocast:
        logits = torch.cat([network(images[i : i + 4]) for i in range(0, images.shape[0], 4)])
    return {"synthetic_dice": _dice_of_batch(logits.float(), targets), "real_mr_dice": real_mr.dice(network, device)}


def _resume(path: Path, network: SegmentationNet, optimiser: torch.optim.Optimizer) -> tuple[int, float]:
    if not path.is_file():
        return 0, 0.0
    payload = read_checkpoint(path, expected_format=SEGMENTATION_FORMAT)
    network.load_state_dict(payload["state_dict"], strict=True)
    optimiser.load_state_dict(payload["optimiser"])
    logger.info("resumed %s at step %d", path, int(payload["step"]))
    return int(payload["step"]), float(payload.get("elapsed_s", 0.0))


def _append_curve(path: Path, figures: dict) -> None:
    columns = ["step", "minutes", "loss", "synthetic_dice", "real_mr_dice"]
    new = not path.is_file()
    with open(path, "a", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if figures.get(k) is None else figures[k]) for k in columns})


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

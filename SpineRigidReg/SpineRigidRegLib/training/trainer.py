"""The training loop: eq. (1) of the paper on synthesised pairs, with checkpoints, resume, validation and logs.

One call of :func:`train` runs one stage (``config.schedule.steps`` AdamW steps). The paper's schedule is two
calls: a baseline without rigidity, then a second config whose ``schedule.init_from`` names a checkpoint of the
first and whose loss switches the rigidity penalties on.

Output folder::

    config.yaml      the full config of the run
    train.csv        step, loss terms, learning rate, seconds per step (every ``log_every`` steps)
    validation.csv   step, DSC, rigid DSC, |%Δvol|, folding %, for the network and for the identity (initial)
    last.pt          weights + optimiser + step + config: what ``resume`` continues from
    best.pt          the weights with the best validation figure (``schedule.select_by``)
    tensorboard/     the same scalars, when the ``tensorboard`` package is installed
    train.log        the log

Distributed: launched by ``torchrun`` (``RANK``/``WORLD_SIZE`` set, ``WORLD_SIZE > 1``) the model is wrapped in
``DistributedDataParallel`` (``nccl`` on CUDA, ``gloo`` on CPU); each rank draws its own pairs, gradients are
averaged, and only rank 0 validates, logs and writes files. Mixed precision (bfloat16, or float16 with a gradient
scaler) applies to the network's forward pass on CUDA only; the losses are computed in float32.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .. import metrics
from ..checkpoint import load_network, read_checkpoint, save_checkpoint, select_device, sha256_of
from ..errors import InputError
from ..losses.objective import eq1_loss
from ..losses.rigidity import vertebra_indicators
from ..network import NetworkConfig, RegistrationNet, RegistrationOutput
from ..system import git_commit
from ..warp import warp, warp_labels
from .bone_input import degraded_bone
from .config import PAIR_SOURCES as PAIR_SOURCE_NAMES
from .config import LossConfig, TrainConfig
from .pairs import PairPool, RealVolumes, TrainingPair, mixed_seed, validation_pairs

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
VALIDATION_BONE_SEED = 700_000  # validation pairs get the same degraded bone input at every validation
PIPELINE_SPACING_MM = 1.0  # the grid srr-register runs the network on (RegistrationSettings.spacing_mm)
TRAIN_FIELDS = [
    "step",
    "loss",
    "similarity",
    "smooth",
    "rigidity",
    "label_dice",
    "field",
    "lr",
    "seconds_per_step",
    "synthesised",
]
VALIDATION_FIELDS = ["step", "dice", "rigid_dice", "abs_volume_change_percent", "folding_percent", "score"]


@dataclass
class TrainResult:
    """What a finished (or interrupted-and-finished) stage reports.

    Attributes:
        out_dir: The run's folder.
        step: Last completed step.
        best_step: Step of ``best.pt`` (-1 when no validation ran).
        best_score: Its selection figure.
        validation: Figures of the last validation (network).
        identity: The same figures for the identity transform on the same pairs (the initial alignment).
        wall_time_s: Seconds of this call.
        device: Where it ran.
        network: The trained network (this process's copy; identical on every rank under DDP).
    """

    out_dir: Path
    step: int
    best_step: int = -1
    best_score: float = float("nan")
    validation: dict[str, float] = field(default_factory=dict)
    identity: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0
    device: str = "cpu"
    network: RegistrationNet | None = None


# ---------------------------------------------------------------------------------------------------- loss


def network_output(network: torch.nn.Module, batch: TrainingPair, seed: int) -> RegistrationOutput:
    """The network on a batch, with the degraded true bone as the fixed bone input when the network takes one.

    Args:
        network: :class:`~..network.RegistrationNet` (possibly wrapped in DDP).
        batch: Pairs on the network's device.
        seed: Seed of the bone input's degradation (the step; the pair index for validation).
    """
    config = getattr(network, "module", network).config
    fixed_bone = degraded_bone(batch.fixed_labels, seed) if config.use_fixed_bone else None
    return network(batch.fixed, batch.moving, batch.moving_labels, fixed_bone)


def registration_loss(
    network: torch.nn.Module,
    batch: TrainingPair,
    loss: LossConfig,
    spacing: tuple[float, float, float],
    autocast: Callable[[], object] = nullcontext,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. (1) for one batch: ``sim(F, M o phi) + smooth * diffusion(v) + sum_k w_k L_k(labels, phi)``.

    Args:
        network: :class:`~..network.RegistrationNet` (possibly wrapped in DDP).
        batch: Pairs on the network's device.
        loss: Weights.
        spacing: mm per voxel, array order.
        autocast: Context manager factory for the forward pass (mixed precision on CUDA).
        seed: Seed of the fixed bone input's degradation (label-guided networks only).

    Returns:
        The scalar loss and its terms as floats (``loss``, ``similarity``, ``smooth``, ``rigidity``).
    """
    with autocast():
        output = network_output(network, batch, seed)
    displacement = output.displacement.float()
    velocity = output.velocity.float()
    # Border padding, as in the refinement: zero padding adds an edge at the grid's border that MIND latches onto
    # (a purely supervised training, similarity_weight 0, needs no warp).
    warped = warp(batch.moving, displacement, padding_mode="border") if loss.similarity_weight > 0 else None
    total, eq1 = eq1_loss(loss, batch.fixed, warped, velocity, displacement, batch.moving_labels, spacing)
    label_term = None
    if loss.label_dice > 0:
        label_term = label_dice_loss(batch.moving_labels, batch.fixed_labels, displacement)
        total = total + loss.label_dice * label_term
    field_term = None
    bone = batch.fixed_labels[:, 0] > 0 if loss.field > 0 and batch.true_displacement is not None else None
    if bone is not None and bool(bone.any()):
        # Over the vertebrae only (far soft tissue of a long bent spine moves by 20-30 mm in the synthesised pairs),
        # and robust: quadratic below a voxel, linear beyond, so the rare pair that moved 10+ voxels does not
        # drown the others' gradients.
        error = ((displacement - batch.true_displacement) ** 2).sum(dim=1)[bone]
        field_term = ((error + 1.0).sqrt() - 1.0).mean()
        total = total + loss.field * field_term
    terms = {
        "loss": float(total.detach()),
        **{name: float(term.detach()) for name, term in eq1.items()},
        "label_dice": float(label_term.detach()) if label_term is not None else 0.0,
        "field": float(field_term.detach()) if field_term is not None else 0.0,
    }
    return total, terms


def label_dice_loss(
    moving_labels: torch.Tensor, fixed_labels: torch.Tensor, displacement: torch.Tensor
) -> torch.Tensor:
    """``1 -`` mean soft Dice of each warped moving vertebra (trilinear) with the same label in the fixed map.

    Args:
        moving_labels, fixed_labels: ``(B, 1, D, H, W)`` integer labels on one grid.
        displacement: ``(B, 3, D, H, W)`` voxels.

    Returns:
        Scalar over the (sample, vertebra) pairs present in the moving map; a graph-attached 0 when there are none.
    """
    moving, present, values = vertebra_indicators(moving_labels)
    if not values:
        return displacement.sum() * 0.0
    fixed, _, _ = vertebra_indicators(fixed_labels, label_values=values)
    warped = warp(moving, displacement)
    overlap = 2.0 * (warped * fixed).flatten(2).sum(-1)
    dice = overlap / (warped.flatten(2).sum(-1) + fixed.flatten(2).sum(-1)).clamp_min(1e-6)
    return 1.0 - dice[present].mean()


# -------------------------------------------------------------------------------------------- validation


def _mean(values: dict[int, float] | list[float]) -> float:
    items = list(values.values()) if isinstance(values, dict) else list(values)
    finite = [v for v in items if math.isfinite(v)]
    return float(sum(finite) / len(finite)) if finite else float("nan")


def pair_figures(
    pair: TrainingPair, displacement: torch.Tensor, spacing: tuple[float, float, float]
) -> dict[str, float]:
    """DSC (warped moving labels vs fixed labels), rigid DSC, mean |%Δvol| and folding % of one pair (B = 1)."""
    moving_labels = pair.moving_labels
    values = sorted(int(v) for v in torch.unique(moving_labels).tolist() if v > 0)
    if not values:
        return {}
    warped = warp_labels(moving_labels, displacement, label_values=values)
    dice = metrics.dice_per_label(warped, pair.fixed_labels, label_values=values)
    rigid = metrics.rigid_dice_per_label(moving_labels, displacement, spacing, label_values=values)
    volume = metrics.volume_change_percent(moving_labels, displacement, spacing, label_values=values)
    field_stats = metrics.field_summary(displacement, spacing)
    return {
        "dice": _mean(dice),
        "rigid_dice": _mean(rigid),
        "abs_volume_change_percent": _mean([abs(v) for v in volume.values()]),
        "folding_percent": float(field_stats["folding_percent"]),
    }


def evaluate(
    network: RegistrationNet | None,
    pairs: list[TrainingPair],
    spacing: tuple[float, float, float],
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean :func:`pair_figures` over ``pairs``; ``network=None`` scores the identity (the initial alignment)."""
    rows = []
    for index, pair in enumerate(pairs):
        pair = pair.to(device)
        if network is None:
            displacement = torch.zeros((1, 3, *pair.fixed.shape[2:]), device=device)
        else:
            with torch.inference_mode():
                displacement = network_output(network, pair, seed=VALIDATION_BONE_SEED + index).displacement.float()
        figures = pair_figures(pair, displacement, spacing)
        if figures:
            rows.append(figures)
    if not rows:
        return {}
    return {key: _mean([row[key] for row in rows]) for key in rows[0]}


def selection_score(figures: dict[str, float], select_by: str) -> float:
    """The figure ``best.pt`` is chosen by (higher is better)."""
    if not figures:
        return float("nan")
    if select_by == "dice_rigid":
        return 0.5 * (figures["dice"] + figures["rigid_dice"])
    return figures[select_by]


# ------------------------------------------------------------------------------------------- helpers


def _distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when not launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return (rank, world) if world > 1 else (0, 1)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate of (1-based) ``step``: linear warm-up, then constant or cosine to 10 % of the peak."""
    optim = config.optim
    peak = optim.learning_rate
    if optim.warmup_steps and step <= optim.warmup_steps:
        return peak * step / optim.warmup_steps
    if optim.schedule == "cosine":
        span = max(config.schedule.steps - optim.warmup_steps, 1)
        progress = min(max(step - optim.warmup_steps, 0) / span, 1.0)
        return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return peak


class _Logs:
    """CSV files and the optional TensorBoard writer (rank 0 only)."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.out_dir = out_dir
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed: CSV logs only (pip install tensorboard)")

    def _row(self, name: str, columns: list[str], row: dict[str, float]) -> None:
        path = self.out_dir / name
        new = not path.is_file()
        with open(path, "a", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def truncate(self, step: int) -> None:
        """Drop the rows logged after ``step`` (by a run interrupted after its last checkpoint)."""
        for name in ("train.csv", "validation.csv"):
            path = self.out_dir / name
            if not path.is_file():
                continue
            with open(path, newline="", encoding="utf-8") as stream:
                rows = list(csv.reader(stream))
            kept = rows[:1] + [r for r in rows[1:] if r and int(float(r[0])) <= step]
            with open(path, "w", newline="", encoding="utf-8") as stream:
                csv.writer(stream).writerows(kept)

    def train(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._row("train.csv", TRAIN_FIELDS, row)
        if self.writer is not None:
            for key in ("loss", "similarity", "smooth", "rigidity", "label_dice", "field", "lr"):
                self.writer.add_scalar(f"train/{key}", row[key], int(row["step"]))

    def validation(self, step: int, figures: dict[str, float], identity: dict[str, float], score: float) -> None:
        if not self.enabled:
            return
        self._row("validation.csv", VALIDATION_FIELDS, {"step": step, **figures, "score": score})
        if step == 0 or not (self.out_dir / "validation_identity.csv").is_file():
            self._row("validation_identity.csv", VALIDATION_FIELDS[:-1], {"step": step, **identity})
        if self.writer is not None:
            for key, value in figures.items():
                self.writer.add_scalar(f"validation/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------------------------------ train


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    threads: int | None = None,
    tensorboard: bool = True,
) -> TrainResult:
    """Run one training stage (see the module docstring).

    Args:
        config: The recipe.
        out_dir: Output folder (created).
        resume: Continue from ``out_dir/last.pt`` (weights, optimiser, step). Without it, an existing ``last.pt``
            is an error, so a finished run is never overwritten by accident.
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:N]"`` (under torchrun, CUDA uses ``LOCAL_RANK``'s GPU).
        progress: Draw a tqdm bar with the loss terms (rank 0).
        threads: ``torch.set_num_threads`` for CPU training (``None`` leaves torch's default).
        tensorboard: Also write TensorBoard scalars when the package is installed.

    Returns:
        A :class:`TrainResult`.
    """
    start_time = time.perf_counter()
    out = Path(out_dir)
    rank, world = _distributed()
    main = rank == 0
    torch_device = select_device(device)
    if world > 1 and torch_device.type == "cuda":
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(torch_device)
    if threads is not None and torch_device.type == "cpu":
        torch.set_num_threads(int(threads))
    started_group = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
        started_group = True
    last_path = out / LAST_CHECKPOINT
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if last_path.is_file() and not resume:
            raise InputError(f"{last_path} exists: pass resume=True (--resume) to continue it, or another folder")
        handler = _attach_file_log(out)
        config.to_yaml(out / "config.yaml")
    else:
        handler = None
    logs = _Logs(out, main, tensorboard)
    try:
        result = _run(config, out, resume, torch_device, progress and main, rank, world, logs, start_time)
        if started_group:
            # Rank 0 saves and exports after the last step; a rank that tore the group down before it aborted
            # ("terminate called without an active exception") in about a third of two-process runs.
            dist.barrier()
        return result
    finally:
        logs.close()
        if handler is not None:
            logging.getLogger("SpineRigidRegLib").removeHandler(handler)
            handler.close()
        if started_group:
            dist.destroy_process_group()


def _attach_file_log(out: Path) -> logging.Handler:
    root = logging.getLogger("SpineRigidRegLib")
    handler = logging.FileHandler(str((out / "train.log").resolve()), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def _initial_network(config: TrainConfig) -> RegistrationNet:
    torch.manual_seed(config.schedule.seed)
    network = RegistrationNet(config.network)
    if config.schedule.init_from:
        source = load_network(config.schedule.init_from)
        if source.config != config.network:
            raise InputError(
                f"schedule.init_from {config.schedule.init_from} has another architecture ({source.config}) than "
                f"this config's network ({config.network})"
            )
        network.load_state_dict(source.state_dict(), strict=True)
        log.info("weights initialised from %s", config.schedule.init_from)
    return network


def _autocast_factory(config: TrainConfig, device: torch.device) -> tuple[Callable[[], object], object | None]:
    if not (config.schedule.amp and device.type == "cuda"):
        return nullcontext, None
    if torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None
    scaler = torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast("cuda", dtype=torch.float16)), scaler


@dataclass
class _Session:
    """The parts of one training run that every step uses; ``validation`` and ``identity`` stay empty off rank 0
    and without ``data.validation_pairs``."""

    config: TrainConfig
    out: Path
    device: torch.device
    world: int
    main: bool  # rank 0: validates, logs and writes the checkpoints
    network: RegistrationNet
    model: torch.nn.Module  # the network, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast: Callable[[], object]
    spacing: tuple[float, float, float]  # mm per voxel of the pairs
    logs: _Logs
    start_time: float
    validation: list[TrainingPair] = field(default_factory=list)
    identity: dict[str, float] = field(default_factory=dict)


@dataclass
class _Progress:
    """What the loop carries from step to step; ``last.pt`` restores the first three."""

    step: int = 0
    best_step: int = -1
    best_score: float = float("-inf")
    last_figures: dict[str, float] = field(default_factory=dict)
    last_save: float = 0.0  # perf_counter of the last save of last.pt
    step_time: float = 0.0  # perf_counter of the last train.csv row


def _run(
    config: TrainConfig,
    out: Path,
    resume: bool,
    device: torch.device,
    show_progress: bool,
    rank: int,
    world: int,
    logs: _Logs,
    start_time: float,
) -> TrainResult:
    network = _initial_network(config).to(device)
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=config.optim.learning_rate, weight_decay=config.optim.weight_decay
    )
    autocast, scaler = _autocast_factory(config, device)
    progress = _resumed_progress(resume, out, config, network, optimizer, scaler, logs if rank == 0 else None)
    model: torch.nn.Module = network
    if world > 1:
        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    session = _Session(
        config=config,
        out=out,
        device=device,
        world=world,
        main=rank == 0,
        network=network,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        autocast=autocast,
        spacing=(config.data.spacing_mm,) * 3,
        logs=logs,
        start_time=start_time,
    )
    real = RealVolumes(config.data.real_data_dir, config.data.spacing_mm)
    pool = _pair_pool(config, rank, real, device)
    if session.main and config.data.validation_pairs:
        _prepare_validation(session, progress, real)
    t = time.perf_counter()
    made = pool.sync(progress.step)
    log.info("pair pool ready: %d pairs synthesised in %.1f s", made, time.perf_counter() - t)
    bar = _progress_bar(config, progress.step) if show_progress else None
    _train_loop(session, progress, pool, bar)
    pool.close()
    if bar is not None:
        bar.close()
    if session.main and not session.validation and progress.step > 0:
        save_checkpoint(out / BEST_CHECKPOINT, network, step=progress.step, train_config=config.to_dict())
        progress.best_step = progress.step
    return _result(session, progress)


def _resumed_progress(
    resume: bool,
    out: Path,
    config: TrainConfig,
    network: RegistrationNet,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    logs: _Logs | None,
) -> _Progress:
    """Where the run starts: step 0, or (resuming) ``out/last.pt`` loaded into the network, optimiser and scaler.

    ``logs`` (rank 0 only) drops its rows after the resumed step.
    """
    last_path = out / LAST_CHECKPOINT
    if not resume:
        return _Progress()
    if not last_path.is_file():
        log.info("nothing to resume in %s: starting at step 0", out)
        return _Progress()
    state = read_checkpoint(last_path)
    if NetworkConfig.from_dict(state["config"]) != config.network:
        raise InputError(f"{last_path} was trained with another architecture than this config's")
    network.load_state_dict(state["state_dict"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    progress = _Progress(
        step=int(state["step"]),
        best_step=int(state.get("best_step", -1)),
        best_score=float(state.get("best_score", float("-inf"))),
    )
    if logs is not None:
        logs.truncate(progress.step)
    log.info("resumed from %s at step %d", last_path, progress.step)
    return progress


def _pair_pool(config: TrainConfig, rank: int, real: RealVolumes, device: torch.device) -> PairPool:
    """This rank's pool of training pairs."""
    # On a GPU the pairs are synthesised and kept there, two ahead of need in a background thread (a CPU pipeline
    # could not feed its steps).
    prefetch = 2 if device.type == "cuda" else 0
    return PairPool(
        config.data, config.synthesis, seed=config.schedule.seed, rank=rank, real=real, device=device, prefetch=prefetch
    )


def _prepare_validation(session: _Session, progress: _Progress, real: RealVolumes) -> None:
    """Synthesise the validation pairs and score the identity on them; at step 0 also the untrained network."""
    config = session.config
    session.validation = validation_pairs(config.data, config.synthesis, real, session.device)
    session.identity = evaluate(None, session.validation, session.spacing, session.device)
    log.info("validation pairs: %d; identity (initial): %s", len(session.validation), _fmt(session.identity))
    if progress.step == 0:
        progress.last_figures = evaluate(session.network, session.validation, session.spacing, session.device)
        score = selection_score(progress.last_figures, config.schedule.select_by)
        session.logs.validation(0, progress.last_figures, session.identity, score)


def _progress_bar(config: TrainConfig, step: int):
    """A tqdm bar over the schedule's steps, starting at ``step``."""
    from tqdm import tqdm

    return tqdm(total=config.schedule.steps, initial=step, desc=config.name, mininterval=2.0, dynamic_ncols=True)


def _train_loop(session: _Session, progress: _Progress, pool: PairPool, bar) -> None:
    """Train from ``progress.step`` to the schedule's end, or until ``schedule.max_minutes`` run out."""
    schedule = session.config.schedule
    progress.last_save = time.perf_counter()
    progress.step_time = time.perf_counter()
    session.network.train()
    while progress.step < schedule.steps:
        progress.step += 1
        step = progress.step
        out_of_time = _out_of_time(schedule.max_minutes, session.start_time, session.device, session.world)
        made = pool.sync(step - 1)
        batch = pool.batch(step - 1).to(session.device)
        lr, terms = _optimisation_step(session, batch, step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()}, refresh=False)
        if session.main:
            _log_train_row(session, progress, terms, lr, made)
            _validate_and_save(session, progress, final=step == schedule.steps or out_of_time)
        if out_of_time:
            log.info(
                "stopped at step %d: schedule.max_minutes (%g) ran out; --resume continues", step, schedule.max_minutes
            )
            break


def _optimisation_step(session: _Session, batch: TrainingPair, step: int) -> tuple[float, dict[str, float]]:
    """One AdamW step on ``batch`` at (1-based) ``step``; returns the learning rate and the loss terms."""
    config, optimizer, scaler = session.config, session.optimizer, session.scaler
    lr = learning_rate(config, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    seed = mixed_seed(config.schedule.seed, step)
    total, terms = registration_loss(session.model, batch, config.loss, session.spacing, session.autocast, seed=seed)
    if not math.isfinite(terms["loss"]):
        raise InputError(f"the loss became {terms['loss']} at step {step}: lower optim.learning_rate")
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if config.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(session.network.parameters(), config.optim.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return lr, terms


def _log_train_row(session: _Session, progress: _Progress, terms: dict[str, float], lr: float, made: int) -> None:
    """A ``train.csv`` row every ``log_every`` steps and at the last step (``made``: pairs synthesised this step)."""
    schedule = session.config.schedule
    step = progress.step
    if step % schedule.log_every == 0 or step == schedule.steps:
        now = time.perf_counter()
        per_step = (now - progress.step_time) / (schedule.log_every if step % schedule.log_every == 0 else 1)
        progress.step_time = now
        session.logs.train({"step": step, **terms, "lr": lr, "seconds_per_step": per_step, "synthesised": made})


def _validate_and_save(session: _Session, progress: _Progress, final: bool) -> None:
    """Validate when due (or ``final``) and save ``last.pt`` when due (or ``final``)."""
    schedule = session.config.schedule
    step = progress.step
    if session.validation and (final or (schedule.validate_every and step % schedule.validate_every == 0)):
        _validate(session, progress)
    due = (schedule.checkpoint_every and step % schedule.checkpoint_every == 0) or (
        schedule.checkpoint_minutes and time.perf_counter() - progress.last_save > 60.0 * schedule.checkpoint_minutes
    )
    if final or due:
        _save_last(session, progress)


def _validate(session: _Session, progress: _Progress) -> None:
    """Score the network on the validation pairs; a better score than any before is saved as ``best.pt``."""
    network, step = session.network, progress.step
    network.eval()
    progress.last_figures = evaluate(network, session.validation, session.spacing, session.device)
    network.train()
    score = selection_score(progress.last_figures, session.config.schedule.select_by)
    session.logs.validation(step, progress.last_figures, session.identity, score)
    log.info("step %d validation: %s (identity %s)", step, _fmt(progress.last_figures), _fmt(session.identity))
    if math.isfinite(score) and score > progress.best_score:
        progress.best_step, progress.best_score = step, score
        save_checkpoint(
            session.out / BEST_CHECKPOINT,
            network,
            step=step,
            validation=progress.last_figures,
            identity=session.identity,
            train_config=session.config.to_dict(),
        )


def _save_last(session: _Session, progress: _Progress) -> None:
    """Save ``last.pt``: weights, optimiser (and gradient scaler) state and the best step so far, for ``resume``."""
    extra = {"scaler": session.scaler.state_dict()} if session.scaler is not None else {}
    save_checkpoint(
        session.out / LAST_CHECKPOINT,
        session.network,
        optimizer=session.optimizer.state_dict(),
        step=progress.step,
        best_step=progress.best_step,
        best_score=progress.best_score,
        train_config=session.config.to_dict(),
        **extra,
    )
    progress.last_save = time.perf_counter()


def _result(session: _Session, progress: _Progress) -> TrainResult:
    return TrainResult(
        out_dir=session.out,
        step=progress.step,
        best_step=progress.best_step,
        best_score=progress.best_score if math.isfinite(progress.best_score) else float("nan"),
        validation=progress.last_figures,
        identity=session.identity,
        wall_time_s=time.perf_counter() - session.start_time,
        device=str(session.device),
        network=session.network,
    )


def _out_of_time(max_minutes: float, start_time: float, device: torch.device, world: int) -> bool:
    """Whether ``max_minutes`` of wall time have passed; under DDP every rank gets rank 0's answer, so that all stop
    at the same step."""
    if not max_minutes:
        return False
    over = time.perf_counter() - start_time > 60.0 * max_minutes
    if world > 1:
        flag = torch.tensor([1.0 if over else 0.0], device=device)
        dist.broadcast(flag, src=0)
        over = bool(flag.item() > 0)
    return over


def _fmt(figures: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in figures.items())


# ------------------------------------------------------------------------------------------------ export


def _stage_summary(run: Path) -> dict:
    """What one finished run folder says about itself: config, steps, best step, validation, wall time."""
    best = read_checkpoint(run / BEST_CHECKPOINT)
    last = read_checkpoint(run / LAST_CHECKPOINT) if (run / LAST_CHECKPOINT).is_file() else best
    config = TrainConfig.from_yaml(run / "config.yaml")
    wall = float("nan")
    log_path = run / "train.log"
    if log_path.is_file():
        first = log_path.read_text(encoding="utf-8").splitlines()[:1]
        if first:
            started = time.mktime(time.strptime(first[0][:19], "%Y-%m-%d %H:%M:%S"))
            wall = (run / LAST_CHECKPOINT).stat().st_mtime - started
    return {
        "run": run.name,
        "config": config.to_dict(),
        "steps": int(last.get("step", best.get("step", 0))),
        "best_step": int(best.get("step", -1)),
        "validation": dict(best.get("validation", {})),
        "identity": dict(best.get("identity", {})),
        "wall_time_s": round(wall, 1),
    }


def _at_pipeline_spacing(network: RegistrationNet, data: dict) -> RegistrationNet:
    """The trained network as the pipeline runs it, on its 1 mm grid.

    A network trained on 2 mm pairs (a CPU budget: 8x fewer voxels for the same field of view) is shipped with
    ``input_resolution="half"``: it then averages the 1 mm inputs to the 2 mm grid it learnt on, with the same
    weights, and returns the displacement on the 1 mm grid.
    """
    ratio = float(data.get("spacing_mm", PIPELINE_SPACING_MM)) / PIPELINE_SPACING_MM
    if math.isclose(ratio, 1.0):
        return network
    if not math.isclose(ratio, 2.0) or network.config.input_resolution != "full":
        raise InputError(
            f"cannot ship a network trained at {data.get('spacing_mm')} mm with input_resolution "
            f"{network.config.input_resolution!r}: the pipeline runs at {PIPELINE_SPACING_MM} mm; train at 1 mm, or at "
            "2 mm with input_resolution 'full'"
        )
    config = NetworkConfig.from_dict({**network.config.to_dict(), "input_resolution": "half"})
    shipped = RegistrationNet(config)
    shipped.load_state_dict(network.state_dict(), strict=True)
    return shipped.eval()


def export_model(
    stages: list[str | os.PathLike],
    destination: str | os.PathLike,
    name: str = "default",
    device_label: str = "CPU",
    notes: dict | None = None,
) -> dict:
    """Ship a trained model: ``<name>.pt`` (weights + architecture only) and ``<name>.json`` (its model card).

    Args:
        stages: The run folders of the training, in order (e.g. the baseline, then the fine-tuning); the weights are
            the last one's ``best.pt``.
        destination: Folder to write to (``Resources/Models`` for the bundled model).
        name: File name stem.
        device_label: How the training hardware is described (e.g. ``"CPU (2 cores)"``).
        notes: Extra card entries (e.g. the reproduction commands).

    Returns:
        The card, in the format :func:`..checkpoint.model_card` and :func:`..checkpoint.load_bundled_network` read:
        ``weights``, ``sha256``, ``network``, ``training``, ``steps`` (behind the shipped weights), ``steps_run``,
        ``device``, ``wall_time_s`` (all stages), ``git_commit``, ``validation``.
    """
    runs = [Path(s) for s in stages]
    if not runs:
        raise InputError("export_model needs at least one run folder")
    summaries = [_stage_summary(run) for run in runs]
    network = _at_pipeline_spacing(load_network(runs[-1] / BEST_CHECKPOINT), summaries[-1]["config"]["data"])
    dest = Path(destination)
    weights = save_checkpoint(dest / f"{name}.pt", network)
    final = summaries[-1]
    data = final["config"]["data"]
    sources = [k for k in PAIR_SOURCE_NAMES if data[k] > 0]
    card = {
        "name": name,
        "weights": weights.name,
        "sha256": sha256_of(weights),
        "size_bytes": weights.stat().st_size,
        "network": network.config.to_dict(),
        "inputs": {
            "fixed": "MR resampled to 1 mm on the processing grid, intensities mapped to [0, 1] (0.5-99.5 percentiles)"
            + (", averaged to 2 mm inside the network" if network.config.input_resolution == "half" else ""),
            "moving": "CT on the same grid after rigid pre-alignment, [0, 1] the same way",
            "moving_labels": "CT vertebra labels on the same grid (enter as a binary bone mask)",
            **(
                {"fixed_bone": "MR vertebral-bone probability on the same grid, from the bundled segmentation model"}
                if network.config.use_fixed_bone
                else {}
            ),
            "size_multiple": network.config.required_multiple,
        },
        "training": {
            "stages": summaries,
            "data": final["config"]["data"],
            "synthesis": final["config"]["synthesis"],
        },
        # Steps behind the shipped weights (earlier stages in full, the last one up to its best checkpoint).
        "steps": sum(s["steps"] for s in summaries[:-1]) + max(final["best_step"], 0),
        "steps_run": sum(s["steps"] for s in summaries),
        "device": device_label,
        "wall_time_s": round(sum(s["wall_time_s"] for s in summaries if math.isfinite(s["wall_time_s"])), 1),
        "git_commit": git_commit(),
        "validation": {
            "pairs": f"{data['validation_pairs']} fixed-seed synthesised pairs ({', '.join(sources)} in turn), "
            f"{data.get('validation_size') or data['crop_size']} voxels of {data['spacing_mm']} mm",
            "network": final["validation"],
            "identity": final["identity"],
        },
        "benchmark": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if notes:
        card.update(notes)
    (dest / f"{name}.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    return card

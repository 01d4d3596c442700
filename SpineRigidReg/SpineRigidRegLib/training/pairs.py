"""On-the-fly training pairs: synthesised CT/MR pairs with known anatomy, kept in a pool, cropped and augmented.

Sources (weights in :class:`.config.DataConfig`):

- ``"real"``: the real TotalSegmentator example CT and its vertebra labels, cut around the spine, and a synthetic
  T1-like MR of it after a known poly-rigid motion (:func:`..data.synthesis.synthesize_pair`).
- ``"phantom"``: the same on a procedural phantom (:func:`..data.phantom.make_phantom`) of random size, vertebra
  count, curvature and tissue layout, with its tissue map.
- ``"label_contrast"``: label-only pairs (:func:`..data.synthesis.synthesize_label_contrast_pair`) from a real or
  phantom label map: both images get an independent random contrast, so the network cannot rely on one MR sequence
  (or on the CT's intensities).

With ``data.prealign`` each pair's CT is then shifted by whole voxels as the pipeline's pre-alignment would place
it (:func:`prealigned`).

Synthesis costs several network steps on a CPU, so :class:`PairPool` keeps ``pool_size`` pairs on a grid of
``synth_size`` and replaces the oldest every ``refresh_every`` steps. On a GPU the pool synthesises and keeps its
pairs there (the motion, warps, blur and noise are torch; only the phantom's geometry is drawn on the CPU): a CPU
pipeline could not feed a GPU's steps. Every pair and every draw is a function of (seed, rank, index) alone, so a
resumed run sees exactly the pairs the interrupted one would have seen.

All tensors are ``(B, 1, D, H, W)``: ``fixed`` (MR-like) and ``moving`` (CT) intensities in [0, 1] as the pipeline
normalises them, ``moving_labels`` / ``fixed_labels`` int64 vertebra labels (``fixed_labels`` = the moving labels
warped by the true motion), and ``true_displacement`` ``(B, 3, D, H, W)`` the synthesised motion (voxels,
pull-back); the last two serve validation and the optional auxiliary losses only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..data.phantom import make_phantom
from ..data.subjects import load_real_case
from ..data.synthesis import MR_CONTRASTS, SynthesisSettings, synthesize_label_contrast_pair, synthesize_pair
from ..errors import InputError
from ..geometry import Geometry, image_to_tensor, tensor_to_image
from ..preprocess import normalize_intensity
from .config import PAIR_SOURCES, DataConfig

log = logging.getLogger(__name__)

_AIR_HU = -1000.0
_MIX = 0x9E3779B1  # odd constant spreading (seed, rank, index) over the seed space


@dataclass
class TrainingPair:
    """One pair (or a batch of pairs) on one grid; see the module docstring for the tensors."""

    fixed: torch.Tensor
    moving: torch.Tensor
    moving_labels: torch.Tensor
    fixed_labels: torch.Tensor
    source: str = ""
    true_displacement: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TrainingPair:
        return TrainingPair(
            self.fixed.to(device),
            self.moving.to(device),
            self.moving_labels.to(device),
            self.fixed_labels.to(device),
            self.source,
            None if self.true_displacement is None else self.true_displacement.to(device),
        )

    @staticmethod
    def stack(pairs: Sequence[TrainingPair]) -> TrainingPair:
        """Concatenate pairs of one size along the batch axis (the true field only when every pair has one)."""
        fields = [p.true_displacement for p in pairs]
        return TrainingPair(
            torch.cat([p.fixed for p in pairs]),
            torch.cat([p.moving for p in pairs]),
            torch.cat([p.moving_labels for p in pairs]),
            torch.cat([p.fixed_labels for p in pairs]),
            ",".join(p.source for p in pairs),
            None if any(f is None for f in fields) else torch.cat(fields),  # type: ignore[arg-type]
        )


def mixed_seed(*parts: int) -> int:
    """A 62-bit seed from several integers (different tuples give unrelated generators)."""
    value = 0
    for part in parts:
        value = (value * _MIX + int(part) + 1) % (1 << 62)
    return value


# ------------------------------------------------------------------------------------------------ anatomy


@dataclass
class _Anatomy:
    """A CT (HU), its vertebra labels and optionally its tissue map, ``(1, 1, D, H, W)`` tensors on a 1-voxel grid."""

    ct: torch.Tensor
    labels: torch.Tensor
    tissues: torch.Tensor | None


class RealVolumes:
    """The real example CT with its vertebra labels, loaded once (lazily) at ``spacing_mm``."""

    def __init__(self, data_dir: str | Path | None, spacing_mm: float = 1.0) -> None:
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.spacing_mm = spacing_mm
        self._anatomy: _Anatomy | None = None

    def anatomy(self) -> _Anatomy:
        if self._anatomy is None:
            if self.data_dir is None:
                raise InputError("real pairs need data.real_data_dir")
            case = load_real_case(self.data_dir, spacing=self.spacing_mm)
            tissues = None if case.tissues is None else image_to_tensor(case.tissues, torch.int64)
            self._anatomy = _Anatomy(image_to_tensor(case.ct), image_to_tensor(case.labels, torch.int64), tissues)
        return self._anatomy


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]``."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def phantom_anatomy(data: DataConfig, generator: torch.Generator) -> _Anatomy:
    """A random phantom sized so that a ``synth_size`` box around its spine holds whole vertebrae."""
    size = max(data.synth_size[1:])
    in_plane = int(round(_uniform(generator, 1.3, 1.8) * size))
    count = _randint(generator, *data.phantom_vertebrae)
    pitch = 0.3 * in_plane  # vertebra + disc height scales with the body size, as in adults
    height = max(int(round((count + 0.3) * pitch)), data.synth_size[0])
    phantom = make_phantom(
        num_vertebrae=count,
        shape=(height, in_plane, int(round(in_plane * _uniform(generator, 0.9, 1.15)))),
        spacing=data.spacing_mm,
        curvature_deg=_uniform(generator, -10.0, 30.0),
        seed=_randint(generator, 0, 2**31 - 1),
        noise_hu=_uniform(generator, 5.0, 30.0),
    )
    return _Anatomy(
        image_to_tensor(phantom.ct),
        image_to_tensor(phantom.labels, torch.int64),
        image_to_tensor(phantom.tissues, torch.int64),
    )


def crop_box(volume: torch.Tensor, start: Sequence[int], size: Sequence[int], fill: float | int = 0) -> torch.Tensor:
    """The ``size`` box of ``(B, C, D, H, W)`` starting at ``start`` (may reach outside: filled with ``fill``)."""
    out = volume.new_full((*volume.shape[:2], *size), fill)
    src, dst = [], []
    for s0, n, total in zip(start, size, volume.shape[2:]):
        lo, hi = max(s0, 0), min(s0 + n, total)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s0, hi - s0))
    out[(slice(None), slice(None), *dst)] = volume[(slice(None), slice(None), *src)]
    return out


def _spine_box(labels: torch.Tensor, size: Sequence[int], generator: torch.Generator) -> list[int]:
    """Start of a ``size`` box centred near a random labelled voxel's slab of the spine."""
    coords = (labels[0, 0] > 0).nonzero()
    if coords.numel() == 0:
        centre = [s // 2 for s in labels.shape[2:]]
    else:
        pick = coords[_randint(generator, 0, coords.shape[0] - 1)].tolist()
        middle = coords.float().mean(0).tolist()
        # Along the spine (the long axis of the label box) follow the random voxel; across it stay centred.
        extent = (coords.max(0).values - coords.min(0).values).tolist()
        axis = max(range(3), key=lambda a: extent[a])
        centre = [pick[a] if a == axis else middle[a] for a in range(3)]
    return [int(round(c - n / 2 + _uniform(generator, -n / 8, n / 8))) for c, n in zip(centre, size)]


def _cut(anatomy: _Anatomy, size: Sequence[int], generator: torch.Generator) -> _Anatomy:
    start = _spine_box(anatomy.labels, size, generator)
    return _Anatomy(
        crop_box(anatomy.ct, start, size, _AIR_HU),
        crop_box(anatomy.labels, start, size, 0),
        None if anatomy.tissues is None else crop_box(anatomy.tissues, start, size, 0),
    )


# ---------------------------------------------------------------------------------------------- synthesis


def make_pair(
    source: str,
    seed: int,
    data: DataConfig,
    synthesis: SynthesisSettings,
    real: RealVolumes | None = None,
    device: str | torch.device = "cpu",
) -> TrainingPair:
    """One synthesised pair of ``data.synth_size`` from ``source`` (see the module docstring), its tensors on
    ``device`` (where the synthesis runs). The random draws come from a CPU generator, so a seed gives the same
    motion and contrast on every device (the images agree to float rounding).

    Raises:
        InputError: unknown source, or a real source without the real data.
    """
    if source not in PAIR_SOURCES:
        raise InputError(f"unknown pair source {source!r}; choose from {PAIR_SOURCES}")
    generator = torch.Generator().manual_seed(int(seed))
    use_real = source == "real" or (
        source == "label_contrast"
        and real is not None
        and real.data_dir is not None
        and data.real > 0
        and float(torch.rand((), generator=generator)) < 0.5
    )
    if use_real:
        if real is None:
            raise InputError("real pairs need the real data (data.real_data_dir)")
        anatomy = real.anatomy()
    else:
        anatomy = phantom_anatomy(data, generator)
    for _ in range(8):  # a box with no vertebra teaches nothing about rigidity: draw again
        cut = _cut(anatomy, data.synth_size, generator)
        if len(torch.unique(cut.labels)) >= 2:
            break
    spacing = (data.spacing_mm,) * 3
    if source == "label_contrast":
        fixed, moving, moving_labels, fixed_labels, field = synthesize_label_contrast_pair(
            cut.labels.to(device), generator, synthesis, spacing
        )
        made = TrainingPair(fixed, moving, moving_labels, fixed_labels, source, field)
        return prealigned(made) if data.prealign else made
    if len(data.mr_contrasts) > 1:  # (one contrast draws nothing: the pairs of earlier runs stay the same)
        contrast = data.mr_contrasts[_randint(generator, 0, len(data.mr_contrasts) - 1)]
        synthesis = replace(synthesis, intensity_ranges=MR_CONTRASTS[contrast])
    elif data.mr_contrasts[0] != "t1":
        synthesis = replace(synthesis, intensity_ranges=MR_CONTRASTS[data.mr_contrasts[0]])
    geometry = Geometry(
        shape=tuple(data.synth_size), spacing=spacing, origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)
    )
    pair = synthesize_pair(
        tensor_to_image(cut.ct.float(), geometry),
        tensor_to_image(cut.labels.to(torch.int32), geometry),
        synthesis,
        seed=_randint(generator, 0, 2**31 - 1),
        tissues=None if cut.tissues is None else tensor_to_image(cut.tissues.to(torch.uint8), geometry),
        device=device,
    )
    made = TrainingPair(
        fixed=image_to_tensor(pair.fixed),
        moving=normalize_intensity(cut.ct.float()),
        moving_labels=cut.labels.long(),
        fixed_labels=image_to_tensor(pair.fixed_labels, torch.int64),
        source=source,
        true_displacement=pair.true_displacement.float(),
    ).to(device)
    return prealigned(made) if data.prealign else made


def prealigned(pair: TrainingPair) -> TrainingPair:
    """``pair`` with its CT shifted by whole voxels so that the true motion has (nearly) zero mean over the fixed
    vertebrae: what the pipeline's pre-alignment from vertebra centres leaves for the network.

    With ``t`` the rounded mean of ``true_displacement`` (voxels) over ``fixed_labels > 0``, the new moving image is
    ``moving(y + t)`` (edge voxels repeated) and the new field ``u - t``, so the fixed image is still the moving one
    pulled back by the field. Whole voxels keep the labels exact (no second nearest-neighbour resampling).
    Pairs without a known field or without fixed vertebrae are returned unchanged.
    """
    field = pair.true_displacement
    bone = pair.fixed_labels[:, 0] > 0
    if field is None or not bool(bone.any()):
        return pair
    shift = [int(round(float(field[:, axis][bone].mean()))) for axis in range(3)]
    if not any(shift):
        return pair

    def shifted(volume: torch.Tensor) -> torch.Tensor:
        for axis, t in enumerate(shift):
            size = volume.shape[axis + 2]
            index = (torch.arange(size, device=volume.device) + t).clamp(0, size - 1)
            volume = volume.index_select(axis + 2, index)
        return volume

    offset = torch.tensor(shift, dtype=field.dtype).view(1, 3, 1, 1, 1)
    return TrainingPair(
        pair.fixed, shifted(pair.moving), shifted(pair.moving_labels), pair.fixed_labels, pair.source, field - offset
    )


# -------------------------------------------------------------------------------------------- augmentation


def augment(pair: TrainingPair, data: DataConfig, generator: torch.Generator) -> TrainingPair:
    """A random ``crop_size`` crop, flips, axis permutation and intensity gamma (same geometry for every tensor).

    The labels move with the images, so ``fixed_labels`` still equals the warped ``moving_labels``; the true field
    is flipped (its component along a flipped axis negated) and permuted (its components too) to stay the pull-back
    between the augmented images.
    """
    size = data.crop_size
    start = [_randint(generator, 0, s - c) for s, c in zip(pair.fixed.shape[2:], size)]
    if all(s == c for s, c in zip(pair.fixed.shape[2:], size)):
        start = [0, 0, 0]
    tensors = [crop_box(t, start, size) for t in (pair.fixed, pair.moving, pair.moving_labels, pair.fixed_labels)]
    field = None if pair.true_displacement is None else crop_box(pair.true_displacement, start, size)
    if data.augment_flip:
        axes = [a for a in range(3) if float(torch.rand((), generator=generator)) < 0.5]
        if axes:
            tensors = [t.flip([a + 2 for a in axes]) for t in tensors]
            if field is not None:
                field = field.flip([a + 2 for a in axes])
                sign = torch.ones(3, dtype=field.dtype, device=field.device)
                sign[axes] = -1.0
                field = field * sign.view(1, 3, 1, 1, 1)
    if data.augment_permute and len(set(size)) == 1:
        order = torch.randperm(3, generator=generator).tolist()
        tensors = [t.permute(0, 1, *[o + 2 for o in order]).contiguous() for t in tensors]
        if field is not None:
            field = field[:, order].permute(0, 1, *[o + 2 for o in order]).contiguous()
    fixed, moving, moving_labels, fixed_labels = tensors
    if data.augment_gamma > 0:
        fixed = fixed.clamp(0, 1) ** math.exp(_uniform(generator, -data.augment_gamma, data.augment_gamma))
        moving = moving.clamp(0, 1) ** math.exp(_uniform(generator, -data.augment_gamma, data.augment_gamma))
    return TrainingPair(fixed, moving, moving_labels, fixed_labels, pair.source, field)


def center_crop(pair: TrainingPair, size: Sequence[int]) -> TrainingPair:
    """The centred ``size`` box of every tensor (validation: no randomness)."""
    start = [(s - c) // 2 for s, c in zip(pair.fixed.shape[2:], size)]
    return TrainingPair(
        *[crop_box(t, start, size) for t in (pair.fixed, pair.moving, pair.moving_labels, pair.fixed_labels)],
        source=pair.source,
        true_displacement=None if pair.true_displacement is None else crop_box(pair.true_displacement, start, size),
    )


# ----------------------------------------------------------------------------------------------------- pool


class PairPool:
    """Synthesised pairs kept in memory and refreshed on a fixed schedule (see the module docstring).

    At step ``s`` the pool holds the pairs of index ``n(s) - pool_size .. n(s) - 1`` with
    ``n(s) = pool_size + s // refresh_every``; pair ``j`` is built from ``mixed_seed(seed, rank, j)``. Draws at step
    ``s`` use ``mixed_seed(seed, rank, s, 1)``.
    """

    def __init__(
        self,
        data: DataConfig,
        synthesis: SynthesisSettings,
        seed: int = 0,
        rank: int = 0,
        real: RealVolumes | None = None,
        device: str | torch.device = "cpu",
        prefetch: int = 0,
    ) -> None:
        """
        Args:
            data, synthesis: What the pairs are made of.
            seed, rank: Together with a pair's index, its seed.
            real: The real volumes (loaded from ``data.real_data_dir`` when ``None``).
            device: Where the pairs are synthesised and kept.
            prefetch: Pairs synthesised ahead of need in a background thread (0: none). On a GPU the synthesis'
                CPU part (the phantom's geometry, SimpleITK) then overlaps the training steps; the pairs are the
                same either way.
        """
        self.data = data
        self.device = torch.device(device)
        self.prefetch = int(prefetch)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pairs") if self.prefetch > 0 else None
        self._pending: dict[int, Future[TrainingPair]] = {}
        self.synthesis = synthesis
        self.seed = seed
        self.rank = rank
        self.real = real if real is not None else RealVolumes(data.real_data_dir, data.spacing_mm)
        self.pairs: dict[int, TrainingPair] = {}
        weights = data.source_weights()
        self._sources = list(weights)
        self._weights = torch.tensor([weights[s] for s in self._sources], dtype=torch.float64)

    def indices(self, step: int) -> range:
        extra = step // self.data.refresh_every if self.data.refresh_every > 0 else 0
        end = self.data.pool_size + extra
        return range(end - self.data.pool_size, end)

    def source_of(self, index: int) -> str:
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, self.rank, index, 2))
        return self._sources[int(torch.multinomial(self._weights, 1, generator=generator))]

    def sync(self, step: int) -> int:
        """Make the pool hold the pairs of ``step``; returns the number of pairs synthesised."""
        wanted = self.indices(step)
        for index in [i for i in self.pairs if i not in wanted]:
            del self.pairs[index]
        made = 0
        for index in wanted:
            if index not in self.pairs:
                pending = self._pending.pop(index, None)
                self.pairs[index] = pending.result() if pending is not None else self._make(index)
                made += 1
        if self._executor is not None:
            for index in [i for i in self._pending if i < wanted.start]:  # a jump back (resume): no longer needed
                self._pending.pop(index).cancel()
            for index in range(wanted.stop, wanted.stop + self.prefetch):
                if index not in self._pending:
                    self._pending[index] = self._executor.submit(self._make, index)
        return made

    def _make(self, index: int) -> TrainingPair:
        source = self.source_of(index)
        seed = mixed_seed(self.seed, self.rank, index)
        return make_pair(source, seed, self.data, self.synthesis, self.real, self.device)

    def close(self) -> None:
        """Stop the prefetching thread (pending pairs are dropped)."""
        if self._executor is not None:
            for pending in self._pending.values():
                pending.cancel()
            self._pending.clear()
            self._executor.shutdown(wait=True)

    def batch(self, step: int) -> TrainingPair:
        """The augmented batch of ``step`` (``batch_size`` pairs, on the pool's device); call :meth:`sync` first."""
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, self.rank, step, 1))
        keys = sorted(self.pairs)
        chosen = [keys[_randint(generator, 0, len(keys) - 1)] for _ in range(self.data.batch_size)]
        return TrainingPair.stack([augment(self.pairs[k], self.data, generator) for k in chosen])


def validation_pairs(
    data: DataConfig,
    synthesis: SynthesisSettings,
    real: RealVolumes | None = None,
    device: str | torch.device = "cpu",
) -> list[TrainingPair]:
    """``data.validation_pairs`` fixed-seed pairs, sources in turn, centre-cropped to ``validation_size`` (or
    ``crop_size``), synthesised on ``device``."""
    sources = list(data.source_weights())
    real = real if real is not None else RealVolumes(data.real_data_dir, data.spacing_mm)
    out = []
    for i in range(data.validation_pairs):
        pair = make_pair(sources[i % len(sources)], data.validation_seed + i, data, synthesis, real, device)
        out.append(center_crop(pair, data.validation_size or data.crop_size))
    return out

"""Benchmark pairs with ground truth: synthetic MR-like images of real and procedural spine CTs after a known motion.

Every case lives on one 1 mm grid (the CT's): the fixed MR-like image, the moving CT (HU), the CT vertebra labels,
the fixed labels (the CT labels moved by the true field) and the true displacement (``(1, 3, D, H, W)`` voxels,
pull-back fixed -> moving, :mod:`..geometry`). Cases are built by :func:`..data.synthesis.synthesize_pair`, so the
same ``(kind, index, seed)`` always gives the same case.

Sources:
    ``real``: the TotalSegmentator example CT with its T11-L2 labels (``../shared/data``), resampled to 1 mm and
    cropped around the vertebrae; cases differ by the motion and the MR appearance (seed) and by the motion's size.
    ``phantom``: :func:`..data.phantom.make_phantom` spines of varied anatomy (3-5 vertebrae, thoracic or lumbar
    numbering, lordotic or kyphotic curvature, LPS- or RAS-oriented grids).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..data.clinical import scaled_motion
from ..data.phantom import make_phantom
from ..data.synthesis import MR_CONTRASTS, SynthesisSettings, SyntheticPair, synthesize_pair
from ..errors import InputError
from ..geometry import Geometry
from ..preprocess import resample_to_reference

log = logging.getLogger(__name__)

REAL = "real"
PHANTOM = "phantom"

#: Scale of the synthetic motion (multiplies every motion range of :class:`SynthesisSettings`), cycled over cases.
MOTION_SCALES = (1.0, 1.5, 0.75)

#: RAS-aligned direction (the real CT's orientation), used for every other phantom.
RAS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class BenchmarkCase:
    """One ground-truth pair.

    Attributes:
        name: Unique case name (``real-00``, ``phantom-03``).
        source: ``"real"`` or ``"phantom"``.
        seed: Seed of the motion and appearance.
        fixed: MR-like float32 image in [0, 1].
        moving: CT in HU.
        moving_labels: CT vertebra labels.
        fixed_labels: The labels after the true motion (what a perfect registration maps the CT labels onto).
        true_displacement: ``(1, 3, D, H, W)`` float32 voxels on the common grid.
        description: Anatomy and motion parameters, for the report.
        grid: The evaluation grid of ``moving_labels``, ``fixed_labels`` and ``true_displacement`` when the fixed
            image has a grid of its own (a clinical MR); ``None``: the fixed image's grid.
        evaluated: Vertebra labels the metrics cover (``None``: all); a vertebra mostly outside the MR is left out.
        fixed_points: MR vertebra centre points (name -> LPS mm) given to the methods that start from points;
            ``None``: the centroids of ``fixed_labels``.
        mr_truth: True MR vertebra mask on the fixed image's grid (for the segmentation's Dice), if known.
    """

    name: str
    source: str
    seed: int
    fixed: sitk.Image
    moving: sitk.Image
    moving_labels: sitk.Image
    fixed_labels: sitk.Image
    true_displacement: torch.Tensor
    description: dict = field(default_factory=dict)
    grid: Geometry | None = None
    evaluated: tuple[int, ...] | None = None
    fixed_points: dict[str, np.ndarray] | None = None
    mr_truth: sitk.Image | None = None

    @property
    def geometry(self) -> Geometry:
        """The evaluation grid (see ``grid``)."""
        return self.grid if self.grid is not None else Geometry.of(self.fixed)

    def fixed_on_grid(self) -> sitk.Image:
        """The fixed image on the evaluation grid (itself when it has no grid of its own)."""
        if self.grid is None:
            return self.fixed
        return resample_to_reference(self.fixed, self.grid)

    @classmethod
    def from_pair(cls, name: str, source: str, seed: int, pair: SyntheticPair, description: dict) -> BenchmarkCase:
        """A case holding a synthesised pair's images, labels and true displacement."""
        return cls(
            name=name,
            source=source,
            seed=seed,
            fixed=pair.fixed,
            moving=pair.moving,
            moving_labels=pair.moving_labels,
            fixed_labels=pair.fixed_labels,
            true_displacement=pair.true_displacement,
            description=description,
        )


def phantom_anatomy(index: int, tiny: bool = False) -> dict:
    """The :func:`..data.phantom.make_phantom` arguments of phantom case ``index`` (varied anatomy, deterministic).

    ``tiny`` gives 3-vertebra 32x32x40 phantoms for tests.
    """
    if tiny:
        return {
            "num_vertebrae": 3,
            "shape": (40, 32, 32),
            "curvature_deg": (10.0, -5.0)[index % 2],
            "seed": index,
            "direction": RAS_DIRECTION if index % 2 else None,
        }
    count = (4, 3, 5, 4)[index % 4]
    curvature = (15.0, -10.0, 25.0, 5.0, 30.0, -5.0)[index % 6]
    top_label = (None, 17, None, 10)[index % 4]  # lumbar, T10-T12, lumbar, T3-T6
    depth = 26 * count + 16
    return {
        "num_vertebrae": count,
        "shape": (depth, 80, 88),
        "curvature_deg": curvature,
        "top_label": top_label,
        "seed": 100 + index,
        "direction": RAS_DIRECTION if index % 2 else None,
    }


def phantom_case(index: int, seed: int, tiny: bool = False, settings: SynthesisSettings | None = None) -> BenchmarkCase:
    """Phantom case ``index`` (anatomy from :func:`phantom_anatomy`) with motion/appearance ``seed``."""
    anatomy = phantom_anatomy(index, tiny)
    phantom = make_phantom(**anatomy)
    scale = MOTION_SCALES[index % len(MOTION_SCALES)]
    synthesis = scaled_motion(settings or SynthesisSettings(), scale, vertebra_jitter=False)
    pair = synthesize_pair(phantom.ct, phantom.labels, synthesis, seed=seed, tissues=phantom.tissues)
    description = {
        "vertebrae": anatomy["num_vertebrae"],
        "curvature_deg": anatomy["curvature_deg"],
        "orientation": "RAS" if anatomy["direction"] else "LPS",
        "motion_scale": scale,
        "grid": list(phantom.geometry.shape),
        "mr_contrast": _contrast_name(synthesis),
    }
    return BenchmarkCase.from_pair(f"phantom-{index:02d}", PHANTOM, seed, pair, description)


def real_case(
    index: int, seed: int, shared_data: str | Path, settings: SynthesisSettings | None = None, margin_mm: float = 15.0
) -> BenchmarkCase:
    """Real-CT case ``index``: the TotalSegmentator example CT (1 mm) with motion/appearance ``seed``."""
    from ..data.subjects import load_real_case

    real = load_real_case(shared_data, spacing=1.0, margin_mm=margin_mm)
    scale = MOTION_SCALES[index % len(MOTION_SCALES)]
    synthesis = scaled_motion(settings or SynthesisSettings(), scale, vertebra_jitter=False)
    pair = synthesize_pair(real.ct, real.labels, synthesis, seed=seed, tissues=real.tissues)
    geometry = Geometry.of(real.ct)
    description = {
        "vertebrae": int(np.count_nonzero(np.unique(sitk.GetArrayViewFromImage(real.labels)))),
        "curvature_deg": "patient",
        "orientation": "RAS",
        "motion_scale": scale,
        "grid": list(geometry.shape),
        "mr_contrast": _contrast_name(synthesis),
    }
    return BenchmarkCase.from_pair(f"real-{index:02d}", REAL, seed, pair, description)


def _contrast_name(settings: SynthesisSettings) -> str:
    return next((name for name, ranges in MR_CONTRASTS.items() if ranges == settings.intensity_ranges), "custom")


@dataclass(frozen=True)
class CaseSpec:
    """How to rebuild one case: ``source``, ``index`` within its source, ``seed``, and the MR ``contrast`` (a key of
    :data:`..data.synthesis.MR_CONTRASTS`)."""

    source: str
    index: int
    seed: int
    contrast: str = "t1"

    @property
    def name(self) -> str:
        return f"{self.source}-{self.index:02d}"


def case_specs(count: int, real_count: int = 0, seed: int = 0, contrast: str = "t1") -> list[CaseSpec]:
    """``count`` case specifications: ``real_count`` real-CT cases first, then phantoms; seeds from ``seed``; MR-like
    images of ``contrast``."""
    if contrast not in MR_CONTRASTS:
        raise InputError(f"unknown MR contrast {contrast!r}; choose from {sorted(MR_CONTRASTS)}")
    if count < 1:
        raise InputError(f"the benchmark needs at least one case, got {count}")
    if not 0 <= real_count <= count:
        raise InputError(f"real_count must be between 0 and the number of cases ({count}), got {real_count}")
    specs = [CaseSpec(REAL, i, seed + 1000 + i, contrast) for i in range(real_count)]
    specs += [CaseSpec(PHANTOM, i, seed + 2000 + i, contrast) for i in range(count - real_count)]
    return specs


def build_case(spec: CaseSpec, shared_data: str | Path | None = None, tiny: bool = False) -> BenchmarkCase:
    """Build the case of ``spec`` (real cases need ``shared_data``)."""
    if spec.contrast not in MR_CONTRASTS:
        raise InputError(f"unknown MR contrast {spec.contrast!r}; choose from {sorted(MR_CONTRASTS)}")
    settings = SynthesisSettings(intensity_ranges=MR_CONTRASTS[spec.contrast])
    if spec.source == REAL:
        if shared_data is None:
            raise InputError("real-CT cases need the shared data folder")
        return real_case(spec.index, spec.seed, shared_data, settings)
    if spec.source == PHANTOM:
        return phantom_case(spec.index, spec.seed, tiny=tiny, settings=settings)
    raise InputError(f"unknown case source {spec.source!r}")


def build_cases(
    specs: Sequence[CaseSpec],
    shared_data: str | Path | None = None,
    tiny: bool = False,
    progress: Callable[[float, str], None] | None = None,
) -> list[BenchmarkCase]:
    """Build every case of ``specs`` in order."""
    cases = []
    for i, spec in enumerate(specs):
        if progress:
            progress(i / max(len(specs), 1), f"building {spec.name}")
        cases.append(build_case(spec, shared_data, tiny))
    return cases


def real_data_available(shared_data: str | Path | None) -> bool:
    """True when ``shared_data`` holds the TotalSegmentator example CT and labels."""
    if shared_data is None:
        return False
    folder = Path(shared_data)
    if (folder / "totalsegmentator-examples").is_dir():
        folder = folder / "totalsegmentator-examples"
    return (folder / "example_ct.nii.gz").is_file() and (folder / "example_seg.nii.gz").is_file()


__all__ = [
    "PHANTOM",
    "REAL",
    "BenchmarkCase",
    "CaseSpec",
    "build_case",
    "build_cases",
    "case_specs",
    "phantom_anatomy",
    "phantom_case",
    "real_case",
    "real_data_available",
]

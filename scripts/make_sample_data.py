"""Build the bundled sample case ``Resources/SampleData/`` (the README demo, ``srr-register --sample``).

Source: the TotalSegmentator test files (Apache-2.0) in ``../shared/data/totalsegmentator-examples``: a real CT
(3 mm) and its "total" label map, of which the vertebrae (and the spinal cord, for the MR's tissues) are kept. The MR
is synthetic, made to look like a clinical one (issue 15): a textured T2-weighted contrast of the same CT after a known
per-vertebra rigid motion (:func:`SpineRigidRegLib.data.synthesis.synthesize_pair` for the motion,
:func:`SpineRigidRegLib.data.clinical.textured_contrast` for the contrast), acquired as a clinical oblique sagittal
2D series (0.7 mm pixels, 3.5 mm slices, box slice profile, bias field, Rician noise;
:func:`SpineRigidRegLib.data.clinical.acquire_clinical`) in a scanner frame of its own.
Everything is deterministic for a given seed (on the same torch version). Run from the repository root::

    .venv/bin/python scripts/make_sample_data.py            # writes Resources/SampleData/
    .venv/bin/python scripts/make_sample_data.py --out /tmp/sample --seed 7

The written ``PROVENANCE.md`` records the exact processing, the seed and the checksums.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from SpineRigidRegLib.checkpoint import resources_dir
from SpineRigidRegLib.cli.register import SAMPLE_FILES
from SpineRigidRegLib.data.clinical import ClinicalAcquisition, acquire_clinical, textured_contrast
from SpineRigidRegLib.data.subjects import (
    TOTALSEGMENTATOR_EXAMPLE,
    TOTALSEGMENTATOR_SPINAL_CORD,
    TOTALSEGMENTATOR_VERTEBRAE,
    bone_aligned_slices,
    labels_on_image_grid,
    spine_tissue_map,
)
from SpineRigidRegLib.data.synthesis import MR_CONTRASTS, SynthesisSettings, synthesize_pair
from SpineRigidRegLib.data.vertebrae import TOTALSEGMENTATOR, vertebra_labels_only, vertebra_name
from SpineRigidRegLib.geometry import Geometry, image_to_tensor, tensor_to_image
from SpineRigidRegLib.io import write_image, write_landmarks
from SpineRigidRegLib.preprocess import resample_isotropic, resample_to_reference
from SpineRigidRegLib.warp import warp

log = logging.getLogger("make_sample_data")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / TOTALSEGMENTATOR_EXAMPLE
SOURCE_FILES = {"ct": "example_ct.nii.gz", "seg": "example_seg.nii.gz", "licence": "LICENSE-TotalSegmentator.txt"}
LICENCE_NAME = "LICENSE-TotalSegmentator.txt"
#: Extra files beside those the command line reads.
TRUTH_FILE = "true_motion.json"
DISPLACEMENT_FILE = "true_displacement.nii.gz"

DEFAULT_SEED = 7
#: Margin (mm) around the vertebrae kept in the bundled CT (in-plane; along the spine the label map's slices bound it).
CT_MARGIN_MM = 20.0
#: Margin (mm) of the 1 mm synthesis grid, wider than the MR's field of view so the oblique MR box lies inside it.
SYNTH_MARGIN_MM = 45.0
#: Slices of CT kept above the label map's last slice on the synthesis grid (anatomy the MR sees beyond the labels).
SYNTH_EXTRA_SUPERIOR_MM = 30.0
#: A vertebra cut by the label map's edge to less than this fraction of the largest one is dropped.
MIN_VERTEBRA_FRACTION = 0.25
#: MR grid: voxel size (mm) along its (i: anterior-posterior, j: superior-inferior, k: right-left) axes: a clinical
#: sagittal T2 series (in-plane 0.6-0.8 mm, slices 3-4 mm).
MR_SPACING = (0.7, 0.7, 3.5)
#: The MR's contrast (a key of ``data.synthesis.MR_CONTRASTS``): sagittal T2 is the clinical spine series.
MR_CONTRAST = "t2"
#: MR field of view (mm) along the same axes.
MR_FOV_MM = (120.0, 96.0, 105.0)
#: Obliquity of the MR slices relative to the anatomy: rotation vector (degrees) about LPS x, y, z.
MR_OBLIQUE_DEG = (7.0, 0.0, 4.0)
#: The MR scanner frame relative to the CT's: rotation vector (degrees, about LPS x, y, z) and translation (mm).
SCANNER_ROTATION_DEG = (3.0, -4.0, 6.0)
SCANNER_TRANSLATION_MM = (12.0, -9.0, 20.0)
#: The displacement field is stored rounded to this step (mm), a power of two so that the file compresses well.
DISPLACEMENT_STEP_MM = 2.0**-10


def rotation_matrix(rotation_deg: tuple[float, float, float]) -> np.ndarray:
    """3x3 rotation of a rotation vector given in degrees (axis * angle, LPS)."""
    w = np.radians(np.asarray(rotation_deg, dtype=np.float64))
    theta = float(np.linalg.norm(w))
    if theta < 1e-12:
        return np.eye(3)
    k = w / theta
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * kx @ kx


def rigid(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = rotation, translation
    return m


def affine_transform(matrix: np.ndarray) -> sitk.AffineTransform:
    """A SimpleITK transform of a 4x4 LPS map (output point -> input point when resampling)."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix[:3, :3].ravel().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    return transform


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def label_centroids(labels: sitk.Image) -> dict[int, np.ndarray]:
    """LPS centroid (mm) of every non-zero label."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(labels, sitk.sitkUInt16))
    return {int(v): np.asarray(stats.GetCentroid(v)) for v in stats.GetLabels()}


def label_coverage(seg: sitk.Image, ct: sitk.Image) -> tuple[int, int]:
    """The CT slice range ``[first, last]`` (ITK ``k``) that the label map's slices cover."""
    size = seg.GetSize()
    ends = [
        ct.TransformPhysicalPointToContinuousIndex(seg.TransformIndexToPhysicalPoint((0, 0, k)))[2]
        for k in (0, size[2] - 1)
    ]
    first, last = sorted(int(round(e)) for e in ends)
    return max(first, 0), min(last, ct.GetSize()[2] - 1)


def synthesis_region(image: sitk.Image) -> sitk.Image:
    """A uint8 image of ones on ``image``'s grid."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return ones


def crop_box(labels: sitk.Image, margin_mm: float, k_range: tuple[int, int]) -> tuple[slice, slice, slice]:
    """ITK-order slices of the labels' bounding box grown by ``margin_mm`` in-plane, ``k`` limited to ``k_range``."""
    array = sitk.GetArrayViewFromImage(labels)
    nonzero = np.nonzero(array)
    size, spacing = labels.GetSize(), labels.GetSpacing()
    out = []
    for axis in (0, 1):
        grow = int(np.ceil(margin_mm / spacing[axis]))
        lo = max(int(nonzero[2 - axis].min()) - grow, 0)
        hi = min(int(nonzero[2 - axis].max()) + grow + 1, size[axis])
        out.append(slice(lo, hi))
    out.append(slice(k_range[0], k_range[1] + 1))
    return tuple(out)  # type: ignore[return-value]


def build(source: Path, out: Path, seed: int, with_displacement: bool = False) -> dict:
    """Write the sample case to ``out``; returns the facts PROVENANCE.md reports.

    ``with_displacement`` also writes the whole true map as a dense displacement field on the MR grid (about 2.6 MB,
    so not bundled; the per-vertebra maps in the truth file are exact and small).
    """
    for name in SOURCE_FILES.values():
        if not (source / name).is_file():
            raise SystemExit(f"source file missing: {source / name}")
    ct_full = sitk.ReadImage(str(source / SOURCE_FILES["ct"]))
    # The example label map's header places it on the CT's first slices, but its anatomy is that of the last ones.
    seg = bone_aligned_slices(
        sitk.ReadImage(str(source / SOURCE_FILES["seg"])), ct_full, set(TOTALSEGMENTATOR_VERTEBRAE)
    )
    labels_full = vertebra_labels_only(labels_on_image_grid(seg, ct_full), TOTALSEGMENTATOR)
    labels_full = sitk.Cast(labels_full, sitk.sitkUInt8)
    counts = {
        v: int(n)
        for v, n in zip(*np.unique(sitk.GetArrayViewFromImage(labels_full), return_counts=True), strict=True)
        if v
    }
    dropped = {v: n for v, n in counts.items() if n < MIN_VERTEBRA_FRACTION * max(counts.values())}
    if dropped:
        array = sitk.GetArrayFromImage(labels_full)
        array[np.isin(array, list(dropped))] = 0
        labels_full = Geometry.of(labels_full).apply_to(sitk.GetImageFromArray(array))
    k_range = label_coverage(seg, ct_full)

    # 1. The bundled CT: native voxels, cropped; int16 HU.
    box = crop_box(labels_full, CT_MARGIN_MM, k_range)
    ct = sitk.Cast(ct_full[box], sitk.sitkInt16)
    ct_labels = labels_full[box]
    values = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(ct_labels)) if v)

    # 2. The synthesis grid: 1 mm, wider, and a little beyond the labels superiorly (the MR sees more anatomy).
    extra = int(np.ceil(SYNTH_EXTRA_SUPERIOR_MM / ct_full.GetSpacing()[2]))
    synth_box = crop_box(labels_full, SYNTH_MARGIN_MM, (k_range[0], min(k_range[1] + extra, ct_full.GetSize()[2] - 1)))
    ct_synth = resample_isotropic(sitk.Cast(ct_full[synth_box], sitk.sitkFloat32), 1.0)
    labels_synth = resample_isotropic(labels_full[synth_box], 1.0, is_label=True)
    cord_full = labels_on_image_grid(sitk.Cast(seg == TOTALSEGMENTATOR_SPINAL_CORD, sitk.sitkUInt8), ct_full)
    cord_synth = resample_isotropic(cord_full[synth_box], 1.0, is_label=True)
    tissues_synth = spine_tissue_map(ct_synth, labels_synth, cord_synth)
    settings = SynthesisSettings(
        slice_thickness_mm=MR_SPACING[2], slice_axis=2, seed=seed, intensity_ranges=MR_CONTRASTS[MR_CONTRAST]
    )
    pair = synthesize_pair(ct_synth, labels_synth, settings=settings, seed=seed, tissues=tissues_synth)
    # The clinical-looking contrast: texture within each tissue, moved by the pair's true motion (the pair's own MR,
    # piecewise-constant classes, is not used).
    spacing = Geometry.of(ct_synth).spacing_array_order
    with torch.no_grad():
        clean = textured_contrast(
            image_to_tensor(ct_synth),
            image_to_tensor(labels_synth, torch.int64),
            image_to_tensor(tissues_synth, torch.int64),
            settings,
            torch.Generator().manual_seed(seed + 1),
            spacing,
        )
        moved = warp(clean, pair.true_displacement, padding_mode="border")
    clean_mr = tensor_to_image(moved.float(), Geometry.of(ct_synth))

    # 3. The MR grid: sagittal (i anterior->posterior, j superior->inferior, k right->left... as LPS -x), oblique,
    #    centred on the vertebrae, placed in a scanner frame G (MR point = G(synthesis point)).
    sagittal = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # columns: LPS axes of i, j, k
    direction_synth = rotation_matrix(MR_OBLIQUE_DEG) @ sagittal
    centre = np.mean(list(label_centroids(ct_labels).values()), axis=0)
    size = [int(round(f / s)) for f, s in zip(MR_FOV_MM, MR_SPACING, strict=True)]
    half = direction_synth @ (np.diag(MR_SPACING) @ (np.asarray(size) - 1) / 2.0)
    scanner = rigid(rotation_matrix(SCANNER_ROTATION_DEG), np.asarray(SCANNER_TRANSLATION_MM))
    origin = scanner[:3, :3] @ (centre - half) + scanner[:3, 3]
    direction = scanner[:3, :3] @ direction_synth
    mr_grid = Geometry(
        shape=(size[2], size[1], size[0]), spacing=MR_SPACING, origin=tuple(origin), direction=tuple(direction.ravel())
    )
    to_synth = affine_transform(np.linalg.inv(scanner))  # MR point -> synthesis (CT frame) point

    # Acquired on the MR grid as it lies in the CT frame, then the header moved to the scanner frame: the same
    # voxels, in the MR's own coordinates.
    in_ct_frame = Geometry(
        shape=mr_grid.shape, spacing=MR_SPACING, origin=tuple(centre - half), direction=tuple(direction_synth.ravel())
    )
    rng = np.random.default_rng(seed)
    acquired = acquire_clinical(clean_mr, in_ct_frame, ClinicalAcquisition(), rng, MR_SPACING[2])
    mr = mr_grid.apply_to(sitk.GetImageFromArray(np.round(sitk.GetArrayFromImage(acquired)).astype(np.int16)))

    # 4. The whole true map, MR point -> CT point: the scanner frame, then the synthetic motion.
    field = sitk.Cast(pair.displacement_image(), sitk.sitkVectorFloat64)
    true_map = sitk.CompositeTransform(3)
    true_map.AddTransform(sitk.DisplacementFieldTransform(field))  # applied second
    true_map.AddTransform(to_synth)  # applied first
    # The truth is known only where the MR grid lies inside the synthesis grid; labels are 0 elsewhere.
    known = resample_to_reference(synthesis_region(ct_synth), mr_grid, transform=to_synth, is_label=True)
    mr_labels = resample_to_reference(ct_labels, mr_grid, transform=true_map, is_label=True) * known
    displacement = sitk.TransformToDisplacementField(
        true_map,
        sitk.sitkVectorFloat64,
        mr_grid.reference_image().GetSize(),
        mr_grid.origin,
        mr_grid.spacing,
        mr_grid.direction,
    )
    rounded = np.round(sitk.GetArrayFromImage(displacement) / DISPLACEMENT_STEP_MM) * DISPLACEMENT_STEP_MM
    displacement = mr_grid.apply_to(sitk.GetImageFromArray(rounded.astype(np.float32), isVector=True))

    # 5. Per-vertebra maps (MR point -> CT point) and landmarks.
    inverse_scanner = np.linalg.inv(scanner)
    maps = {v: pair.vertebra_transforms[v] @ inverse_scanner for v in values}
    ct_centres = label_centroids(ct_labels)
    names = {v: vertebra_name(v, TOTALSEGMENTATOR) for v in values}
    ct_landmarks = {names[v]: ct_centres[v] for v in values}
    mr_landmarks = {names[v]: (np.linalg.inv(maps[v]) @ np.append(ct_centres[v], 1.0))[:3] for v in values}

    out.mkdir(parents=True, exist_ok=True)
    write_image(ct, out / SAMPLE_FILES["moving"])
    write_image(ct_labels, out / SAMPLE_FILES["moving_labels"])
    write_image(mr, out / SAMPLE_FILES["fixed"])
    write_image(mr_labels, out / SAMPLE_FILES["fixed_labels"])
    write_landmarks(ct_landmarks, out / SAMPLE_FILES["moving_landmarks"])
    write_landmarks(mr_landmarks, out / SAMPLE_FILES["fixed_landmarks"])
    if with_displacement:
        write_image(displacement, out / DISPLACEMENT_FILE)
    else:
        (out / DISPLACEMENT_FILE).unlink(missing_ok=True)
    truth = {
        "description": "Ground truth of the sample case: for each CT vertebra label, the 4x4 LPS map (mm) taking an "
        "MR point to the CT point it shows; the displacement file holds the whole map on the MR grid "
        "(CT point = MR point + displacement).",
        "direction": "MR (fixed) -> CT (moving)",
        "seed": seed,
        "scanner_frame": scanner.tolist(),
        "vertebrae": {str(v): {"name": names[v], "mr_to_ct": maps[v].tolist()} for v in values},
        "synthesis_grid": {
            "description": "grid (CT frame, LPS) on which the motion was synthesised; MR points whose G^-1 image "
            "lies outside it have no ground truth (MR intensity and labels 0)",
            "size": list(ct_synth.GetSize()),
            "spacing": list(ct_synth.GetSpacing()),
            "origin": list(ct_synth.GetOrigin()),
            "direction": list(ct_synth.GetDirection()),
        },
        "displacement_file": DISPLACEMENT_FILE if with_displacement else None,
        "displacement_rounding_mm": DISPLACEMENT_STEP_MM,
    }
    (out / TRUTH_FILE).write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(source / SOURCE_FILES["licence"], out / LICENCE_NAME)
    return {
        "values": values,
        "names": names,
        "dropped": {vertebra_name(v, TOTALSEGMENTATOR): n for v, n in dropped.items()},
        "ct_box": box,
        "k_range": k_range,
        "synth_shape": ct_synth.GetSize(),
        "mr_size": size,
        "seed": seed,
        "with_displacement": with_displacement,
        "source_sha": {name: sha256(source / name) for name in SOURCE_FILES.values()},
        "settings": settings,
    }


def provenance(facts: dict, out: Path) -> str:
    box = facts["ct_box"]
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "PROVENANCE.md")
    rows = "\n".join(
        f"| `{name}` | {(out / name).stat().st_size / 1024:.0f} KiB | `{sha256(out / name)[:16]}` |" for name in files
    )
    sources = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in facts["source_sha"].items())
    vertebrae = ", ".join(f"{facts['names'][v]} ({v})" for v in facts["values"])
    dropped = ", ".join(f"{k} ({n} voxels at 3 mm)" for k, n in facts["dropped"].items()) or "none"
    s = facts["settings"]
    what = (
        f"the whole true map on the MR grid as an ITK displacement field (LPS mm, CT point = MR point + "
        f"displacement; load it in Slicer as a transform), rounded to {DISPLACEMENT_STEP_MM} mm; zero where the "
        "MR grid leaves the synthesis grid"
    )
    if facts["with_displacement"]:
        displacement = f"**`{DISPLACEMENT_FILE}`**: {what}."
    else:
        displacement = (
            f"Not bundled (about 2.6 MB): `{DISPLACEMENT_FILE}`, {what}; the script writes it with "
            "`--with-displacement`."
        )
    return f"""# Sample case: provenance

A real CT with its vertebra labels, and a **synthetic** MR of the same anatomy with a known per-vertebra motion, for
the README demo (`srr-register --sample --out DIR`), Slicer's Sample Data and the tests. The MR is not a real scan
(no public paired spine CT/MR was available) but is made to look like a clinical one: a sagittal T2-weighted 2D
series with 0.7 mm pixels and 3.5 mm slices, texture within tissues, a bias field and Rician noise, oblique, in a
scanner frame of its own.

**What is real:** the CT (HU values unchanged, native 3 mm voxels), its vertebra labels and the spinal cord that
places the CSF. **What is synthesised:** the posture change (a known rigid motion per vertebra), the MR's contrast
(intensities drawn per tissue class, with texture), its acquisition (slice profile, bias, noise), the MR labels and
landmarks (the CT's, moved by the known motion). Why not the real MR of `../shared/data`: it is a different person
from the CT (no paired truth), and its 20 axial 3 mm slices show two vertebrae; the benchmark's real-MR tier pairs
it with a CT synthesised from its labels instead (docs/BENCHMARKS_TIERS.md).

Built by `scripts/make_sample_data.py` (seed {facts["seed"]}); regenerate with

```bash
.venv/bin/python scripts/make_sample_data.py --seed {facts["seed"]}   # from the repository root
```

## Source

The TotalSegmentator test files (`tests/reference_files/` of https://github.com/wasserth/TotalSegmentator),
copyright their authors, licensed under the Apache License 2.0 (copy: `{LICENCE_NAME}`). Real patient data,
downsampled to 3 mm by its authors.

| file | sha256 |
|---|---|
{sources}

## Processing

1. `example_seg.nii.gz` (TotalSegmentator v2 "total", 30 slices) carries the CT's origin in its header, but its
   anatomy is that of the CT's last 30 slices (placed by the header, its vertebrae lie on soft tissue): it was moved
   along the slice axis to the offset where the CT is brightest inside the vertebrae
   (`SpineRigidRegLib.data.subjects.bone_aligned_slices`), placed on the CT's grid (nearest neighbour), and all
   classes but the vertebrae were set to 0. Vertebrae cut by the label map's edge to
   less than {MIN_VERTEBRA_FRACTION:.0%} of the largest one were removed: {dropped}.
   Kept: {vertebrae} (TotalSegmentator numbering).
2. **`{SAMPLE_FILES["moving"]}`, `{SAMPLE_FILES["moving_labels"]}`**: the CT (converted to int16 HU, values
   unchanged) and the vertebra labels (uint8), cropped without resampling to the vertebrae's bounding box grown by
   {CT_MARGIN_MM:.0f} mm in-plane and to the CT slices the label map covers: ITK index ranges
   i {box[0].start}..{box[0].stop - 1}, j {box[1].start}..{box[1].stop - 1}, k {box[2].start}..{box[2].stop - 1}
   of `example_ct.nii.gz` (3 mm voxels, geometry kept).
3. Synthesis grid: the CT and labels cropped with a {SYNTH_MARGIN_MM:.0f} mm margin (and
   {SYNTH_EXTRA_SUPERIOR_MM:.0f} mm of unlabelled CT above the labels), resampled to 1 mm (linear / nearest),
   size {tuple(facts["synth_shape"])}. `SpineRigidRegLib.data.synthesis.synthesize_pair(ct, labels,
   SynthesisSettings(slice_thickness_mm={s.slice_thickness_mm}, slice_axis={s.slice_axis}, seed={facts["seed"]}),
   seed={facts["seed"]}, tissues=...)` drew a rigid motion per vertebra (flexion/extension up to {s.max_flexion_deg}
   deg, lateral bending {s.max_lateral_bending_deg} deg, axial rotation {s.max_axial_rotation_deg} deg per joint,
   chained along the spine, plus a residual global motion of up to {s.max_global_rotation_deg} deg and
   {s.max_translation_mm} mm) and a poly-rigid diffeomorphic field (rigid inside each vertebra, smooth soft tissue).
   The tissue classes (`SpineRigidRegLib.data.subjects.spine_tissue_map`: air, fat, muscle and bone from HU bands
   and the labels; discs between the vertebrae; the spinal cord of `example_seg.nii.gz` and the CSF around it) got a
   {MR_CONTRAST.upper()}-weighted contrast with texture within each tissue
   (`SpineRigidRegLib.data.clinical.textured_contrast`, seed {facts["seed"]} + 1), moved by that field.
4. **`{SAMPLE_FILES["fixed"]}`**: that contrast acquired as a clinical 2D series
   (`SpineRigidRegLib.data.clinical.acquire_clinical`: box slice profile, bias field, Rician noise; scaled so that
   its 99th percentile is 1000, stored as int16) on an oblique sagittal grid of {MR_SPACING[0]} x
   {MR_SPACING[1]} x {MR_SPACING[2]} mm voxels (i anterior-posterior, j superior-inferior, k left-right = slice
   direction), size {tuple(facts["mr_size"])}, tilted by the rotation vector {MR_OBLIQUE_DEG} deg against the
   anatomy and placed in an MR scanner frame G (rotation vector {SCANNER_ROTATION_DEG} deg, translation
   {SCANNER_TRANSLATION_MM} mm; MR point = G(CT-frame point)). Parts of the grid outside the synthesis grid are
   0 (plus noise).
5. **`{SAMPLE_FILES["fixed_labels"]}`** (evaluation only): the CT labels of step 2 resampled (nearest neighbour)
   through the true map MR point -> CT point (G^-1, then the synthetic field); 0 where the MR grid leaves the
   synthesis grid (no ground truth there; that grid is recorded in `{TRUTH_FILE}`).
6. **`{SAMPLE_FILES["moving_landmarks"]}`**: centroid of each CT vertebra label (LPS mm, Slicer markups JSON).
   **`{SAMPLE_FILES["fixed_landmarks"]}`**: the same points mapped to the MR by the inverse of that vertebra's
   true rigid map.
7. **`{TRUTH_FILE}`**: each vertebra's true rigid map MR point -> CT point (4x4, LPS mm) and G.
   {displacement}

## Files

| file | size | sha256 (first 16) |
|---|---|---|
{rows}

## Licence

The CT and label data are a derivative of the TotalSegmentator test files and are distributed under the Apache
License 2.0 (`{LICENCE_NAME}`); changes: cropping, label selection, type conversion, and the synthetic MR, labels,
landmarks and ground truth described above.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the totalsegmentator-examples folder")
    parser.add_argument("--out", type=Path, default=resources_dir() / "SampleData", help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="synthesis seed")
    parser.add_argument(
        "--with-displacement",
        action="store_true",
        help=f"also write the dense true field ({DISPLACEMENT_FILE}, about 2.6 MB)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    facts = build(args.source, args.out, args.seed, args.with_displacement)
    (args.out / "PROVENANCE.md").write_text(provenance(facts, args.out), encoding="utf-8")
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    log.info("wrote %s (%.2f MB)", args.out, total / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``srr-evaluate``: measure one registration (an ``srr-register`` output folder or a transform) against the truth."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import InputError
from .common import add_common_arguments, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srr-evaluate",
        description=(
            "Evaluate a CT-to-MR registration: per vertebra the DSC against the MR labels, rigid DSC, volume change, "
            "PC/OC metrics, folding voxels and (with a true field) the TRE in mm; for the whole field the folding "
            "voxels and SD log|J|. Input: an srr-register output folder, or any fixed -> moving transform "
            "(.h5/.tfm or a displacement-field image in LPS mm)."
        ),
        epilog="Example: srr-evaluate --result out/ --moving-labels ct_seg.nii.gz --fixed-labels mr_seg.nii.gz",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--result", type=Path, help="an srr-register output folder (transform.h5, prealign.tfm)")
    source.add_argument("--transform", type=Path, help="a transform file or displacement-field image (fixed -> moving)")
    parser.add_argument("--moving-labels", type=Path, required=True, help="CT vertebra label map")
    parser.add_argument("--fixed-labels", type=Path, help="MR vertebra label map (for DSC)")
    parser.add_argument(
        "--true-displacement", type=Path, help="true fixed -> moving transform or displacement image (for TRE)"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        help="evaluation grid (default: the MR labels' grid, else the result's processing grid, "
        "else the displacement image's grid)",
    )
    parser.add_argument("--csv", type=Path, help="write the per-vertebra table here")
    parser.add_argument("--json", type=Path, help="write the per-vertebra rows and the summary here")
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from .. import io, metrics
    from ..benchmark.runner import evaluate_transform
    from ..geometry import Geometry
    from .register import format_table
    from .warp import read_transform

    rigid = None
    grid_source: Path | None = None
    if args.result is not None:
        if not args.result.is_dir():
            raise InputError(f"result folder not found: {args.result}")
        transform_path = args.result / "transform.h5"
        if not transform_path.is_file():
            raise InputError(f"{args.result} is not an srr-register output folder (no transform.h5)")
        transform = read_transform(transform_path)
        if (args.result / "prealign.tfm").is_file():
            rigid = read_transform(args.result / "prealign.tfm")
        if (args.result / "displacement.nii.gz").is_file():
            grid_source = args.result / "displacement.nii.gz"
    else:
        transform = read_transform(args.transform)
        if not "".join(args.transform.suffixes).lower().endswith((".h5", ".hdf5", ".tfm", ".txt", ".mat")):
            grid_source = args.transform
    moving_labels = io.read_image(args.moving_labels)
    fixed_labels = io.read_image(args.fixed_labels) if args.fixed_labels else None
    truth = read_transform(args.true_displacement) if args.true_displacement else None
    if args.reference is not None:
        grid = Geometry.of(io.read_image(args.reference))
    elif fixed_labels is not None:
        grid = Geometry.of(fixed_labels)
    elif grid_source is not None:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(grid_source))
        reader.ReadImageInformation()
        size = reader.GetSize()
        grid = Geometry((size[2], size[1], size[0]), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    else:
        raise InputError("no evaluation grid: give --reference (the MR) or --fixed-labels")
    rows, field = evaluate_transform(transform, moving_labels, grid, fixed_labels, truth, rigid)
    summary = {**metrics.summarize(rows), **field}
    print(format_table(rows))
    parts = [f"vertebrae: {summary['vertebrae']}"]
    for key, title, fmt in (
        ("dice_mean", "DSC", "{:.3f}"),
        ("rigid_dice_mean", "rigid DSC", "{:.3f}"),
        ("abs_volume_change_percent_mean", "|%Δvol|", "{:.2f}"),
        ("pc_mean", "PC", "{:.4f}"),
        ("tre_mm_mean", "TRE mm", "{:.2f}"),
    ):
        value = summary.get(key)
        if value is not None and math.isfinite(value):
            parts.append(f"{title} {fmt.format(value)}")
    parts.append(f"|J|<=0 voxels: {field['folding_voxels']}; SD log|J|: {field['sd_log_jacobian']:.3f}")
    print("\nmean: " + ", ".join(parts))
    print(f"evaluation grid: {' x '.join(str(s) for s in grid.shape)} voxels of {grid.spacing[0]:.2f} mm")
    if args.csv:
        from ..io import write_rows_csv

        write_rows_csv(rows, args.csv)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump({"vertebrae": rows, "summary": summary}, stream, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``srr-warp``: apply a saved SpineRigidReg transform to another image, label map or point list."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import SimpleITK as sitk

from ..errors import InputError
from .common import add_common_arguments, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srr-warp",
        description=(
            "Apply a transform written by srr-register (transform.h5, inverse_transform.h5, or a displacement field "
            ".nii.gz in LPS mm). Images: transform.h5 resamples a CT-space image onto the MR's grid, "
            "inverse_transform.h5 an MR-space image onto the CT's grid. Points (--points): inverse_transform.h5 "
            "carries CT points (a screw plan) into the MR, transform.h5 MR points into the CT."
        ),
    )
    parser.add_argument("--transform", type=Path, required=True, help="transform.h5 / .tfm or a displacement image")
    parser.add_argument("--input", type=Path, help="image to resample (in the space the transform maps into)")
    parser.add_argument("--reference", type=Path, help="image whose grid the output takes")
    parser.add_argument(
        "--points", type=Path, help="instead of an image: a point list (.mrk.json, .fcsv, .csv) to map point by point"
    )
    parser.add_argument("--out", type=Path, required=True, help="output image or point-list file")
    parser.add_argument("--labels", action="store_true", help="the input is a label map: keep labels crisp")
    parser.add_argument("--default", type=float, default=None, help="value outside the input (default: its minimum)")
    add_common_arguments(parser)
    return parser


def read_transform(path: Path) -> sitk.Transform:
    """A transform file (.h5/.tfm/.txt) or a displacement-field image as a SimpleITK transform (fixed -> moving)."""
    if not path.exists():
        raise InputError(f"transform file not found: {path}")
    suffixes = "".join(path.suffixes).lower()
    try:
        if suffixes.endswith((".h5", ".hdf5", ".tfm", ".txt", ".mat")):
            return sitk.ReadTransform(str(path))
        field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    except RuntimeError as error:
        raise InputError(f"cannot read transform {path.name}: not a transform or displacement-field file") from error
    if field.GetNumberOfComponentsPerPixel() != 3:
        raise InputError(f"{path.name} is not a 3-component displacement field")
    return sitk.DisplacementFieldTransform(field)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    from .. import io

    if args.points is not None:
        if args.input is not None or args.reference is not None:
            raise InputError("--points maps a point list: leave out --input and --reference")
        transform = read_transform(args.transform)
        points = io.read_landmarks(args.points)
        mapped = {name: transform.TransformPoint(tuple(float(c) for c in p)) for name, p in points.items()}
        io.write_landmarks(mapped, args.out)
        print(f"wrote {len(mapped)} points to {args.out}")
        return 0
    if args.input is None or args.reference is None:
        raise InputError("an image needs --input and --reference (or give --points)")
    transform = read_transform(args.transform)
    image = io.read_image(args.input)
    reference = io.read_image(args.reference)
    if args.labels:
        interpolator = getattr(sitk, "sitkLabelLinear", sitk.sitkNearestNeighbor)
        default = 0.0 if args.default is None else args.default
        out = sitk.Resample(image, reference, transform, interpolator, default, image.GetPixelID())
    else:
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(image)
        default = stats.GetMinimum() if args.default is None else args.default
        out = sitk.Resample(image, reference, transform, sitk.sitkLinear, default, sitk.sitkFloat32)
    io.write_image(out, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

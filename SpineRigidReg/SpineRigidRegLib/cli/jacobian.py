"""``srr-jacobian``: the Jacobian-determinant map of a displacement field and its folding statistics."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import SimpleITK as sitk

from ..errors import InputError
from .common import add_common_arguments, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srr-jacobian",
        description=(
            "Compute det J of a displacement field (LPS mm vector image, e.g. displacement.nii.gz from srr-register)."
            " det J = 1 keeps volume, < 1 shrinks, > 1 expands, <= 0 folds (physically impossible)."
        ),
    )
    parser.add_argument("--field", type=Path, required=True, help="displacement field image (3 components, mm)")
    parser.add_argument("--out", type=Path, help="write the determinant map here (.nii.gz/.nrrd/.mha)")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    from .. import metrics
    from ..geometry import displacement_from_field_image, tensor_to_image
    from ..jacobian import jacobian_determinant

    if not args.field.exists():
        raise InputError(f"field file not found: {args.field}")
    try:
        image = sitk.ReadImage(str(args.field))
    except RuntimeError as error:
        raise InputError(f"cannot read {args.field.name}: not an image file") from error
    displacement, geometry = displacement_from_field_image(image)
    spacing = geometry.spacing_array_order
    det = jacobian_determinant(displacement, spacing)
    stats = metrics.field_summary(displacement, spacing)
    stats.update({"det_min": float(det.min()), "det_max": float(det.max())})
    if args.out:
        from .. import io

        io.write_image(tensor_to_image(det, geometry), args.out)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for key, value in stats.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

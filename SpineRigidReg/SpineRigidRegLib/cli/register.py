"""``srr-register``: register a spine CT onto an MR, keeping every vertebra rigid."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ..checkpoint import resources_dir
from ..choices import DEFAULT_PRESET
from ..errors import InputError
from ..inference import PRECISIONS
from .common import add_common_arguments, check_output_folder, progress_bar, run_command

SAMPLE_FILES = {
    "fixed": "mr.nii.gz",
    "moving": "ct.nii.gz",
    "moving_labels": "ct_vertebrae.nii.gz",
    "fixed_labels": "mr_vertebrae.nii.gz",
    "fixed_landmarks": "mr_landmarks.mrk.json",
    "moving_landmarks": "ct_landmarks.mrk.json",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srr-register",
        description=(
            "Register a spine CT (moving) onto an MR (fixed) so that soft tissue deforms while every vertebra "
            "stays rigid. Needs the CT's vertebra label map (one label per vertebra, e.g. from TotalSegmentator). "
            "Writes the warped CT and labels in the MR's geometry, the transform (loadable in 3D Slicer and ITK), "
            "a Jacobian map, per-vertebra rigidity metrics and a QA picture."
        ),
        epilog="Example: srr-register --fixed mr.nii.gz --moving ct.nii.gz --moving-labels ct_seg.nii.gz --out result/",
    )
    _add_input_arguments(parser.add_argument_group("inputs (NIfTI, NRRD, MHA or a DICOM folder)"))
    options = parser.add_argument_group("options (a preset, then a --config file, then the flags below)")
    _add_settings_arguments(options)
    _add_stage_arguments(options)
    _add_vertebra_arguments(options)
    add_common_arguments(parser)
    return parser


def _add_input_arguments(inputs: argparse._ArgumentGroup) -> None:
    """The images, label maps and points (or ``--sample``)."""
    inputs.add_argument("--fixed", type=Path, help="the MR image (fixed)")
    inputs.add_argument("--moving", type=Path, help="the CT image (moving)")
    inputs.add_argument("--moving-labels", type=Path, help="CT vertebra label map, one integer per vertebra")
    inputs.add_argument("--fixed-labels", type=Path, help="optional MR vertebra labels, to report Dice")
    inputs.add_argument("--fixed-landmarks", type=Path, help="optional MR vertebra centres (.mrk.json/.fcsv/.csv)")
    inputs.add_argument(
        "--moving-landmarks",
        type=Path,
        help="optional CT vertebra centres; without them the CT label centroids are used",
    )
    inputs.add_argument(
        "--point-pairs",
        nargs=2,
        type=Path,
        metavar=("CT_POINTS", "MR_POINTS"),
        help="corresponding points the result must honour (same labels in both files, .mrk.json/.fcsv/.csv): each "
        "vertebra moves rigidly onto the pairs on it; with --refine-steps the dense refinement also honours pairs "
        "between vertebrae",
    )
    inputs.add_argument("--sample", action="store_true", help="use the bundled sample case (Resources/SampleData)")


def _add_settings_arguments(options: argparse._ArgumentGroup) -> None:
    """The output folder and where the settings come from (preset, config file)."""
    options.add_argument("--out", type=Path, help="output folder (created)")
    options.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"settings preset, a file of SpineRigidRegLib/presets (default {DEFAULT_PRESET}; --list-presets)",
    )
    options.add_argument(
        "--config",
        type=Path,
        help="settings file (JSON or YAML, the presets' form: {'rigidity_scale': x, 'settings': {...}}) applied "
        "after the preset",
    )
    options.add_argument("--list-presets", action="store_true", help="list the presets and exit")


def _add_stage_arguments(options: argparse._ArgumentGroup) -> None:
    """The stages after the network, the device and the model."""
    options.add_argument(
        "--vertebra-steps",
        type=int,
        default=None,
        help="steps of the vertebra-wise rigid alignment after the network (default: the preset's, 30; 0 = network "
        "only)",
    )
    options.add_argument(
        "--refine-steps",
        type=int,
        default=None,
        help="dense test-time refinement steps after that (default: the preset's, 0)",
    )
    options.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda")
    options.add_argument(
        "--model",
        type=Path,
        help="a checkpoint to use instead of the bundled model; checked against the sha256 of its card "
        "(NAME.json beside NAME.pt) when there is one",
    )
    options.add_argument("--model-sha256", help="the sha256 the --model file must have (overrides its card)")
    options.add_argument(
        "--network-precision",
        choices=PRECISIONS,
        default=None,
        help="the networks' arithmetic: auto (bfloat16 on a CPU with bfloat16 arithmetic units, about twice as fast "
        "there; float32 elsewhere) or float32 always (default: auto)",
    )


def _add_vertebra_arguments(options: argparse._ArgumentGroup) -> None:
    """The MR's vertebrae (prediction, bone-guided pre-alignment) and the vertebrae's rigidity."""
    options.add_argument(
        "--no-mr-segmentation",
        action="store_true",
        help="do not predict the MR's vertebrae (no mr_vertebrae_predicted.nii.gz, no 'on MR bone' column)",
    )
    options.add_argument(
        "--no-bias-correction",
        action="store_true",
        help="register the MR's intensities as they are, without dividing out its bias field (coil shading)",
    )
    options.add_argument(
        "--no-qa-picture",
        action="store_true",
        help="do not draw qa.png (batch runs; every other output is written)",
    )
    options.add_argument(
        "--prealign-from-bone",
        action="store_true",
        help="without MR points, pre-align onto the MR's predicted vertebrae instead of the intensity search "
        "(experimental: docs/BENCHMARKS.md)",
    )
    options.add_argument(
        "--rigidity",
        default=None,
        help="refinement rigidity weights replacing the preset's, e.g. 'rigid_field=0.04,pc=0.4,oc=0.2,rigid_dice=0' "
        "(the defaults)",
    )
    options.add_argument(
        "--vertebra-weight",
        action="append",
        default=[],
        metavar="LABEL=W",
        help="scale the rigidity of one vertebra (label value or name); 0 excludes it; repeatable",
    )


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    from .. import io
    from ..choices import label_weights, make_settings, parse_assignments, update_settings
    from ..data.vertebrae import label_names
    from ..pipeline import register, write_outputs

    if args.list_presets:
        print(describe_presets())
        return 0
    if args.out is None:
        raise InputError("--out is required")
    check_output_folder(args.out)  # before any compute: an unwritable --out must not fail after the registration
    if args.model_sha256 and not args.model:
        raise InputError("--model-sha256 needs --model")
    if args.vertebra_steps is not None and args.vertebra_steps < 0:
        raise InputError("--vertebra-steps must be >= 0")
    settings = make_settings(  # before reading the images: a bad preset or config fails at once
        args.preset,
        args.config,
        device=args.device,
        model_path=args.model,
        model_sha256=args.model_sha256,
        refine_steps=args.refine_steps,
        vertebra_steps=args.vertebra_steps,
        rigidity=parse_assignments(args.rigidity),
        mr_segmentation=False if args.no_mr_segmentation else None,
        bone_prealign=True if args.prealign_from_bone else None,
        bias_correction=False if args.no_bias_correction else None,
        network_precision=args.network_precision,
    )
    paths = _input_paths(args)
    fixed = io.read_image(paths["fixed"])
    moving = io.read_image(paths["moving"])
    moving_labels = io.read_image(paths["moving_labels"])
    fixed_labels = io.read_image(paths["fixed_labels"]) if paths.get("fixed_labels") else None
    fixed_landmarks = io.read_landmarks(paths["fixed_landmarks"]) if paths.get("fixed_landmarks") else None
    moving_landmarks = io.read_landmarks(paths["moving_landmarks"]) if paths.get("moving_landmarks") else None
    point_pairs = _point_pairs(*args.point_pairs) if args.point_pairs else None
    if args.vertebra_weight:
        try:
            by_label = label_weights(parse_assignments(args.vertebra_weight), label_names(moving_labels))
        except InputError as error:
            raise InputError(f"--vertebra-weight: {error}") from None
        settings = update_settings(settings, vertebra_weights=by_label)

    with progress_bar(not args.quiet) as progress:
        result = register(
            fixed,
            moving,
            moving_labels,
            fixed_labels=fixed_labels,
            fixed_landmarks=fixed_landmarks,
            moving_landmarks=moving_landmarks,
            settings=settings,
            point_pairs=point_pairs,
            progress=progress,
        )
        outputs = write_outputs(result, args.out, qa_picture=not args.no_qa_picture)
    print(format_table(result.vertebrae))
    s = result.summary
    print(
        f"\npre-alignment: {result.prealign_method}; device: {s['device']} (networks in "
        f"{s.get('network_arithmetic', 'float32')}); folding voxels (det J <= 0): "
        f"{s.get('folding_voxels')} ({s.get('folding_voxels_in_vertebrae')} inside vertebrae, the |J|<=0 column);"
        f" SD log|J|: {s.get('sd_log_jacobian', float('nan')):.3f}"
    )
    if "mr_vertebrae" in outputs:
        print(
            f"MR vertebrae found by the segmentation network: {outputs['mr_vertebrae']} (as much bone as "
            f"{100 * s.get('mr_bone_found_ratio', 0.0):.0f} % of the registered CT vertebrae in the MR's view; "
            "the 'on MR bone' column: each vertebra's share on it)"
        )
    print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    picture = f"QA picture: {outputs['qa']}; " if "qa" in outputs else ""
    print(
        f"outputs in {args.out}/ ({picture}transform for Slicer/ITK: {outputs['transform']}; "
        f"its inverse, CT -> MR points: {outputs['inverse_transform']})"
    )
    return 0


def _point_pairs(ct_path: Path, mr_path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(CT point, MR point)`` pairs (LPS mm) from two point files, paired by label."""
    from .. import io

    ct, mr = io.read_landmarks(ct_path), io.read_landmarks(mr_path)
    unmatched = sorted(set(ct) ^ set(mr))
    if unmatched:
        raise InputError(
            f"point pairs are matched by label, and these labels are in only one of {ct_path.name} and "
            f"{mr_path.name}: {', '.join(unmatched)}"
        )
    return [(ct[name], mr[name]) for name in ct]


def _input_paths(args: argparse.Namespace) -> dict[str, Path | None]:
    if args.sample:
        folder = resources_dir() / "SampleData"
        if not folder.is_dir():
            raise InputError(f"the bundled sample case is missing ({folder})")
        return {key: folder / name for key, name in SAMPLE_FILES.items()}
    missing = [
        flag
        for flag, value in (("--fixed", args.fixed), ("--moving", args.moving), ("--moving-labels", args.moving_labels))
        if value is None
    ]
    if missing:
        raise InputError(f"missing {', '.join(missing)} (or use --sample)")
    return {
        "fixed": args.fixed,
        "moving": args.moving,
        "moving_labels": args.moving_labels,
        "fixed_labels": args.fixed_labels,
        "fixed_landmarks": args.fixed_landmarks,
        "moving_landmarks": args.moving_landmarks,
    }


def describe_presets() -> str:
    """One line per shipped preset: its name and description."""
    from ..choices import preset_names, read_preset

    return "\n".join(f"{name}: {read_preset(name).get('description', '')}" for name in preset_names())


def format_table(rows: list[dict]) -> str:
    """Per-vertebra metrics as an aligned text table (columns without data are left out)."""
    from ..metrics import present_columns

    columns = [c for c in present_columns(rows) if c.short is not None]
    cells = [[c.short for c in columns]]
    for row in rows:
        cells.append([c.fmt.format(row[c.key]) if row.get(c.key) is not None else "-" for c in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


if __name__ == "__main__":
    sys.exit(main())

"""``srr-train-segmentation``: train the MR vertebra segmentation network on synthetic images, or export it.

Training is resumable (``--out`` keeps ``last.pt`` with the optimiser state) and bounded (``--max-minutes``), so it
runs in pieces: a background CPU job (``--threads 1``) or a short GPU lease (``scripts/gpu_training.sh seg``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import select_device, sha256_of
from ..errors import InputError
from .common import add_common_arguments, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srr-train-segmentation",
        description="Train the MR vertebra segmentation network (SynthSeg-style synthetic MR from CT and phantom "
        "label maps); the curve.csv in --out tracks Dice on synthetic validation images and on the real MR example.",
        epilog="Example: srr-train-segmentation --out runs/mr_seg --real-data-dir ../shared/data --max-minutes 60 "
        "--threads 1; then srr-train-segmentation --export runs/mr_seg --to Resources/Models",
    )
    parser.add_argument("--out", type=Path, help="run folder (resumes from OUT/last.pt when present)")
    parser.add_argument("--real-data-dir", type=Path, help="folder holding totalsegmentator-examples/")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--steps", type=int, help="last step (default 20000)")
    parser.add_argument("--batch", type=int, help="images per step (default 4)")
    parser.add_argument("--learning-rate", type=float, help="peak AdamW learning rate (default 2e-3)")
    parser.add_argument("--max-minutes", type=float, help="stop cleanly after this many minutes")
    parser.add_argument(
        "--decay-minutes", type=float, help="decay the learning rate over this many minutes instead of --steps"
    )
    parser.add_argument("--eval-every", type=int, help="steps between evaluations and checkpoints (default 250)")
    parser.add_argument("--phantoms", type=int, help="phantom label maps besides the real CT's (default 12)")
    parser.add_argument("--patch", type=int, nargs=3, metavar=("S", "P", "L"), help="patch size (default 64 96 96)")
    parser.add_argument("--rotation-deg", type=float, help="largest random rotation per axis (default 15)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument(
        "--init-from", type=Path, help="start a new run from these weights (e.g. Resources/Models/mr_vertebrae.pt)"
    )
    export = parser.add_argument_group("shipping a trained model (instead of training)")
    export.add_argument("--export", type=Path, metavar="RUN", help="run folder whose last.pt becomes the model")
    export.add_argument("--to", type=Path, help="folder for mr_vertebrae.pt and mr_vertebrae.json")
    export.add_argument("--device-label", default="", help="training hardware, for the card (e.g. '1x H200')")
    add_common_arguments(parser)
    return parser


def settings_from(args: argparse.Namespace):
    from ..segmentation.synth import SynthSettings
    from ..segmentation.train import SegTrainSettings

    settings = SegTrainSettings()
    overrides = {
        "steps": args.steps,
        "batch": args.batch,
        "learning_rate": args.learning_rate,
        "max_minutes": args.max_minutes,
        "decay_minutes": args.decay_minutes,
        "eval_every": args.eval_every,
        "phantoms": args.phantoms,
        "seed": args.seed,
    }
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    synth = SynthSettings()
    if args.patch:
        synth = replace(synth, patch=tuple(args.patch))
    if args.rotation_deg is not None:
        synth = replace(synth, rotation_deg=args.rotation_deg)
    return replace(settings, synth=synth)


def export_model(run: Path, to: Path, device_label: str = "") -> Path:
    """Write ``to/mr_vertebrae.pt`` (weights only) and its card ``mr_vertebrae.json`` (sha256, training, curve)."""
    from ..checkpoint import read_checkpoint
    from ..segmentation.net import SEGMENTATION_FORMAT
    from ..segmentation.predict import load_segmentation_network, save_segmentation_checkpoint

    last = run / "last.pt"
    payload = read_checkpoint(last, expected_format=SEGMENTATION_FORMAT)
    network = load_segmentation_network(last)
    weights = save_segmentation_checkpoint(to / "mr_vertebrae.pt", network)
    curve = _read_curve(run / "curve.csv")
    card = {
        "name": "MR vertebra segmentation",
        "weights": weights.name,
        "sha256": sha256_of(weights),
        "architecture": {"kind": "3D UNet, instance norm", **network.config.to_dict()},
        "input": "any MR, resampled to a 2 mm patient-aligned (LPS) grid, normalised to [0, 1]",
        "output": "probability of vertebral bone (threshold 0.5)",
        "training": {
            "steps": int(payload["step"]),
            "hours": round(float(payload.get("elapsed_s", 0.0)) / 3600.0, 3),
            "hardware": device_label or "unknown",
            "data": "synthetic MR-like images only (SynthSeg-style) from the TotalSegmentator CT example's label map "
            "and procedural phantoms; no MR image was trained on",
            "settings": payload.get("settings", {}),
        },
        "evaluation": {
            "real_mr_dice": curve[-1].get("real_mr_dice") if curve else None,
            "synthetic_dice": curve[-1].get("synthetic_dice") if curve else None,
            "real_mr": "TotalSegmentator MR example (example_mr_sm.nii.gz), label 19 'vertebrae'; never trained on",
        },
    }
    with open(to / "mr_vertebrae.json", "w", encoding="utf-8") as stream:
        json.dump(card, stream, indent=2)
        stream.write("\n")
    return weights


def _read_curve(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def run(args: argparse.Namespace) -> int:
    if args.export:
        if args.to is None:
            raise InputError("--export needs --to (the folder for the model and its card)")
        weights = export_model(args.export, args.to, args.device_label)
        print(f"wrote {weights} and {weights.with_suffix('.json')}")
        return 0
    if args.out is None:
        raise InputError("--out is required (the run folder)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..segmentation.train import train_segmentation

    figures = train_segmentation(
        args.out, settings_from(args), select_device(args.device), args.real_data_dir, init_from=args.init_from
    )
    print(json.dumps(figures))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())

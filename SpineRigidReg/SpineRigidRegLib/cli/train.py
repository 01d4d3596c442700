"""``srr-train``: train (or fine-tune) the registration network from a YAML config.

Multi-GPU / multi-node: launch through torchrun, e.g. ``torchrun --nproc_per_node 4 -m SpineRigidRegLib.cli.train
--config X.yaml``; each process trains on its own pairs and DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import InputError
from .common import add_common_arguments, run_command

#: Folder of the shipped configs (``configs/<name>.yaml``; ``--config baseline`` finds ``baseline.yaml`` there).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def resolve_config(name: str | Path) -> Path:
    """A config path, or the name of a shipped config (``baseline``, ``pc_rigid_field``, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise InputError(f"training config {name} not found (shipped configs: {available})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srr-train",
        description=(
            "Train the rigidity-preserving registration network on synthesised CT/MR pairs (eq. 1 of the paper). "
            "Writes checkpoints (last.pt, best.pt), CSV and TensorBoard logs into --out."
        ),
        epilog="Example: srr-train --config baseline --out runs/baseline; then srr-train --config pc_rigid_field "
        "--init-from runs/baseline/best.pt --out runs/pc_rigid_field",
    )
    parser.add_argument("--config", help="YAML config file, or the name of a shipped config")
    parser.add_argument("--out", type=Path, help="output folder (default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt after an interruption")
    parser.add_argument("--steps", type=int, help="override schedule.steps")
    parser.add_argument("--init-from", type=Path, help="override schedule.init_from (fine-tune from a checkpoint)")
    parser.add_argument(
        "--real-data-dir", type=Path, help="override data.real_data_dir (the folder holding totalsegmentator-examples/)"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="override schedule.max_minutes: stop cleanly (validation, last.pt) after this much wall time",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--no-tensorboard", action="store_true", help="CSV logs only")
    export = parser.add_argument_group("shipping a trained model (instead of training)")
    export.add_argument(
        "--export",
        nargs="+",
        type=Path,
        metavar="RUN",
        help="run folders of a finished training, in order; writes --out/NAME.pt and NAME.json "
        "(weights of the last run's best.pt + model card)",
    )
    export.add_argument("--name", default="default", help="file name of the exported model (default: default)")
    export.add_argument("--device-label", default="CPU", help="training hardware for the model card")
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    from ..training.config import TrainConfig
    from ..training.trainer import export_model, train

    if args.export:
        if args.out is None:
            raise InputError("--export needs --out (e.g. Resources/Models)")
        card = export_model(args.export, args.out, name=args.name, device_label=args.device_label)
        print(json.dumps({k: card[k] for k in ("weights", "sha256", "steps", "device", "validation")}, indent=2))
        return 0
    if args.config is None:
        raise InputError("--config is required (a YAML file or a shipped config name)")
    config = TrainConfig.from_yaml(resolve_config(args.config))
    schedule: dict = {}
    if args.steps is not None:
        schedule["steps"] = args.steps
    if args.init_from is not None:
        schedule["init_from"] = str(args.init_from)
    if args.max_minutes is not None:
        schedule["max_minutes"] = args.max_minutes
    if schedule:
        config = config.override(schedule=schedule)
    if args.real_data_dir is not None:
        config = config.override(data={"real_data_dir": str(args.real_data_dir)})
    out = args.out or Path("runs") / config.name
    result = train(
        config,
        out,
        resume=args.resume,
        device=args.device,
        progress=not args.quiet,
        threads=args.threads,
        tensorboard=not args.no_tensorboard,
    )
    summary = {
        "out": str(result.out_dir),
        "steps": result.step,
        "best_step": result.best_step,
        "best_score": result.best_score,
        "validation": result.validation,
        "identity": result.identity,
        "wall_time_s": round(result.wall_time_s, 1),
        "device": result.device,
    }
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
        print(json.dumps(summary, indent=2), file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

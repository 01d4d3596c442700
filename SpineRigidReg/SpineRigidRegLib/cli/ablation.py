"""``srr-ablation``: the ablation of the paper's Table 1 (baseline, then each rigidity penalty fine-tuned from it).

Schedule (as the paper's 500 epochs with fine-tuning from the 400-epoch milestone): the baseline config is trained to
``milestone`` x its steps, that checkpoint is kept as ``baseline/milestone.pt``, and the baseline continues to its
full length; every other row starts from the milestone with its own loss weights (the ``loss`` section of the shipped
row config ``configs/<row>.yaml``; everything else comes from the baseline config) for the remaining steps.

Writes ``OUT/<row>/`` (the run folders of :func:`..training.trainer.train`) and ``OUT/manifest.json``
(:mod:`..training.manifest`, its one writer and reader), which ``srr-benchmark --manifest`` reads.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..training.manifest import MANIFEST_NAME, load_manifest, write_manifest
from .common import add_common_arguments, run_command
from .train import resolve_config

if TYPE_CHECKING:
    from ..training.config import TrainConfig

log = logging.getLogger(__name__)

#: Table 1 rows in the paper's order: config name -> label.
TABLE1 = {
    "baseline": "Baseline",
    "pc": "PC",
    "oc": "OC",
    "rigid_dice": "Rigid Dice",
    "rigid_field": "Rigid field",
    "pc_oc": "PC + OC",
    "pc_rigid_dice": "PC + rigid Dice",
    "pc_rigid_field": "PC + rigid field",
    "volume": "Volume loss",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srr-ablation",
        description=(
            "Train the baseline (no rigidity) and fine-tune every Table-1 rigidity row from its milestone; write "
            "OUT/manifest.json for srr-benchmark."
        ),
        epilog="Example: srr-ablation --out runs/ablation --rows pc rigid_field pc_rigid_field",
    )
    parser.add_argument("--base", default="baseline", help="baseline config (file or shipped name; default baseline)")
    parser.add_argument("--rows", nargs="+", default=None, help=f"rows to fine-tune (default all: {' '.join(TABLE1)})")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"), help="output folder")
    parser.add_argument("--baseline-steps", type=int, help="override the baseline's schedule.steps")
    parser.add_argument(
        "--finetune-steps", type=int, help="steps of each fine-tuning (default: the rest after the milestone)"
    )
    parser.add_argument("--milestone", type=float, default=0.8, help="fraction of the baseline to fine-tune from")
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs (finished ones are kept)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, help="CPU threads")
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


def run_ablation(
    base_config: str | Path,
    out: Path,
    rows: list[str] | None = None,
    baseline_steps: int | None = None,
    finetune_steps: int | None = None,
    milestone: float = 0.8,
    resume: bool = False,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Run the ablation (see the module docstring) and return the manifest (also written to ``out``)."""
    from ..training.config import TrainConfig

    rows = _checked_rows(rows, milestone)
    base_path = resolve_config(base_config)
    base = TrainConfig.from_yaml(base_path).override(name="baseline")
    if baseline_steps is not None:
        base = base.override(schedule={"steps": baseline_steps})
    total = base.schedule.steps
    milestone_step = max(1, int(round(milestone * total)))
    fine_steps = finetune_steps if finetune_steps is not None else max(total - milestone_step, 1)
    row_configs = {name: TrainConfig.from_yaml(resolve_config(name)) for name in rows if name != "baseline"}
    out.mkdir(parents=True, exist_ok=True)
    options = {"device": device, "progress": progress, "threads": threads}
    walls = {"baseline": _train_baseline(base, out, milestone_step, resume, options)}
    for name, row in row_configs.items():
        walls[name] = _fine_tune(base, name, row, out, fine_steps, resume, options)
    manifest_rows, identity = _manifest_rows(out, ["baseline", *row_configs], walls)
    manifest = {
        "base_config": str(base_path),
        "milestone_step": milestone_step,
        "baseline_steps": total,
        "finetune_steps": fine_steps,
        "identity": identity,
        "rows": manifest_rows,
    }
    write_manifest(out, manifest)
    return load_manifest(out / MANIFEST_NAME)


def _checked_rows(rows: list[str] | None, milestone: float) -> list[str]:
    """The rows to run (all of :data:`TABLE1` when none are named, duplicates dropped); checks the milestone too."""
    rows = list(TABLE1) if not rows else list(dict.fromkeys(rows))
    unknown = [r for r in rows if r not in TABLE1]
    if unknown:
        raise InputError(f"unknown ablation row(s) {unknown}; choose from {list(TABLE1)}")
    if not 0.0 < milestone <= 1.0:
        raise InputError(f"--milestone must be in (0, 1], got {milestone}")
    return rows


def _milestone_path(out: Path) -> Path:
    """The baseline checkpoint every other row is fine-tuned from."""
    return out / "baseline" / "milestone.pt"


def _train_baseline(base: TrainConfig, out: Path, milestone_step: int, resume: bool, options: dict) -> float:
    """Train the baseline to ``milestone_step`` (kept as :func:`_milestone_path`), then on to its full length.

    ``options`` are :func:`..training.trainer.train`'s ``device``, ``progress`` and ``threads``. Returns the wall
    time (s).
    """
    from ..training.trainer import LAST_CHECKPOINT, train

    baseline_dir = out / "baseline"
    milestone_path = _milestone_path(out)
    start = time.perf_counter()
    if not milestone_path.is_file():
        train(base.override(schedule={"steps": milestone_step}), baseline_dir, resume=resume, **options)
        shutil.copyfile(baseline_dir / LAST_CHECKPOINT, milestone_path)
    train(base, baseline_dir, resume=True, **options)
    return time.perf_counter() - start


def _fine_tune(
    base: TrainConfig, name: str, row: TrainConfig, out: Path, steps: int, resume: bool, options: dict
) -> float:
    """Train row ``name`` for ``steps`` from the milestone: the baseline config with the row's loss weights, seed and
    selection figure. Returns the wall time (s)."""
    from ..training.trainer import train

    start = time.perf_counter()
    config = base.override(
        name=name,
        loss=asdict(row.loss),
        schedule={
            "steps": steps,
            "init_from": str(_milestone_path(out)),
            "seed": row.schedule.seed,
            "select_by": row.schedule.select_by,
        },
    )
    train(config, out / name, resume=resume, **options)
    return time.perf_counter() - start


def _manifest_rows(out: Path, names: list[str], walls: dict[str, float]) -> tuple[list[dict], dict]:
    """One manifest row per trained row, read from its best checkpoint, and the identity (initial) figures of the
    first checkpoint that holds them."""
    from ..checkpoint import read_checkpoint
    from ..training.config import TrainConfig
    from ..training.trainer import BEST_CHECKPOINT

    rows = []
    identity: dict = {}
    for name in names:
        payload = read_checkpoint(out / name / BEST_CHECKPOINT)
        identity = identity or dict(payload.get("identity", {}))
        loss = TrainConfig.from_dict(payload["train_config"]).loss
        rows.append(
            {
                "name": name,
                "label": TABLE1[name],
                "loss": asdict(loss),
                "checkpoint": f"{name}/{BEST_CHECKPOINT}",
                "config": f"{name}/config.yaml",
                "best_step": int(payload.get("step", -1)),
                "validation": dict(payload.get("validation", {})),
                "wall_time_s": round(walls.get(name, 0.0), 1),
            }
        )
    return rows, identity


def _run(args: argparse.Namespace) -> int:
    manifest = run_ablation(
        args.base,
        args.out,
        rows=args.rows,
        baseline_steps=args.baseline_steps,
        finetune_steps=args.finetune_steps,
        milestone=args.milestone,
        resume=args.resume,
        device=args.device,
        threads=args.threads,
        progress=not args.quiet,
    )
    width = max(len(row["label"]) for row in manifest["rows"])
    print(f"{'row'.ljust(width)}  DSC    rigid DSC  |%Δvol|")
    for row in [{"label": "Initial", "validation": manifest["identity"]}, *manifest["rows"]]:
        v = row["validation"]
        print(
            f"{row['label'].ljust(width)}  {v.get('dice', float('nan')):.3f}  {v.get('rigid_dice', float('nan')):.3f}"
            f"      {v.get('abs_volume_change_percent', float('nan')):.2f}"
        )
    print(f"manifest: {args.out / MANIFEST_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Profile `srr-register` on the bundled sample case (issue 16): per-stage times and where the time goes.

Runs the pipeline in this process (imports excluded) with and without the MR points, ``--repeats`` times each after
one warm-up, on ``--threads`` torch/ITK threads, and profiles one more run of each with cProfile. Writes
``docs/SPEED_PROFILE.md`` (the per-stage medians, the wall-clock of the whole command, the top functions).
Run it on an idle machine, from the repository root::

    .venv/bin/python scripts/speed_profile.py --threads 2
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from SpineRigidRegLib.benchmark.report import machine_info
from SpineRigidRegLib.checkpoint import resources_dir
from SpineRigidRegLib.cli.register import SAMPLE_FILES
from SpineRigidRegLib.inference import network_arithmetic_name
from SpineRigidRegLib.io import read_image, read_landmarks
from SpineRigidRegLib.pipeline import RegistrationSettings, forget_kept_work, register, write_outputs

REPO = Path(__file__).resolve().parents[1]
STAGES = (
    "load",
    "mr_segmentation",
    "bias_field",
    "prealign",
    "preprocess",
    "network",
    "vertebra_rigid",
    "integration",
    "outputs",
)


def _inputs() -> dict:
    folder = resources_dir() / "SampleData"
    read = {key: folder / SAMPLE_FILES[key] for key in SAMPLE_FILES}
    return {
        "fixed": read_image(read["fixed"]),
        "moving": read_image(read["moving"]),
        "moving_labels": read_image(read["moving_labels"]),
        "fixed_landmarks": read_landmarks(read["fixed_landmarks"]),
        "moving_landmarks": read_landmarks(read["moving_landmarks"]),
    }


def _run(data: dict, points: bool, out: Path) -> dict[str, float]:
    landmarks = {"fixed_landmarks": data["fixed_landmarks"], "moving_landmarks": data["moving_landmarks"]}
    forget_kept_work()  # every run a first registration of the MR
    result = register(
        data["fixed"],
        data["moving"],
        data["moving_labels"],
        settings=RegistrationSettings(device="cpu"),
        **(landmarks if points else {}),
    )
    start = time.perf_counter()
    write_outputs(result, out)
    timings = dict(result.timings)
    timings["writing"] = time.perf_counter() - start
    return timings


def _profile(data: dict, points: bool, out: Path, top: int = 12) -> str:
    profiler = cProfile.Profile()
    profiler.runcall(_run, data, points, out)
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("ncalls"))
    return "\n".join(lines[start : start + top + 1]).replace(str(REPO) + "/", "")


def _wall_clock(threads: int, out: Path) -> float:
    """The whole command as a user runs it (interpreter start, imports, outputs)."""
    start = time.perf_counter()
    command = [str(Path(sys.executable).parent / "srr-register"), "--sample", "--out", str(out), "--quiet"]
    subprocess.run(command, check=True, env={"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"})
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/srr-speed-profile"))
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "SPEED_PROFILE.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = _inputs()
    rows, profiles, walls = {}, {}, {}
    for points in (True, False):
        name = "MR points" if points else "no points (automatic pre-alignment)"
        _run(data, points, args.out / "warmup")
        runs = [_run(data, points, args.out / f"run{i}") for i in range(args.repeats)]
        rows[name] = {key: statistics.median(r.get(key, 0.0) for r in runs) for key in (*STAGES, "total", "writing")}
        profiles[name] = _profile(data, points, args.out / "profile")
        print(name, {k: round(v, 2) for k, v in rows[name].items()}, flush=True)
    walls["srr-register --sample (MR points), whole command"] = _wall_clock(args.threads, args.out / "cli")
    args.markdown.write_text(_render(rows, profiles, walls, args), encoding="utf-8")
    print(f"report: {args.markdown}")
    return 0


def _render(rows: dict, profiles: dict, walls: dict, args: argparse.Namespace) -> str:
    names = list(rows)
    table = [f"| stage (s, median of {args.repeats}) | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for key in (*STAGES, "total", "writing"):
        label = {"total": "**registration (load to result)**", "writing": "writing the files"}.get(key, key)
        table.append(f"| {label} | " + " | ".join(f"{rows[n][key]:.2f}" for n in names) + " |")
    info = machine_info()
    parts = [
        "# Speed profile of `srr-register` on the sample case (issue 16)",
        "",
        f"`scripts/speed_profile.py --threads {args.threads} --repeats {args.repeats}` on "
        f"{info.get('cpu', 'this machine')}, {args.threads} torch/ITK threads, the networks in "
        f"{network_arithmetic_name('cpu', RegistrationSettings().network_precision)}, {info['date_utc']}; the bundled "
        "sample case (real CT, clinical-style sagittal T2 MR, 3 vertebrae), default settings, in-process after a "
        "warm-up (imports excluded).",
        "",
        *table,
        "",
        *[f"- {name}: {seconds:.1f} s wall-clock" for name, seconds in walls.items()],
        "",
    ]
    for name, text in profiles.items():
        parts += [f"## Where the time goes: {name} (cProfile, one run, sorted by own time)", "", "```", text, "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark one test-time refinement step on the CPU: time of each loss term and of a whole Adam step.

Usage::

    .venv/bin/python scripts/bench_refine.py                       # writes docs/benchmark/refine_step.md
    .venv/bin/python scripts/bench_refine.py --json before.json --output none --package-root /path/to/old/copy
    .venv/bin/python scripts/bench_refine.py --baseline before.json   # adds "before" columns and speed-ups

Every time is forward + backward, the minimum over ``--repeats`` runs after one warm-up, in milliseconds. The case
is synthetic (no data needed): ``--vertebrae`` vertebra-like labels (an ellipsoid body and a posterior process)
stacked along the first axis of each grid, smooth random images and a smooth random velocity of a few voxels, on a
2 mm grid (the half-resolution velocity grid of the fast models). ``step`` is one iteration of
``refine.refine_velocity`` with the default ``RefineWeights`` (MIND + 0.01 diffusion + rigid field 0.01 + PC 0.1 +
OC 0.05), measured as the difference between runs of ``1 + --steps`` and 1 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = ("56x48x64", "80x80x96")
SPACING = (2.0, 2.0, 2.0)
DEFAULT_RIGIDITY = {"rigid_field": 0.01, "pc": 0.1, "oc": 0.05}
TERMS = (
    ("integrate", "integrate_velocity (7 squarings)"),
    ("warp", "warp moving image (border)"),
    ("mind", "MIND-SSC loss"),
    ("diffusion", "diffusion of the velocity"),
    ("rigid_field", "rigid field loss alone"),
    ("pc", "PC loss alone"),
    ("oc", "OC loss alone"),
    ("rigidity", "rigid field + PC + OC (as a step computes them)"),
    ("step", "whole refinement step"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="grids as DxHxW")
    parser.add_argument("--vertebrae", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="refinement steps timed for the per-step figure")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--package-root", type=Path, default=None, help="folder holding another SpineRigidRegLib")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--baseline", type=Path, nargs="+", default=None, help="JSON of earlier runs to compare with (min per term)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="measure every grid this many times, keep the minima")
    parser.add_argument(
        "--output", default=str(REPO / "docs" / "benchmark" / "refine_step.md"), help="markdown file, or 'none'"
    )
    return parser.parse_args(argv)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``fn`` in ms over ``repeats`` runs after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def synthetic_case(shape: tuple[int, int, int], vertebrae: int, seed: int = 0):
    """Labels ``(1, 1, D, H, W)``, fixed and moving images and a velocity ``(1, 3, D, H, W)`` of a few voxels."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    d, h, w = shape
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    labels = torch.zeros(shape, dtype=torch.int64)
    pitch = d / (vertebrae + 1)
    for v in range(vertebrae):
        centre = (v + 1) * pitch
        body = (
            ((k - centre) / (0.35 * pitch)) ** 2 + ((j - 0.4 * h) / (0.15 * h)) ** 2 + ((i - 0.5 * w) / (0.18 * w)) ** 2
        )
        process = (
            ((k - centre).abs() < 0.2 * pitch) & ((j - 0.65 * h).abs() < 0.1 * h) & ((i - 0.5 * w).abs() < 0.05 * w)
        )
        labels[(body <= 1) | process] = 20 + v  # TotalSegmentator-like values, not 1..n

    def smooth(channels: int, amplitude: float, size: int = 9) -> torch.Tensor:
        noise = torch.randn((1, channels, *shape), generator=generator)
        blurred = F.avg_pool3d(F.pad(noise, (size // 2,) * 6, mode="replicate"), size, stride=1)
        return amplitude * blurred / blurred.std()

    fixed = (0.5 + 0.1 * smooth(1, 1.0) + 0.3 * (labels > 0)[None, None]).clamp(0, 1)
    moving = (0.4 + 0.1 * smooth(1, 1.0) + 0.4 * (labels > 0)[None, None]).clamp(0, 1)
    velocity = smooth(3, 1.5)
    return labels[None, None], fixed, moving, velocity


def measure(shape: tuple[int, int, int], args: argparse.Namespace) -> dict[str, float]:
    import torch
    from SpineRigidRegLib.losses import rigidity as rigidity_module
    from SpineRigidRegLib.losses.similarity import mind_loss, mind_ssc
    from SpineRigidRegLib.losses.smoothness import diffusion_loss
    from SpineRigidRegLib.processing import ProcessingPair
    from SpineRigidRegLib.refine import refine_velocity
    from SpineRigidRegLib.warp import integrate_velocity, warp

    labels, fixed, moving, velocity = synthetic_case(shape, args.vertebrae)
    repeats = args.repeats
    times: dict[str, float] = {}

    v = velocity.clone().requires_grad_(True)
    cotangent = torch.randn_like(velocity)

    def integrate() -> None:
        integrate_velocity(v).backward(cotangent)

    times["integrate"] = best_time(integrate, repeats)
    disp = integrate_velocity(velocity).detach().requires_grad_(True)
    times["warp"] = best_time(lambda: warp(moving, disp, padding_mode="border").sum().backward(), repeats)
    warped = warp(moving, disp.detach(), padding_mode="border").requires_grad_(True)
    try:  # the refinement reuses the fixed image's descriptor where mind_loss accepts it
        descriptor = mind_ssc(fixed)
        mind_loss(fixed, warped, fixed_descriptor=descriptor)
        mind_kwargs = {"fixed_descriptor": descriptor}
    except TypeError:
        mind_kwargs = {}
    times["mind"] = best_time(lambda: mind_loss(fixed, warped, **mind_kwargs).backward(), repeats)
    times["diffusion"] = best_time(lambda: diffusion_loss(v).backward(), repeats)
    for name in DEFAULT_RIGIDITY:
        loss = rigidity_module.RIGIDITY_LOSSES[name]
        times[name] = best_time(lambda loss=loss: loss(labels, disp, spacing=SPACING).backward(), repeats)
    combined = getattr(rigidity_module, "rigidity_loss", None)
    if combined is not None:
        times["rigidity"] = best_time(
            lambda: combined(labels, disp, DEFAULT_RIGIDITY, spacing=SPACING).backward(), repeats
        )
    else:

        def separate() -> None:
            total = sum(
                w * rigidity_module.RIGIDITY_LOSSES[n](labels, disp, spacing=SPACING)
                for n, w in DEFAULT_RIGIDITY.items()
            )
            total.backward()

        times["rigidity"] = best_time(separate, repeats)

    def run(steps: int) -> float:
        start = time.perf_counter()
        refine_velocity(velocity, ProcessingPair(fixed, moving, labels, SPACING), steps=steps)
        return time.perf_counter() - start

    run(1)
    step_times = [(run(1 + args.steps) - run(1)) / args.steps for _ in range(max(1, repeats // 2))]
    times["step"] = 1e3 * min(step_times)
    return times


def merge_times(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-term minimum over several measurements (the least disturbed by other work on a shared machine)."""
    return {key: min(run[key] for run in runs if key in run) for key in {k for run in runs for k in run}}


def merge_runs(runs: list[dict]) -> dict:
    """Several JSON results merged into one: per grid and term, the minimum."""
    merged = {"meta": dict(runs[0]["meta"]), "shapes": runs[0]["shapes"], "times": {}}
    merged["meta"]["label"] += f" (minimum over {len(runs)} run(s))" if len(runs) > 1 else ""
    for shape in {shape for run in runs for shape in run["times"]}:
        merged["times"][shape] = merge_times([run["times"][shape] for run in runs if shape in run["times"]])
    return merged


def markdown(results: dict, baseline: dict | None) -> str:
    meta = results["meta"]
    lines = [
        "# Refinement step on the CPU",
        "",
        "Produced by `scripts/bench_refine.py` (see its docstring for the synthetic case). Forward + backward, minimum",
        f"over {meta['repeats']} runs x {meta.get('rounds', 1)} round(s), milliseconds. {meta['vertebrae']} vertebrae,"
        " 2 mm grid, default",
        "`RefineWeights` (MIND + 0.01 diffusion + rigid field 0.01 + PC 0.1 + OC 0.05).",
        "",
        f"- machine: {meta['cpu']}, torch {meta['torch']}, {meta['threads']} thread(s), load average "
        f"{meta['load']} at the start (the machine is shared: figures are noisy)",
    ]
    if baseline is not None:
        lines.append(f"- before: {baseline['meta'].get('label', 'baseline run')}")
    lines.append("")
    for shape in results["shapes"]:
        now = results["times"][shape]
        before = None if baseline is None else baseline["times"].get(shape)
        lines += [f"## Grid {shape}", ""]
        if before is None:
            lines += ["| term | ms |", "|---|---:|"]
        else:
            lines += ["| term | before (ms) | after (ms) | speed-up |", "|---|---:|---:|---:|"]
        for key, title in TERMS:
            if key not in now:
                continue
            if before is None or key not in before:
                lines.append(f"| {title} | {now[key]:.1f} |" + ("" if before is None else " | |"))
            else:
                lines.append(f"| {title} | {before[key]:.1f} | {now[key]:.1f} | {before[key] / now[key]:.1f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.package_root is not None:
        sys.path.insert(0, str(args.package_root.resolve()))
    import os

    import SpineRigidRegLib
    import torch
    from SpineRigidRegLib.system import cpu_name

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = []
    for text in args.shapes:
        shape = tuple(int(x) for x in text.lower().split("x"))
        if len(shape) != 3 or min(shape) < 8:
            raise SystemExit(f"bad shape {text!r}: expected DxHxW with sizes >= 8")
        shapes.append(shape)
    results = {
        "meta": {
            "label": f"SpineRigidRegLib at {Path(SpineRigidRegLib.__file__).parent}",
            "cpu": cpu_name(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
            "repeats": args.repeats,
            "vertebrae": args.vertebrae,
        },
        "shapes": [],
        "times": {},
    }
    baseline = None if args.baseline is None else merge_runs([json.loads(p.read_text()) for p in args.baseline])
    results["meta"]["rounds"] = args.rounds
    for shape in shapes:
        key = "x".join(str(s) for s in shape)
        times = merge_times([measure(shape, args) for _ in range(max(1, args.rounds))])
        results["shapes"].append(key)
        results["times"][key] = times
        before = None if baseline is None else baseline["times"].get(key, {})
        print(f"grid {key}")
        for name, title in TERMS:
            if name in times:
                extra = f"   (before {before[name]:8.1f} ms)" if before and name in before else ""
                print(f"  {title:48s} {times[name]:8.1f} ms{extra}")
        steps_per_minute = 60e3 / times["step"] if times["step"] > 0 else math.inf
        print(f"  -> {steps_per_minute:.0f} refinement steps per minute")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    if args.output.lower() != "none":
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown(results, baseline))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``srr-benchmark``: every method on the same ground-truth pairs; CSV, Markdown table and figures."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import InputError
from .common import add_common_arguments, check_output_folder, progress_bar, run_command

#: ``../shared/data`` beside the repository (the development workspace and CI).
DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[4] / "shared" / "data"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srr-benchmark",
        description=(
            "Benchmark on synthetic CT/MR pairs with known ground truth (real TotalSegmentator CT + phantoms): "
            "Initial, Staring (elastix B-spline + rigidity penalty), elastix without the penalty and our models, "
            "with the paper's Table 1 columns plus vertebra TRE, runtime, peak memory and device."
        ),
        epilog="Example: srr-benchmark --cases 12 --out docs/benchmark --markdown docs/BENCHMARKS.md",
    )
    parser.add_argument("--cases", type=int, default=12, help="number of pairs (default 12)")
    parser.add_argument(
        "--real-cases",
        type=int,
        default=None,
        help="how many of them come from the real CT (default: a third, when the data is present)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the CSV files and figures")
    parser.add_argument("--markdown", type=Path, default=None, help="Markdown report (default: OUT/BENCHMARKS.md)")
    parser.add_argument("--elastix-iterations", type=int, default=250, help="elastix iterations per resolution")
    parser.add_argument(
        "--manifest",
        type=Path,
        help="srr-ablation's manifest.json (or a JSON list of {name, checkpoint}): one network-only row per model",
    )
    parser.add_argument("--refine-steps", type=int, default=20, help="refinement steps of the refined model row")
    parser.add_argument("--device", default="auto", help="device of the model rows: auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for elastix and torch (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the cases")
    parser.add_argument("--no-real-data", action="store_true", help="phantom cases only")
    parser.add_argument(
        "--mr-contrast", choices=("t1", "t2"), default="t1", help="contrast of the MR-like images (default t1)"
    )
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA, help="folder with the real data")
    parser.add_argument("--tiny", action="store_true", help="tiny 3-vertebra phantoms (tests and smoke runs)")
    parser.add_argument(
        "--only",
        choices=("all", "model", "elastix", "initial"),
        default="all",
        help="run only these rows on the previous run's cases (from OUT/run.json) and reuse the other rows from "
        "OUT's CSV files (e.g. 'model' once the bundled model exists)",
    )
    parser.add_argument(
        "--speed", action="store_true", help="measure the pipeline's speed/memory figures instead of the accuracy table"
    )
    parser.add_argument(
        "--speed-shape",
        type=int,
        nargs=3,
        default=(192, 160, 160),
        metavar=("D", "H", "W"),
        help="input crop of the speed measurement (array order, 1 mm)",
    )
    parser.add_argument("--memory-grid", type=int, default=256, help="cubic grid of the memory measurement (0: skip)")
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..baselines.elastix import ElastixSettings, describe
    from ..benchmark import report
    from ..benchmark.cases import CaseSpec, build_cases, case_specs, real_data_available
    from ..benchmark.runner import (
        KIND_ELASTIX,
        KIND_INITIAL,
        KIND_MODEL,
        default_methods,
        run_benchmark,
        speed_benchmark,
    )

    if args.cases < 1 or args.elastix_iterations < 1:
        raise InputError("--cases and --elastix-iterations must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise InputError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    markdown = args.markdown or args.out / "BENCHMARKS.md"
    check_output_folder(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if args.speed:
        elastix = ElastixSettings(rigidity_penalty=True, iterations=args.elastix_iterations, threads=args.threads)
        with progress_bar(not args.quiet) as progress:
            speed = speed_benchmark(
                device=args.device if args.device != "auto" else "cpu",
                elastix=elastix,
                shape=args.speed_shape,
                memory_grid=args.memory_grid or None,
                progress=progress,
            )
        speed["command"] = report.command_line()
        speed["date_utc"] = report.machine_info()["date_utc"]
        report.write_json(speed, args.out / report.SPEED_JSON)
        path = report.render_markdown(args.out, markdown)
        print(
            f"pipeline {speed['pipeline_s']:.2f} s, elastix + penalty {speed['elastix_s']:.1f} s "
            f"({speed['speedup_vs_elastix']:.1f}x); report: {path}"
        )
        return 0

    use_real = not args.no_real_data and real_data_available(args.shared_data) and not args.tiny
    real_count = (args.real_cases if args.real_cases is not None else max(1, args.cases // 3)) if use_real else 0
    if real_count > args.cases:
        raise InputError(f"--real-cases ({real_count}) exceeds --cases ({args.cases})")
    specs = case_specs(args.cases, real_count, args.seed, args.mr_contrast)
    methods, notes = default_methods(args.elastix_iterations, args.manifest, args.threads, args.refine_steps)
    if not use_real and not args.no_real_data and not args.tiny:
        notes.append(f"real-CT cases skipped: {args.shared_data} does not hold the TotalSegmentator example")
    kinds = {"model": {KIND_MODEL}, "elastix": {KIND_ELASTIX}, "initial": {KIND_INITIAL}}.get(args.only)
    previous = None
    kept: set[str] = set()
    if kinds is not None:
        kept = {m.name for m in methods if m.kind not in kinds}
        previous = report.load_results(args.out)
        if not previous.case_rows:
            raise InputError(f"--only {args.only} needs a previous run's {report.CASE_CSV} in {args.out}")
        methods = [m for m in methods if m.kind in kinds]
        if not methods:
            raise InputError(f"no {args.only} rows to run (is the bundled model or a --manifest available?)")
        previous_meta = report.read_json(args.out / report.RUN_JSON)
        if previous_meta.get("specs"):  # rebuild exactly the previous run's cases
            specs = [CaseSpec(**spec) for spec in previous_meta["specs"]]
            args.tiny = bool(previous_meta.get("tiny", args.tiny))
            use_real = any(spec.source == "real" for spec in specs)

    with progress_bar(not args.quiet) as progress:
        cases = build_cases(
            specs, args.shared_data if use_real else None, tiny=args.tiny, progress=lambda f, m: progress(0.05 * f, m)
        )
        panel_case = next((c.name for c in cases if c.source == "real"), cases[0].name)
        run = run_benchmark(
            cases,
            methods,
            device=args.device,
            panel_case=panel_case,
            progress=lambda f, m: progress(0.05 + 0.95 * f, m),
        )
    if previous is not None:
        # every previous row of the rerun kinds goes, also rows of that kind whose name has since changed
        replaced = {str(r.get("method")) for r in previous.case_rows} - kept | {m.name for m in methods}
        run = report.merge_results(previous, run, sorted(replaced))
        meta = report.read_json(args.out / report.RUN_JSON)
        meta.setdefault("reruns", []).append(
            {
                "command": report.command_line(),
                "rows": [m.name for m in methods],
                "date_utc": report.machine_info()["date_utc"],
                "wall_time_s": time.perf_counter() - started,
            }
        )

        def still_true(note: str) -> bool:  # notes about rows this rerun replaces are stale
            if "were run later" in note or "model rows skipped" in note:
                return not any(m.kind == KIND_MODEL for m in methods)
            return True

        run.notes = [n for n in run.notes if still_true(n)]
        meta["notes"] = [n for n in meta.get("notes", []) if still_true(n)] + notes
        meta["notes"].append(
            f"rows {', '.join(m.name for m in methods)} were run later ({report.machine_info()['date_utc']}, "
            f"`{report.command_line()}`) on the same cases; their speed ratio compares with the other rows' times "
            "from the first run (machine load may differ)"
        )
        meta["machine"] = report.machine_info()
    else:
        meta = {
            "command": report.command_line(),
            "machine": report.machine_info(),
            "wall_time_s": time.perf_counter() - started,
            "panel_case": panel_case,
            "notes": notes,
            "cases": [
                {"name": c.name, "source": c.source, "seed": c.seed, "description": c.description} for c in cases
            ],
            "specs": [asdict(spec) for spec in specs],
            "tiny": bool(args.tiny),
            "settings": {
                "elastix": {m.name: describe(m.elastix) for m in methods if m.elastix is not None},
                "models": [
                    {k: v for k, v in asdict(m).items() if k != "elastix"} for m in methods if m.kind == KIND_MODEL
                ],
                "device": args.device,
                "threads": args.threads or torch.get_num_threads(),
                "seed": args.seed,
                "model rows pre-alignment": "vertebra centre points (MR: centroids of the true fixed labels; "
                "CT: label centroids), as in the paper",
            },
        }
    paths = report.write_report(run, args.out, markdown, meta)
    print(report.markdown_table(report.summary_table(run)))
    print(f"\nreport: {paths['markdown']}; per-vertebra CSV: {paths['per_vertebra']}; figures in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

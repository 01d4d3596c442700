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
    parser.add_argument(
        "--tiers",
        nargs="+",
        choices=("real-mr", "clinical", "capture"),
        default=None,
        help="run the clinic-like tiers instead of Table 1 (issue 15): real MR, clinical acquisition, capture range",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="with --tiers: a tiny subset (one small phantom case, capture scales 0.5-2, four rows; CI's smoke test)",
    )
    parser.add_argument(
        "--capture-iterations", type=int, default=100, help="elastix iterations per resolution in the capture tier"
    )
    parser.add_argument(
        "--candidate-model",
        type=Path,
        default=None,
        help="with --tiers: an exported model (srr-train --export) whose network path and default rows are added",
    )
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
    )
    from ..benchmark.speed import speed_benchmark

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

    if args.tiers:
        return _run_tiers(args)

    if args.speed:
        elastix = ElastixSettings(rigidity_penalty=True, iterations=args.elastix_iterations, threads=args.threads)
        with progress_bar(not args.quiet) as progress:
            speed = speed_benchmark(
                device=args.device if args.device != "auto" else "cpu",
                elastix=elastix,
                shape=args.speed_shape,
                memory_grid=args.memory_grid or None,
                progress=progress,
                shared_data=args.shared_data,
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


def _run_tiers(args: argparse.Namespace) -> int:
    """The clinic-like tiers (:mod:`..benchmark.tiers`): every row on the same pairs, one report."""
    import torch

    from ..benchmark import report, tiers
    from ..benchmark.cases import real_data_available
    from ..data.real_mr import real_mr_available

    started = time.perf_counter()
    markdown = args.markdown or args.out / "BENCHMARKS_TIERS.md"
    notes: list[str] = []
    have_ct = real_data_available(args.shared_data) and not args.no_real_data
    have_mr = real_mr_available(args.shared_data) and not args.no_real_data
    quick = bool(args.quick or args.tiny)
    iterations = 3 if quick else args.elastix_iterations
    capture_iterations = 3 if quick else args.capture_iterations
    candidate = str(args.candidate_model) if args.candidate_model else None
    if candidate and not Path(candidate).is_file():
        raise InputError(f"--candidate-model {candidate} does not exist")
    methods = tiers.tier_methods(iterations, args.threads, candidate=candidate)
    capture_methods = tiers.tier_methods(capture_iterations, args.threads, candidate=candidate)
    if quick:  # the smoke test: one row of each kind, tiny phantom cases, no real-MR tier
        keep = {tiers.NO_REGISTRATION, tiers.INITIAL_POINTS, tiers.STARING_POINTS, tiers.DEFAULT}
        keep |= {m.name for m in methods if m.checkpoint}
        methods = capture_methods = [m for m in methods if m.name in keep]
        if "real-mr" in args.tiers:
            notes.append("--quick: the real-MR tier is left out (its 1 mm grid takes minutes per model row)")
            args.tiers = [t for t in args.tiers if t != "real-mr"]
    if not any(m.kind == "model" for m in methods):
        notes.append("model rows skipped: Resources/Models/default.json does not exist")
    clinical_count, real_count, capture_count = (1, 1, 1) if quick else (3, 2, 2)
    scales = (0.5, 1.0, 2.0) if quick else tiers.CAPTURE_SCALES
    tiny_clinical = quick or not have_ct
    if not have_ct and not quick:
        notes.append(f"the real CT is absent ({args.shared_data}): the clinical tiers use a small phantom")
    seed = args.seed
    cases_meta: list[dict] = []
    runs: dict[str, object] = {}
    dice: dict[str, dict[str, float]] = {}
    realism_inputs = []

    def describe_cases(tier: str, cases) -> None:
        for case in cases:
            d = case.description
            cases_meta.append(
                {
                    "tier": tier,
                    "name": case.name,
                    "seed": case.seed,
                    "motion_scale": d.get("motion_scale"),
                    "mr": d.get("mr"),
                    "evaluated": len(case.evaluated or ()),
                }
            )

    with progress_bar(not args.quiet) as progress:
        if "real-mr" in args.tiers:
            if not have_mr:
                notes.append(f"real-MR tier skipped: {args.shared_data} does not hold the TotalSegmentator MR example")
            else:
                progress(0.0, "real-MR tier: building cases")
                cases = [tiers.real_mr_case(i, seed + 3000 + i, args.shared_data) for i in range(real_count)]
                describe_cases(tiers.REAL_MR, cases)
                runs[tiers.REAL_MR] = tiers.run_tier(
                    cases, methods, args.device, lambda f, m: progress(0.02 + 0.2 * f, f"real MR: {m}")
                )
                dice[tiers.REAL_MR] = tiers.segmentation_dice(cases, args.device)
        clinical_cases = []
        if "clinical" in args.tiers or "capture" in args.tiers:
            progress(0.25, "clinical tier: building cases")
            count = clinical_count if "clinical" in args.tiers else capture_count
            clinical_cases = [
                tiers.clinical_case(i, seed + 4000 + i, args.shared_data, tiny=tiny_clinical) for i in range(count)
            ]
            realism_inputs = [
                (
                    f"synthetic {c.description['mr'].split(',')[0]} ({c.name})",
                    c.fixed,
                    c.fixed_labels,
                    c.description["fixed_tissues"],
                )
                for c in clinical_cases
            ]
            describe_cases(tiers.CLINICAL, clinical_cases)
            if "clinical" in args.tiers:
                runs[tiers.CLINICAL] = tiers.run_tier(
                    clinical_cases, methods, args.device, lambda f, m: progress(0.27 + 0.25 * f, f"clinical: {m}")
                )
                dice[tiers.CLINICAL] = tiers.segmentation_dice(clinical_cases, args.device)
        if "capture" in args.tiers:
            progress(0.55, "capture tier: building cases")
            capture_cases = [
                tiers.clinical_case(i, seed + 4000 + i, args.shared_data, scale=s, tiny=tiny_clinical)
                for i in range(capture_count)
                for s in scales
                if s != 1.0 or tiers.CLINICAL not in runs
            ]
            describe_cases(tiers.CAPTURE, capture_cases)
            run = tiers.run_tier(
                capture_cases, capture_methods, args.device, lambda f, m: progress(0.57 + 0.43 * f, f"capture: {m}")
            )
            if tiers.CLINICAL in runs and 1.0 in scales:  # scale 1 is the clinical tier's run of the same cases
                names = {c.name for c in clinical_cases[:capture_count]}
                clinical_run = runs[tiers.CLINICAL]
                if capture_iterations != iterations:
                    notes.append(
                        f"capture range at x1 reuses the clinical tier's results (Staring with {iterations} "
                        f"iterations per resolution; {capture_iterations} at the other scales)"
                    )
                run.case_rows += [r for r in clinical_run.case_rows if r["case"] in names]
                run.vertebra_rows += [r for r in clinical_run.vertebra_rows if r["case"] in names]
                for c in cases_meta:
                    if c["tier"] == tiers.CLINICAL and c["name"] in names:
                        cases_meta.append({**c, "tier": tiers.CAPTURE})
            runs[tiers.CAPTURE] = run
            tiers.plot_capture(run.case_rows, args.out / tiers.CAPTURE_PNG)

    realism = []
    if have_mr and realism_inputs and not quick:
        from ..benchmark.cases import CaseSpec, build_case

        old = build_case(CaseSpec("real", 0, seed + 1000, "t1"), args.shared_data)
        from ..data.subjects import load_real_case

        tissues = load_real_case(args.shared_data, spacing=1.0, margin_mm=15.0).tissues
        # today's pair: the MR shows the CT's tissues moved by the true field (warped by position is close enough
        # for per-tissue statistics at 3 mm)
        realism_inputs.append(("Table-1 MR (flat classes, real-00)", old.fixed, old.fixed_labels, tissues))
        realism = tiers.realism_check(args.shared_data, realism_inputs)
    for tier, run in runs.items():
        report.write_results(run, args.out / tier)
        report.plot_panels(run, args.out / tier / report.PANELS_PNG, case_name=run.case_rows[0]["case"])
    meta = {
        "command": report.command_line(),
        "machine": report.machine_info(),
        "wall_time_s": time.perf_counter() - started,
        "tiers": [t for t in tiers.TIERS if t in runs],
        "notes": notes + [n for run in runs.values() for n in run.notes],
        "cases": cases_meta,
        "segmentation_dice": dice,
        "realism": realism,
        "elastix_iterations": iterations,
        "capture_iterations": capture_iterations,
        "threads": args.threads or torch.get_num_threads(),
        "quick": quick,
    }
    report.write_json(meta, args.out / "tiers.json")
    path = tiers.render_tier_report(args.out, markdown)
    for tier, run in runs.items():
        print(f"{tier}:\n{tiers.success_table(run.case_rows)}\n")
    print(f"report: {path}; figures in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``srr-benchmark``: every method on the same ground-truth pairs; CSV, Markdown table and figures."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from .common import add_common_arguments, check_output_folder, progress_bar, run_command

if TYPE_CHECKING:
    from ..benchmark.cases import BenchmarkCase, CaseSpec
    from ..benchmark.runner import BenchmarkRun, Method

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
        "--speed-repeats",
        type=int,
        default=None,
        metavar="N",
        help="runs per speed figure, the fastest reported (default: 3; 1 for a quick look)",
    )
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
    """Check the options, prepare OUT and run the mode asked for: tiers, speed or the Table-1 benchmark."""
    _check_counts(args)
    markdown = args.markdown or args.out / "BENCHMARKS.md"
    check_output_folder(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.tiers:
        return _run_tiers(args)
    if args.speed:
        return _run_speed(args, markdown)
    return _run_table(args, markdown, started)


def _check_counts(args: argparse.Namespace) -> None:
    """Refuse counts below 1; ``--threads`` also sets torch's CPU thread count."""
    import torch

    if args.cases < 1 or args.elastix_iterations < 1:
        raise InputError("--cases and --elastix-iterations must be >= 1")
    if args.speed_repeats is not None and args.speed_repeats < 1:
        raise InputError("--speed-repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise InputError("--threads must be >= 1")
        torch.set_num_threads(args.threads)


# ------------------------------------------------------------------------------------------------ --speed


def _run_speed(args: argparse.Namespace, markdown: Path) -> int:
    """``--speed``: the pipeline's time and memory figures (:mod:`..benchmark.speed`) into OUT and the report."""
    from ..baselines.elastix import ElastixSettings
    from ..benchmark import report
    from ..benchmark.speed import REPEATS, speed_benchmark

    elastix = ElastixSettings(rigidity_penalty=True, iterations=args.elastix_iterations, threads=args.threads)
    with progress_bar(not args.quiet) as progress:
        speed = speed_benchmark(
            device=args.device if args.device != "auto" else "cpu",
            elastix=elastix,
            shape=args.speed_shape,
            memory_grid=args.memory_grid or None,
            progress=progress,
            shared_data=args.shared_data,
            repeats=REPEATS if args.speed_repeats is None else args.speed_repeats,
        )
    machine = report.machine_info()
    # The speed run may be on another machine than the Table 1 run beside it in the report: it names its own.
    speed |= {"command": report.command_line(), **{k: machine[k] for k in ("date_utc", "cpu", "git_commit")}}
    report.write_json(speed, args.out / report.SPEED_JSON)
    path = report.render_markdown(args.out, markdown)
    print(
        f"pipeline {speed['pipeline_s']:.2f} s, elastix + penalty {speed['elastix_s']:.1f} s "
        f"({speed['speedup_vs_elastix']:.1f}x); report: {path}"
    )
    return 0


# ------------------------------------------------------------------------------------------ Table 1


@dataclass
class _TablePlan:
    """What the Table-1 benchmark runs.

    Attributes:
        specs: One spec per case.
        methods: The rows to run.
        notes: Remarks for the report.
        use_real: Whether cases come from the real CT.
        previous: With ``--only``: the previous run's results (its other rows are kept), else None.
        kept: With ``--only``: names of the previous run's rows that this run does not replace.
    """

    specs: list[CaseSpec]
    methods: list[Method]
    notes: list[str]
    use_real: bool
    previous: BenchmarkRun | None = None
    kept: set[str] = field(default_factory=set)


def _run_table(args: argparse.Namespace, markdown: Path, started: float) -> int:
    """The Table-1 benchmark: every row on the same cases (``--only``: some rows again, the others kept)."""
    from ..benchmark import report

    plan = _plan_table(args)
    _restrict_to_only(args, plan)
    cases, panel_case, run = _run_table_cases(args, plan)
    if plan.previous is not None:
        run, meta = _merge_rerun(args, plan, run, started)
    else:
        meta = _first_run_meta(args, plan, cases, panel_case, started)
    paths = report.write_report(run, args.out, markdown, meta)
    print(report.markdown_table(report.summary_table(run)))
    print(f"\nreport: {paths['markdown']}; per-vertebra CSV: {paths['per_vertebra']}; figures in {args.out}/")
    return 0


def _plan_table(args: argparse.Namespace) -> _TablePlan:
    """The cases (a third from the real CT by default, when it is present) and the default rows."""
    from ..benchmark.cases import case_specs, real_data_available
    from ..benchmark.runner import default_methods

    use_real = not args.no_real_data and real_data_available(args.shared_data) and not args.tiny
    real_count = (args.real_cases if args.real_cases is not None else max(1, args.cases // 3)) if use_real else 0
    if real_count > args.cases:
        raise InputError(f"--real-cases ({real_count}) exceeds --cases ({args.cases})")
    specs = case_specs(args.cases, real_count, args.seed, args.mr_contrast)
    methods, notes = default_methods(args.elastix_iterations, args.manifest, args.threads, args.refine_steps)
    if not use_real and not args.no_real_data and not args.tiny:
        notes.append(f"real-CT cases skipped: {args.shared_data} does not hold the TotalSegmentator example")
    return _TablePlan(specs, methods, notes, use_real)


def _restrict_to_only(args: argparse.Namespace, plan: _TablePlan) -> None:
    """With ``--only``: keep the rows of that kind, load the previous results and rebuild the previous cases."""
    from ..benchmark import report
    from ..benchmark.cases import CaseSpec
    from ..benchmark.runner import KIND_ELASTIX, KIND_INITIAL, KIND_MODEL

    kinds = {"model": {KIND_MODEL}, "elastix": {KIND_ELASTIX}, "initial": {KIND_INITIAL}}.get(args.only)
    if kinds is None:
        return
    plan.kept = {m.name for m in plan.methods if m.kind not in kinds}
    plan.previous = report.load_results(args.out)
    if not plan.previous.case_rows:
        raise InputError(f"--only {args.only} needs a previous run's {report.CASE_CSV} in {args.out}")
    plan.methods = [m for m in plan.methods if m.kind in kinds]
    if not plan.methods:
        raise InputError(f"no {args.only} rows to run (is the bundled model or a --manifest available?)")
    previous_meta = report.read_json(args.out / report.RUN_JSON)
    if previous_meta.get("specs"):  # rebuild exactly the previous run's cases
        plan.specs = [CaseSpec(**spec) for spec in previous_meta["specs"]]
        args.tiny = bool(previous_meta.get("tiny", args.tiny))
        plan.use_real = any(spec.source == "real" for spec in plan.specs)


def _run_table_cases(args: argparse.Namespace, plan: _TablePlan) -> tuple[list[BenchmarkCase], str, BenchmarkRun]:
    """Build the cases and run the rows on them under one progress bar: ``(cases, panel case's name, run)``."""
    from ..benchmark.cases import build_cases
    from ..benchmark.runner import run_benchmark

    with progress_bar(not args.quiet) as progress:
        cases = build_cases(
            plan.specs,
            args.shared_data if plan.use_real else None,
            tiny=args.tiny,
            progress=lambda f, m: progress(0.05 * f, m),
        )
        panel_case = next((c.name for c in cases if c.source == "real"), cases[0].name)
        run = run_benchmark(
            cases,
            plan.methods,
            device=args.device,
            panel_case=panel_case,
            progress=lambda f, m: progress(0.05 + 0.95 * f, m),
        )
    return cases, panel_case, run


def _merge_rerun(
    args: argparse.Namespace, plan: _TablePlan, run: BenchmarkRun, started: float
) -> tuple[BenchmarkRun, dict]:
    """A ``--only`` run merged into the previous one: the results, and the previous run.json with this rerun."""
    from ..benchmark import report

    methods = plan.methods
    # every previous row of the rerun kinds goes, also rows of that kind whose name has since changed
    replaced = {str(r.get("method")) for r in plan.previous.case_rows} - plan.kept | {m.name for m in methods}
    run = report.merge_results(plan.previous, run, sorted(replaced))
    meta = report.read_json(args.out / report.RUN_JSON)
    meta.setdefault("reruns", []).append(
        {
            "command": report.command_line(),
            "rows": [m.name for m in methods],
            "date_utc": report.machine_info()["date_utc"],
            "wall_time_s": time.perf_counter() - started,
        }
    )
    run.notes = [n for n in run.notes if _note_still_true(n, methods)]
    meta["notes"] = [n for n in meta.get("notes", []) if _note_still_true(n, methods)] + plan.notes
    meta["notes"].append(
        f"rows {', '.join(m.name for m in methods)} were run later ({report.machine_info()['date_utc']}, "
        f"`{report.command_line()}`) on the same cases; their speed ratio compares with the other rows' times "
        "from the first run (machine load may differ)"
    )
    meta["machine"] = report.machine_info()
    return run, meta


def _note_still_true(note: str, methods: list[Method]) -> bool:
    """False for a note about model rows when this rerun ran model rows again (the note is stale)."""
    from ..benchmark.runner import KIND_MODEL

    if "were run later" in note or "model rows skipped" in note:
        return not any(m.kind == KIND_MODEL for m in methods)
    return True


def _first_run_meta(
    args: argparse.Namespace, plan: _TablePlan, cases: list[BenchmarkCase], panel_case: str, started: float
) -> dict:
    """run.json of a full run: command, machine, cases (and their specs, for ``--only``), settings of every row."""
    import torch

    from ..baselines.elastix import describe
    from ..benchmark import report
    from ..benchmark.runner import KIND_MODEL

    methods = plan.methods
    return {
        "command": report.command_line(),
        "machine": report.machine_info(),
        "wall_time_s": time.perf_counter() - started,
        "panel_case": panel_case,
        "notes": plan.notes,
        "cases": [{"name": c.name, "source": c.source, "seed": c.seed, "description": c.description} for c in cases],
        "specs": [asdict(spec) for spec in plan.specs],
        "tiny": bool(args.tiny),
        "settings": {
            "elastix": {m.name: describe(m.elastix) for m in methods if m.elastix is not None},
            "models": [{k: v for k, v in asdict(m).items() if k != "elastix"} for m in methods if m.kind == KIND_MODEL],
            "device": args.device,
            "threads": args.threads or torch.get_num_threads(),
            "seed": args.seed,
            "model rows pre-alignment": "vertebra centre points (MR: centroids of the true fixed labels; "
            "CT: label centroids), as in the paper",
        },
    }


# ------------------------------------------------------------------------------------------------ --tiers


@dataclass
class _TierPlan:
    """What ``--tiers`` runs (``--quick`` or ``--tiny``: CI's smoke-test subset).

    Attributes:
        quick: The smoke-test subset.
        have_mr: Whether the real MR example is present and allowed.
        iterations: elastix iterations per resolution in the real-MR and clinical tiers.
        capture_iterations: elastix iterations per resolution in the capture tier.
        methods: Rows of the real-MR and clinical tiers.
        capture_methods: Rows of the capture tier.
        real_count, clinical_count, capture_count: Cases of each tier.
        scales: Motion scales of the capture tier.
        tiny_clinical: Whether the clinical tiers use a small phantom instead of the real CT.
        notes: Remarks for the report.
    """

    quick: bool
    have_mr: bool
    iterations: int
    capture_iterations: int
    methods: list[Method]
    capture_methods: list[Method]
    real_count: int
    clinical_count: int
    capture_count: int
    scales: tuple[float, ...]
    tiny_clinical: bool
    notes: list[str]


@dataclass
class _TierResults:
    """What the tiers produced.

    Attributes:
        runs: Tier -> its run, in the order the tiers ran.
        dice: Tier -> case name -> Dice of the MR vertebra segmentation.
        cases: One entry per (tier, case) for tiers.json.
        clinical_cases: The clinical tier's cases (the capture tier's at scale 1).
        realism_inputs: ``(label, MR image, MR labels, MR tissues)`` of the synthetic MRs for the realism check.
    """

    runs: dict[str, BenchmarkRun] = field(default_factory=dict)
    dice: dict[str, dict[str, float]] = field(default_factory=dict)
    cases: list[dict] = field(default_factory=list)
    clinical_cases: list[BenchmarkCase] = field(default_factory=list)
    realism_inputs: list[tuple] = field(default_factory=list)

    def add_cases(self, tier: str, cases: list[BenchmarkCase]) -> None:
        """Describe ``cases`` of ``tier`` in :attr:`cases`."""
        for case in cases:
            d = case.description
            self.cases.append(
                {
                    "tier": tier,
                    "name": case.name,
                    "seed": case.seed,
                    "motion_scale": d.get("motion_scale"),
                    "mr": d.get("mr"),
                    "evaluated": len(case.evaluated or ()),
                }
            )


def _run_tiers(args: argparse.Namespace) -> int:
    """The clinic-like tiers (:mod:`..benchmark.tiers`): every row on the same pairs, one report."""
    from ..benchmark import tiers

    started = time.perf_counter()
    markdown = args.markdown or args.out / "BENCHMARKS_TIERS.md"
    plan = _plan_tiers(args)
    results = _run_tier_cases(args, plan)
    realism = _realism(args, plan, results)
    path = _write_tier_report(args, plan, results, realism, started, markdown)
    for tier, run in results.runs.items():
        print(f"{tier}:\n{tiers.success_table(run.case_rows)}\n")
    print(f"report: {path}; figures in {args.out}/")
    return 0


def _plan_tiers(args: argparse.Namespace) -> _TierPlan:
    """The rows, case counts and iterations of the tiers, from the options and the data present."""
    from ..benchmark import tiers
    from ..benchmark.cases import real_data_available
    from ..data.real_mr import real_mr_available

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
    if quick:
        methods = capture_methods = _quick_rows(args, methods, notes)
    if not any(m.kind == "model" for m in methods):
        notes.append("model rows skipped: Resources/Models/default.json does not exist")
    clinical_count, real_count, capture_count = (1, 1, 1) if quick else (3, 2, 2)
    tiny_clinical = quick or not have_ct
    if not have_ct and not quick:
        notes.append(f"the real CT is absent ({args.shared_data}): the clinical tiers use a small phantom")
    return _TierPlan(
        quick=quick,
        have_mr=have_mr,
        iterations=iterations,
        capture_iterations=capture_iterations,
        methods=methods,
        capture_methods=capture_methods,
        real_count=real_count,
        clinical_count=clinical_count,
        capture_count=capture_count,
        scales=(0.5, 1.0, 2.0) if quick else tiers.CAPTURE_SCALES,
        tiny_clinical=tiny_clinical,
        notes=notes,
    )


def _quick_rows(args: argparse.Namespace, methods: list[Method], notes: list[str]) -> list[Method]:
    """The smoke test's rows (one of each kind) and no real-MR tier (taken out of ``args.tiers``, with a note)."""
    from ..benchmark import tiers

    keep = {tiers.NO_REGISTRATION, tiers.INITIAL_POINTS, tiers.STARING_POINTS, tiers.DEFAULT}
    keep |= {m.name for m in methods if m.checkpoint}
    if "real-mr" in args.tiers:
        notes.append("--quick: the real-MR tier is left out (its 1 mm grid takes minutes per model row)")
        args.tiers = [t for t in args.tiers if t != "real-mr"]
    return [m for m in methods if m.name in keep]


def _run_tier_cases(args: argparse.Namespace, plan: _TierPlan) -> _TierResults:
    """Build each asked tier's cases and run its rows on them, under one progress bar."""
    results = _TierResults()
    with progress_bar(not args.quiet) as progress:
        if "real-mr" in args.tiers:
            _run_real_mr_tier(args, plan, results, progress)
        if "clinical" in args.tiers or "capture" in args.tiers:
            _run_clinical_tier(args, plan, results, progress)
        if "capture" in args.tiers:
            _run_capture_tier(args, plan, results, progress)
    return results


def _run_real_mr_tier(
    args: argparse.Namespace, plan: _TierPlan, results: _TierResults, progress: Callable[[float, str], None]
) -> None:
    """The real-MR tier (a note instead when the real MR example is absent)."""
    from ..benchmark import tiers

    if not plan.have_mr:
        plan.notes.append(f"real-MR tier skipped: {args.shared_data} does not hold the TotalSegmentator MR example")
        return
    progress(0.0, "real-MR tier: building cases")
    cases = [tiers.real_mr_case(i, args.seed + 3000 + i, args.shared_data) for i in range(plan.real_count)]
    results.add_cases(tiers.REAL_MR, cases)
    results.runs[tiers.REAL_MR] = tiers.run_tier(
        cases, plan.methods, args.device, lambda f, m: progress(0.02 + 0.2 * f, f"real MR: {m}")
    )
    results.dice[tiers.REAL_MR] = tiers.segmentation_dice(cases, args.device)


def _run_clinical_tier(
    args: argparse.Namespace, plan: _TierPlan, results: _TierResults, progress: Callable[[float, str], None]
) -> None:
    """The clinical tier's cases (also wanted by the capture tier alone), and its run when asked for."""
    from ..benchmark import tiers

    progress(0.25, "clinical tier: building cases")
    count = plan.clinical_count if "clinical" in args.tiers else plan.capture_count
    results.clinical_cases = [
        tiers.clinical_case(i, args.seed + 4000 + i, args.shared_data, tiny=plan.tiny_clinical) for i in range(count)
    ]
    results.realism_inputs = [_realism_input(c) for c in results.clinical_cases]
    results.add_cases(tiers.CLINICAL, results.clinical_cases)
    if "clinical" in args.tiers:
        results.runs[tiers.CLINICAL] = tiers.run_tier(
            results.clinical_cases,
            plan.methods,
            args.device,
            lambda f, m: progress(0.27 + 0.25 * f, f"clinical: {m}"),
        )
        results.dice[tiers.CLINICAL] = tiers.segmentation_dice(results.clinical_cases, args.device)


def _realism_input(case: BenchmarkCase) -> tuple:
    """``(label, MR image, MR labels, MR tissues)`` of a clinical case's synthetic MR for the realism check."""
    return (
        f"synthetic {case.description['mr'].split(',')[0]} ({case.name})",
        case.fixed,
        case.fixed_labels,
        case.description["fixed_tissues"],
    )


def _run_capture_tier(
    args: argparse.Namespace, plan: _TierPlan, results: _TierResults, progress: Callable[[float, str], None]
) -> None:
    """The capture-range tier: the clinical cases at every motion scale, and its figure."""
    from ..benchmark import tiers

    progress(0.55, "capture tier: building cases")
    capture_cases = [
        tiers.clinical_case(i, args.seed + 4000 + i, args.shared_data, scale=s, tiny=plan.tiny_clinical)
        for i in range(plan.capture_count)
        for s in plan.scales
        if s != 1.0 or tiers.CLINICAL not in results.runs
    ]
    results.add_cases(tiers.CAPTURE, capture_cases)
    run = tiers.run_tier(
        capture_cases, plan.capture_methods, args.device, lambda f, m: progress(0.57 + 0.43 * f, f"capture: {m}")
    )
    if tiers.CLINICAL in results.runs and 1.0 in plan.scales:
        _reuse_clinical_run(plan, results, run)
    results.runs[tiers.CAPTURE] = run
    tiers.plot_capture(run.case_rows, args.out / tiers.CAPTURE_PNG)


def _reuse_clinical_run(plan: _TierPlan, results: _TierResults, run: BenchmarkRun) -> None:
    """Scale 1 of the capture tier is the clinical tier's run of the same cases: add its rows and cases to ``run``."""
    from ..benchmark import tiers

    names = {c.name for c in results.clinical_cases[: plan.capture_count]}
    clinical_run = results.runs[tiers.CLINICAL]
    if plan.capture_iterations != plan.iterations:
        plan.notes.append(
            f"capture range at x1 reuses the clinical tier's results (Staring with {plan.iterations} "
            f"iterations per resolution; {plan.capture_iterations} at the other scales)"
        )
    run.case_rows += [r for r in clinical_run.case_rows if r["case"] in names]
    run.vertebra_rows += [r for r in clinical_run.vertebra_rows if r["case"] in names]
    for c in results.cases:  # the entries appended here are capture entries: the loop passes over them
        if c["tier"] == tiers.CLINICAL and c["name"] in names:
            results.cases.append({**c, "tier": tiers.CAPTURE})


def _realism(args: argparse.Namespace, plan: _TierPlan, results: _TierResults) -> list[dict]:
    """The synthetic MRs' realism against the real MR, Table 1's MR among them (full runs with the real MR only)."""
    if not (plan.have_mr and results.realism_inputs and not plan.quick):
        return []
    from ..benchmark import tiers
    from ..benchmark.cases import CaseSpec, build_case
    from ..data.subjects import load_real_case

    old = build_case(CaseSpec("real", 0, args.seed + 1000, "t1"), args.shared_data)
    tissues = load_real_case(args.shared_data, spacing=1.0, margin_mm=15.0).tissues
    # today's pair: the MR shows the CT's tissues moved by the true field (warped by position is close enough
    # for per-tissue statistics at 3 mm)
    results.realism_inputs.append(("Table-1 MR (flat classes, real-00)", old.fixed, old.fixed_labels, tissues))
    return tiers.realism_check(args.shared_data, results.realism_inputs)


def _write_tier_report(
    args: argparse.Namespace,
    plan: _TierPlan,
    results: _TierResults,
    realism: list[dict],
    started: float,
    markdown: Path,
) -> Path:
    """Each tier's CSV files and panels, tiers.json and the Markdown report; returns the report's path."""
    from ..benchmark import report, tiers

    for tier, run in results.runs.items():
        report.write_results(run, args.out / tier)
        report.plot_panels(run, args.out / tier / report.PANELS_PNG, case_name=run.case_rows[0]["case"])
    report.write_json(_tiers_meta(args, plan, results, realism, started), args.out / "tiers.json")
    return tiers.render_tier_report(args.out, markdown)


def _tiers_meta(
    args: argparse.Namespace, plan: _TierPlan, results: _TierResults, realism: list[dict], started: float
) -> dict:
    """tiers.json: command, machine, tiers run, notes, cases, segmentation Dice, realism and settings."""
    import torch

    from ..benchmark import report, tiers

    return {
        "command": report.command_line(),
        "machine": report.machine_info(),
        "wall_time_s": time.perf_counter() - started,
        "tiers": [t for t in tiers.TIERS if t in results.runs],
        "notes": plan.notes + [n for run in results.runs.values() for n in run.notes],
        "cases": results.cases,
        "segmentation_dice": results.dice,
        "realism": realism,
        "elastix_iterations": plan.iterations,
        "capture_iterations": plan.capture_iterations,
        "threads": args.threads or torch.get_num_threads(),
        "quick": plan.quick,
    }


if __name__ == "__main__":
    sys.exit(main())

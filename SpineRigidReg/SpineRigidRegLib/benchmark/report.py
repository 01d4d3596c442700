"""Benchmark outputs: CSV files, the Markdown table of ``docs/BENCHMARKS.md``, Fig. 2-like boxplots, Fig. 3-like panels.

Files in the output folder:
    ``per_vertebra.csv`` (one row per case, method and vertebra), ``per_case.csv`` (one row per case and method:
    runtime, peak memory, device, whole-field folding and SD log|J|), ``panels.npz`` (the slices of the panel
    figure), ``run.json`` (machine, versions, command, settings, cases, notes), ``speed.json`` (the speed section,
    written by ``srr-benchmark --speed``), ``boxplots.png`` and ``panels.png``.

The Markdown report is rendered from these files alone, so a partial rerun (``--only model``, ``--speed``) updates
the report without repeating the other parts.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..io import write_rows_csv
from ..system import cpu_name, git_commit, total_memory_gb
from .runner import INITIAL, STARING, BenchmarkRun

VERTEBRA_CSV = "per_vertebra.csv"
CASE_CSV = "per_case.csv"
PANELS = "panels.npz"
RUN_JSON = "run.json"
SPEED_JSON = "speed.json"
BOXPLOTS = "boxplots.png"
PANELS_PNG = "panels.png"
#: The tiers' report (``srr-benchmark --tiers``), linked from the Table-1 report when it lies beside it.
TIERS_MARKDOWN = "BENCHMARKS_TIERS.md"

# (column, title, source table, format, lower-is-better note)
TABLE_COLUMNS = (
    ("dice", "DSC", "vertebra", "{:.3f}"),
    ("rigid_dice", "Rigid DSC", "vertebra", "{:.3f}"),
    ("abs_volume_change_percent", "%Δvol", "vertebra", "{:.2f}"),
    ("folding_voxels", "\\|J\\|≤0 voxels", "case", "{:.1f}"),
    ("sd_log_jacobian", "SD log\\|J\\|", "case", "{:.3f}"),
    ("pc", "PC metric", "vertebra", "{:.4f}"),
    ("tre_mm", "TRE mm", "vertebra", "{:.2f}"),
    ("runtime_s", "Time s", "case", "{:.1f}"),
    ("peak_memory_mb", "Peak mem MB", "case", "{:.0f}"),
)


# ---------------------------------------------------------------------------------------------------- files


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as stream:
        return [dict(row) for row in csv.DictReader(stream)]


def _number(value: object) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def load_results(out_dir: str | os.PathLike) -> BenchmarkRun:
    """Read a previous run's CSV files and panels back (values as strings from the CSV, panels as arrays)."""
    out = Path(out_dir)
    run = BenchmarkRun(vertebra_rows=_read_csv(out / VERTEBRA_CSV), case_rows=_read_csv(out / CASE_CSV))
    if (out / PANELS).is_file():
        with np.load(out / PANELS) as data:
            run.panels = {key: data[key] for key in data.files}
    meta = read_json(out / RUN_JSON)
    run.notes = list(meta.get("notes", []))
    return run


def merge_results(previous: BenchmarkRun, new: BenchmarkRun, replaced: Sequence[str]) -> BenchmarkRun:
    """``previous`` without the rows of the ``replaced`` methods, plus ``new`` (method order: previous first)."""
    drop = set(replaced)
    merged = BenchmarkRun(
        vertebra_rows=[r for r in previous.vertebra_rows if r.get("method") not in drop] + new.vertebra_rows,
        case_rows=[r for r in previous.case_rows if r.get("method") not in drop] + new.case_rows,
        panels={k: v for k, v in previous.panels.items() if k.split("|")[0] not in drop} | new.panels,
        notes=[n for n in previous.notes if not any(n.startswith(m) for m in drop)] + new.notes,
    )
    return merged


def write_results(run: BenchmarkRun, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the CSV files and the panel slices; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(run.vertebra_rows, out / VERTEBRA_CSV, float_format=".6g")
    write_rows_csv(run.case_rows, out / CASE_CSV, float_format=".6g")
    if run.panels:
        np.savez_compressed(out / PANELS, **run.panels)
    return {"per_vertebra": out / VERTEBRA_CSV, "per_case": out / CASE_CSV, "panels": out / PANELS}


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def write_json(data: Mapping, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(data, stream, indent=2, default=str)


# ---------------------------------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """Machine, versions and time of the run, for the report header."""
    import SimpleITK as sitk
    import torch

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "memory_gb": total_memory_gb(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "SimpleITK": sitk.Version_VersionString(),
        "itk-elastix": _package_version("itk-elastix"),
        "spinerigidreg": _package_version("spinerigidreg"),
        "git_commit": git_commit(short=True),
    }
    return info


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------------------------------- tables


def method_order(run: BenchmarkRun) -> list[str]:
    """Methods in the order they first appear in the case rows."""
    order: list[str] = []
    for row in run.case_rows:
        if row["method"] not in order:
            order.append(row["method"])
    return order


def _mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    return float(np.mean(finite)), float(np.std(finite)), len(finite)


def summary_table(run: BenchmarkRun, sources: Sequence[str] | None = None) -> list[dict]:
    """Per method: ``{column: (mean, sd)}`` over vertebrae (vertebra columns) or cases (case columns), plus counts.

    Args:
        run: The results.
        sources: Keep only cases of these sources (``"real"``, ``"phantom"``); ``None`` keeps all.
    """
    keep = (lambda row: row.get("source") in sources) if sources else (lambda row: True)  # noqa: E731
    table = []
    for method in method_order(run):
        vertebrae = [r for r in run.vertebra_rows if r["method"] == method and keep(r)]
        cases = [r for r in run.case_rows if r["method"] == method and keep(r)]
        ok = [r for r in cases if str(r.get("status", "ok")) == "ok"]
        entry: dict = {"method": method, "cases": len(ok), "failed": len(cases) - len(ok), "vertebrae": len(vertebrae)}
        for column, _, source, _ in TABLE_COLUMNS:
            rows = vertebrae if source == "vertebra" else ok
            entry[column] = _mean_sd([_number(r.get(column)) for r in rows])
        devices = sorted({str(r.get("device")) for r in ok if r.get("device") not in (None, "", "-")})
        entry["device"] = ", ".join(devices) or "-"
        table.append(entry)
    return table


def _format(entry: dict, column: str, fmt: str) -> str:
    mean, sd, count = entry[column]
    if count == 0 or not math.isfinite(mean):
        return "-"
    if entry["method"] == INITIAL and column in ("folding_voxels", "sd_log_jacobian", "runtime_s", "peak_memory_mb"):
        return "-"
    return f"{fmt.format(mean)} ({fmt.format(sd)})"


def markdown_table(table: Sequence[dict], with_speed: bool = True) -> str:
    """The Table-1-like Markdown table: mean (SD), speed-up relative to the Staring row of the same run."""
    staring = next((e for e in table if e["method"] == STARING), None)
    staring_time = staring["runtime_s"][0] if staring else math.nan
    header = ["Method", *[title for _, title, _, _ in TABLE_COLUMNS]]
    if with_speed:
        header.append("Speed vs Staring")
    header += ["Device", "Cases", "Vertebrae"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        cells = [entry["method"]] + [_format(entry, c, fmt) for c, _, _, fmt in TABLE_COLUMNS]
        if with_speed:
            mean_time = entry["runtime_s"][0]
            if entry["method"] == INITIAL or not (math.isfinite(mean_time) and mean_time > 0):
                cells.append("-")
            else:
                cells.append(f"{staring_time / mean_time:.2f}x" if math.isfinite(staring_time) else "-")
        failed = f" ({entry['failed']} failed)" if entry["failed"] else ""
        cells += [entry["device"], f"{entry['cases']}{failed}", str(entry["vertebrae"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def short_table(table: Sequence[dict]) -> str:
    """DSC, rigid DSC, %Δvol and TRE only (for the per-source tables)."""
    columns = [c for c in TABLE_COLUMNS if c[0] in ("dice", "rigid_dice", "abs_volume_change_percent", "tre_mm")]
    header = ["Method", *[title for _, title, _, _ in columns], "Vertebrae"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        cells = [entry["method"]] + [_format(entry, c, fmt) for c, _, _, fmt in columns] + [str(entry["vertebrae"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- figures


def _short(name: str, width: int = 18) -> str:
    words, lines, line = name.replace("(", "").replace(")", "").split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines)


def plot_boxplots(run: BenchmarkRun, path: str | os.PathLike) -> Path:
    """Fig. 2-like boxplots of DSC, rigid DSC, |%Δvol| and TRE per method (one point per vertebra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = method_order(run)
    panels = (
        ("dice", "DSC"),
        ("rigid_dice", "rigid DSC"),
        ("abs_volume_change_percent", "|%Δvol|"),
        ("tre_mm", "vertebra TRE (mm)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 4.2))
    for ax, (column, title) in zip(axes, panels):
        data = []
        for method in methods:
            values = [_number(r.get(column)) for r in run.vertebra_rows if r["method"] == method]
            data.append([v for v in values if math.isfinite(v)] or [math.nan])
        ax.boxplot(data, showfliers=True, widths=0.6)
        ax.set_xticks(range(1, len(methods) + 1), [_short(m) for m in methods], rotation=60, ha="right", fontsize=7)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_panels(run: BenchmarkRun, path: str | os.PathLike, case_name: str = "") -> Path | None:
    """Fig. 3-like panels: axial (top) and sagittal (bottom) slices of the moving CT, then the fixed MR-like image with
    the true fixed labels (white) and each method's warped CT labels (colour) as contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = run.panels
    if "fixed|axial" not in panels:
        return None
    methods = [m for m in method_order(run) if f"{m}|axial" in panels]
    columns = 1 + len(methods)
    fig, axes = plt.subplots(2, columns, figsize=(2.3 * columns, 5.0), squeeze=False)
    for row, view in enumerate(("axial", "sagittal")):
        origin = "upper" if view == "axial" else "lower"
        moving = panels[f"moving|{view}"]
        low, high = np.percentile(moving, [1.0, 99.5])
        axes[row, 0].imshow(moving, cmap="gray", vmin=low, vmax=high, origin=origin)
        axes[row, 0].set_title("moving CT" if row == 0 else "", fontsize=8)
        fixed = panels[f"fixed|{view}"]
        truth = panels[f"truth|{view}"]
        for col, method in enumerate(methods, start=1):
            ax = axes[row, col]
            ax.imshow(fixed, cmap="gray", origin=origin)
            warped = panels[f"{method}|{view}"]
            for value in [v for v in np.unique(truth) if v > 0]:
                ax.contour(truth == value, levels=[0.5], colors="white", linewidths=0.6, origin=origin)
            for index, value in enumerate([v for v in np.unique(warped) if v > 0]):
                colour = plt.cm.tab10(index % 10)
                ax.contour(warped == value, levels=[0.5], colors=[colour], linewidths=0.9, origin=origin)
            if row == 0:
                ax.set_title(_short(method, 22), fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if case_name:
        fig.suptitle(f"{case_name}: fixed MR-like image, true labels (white), warped CT labels (colour)", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- markdown


def render_markdown(out_dir: str | os.PathLike, markdown_path: str | os.PathLike) -> Path:
    """Write the Markdown report from the files in ``out_dir`` (see the module docstring)."""
    out = Path(out_dir)
    md_path = Path(markdown_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    run = load_results(out)
    meta = read_json(out / RUN_JSON)
    speed = read_json(out / SPEED_JSON)
    rel = os.path.relpath(out, md_path.parent)
    contrasts = sorted({str(spec.get("contrast", "t1")).upper() for spec in meta.get("specs", [])}) or ["T1"]
    lines = ["# Benchmarks", ""]
    lines += [
        "Generated by `srr-benchmark` (do not edit by hand). Ground-truth CT/MR-like pairs: every case is a real or "
        f"procedural spine CT with its vertebra labels, and a synthetic {'/'.join(contrasts)}-weighted MR of the same "
        "anatomy after a known poly-rigid motion (`SpineRigidRegLib.data.synthesis`), so the true displacement and "
        "the true fixed labels are known. All methods run on the same pairs in the same run.",
        "",
    ]
    if (md_path.parent / TIERS_MARKDOWN).is_file():
        lines += [
            f"Pairs that look like the clinic (a real MR, clinical 2D acquisitions, the capture range): "
            f"[{TIERS_MARKDOWN}]({TIERS_MARKDOWN}).",
            "",
        ]
    if run.case_rows:
        lines += _results_section(run, meta, rel)
    if speed:
        lines += _speed_section(speed, rel)
    if meta:
        lines += _machine_section(meta)
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md_path


def _results_section(run: BenchmarkRun, meta: Mapping, rel: str) -> list[str]:
    table = summary_table(run)
    lines = ["## Table 1 (all cases)", ""]
    lines += [
        "Mean (SD). DSC, rigid DSC, %Δvol (absolute), PC metric and TRE are over all vertebrae of all cases; |J|≤0 "
        "voxels (whole field), SD log|J| (whole field), time and peak memory are over cases. TRE is the mean distance"
        " (mm) between the estimated and the true mapping over each vertebra. Time is the registration's wall-clock "
        "time (for our rows: pre-alignment + resampling + network (+ vertebra-wise rigid alignment, + dense "
        "refinement) + integration, without metrics and output writing; for elastix: registration + transformix "
        "deformation field). Peak memory is the peak increase of the process's resident memory during the method "
        "(CPU) or the peak CUDA allocation (GPU). Speed vs Staring = Staring's mean time / the row's mean time, "
        "measured in this run.",
        "",
        markdown_table(table),
        "",
    ]
    lines += [
        "Rows. *Initial*: the rigid pre-alignment alone (the paper's: a rigid fit of vertebra centre points; the "
        "MR's points are the centroids of the true fixed labels, standing in for the expert's points, the CT's are "
        "its label centroids). Every other row starts from that same pre-alignment. *Staring*: elastix B-spline "
        "registration with Mattes mutual information and `TransformRigidityPenalty` (linearity 100, orthonormality "
        "1, properness 2, as the model-zoo entry Par0004), the moving rigidity image being 1 inside the CT "
        "vertebrae, without a moving mask (with the pre-aligned CT's field of view as one it did worse here: DSC "
        "0.940, TRE 0.63 mm, 843 folding voxels); *elastix (no penalty)*: the same without the penalty. Deviations "
        "from Par0004 (see "
        "`SpineRigidRegLib/baselines/elastix.py`): 3 resolutions, the iterations below, adaptive stochastic "
        "gradient descent with automatic step sizes instead of hand-set gains, a constant penalty weight of 0.1 "
        "(Par0004 raises it to 4.0 at the last level, which froze the vertebrae here) and no dilation of the "
        "rigidity image (it would merge neighbouring vertebrae). *ours*: `pipeline.register` with the bundled or "
        "listed checkpoint: the network alone (also every listed checkpoint, as in the paper's Table 1), the "
        "default pipeline (network + vertebra-wise rigid alignment, `SpineRigidRegLib.polyrigid`), the default "
        "followed by dense test-time refinement (`SpineRigidRegLib.refine`), and the default given no MR points, "
        "so that it pre-aligns automatically (`prealign.automatic_prealignment`: the CT vertebrae's centroid brought "
        "into the MR's view, then a Mattes MI rigid registration; here MR and CT share their field of view, an easier "
        "start than most clinical pairs give it).",
        "",
    ]
    notes = list(dict.fromkeys(meta.get("notes", []) + run.notes))
    if notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    sources = sorted({r.get("source") for r in run.case_rows if r.get("source")})
    if len(sources) > 1:
        for source in sources:
            count = len({r["case"] for r in run.case_rows if r.get("source") == source})
            lines += [f"### {source} cases only ({count})", "", short_table(summary_table(run, [source])), ""]
    lines += [
        "## Figures",
        "",
        f"![boxplots]({rel}/{BOXPLOTS})",
        "",
        "Fig. 2-like: DSC, rigid DSC, |%Δvol| and vertebra TRE per method, one point per vertebra.",
        "",
        f"![panels]({rel}/{PANELS_PNG})",
        "",
        f"Fig. 3-like: axial (top) and sagittal (bottom) slices of case `{meta.get('panel_case', '?')}`.",
        "",
        f"Per-vertebra values: [`{VERTEBRA_CSV}`]({rel}/{VERTEBRA_CSV}); per case: [`{CASE_CSV}`]({rel}/{CASE_CSV}).",
        "",
    ]
    cases = meta.get("cases", [])
    if cases:
        lines += [
            "## Cases",
            "",
            "| case | source | seed | vertebrae | curvature (deg) | orientation | motion scale | MR contrast | "
            "grid (D, H, W) at 1 mm |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for case in cases:
            d = case.get("description", {})
            lines.append(
                f"| {case['name']} | {case['source']} | {case['seed']} | {d.get('vertebrae', '')} | "
                f"{d.get('curvature_deg', '')} | {d.get('orientation', '')} | {d.get('motion_scale', '')} | "
                f"{d.get('mr_contrast', 't1').upper()} | {' x '.join(str(g) for g in d.get('grid', []))} |"
            )
        lines.append("")
    settings = meta.get("settings", {})
    if settings:
        lines += ["## Settings", "", "```json", json.dumps(settings, indent=2, default=str), "```", ""]
    return lines


def _cpu_text(speed: Mapping) -> str:
    """``"<CPU>, "`` when the speed run recorded its CPU (runs before session 20 did not)."""
    return f"{speed['cpu']}, " if speed.get("cpu") else ""


def _speed_section(speed: Mapping, rel: str) -> list[str]:
    stages = speed.get("stages_s", {})
    lines = [
        "## Speed and memory of the pipeline (issues 4 and 16)",
        "",
        "Whole `srr-register` pipeline with its default settings (network + vertebra-wise rigid alignment, no "
        f"dense refinement) on a {' x '.join(str(s) for s in speed['input_shape'])} "
        f"(D, H, W) 1 mm phantom crop (processing grid {' x '.join(str(s) for s in speed['processing_grid'])}), "
        f"device {speed['device']} ({_cpu_text(speed)}{speed.get('threads')} torch threads, the networks' "
        f"arithmetic in {speed.get('network_arithmetic', 'float32')}), {speed.get('weights')}; {_runs(speed)}.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| pipeline wall-clock, all stages incl. outputs (s) | {speed['pipeline_s']:.2f} |",
        f"| registration only: all stages but `outputs` (s) | {speed.get('registration_s', math.nan):.2f} |",
    ]
    for key, value in stages.items():
        lines.append(f"| stage `{key}` (s) | {value:.2f} |")
    lines += [
        f"| pipeline peak memory increase (MB) | {speed.get('pipeline_peak_memory_mb', math.nan):.0f} |",
        f"| elastix + rigidity penalty, same pair (s) | {speed['elastix_s']:.1f} "
        f"({speed.get('elastix_threads')} threads, iterations {speed.get('elastix_iterations')}) |",
        f"| elastix peak memory increase (MB) | {speed.get('elastix_peak_memory_mb', math.nan):.0f} |",
        f"| speed-up vs elastix + penalty: whole pipeline / registration only | {speed['speedup_vs_elastix']:.1f}x"
        f" / {speed.get('registration_speedup_vs_elastix', math.nan):.1f}x |",
    ]
    grid = speed.get("grid_memory")
    if grid:
        lines.append(
            f"| network + integration at {' x '.join(str(g) for g in grid['grid'])} voxels: peak memory (MB) / "
            f"time (s) on {grid['device']} | {grid['peak_memory_mb']:.0f} / {grid['seconds']:.1f} |"
        )
    lines += _scenario_lines(speed)
    lines += [
        "",
        "The `outputs` stage warps the CT and its labels into the MR's geometry and computes the Jacobian map, the "
        "per-vertebra metrics and rigid fits (the inverse field is computed when it is written, by the command); "
        "elastix's time covers its registration and the deformation field only.",
        "",
        f"Command: `{speed.get('command', 'srr-benchmark --speed')}` ({speed.get('date_utc', '')}"
        f"{', commit ' + speed['git_commit'] if speed.get('git_commit') else ''}).",
        "",
    ]
    return lines


def _runs(speed: Mapping) -> str:
    """How each figure was timed: the fastest of several runs after a warm-up (elastix and the command too), or, in
    reports from before ``repeats`` was recorded, one run after a warm-up."""
    repeats = int(speed.get("repeats", 1))
    if repeats <= 1:
        return "one run after a warm-up"
    return f"the fastest of {repeats} runs after a warm-up, elastix's and the command's too (a shared machine)"


#: Stages shown per scenario (the rest are in speed.json).
SPEED_STAGES = ("mr_segmentation", "bias_field", "prealign", "preprocess", "network", "vertebra_rigid", "outputs")


def _scenario_lines(speed: Mapping) -> list[str]:
    """Issue 16's situations: registration time (load to result) against its goal, the stages, peak memory."""
    scenarios = speed.get("scenarios", [])
    if not scenarios:
        return []
    head = " | ".join(f"`{s}`" for s in SPEED_STAGES)
    lines = [
        "",
        f"Issue 16's situations (same process, {_runs(speed)}; registration = load to result, without writing "
        "files; goal: issue 16's target on 2 cores):",
        "",
        f"| situation | registration s | goal s | {head} | peak memory MB |",
        "|---|---|---|" + "---|" * len(SPEED_STAGES) + "---|",
    ]
    for row in scenarios:
        goal = "-" if row.get("goal_s") is None else f"{row['goal_s']:g}"
        stages = " | ".join(f"{row['stages_s'].get(s, 0.0):.2f}" for s in SPEED_STAGES)
        lines.append(
            f"| {row['name']} | {row['registration_s']:.2f} | {goal} | {stages} | {row['peak_memory_mb']:.0f} |"
        )
    if speed.get("command_s") is not None:
        lines.append(
            f"| the whole `srr-register --sample` command (new interpreter, imports, files written) | "
            f"{speed['command_s']:.2f} | {speed.get('command_goal_s', '-')} |" + " |" * len(SPEED_STAGES) + " |"
        )
    return lines


def _machine_section(meta: Mapping) -> list[str]:
    machine = meta.get("machine", {})
    lines = ["## Machine, versions and command", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    if meta.get("wall_time_s") is not None:
        lines += [f"Total wall-clock time of the run: {meta['wall_time_s'] / 60:.1f} min.", ""]
    lines += ["| item | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in machine.items()] + [""]
    return lines


def write_report(
    run: BenchmarkRun, out_dir: str | os.PathLike, markdown_path: str | os.PathLike, meta: Mapping | None = None
) -> dict[str, Path]:
    """Write the CSV files, ``run.json``, the figures and the Markdown report."""
    out = Path(out_dir)
    paths = write_results(run, out)
    if meta is not None:
        write_json({**meta, "notes": list(dict.fromkeys(list(meta.get("notes", [])) + run.notes))}, out / RUN_JSON)
    paths["boxplots"] = plot_boxplots(run, out / BOXPLOTS)
    meta_now = read_json(out / RUN_JSON)
    panel = plot_panels(run, out / PANELS_PNG, meta_now.get("panel_case", ""))
    if panel is not None:
        paths["panels_png"] = panel
    paths["markdown"] = render_markdown(out, markdown_path)
    return paths


def command_line() -> str:
    """The command that started this process, as typed (program name without its folder)."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


__all__ = [
    "command_line",
    "load_results",
    "machine_info",
    "markdown_table",
    "merge_results",
    "plot_boxplots",
    "plot_panels",
    "render_markdown",
    "summary_table",
    "write_report",
    "write_results",
]

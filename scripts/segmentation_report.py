"""Figures of the MR vertebra segmentation network, written to docs/MR_SEGMENTATION.md and its learning curve PNG.

    python scripts/segmentation_report.py --curve training/mr_vertebrae/curve.csv --cases 12 --threads 1

Reports (all with the bundled model, Resources/Models/mr_vertebrae.pt):
- Dice against label 19 ("vertebrae") of the real TotalSegmentator MR example (never trained on), and its runtime;
- Dice on the benchmark's synthetic MR images (T1 and T2, the cases of srr-benchmark);
- the bone-guided pre-alignment against the intensity (Mattes MI) automatic pre-alignment and the landmark one on the
  same cases: mean vertebra-centre error (mm) and time;
- the learning curve (synthetic validation Dice and real-MR Dice against training steps).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from SpineRigidRegLib.benchmark.cases import build_case, case_specs
from SpineRigidRegLib.benchmark.runner import case_prealignment, named_centroids
from SpineRigidRegLib.prealign import automatic_prealignment
from SpineRigidRegLib.segmentation.align import bone_prealignment
from SpineRigidRegLib.segmentation.predict import bundled_card, dice, load_bundled_segmentation, predict_bone

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def centre_error(pre, case) -> float:
    """Mean distance (mm) between the CT vertebra centroids and the MR ones mapped by ``pre``."""
    if pre is None:
        return float("nan")
    fixed, moving = named_centroids(case.fixed_labels), named_centroids(case.moving_labels)
    return float(np.mean([np.linalg.norm(pre.map_points(fixed[n][None])[0] - moving[n]) for n in fixed if n in moving]))


def real_mr(network) -> tuple[float, float]:
    folder = SHARED / "totalsegmentator-examples"
    mr = sitk.ReadImage(str(folder / "example_mr_sm.nii.gz"))
    truth = sitk.Cast(sitk.ReadImage(str(folder / "example_seg_mr.nii.gz")) == 19, sitk.sitkUInt8)
    start = time.perf_counter()
    probability = predict_bone(mr, network)
    return dice(probability, truth), time.perf_counter() - start


def benchmark_rows(network, cases: int, contrast: str) -> list[dict]:
    rows = []
    for spec in case_specs(cases, cases // 3, 0, contrast):
        case = build_case(spec, SHARED)
        start = time.perf_counter()
        probability = predict_bone(case.fixed, network)
        seg_s = time.perf_counter() - start
        row = {"case": case.name, "contrast": contrast, "dice": dice(probability, case.fixed_labels > 0)}
        row["segmentation_s"] = seg_s
        if contrast == "t1":
            start = time.perf_counter()
            bone = bone_prealignment(case.fixed, probability, case.moving_labels)
            row["bone_s"] = seg_s + time.perf_counter() - start
            row["bone_mm"] = centre_error(bone, case)
            start = time.perf_counter()
            row["mi_mm"] = centre_error(automatic_prealignment(case.fixed, case.moving, case.moving_labels), case)
            row["mi_s"] = time.perf_counter() - start
            row["landmarks_mm"] = centre_error(case_prealignment(case), case)
        rows.append(row)
        print(row, flush=True)
    return rows


def plot_curve(curve: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(curve, encoding="utf-8") as stream:
        rows = [r for r in csv.DictReader(stream)]
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [float(r["synthetic_dice"]) for r in rows], label="synthetic validation images")
    ax.plot(steps, [float(r["real_mr_dice"]) for r in rows], label="real MR example (never trained on)")
    extra = curve.parent / "cpu_continuations.csv"
    if extra.is_file():
        with open(extra, encoding="utf-8") as stream:
            cpu = list(csv.DictReader(stream))
        for run in sorted({r["run"] for r in cpu}):
            mine = [r for r in cpu if r["run"] == run]
            xs = [steps[-1]] + [int(r["step"]) for r in mine]
            ax.plot(
                xs,
                [float(rows[-1]["real_mr_dice"])] + [float(r["real_mr_dice"]) for r in mine],
                "--",
                marker="o",
                label=f"real MR, {run} (stopped)",
            )
    ax.set_xlabel("training step")
    ax.set_ylabel("vertebral bone Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curve", type=Path, default=ROOT / "training" / "mr_vertebrae" / "curve.csv")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "MR_SEGMENTATION.md")
    parser.add_argument("--plot-only", action="store_true", help="redraw the learning curve only")
    args = parser.parse_args()
    if args.plot_only:
        plot_curve(args.curve, args.out.parent / "mr_segmentation_curve.png")
        return
    torch.set_num_threads(args.threads)
    network = load_bundled_segmentation()
    card = bundled_card()
    real_dice, real_s = real_mr(network)
    t1 = benchmark_rows(network, args.cases, "t1")
    t2 = benchmark_rows(network, args.cases, "t2")
    plot_curve(args.curve, args.out.parent / "mr_segmentation_curve.png")
    mean = lambda rows, key: float(np.nanmean([r[key] for r in rows]))  # noqa: E731
    refused = sum(np.isnan(r["bone_mm"]) for r in t1)
    lines = [
        "# MR vertebra segmentation: measured figures",
        "",
        f"Written by `scripts/segmentation_report.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{args.threads} CPU thread(s)); model sha256 `{card['sha256'][:12]}...`, "
        f"{card['training']['steps']} training steps.",
        "",
        "| images | Dice (vertebral bone) | time per image s |",
        "|---|---|---|",
        f"| real MR example (TotalSegmentator, 3 mm axial, never trained on) | {real_dice:.3f} | {real_s:.2f} |",
        f"| benchmark cases, synthetic T1 ({len(t1)}) | {mean(t1, 'dice'):.3f} | {mean(t1, 'segmentation_s'):.2f} |",
        f"| benchmark cases, synthetic T2 ({len(t2)}) | {mean(t2, 'dice'):.3f} | {mean(t2, 'segmentation_s'):.2f} |",
        "",
        "Pre-alignment without MR points on the T1 benchmark cases: mean vertebra-centre error after the rigid map",
        "(mm) and time (s); `bone-guided` is the segmentation plus `segmentation.align` (opt-in,",
        "`srr-register --prealign-from-bone`), `intensity` the default automatic path (Mattes MI), `landmarks` the",
        "paper's fit to the MR's vertebra centres.",
        "",
        "| method | error mm | time s |",
        "|---|---|---|",
        f"| bone-guided (refused, fell back: {refused} of {len(t1)}) | {mean(t1, 'bone_mm'):.2f} | "
        f"{mean(t1, 'bone_s'):.2f} |",
        f"| intensity (Mattes MI) | {mean(t1, 'mi_mm'):.2f} | {mean(t1, 'mi_s'):.2f} |",
        f"| landmarks | {mean(t1, 'landmarks_mm'):.2f} | - |",
        "",
        "Per case:",
        "",
        "| case | Dice T1 | Dice T2 | bone-guided mm | intensity mm | landmarks mm |",
        "|---|---|---|---|---|---|",
    ]
    for a, b in zip(t1, t2, strict=True):
        lines.append(
            f"| {a['case']} | {a['dice']:.3f} | {b['dice']:.3f} | {a['bone_mm']:.2f} | {a['mi_mm']:.2f} | "
            f"{a['landmarks_mm']:.2f} |"
        )
    lines += ["", "![learning curve](mr_segmentation_curve.png)", ""]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

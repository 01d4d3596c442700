"""Plot the label-guided registration network's learning curve (issue 19, step 2) from its committed run folder.

.venv/bin/python scripts/label_guided_curve.py            # training/label_guided -> docs/label_guided_curve.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict[str, float]]:
    with open(path, encoding="utf-8") as stream:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(stream)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "training" / "label_guided")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "label_guided_curve.png")
    args = parser.parse_args()
    train, valid = _rows(args.run / "train.csv"), _rows(args.run / "validation.csv")
    identity = _rows(args.run / "validation_identity.csv")[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    left.plot(steps, [1 - r["label_dice"] for r in train], lw=0.8, label="training pairs: soft label Dice")
    left.plot([r["step"] for r in valid], [r["dice"] for r in valid], "o-", label="validation DSC")
    left.axhline(identity["dice"], color="grey", ls="--", label="validation DSC, identity")
    left.set_xlabel("step (batch 1, 48^3 at 2 mm)")
    left.set_ylim(0.6, 1.0)
    left.legend(fontsize=8)
    right.plot([r["step"] for r in valid], [r["rigid_dice"] for r in valid], "o-", label="validation rigid DSC")
    twin = right.twinx()
    twin.plot([r["step"] for r in valid], [r["abs_volume_change_percent"] for r in valid], "s-", color="tab:red")
    twin.set_ylabel("|%Δvol| (red)")
    right.set_xlabel("step")
    right.legend(fontsize=8, loc="lower left")
    fig.suptitle("Label-guided registration network on one CPU thread (training/label_guided)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

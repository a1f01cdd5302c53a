"""What each finished point of an audit measured, and the summary line that a researcher quotes.

A point's figures come from its training run: ``metrics.json`` (test sequence accuracy, wall
time from process start, so data decoding counts; a resumed run leaves its downtime out) and
``test_predictions.csv`` (each test image's confidence, for the accuracy at a coverage and the
calibration).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from captcha_lit.studies.grid import Point
from captcha_lit.viz import analysis

RESULT_COLUMNS = ("labels", "variant", "test_seq_acc", "seq_acc_at_coverage", "calibration_error", "train_minutes",
                  "steps", "run_dir")


@dataclass
class PointResult:
    point: Point
    run_dir: Path
    seq_acc: float | None
    wall_time_s: float | None
    steps: int | None
    machine: str | None
    predictions: list[dict] = field(default_factory=list)  # test_predictions.csv: text, prediction, confidence, right
    covered_acc: float | None = None  # accuracy of the most confident answers (the audit's coverage)
    calibration_error: float | None = None  # expected calibration error of the test answers

    @property
    def minutes(self) -> float | None:
        return self.wall_time_s / 60 if self.wall_time_s is not None else None

    def row(self) -> dict:
        return {"labels": self.point.labels, "variant": self.point.variant, "test_seq_acc": _rounded(self.seq_acc),
                "seq_acc_at_coverage": _rounded(self.covered_acc), "calibration_error": _rounded(self.calibration_error),
                "train_minutes": round(self.minutes, 2) if self.minutes is not None else None, "steps": self.steps,
                "run_dir": str(self.run_dir)}


def _rounded(value: float | None) -> float | None:
    return round(value, 6) if value is not None else None  # more digits than a test split resolves


def read_result(point: Point, sweep_dir: Path, coverage: float) -> PointResult:
    run_dir = sweep_dir / point.dirname
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = PointResult(point, run_dir, metrics.get("test/seq_acc"), metrics.get("wall_time_s"),
                         metrics.get("global_step"), metrics.get("machine"))
    predictions = run_dir / "test_predictions.csv"
    if predictions.is_file():
        with open(predictions, newline="") as handle:
            result.predictions = [{**row, "confidence": float(row["confidence"]), "right": row["right"] == "True"}
                                  for row in csv.DictReader(handle)]
        confidences = [row["confidence"] for row in result.predictions]
        right = [row["right"] for row in result.predictions]
        result.covered_acc = analysis.accuracy_at_coverage(confidences, right, coverage)
        result.calibration_error = analysis.reliability(confidences, right).expected_calibration_error
    return result


def headline(results: Sequence[PointResult], target: float) -> tuple[PointResult, bool]:
    """The point the summary names, and whether it reads ``target``: the fewest labels (then the least
    time) that read at least ``target`` of the test split, or else the most accurate point."""
    scored = [r for r in results if r.seq_acc is not None]
    if not scored:
        raise ValueError("no point of the audit has a test accuracy: its runs must test (test=true)")
    reached = [r for r in scored if r.seq_acc >= target]
    if reached:
        return min(reached, key=lambda r: (r.point.labels, r.wall_time_s or 0.0)), True
    return max(scored, key=lambda r: (r.seq_acc, -r.point.labels, -(r.wall_time_s or 0.0))), False


def summary_line(result: PointResult, reached: bool, target: float, coverage: float, num_train: int,
                 machine: str) -> str:
    """E.g. "95.2% of this scheme's CAPTCHAs are read with 100 labels after 2.5 minutes of training on
    AMD EPYC 7B13, 2 cores, 8 GiB"."""
    labels = f"all {num_train} labels" if result.point.labels == num_train else f"{result.point.labels} labels"
    minutes = f"{result.minutes:.1f} minutes" if result.minutes is not None else "an unrecorded time"
    where = result.machine or machine
    if reached:
        line = f"{result.seq_acc:.1%} of this scheme's CAPTCHAs are read with {labels} after {minutes} of training on {where}"
    else:
        line = (f"No point of the grid reads {target:.0%}; the best reads {result.seq_acc:.1%} of this scheme's "
                f"CAPTCHAs, with {labels} after {minutes} of training on {where}")
    if result.point.variant:
        line += f" ({result.point.variant})"
    if result.covered_acc is not None:
        line += (f". Answering only the {coverage:.0%} of CAPTCHAs it is surest of, it is right "
                 f"{result.covered_acc:.1%} of the time")
    return line + "."

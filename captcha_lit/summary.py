"""Collect the jobs of a sweep into one table: each job's overrides and final metrics.

Used by Hydra at the end of a multirun (``SweepSummaryCallback``, configured in
conf/hydra/default.yaml) and by ``python -m captcha_lit.summary SWEEP_DIR``.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("test/seq_acc", "test/char_acc", "test/cer", "test/loss", "val/seq_acc_best",
                  "wall_time_s", "train_images_per_s")


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per job directory (those with .hydra/overrides.yaml), finished or not."""
    rows = []
    for overrides_file in sorted(Path(sweep_dir).glob("*/.hydra/overrides.yaml"),
                                 key=lambda p: (len(p.parent.parent.name), p.parent.parent.name)):
        job_dir = overrides_file.parent.parent
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        row: dict = {"job": job_dir.name, "overrides": " ".join(overrides)}
        metrics_file = job_dir / "metrics.json"
        if metrics_file.exists():
            metrics = json.loads(metrics_file.read_text())
            row["status"] = "done"
            row.update({k: metrics.get(k) for k in METRIC_COLUMNS})
            row["best_ckpt"] = metrics.get("best_ckpt")
        else:
            row["status"] = "unfinished"
        rows.append(row)
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def to_markdown(rows: list[dict]) -> str:
    columns = ["job", "overrides", "status", *METRIC_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path) -> list[dict]:
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    columns = ["job", "overrides", "status", *METRIC_COLUMNS, "best_ckpt"]
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(to_markdown(rows))
    return rows


class SweepSummaryCallback(Callback):
    """Hydra callback: writes summary.csv and summary.md into the sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        rows = write_summary(sweep_dir)
        log.info("sweep summary of %d jobs: %s", len(rows), sweep_dir / "summary.md")
        print(to_markdown(rows))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m captcha_lit.summary SWEEP_DIR")
    if not Path(sys.argv[1]).is_dir():
        sys.exit(f"error: {sys.argv[1]!r} is not a directory")
    print(to_markdown(write_summary(sys.argv[1])), end="")

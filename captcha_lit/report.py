"""A sweep's report: every job's overrides and final metrics, best first.

    python -m captcha_lit.report SWEEP_DIR                        # sorted by the sweep's optimized metric
    python -m captcha_lit.report SWEEP_DIR --sort test/seq_acc    # ...or by another column

Prints the table as markdown and writes it to ``summary.md`` and ``summary.csv`` in the
sweep directory. Hydra does the same at the end of every multirun (``SweepSummaryCallback``,
configured in conf/hydra/default.yaml), with any sweeper or launcher. The rows are sorted by
the sweep's ``optimized_metric`` (``val/seq_acc_best`` unless the sweep set another), in the
sweeper's direction; unfinished jobs come last. The markdown table has a column for each
override that differs between jobs and lists the shared ones above it; the CSV has a column
for every override. After an Optuna search it also prints the best parameters
(``optimization_results.yaml``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("test/seq_acc", "test/char_acc", "test/cer", "test/loss", "val/seq_acc_best", "epochs",
                  "wall_time_s", "train_images_per_s")
DEFAULT_METRIC = "val/seq_acc_best"
# Metrics where lower is better, when the sweep does not say which way it optimized.
_LOWER_IS_BETTER = ("loss", "cer", "time", "wall")


def _job_key(job_dir: Path) -> tuple:
    return len(job_dir.name), job_dir.name  # numeric order: 2 before 10


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per job directory (those with .hydra/overrides.yaml), finished or not, in job order."""
    rows = []
    for overrides_file in sorted(Path(sweep_dir).glob("*/.hydra/overrides.yaml"), key=lambda p: _job_key(p.parents[1])):
        job_dir = overrides_file.parents[1]
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        row: dict = {"job": job_dir.name, "overrides": " ".join(overrides),
                     "params": dict(o.split("=", 1) if "=" in o else (o, "") for o in overrides)}
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


def sweep_objective(sweep_dir: str | Path) -> tuple[str, bool]:
    """(metric, higher_is_better) of the sweep: its optimized_metric and the sweeper's direction."""
    config_file = Path(sweep_dir) / "multirun.yaml"
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.exists() else {}
    metric = config.get("optimized_metric") or DEFAULT_METRIC
    direction = ((config.get("hydra") or {}).get("sweeper") or {}).get("direction")
    if isinstance(direction, str):
        return metric, direction.lower() != "minimize"
    return metric, not any(word in metric for word in _LOWER_IS_BETTER)


def sort_rows(rows: list[dict], metric: str, higher_is_better: bool = True) -> list[dict]:
    """Best first; rows without the metric (unfinished jobs) last, in job order."""
    def key(row: dict):
        value = row.get(metric)
        if not isinstance(value, (int, float)):
            return (1, 0.0)
        return (0, -value if higher_is_better else value)

    return sorted(rows, key=key)  # stable: ties keep job order


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _columns(metric: str) -> list[str]:
    return [metric, *(c for c in METRIC_COLUMNS if c != metric)]


def to_markdown(rows: list[dict], metric: str = DEFAULT_METRIC) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row["params"]))
    varying = [k for k in keys if len({row["params"].get(k) for row in rows}) > 1]
    shared = [f"{k}={rows[0]['params'][k]}" if rows[0]["params"][k] else k for k in keys if k not in varying]
    head = ["job", "status", *_columns(metric)]
    lines = [f"overrides of every job: {' '.join(shared)}", ""] if shared and len(rows) > 1 else []
    lines += ["| " + " | ".join(head + varying) + " |", "|" + "---|" * len(head + varying)]
    for row in rows:
        cells = [_fmt(row.get(c)) for c in head] + [row["params"].get(k, "") for k in varying]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: str | Path, metric: str = DEFAULT_METRIC) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row["params"]))
    columns = ["job", "status", *_columns(metric), *keys, "overrides", "best_ckpt"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row["params"], **row} for row in rows)


def optuna_best(sweep_dir: str | Path) -> str | None:
    """The Optuna sweeper's best trial, from optimization_results.yaml, as one line."""
    results_file = Path(sweep_dir) / "optimization_results.yaml"
    if not results_file.exists():
        return None
    results = yaml.safe_load(results_file.read_text()) or {}
    params = " ".join(f"{k}={v}" for k, v in (results.get("best_params") or {}).items())
    return f"optuna best: {_fmt(results.get('best_value'))} with {params}"


def write_report(sweep_dir: str | Path, sort: str | None = None, ascending: bool | None = None) -> tuple[list[dict], str]:
    """Collect and sort the sweep's jobs, write summary.csv and summary.md; return the rows and the text."""
    sweep_dir = Path(sweep_dir)
    metric, higher_is_better = sweep_objective(sweep_dir)
    if sort is not None:
        metric, higher_is_better = sort, not any(word in sort for word in _LOWER_IS_BETTER)
    if ascending is not None:
        higher_is_better = not ascending
    rows = sort_rows(collect(sweep_dir), metric, higher_is_better)
    write_csv(rows, sweep_dir / "summary.csv", metric)
    text = to_markdown(rows, metric) if rows else "no jobs found\n"
    (sweep_dir / "summary.md").write_text(text)
    best = optuna_best(sweep_dir)
    done = sum(row["status"] == "done" for row in rows)
    text = (f"{sweep_dir}: {len(rows)} job(s), {done} finished, sorted by {metric} "
            f"({'highest' if higher_is_better else 'lowest'} first)\n\n" + text + (f"\n{best}\n" if best else ""))
    return rows, text


class SweepSummaryCallback(Callback):
    """Hydra callback: writes summary.csv and summary.md into the sweep directory and prints the table."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        rows, text = write_report(sweep_dir)
        log.info("sweep summary of %d jobs: %s", len(rows), sweep_dir / "summary.md")
        print(text, end="")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m captcha_lit.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a multirun directory, e.g. outputs/multirun/train/<time>")
    parser.add_argument("--sort", help="the column to sort by (default: the sweep's optimized_metric)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--ascending", action="store_true", default=None, help="lowest first")
    order.add_argument("--descending", dest="ascending", action="store_false", help="highest first")
    args = parser.parse_args(argv)
    if not Path(args.sweep_dir).is_dir():
        sys.exit(f"error: {args.sweep_dir!r} is not a directory; pass a sweep directory such as "
                 "outputs/multirun/train/<time>")
    _, text = write_report(args.sweep_dir, sort=args.sort, ascending=args.ascending)
    print(text, end="")


if __name__ == "__main__":
    main()

"""Benchmark results as data: rows of ``benchmark,metric,value,seeds,date,commit,machine,command``.

Each benchmark writes one row per metric and run, then one row per metric for the median:

- a run's row: ``seeds`` is that run's seed (``run=R`` for the R-th timing repeat of a benchmark
  that has no seed), and ``command`` reproduces that run alone where one can;
- a median row: ``seeds`` lists the seeds of every run that went into it (``42 43 44``; empty
  for timing repeats), and ``command`` is the ``python -m captcha_lit.bench`` line that measures
  it again.

Metric names carry no run or median suffix: the ``seeds`` column says which row is which.
"""

from __future__ import annotations

import csv
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from captcha_lit.bench.common import ROOT
from captcha_lit.bench.speed import INT8_FIGURES
from captcha_lit.bench.training import TRAINING, VAL_MINUTES
from captcha_lit.utils import machine_description

COLUMNS = ("benchmark", "metric", "value", "seeds", "date", "commit", "machine", "command")


class ResultsFileError(ValueError):
    """A results CSV that is missing or is not in the COLUMNS format."""


@dataclass(frozen=True)
class Provenance:
    date: str  # YYYY-MM-DD
    commit: str  # short hash, "+dirty" with uncommitted changes, empty outside a git checkout
    machine: str


def git_commit(repo: Path = ROOT) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def current_provenance() -> Provenance:
    return Provenance(date=time.strftime("%Y-%m-%d"), commit=git_commit(), machine=machine_description())


def _text(value) -> str:
    # Six significant digits are more than any of these measurements resolve, and keep float32
    # noise (0.9934999942779541) out of the file.
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class _RowCollector:
    def __init__(self, provenance: Provenance):
        self.provenance = provenance
        self.rows: list[dict] = []

    def add(self, benchmark: str, metric: str, value, seeds: str, command: str) -> None:
        if value is None:  # not measured (a failed run, or a timeline that ended before 15 min)
            return
        self.rows.append({"benchmark": benchmark, "metric": metric, "value": _text(value), "seeds": seeds,
                          "date": self.provenance.date, "commit": self.provenance.commit,
                          "machine": self.provenance.machine, "command": command})

    def timing_repeats(self, benchmark: str, runs: list[dict], metrics: dict[str, str], command: str,
                       medians: dict) -> None:
        """Unseeded repeats: ``metrics`` maps a metric name to the key of its value in each run
        and in ``medians``."""
        for index, run in enumerate(runs):
            for metric, key in metrics.items():
                self.add(benchmark, metric, run.get(key), f"run={index}", command)
        for metric, key in metrics.items():
            self.add(benchmark, metric, medians.get(key), "", command)

    def seeded_runs(self, benchmark: str, runs: list[dict], metrics: dict[str, str], command: str,
                    medians: dict) -> None:
        """Runs that differ in their seed; ``medians`` holds ``median_<key>`` for each metric."""
        ok = [run for run in runs if "error" not in run]
        for run in ok:
            for metric, key in metrics.items():
                self.add(benchmark, metric, run.get(key), str(run["seed"]), run.get("command") or command)
        seeds = " ".join(str(run["seed"]) for run in ok)
        for metric, key in metrics.items():
            self.add(benchmark, metric, medians.get(f"median_{key}"), seeds, command)


TRAINING_METRICS = {"test_seq_acc": "test_seq_acc", "test_char_acc": "test_char_acc", "wall_time_s": "wall_s",
                    "peak_rss_gb": "peak_rss_gb", "peak_pss_gb": "peak_pss_gb", "train_img_s": "train_img_s",
                    **{f"val_seq_acc_at_{minutes}min": f"val_seq_acc_at_{minutes}min" for minutes in VAL_MINUTES}}


def _throughput_rows(rows: _RowCollector, result: dict, command: str) -> None:
    for label, model in result.items():
        prefix = "" if label == "default" else f"{label}_"
        metrics = {f"{prefix}train_img_s_fp32": "train_fp32_img_s", f"{prefix}infer_img_s": "infer_img_s_b256"}
        if model["precision"].startswith("bf16"):  # otherwise the config's own run was fp32 as well
            metrics = {f"{prefix}train_img_s_bf16": "train_img_s", **metrics}
        rows.timing_repeats("throughput", model.get("runs", []), metrics, command, model)


def _http_rows(rows: _RowCollector, result: dict, command: str) -> None:
    for name, setup in result.items():
        if "error" in setup:
            continue
        prefix = "" if name == "default" else f"{name}_"
        runs = [run for run in setup["runs"] if "error" not in run]
        metrics = {f"{prefix}{key}": key for key in ("p50_ms", "p99_ms", "req_s")}
        rows.timing_repeats("http", runs, metrics, command, setup)


def _stream_rows(rows: _RowCollector, result: dict, command: str) -> None:
    for name, setup in result.items():
        if not isinstance(setup, dict):
            continue
        suffix = "" if name.startswith("streaming") else "_cached"
        runs = [{"wait_pct": None if run["wait_fraction"] is None else round(run["wait_fraction"] * 100, 2),
                 "img_s": run["img_s"]} for run in setup["runs"]]
        wait = setup["median_wait_fraction"]
        medians = {"wait_pct": None if wait is None else round(wait * 100, 2), "img_s": setup["median_img_s"]}
        rows.timing_repeats("stream", runs, {f"data_wait_pct{suffix}": "wait_pct", f"train_img_s{suffix}": "img_s"},
                            command, medians)


def _labels_rows(rows: _RowCollector, result: dict, command: str) -> None:
    from captcha_lit.bench.training import LABEL_COUNTS, SELF_TRAINING_LABELS

    if "error" in result:
        return
    prefix = f"labels_{result['dataset']}"
    for labels in LABEL_COUNTS:
        benchmark = f"{prefix}_{labels}"
        rows.seeded_runs(benchmark, result[f"{labels}"]["runs"], {"test_seq_acc": "test_seq_acc",
                         "wall_time_s": "wall_s", "test_ece": "test_ece"}, command, result[f"{labels}"])
        rows.seeded_runs(benchmark, result[f"{labels}_scratch"]["runs"], {"test_seq_acc_scratch": "test_seq_acc"},
                         command, result[f"{labels}_scratch"])
        rows.add(benchmark, "pretrain_s", result["median_pretrain_s"], "", command)
    benchmark, with_unlabeled = f"{prefix}_{SELF_TRAINING_LABELS}_unlabeled", result[f"{SELF_TRAINING_LABELS}_unlabeled"]
    rows.seeded_runs(benchmark, with_unlabeled["runs"], {"test_seq_acc": "test_seq_acc", "wall_time_s": "wall_s"},
                     command, with_unlabeled)
    rows.seeded_runs(benchmark, result[f"{SELF_TRAINING_LABELS}"]["runs"], {"test_seq_acc_labels_only": "test_seq_acc"},
                     command, result[f"{SELF_TRAINING_LABELS}"])


def result_rows(key: str, result: dict, command: str, provenance: Provenance) -> list[dict]:
    """The rows of ``result``, what the benchmark ``key`` (an ``--only`` name) returned, measured
    again by ``command``."""
    rows = _RowCollector(provenance)
    if key == "gen":
        metrics = {"single_core_img_s": "single_core_img_s", "all_cores_img_s": "all_cores_img_s"}
        rows.timing_repeats("generation", result.get("runs", []), metrics, command, result)
        rows.add("generation", "speedup", result["speedup"], "", command)
    elif key == "load":
        rows.timing_repeats("cache_load", result.get("runs", []), {"load_s": "load_s"}, command, result)
    elif key == "throughput":
        _throughput_rows(rows, result, command)
    elif key == "onnx":
        metrics = {"infer_img_s": "onnx_img_s_b256", "torch_infer_img_s": "torch_img_s_b256",
                   "solve_p50_ms": "solve_p50_ms", "solve_p99_ms": "solve_p99_ms"}
        rows.timing_repeats("onnx", result.get("runs", []), metrics, command, result)
        _http_rows(rows, result.get("http") or {}, command)
    elif key == "hostile_load" and "error" not in result:
        for metric in ("p50_ms", "p99_ms", "errors", "req_s", "rss_growth_pct"):
            rows.add("hostile_load", metric, result[metric], "", command)
        rows.add("hostile_load", "attack_requests", result["attack"]["requests"], "", command)
        rows.add("hostile_load", "slow_max_close_s", result["slow"]["max_close_s"], "", command)
        rows.add("hostile_load", "slow_still_open", result["slow"]["still_open"], "", command)
    elif key in TRAINING:
        rows.seeded_runs(TRAINING[key].benchmark, result["runs"], TRAINING_METRICS, command, result)
    elif key == "ddp":
        for setup, suffix in (("two_processes", ""), ("one_process", "_1proc")):
            metrics = {f"{metric}{suffix}": metric for metric in ("test_seq_acc", "test_char_acc", "train_img_s")}
            metrics[f"wall_time_s{suffix}"] = "wall_s"
            rows.seeded_runs("ddp", result[setup]["runs"], metrics, command, result[setup])
    elif key == "stream":
        _stream_rows(rows, result, command)
    elif key == "labels":
        _labels_rows(rows, result, command)
    elif key == "audit" and "error" not in result:
        metrics = {"wall_time_s": "wall_s", "peak_rss_gb": "peak_rss_gb", "peak_pss_gb": "peak_pss_gb",
                   "points": "points", "target": "target", "fewest_labels": "fewest_labels",
                   "fewest_labels_seq_acc": "fewest_labels_seq_acc", "all_labels_seq_acc": "all_labels_seq_acc"}
        for metric, name in metrics.items():
            rows.add(f"audit_{result['dataset']}", metric, result[name], "", command)
    elif key == "parity" and "error" not in result:
        for metric in ("text_agreement", "text_mismatches", "max_abs_logit_diff", "torch_seq_acc", "onnx_seq_acc"):
            rows.add("parity", metric, result[metric], "", command)
    elif key == "int8" and "error" not in result:
        for metric in INT8_FIGURES:
            rows.add("int8", metric, result[metric], "", command)
    return rows.rows


def check_columns(path: Path) -> None:
    """Raise ResultsFileError unless ``path`` starts with the COLUMNS header."""
    with open(path, newline="") as file:
        header = next(csv.reader(file), [])
    if tuple(header) != COLUMNS:
        raise ResultsFileError(f"{path}: columns are {','.join(header) or '(none)'!r}, expected "
                               f"{','.join(COLUMNS)!r}; pass a CSV written by python -m captcha_lit.bench")


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append to the CSV at ``path``, writing the header first if the file is new."""
    new = not path.is_file() or path.stat().st_size == 0
    if not new:
        check_columns(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise ResultsFileError(f"{path}: no such file; pass a results CSV, e.g. --table outputs/bench/results.csv")
    check_columns(path)
    rows = []
    with open(path, newline="") as file:
        reader = csv.reader(file)
        next(reader)
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(COLUMNS):
                raise ResultsFileError(f"{path}, line {reader.line_num}: {len(fields)} fields, expected "
                                       f"{len(COLUMNS)} ({','.join(COLUMNS)})")
            rows.append(dict(zip(COLUMNS, fields)))
    return rows


def _is_timing_repeat(row: dict) -> bool:
    return row["seeds"].startswith("run=")


def current_figures(rows: list[dict]) -> dict[str, list[dict]]:
    """benchmark -> its median rows from the newest run of it, benchmarks in the file's order.

    The newest run is the last median row's date, commit, machine and command; a seeded run's own
    rows carry the command of that one run, and timing repeats ``seeds=run=R``, so neither
    matches a median row's."""
    medians = [row for row in rows if not _is_timing_repeat(row)]
    newest: dict[str, tuple] = {}
    for row in medians:
        newest[row["benchmark"]] = (row["date"], row["commit"], row["machine"], row["command"])
    figures: dict[str, dict[str, dict]] = {}
    for row in medians:
        benchmark = row["benchmark"]
        if (row["date"], row["commit"], row["machine"], row["command"]) == newest[benchmark]:
            figures.setdefault(benchmark, {})[row["metric"]] = row  # the last one of a metric wins
    return {benchmark: list(by_metric.values()) for benchmark, by_metric in figures.items()}

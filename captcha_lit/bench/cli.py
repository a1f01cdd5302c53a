"""``make bench``: the project's accuracy and speed targets, measured on this machine.

    python -m captcha_lit.bench                         # everything (about 2 hours on 2 cores)
    python -m captcha_lit.bench --only gen,load,throughput --repeats 5
    python -m captcha_lit.bench --only train_default --train-repeats 3
    python -m captcha_lit.bench --only train_previous_commit --train-repeats 3  # the default of an older commit
    python -m captcha_lit.bench --only onnx --http-seconds 10
    python -m captcha_lit.bench --only parity --ckpt outputs/train/runs/<time>/checkpoints/<best>.ckpt
    python -m captcha_lit.bench --only labels --train-repeats 3  # 100/50 labels, 25 + unlabeled, vs. scratch
    python -m captcha_lit.bench --only audit                # the audit of captcha_images_v2, fresh cache
    python -m captcha_lit.bench --only ddp --train-repeats 3 # 1 process vs DDP with 2 (gloo), equal samples
    python -m captcha_lit.bench --only stream --repeats 3    # time the trainer waits for streamed data
    python -m captcha_lit.bench --table                 # the README's results table from docs/results.csv
    python -m captcha_lit.bench --table outputs/bench/results.csv

Each figure is the median over repeats, next to a baseline measured in the same run.
Training repeats differ in their weight seed (repeat 0 is the config as shipped).
Results go to outputs/bench/<time>/results.json and table.md, and are printed; every run also
appends its rows (benchmark,metric,value,seeds,date,commit,machine,command: one per metric and
run, and one for the median) to outputs/bench/results.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from captcha_lit.bench.common import ROOT
from captcha_lit.bench.data import bench_cache_load, bench_generation, bench_stream
from captcha_lit.bench.hostile_load import bench_hostile_load
from captcha_lit.bench.results import (ResultsFileError, append_rows, check_columns, current_figures,
                                       current_provenance, read_rows, result_rows)
from captcha_lit.bench.speed import bench_int8, bench_onnx, bench_parity, bench_throughput, newest_checkpoint
from captcha_lit.bench.tables import current_results_table, run_table
from captcha_lit.bench.training import TRAINING, bench_audit, bench_ddp, bench_labels, bench_training

ALL_BENCHMARKS = ("gen", "load", "throughput", "onnx", "hostile_load", *TRAINING, "ddp", "stream", "labels",
                  "audit", "parity", "int8")
DEFAULT_RESULTS_CSV = ROOT / "docs" / "results.csv"

# The flags each benchmark reads: its rows' command repeats them, and only them.
_FLAGS = {"gen": ("repeats", "gen_images"), "load": ("repeats", "load_images"), "throughput": ("repeats",),
          "onnx": ("repeats", "http_seconds", "http_clients"), "hostile_load": ("http_seconds", "http_clients"),
          **{key: ("train_repeats",) for key in TRAINING},
          "ddp": ("train_repeats", "ddp_samples", "ddp_epochs"),
          "stream": ("repeats", "stream_batches", "stream_workers"), "labels": ("train_repeats",), "audit": (), "parity": ("ckpt",),
          "int8": ("ckpt", "repeats")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m captcha_lit.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(ALL_BENCHMARKS),
                        help=f"comma-separated subset of: {', '.join(ALL_BENCHMARKS)} (default: all of them)")
    parser.add_argument("--ckpt", default=None, help="checkpoint of the parity benchmark (default: this run's "
                        "train_default model, else the newest trained one under outputs/train)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the quick benchmarks")
    parser.add_argument("--train-repeats", type=int, default=1,
                        help="repeats of each full training run (train_*: up to 20 min each; ddp: ~3 min per setup)")
    parser.add_argument("--gen-images", type=int, default=3000)
    parser.add_argument("--load-images", type=int, default=100_000)
    parser.add_argument("--http-seconds", type=float, default=30.0,
                        help="length of the HTTP load test in the onnx benchmark (0 skips it)")
    parser.add_argument("--http-clients", type=int, default=16, help="concurrent clients of the HTTP load test")
    parser.add_argument("--ddp-samples", type=int, default=20_000, help="training samples per epoch of --only ddp")
    parser.add_argument("--ddp-epochs", type=int, default=3, help="epochs of each --only ddp run")
    parser.add_argument("--stream-batches", type=int, default=60, help="training batches timed by --only stream")
    parser.add_argument("--stream-workers", type=int, default=2, help="DataLoader workers generating the stream")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench"),
                        help="folder of the run folders and of results.csv")
    parser.add_argument("--table", nargs="?", const=str(DEFAULT_RESULTS_CSV), default=None, metavar="CSV",
                        help="print the current-results markdown table (the newest median of each benchmark) "
                             f"from a results CSV (default: {DEFAULT_RESULTS_CSV.relative_to(ROOT)}) and exit")
    return parser


def bench_command(key: str, args: argparse.Namespace, result: dict) -> str:
    """The command line that measures benchmark ``key`` again with this run's settings."""
    words = ["python", "-m", "captcha_lit.bench", "--only", key]
    for flag in _FLAGS[key]:
        value = result.get("ckpt") if flag == "ckpt" else getattr(args, flag)
        if value is not None:
            words += [f"--{flag.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(words)


def _run_benchmark(key: str, args: argparse.Namespace, out_dir: Path, results: dict) -> dict:
    if key == "gen":
        return bench_generation(args.repeats, args.gen_images)
    if key == "load":
        return bench_cache_load(args.repeats, args.load_images)
    if key == "throughput":
        return bench_throughput(args.repeats)
    if key == "onnx":
        return bench_onnx(args.repeats, args.http_seconds, args.http_clients)
    if key == "hostile_load":
        return bench_hostile_load(args.http_seconds, args.http_clients)
    if key in TRAINING:
        recipe = TRAINING[key]
        return bench_training(key.removeprefix("train_"), recipe.overrides, args.train_repeats, out_dir, recipe.commit)
    if key == "ddp":
        return bench_ddp(args.train_repeats, args.ddp_samples, args.ddp_epochs, out_dir)
    if key == "stream":
        return bench_stream(args.repeats, args.stream_batches, args.stream_workers)
    if key == "labels":
        return bench_labels(args.train_repeats, out_dir)
    if key == "audit":
        return bench_audit(out_dir)
    if key in ("parity", "int8"):
        ckpt = args.ckpt
        if ckpt is None and "train_default" in results:
            ckpt = next((run["best_ckpt"] for run in results["train_default"]["runs"] if run.get("best_ckpt")), None)
        if key == "int8":
            return bench_int8(ckpt or newest_checkpoint(), out_dir, args.repeats)
        return bench_parity(ckpt or newest_checkpoint(), out_dir)
    raise ValueError(f"unknown benchmark {key!r}; choose from {', '.join(ALL_BENCHMARKS)}")


def _print_table(csv_path: Path) -> None:
    print(current_results_table(current_figures(read_rows(csv_path))), end="")


def main(argv: list[str] | None = None) -> dict | None:
    """Run the benchmarks ``argv`` selects and return their results (``None`` with ``--table``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.table is not None:
            _print_table(Path(args.table))
            return None
        return _run_selected(parser, args)
    except ResultsFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_selected(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(wanted) - set(ALL_BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_BENCHMARKS)}")
    csv_path = Path(args.out) / "results.csv"
    if csv_path.is_file() and csv_path.stat().st_size:
        check_columns(csv_path)  # before hours of benchmarks, not after
    out_dir = Path(args.out) / time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    provenance = current_provenance()
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                 "description": provenance.machine}}
    for key in (name for name in ALL_BENCHMARKS if name in wanted):
        results[key] = _run_benchmark(key, args, out_dir, results)
        # Saved after each benchmark, so that a long run that is interrupted keeps what it measured.
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        append_rows(csv_path, result_rows(key, results[key], bench_command(key, args, results[key]), provenance))
    table = run_table(results)
    (out_dir / "table.md").write_text(table)
    print(table)
    print(f"written to {out_dir} (rows appended to {csv_path})")
    return results

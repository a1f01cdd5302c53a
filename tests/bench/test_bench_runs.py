"""``make bench``: how repeats are run and reported, and a real quick benchmark end to end."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pytest

from captcha_lit.bench import cli, training
from captcha_lit.bench.common import ROOT
from captcha_lit.bench.tables import run_table


def test_training_repeats_differ_only_in_the_weight_seed(monkeypatch, tmp_path):
    calls = []

    def fake_run(name, overrides, out_dir, fresh_cache, code_dir):
        assert code_dir == ROOT  # the checkout's own code
        calls.append((name, overrides, fresh_cache))
        seed = next((int(o.split("=")[1]) for o in overrides if o.startswith("seed=")), 42)
        accuracy = {42: 0.97, 43: 0.96, 44: 0.98}[seed]
        return {"name": name, "test_seq_acc": accuracy, "wall_s": 600.0 + seed, "peak_rss_gb": 2.5,
                "train_img_s": 500.0, "val_seq_acc_at_2min": 0.5, "val_seq_acc_at_4min": 0.7,
                "val_seq_acc_at_6min": 0.8, "val_seq_acc_at_10min": 0.95, "val_seq_acc_at_15min": None}

    monkeypatch.setattr(training, "_train_run", fake_run)
    summary = training.bench_training("default", ["model=crnn"], 3, tmp_path)
    assert calls == [("default_run0", ["model=crnn"], True),  # the config as shipped
                     ("default_run1", ["model=crnn", "seed=43"], True),
                     ("default_run2", ["model=crnn", "seed=44"], True)]
    assert [run["seed"] for run in summary["runs"]] == [42, 43, 44]
    assert [run["command"] for run in summary["runs"]] == [
        "python -m captcha_lit.train model=crnn", "python -m captcha_lit.train model=crnn seed=43",
        "python -m captcha_lit.train model=crnn seed=44"]
    assert summary["median_test_seq_acc"] == 0.97 and summary["test_seq_acc_range"] == [0.96, 0.98]
    assert summary["median_wall_s"] == 643.0 and summary["median_val_seq_acc_at_15min"] is None
    table = run_table({"train_default": summary})
    assert "median of 3) | test seq acc | 0.9700 (seeds 42, 43, 44: 0.9600 to 0.9800)" in table
    assert "val seq acc at 2 / 4 / 6 / 10 / 15 min | 0.5000 / 0.7000 / 0.8000 / 0.9500 / n/a" in table


def test_a_commits_recipe_trains_with_that_commits_code_in_a_worktree_removed_afterwards(monkeypatch, tmp_path):
    seen = []

    def fake_run(name, overrides, out_dir, fresh_cache, code_dir):
        committed = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:captcha_lit/train.py"],
                                   capture_output=True, text=True, check=True).stdout
        assert (code_dir / "captcha_lit" / "train.py").read_text() == committed
        seen.append(code_dir)
        return {"name": name, "test_seq_acc": 0.99, "wall_s": 700.0}

    monkeypatch.setattr(training, "_train_run", fake_run)
    summary = training.bench_training("previous_commit", [], 2, tmp_path, commit="HEAD")
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0] != ROOT and not seen[0].parent.exists()
    assert summary["commit"] == "HEAD"
    assert [run["command"] for run in summary["runs"]] == [
        "git checkout HEAD && python -m captcha_lit.train", "git checkout HEAD && python -m captcha_lit.train seed=43"]
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert str(seen[0]) not in worktrees


def test_a_commit_that_cannot_be_checked_out_is_named(tmp_path):
    summary = training.bench_training("previous_commit", [], 1, tmp_path, commit="0" * 40)
    assert summary["runs"][0]["error"].startswith(f"cannot check out commit {'0' * 40} of {ROOT}")
    assert summary["median_test_seq_acc"] is None
    assert f"| | previous_commit_run0 | FAILED: cannot check out commit {'0' * 40}" in run_table(
        {"train_previous_commit": summary})


def test_a_failed_training_run_is_reported_not_counted(monkeypatch, tmp_path):
    results = iter([{"name": "default_run0", "error": "exit code 1; see default_run0.log"},
                    {"name": "default_run1", "test_seq_acc": 0.95, "wall_s": 700.0}])
    monkeypatch.setattr(training, "_train_run", lambda *args, **kwargs: next(results))
    summary = training.bench_training("default", [], 2, tmp_path)
    assert summary["median_test_seq_acc"] == 0.95 and summary["test_seq_acc_range"] == [0.95, 0.95]
    table = run_table({"train_default": summary})
    assert "median of 1) | test seq acc | 0.9500 |" in table  # one seed: no range
    assert "| | default_run0 | FAILED: exit code 1; see default_run0.log | |" in table


def test_generation_and_cache_load_benchmarks_run_for_real(tmp_path, capsys):
    results = cli.main(["--only", "gen,load", "--repeats", "2", "--gen-images", "48", "--load-images", "200",
                        "--out", str(tmp_path)])
    gen, load = results["gen"], results["load"]
    assert gen["images"] == 48 and gen["single_core_img_s"] > 0 and load["images"] == 200 and load["load_s"] > 0
    (run_dir,) = (path for path in tmp_path.iterdir() if path.is_dir())
    assert json.loads((run_dir / "results.json").read_text())["gen"] == gen
    table = (run_dir / "table.md").read_text()
    assert "| data generation (48 img, median of 2) | 1 core |" in table
    assert "| cached dataset load (200 img, median of 2) | time |" in table
    assert table in capsys.readouterr().out

    with open(tmp_path / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    load_rows = [(row["metric"], row["seeds"], row["value"], row["command"])
                 for row in rows if row["benchmark"] == "cache_load"]
    command = "python -m captcha_lit.bench --only load --repeats 2 --load-images 200"
    assert load_rows == [("load_s", "run=0", str(load["runs"][0]["load_s"]), command),
                         ("load_s", "run=1", str(load["runs"][1]["load_s"]), command),
                         ("load_s", "", str(load["load_s"]), command)]  # the median
    medians = {row["metric"]: float(row["value"]) for row in rows if row["benchmark"] == "generation"
               and not row["seeds"]}
    assert medians == {"single_core_img_s": gen["single_core_img_s"], "all_cores_img_s": gen["all_cores_img_s"],
                       "speedup": gen["speedup"]}


def test_recipes_compose_in_a_fresh_process():
    # The benchmarks compose the training configs themselves: model=NAME must resolve there too,
    # not only where the test session has already imported the builders.
    code = ("from captcha_lit.bench.common import compose; "
            "print(compose(['experiment=varlen']).model.name, compose(['experiment=seed']).model.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["crnn_classic", "cnn_seed"]


@pytest.mark.slow
def test_hostile_load_benchmark_runs_for_real(tmp_path, monkeypatch):
    """A short run of --only hostile_load: legitimate clients are answered while attackers send the
    amplification batch (refused with 413), and slow connections are closed by the header timeout."""
    from captcha_lit.bench import hostile_load

    monkeypatch.setattr(hostile_load, "HEADER_TIMEOUT_S", 2)
    results = cli.main(["--only", "hostile_load", "--http-seconds", "3", "--http-clients", "4",
                        "--out", str(tmp_path)])
    result = results["hostile_load"]
    assert "error" not in result, result
    assert result["errors"] == 0 and result["requests"] > 0
    assert set(result["attack"]["statuses"]) == {"413"} and result["attack"]["requests"] > 0
    assert result["slow"]["closed"] == 200 and result["slow"]["max_close_s"] < 2 + 2
    assert result["health_after"] == 200
    (run_dir,) = (path for path in tmp_path.iterdir() if path.is_dir())
    assert "| HTTP under attack (4 clients + 4 attackers" in (run_dir / "table.md").read_text()
    with open(tmp_path / "results.csv", newline="") as file:
        metrics = {row["metric"] for row in csv.DictReader(file) if row["benchmark"] == "hostile_load"}
    assert {"p99_ms", "errors", "rss_growth_pct", "slow_max_close_s"} <= metrics


SHARED_MB = 96
_SHARED_PARENT = f"""
import mmap, os, sys, time
shared = mmap.mmap(-1, {SHARED_MB} << 20, flags=mmap.MAP_SHARED)
shared.write(b"x" * ({SHARED_MB} << 20))      # every page resident before the fork
if os.fork() == 0:
    shared.seek(0); shared.read()            # the child maps the same pages
    print("ready", flush=True); time.sleep(30); os._exit(0)
time.sleep(30)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PSS comes from /proc/PID/smaps_rollup")
def test_tree_memory_counts_pages_shared_with_a_forked_worker_once():
    from captcha_lit.bench.common import process_tree_memory

    parent = subprocess.Popen([sys.executable, "-c", _SHARED_PARENT], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        rss, pss = process_tree_memory(parent.pid)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the forked child too
        parent.wait()
    shared = SHARED_MB << 20
    # Summed RSS shows the shared array once per process; PSS splits it between the two.
    assert rss >= 2 * shared
    assert shared <= pss < rss - shared * 0.8
    assert process_tree_memory(parent.pid) == (0, 0)

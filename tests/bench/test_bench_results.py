"""``make bench`` results as data: the rows of outputs/bench/results.csv and ``--table``."""

from __future__ import annotations

import csv
import subprocess
import time

import pytest

from captcha_lit.bench import cli, training
from captcha_lit.bench.results import COLUMNS, git_commit
from captcha_lit.bench.tables import cpu_name

HEADER = ",".join(COLUMNS)


def _fake_training(accuracies: dict[int, float]):
    def fake_run(name, overrides, out_dir, fresh_cache, code_dir):
        seed = next((int(o.split("=")[1]) for o in overrides if o.startswith("seed=")), 42)
        return {"name": name, "test_seq_acc": accuracies[seed], "test_char_acc": 0.99, "wall_s": 100.0 + seed,
                "peak_rss_gb": 1.5, "train_img_s": 800.0, "val_seq_acc_at_2min": 0.8, "val_seq_acc_at_4min": 0.85,
                "val_seq_acc_at_6min": 0.88, "val_seq_acc_at_10min": None, "val_seq_acc_at_15min": None, "best_ckpt": None}
    return fake_run


def _read(path):
    with open(path, newline="") as file:
        return list(csv.reader(file))


def test_a_training_benchmark_appends_a_row_per_metric_and_seed_and_the_median(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(training, "_train_run", _fake_training({42: 0.96, 43: 0.99, 44: 0.97}))
    cli.main(["--only", "train_v2", "--train-repeats", "3", "--out", str(tmp_path)])

    header, *lines = _read(tmp_path / "results.csv")
    assert header == list(COLUMNS)
    rows = [dict(zip(COLUMNS, line)) for line in lines]
    assert {row["benchmark"] for row in rows} == {"train_captcha_images_v2"}  # named after its recipe
    accuracy = [(row["seeds"], row["value"], row["command"]) for row in rows if row["metric"] == "test_seq_acc"]
    assert accuracy == [
        ("42", "0.96", "python -m captcha_lit.train experiment=captcha_images_v2"),
        ("43", "0.99", "python -m captcha_lit.train experiment=captcha_images_v2 seed=43"),
        ("44", "0.97", "python -m captcha_lit.train experiment=captcha_images_v2 seed=44"),
        ("42 43 44", "0.97", "python -m captcha_lit.bench --only train_v2 --train-repeats 3")]
    medians = {row["metric"]: row["value"] for row in rows if row["seeds"] == "42 43 44"}
    # val_seq_acc_at_10min/15min were never reached: no row rather than an empty value
    assert medians == {"test_seq_acc": "0.97", "test_char_acc": "0.99", "wall_time_s": "143", "peak_rss_gb": "1.5",
                       "train_img_s": "800", "val_seq_acc_at_2min": "0.8", "val_seq_acc_at_4min": "0.85",
                       "val_seq_acc_at_6min": "0.88"}
    expected_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=cli.ROOT).stdout.strip()
    for row in rows:
        assert row["date"] == time.strftime("%Y-%m-%d")
        assert row["commit"].removesuffix("+dirty") == expected_commit
        assert "cores" in row["machine"] and row["machine"].endswith("GiB")

    # A second run appends (one header), and --table shows only its medians.
    monkeypatch.setattr(training, "_train_run", _fake_training({42: 0.95}))
    cli.main(["--only", "train_v2", "--train-repeats", "1", "--out", str(tmp_path)])
    lines = _read(tmp_path / "results.csv")
    assert lines.count(list(COLUMNS)) == 1 and len(lines) == 1 + len(rows) + 2 * 8  # a row and a median for each of the 8 metrics it has
    capsys.readouterr()
    cli.main(["--table", str(tmp_path / "results.csv")])
    table = capsys.readouterr().out.splitlines()
    this_cpu = cpu_name(rows[0]["machine"])
    assert this_cpu and "," not in this_cpu and "(R)" not in this_cpu
    assert table[2:] == [f"| `train_captcha_images_v2` | test seq acc 0.95, wall 142 s, peak RSS 1.5 GB | "
                         f"{time.strftime('%Y-%m-%d')}, {this_cpu} | "
                         "`python -m captcha_lit.bench --only train_v2 --train-repeats 1` |"]


SMALL_CSV = f"""{HEADER}
train_default,test_seq_acc,0.9910,42,2026-12-03,aaaaaaa,"Intel(R) Xeon(R) Processor, 2 cores, 24 GiB",python -m captcha_lit.train
train_default,test_seq_acc,0.9880,43,2026-12-03,aaaaaaa,"Intel(R) Xeon(R) Processor, 2 cores, 24 GiB",python -m captcha_lit.train seed=43
train_default,test_seq_acc,0.9895,42 43,2026-12-03,aaaaaaa,"Intel(R) Xeon(R) Processor, 2 cores, 24 GiB",python -m captcha_lit.bench --only train_default --train-repeats 2
train_default,wall_time_s,865,42,2026-12-03,aaaaaaa,"Intel(R) Xeon(R) Processor, 2 cores, 24 GiB",python -m captcha_lit.train
train_default,wall_time_s,784,42 43,2026-12-03,aaaaaaa,"Intel(R) Xeon(R) Processor, 2 cores, 24 GiB",python -m captcha_lit.bench --only train_default --train-repeats 2
throughput,train_img_s_bf16,1400,run=0,2026-12-04,bbbbbbb,"AMD EPYC, 2 cores, 24 GiB",python -m captcha_lit.bench --only throughput --repeats 1
throughput,train_img_s_bf16,1445,,2026-12-04,bbbbbbb,"AMD EPYC, 2 cores, 24 GiB",python -m captcha_lit.bench --only throughput --repeats 1
throughput,train_img_s_fp32,895,,2026-12-04,bbbbbbb,"AMD EPYC, 2 cores, 24 GiB",python -m captcha_lit.bench --only throughput --repeats 1
throughput,infer_img_s,2384,,2026-12-04,bbbbbbb,"AMD EPYC, 2 cores, 24 GiB",python -m captcha_lit.bench --only throughput --repeats 1
throughput,cnn_train_img_s_fp32,863,,2026-12-04,bbbbbbb,"AMD EPYC, 2 cores, 24 GiB",python -m captcha_lit.bench --only throughput --repeats 1
throughput,cnn_infer_img_s,1986,,2026-12-04,bbbbbbb,"AMD EPYC, 2 cores, 24 GiB",python -m captcha_lit.bench --only throughput --repeats 1
labels_captcha_images_v2_100,test_seq_acc,0.981,42 43 44,2026-12-05,ccccccc,2 CPU cores,python -m captcha_lit.bench --only labels
labels_captcha_images_v2_100,test_seq_acc_scratch,0.962,42 43 44,2026-12-05,ccccccc,2 CPU cores,python -m captcha_lit.bench --only labels
labels_captcha_images_v2_100,test_ece,0.012,42 43 44,2026-12-05,ccccccc,2 CPU cores,python -m captcha_lit.bench --only labels
labels_captcha_images_v2_100,wall_time_s,120,42 43 44,2026-12-05,ccccccc,2 CPU cores,python -m captcha_lit.bench --only labels
labels_captcha_images_v2_100,pretrain_s,95,,2026-12-05,ccccccc,2 CPU cores,python -m captcha_lit.bench --only labels
"""


def test_table_prints_one_line_per_benchmark_from_the_median_rows(tmp_path, capsys):
    path = tmp_path / "results.csv"
    path.write_text(SMALL_CSV)
    assert cli.main(["--table", str(path)]) is None
    assert capsys.readouterr().out.splitlines() == [
        "| benchmark | figure | date, CPU | command |",
        "|---|---|---|---|",
        "| `train_default` | test seq acc 0.9895, wall 784 s | 2026-12-03, Intel Xeon | "
        "`python -m captcha_lit.bench --only train_default --train-repeats 2` |",
        "| `throughput` | default: train 1445 img/s bf16, 895 fp32, inference 2384 img/s; cnn: 863, 1986 | "
        "2026-12-04, AMD EPYC | `python -m captcha_lit.bench --only throughput --repeats 1` |",
        "| `labels_captcha_images_v2_100` | 100 labels: test seq acc 0.981 pre-trained (0.962 from scratch), "
        "ECE 0.012, 120 s (+95 s pre-training, once per scheme) | 2026-12-05, 2 CPU cores | "
        "`python -m captcha_lit.bench --only labels` |"]


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("benchmark,metric,value\ntrain_default,test_seq_acc,0.99\n", "columns are 'benchmark,metric,value', expected"),
    (f"{HEADER}\ntrain_default,test_seq_acc,0.99\n", "line 2: 3 fields, expected 8"),
])
def test_table_on_a_bad_csv_exits_2_with_one_line_naming_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "results.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--table", str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"error: {path}") and message in error


def test_a_run_with_a_foreign_results_csv_stops_before_benchmarking(monkeypatch, tmp_path, capsys):
    (tmp_path / "results.csv").write_text("name,score\n")
    monkeypatch.setattr(training, "_train_run", lambda *args, **kwargs: pytest.fail("a benchmark ran"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--only", "train_default", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "columns are 'name,score'" in capsys.readouterr().err
    assert (tmp_path / "results.csv").read_text() == "name,score\n"


def test_commit_is_the_short_hash_dirty_with_uncommitted_changes_and_empty_outside_git(tmp_path):
    assert git_commit(tmp_path) == ""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "file.txt").write_text("one\n")
    subprocess.run([*git, "add", "file.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    short = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == short
    (tmp_path / "file.txt").write_text("two\n")
    assert git_commit(tmp_path) == f"{short}+dirty"


def test_the_audit_benchmark_reports_its_time_and_the_fewest_labels_that_reach_the_target(monkeypatch, tmp_path,
                                                                                           capsys):
    calls = []

    def fake_process(name, module, overrides, out_dir, fresh_cache, cache_dir=None):
        calls.append((module, fresh_cache))
        run_dir = out_dir / name
        run_dir.mkdir(parents=True)
        (run_dir / "results.csv").write_text(
            "labels,variant,test_seq_acc,seq_acc_at_coverage,calibration_error,train_minutes,steps,run_dir\n"
            "25,pretrain=none,0.0,0.0,0.01,1.0,750,a\n25,pretrain=auto,0.93,0.95,0.02,4.9,1500,b\n"
            "50,pretrain=none,0.90,0.94,0.04,1.2,1000,c\n50,pretrain=auto,0.97,0.98,0.02,1.7,1400,d\n"
            "728,pretrain=none,0.9952,0.99,0.003,2.0,1500,e\n")
        return {"name": name, "run_dir": run_dir, "wall_s": 1431.9, "peak_rss_gb": 1.6, "peak_pss_gb": 1.4}

    monkeypatch.setattr(training, "_timed_process", fake_process)
    cli.main(["--only", "audit", "--out", str(tmp_path)])
    assert calls == [("captcha_lit.audit", True)]  # the audit's own command, from a fresh data cache
    rows = [dict(zip(COLUMNS, line)) for line in _read(tmp_path / "results.csv")[1:]]
    values = {row["metric"]: row["value"] for row in rows}
    assert {row["benchmark"] for row in rows} == {"audit_captcha_images_v2"}
    assert values == {"wall_time_s": "1431.9", "peak_rss_gb": "1.6", "peak_pss_gb": "1.4", "points": "5",
                      "target": "0.95", "fewest_labels": "50", "fewest_labels_seq_acc": "0.97",
                      "all_labels_seq_acc": "0.9952"}
    assert rows[0]["command"] == "python -m captcha_lit.bench --only audit"
    capsys.readouterr()
    cli.main(["--table", str(tmp_path / "results.csv")])
    assert ("| `audit_captcha_images_v2` | default grid (5 runs) in 23.9 min from a fresh cache; 50 labels read 0.97 "
            "(>= 0.95), all labels 0.9952 |") in capsys.readouterr().out

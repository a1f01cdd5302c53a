"""``python -m captcha_lit.audit``: the grid, the figures of each point, the summary line, bad input,
and (slow, in subprocesses) a tiny audit that writes its report, is interrupted, and continues."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captcha_lit.studies.audit import audit
from captcha_lit.studies.grid import Point, grid_axes, label_counts, train_command
from captcha_lit.studies.results import PointResult, headline, summary_line
from captcha_lit.viz import analysis
from conftest import AUDIT_TINY_RUN, PYTHON, REPO_ROOT, TINY_FOLDER, _compose, cli_env

NUM_TRAIN = 33


# ---- the numbers -----------------------------------------------------------------------------
def test_label_counts_climb_to_the_training_split():
    root = Path("/data/scheme")
    assert label_counts("auto", 728, root) == [25, 50, 100, 200, 500, 728]
    assert label_counts("auto", 60, root) == [25, 50, 60]
    assert label_counts("auto", 20, root) == [20]
    assert label_counts([20, "all", 10, 20], NUM_TRAIN, root) == [10, 20, NUM_TRAIN]
    with pytest.raises(ValueError, match=r"audit.labels has 34, more than the 33 images of the training split of "
                                         r"/data/scheme; use counts up to 33, or all"):
        label_counts([10, 34], NUM_TRAIN, root)
    for bad in (0, "many", 2.5):
        with pytest.raises(ValueError, match="each label count must be a whole number >= 1 or all"):
            label_counts([bad], NUM_TRAIN, root)
    with pytest.raises(ValueError, match="must be auto or a list"):
        label_counts([], NUM_TRAIN, root)


def test_accuracy_at_coverage_drops_the_least_confident_answers():
    confidences = [0.99, 0.2, 0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.4, 0.3]
    right = [True, False, True, True, True, False, True, True, True, False]
    # the 9 most confident leave out 0.2 (wrong): 7 of 9 right; the 5 most confident are all right
    assert analysis.accuracy_at_coverage(confidences, right, 0.9) == pytest.approx(7 / 9)
    assert analysis.accuracy_at_coverage(confidences, right, 0.5) == 1.0
    assert analysis.accuracy_at_coverage(confidences, right, 1.0) == 0.7
    assert analysis.accuracy_at_coverage([], [], 0.9) is None
    with pytest.raises(ValueError, match="coverage=0 must be in"):
        analysis.accuracy_at_coverage(confidences, right, 0)


def test_reliability_bins_and_calibration_error():
    # 0.95-confident answers right 3 times in 4, 0.15-confident ones right 1 time in 4
    bins = analysis.reliability([0.95] * 4 + [0.15] * 4, [True, True, True, False, True, False, False, False])
    assert bins.count.tolist() == [0, 4, 0, 0, 0, 0, 0, 0, 0, 4]
    assert bins.accuracy[9] == 0.75 and bins.accuracy[1] == 0.25
    assert bins.expected_calibration_error == pytest.approx(0.5 * 0.2 + 0.5 * 0.1)
    assert analysis.reliability([1.0, 0.0], [True, False]).expected_calibration_error == 0.0  # ends included


def _result(labels: int, seq_acc: float, minutes: float, variant: tuple = ()) -> PointResult:
    return PointResult(Point(labels, variant), Path("run"), seq_acc, minutes * 60, 100, "Some CPU, 2 cores, 8 GiB",
                       covered_acc=min(1.0, seq_acc + 0.03))


def test_summary_names_the_fewest_labels_that_read_the_target():
    results = [_result(25, 0.40, 1.0), _result(100, 0.96, 2.5, (("pretrain", "auto"),)),
               _result(100, 0.97, 3.0, (("pretrain", "none"),)), _result(728, 0.995, 2.0)]
    solver, reached = headline(results, 0.95)
    assert solver is results[1] and reached  # 100 labels; of the two, the faster
    assert summary_line(solver, reached, 0.95, 0.9, 728, "unused") == (
        "96.0% of this scheme's CAPTCHAs are read with 100 labels after 2.5 minutes of training on Some CPU, 2 cores, "
        "8 GiB (pretrain=auto). Answering only the 90% of CAPTCHAs it is surest of, it is right 99.0% of the time.")
    solver, reached = headline(results, 0.999)
    assert solver is results[3] and not reached
    assert summary_line(solver, reached, 0.999, 0.9, 728, "unused").startswith(
        "No point of the grid reads 100%; the best reads 99.5% of this scheme's CAPTCHAs, with all 728 labels after "
        "2.0 minutes")


def test_the_grid_crosses_labels_with_each_axis_and_relaunches_only_what_is_unfinished(tmp_path):
    points = [Point(n, (("seed", s), ("pretrain", p))) for n in (25, 50) for s in (1, 2) for p in ("none", "auto")]
    todo = [p for p in points if p.labels == 50 and p.settings[1][1] == "auto"]
    axes = [("seed", [1, 2]), ("pretrain", ["none", "auto"])]
    command = train_command(["data=folder"], todo, axes, tmp_path, ["hydra/launcher=joblib"])
    assert command[1:5] == ["-m", "captcha_lit.train", "-m", "data=folder"]
    assert "data.train_limit=50" in command and "seed=1,2" in command and "pretrain=auto" in command
    assert "hydra.sweep.subdir='labels=${data.train_limit},seed=${seed},pretrain=${pretrain}'" in command
    assert command[-1] == "hydra/launcher=joblib" and "resume=auto" in command
    assert todo[0].dirname == "labels=50,seed=1,pretrain=auto"


# ---- the entry point, in this process ---------------------------------------------------------
def _audit_cfg(tmp_path, overrides: list[str], folder: Path = TINY_FOLDER):
    return _compose("audit", [f"data.path={folder}", *overrides], tmp_path / "audit")


def test_a_grid_axis_must_be_a_train_key(tmp_path):
    cfg = _audit_cfg(tmp_path, ["+audit.grid.nonsense=[1,2]"])
    with pytest.raises(ValueError, match="audit.grid has the axis 'nonsense', which is not a key of the train config"):
        grid_axes(cfg)
    # The default grid crosses pre-training on and off; more axes add to it.
    assert grid_axes(_audit_cfg(tmp_path, ["+audit.grid.seed=[1,2]", "+audit.grid.model.dim=32"])) == [
        ("pretrain", ["none", "auto"]), ("seed", [1, 2]), ("model.dim", [32])]


def test_bad_input_stops_the_audit_before_any_training(tmp_path):
    with pytest.raises(ValueError, match="audit.labels has 34, more than the 33 images of the training split"):
        audit(_audit_cfg(tmp_path, ["audit.labels=[10,34]"]))
    one = tmp_path / "one_image"
    one.mkdir()
    shutil.copyfile(TINY_FOLDER / "4gg4.png", one / "4gg4.png")
    with pytest.raises(ValueError, match=r"1 usable images are too few .* no image is left to train on; add labeled "
                                         r"images to .*one_image \(at least 3\)"):
        audit(_audit_cfg(tmp_path, [], folder=one))
    with pytest.raises(ValueError, match="data.train_limit=5: the audit sets it for each point; pass the label counts "
                                         "as audit.labels"):
        audit(_audit_cfg(tmp_path, ["data.train_limit=5"]))
    assert not (tmp_path / "audit" / "runs").exists()


# ---- end to end, in subprocesses ----------------------------------------------------------------
def _audit_command(out: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "captcha_lit.audit", f"data.path={TINY_FOLDER}", "audit.labels=[10,all]",
            "~audit.grid.pretrain", "pretrain=none", "+audit.grid.seed=[42]",
            f"data.cache_dir={cache_dir}", *AUDIT_TINY_RUN, f"hydra.run.dir={out}", *extra]


INTERRUPTED_STEPS = 300


def _picture(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 2000, path
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert min(pixels.shape[:2]) > 100 and pixels.std() > 5, path


@pytest.mark.slow
def test_tiny_audit_is_interrupted_continues_and_writes_its_report(tmp_path, cache_dir):
    out = tmp_path / "audit"
    runs = out / "runs"
    first, second = runs / "labels=10,seed=42", runs / f"labels={NUM_TRAIN},seed=42"
    markers = tmp_path / "hold"
    # The second point holds after its first epoch (tests/studies/hold_second_run.py) until interrupted.
    command = _audit_command(out, cache_dir, f"trainer.max_steps={INTERRUPTED_STEPS}",
                             "+callbacks.hold._target_=tests.studies.hold_second_run.HoldTheSecondRun",
                             f"+callbacks.hold.marker_dir={markers}")
    # SIGINT as a terminal's Ctrl-C delivers it, even where pytest runs as a background job (which ignores it).
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=cli_env(cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600
    while not (markers / "holding").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not (markers / "holding").exists():
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"the audit's second run never reached its second epoch\n{stdout[-2000:]}\n{stderr[-3000:]}")
    assert (second / "checkpoints" / "last.ckpt").is_file()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"{stdout[-2000:]}\n{stderr[-3000:]}"
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted: 1 of 2 points of the audit finished and are kept in .*/runs; run the same "
                        r"command again to continue \(unfinished points resume from their last epoch\): python -m "
                        r"captcha_lit.audit .*", last), last
    assert (first / "metrics.json").is_file() and not (second / "metrics.json").exists()
    finished_at = (first / "metrics.json").stat().st_mtime_ns

    again = subprocess.run(command, cwd=REPO_ROOT, env=cli_env(cache_dir), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, f"{again.stdout[-2000:]}\n{again.stderr[-3000:]}"
    assert "continuing the audit" in again.stdout + again.stderr and "1 of 2 points finished" in again.stdout + again.stderr
    assert (first / "metrics.json").stat().st_mtime_ns == finished_at  # not trained again
    resumed = json.loads((second / "metrics.json").read_text())
    assert resumed["resumed_from"] == str(second / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == INTERRUPTED_STEPS

    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["labels"]) for r in rows] == [10, NUM_TRAIN]
    for row, run in zip(rows, (first, second)):
        metrics = json.loads((run / "metrics.json").read_text())
        assert float(row["test_seq_acc"]) == pytest.approx(metrics["test/seq_acc"], abs=1e-6)
        assert 0.0 <= float(row["seq_acc_at_coverage"]) <= 1.0
    report = (out / "report.md").read_text()
    summary = report.splitlines()[2]
    assert "of this scheme's CAPTCHAs" in summary and "labels after" in summary and "minutes of training on" in summary
    assert summary.strip("*") in again.stdout
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert {"learning_curve.png", "training_time.png", "reliability.png", "sample_errors.png"} <= set(images)
    for image in images:
        _picture(out / image)
        assert f'src="{image}"' in (out / "report.html").read_text()

    # Once every point has finished, the same command only writes the report again.
    log_size = (out / "grid.log").stat().st_size
    third = subprocess.run(command, cwd=REPO_ROOT, env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "every point of the audit" in third.stdout + third.stderr
    assert (out / "grid.log").stat().st_size == log_size


@pytest.mark.slow
def test_audit_command_line_errors_are_one_line(tmp_path, cache_dir):
    out = tmp_path / "audit"
    proc = subprocess.run(_audit_command(out, cache_dir, "audit.labels=[10,40]"), cwd=REPO_ROOT,
                          env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: audit.labels has 40, more than the {NUM_TRAIN} images of the training split of {TINY_FOLDER}; "
        f"use counts up to {NUM_TRAIN}, or all")
    assert not (out / "runs").exists()

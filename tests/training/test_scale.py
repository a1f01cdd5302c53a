"""Scaling out, end to end in subprocesses: the Optuna search and its report, a resumed sweep,
the submitit launcher, and DDP with two CPU processes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from captcha_lit.report import main as report_main
from conftest import PYTHON, QUIET_TRAINER, REPO_ROOT, TINY_DATA, cli_env

pytestmark = pytest.mark.slow

# Tiny data on CPU; the batch size and device count are left to each test.
TINY = [o for o in TINY_DATA + QUIET_TRAINER if not o.startswith(("data.batch_size=", "trainer.devices="))]
SEARCHED = {"optimizer.lr", "optimizer.weight_decay", "data.batch_size", "augmentation.strength", "model.dim",
            "model.channels"}


def _run(args: list[str], cache_dir: Path, timeout: int = 600, retry_dir: Path | None = None) -> subprocess.CompletedProcess:
    """Run the train entry point with ``args``; it must exit 0 within ``timeout`` seconds.

    The run gets its own process group, so that on a timeout its DDP children die with it (they
    hold its output pipes). With ``retry_dir``, a run that timed out is run once more from an empty
    ``retry_dir``: torch's gloo rendezvous, set up a second time in one process (the second DDP job
    of a sweep), now and then never completes (pytorch/pytorch#55967, #74666); an error exit is
    never retried."""
    cmd = [PYTHON, "-m", "captcha_lit.train", *args, f"data.cache_dir={cache_dir}", *TINY]
    for attempt in (1, 2):
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=cli_env(cache_dir), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            if retry_dir is None or attempt == 2:
                pytest.fail(f"timed out after {timeout} s\n{out[-3000:]}\n{err[-5000:]}")
            shutil.rmtree(retry_dir, ignore_errors=True)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _metrics(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


def test_optuna_search_report_and_resumed_sweep(tmp_path, cache_dir, capsys):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", "debug=fast",
            "resume=auto", "logger=csv"]
    first = _run(args, cache_dir)
    for job in ("0", "1"):
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert SEARCHED <= {o.split("=", 1)[0] for o in overrides}
        assert "val/seq_acc_best" in _metrics(sweep / job)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == SEARCHED
    with open(sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["job"] for r in rows) == ["0", "1"] and all(r["status"] == "done" for r in rows)
    scores = [float(r["val/seq_acc_best"]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # best first
    assert SEARCHED <= set(rows[0])  # a column per override
    assert "optuna best:" in first.stdout and "sorted by val/seq_acc_best" in first.stdout

    capsys.readouterr()
    report_main([str(sweep)])
    printed = capsys.readouterr().out
    assert "| job | status | val/seq_acc_best | test/seq_acc |" in printed
    assert "optimizer.lr" in printed and "optuna best:" in printed

    # A re-run of the same command skips the finished trial and trains the one that did not finish.
    done = sweep / "0" / "metrics.json"
    stamp = done.stat().st_mtime_ns
    (sweep / "1" / "metrics.json").unlink()
    again = _run(args, cache_dir)
    assert again.stdout.count("skipped:") == 1
    assert done.stat().st_mtime_ns == stamp
    assert (sweep / "1" / "metrics.json").is_file()


def test_submitit_local_launcher_one_job(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "submitit"
    _run(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}",
          "debug=fast", "trainer.devices=1", "logger=csv"], cache_dir)
    assert "test/seq_acc" in _metrics(sweep / "0")
    assert list((sweep / ".submitit").glob("*/*_log.out"))  # the job ran as a submitit job
    with open(sweep / "summary.csv", newline="") as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["done"]


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "joblib"
    proc = _run(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2", f"hydra.sweep.dir={sweep}",
                 "debug=fast", "trainer.devices=1", "logger=csv"], cache_dir)
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr  # the joblib launcher ran the sweep
    for job in ("0", "1"):
        assert "test/seq_acc" in _metrics(sweep / job)
    with open(sweep / "summary.csv", newline="") as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["done", "done"]


def test_ddp_two_cpu_processes_in_a_sweep(tmp_path, cache_dir, make_cfg):
    from captcha_lit.eval import evaluate

    sweep = tmp_path / "ddp"
    # Two jobs in one process: fast_dev_run, then a real epoch; each starts and ends its own 2 processes.
    _run(["-m", "trainer=ddp", "trainer.devices=2", "trainer.fast_dev_run=true,false",
          "trainer.max_epochs=1", "data.batch_size=16", "model.channels=[8,16,32,32]", "model.dim=32", "logger=csv",
          f"hydra.sweep.dir={sweep}"], cache_dir, timeout=180, retry_dir=sweep)
    assert {p.name for p in sweep.iterdir()} == {"0", "1", "multirun.yaml", "summary.csv", "summary.md"}
    fast, epoch = _metrics(sweep / "0"), _metrics(sweep / "1")
    assert fast["world_size"] == epoch["world_size"] == 2
    assert fast["global_step"] == 1
    assert epoch["global_step"] == 64 // (16 * 2)  # each process trains on half of every epoch
    for job in ("0", "1"):
        job_dir = sweep / job
        assert (job_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran this job, in this directory
        assert (job_dir / ".hydra" / "config.yaml").is_file()  # written once, by rank 0
    checkpoints = sorted(p.name for p in (sweep / "1" / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints  # once, by rank 0: best and last

    # Test metrics are averaged over both processes: they equal one process scoring the whole split.
    cfg = make_cfg("eval", [f"ckpt_path={epoch['best_ckpt']}"], name="eval_ddp")
    single = evaluate(cfg, [f"ckpt_path={epoch['best_ckpt']}"])
    assert single["num_test"] == 32
    assert epoch["test/loss"] == pytest.approx(single["test/loss"], abs=1e-5)
    assert epoch["test/char_acc"] == pytest.approx(single["test/char_acc"], abs=1e-6)


def _completed_trials(db: Path) -> int:
    """Finished trials in the study file, read without writing to it.

    Opening it through optuna would create its tables when they are missing, racing the search
    that is creating them; a read-only SQLite connection creates nothing.
    """
    import sqlite3
    from contextlib import closing

    if not db.is_file():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            return conn.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # the tables are not there yet, or the search holds a write lock
        return 0


def _study(storage: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="captcha_lit", storage=storage)


def test_optuna_study_in_sqlite_survives_a_kill_and_resumes(tmp_path, cache_dir):
    """A search killed mid-way (SIGKILL, nothing cleaned up) is re-run with the same command: its finished
    trials stand, a trial it was running is marked failed, and only the missing trials run."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from optuna.trial import TrialState

    db = tmp_path / "db" / "study.db"
    storage = f"sqlite:///{db}"
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "debug=fast", "logger=csv", f"hparams_search.storage={storage}"]
    cmd = [PYTHON, "-m", "captcha_lit.train", *args, f"data.cache_dir={cache_dir}", *TINY]
    log = tmp_path / "search.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=cli_env(cache_dir), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 300
        while not _completed_trials(db):
            assert proc.poll() is None, f"the search ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no trial finished in time:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _study(storage).trials
    assert 1 <= sum(t.state == TrialState.COMPLETE for t in before) < 3
    again = _run(args, cache_dir)
    assert "still missing from n_trials=3" in again.stdout + again.stderr
    after = _study(storage).trials
    assert sum(t.state == TrialState.COMPLETE for t in after) == 3
    assert not [t for t in after if t.state == TrialState.RUNNING]
    assert len(after) - len(before) == 3 - sum(t.state == TrialState.COMPLETE for t in before)
    assert (tmp_path / "sweep" / "optimization_results.yaml").is_file()


def test_joblib_jobs_share_one_sqlite_study_and_split_the_cores(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from optuna.trial import TrialState

    from captcha_lit.utils import available_cores

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    sweep = tmp_path / "sweep"
    _run(["hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib",
          "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", "debug=fast", "trainer.devices=1", "logger=csv",
          f"hparams_search.storage={storage}"], cache_dir)
    trials = _study(storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for job in ("0", "1"):
        assert _metrics(sweep / job)["torch_threads"] == max(1, available_cores() // 2)

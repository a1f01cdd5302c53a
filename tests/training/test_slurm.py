"""Sweeps, preemption and DDP on a real one-node SLURM cluster (tests/slurm_cluster.py: munge,
slurmctld and slurmd on localhost with 2 CPUs), through ``hydra/launcher=slurm``; and the
one-line errors for a cluster that does not answer, a partition it lacks, a time limit too
short for an epoch and a job that fails on its node."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import AUDIT_TINY_RUN, PYTHON, QUIET_TRAINER, REPO_ROOT, TINY_DATA, TINY_FOLDER, cli_env
from slurm_cluster import PACKAGES, LocalSlurm, missing_programs

pytestmark = pytest.mark.slow

TINY = [o for o in TINY_DATA + QUIET_TRAINER if not o.startswith(("data.batch_size=", "trainer.devices="))]
SMALL = ["model.channels=[8,16,32,32]", "model.dim=32", "logger=csv", "data.batch_size=16"]
# One CPU and 1 GB per job, so the 2-CPU node runs two jobs at once.
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
            "hydra.launcher.timeout_min=10"]
FINAL_KEYS = ("test/seq_acc", "test/char_acc", "test/loss", "test/cer", "val/seq_acc_best", "epochs", "global_step")
TIMES = re.compile(r"job (\d+) \(SLURM job \S+\) (?:done|failed): queued (\d+) s, ran (\d+) s, total (\d+) s")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install {PACKAGES} "
                    "(make test and .ci/run install them when they run as root)")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def _env(cluster: LocalSlurm, cache_dir: Path) -> dict:
    return {**cli_env(cache_dir), "SLURM_CONF": str(cluster.conf)}


def _start(args: list[str], cluster: LocalSlurm, cache_dir: Path) -> subprocess.Popen:
    """``python -m captcha_lit.train -m <args>`` on tiny data (``args`` win), submitting to ``cluster``."""
    cmd = [PYTHON, "-m", "captcha_lit.train", "-m", *LAUNCHER, f"data.cache_dir={cache_dir}", *TINY, *args]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(cluster, cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 150) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the sweep did not end in {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the sweep ended while waiting for {what}\n{out[-3000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _slurm_id(sweep: Path, job: int) -> str:
    """The SLURM id of a sweep's job number ``job``, as its log folder names it: ``<array>_<job>``, or the
    job's own id in a one-job sweep (submitted as a plain job)."""
    folders = [d for d in (sweep / "slurm").glob("*") if d.name.endswith(f"_{job}")
               or job == 0 and d.name.isdigit() and any(d.glob("*_log.*"))]
    assert len(folders) == 1, folders
    return folders[0].name


def _state(cluster: LocalSlurm, slurm_id: str) -> str:
    return subprocess.run(["squeue", "-h", "--states=all", "-o", "%T", "-j", slurm_id], env=cluster.env,
                          capture_output=True, text=True, timeout=30).stdout.strip()


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _times(stdout_and_err: str) -> dict[int, tuple[int, int, int]]:
    return {int(m[0]): tuple(int(x) for x in m[1:]) for m in TIMES.findall(stdout_and_err)}


def test_sweep_on_the_queue_survives_requeue_and_preemption(slurm, tmp_path, cache_dir):
    """Three runs of one config: job 0 is requeued by the admin (scontrol requeue: SIGTERM), job 1 is
    preempted (SIGUSR2, the signal SLURM sends before a preemption or the time limit: submitit requeues
    it), each after its first epoch; job 2 runs untouched, the reference."""
    sweep = tmp_path / "sweep"
    proc = _start([f"hydra.sweep.dir={sweep}", "seed=7,7,7", "data.num_train=640", "trainer.max_epochs=4", *SMALL],
                  slurm, cache_dir)
    # Each job is stopped as soon as its first epoch is saved, while it has three more to run.
    for job, stop in ((0, ["scontrol", "requeue"]), (1, ["scancel", "--signal=USR2"])):
        _wait_for((sweep / str(job) / "checkpoints" / "last.ckpt").exists, 120, f"job {job}'s first epoch", proc)
        subprocess.run([*stop, _slurm_id(sweep, job)], env=slurm.env, check=True, timeout=30)
    lost, finished = {}, {}
    for job in (0, 1):
        _wait_for(lambda: _state(slurm, _slurm_id(sweep, job)) == "PENDING", 60, f"job {job} back in the queue")
        # Epochs lost: those the job finished (validated, in the timeline of interrupted.ckpt, saved as it
        # stopped) and the next run does not start after (last.ckpt; SLURM holds a requeued job for a while,
        # so nothing overwrote it yet).
        ckpt_dir = sweep / str(job) / "checkpoints"
        finished[job] = len(_checkpoint(ckpt_dir / "interrupted.ckpt")["callbacks"]["RunTimeline"]["points"])
        lost[job] = finished[job] - (_checkpoint(ckpt_dir / "last.ckpt")["epoch"] + 1)
    code, out, err = _finish(proc)
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"

    metrics = {job: json.loads((sweep / str(job) / "metrics.json").read_text()) for job in (0, 1, 2)}
    assert lost == {0: 0, 1: 0}
    for job in (0, 1):
        assert metrics[job]["resumed_from"] == str(sweep / str(job) / "checkpoints" / "last.ckpt")
        for key in FINAL_KEYS:
            assert metrics[job][key] == metrics[2][key], (job, key)
    assert metrics[2]["resumed_from"] is None
    launcher_log = out + err
    assert re.search(r"job 0 \(SLURM job \S+\) done: .*, requeued 1x", launcher_log)
    assert re.search(r"job 1 \(SLURM job \S+\) done: .*, requeued 1x", launcher_log)
    assert re.search(r"job 2 \(SLURM job \S+\) done: queued \d+ s, ran \d+ s, total \d+ s\n", launcher_log)
    runs = {job: re.findall(r"restart (\d+),", (sweep / "slurm" / _slurm_id(sweep, job) /
                                               f"{_slurm_id(sweep, job)}_0_log.out").read_text()) for job in (0, 1, 2)}
    assert runs == {0: ["0", "1"], 1: ["0", "1"], 2: ["0"]}  # SLURM ran jobs 0 and 1 twice, job 2 once
    with open(sweep / "summary.csv", newline="") as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["done"] * 3  # the report gathers every job
    times = _times(launcher_log)
    print("\nqueue, run and total seconds per job:", times, "epochs finished before the stop:", finished,
          "epochs lost:", lost)


def test_ddp_job_takes_its_ranks_from_slurm(slurm, tmp_path, cache_dir, make_cfg):
    from captcha_lit.eval import evaluate

    sweep = tmp_path / "ddp"
    proc = _start([f"hydra.sweep.dir={sweep}", "hydra.launcher.tasks_per_node=2", "trainer=ddp", "trainer.devices=2",
                   "trainer.max_epochs=1", *SMALL], slurm, cache_dir)
    code, out, err = _finish(proc)
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["global_step"] == 64 // (16 * 2)  # each task trains on half of every epoch
    slurm_id = _slurm_id(sweep, 0)
    logs = {rank: "".join(p.read_text() for p in (sweep / "slurm" / slurm_id).glob(f"{slurm_id}_{rank}_log.*"))
            for rank in (0, 1)}
    for rank in (0, 1):  # two srun tasks, each a rank that Lightning read from SLURM_PROCID
        assert f"task {rank} of 2, restart 0, torch threads: 1" in logs[rank]  # --cpus-per-task=1
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in logs[rank]
    assert "final metrics" in logs[0] and "final metrics" not in logs[1]  # rank 0 alone writes metrics.json
    assert (sweep / "0" / "train_ddp_process_1.log").is_file()  # rank 1 logged into the job's directory
    checkpoints = sorted(p.name for p in (sweep / "0" / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints  # best and last, once

    cfg = make_cfg("eval", [f"ckpt_path={metrics['best_ckpt']}"], name="eval_slurm_ddp")
    single = evaluate(cfg, [f"ckpt_path={metrics['best_ckpt']}"])
    assert single["num_test"] == 32
    assert metrics["test/loss"] == pytest.approx(single["test/loss"], abs=1e-5)
    assert metrics["test/char_acc"] == pytest.approx(single["test/char_acc"], abs=1e-6)
    print(f"\nDDP under SLURM: test/loss {metrics['test/loss']:.6f}, char_acc {metrics['test/char_acc']:.6f}; "
          f"single-process eval: {single['test/loss']:.6f}, {single['test/char_acc']:.6f}; times {_times(out + err)}")


def _error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("error: "), err[-3000:]
    return lines[-1]


def test_jobs_that_fail_on_their_node_name_their_errors_and_logs(slurm, tmp_path, cache_dir):
    """Job 0 stops on bad input (an entry point's one-line error), job 1 is cancelled while it trains
    (it dies without a result); the sweep waits for both and names both, in one line."""
    sweep = tmp_path / "fails"
    missing = tmp_path / "nowhere" / "model.ckpt"
    proc = _start([f"hydra.sweep.dir={sweep}", f"init_from={missing},null", "data.num_train=640", *SMALL],
                  slurm, cache_dir)
    _wait_for((sweep / "1" / "checkpoints" / "last.ckpt").exists, 120, "job 1's first epoch", proc)
    subprocess.run(["scancel", _slurm_id(sweep, 1)], env=slurm.env, check=True, timeout=30)
    code, out, err = _finish(proc)
    line = _error_line(code, err)
    logs = {job: sweep / "slurm" / _slurm_id(sweep, job) / f"{_slurm_id(sweep, job)}_0_log.err" for job in (0, 1)}
    first, second = line.removeprefix("error: ").split(" | ")
    assert first == (f"job 0 (SLURM job {_slurm_id(sweep, 0)}) failed on its node: checkpoint '{missing}' does not "
                     "exist; train one with `make train` or `python -m captcha_lit.train`, then look in "
                     f"outputs/train/runs/*/checkpoints/; its log: {logs[0]}")
    assert re.fullmatch(rf"job 1 \(SLURM job {_slurm_id(sweep, 1)}\) failed on its node: CANCELLED, .*CANCELLED AT .*; "
                        rf"its log: {re.escape(str(logs[1]))}", second), second
    assert all(log.is_file() for log in logs.values())


def test_a_time_limit_shorter_than_an_epoch_is_an_error(slurm, tmp_path, cache_dir):
    """SLURM warns a job with SIGUSR2 signal_delay_s before its time limit. A job that gets it before it
    finished an epoch is not requeued (it would start over): its error says to raise the limit."""
    sweep = tmp_path / "short"
    # One image per step, 3,840 steps: the first epoch outlasts the 30 s after which SLURM sends its own
    # warning, so a warning lands in it however slowly the cluster delivers the test's (1,280 steps, about
    # 20 s, sometimes ended first).
    small = [o for o in SMALL if not o.startswith("data.batch_size=")]
    proc = _start([f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=30",
                   "data.num_train=3840", "data.batch_size=1", *small], slurm, cache_dir)
    log = sweep / "0" / "train.log"
    # SLURM may send its own warning up to a minute early, even while the job imports: the job holds it
    # until its handler exists, and fails the same way. Otherwise the test sends it once the trainer exists
    # (the log says "training <model> on ...").
    _wait_for(lambda: proc.poll() is not None or (log.is_file() and "] - training " in log.read_text()), 120,
              "the job to start training")
    if proc.poll() is None:
        subprocess.run(["scancel", "--signal=USR2", _slurm_id(sweep, 0)], env=slurm.env, check=False, timeout=30)
    code, out, err = _finish(proc)
    line = _error_line(code, err)
    assert "the job reached its time limit (hydra.launcher.timeout_min=1) before it finished an epoch" in line
    assert "raise hydra.launcher.timeout_min" in line
    assert not (sweep / "0" / "checkpoints" / "last.ckpt").exists()


def test_bad_cluster_settings_are_one_line_errors(slurm, tmp_path, cache_dir):
    code, out, err = _finish(_start([f"hydra.sweep.dir={tmp_path / 'p'}", "hydra.launcher.partition=gpu"],
                                    slurm, cache_dir), timeout=60)
    assert _error_line(code, err) == ("error: hydra.launcher.partition=gpu is not a partition of this cluster; pass "
                                      "one of debug (`sinfo` lists them), or null for the default")
    assert not (tmp_path / "p" / "slurm").exists() and not (tmp_path / "p" / "0").exists()  # nothing submitted


def _launcher(overrides: list[str]):
    """The launcher that ``hydra/launcher=slurm <overrides>`` builds, in this process."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import captcha_lit.training.builders  # noqa: F401  (registers model=NAME, which train.yaml composes)
    from hydra_plugins.captcha_lit_launcher.slurm_launcher import SlurmLauncher

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", "hydra.job.name=train", *overrides], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    return SlurmLauncher(**params)


@pytest.mark.parametrize("case", ["no sbatch", "controller down", "time limit under the warning"])
def test_a_cluster_that_cannot_run_the_sweep_is_a_one_line_error(case, slurm, tmp_path, monkeypatch, capsys):
    overrides = []
    if case == "no sbatch":
        monkeypatch.setenv("PATH", str(tmp_path))  # the SLURM clients are not installed here
    elif case == "controller down":
        conf = tmp_path / "slurm.conf"  # the cluster's config, with a port where no slurmctld listens
        conf.write_text(re.sub(r"SlurmctldPort=\d+", "SlurmctldPort=1", slurm.conf.read_text()))
        monkeypatch.setenv("SLURM_CONF", str(conf))
    else:
        monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
        overrides = ["hydra.launcher.timeout_min=1"]
    launcher = _launcher(overrides)
    with pytest.raises(SystemExit) as exit_info:
        launcher.launch([["seed=1"]], initial_job_idx=0)
    assert exit_info.value.code == 2
    line = _error_line(2, capsys.readouterr().err)
    expected = {
        "no sbatch": "error: sbatch is not on PATH, so hydra/launcher=slurm cannot submit: run on a machine of a SLURM "
                     "cluster (its login node), or use hydra/launcher=joblib on this one",
        "controller down": f"error: the SLURM controller does not answer (`scontrol ping`: Slurmctld(primary) at "
                           f"{slurm.node} is DOWN); start slurmctld or ask the cluster's admins, check SLURM_CONF, or "
                           "run here with hydra/launcher=joblib",
        "time limit under the warning": "error: hydra.launcher.timeout_min=1 is too short: SLURM warns a job "
                                        "hydra.launcher.signal_delay_s=120 s before its time limit to save and requeue "
                                        "it, so it would stop before its first epoch ends; raise timeout_min (or lower "
                                        "signal_delay_s)",
    }[case]
    assert line == expected


def test_audit_grid_runs_on_the_queue(slurm, tmp_path, cache_dir):
    """The audit is a ``train -m`` sweep like any other: on the SLURM launcher each point is an sbatch
    job, and the audit gathers their metrics into its results and report."""
    out = tmp_path / "audit"
    cmd = [PYTHON, "-m", "captcha_lit.audit", f"data.path={TINY_FOLDER}", "audit.labels=[10,all]",
           "~audit.grid.pretrain", "pretrain=none", "+audit.grid.seed=[42]", f"data.cache_dir={cache_dir}",
           *AUDIT_TINY_RUN, "trainer.max_steps=30", f"hydra.run.dir={out}", *LAUNCHER]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(slurm, cache_dir), capture_output=True, text=True,
                          timeout=150)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    # Two sbatch jobs, one per label count, each with its log in the audit's run folder; the launcher's
    # lines go to the audit's grid.log.
    times = _times((out / "grid.log").read_text())
    assert sorted(times) == [0, 1], (out / "grid.log").read_text()
    logs = sorted((out / "runs" / "slurm").glob("*/*_log.out"))
    assert len(logs) == 2, logs
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["labels"]) for r in rows] == [10, 33]
    for row in rows:
        metrics = json.loads((out / "runs" / f"labels={row['labels']},seed=42" / "metrics.json").read_text())
        assert float(row["test_seq_acc"]) == pytest.approx(metrics["test/seq_acc"], abs=1e-6)
        assert metrics["global_step"] == 30
    assert "of this scheme's CAPTCHAs" in (out / "report.md").read_text()
    print("\naudit on the queue, queue, run and total seconds per job:", times)


def test_a_warning_during_the_jobs_imports_is_held_for_its_task():
    """SLURM may send SIGUSR2 while a job still unpickles its task (before submitit's handler exists):
    on the node (submitit's entry point is __main__), importing the launcher holds it instead of dying."""
    def probe(on_node: bool) -> subprocess.CompletedProcess:
        as_node = "sys.modules['__main__'].__spec__ = types.SimpleNamespace(name='submitit.core._submit')\n"
        code = ("import os, signal, sys, types\n" + (as_node if on_node else "") +
                "from captcha_lit.training import slurm\n"
                "os.kill(os.getpid(), signal.SIGUSR2)\n"
                "print('held', slurm._EARLY_WARNINGS)\n")
        return subprocess.run([PYTHON, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    held = probe(on_node=True)
    assert held.returncode == 0 and held.stdout.strip() == f"held [{int(signal.SIGUSR2)}]", held.stderr[-2000:]
    # Anywhere else (the submitting process, a user's script) the import leaves SIGUSR2 alone.
    plain = probe(on_node=False)
    assert plain.returncode == -signal.SIGUSR2, plain.stdout

"""Hydra's submitit SLURM launcher with checks and requeue handling (``hydra/launcher=slurm``,
configured in conf/hydra/launcher/slurm.yaml; Hydra finds it in hydra_plugins/captcha_lit_launcher).
It runs any Hydra task, not only training.

Before it submits, it checks that the cluster answers and knows the partition, and that the time
limit leaves room to work. While the jobs run, it follows them with ``squeue`` (``sacct`` needs
SLURM's accounting database, which small clusters lack), and a job that fails on its node ends
the sweep with one line that names the job, its error and its log.

On the node, each task runs with ``--cpus-per-task`` torch threads. The ranks of a multi-task job
(DDP through Lightning's SLURM environment) after the first write no Hydra files of their own.
A preempted job (SIGUSR2 from SLURM, ``scancel --signal=USR2``) and one that reaches its time limit
are requeued by submitit; SLURM starts the same command again, and ``resume`` continues it from
its ``checkpoints/last.ckpt``. A job that reaches its time limit before it wrote any checkpoint
is not requeued, since it would start over: its error says to raise the limit.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

_IMPORTED_AT = time.time()
_EARLY_WARNINGS: list[int] = []


def _hold_early_warnings() -> None:
    """SLURM may send its time-limit warning up to a minute early (sbatch's --signal), here while the
    job still unpickles its task, before submitit's handler exists: SIGUSR2's default action would kill
    the job without a word. On the node, this module is imported first thing, so it holds the signal
    until the task starts, which hands it to submitit (SlurmLauncher.__call__)."""
    main_module = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    if main_module == "submitit.core._submit" and signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL:
        signal.signal(signal.SIGUSR2, lambda signum, frame: _EARLY_WARNINGS.append(signum))


_hold_early_warnings()

from hydra.core.utils import JobReturn, JobStatus, filter_overrides  # noqa: E402  (after the hold: slow imports)
from hydra_plugins.hydra_submitit_launcher import submitit_launcher  # noqa: E402
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from captcha_lit.utils import entry_point  # noqa: E402

log = logging.getLogger(__name__)

# squeue states after which a job runs no more (a requeued job goes back to PENDING instead).
_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
          "TIMEOUT"}
_QUERY_TIMEOUT_S = 30
_POLL_S = 0.5
# How long a result file may lag behind the end of its job (shared file systems).
_RESULT_GRACE_S = 10


class JobFailed(ValueError):
    """A job failed on its node (a ValueError, so the entry point prints it as one line)."""


def _slurm(*args: str) -> str:
    """Run a SLURM client command; its output, or a ValueError that says the cluster does not answer."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=_QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc = None
    if proc is None or proc.returncode != 0:
        said = f"no answer in {_QUERY_TIMEOUT_S} s" if proc is None else (proc.stderr.strip() or proc.stdout.strip())
        raise ValueError(f"the SLURM controller does not answer (`{' '.join(args)}`: {said.splitlines()[0]}); "
                         "start slurmctld or ask the cluster's admins, check SLURM_CONF, or run here with "
                         "hydra/launcher=joblib")
    return proc.stdout


def _seconds(slurm_time: str) -> int | None:
    """SLURM's [D-][H:]M:S as seconds; None for UNLIMITED, NOT_SET and the like."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", slurm_time.strip())
    if not match:
        return None
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _last_error_line(log_file: Path) -> str:
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines()] if log_file.exists() else []
    errors = [line for line in lines if "error:" in line or re.match(r"^\w+(\.\w+)*(Error|Exception):", line)]
    return (errors or [line for line in lines if line] or ["(its log is empty)"])[-1]


class _Watch:
    """One job as the submitting machine sees it: its squeue states over time, then its result or failure."""

    def __init__(self, number: int, job_id: str, paths) -> None:
        self.number, self.job_id, self.paths = number, job_id, paths
        self.submitted = self.last_seen = time.monotonic()
        self.seconds = {"queued": 0.0, "ran": 0.0}
        self.restarts = 0
        self.result: JobReturn | None = None
        self.failure: str | None = None
        self._state: str | None = None
        self._gone_since: float | None = None  # ended (or out of squeue) and no result yet

    def update(self, state: str | None) -> bool:
        """Take the job's state now (None: not in squeue); True once it has ended."""
        from submitit.core.utils import pickle_load

        now = time.monotonic()
        if self._state in ("PENDING", "CONFIGURING"):
            self.seconds["queued"] += now - self.last_seen
        elif self._state in ("RUNNING", "COMPLETING"):
            self.seconds["ran"] += now - self.last_seen
        if self._state in ("RUNNING", "COMPLETING") and state in ("PENDING", "REQUEUED"):
            self.restarts += 1
        self.last_seen, self._state = now, state
        ended = state is None or state in _ENDED
        if not ended:
            self._gone_since = None
            return False
        if self.paths.result_pickle.exists():
            outcome, value = pickle_load(self.paths.result_pickle)
            if outcome == "error":  # a traceback: the task exited with an error, or submitit failed
                self._fail(re.sub(r"^[\w.]*JobFailed: ", "", str(value).strip().splitlines()[-1]))
            elif value.status == JobStatus.FAILED:
                self._fail(f"{type(value._return_value).__name__}: {value._return_value}")
            else:
                self.result = value
            return True
        self._gone_since = self._gone_since or now
        if now - self._gone_since > _RESULT_GRACE_S:  # it died without a result: killed, out of memory, ...
            self._fail(f"{state or 'gone from the queue'}, {_last_error_line(self.paths.stderr)}")
            return True
        return False

    def _fail(self, error: str) -> None:
        self.failure = (f"job {self.number} (SLURM job {self.job_id}) failed on its node: "
                        f"{error.removeprefix('error: ')}; its log: {self.paths.stderr}")

    def times(self) -> str:
        total = self.last_seen - self.submitted
        return (f"job {self.number} (SLURM job {self.job_id}) {'failed' if self.failure else 'done'}: queued "
                f"{self.seconds['queued']:.0f} s, ran {self.seconds['ran']:.0f} s, total {total:.0f} s"
                + (f", requeued {self.restarts}x" if self.restarts else ""))


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    # ---- on the machine that submits ----
    def check_cluster(self) -> None:
        """Stop with one line before submitting anything the cluster would refuse or could not run."""
        if shutil.which("sbatch") is None:
            raise ValueError("sbatch is not on PATH, so hydra/launcher=slurm cannot submit: run on a machine of a "
                             "SLURM cluster (its login node), or use hydra/launcher=joblib on this one")
        _slurm("scontrol", "ping")  # at once, where sinfo retries for seconds
        partitions = _slurm("sinfo", "-h", "-o", "%R").split()
        partition = self.params.get("partition")
        if partition is not None and partition not in partitions:
            raise ValueError(f"hydra.launcher.partition={partition} is not a partition of this cluster; pass one of "
                             f"{', '.join(sorted(set(partitions)))} (`sinfo` lists them), or null for the default")
        limit_s, warning_s = 60 * self.params["timeout_min"], self.params["signal_delay_s"]
        if limit_s <= warning_s:
            raise ValueError(
                f"hydra.launcher.timeout_min={self.params['timeout_min']} is too short: SLURM warns a job "
                f"hydra.launcher.signal_delay_s={warning_s} s before its time limit to save and requeue it, so it "
                "would stop before its first epoch ends; raise timeout_min (or lower signal_delay_s)")

    @entry_point
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        self.check_cluster()
        params = dict(self.params)
        folder = params.pop("submitit_folder")
        executor = submitit.AutoExecutor(cluster="slurm", folder=folder,
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in base else f"slurm_{key}": value for key, value in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        for number, overrides in zip(numbers, job_overrides):
            log.info("\t#%d : %s", number, " ".join(filter_overrides(overrides)))
        from hydra.core.singleton import Singleton

        try:
            jobs = executor.map_array(self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(numbers),
                                      list(numbers), [f"job_id_for_{n}" for n in numbers],
                                      [Singleton.get_state()] * len(numbers))
        except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError) as exc:
            said = getattr(exc, "output", None) or str(exc)
            said = said.decode() if isinstance(said, bytes) else said
            raise ValueError(f"sbatch refused the jobs ({said.strip().splitlines()[-1]}); check hydra.launcher's "
                             "partition, timeout_min, mem_gb, cpus_per_task and tasks_per_node against `sinfo`") from None
        log.info("submitted %d job(s) to SLURM: %s; logs in %s", len(jobs), " ".join(j.job_id for j in jobs),
                 Path(folder.replace("%j", "")).resolve())
        return self._results(jobs, numbers)

    def _results(self, jobs: list, numbers: Sequence[int]) -> list[JobReturn]:
        """Wait until every job has ended, and log its times. Each job's result is its rank 0's; if any job
        failed, the first one's error ends the sweep (the others still finish)."""
        from submitit.core.utils import JobPaths

        watches = {job.job_id: _Watch(number, job.job_id, JobPaths(self.params["submitit_folder"], job.job_id, task_id=0))
                   for job, number in zip(jobs, numbers)}
        waiting = dict(watches)
        while waiting:
            states = self._states(list(waiting))
            for job_id, watch in list(waiting.items()):
                if watch.update(states.get(job_id)):
                    del waiting[job_id]
                    log.info("%s", watch.times())
            if waiting:
                time.sleep(_POLL_S)
        failed = [w.failure for w in watches.values() if w.failure]
        if failed:
            more = f" | and {len(failed) - 3} more of {len(jobs)} jobs" if len(failed) > 3 else ""
            raise JobFailed(" | ".join(failed[:3]) + more)
        return [watches[job.job_id].result for job in jobs]

    @staticmethod
    def _states(job_ids: list[str]) -> dict[str, str]:
        if not job_ids:
            return {}
        out = _slurm("squeue", "-h", "--states=all", "-o", "%i %T", "-j", ",".join(job_ids))
        return dict(line.split(maxsplit=1) for line in out.splitlines() if line.strip())

    # ---- on the node ----
    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict) -> JobReturn:
        self._attempt_start = _IMPORTED_AT  # this process is this attempt
        if _EARLY_WARNINGS:  # submitit's handler exists now
            _EARLY_WARNINGS.clear()
            signal.raise_signal(signal.SIGUSR2)
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        if threads:  # what the job was given, whatever the node has (task/none does not pin the CPUs)
            import torch

            torch.set_num_threads(int(threads))
            threads = torch.get_num_threads()
        rank = int(os.environ.get("SLURM_PROCID", 0))
        # Into the job's log (Hydra sets up logging only inside the task).
        print(f"SLURM job {os.environ.get('SLURM_JOB_ID')}, task {rank} of {os.environ.get('SLURM_NTASKS', 1)}, "
              f"restart {os.environ.get('SLURM_RESTART_COUNT', 0)}, torch threads: {threads or 'the default'}", flush=True)
        if rank > 0:
            from captcha_lit.training.distributed import rank_overrides  # torch: only on the node

            sweep_overrides = [*sweep_overrides, *rank_overrides(self.config.hydra.job.name, rank)]
        try:
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        except SystemExit as exc:
            # An entry point printed its error and exited: submitit reports an exception, not an exit code.
            # -1 is submitit's own exit after it requeued the job.
            if exc.code in (0, None, -1):
                raise
            raise JobFailed(str(exc.__context__ or f"the task exited with code {exc.code}")) from None

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on SIGUSR2 (preemption, or the time limit near) to requeue the job."""
        try:
            left = _seconds(_slurm("squeue", "-h", "-j", os.environ["SLURM_JOB_ID"], "-o", "%L"))
        except ValueError:
            left = None  # no answer: treat it as a preemption, which requeues
        near_limit = left is not None and left <= self.params["signal_delay_s"] + 60
        if near_limit and not self._wrote_checkpoint():
            raise ValueError(
                f"the job reached its time limit (hydra.launcher.timeout_min={self.params['timeout_min']}) before it "
                f"finished an epoch: it wrote no checkpoint in {time.time() - self._attempt_start:.0f} s, so a "
                "requeue would start it over; raise hydra.launcher.timeout_min")
        return super().checkpoint(*args, **kwargs)

    def _wrote_checkpoint(self) -> bool:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return False
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        return any(p.stat().st_mtime >= self._attempt_start for p in run_dir.glob("**/last.ckpt"))

"""Lightning's DDP under Hydra: every process runs this job, in this job's run directory.

``strategy=ddp`` starts the processes of ranks 1..N-1 by running the program again.
Lightning builds that command from ``sys.argv`` plus ``hydra.run.dir=<hydra.run.dir>``.
That is right for a single run started from a shell, but in a multirun ``sys.argv`` is
the whole sweep (each child would start its own sweep), ``hydra.run.dir`` is not the
job's directory, and under a launcher plugin (joblib, submitit) ``sys.argv`` is not this
program at all. So while Lightning starts them, the children get this job's own command:
``python -m captcha_lit.train <the job's overrides> hydra.run.dir=<the job's directory>``.

After the job, the process group and the environment variables that Lightning set for
its children are removed, so the next job of a sweep starts its own processes. Processes
that a cluster starts itself (SLURM tasks, torchrun) are not started by Lightning and
are left alone.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

# What Lightning's launcher sets in this process's environment for the processes it starts.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def rank_overrides(job_name: str, rank: int) -> list[str]:
    """Hydra overrides for a rank other than 0 of a job: its own log file (``<job>_ddp_process_<rank>.log``),
    and no ``.hydra/`` folder, which rank 0 writes. Lightning's children and SLURM's tasks get them."""
    return [f"hydra.job.name={job_name}_ddp_process_{rank}", "hydra.output_subdir=null"]


def child_command(module: str, overrides: list[str], run_dir: str, local_rank: int) -> list[str]:
    """The command that runs one job's rank ``local_rank`` into ``run_dir``."""
    return [sys.executable, "-m", module, *overrides, f'hydra.run.dir="{run_dir}"', "hydra.mode=RUN",
            *rank_overrides(module.rsplit(".", 1)[-1], local_rank)]


@contextlib.contextmanager
def ddp_job(module: str, run_dir: str) -> Iterator[None]:
    """Run one job's fit and test in this block: DDP processes that Lightning starts run this
    Hydra job (see above), and the process is clean for the next job afterwards."""
    from hydra.core.hydra_config import HydraConfig

    try:
        from lightning.pytorch.strategies.launchers import subprocess_script
    except ImportError:  # pragma: no cover - a Lightning without script launchers
        subprocess_script = None
    patch = subprocess_script is not None and hasattr(subprocess_script, "_hydra_subprocess_cmd")
    if patch:
        original = subprocess_script._hydra_subprocess_cmd

        def command(local_rank: int) -> tuple[list[str], str]:
            if not HydraConfig.initialized():
                return original(local_rank)
            hydra_cfg = HydraConfig.get()
            return child_command(module, list(hydra_cfg.overrides.task), run_dir, local_rank), hydra_cfg.runtime.cwd

        subprocess_script._hydra_subprocess_cmd = command
    environ = {key: os.environ.get(key) for key in _LAUNCH_ENV}
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if patch:
            subprocess_script._hydra_subprocess_cmd = original
        if environ["LOCAL_RANK"] is None:  # this process launched the job's processes (or ran alone)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            for key, value in environ.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            torch.set_num_threads(threads)

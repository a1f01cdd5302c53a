"""What to do with a run directory that already holds a run.

A fixed ``hydra.run.dir``, or a sweep re-run with the same ``hydra.sweep.dir``, trains into
a directory used before. With ``resume=auto``:

- a finished run (``metrics.json``) is skipped: its recorded metrics stand, so a re-run
  sweep returns them to the sweeper and trains only the jobs that did not finish;
- an unfinished run with ``checkpoints/last.ckpt`` continues from it: the end of its last
  completed epoch, with weights, optimizer, LR schedule, RNG states and best score, so it
  reaches the same final metrics as a run that was never stopped;
- anything else starts afresh.

Every run records its config in ``run_config.json``; a directory whose run had a different
config is never skipped or continued. With ``resume=false`` (the default) a directory
with checkpoints is an error, as before, except in a job that SLURM runs again
(``SLURM_RESTART_COUNT`` >= 1: requeued after a preemption, a time limit or ``scontrol requeue``):
that directory holds this job's own first try, so it is continued as with ``resume=auto``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig

from captcha_lit.training.builders import MACHINE_DATA_KEYS, to_plain
from captcha_lit.utils import flatten, write_json

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
# How a run is carried out, not what it computes: these may differ between the first try and a resume.
_IGNORED = ("resume", "ckpt_path", "paths", "trainer/default_root_dir", "trainer/enable_progress_bar",
            "trainer/enable_model_summary", *(f"data/{key}" for key in MACHINE_DATA_KEYS))


class ResumePoint(NamedTuple):
    ckpt_path: str | None  # the checkpoint to continue from, if any
    finished: dict | None  # a finished run's metrics.json, if it is to be skipped


def _fingerprint(cfg: DictConfig) -> dict:
    flat = flatten(to_plain(cfg))
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + "/") for i in _IGNORED)}


def _check_same_config(cfg: DictConfig, run_dir: Path) -> None:
    recorded_file = run_dir / RUN_CONFIG
    if not recorded_file.exists():
        return
    recorded, current = json.loads(recorded_file.read_text()), _fingerprint(cfg)
    differing = [f"{k.replace('/', '.')}={recorded.get(k, '<unset>')} there, {current.get(k, '<unset>')} here"
                 for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    if differing:
        raise ValueError(
            f"run directory {run_dir} holds a run with a different config ({'; '.join(differing[:4])}"
            + (f"; and {len(differing) - 4} more" if len(differing) > 4 else "")
            + "), so resume=auto can neither skip nor continue it; train into a new directory "
            "(hydra.run.dir or hydra.sweep.dir)"
        )


def _clear_unfinished_first_epoch(cfg: DictConfig, ckpt_dir: Path, is_rank_zero: bool) -> None:
    """No completed epoch to continue from: start afresh. A checkpoint that a crash left in the middle of
    the first epoch goes, or Lightning would resume from it silently (and not exactly)."""
    existing = sorted(ckpt_dir.glob("*.ckpt"))
    crash_files = {f"{c.get('filename')}.ckpt" for c in (cfg.get("callbacks") or {}).values()
                   if c is not None and str(c.get("_target_", "")).endswith("OnExceptionCheckpoint")}
    if any(p.name not in crash_files for p in existing):
        raise ValueError(
            f"resume=auto: {ckpt_dir} has checkpoints ({', '.join(p.name for p in existing)}) but no last.ckpt, the "
            "end of a completed epoch (callbacks.last_checkpoint writes it); pass "
            "ckpt_path=<one of them> to resume from it, or delete them to start afresh"
        )
    if existing and is_rank_zero:
        log.warning("resume=auto: %s stopped within its first epoch; starting afresh", ckpt_dir.parent)
        for path in existing:
            path.unlink()


def resume_point(cfg: DictConfig, run_dir: str | Path, is_rank_zero: bool = True) -> ResumePoint:
    """Decide how ``train`` starts in ``run_dir`` (see the module docstring); record the config of a new run."""
    run_dir = Path(run_dir)
    mode = cfg.get("resume")
    if mode not in (None, False, "auto"):
        raise ValueError(f"resume={mode!r}: use resume=auto (skip a finished run in the run directory, continue an "
                         "unfinished one) or resume=false (an existing run there is an error)")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts and not mode:
        log.info("SLURM runs this job again (restart %d): continuing it as with resume=auto", restarts)
        mode = "auto"
    ckpt_dir = run_dir / "checkpoints"
    if cfg.get("ckpt_path"):
        pass  # an explicit checkpoint: the user chose
    elif mode == "auto":
        _check_same_config(cfg, run_dir)
        metrics_file = run_dir / "metrics.json"
        if metrics_file.exists():
            log.info("resume=auto: %s holds a finished run; skipping it", run_dir)
            return ResumePoint(None, json.loads(metrics_file.read_text()))
        if (ckpt_dir / "last.ckpt").exists():
            log.info("resume=auto: continuing the run in %s from %s", run_dir, ckpt_dir / "last.ckpt")
            return ResumePoint(str(ckpt_dir / "last.ckpt"), None)
        _clear_unfinished_first_epoch(cfg, ckpt_dir, is_rank_zero)
    else:
        existing = sorted(ckpt_dir.glob("*.ckpt"))
        if existing:
            # Lightning would silently resume from them; make the choice explicit instead.
            resume = ckpt_dir / "last.ckpt" if (ckpt_dir / "last.ckpt").exists() else existing[-1]
            raise ValueError(
                f"run directory {run_dir} already has checkpoints ({', '.join(p.name for p in existing)}); "
                f"pass resume=auto to continue (or skip) that run, ckpt_path={resume} to resume from a checkpoint "
                "of your choice, or train into a new directory"
            )
    if is_rank_zero and not (run_dir / RUN_CONFIG).exists():
        write_json(run_dir / RUN_CONFIG, _fingerprint(cfg))
    return ResumePoint(cfg.get("ckpt_path") or None, None)

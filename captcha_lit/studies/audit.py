"""How many labels and CPU minutes a CAPTCHA scheme takes to break: ``python -m captcha_lit.audit``.

1. The folder is read once: its split, and the size of the training split that the label
   counts are checked against (the decoded images land in the cache that every run reads).
2. The grid's unfinished points run as one multirun of the train entry point on the audit's
   Hydra launcher (``captcha_lit.studies.grid``), under a progress bar; their output goes to
   ``grid.log``. Every train override given to the audit applies to every run.
3. Every point's figures are read back and the report is written (``captcha_lit.studies.report``).

The audit's folder (``outputs/audit/<folder name>``, or ``hydra.run.dir``) holds it all, and
the same command again continues there: finished points are kept, unfinished ones resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shlex
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from captcha_lit.studies.grid import (LABELS_KEY, RUNS, grid_axes, grid_points, is_finished, label_counts,
                                      override_value, run_grid, train_command)
from captcha_lit.studies.report import AuditFacts, write_report
from captcha_lit.studies.results import headline, read_result, summary_line
from captcha_lit.training.builders import build_datamodule
from captcha_lit.utils import machine_description, output_dir, write_json

log = logging.getLogger(__name__)

RECORD = "audit.json"  # the train overrides the audit's runs were started with
GRID_LOG = "grid.log"
# How the runs are carried out, not what they compute: no part of what a re-run must match.
_HOW = ("trainer.enable_progress_bar=false",)


def _audit_name(*, _root_) -> str:
    path = OmegaConf.select(_root_, "data.path", default=None, throw_on_missing=False)
    return Path(os.path.expanduser(str(path))).resolve().name if path not in (None, "", "???") else "unnamed"


# ${captcha_lit.audit_name:} in conf/audit.yaml: the audited folder's name, for the audit's own folder.
if not OmegaConf.has_resolver("captcha_lit.audit_name"):
    OmegaConf.register_new_resolver("captcha_lit.audit_name", _audit_name)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def forwarded_overrides(task_overrides: Sequence[str], data_choice: str, root: Path, axis_keys: Sequence[str]) -> list[str]:
    """The audit's train overrides, for every run: its own (``audit.*``) and the grid's keys left out,
    ``data=`` made explicit, and ``data.path`` absolute, so a launcher's job finds it from anywhere."""
    fixed = []
    for override in task_overrides:
        key = _key(override)
        if key == "audit" or key.startswith("audit.") or key in axis_keys:
            continue
        fixed.append(f"data.path={override_value(str(root))}" if key == "data.path" else override)
    if not any(_key(o) == "data" for o in fixed):
        fixed.insert(0, f"data={data_choice}")
    return fixed


def _folder(cfg: DictConfig):
    if cfg.data.get("source") != "folder":
        raise ValueError(f"data.source={cfg.data.get('source')!r}: the audit reads a folder of labeled images; "
                         "pass data.path=DIR (with data=folder, the default)")
    if cfg.data.get("train_limit") is not None:
        raise ValueError(f"{LABELS_KEY}={cfg.data.train_limit}: the audit sets it for each point; pass the label "
                         "counts as audit.labels=[25,50,all]")
    datamodule = build_datamodule(cfg.data, cfg.get("augmentation"))
    datamodule.prepare_data()
    return datamodule


@contextlib.contextmanager
def _only_audit_in(out_dir: Path) -> Iterator[None]:
    with open(out_dir / ".audit.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another audit is running in {out_dir}; wait for it to end, or audit into another "
                             "folder with hydra.run.dir=DIR") from None
        yield


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler, ``kill``) stops the audit as Ctrl-C does, so its runs stop cleanly too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_record(out_dir: Path, fixed: list[str]) -> None:
    record = out_dir / RECORD
    if record.is_file():
        before = json.loads(record.read_text()).get("train_overrides")
        if before != fixed:
            raise ValueError(f"{out_dir} holds an audit whose runs had other train overrides ({' '.join(before)} there, "
                             f"{' '.join(fixed)} here); continue it with the overrides it was started with, or audit "
                             "into a new folder with hydra.run.dir=DIR")
    else:
        write_json(record, {"train_overrides": fixed})


def _failure(log_path: Path, code: int) -> str:
    with open(log_path, "rb") as handle:
        handle.seek(max(0, log_path.stat().st_size - 20000))
        lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    cause = errors[-1].removeprefix("error: ") if errors else (lines[-1] if lines else f"exit code {code}")
    return (f"a training run of the audit failed: {cause} (its output: {log_path}); the finished points are kept, "
            "so fix it and run the same command again")


def audit(cfg: DictConfig, task_overrides: Sequence[str] = (), hydra_overrides: Sequence[str] = ()) -> dict:
    """Run (or continue) the grid, then write the report; return the summary and each point's figures."""
    missing = [name for name in ("matplotlib",) if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"the audit's report needs {', '.join(missing)}; install it with pip install -e '.[viz]'")
    settings = cfg.audit
    for key in ("coverage", "target"):
        if not 0.0 < float(settings[key]) <= 1.0:
            raise ValueError(f"audit.{key}={settings[key]} must be in (0, 1]")
    out_dir = Path(output_dir(cfg))
    datamodule = _folder(cfg)
    split = {name: len(files) for name, files in datamodule.files.items()}
    labels = label_counts(OmegaConf.to_container(settings.labels) if OmegaConf.is_config(settings.labels)
                          else settings.labels, split["train"], datamodule.root)
    axes = grid_axes(cfg)
    points = grid_points(labels, axes)
    data_choice = _data_choice()
    fixed = forwarded_overrides(task_overrides, data_choice, datamodule.root, [LABELS_KEY, *(k for k, _ in axes)])
    how = [o for o in _HOW if _key(o) not in {_key(f) for f in fixed}]
    launcher = [o for o in hydra_overrides if _key(o).startswith(("hydra/launcher", "hydra.launcher"))]
    # The audit's folder (hydra.run.dir) and launcher are part of "the same command".
    command = shlex.join(["python", "-m", "captcha_lit.audit", *task_overrides,
                          *(o for o in hydra_overrides if _key(o) != "hydra.mode")])
    sweep_dir = out_dir / RUNS
    with _only_audit_in(out_dir):
        _check_record(out_dir, fixed)
        todo = [p for p in points if not is_finished(p, sweep_dir)]
        if todo:
            if len(todo) < len(points):
                log.info("continuing the audit in %s: %d of %d points finished", out_dir, len(points) - len(todo),
                         len(points))
            log.info("training %d point(s) of the grid; their output goes to %s", len(todo), out_dir / GRID_LOG)
            try:
                with _sigterm_interrupts():
                    code = run_grid(train_command([*fixed, *how], todo, axes, sweep_dir, launcher), points, sweep_dir,
                                    out_dir / GRID_LOG)
            except KeyboardInterrupt:
                done = sum(is_finished(p, sweep_dir) for p in points)
                raise KeyboardInterrupt(
                    f"{done} of {len(points)} points of the audit finished and are kept in {sweep_dir}; run the same "
                    f"command again to continue (unfinished points resume from their last epoch): {command}") from None
            if code:
                raise ValueError(_failure(out_dir / GRID_LOG, code))
            left = [p.dirname for p in points if not is_finished(p, sweep_dir)]
            if left:
                raise ValueError(f"the launcher ended without finishing {', '.join(left)} (see {out_dir / GRID_LOG}); "
                                 "run the same command again to continue")
        else:
            log.info("every point of the audit in %s has finished; writing its report", out_dir)

    results = [read_result(p, sweep_dir, float(settings.coverage)) for p in points]
    solver, reached = headline(results, float(settings.target))
    machine = machine_description()
    summary = summary_line(solver, reached, float(settings.target), float(settings.coverage), split["train"], machine)
    train = shlex.join(["python", "-m", "captcha_lit.train", *fixed, f"{LABELS_KEY}={solver.point.labels}",
                        *(f"{k}={override_value(v)}" for k, v in solver.point.settings)])
    facts = AuditFacts(root=datamodule.root, split=split, machine=solver.machine or machine, command=command,
                       summary=summary, solver=solver, coverage=float(settings.coverage), train_command=train,
                       confused_pairs=int(settings.confused_pairs), sample_errors=int(settings.sample_errors))
    files = write_report(out_dir, results, facts)
    print(f"\n{summary}\n\nreport: {files['html']} (and {files['md'].name}); results: {files['results']}")
    return {"summary": summary, "points": [r.row() for r in results], "files": {k: str(v) for k, v in files.items()}}


def _data_choice() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("data") or "folder"

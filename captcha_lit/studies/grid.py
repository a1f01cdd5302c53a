"""An audit's grid: label counts crossed with other train overrides, run as one multirun of
``python -m captcha_lit.train`` on whatever Hydra launcher the audit was given.

- **Points.** Every label count (``data.train_limit``: the folder split takes a fixed prefix of
  its hash ranking, so each smaller count is a subset of a larger one, and val and test are the
  same for all) is crossed with every value of each axis of ``audit.grid`` (a train key and its
  values, e.g. ``pretrain: [none, auto]``). A ``data.unlabeled_path`` adds an axis with and
  without it (self-training).
- **Job folders.** ``hydra.sweep.subdir`` names each job by its values
  (``runs/labels=100,pretrain=auto``), whatever order or launcher ran it, so finished points are
  found again: a point is finished when its folder holds ``metrics.json``.
- **Resuming.** Every job runs with ``resume=auto``: re-launching skips finished jobs and
  continues unfinished ones from their last completed epoch. Only the values that unfinished
  points need are launched again.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

# The label counts that audit.labels=auto climbs, up to the size of the training split.
LADDER = (25, 50, 100, 200, 500)
LABELS_KEY = "data.train_limit"
SELF_TRAINING_KEY = "data.unlabeled_path"
RUNS = "runs"  # the sweep folder inside the audit's folder
BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt} points |{bar}| {elapsed}{postfix}"
_ABSENT = object()


@dataclass(frozen=True)
class Point:
    """One training run of the grid: a label count and a value for each other axis."""

    labels: int
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def variant(self) -> str:
        """The values of the other axes, e.g. ``pretrain=auto``; empty without other axes."""
        return ", ".join(f"{key}={_shown(value)}" for key, value in self.settings)

    @property
    def dirname(self) -> str:
        """The job folder that ``subdir_pattern`` gives this point."""
        return ",".join([f"labels={self.labels}", *(f"{key}={_shown(value)}" for key, value in self.settings)])


def _shown(value: Any) -> str:
    return str(value)  # how OmegaConf writes a value interpolated into a string (None -> "None")


def subdir_pattern(axes: Sequence[tuple[str, list]]) -> str:
    """``hydra.sweep.subdir`` that names a job by its values: ``Point.dirname``, resolved in the job."""
    return ",".join(["labels=${%s}" % LABELS_KEY, *(f"{key}=${{{key}}}" for key, _ in axes)])


def label_counts(requested: Any, num_train: int, root: Path) -> list[int]:
    """``audit.labels`` -> sorted label counts. ``auto``: the LADDER below the training split's
    size, then all of it; a list may hold numbers and ``all``."""
    if requested == "auto":
        return [n for n in LADDER if n < num_train] + [num_train]
    if not isinstance(requested, (list, tuple, ListConfig)) or not len(requested):
        raise ValueError(f"audit.labels={requested!r} must be auto or a list of label counts, e.g. [25,50,100,all]")
    counts = set()
    for value in requested:
        if value == "all":
            counts.add(num_train)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"audit.labels has {value!r}: each label count must be a whole number >= 1 or all")
        elif value > num_train:
            raise ValueError(f"audit.labels has {value}, more than the {num_train} images of the training split of "
                             f"{root}; use counts up to {num_train}, or all")
        else:
            counts.add(value)
    return sorted(counts)


def grid_axes(cfg: DictConfig) -> list[tuple[str, list]]:
    """The axes besides the label count: ``audit.grid``'s, then self-training where
    ``data.unlabeled_path`` is given. Each key must be one of the train config's."""
    axes = []
    grid = _flat(cfg.audit.get("grid") or {})
    for key, values in grid.items():
        if key == LABELS_KEY:
            raise ValueError(f"audit.grid.{LABELS_KEY}: the label counts are audit.labels=[...]")
        if OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is _ABSENT:
            raise ValueError(f"audit.grid has the axis {key!r}, which is not a key of the train config; "
                             "give each axis a train key and its values, e.g. +audit.grid.seed=[42,43]")
        values = OmegaConf.to_container(values) if isinstance(values, ListConfig) else [values]
        if not values:
            raise ValueError(f"audit.grid.{key} is empty; give it at least one value")
        axes.append((key, values))
    unlabeled = OmegaConf.select(cfg, SELF_TRAINING_KEY, default=None)
    if unlabeled is not None and SELF_TRAINING_KEY not in grid:
        axes.append((SELF_TRAINING_KEY, [None, unlabeled]))
    return axes


def _flat(node: DictConfig, prefix: str = "") -> dict:
    """``{model: {dim: [32, 64]}}`` (from ``+audit.grid.model.dim=[32,64]``) -> ``{"model.dim": [32, 64]}``."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, DictConfig):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def grid_points(labels: Sequence[int], axes: Sequence[tuple[str, list]]) -> list[Point]:
    keys = [key for key, _ in axes]
    return [Point(n, tuple(zip(keys, combo))) for n in labels for combo in itertools.product(*(v for _, v in axes))]


def is_finished(point: Point, sweep_dir: Path) -> bool:
    return (sweep_dir / point.dirname / "metrics.json").is_file()


def override_value(value: Any) -> str:
    """A Python value as Hydra override syntax; a string is quoted where Hydra would read it as something
    else (``'null'``, ``'1'``, ``'a,b'``), so every job gets exactly the value given."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _parses_as(text) == text:
        return text  # a plain string, e.g. a path, reads as itself unquoted
    return "'" + text.replace("'", "\\'") + "'"


def _parses_as(text: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(f"key={text}").value()
    except HydraException:
        return None


def train_command(fixed: Sequence[str], todo: Sequence[Point], axes: Sequence[tuple[str, list]], sweep_dir: Path,
                  launcher: Sequence[str]) -> list[str]:
    """One multirun of the train entry point over the values that the unfinished points ``todo`` need."""
    sweep = [f"{LABELS_KEY}=" + ",".join(str(n) for n in sorted({p.labels for p in todo}))]
    for i, (key, values) in enumerate(axes):
        needed = [v for v in values if any(p.settings[i][1] == v for p in todo)]
        sweep.append(f"{key}=" + ",".join(override_value(v) for v in needed))
    return [sys.executable, "-m", "captcha_lit.train", "-m", *fixed, "resume=auto",
            f"hydra.sweep.dir={override_value(str(sweep_dir))}",
            f"hydra.sweep.subdir={override_value(subdir_pattern(axes))}", *sweep, *launcher]


def _start_run() -> None:
    # The runs must take the SIGINT that _stop sends them even when the audit was started with SIGINT
    # ignored (a background job of a non-interactive shell), which exec would otherwise pass on.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # A killed audit must not leave its training runs behind: a re-run would race them for the same folders.
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def run_grid(command: Sequence[str], points: Sequence[Point], sweep_dir: Path, log_path: Path,
             poll_s: float = 1.0) -> int:
    """Run ``command`` (its output into ``log_path``) with a progress bar over ``points``; its exit code.

    On KeyboardInterrupt the runs get SIGINT (Lightning then stops at the next step), then SIGKILL
    after a minute; the interrupt goes on to the caller."""
    from tqdm import tqdm

    def finished() -> int:
        return sum(is_finished(p, sweep_dir) for p in points)

    def running() -> str:
        names = [p.dirname for p in points if (sweep_dir / p.dirname).is_dir() and not is_finished(p, sweep_dir)]
        return ("running " + " ".join(names[:3])) if names else ""

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as output, tqdm(total=len(points), initial=finished(), desc="audit", dynamic_ncols=True,
                                              bar_format=BAR_FORMAT) as bar:
        proc = subprocess.Popen(list(command), stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_start_run)
        ticking = hasattr(bar.fp, "isatty") and bar.fp.isatty()
        try:
            while proc.poll() is None:
                time.sleep(poll_s)
                now = (finished(), running())
                if now != (bar.n, bar.postfix):
                    bar.set_postfix_str(now[1], refresh=False)
                    bar.update(now[0] - bar.n)
                    bar.refresh()
                elif ticking:  # the elapsed time moves on a terminal; a log gets a line per change only
                    bar.refresh()
        except BaseException:
            _stop(proc)
            raise
        finally:
            bar.update(finished() - bar.n)
    return proc.returncode


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGINT, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue

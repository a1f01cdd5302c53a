"""Small helpers shared by the entry points and the torch-free runtime.

Only the standard library is imported at run time (omegaconf only for type hints), so
``captcha_lit.deploy.runtime`` can use this module and still need just onnxruntime,
Pillow and numpy.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig) -> str:
    """The run directory: paths.output_dir (Hydra's run dir unless a test overrides it)."""
    out = str(cfg.paths.output_dir)
    Path(out).mkdir(parents=True, exist_ok=True)
    return out


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, which a container or ``taskset``
    can set below ``os.cpu_count()``."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_description() -> str:
    """``AMD EPYC, 2 cores, 24 GiB``: the CPU model, the cores this process may use, and memory."""
    model, memory_gib = platform.processor() or platform.machine(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = int(line.split()[1]) / 2**20  # the file counts in KiB
                break
    except OSError:  # not Linux
        pass
    cores = available_cores()
    parts = [model or "unknown CPU", f"{cores} cores"]
    if memory_gib is not None:
        parts.append(f"{memory_gib:.0f} GiB")
    return ", ".join(parts)


# kind -> (how to pass one, how to get one, its file suffix)
_MODEL_PATH_HINTS = {
    "checkpoint": ("pass ckpt_path=PATH (train one with `make train`)",
                   "train one with `make train` or `python -m captcha_lit.train`, then look in "
                   "outputs/train/runs/*/checkpoints/", ".ckpt"),
    "model": ("pass the path of an exported .onnx file",
              "export one with `python -m captcha_lit.export ckpt_path=PATH`", ".onnx"),
}


def check_model_path(path: str | os.PathLike | None, kind: str) -> Path:
    """An existing file for a ``kind`` of model ("checkpoint" or "model", an exported .onnx),
    or an error that says what is wrong and how to get one."""
    if kind not in _MODEL_PATH_HINTS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(_MODEL_PATH_HINTS)}")
    how_to_pass, how_to_get, suffix = _MODEL_PATH_HINTS[kind]
    if path is None or str(path) in ("", "???"):
        raise ValueError(f"no {kind} given: {how_to_pass}")
    file = Path(os.path.expanduser(str(path)))
    if not file.exists():
        raise FileNotFoundError(f"{kind} {str(file)!r} does not exist; {how_to_get}")
    if file.is_dir():
        raise ValueError(f"{kind} {str(file)!r} is a directory; pass the {suffix} file inside it")
    return file


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, default=str)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def flatten(tree: Any, prefix: str = "") -> dict:
    """Nested dicts/lists -> {"a/b": scalar}, for TensorBoard's hparams table."""
    flat: dict = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}/"))
    elif isinstance(tree, (list, tuple)):
        flat[prefix.rstrip("/")] = str(list(tree))
    else:
        flat[prefix.rstrip("/")] = tree if isinstance(tree, (int, float, str, bool)) or tree is None else str(tree)
    return {k: ("null" if v is None else v) for k, v in flat.items()}


def entry_point(fn: Callable) -> Callable:
    """Bad input from the user (ValueError, FileNotFoundError) ends the program with a one-line
    error and exit code 2 instead of a traceback from deep inside a library.
    ``CAPTCHA_LIT_DEBUG=1`` shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as exc:
            if os.environ.get("CAPTCHA_LIT_DEBUG"):
                raise
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            print(f"\ninterrupted: {exc}" if str(exc) else "\ninterrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper

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
    """``AMD EPYC (AVX512-BF16 VNNI), 2 cores, 24 GiB``: the CPU model with the instruction sets that
    set this project's speed (``cpu_features``), the cores this process may use, and memory."""
    model, flags = cpu_model_and_flags()
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = int(line.split()[1]) / 2**20  # the file counts in KiB
                break
    except OSError:  # not Linux
        pass
    features = cpu_features(flags)
    parts = [model + (f" ({' '.join(features)})" if features else ""), f"{available_cores()} cores"]
    if memory_gib is not None:
        parts.append(f"{memory_gib:.0f} GiB")
    return ", ".join(parts)


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags, from Linux's ``/proc/cpuinfo`` (elsewhere what
    ``platform`` knows, and no flags)."""
    model, flags = platform.processor() or platform.machine() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip() or model
            elif line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    except OSError:  # not Linux
        pass
    return model, flags


def cpu_features(flags: set[str]) -> list[str]:
    """The instruction sets, of a CPU's ``/proc/cpuinfo`` flags, that decide how fast this project
    runs there: bf16 training (AMX or AVX512-BF16; without either, training runs in fp32), else the
    vector width (AVX-512, AVX2); and integer dot products (VNNI, part of AMX's CPUs), which int8
    inference needs to pay. One CPU model name covers machines with and without them (a virtual
    machine's "AMD EPYC" may offer AVX512-BF16 one day and AVX2 alone the next), so figures measured
    on them only compare with these named."""
    if "amx_bf16" in flags:
        return ["AMX"]
    width = next((name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
                  if flag in flags), None)
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    return [name for name in (width, "VNNI" if vnni else None) if name]


def parallel_jobs(launcher: Any) -> int:
    """How many jobs a Hydra launcher config runs at once on this machine: joblib's ``n_jobs``
    (negative counts back from the cores, as joblib does); 1 for launchers that run one job at
    a time here (basic) or each on its own machine or allocation (submitit, SLURM)."""
    if launcher is None or "n_jobs" not in launcher:
        return 1
    n_jobs = launcher.get("n_jobs")
    cores = available_cores()
    if n_jobs is None:
        return 1
    n_jobs = int(n_jobs)
    return max(1, min(cores, n_jobs if n_jobs > 0 else cores + 1 + n_jobs))


def job_cores(parallel: int = 1) -> int:
    """The cores one of ``parallel`` jobs running side by side on this machine may use: an equal
    share of ``available_cores()``, at least 1. Threads beyond it only oversubscribe the cores."""
    return max(1, available_cores() // max(1, int(parallel)))


def run_cores() -> int:
    """The cores this run may use: all of ``available_cores()``, or its share of them when Hydra's
    launcher runs several jobs of a multirun side by side on this machine (joblib)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # not under Hydra
        return available_cores()
    if str(hydra_cfg.get("mode")) != "RunMode.MULTIRUN":
        return available_cores()
    return job_cores(parallel_jobs(hydra_cfg.get("launcher")))


def set_torch_threads(cores: int) -> None:
    """Size torch's intra-op pool (and inter-op pool, when still possible) to ``cores``."""
    import torch

    torch.set_num_threads(int(cores))
    try:
        torch.set_num_interop_threads(int(cores))
    except RuntimeError:  # only possible before the first parallel work of the process
        pass


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory a training step frees for the next step.

    By default it hands large blocks and the heap's free top back to the kernel, so every step
    page-faults its activations in again (several hundred faults a step of the default model).
    The process keeps what its largest step needed instead. Returns whether the C library took
    the settings (only glibc has them; elsewhere nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 256 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


CACHE_ENV = "CAPTCHA_LIT_CACHE"


def default_cache_dir() -> str:
    """Where generated data is cached on this machine: ``$CAPTCHA_LIT_CACHE`` or ``~/.cache/captcha_lit``
    (conf/data/synthetic.yaml's ``cache_dir`` says the same)."""
    return os.environ.get(CACHE_ENV) or "~/.cache/captcha_lit"


def require_extra(what: str, extra: str, *modules: str) -> None:
    """A one-line error naming the extra to install when one of ``modules`` is missing."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"{what} needs {', '.join(missing)}, which is not installed: pip install -e '.[{extra}]' "
                         f"(or pip install 'captcha_lit[{extra}]')")


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

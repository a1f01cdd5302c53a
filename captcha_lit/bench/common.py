"""What every benchmark module uses: the repository root, the composed train config, medians,
percentiles and the memory of a process tree."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def median(values):
    """The median of the values that were measured (``None`` marks a missing one), else ``None``."""
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def compose(overrides: list[str], config_name: str = "train"):
    """``conf/<config_name>.yaml`` with ``overrides``, composed as ``python -m captcha_lit.<config_name>`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import captcha_lit.training.builders  # noqa: F401  (registers the model=NAME configs)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def default_input_shape() -> tuple[int, int, int]:
    """(height, width, channels) of the default recipe's model input."""
    data = compose([]).data
    height, width = (int(v) for v in data.input_size)
    return height, width, 1 if data.get("grayscale") else 3


def process_tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and all its descendants (0 once it has exited)."""
    return process_tree_memory(pid)[0]


def _proportional_bytes(pid: int) -> int | None:
    """The process's PSS: its private pages plus its share of each page it shares with others
    (forked workers and the memory-mapped data cache), from ``/proc/PID/smaps_rollup`` (Linux)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes summed over process ``pid`` and all its descendants; (0, 0) once it has exited.

    Summed RSS counts a page once for every process that maps it, so a parent with forked workers
    writing into one shared array shows that array up to three times. Summed PSS splits each shared
    page among the processes that map it: the physical memory the tree holds. Where the kernel has
    no ``smaps_rollup``, PSS falls back to RSS."""
    import psutil

    try:
        process = psutil.Process(pid)
        processes = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    rss = pss = 0
    for member in processes:
        try:
            resident = member.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        proportional = _proportional_bytes(member.pid)
        rss += resident
        pss += resident if proportional is None else proportional
    return rss, pss

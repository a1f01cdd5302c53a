"""On-disk cache of generated splits: atomic, locked, self-checking.

Layout: ``<cache_dir>/<name>-<key>/`` holds ``images.npy`` (N, H, W, 3 uint8),
``labels.json`` and ``meta.json``. A split is built in a temporary sibling folder
and moved into place with one ``rename``, so readers never see half a split. An
exclusive ``flock`` makes concurrent jobs (e.g. a sweep) build it once; the others
wait and then reuse it. ``meta.json`` records the shape and a digest of a sample of
rows, so a truncated or altered split is detected and rebuilt.

SIGTERM or SIGHUP during a build removes its temporary folder, like Ctrl-C does; a
build killed outright (SIGKILL, power loss) leaves it behind, and the next build in
the same cache removes it: a temporary folder whose split nobody holds the lock of is
dead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Part of every cache key: a change to what a key holds or how a split is stored bumps it.
FORMAT_VERSION = 2


def cache_key(fields: dict) -> str:
    payload = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _sample_digest(images: np.ndarray, labels: list[str]) -> str:
    """Digest of the labels and of up to 64 evenly spaced image rows (cheap on 100k images)."""
    h = hashlib.sha256()
    h.update(json.dumps(labels).encode())
    n = len(images)
    if n:
        for i in sorted(set(np.linspace(0, n - 1, num=min(n, 64)).astype(int).tolist())):
            h.update(np.ascontiguousarray(images[i]).tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float = 3600.0) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - start > timeout_s:
                    raise TimeoutError(f"waited {timeout_s:.0f}s for the cache lock {path}; is another job stuck?")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _try_lock(path: Path):
    """An open handle holding ``path``'s exclusive lock, or None while another process holds it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


_TMP = re.compile(r"^\.tmp-(?P<split>.+-[0-9a-f]{16})-\d+$")


def remove_dead_builds(root: Path, held: str) -> list[Path]:
    """Remove the temporary folders of builds that died in ``root``; ``held`` is the split whose
    lock the caller holds (its leftovers are dead by definition). Returns what was removed."""
    removed = []
    for folder in sorted(root.glob(".tmp-*")):
        match = _TMP.match(folder.name)
        if match is None or not folder.is_dir():
            continue
        split = match["split"]
        handle = None if split == held else _try_lock(root / f".{split}.lock")
        if split != held and handle is None:
            continue  # a live build of another split
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            if handle is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                handle.close()
    if removed:
        log.warning("removed %d temporary folder(s) of builds that died: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


class _Terminated(SystemExit):
    """SIGTERM or SIGHUP during a build: unwinds it (removing its temporary folder), then exits."""


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception while building, so the cleanup code runs.
    Signal handlers can only be set from the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum, frame):
        raise _Terminated(128 + signum)

    previous = {sig: signal.signal(sig, unwind) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class CorruptCacheError(RuntimeError):
    pass


def load_split(folder: Path, mmap: bool = True) -> tuple[list[str], np.ndarray, dict]:
    """Load and verify a cached split; raises CorruptCacheError naming what is wrong."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        labels = json.loads((folder / "labels.json").read_text())
        images = np.load(folder / "images.npy", mmap_mode="r" if mmap else None)
    except FileNotFoundError as exc:
        raise CorruptCacheError(f"{folder}: missing {Path(exc.filename).name}") from None
    except (ValueError, OSError, EOFError, json.JSONDecodeError) as exc:  # EOFError: empty images.npy
        raise CorruptCacheError(f"{folder}: unreadable ({exc})") from None
    expected = tuple(meta.get("shape", ()))
    if images.shape != expected or images.dtype != np.uint8:
        raise CorruptCacheError(f"{folder}: images have shape {images.shape} {images.dtype}, expected {expected} uint8")
    if len(labels) != expected[0]:
        raise CorruptCacheError(f"{folder}: {len(labels)} labels for {expected[0]} images")
    if _sample_digest(images, labels) != meta.get("digest"):
        raise CorruptCacheError(f"{folder}: content digest does not match meta.json")
    return labels, images, meta


def get_or_build(
    cache_dir: str | os.PathLike,
    name: str,
    key_fields: dict,
    count: int,
    build: Callable[[np.ndarray], list[str]],
    shape: tuple[int, int, int],
) -> tuple[list[str], np.ndarray]:
    """Return (labels, images) for a split, building it with ``build(out)`` if needed.

    ``build`` fills ``out`` (a writable memmap of ``(count, *shape)``) and returns the labels.
    """
    root = Path(os.path.expanduser(str(cache_dir)))
    key = cache_key({**key_fields, "count": count})
    folder = root / f"{name}-{key}"
    if (folder / "meta.json").exists():
        try:
            labels, images, _ = load_split(folder)
            return labels, images
        except CorruptCacheError as exc:
            log.warning("cache is corrupt, rebuilding: %s", exc)
    with file_lock(root / f".{name}-{key}.lock"):
        # Another job may have built it while we waited for the lock.
        if folder.exists():
            try:
                labels, images, _ = load_split(folder)
                return labels, images
            except CorruptCacheError as exc:
                log.warning("cache is corrupt, rebuilding: %s", exc)
                shutil.rmtree(folder, ignore_errors=True)
        remove_dead_builds(root, f"{name}-{key}")
        tmp = root / f".tmp-{name}-{key}-{os.getpid()}"
        tmp.mkdir(parents=True)
        with _signals_unwind():
            try:
                out = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(count, *shape))
                labels = build(out)
                out.flush()
                digest = _sample_digest(out, labels)
                del out
                (tmp / "labels.json").write_text(json.dumps(labels))
                meta = {"format": FORMAT_VERSION, "shape": [count, *shape], "digest": digest, "fields": key_fields,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
                for f in tmp.iterdir():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                os.rename(tmp, folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    labels, images, _ = load_split(folder)
    return labels, images

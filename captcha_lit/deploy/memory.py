"""A server process's memory: its heap after large requests, and its garbage collector.

glibc keeps freed heap memory for reuse, in one arena per thread, so a server's RSS grows to
its largest burst of request bodies (two-megabyte JSON batches, their parsed strings) and
stays there. Buffers of 256 KB and more are mapped on their own instead, and unmapped when
freed; after a large request, the free pages inside the heap go back too. (The heap calls are
glibc's; elsewhere they do nothing.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

LARGE_BODY_BYTES = 256 * 1024
_libc = None


def _glibc():
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt, libc.malloc_trim  # noqa: B018 - both exist only in glibc
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def return_freed_memory() -> None:
    """Set this process's allocator to give large freed buffers back to the system."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, LARGE_BODY_BYTES)  # M_MMAP_THRESHOLD (fixed: no longer raised by what is freed)
        libc.mallopt(-8, 2)  # M_ARENA_MAX: the event loop's, decode and model threads share two arenas


def trim_heap() -> None:
    """Give the free pages inside the heap back to the system (a fraction of a millisecond)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def freeze_startup_objects() -> None:
    """Exempt every object alive now from the garbage collector's full passes.

    A server process holds about 65,000 objects once its app and model are loaded (modules,
    classes, FastAPI's routes and schemas). Each full collection walks them all, about 17 ms
    on a slow core, and stalls every request in flight in that process, which is what the
    99th-percentile latency sees. They live as long as the process, so checking them is wasted.
    """
    gc.collect()
    gc.freeze()

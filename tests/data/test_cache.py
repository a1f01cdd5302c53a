"""The on-disk split cache: reuse, corruption detection, leftovers and concurrent builders.

This module imports no torch, so the processes it spawns start quickly.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from captcha_lit.data import cache

SHAPE = (4, 6, 3)
COUNT = 5
FIELDS = {"kind": "test", "seed": 1}


def _fill(out: np.ndarray) -> list[str]:
    for i in range(len(out)):
        out[i] = (np.arange(np.prod(SHAPE)).reshape(SHAPE) + 17 * i) % 256
    return [f"L{i}" for i in range(len(out))]


class CountingBuild:
    def __init__(self):
        self.calls = 0

    def __call__(self, out: np.ndarray) -> list[str]:
        self.calls += 1
        return _fill(out)


def _get(root: Path, build, fields=FIELDS, count=COUNT):
    return cache.get_or_build(root, "unit", fields, count, build, SHAPE)


def _split_folder(root: Path) -> Path:
    folders = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("unit-")]
    assert len(folders) == 1, folders
    return folders[0]


def _expected_images() -> np.ndarray:
    out = np.empty((COUNT, *SHAPE), dtype=np.uint8)
    _fill(out)
    return out


def test_builds_once_then_reuses(tmp_path):
    build = CountingBuild()
    labels, images = _get(tmp_path, build)
    assert build.calls == 1
    assert labels == [f"L{i}" for i in range(COUNT)]
    assert images.shape == (COUNT, *SHAPE) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, _expected_images())

    labels2, images2 = _get(tmp_path, build)
    assert build.calls == 1, "the second call must reuse the cached split"
    assert labels2 == labels
    np.testing.assert_array_equal(images2, images)

    folder = _split_folder(tmp_path)
    assert {p.name for p in folder.iterdir()} == {"images.npy", "labels.json", "meta.json"}
    # no temporary folders left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_different_fields_or_count_build_separately(tmp_path):
    build = CountingBuild()
    _get(tmp_path, build)
    _get(tmp_path, build, fields={**FIELDS, "seed": 2})
    _get(tmp_path, build, count=COUNT + 1)
    assert build.calls == 3
    _get(tmp_path, build, fields={**FIELDS, "seed": 2})
    assert build.calls == 3


def _truncate_images(folder: Path) -> None:
    path = folder / "images.npy"
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 7)


def _truncate_images_to_zero(folder: Path) -> None:
    (folder / "images.npy").write_bytes(b"")


def _edit_label(folder: Path) -> None:
    path = folder / "labels.json"
    labels = json.loads(path.read_text())
    labels[0] = "XX"
    path.write_text(json.dumps(labels))


def _drop_label(folder: Path) -> None:
    path = folder / "labels.json"
    path.write_text(json.dumps(json.loads(path.read_text())[:-1]))


def _delete_meta(folder: Path) -> None:
    (folder / "meta.json").unlink()


def _garble_meta(folder: Path) -> None:
    (folder / "meta.json").write_text("{not json")


def _flip_sampled_pixel(folder: Path) -> None:
    images = np.load(folder / "images.npy", mmap_mode="r+")
    images[0, 0, 0, 0] ^= 0xFF
    images.flush()
    del images


@pytest.mark.parametrize(
    "corrupt",
    [_truncate_images, _truncate_images_to_zero, _edit_label, _drop_label, _delete_meta, _garble_meta,
     _flip_sampled_pixel],
)
def test_corruption_is_detected_and_rebuilt(tmp_path, caplog, corrupt):
    build = CountingBuild()
    _get(tmp_path, build)
    folder = _split_folder(tmp_path)
    corrupt(folder)

    with pytest.raises(cache.CorruptCacheError):
        cache.load_split(folder)

    with caplog.at_level(logging.WARNING, logger=cache.__name__):
        labels, images = _get(tmp_path, build)
    assert build.calls == 2, "a corrupt split must be rebuilt"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "corrupt" in r.getMessage()]
    assert warnings, "the rebuild must be announced with a warning"
    assert str(folder) in warnings[0].getMessage()  # names the folder
    assert labels == [f"L{i}" for i in range(COUNT)]
    np.testing.assert_array_equal(images, _expected_images())
    cache.load_split(folder)  # valid again

    _get(tmp_path, build)
    assert build.calls == 2


def test_leftover_temp_folder_and_lock_do_not_break_it(tmp_path):
    key = cache.cache_key({**FIELDS, "count": COUNT})
    # A crashed builder (another pid) left a half-written temp folder and its lock file.
    stale = tmp_path / f".tmp-unit-{key}-999999"
    stale.mkdir(parents=True)
    (stale / "images.npy").write_bytes(b"\x93NUMPY garbage")
    (stale / "labels.json").write_text("[")
    (tmp_path / f".unit-{key}.lock").write_text("")
    # Also a leftover temp folder with this very pid.
    own = tmp_path / f".tmp-unit-{key}-{os.getpid()}"
    own.mkdir()
    (own / "junk").write_text("x")

    build = CountingBuild()
    labels, images = _get(tmp_path, build)
    assert build.calls == 1
    assert labels == [f"L{i}" for i in range(COUNT)]
    np.testing.assert_array_equal(images, _expected_images())
    assert _split_folder(tmp_path).name == f"unit-{key}"


def test_failed_build_leaves_no_split(tmp_path):
    def broken(out):
        raise RuntimeError("generator crashed")

    with pytest.raises(RuntimeError, match="generator crashed"):
        _get(tmp_path, broken)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()], "no half-built split or temp folder may remain"

    build = CountingBuild()
    _get(tmp_path, build)
    assert build.calls == 1


# ---- concurrent builders -------------------------------------------------------------------


def _slow_build_and_record(marker_dir: str):
    def build(out: np.ndarray) -> list[str]:
        Path(marker_dir, f"built-by-{os.getpid()}").write_text("1")
        time.sleep(1.0)  # long enough that the other process arrives while this one builds
        return _fill(out)

    return build


def _concurrent_worker(root: str, marker_dir: str, result_file: str) -> None:
    labels, images = cache.get_or_build(root, "unit", FIELDS, COUNT, _slow_build_and_record(marker_dir), SHAPE)
    Path(result_file).write_text(json.dumps({"labels": labels, "sum": int(np.asarray(images, dtype=np.int64).sum())}))


def test_concurrent_builders_build_once(tmp_path):
    root, markers = tmp_path / "cache", tmp_path / "markers"
    markers.mkdir()
    ctx = multiprocessing.get_context("spawn")
    results = [tmp_path / f"result{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_concurrent_worker, args=(str(root), str(markers), str(r))) for r in results]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]

    assert len(list(markers.iterdir())) == 1, "exactly one process may build the split"
    expected_sum = int(_expected_images().astype(np.int64).sum())
    for r in results:
        got = json.loads(r.read_text())
        assert got["labels"] == [f"L{i}" for i in range(COUNT)]
        assert got["sum"] == expected_sum
    labels, images, _ = cache.load_split(_split_folder(root))
    np.testing.assert_array_equal(images, _expected_images())
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def _slow_build_then_hang(out: np.ndarray) -> list[str]:
    _fill(out)
    Path(os.environ["CAPTCHA_LIT_TEST_READY"]).write_text("building")
    time.sleep(60)  # the signal arrives here
    return [f"L{i}" for i in range(len(out))]


def _build_in_child(root: str, ready: str) -> None:
    os.environ["CAPTCHA_LIT_TEST_READY"] = ready
    cache.get_or_build(root, "unit", FIELDS, COUNT, _slow_build_then_hang, SHAPE)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGKILL"])
def test_a_killed_build_leaves_nothing_behind(tmp_path, signame):
    """SIGTERM and SIGHUP unwind the build, removing its temporary folder at once; SIGKILL cannot be
    caught, so the next build (of any split in the cache) removes what it left."""
    import signal

    ready = tmp_path / "ready"
    child = multiprocessing.get_context("fork").Process(target=_build_in_child, args=(str(tmp_path), str(ready)))
    child.start()
    deadline = time.time() + 30
    while not ready.exists():
        assert time.time() < deadline and child.is_alive(), "the build never started"
        time.sleep(0.05)
    assert list(tmp_path.glob(".tmp-unit-*"))
    os.kill(child.pid, getattr(signal, signame))
    child.join(30)
    if signame == "SIGKILL":
        assert child.exitcode == -signal.SIGKILL and len(list(tmp_path.glob(".tmp-unit-*"))) == 1
        build = CountingBuild()
        cache.get_or_build(tmp_path, "other", FIELDS, COUNT, build, SHAPE)  # another split's build cleans up
        assert build.calls == 1
    else:
        assert child.exitcode == 128 + getattr(signal, signame)
    assert not list(tmp_path.glob(".tmp-*")), list(tmp_path.iterdir())


def test_a_live_build_of_another_split_is_left_alone(tmp_path):
    import fcntl

    other_key = cache.cache_key({"kind": "other", "count": 3})
    live = tmp_path / f".tmp-unit-{other_key}-{os.getpid() + 1}"
    live.mkdir(parents=True)
    with open(tmp_path / f".unit-{other_key}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # its builder holds the lock: it is alive
        _get(tmp_path, CountingBuild())
        assert live.is_dir()
    _get(tmp_path, CountingBuild(), fields={"kind": "third"})  # lock released: the folder is dead now
    assert not live.exists()

"""labels.csv: one atomic rewrite per saved label, shared safely by tabs and processes.

labels.csv has the columns ``filename,label``, which ``data=folder data.labels_csv=...`` reads,
and ``model_reading,model_id``: what the model read when the label was saved, from which the
page counts how often its reading was kept. Skipped and unreadable images go to a second
file beside it, ``<stem>.marks.csv`` (``filename,mark``), so that labels.csv holds labels only.

Every change runs under an exclusive lock on a hidden lock file beside labels.csv. Under it,
the store re-reads the files if another process changed them, checks that the image is still
in the state the page last saw (else ``Conflict``: another tab changed it), writes the new
file under a temporary name, flushes it to disk and renames it over the old one. A reader, or
a server killed at any moment, sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: tabs of one server are still safe (the thread lock), processes are not
    fcntl = None

LABEL_COLUMNS = ("filename", "label", "model_reading", "model_id")
MARK_COLUMNS = ("filename", "mark")
MARKS = ("skipped", "unreadable")
PENDING = "pending"


class Conflict(Exception):
    """The image changed since the page read it: ``state`` is what it holds now."""

    def __init__(self, relpath: str, state: str):
        super().__init__(f"{relpath} changed meanwhile: it is now {describe_state(state)}")
        self.relpath, self.state = relpath, state


def describe_state(state: str) -> str:
    return f"labeled {state.split(':', 1)[1]!r}" if state.startswith("labeled:") else state


class LabelStore:
    """The labels and marks of one folder, kept in step with their files."""

    def __init__(self, csv_path: str | os.PathLike):
        self.csv_path = Path(csv_path)
        self.marks_path = self.csv_path.with_name(f"{self.csv_path.stem}.marks.csv")
        self.lock_path = self.csv_path.with_name(f".{self.csv_path.name}.lock")
        self.labels: dict[str, dict[str, str]] = {}  # relpath -> {label, model_reading, model_id}
        self.marks: dict[str, str] = {}  # relpath -> skipped | unreadable
        self._signatures: dict[Path, tuple | None] = {}
        self._mutex = threading.Lock()
        if not self.csv_path.parent.is_dir():
            raise FileNotFoundError(f"labels_csv {str(self.csv_path)!r}: its folder does not exist")
        self.refresh()

    # ---- reading ------------------------------------------------------------------------------
    def state(self, relpath: str) -> str:
        """``labeled:<label>``, ``skipped``, ``unreadable`` or ``pending``. A label outranks a mark
        (a rename that died between the two files leaves both)."""
        if relpath in self.labels:
            return f"labeled:{self.labels[relpath]['label']}"
        return self.marks.get(relpath, PENDING)

    def refresh(self) -> None:
        """Re-read the files if another process changed them."""
        with self._locked():
            self._reload_if_changed()

    def _reload_if_changed(self) -> None:
        if _signature(self.csv_path) != self._signatures.get(self.csv_path, "unread"):
            rows = _read_rows(self.csv_path, ("filename", "label"))
            self.labels = {row["filename"]: {"label": row["label"], "model_reading": row.get("model_reading") or "",
                                             "model_id": row.get("model_id") or ""}
                           for row in rows if row["filename"]}
            self._signatures[self.csv_path] = _signature(self.csv_path)
        if _signature(self.marks_path) != self._signatures.get(self.marks_path, "unread"):
            rows = _read_rows(self.marks_path, MARK_COLUMNS)
            self.marks = {row["filename"]: row["mark"] for row in rows if row["filename"] and row["mark"] in MARKS}
            self._signatures[self.marks_path] = _signature(self.marks_path)

    # ---- writing --------------------------------------------------------------------------------
    def update(self, relpath: str, *, expected: str, label: str | None = None, mark: str | None = None,
               model_reading: str = "", model_id: str = "") -> str:
        """Give ``relpath`` a label, or a mark, if its state is still ``expected``. Returns the new state;
        raises ``Conflict`` with the current one otherwise."""
        if (label is None) == (mark is None):
            raise ValueError("update() takes a label or a mark")
        if mark is not None and mark not in MARKS:
            raise ValueError(f"mark={mark!r} is not one of {', '.join(MARKS)}")
        with self._locked():
            self._reload_if_changed()
            current = self.state(relpath)
            if current != expected:
                raise Conflict(relpath, current)
            if label is not None:
                self.labels[relpath] = {"label": label, "model_reading": model_reading, "model_id": model_id}
                self._write_labels()
                if self.marks.pop(relpath, None) is not None:
                    self._write_marks()
            else:
                self.marks[relpath] = mark
                self._write_marks()
                if self.labels.pop(relpath, None) is not None:
                    self._write_labels()
            return self.state(relpath)

    def _write_labels(self) -> None:
        rows = [(path, row["label"], row["model_reading"], row["model_id"]) for path, row in self.labels.items()]
        _replace_csv(self.csv_path, LABEL_COLUMNS, rows)
        self._signatures[self.csv_path] = _signature(self.csv_path)

    def _write_marks(self) -> None:
        _replace_csv(self.marks_path, MARK_COLUMNS, list(self.marks.items()))
        self._signatures[self.marks_path] = _signature(self.marks_path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            if fcntl is None:
                yield
                return
            with open(self.lock_path, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)


def _signature(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _read_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            if columns and not set(required) <= set(columns):
                raise ValueError(f"{str(path)!r} needs the columns {','.join(required)}; it has {','.join(columns)}. "
                                 "Rename the columns, or pass labels_csv=<another file>")
            reader.fieldnames = columns
            return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except FileNotFoundError:
        return []
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({exc.reason}); pass labels_csv=<another file>") from None


def _replace_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    """Write ``path`` atomically and durably: a temporary file, flushed to disk, renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp's 0600 would hide it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""One labeling session: a folder's images in page order, the model's readings, the labels.

The page asks for an image (the first pending one, or one by its place in the order) and sends
what was decided about it; the answer is always the next image and its neighbours. An image
shown in one tab is claimed for a while, so that another tab gets the next one instead; a
decision carries the state the page saw, so that a tab cannot overwrite another's work unseen.
"""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from captcha_lit.labeling.order import order_images
from captcha_lit.labeling.rules import LabelRules
from captcha_lit.labeling.store import PENDING, LabelStore

CLAIM_SECONDS = 300.0  # how long an image shown in one tab is kept from the others
STRIP_BEFORE, STRIP_AFTER = 3, 8  # neighbours sent with each image: the strip, and what the page preloads
ACTIONS = {"save": None, "skip": "skipped", "unreadable": "unreadable"}  # action -> its mark


class LabelProblem(ValueError):
    """The label breaks the rules: the message names the bad character or length."""


class LabelSession:
    def __init__(self, root: Path, relpaths: Sequence[str], store: LabelStore, rules: LabelRules, *,
                 readings: Sequence[dict] | None = None, model_id: str | None = None,
                 model_path: str | None = None, charset_arg: str | None = None):
        """``readings``, one per path (predict's rows: text, confidence, char_confidences, error), come
        from the model ``model_id``; without them the images come in file order. ``charset_arg``: the
        charset as given on the command line, which the train command then passes on."""
        self.root, self.store, self.rules = root, store, rules
        self.model_id, self.model_path, self.charset_arg = model_id, model_path, charset_arg
        confidences = [r["confidence"] for r in readings] if readings is not None else None
        ranks = order_images(relpaths, confidences)
        self.order = [relpaths[i] for i in ranks]
        self.readings = [readings[i] for i in ranks] if readings is not None else None
        self.index = {path: i for i, path in enumerate(self.order)}
        self._claims: dict[int, tuple[str, float]] = {}  # image index -> (client, expiry)
        self._lock = threading.Lock()

    # ---- what the page shows ------------------------------------------------------------------
    def item(self, index: int) -> dict:
        path = self.order[index]
        state = self.store.state(path)
        reading = self.readings[index] if self.readings is not None else None
        return {
            "index": index, "path": path, "url": "/image/" + quote(path), "state": state,
            "label": state.split(":", 1)[1] if state.startswith("labeled:") else None,
            "reading": self.rules.fit_case(reading["text"]) if reading and reading["text"] is not None else None,
            "confidence": reading["confidence"] if reading else None,
            "char_confidences": reading["char_confidences"] if reading else None,
            "error": reading["error"] if reading else None,
        }

    def counts(self) -> dict:
        labels = {p: row for p, row in self.store.labels.items() if p in self.index}
        marks = [m for p, m in self.store.marks.items() if p in self.index and p not in labels]
        judged = [row for row in labels.values() if self.model_id and row["model_id"] == self.model_id
                  and row["model_reading"]]
        return {"total": len(self.order), "labeled": len(labels), "skipped": marks.count("skipped"),
                "unreadable": marks.count("unreadable"), "remaining": len(self.order) - len(labels) - len(marks),
                "compared": len(judged), "accepted": sum(row["label"] == row["model_reading"] for row in judged)}

    def info(self) -> dict:
        return {"folder": str(self.root), "labels_csv": str(self.store.csv_path), "total": len(self.order),
                "model": {"id": self.model_id, "path": self.model_path} if self.model_id else None,
                "rules": self.rules.to_dict(), "train_command": self.train_command(),
                "relabel_command": self.relabel_command()}

    def train_command(self) -> str:
        """The command that trains on what is labeled so far (labels.csv as it will be then)."""
        args = ["python", "-m", "captcha_lit.train", "data=folder", f"data.path={self.root}",
                f"data.labels_csv={self._labels_csv_arg()}"]
        if self.charset_arg:
            args.append(f"data.charset={_hydra_value(self.charset_arg)}")
        return shlex.join(args)

    def relabel_command(self) -> str:
        """The command that reopens this page with the new model: the rest by its doubt."""
        args = ["python", "-m", "captcha_lit.label", f"path={self.root}"]
        if self._labels_csv_arg() != "labels.csv":
            args.append(f"labels_csv={self._labels_csv_arg()}")
        if self.charset_arg:
            args.append(f"charset={_hydra_value(self.charset_arg)}")
        return shlex.join(args) + " ckpt_path=<its best checkpoint>"

    def _labels_csv_arg(self) -> str:
        csv_path = self.store.csv_path
        return csv_path.relative_to(self.root).as_posix() if csv_path.is_relative_to(self.root) else str(csv_path)

    # ---- navigation and decisions -------------------------------------------------------------
    def goto(self, client: str, index: int | None = None) -> dict:
        """The page's view at ``index``, or at the first pending image no other tab holds."""
        with self._lock:
            self.store.refresh()
            if index is None:
                index = self._next_pending(-1, client)
            elif not 0 <= index < len(self.order):
                raise IndexError(f"no image at index {index}; there are {len(self.order)}")
            return self._view(client, index)

    def act(self, client: str, index: int, action: str, label: str, base: str) -> dict:
        """Save ``label`` for the image at ``index`` (or skip it, or mark it unreadable) if it is still
        in state ``base``; then the view at the next pending image. Raises LabelProblem, store.Conflict."""
        if action not in ACTIONS:
            raise ValueError(f"action {action!r} is not one of {', '.join(ACTIONS)}")
        if not 0 <= index < len(self.order):
            raise IndexError(f"no image at index {index}; there are {len(self.order)}")
        path = self.order[index]
        if action == "save":
            label = self.rules.fit_case(label)
            problem = self.rules.problem(label)
            if problem:
                raise LabelProblem(problem)
        with self._lock:  # one decision at a time: the views read the labels that it changes
            if action == "save":
                reading = self.item(index)["reading"] if self.model_id else None
                self.store.update(path, expected=base, label=label, model_reading=reading or "",
                                  model_id=self.model_id or "")
            else:
                self.store.update(path, expected=base, mark=ACTIONS[action])
            return self._view(client, self._next_pending(index, client))

    def _next_pending(self, after: int, client: str) -> int | None:
        """The first pending image after ``after`` (wrapping around) that no other tab holds; one that
        another tab holds if all do; None when nothing is pending."""
        now, held_elsewhere = time.monotonic(), None
        for step in range(1, len(self.order) + 1):
            index = (after + step) % len(self.order)
            if self.store.state(self.order[index]) != PENDING:
                continue
            holder, expiry = self._claims.get(index, (client, 0.0))
            if holder != client and expiry > now:
                held_elsewhere = index if held_elsewhere is None else held_elsewhere
                continue
            return index
        return held_elsewhere

    def _view(self, client: str, index: int | None) -> dict:
        for held, (holder, _) in list(self._claims.items()):
            if holder == client:
                del self._claims[held]
        if index is not None:
            self._claims[index] = (client, time.monotonic() + CLAIM_SECONDS)
        centre = index if index is not None else len(self.order) - 1
        window = range(max(0, centre - STRIP_BEFORE), min(len(self.order), centre + STRIP_AFTER + 1))
        return {"current": index, "items": [self.item(i) for i in window], "counts": self.counts()}

    def image_file(self, relpath: str) -> Path | None:
        """The file behind an image URL: only one of the listed images, and only if it still lies under the folder."""
        if relpath not in self.index:
            return None
        path = (self.root / relpath).resolve()
        return path if path.is_relative_to(self.root) and path.is_file() else None


def _hydra_value(value: str) -> str:
    """A Hydra override value that reads back as this string: as it is where it does, else quoted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        if OverridesParser.create().parse_override(f"key={value}").value() == value:
            return value
    except HydraException:
        pass
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

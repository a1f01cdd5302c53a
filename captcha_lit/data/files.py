"""Where a folder's images and labels come from: the named datasets folder, the image files under
a folder, labels from file names or a CSV, and the split of the files by a seeded hash of their paths."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from captcha_lit.preprocess import IMAGE_SUFFIXES, scan_images

log = logging.getLogger(__name__)


def datasets_dir() -> Path:
    """Where the named datasets live: $CAPTCHA_LIT_DATASETS, else ``../shared/datasets`` beside the project."""
    env = os.environ.get("CAPTCHA_LIT_DATASETS")
    if env:
        return Path(os.path.expanduser(env))
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets").resolve()


def label_from_name(relpath: str) -> str:
    """``dir/AB12_3.png`` -> ``AB12``: the file name without extension, up to the first underscore."""
    return Path(relpath).stem.split("_", 1)[0]


def read_labels_csv(csv_path: Path) -> list[tuple[str, str]]:
    """Rows of (filename, label) from a CSV with a ``filename,label`` header."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if "filename" not in columns or "label" not in columns:
                raise ValueError(
                    f"labels CSV {str(csv_path)!r} needs a header with the columns filename,label; "
                    f"it has {','.join(columns) or 'no header'}"
                )
            reader.fieldnames = columns
            return [((row.get("filename") or "").strip(), (row.get("label") or "").strip()) for row in reader]
    except FileNotFoundError:
        raise FileNotFoundError(f"data.labels_csv {str(csv_path)!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"labels CSV {str(csv_path)!r} is not UTF-8 text ({exc.reason})") from None


def split_ranks(relpaths: Sequence[str], seed: int) -> list[int]:
    """Indices of ``relpaths`` ordered by a seeded hash of each path alone."""
    keys = [hashlib.sha256(f"{seed}:{p}".encode()).digest() for p in relpaths]
    return sorted(range(len(relpaths)), key=lambda i: (keys[i], relpaths[i]))


def labeled_entries(root: Path, labels_csv: str | None,
                    extensions: Sequence[str] = IMAGE_SUFFIXES) -> tuple[list[tuple[str, str]], list[dict]]:
    """(relpath, label) for every candidate file under ``root``, labeled by its name or by
    ``labels_csv``, and the files already known to be bad (listed twice, or missing)."""
    bad: list[dict] = []
    if labels_csv:
        csv_path = Path(os.path.expanduser(str(labels_csv)))
        csv_path = csv_path if csv_path.is_absolute() else root / csv_path
        seen: set[str] = set()
        entries = []
        for filename, label in read_labels_csv(csv_path):
            relpath = Path(filename).as_posix()
            if relpath in seen:
                bad.append({"file": relpath, "reason": f"listed more than once in {csv_path.name}"})
                continue
            seen.add(relpath)
            if not (root / relpath).is_file():
                bad.append({"file": relpath, "reason": f"listed in {csv_path.name} but not found under {root}"})
                continue
            entries.append((relpath, label))
        unlisted = len(set(scan_images(root, extensions)) - seen)
        if unlisted:
            log.info("%d image files under %s are not in %s and are not used", unlisted, root, csv_path.name)
    else:
        entries = [(p, label_from_name(p)) for p in scan_images(root, extensions)]
    if not entries and not bad:
        raise ValueError(f"data.path {str(root)!r} has no images ({', '.join(extensions)})"
                         + (f" listed in {labels_csv}" if labels_csv else ""))
    return sorted(entries), bad

"""Unlabeled images of a scheme (``data.unlabeled_path``), for self-training.

The folder is checked before any model sees it: it must not be, or lie inside, the labeled
folder; none of its files may have the same content as a labeled file (a validation or test
image that sneaks in as "unlabeled" would inflate the scores); and when most of its files are
named like labels of the scheme, they are probably labeled files in the wrong place. Images are
decoded at the model's input size once and cached, like a labeled folder's.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from captcha_lit.charset import Charset
from captcha_lit.data import cache
from captcha_lit.data.files import label_from_name
from captcha_lit.preprocess import IMAGE_SUFFIXES, ImageDecodeError, load_input, scan_images

# Bumped when the decoding below would give other arrays for the same files.
UNLABELED_VERSION = 1


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unlabeled_files(path: str | os.PathLike, labeled_root: Path, labeled: Sequence[str], charset: Charset,
                    min_length: int, max_length: int) -> list[Path]:
    """The image files of ``data.unlabeled_path``, checked against the labeled folder (see the module)."""
    root = Path(os.path.expanduser(str(path))).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data.unlabeled_path {str(root)!r} is not a folder")
    labeled_root = Path(labeled_root).resolve()
    if root == labeled_root or labeled_root in root.parents:
        raise ValueError(f"data.unlabeled_path {str(root)!r} lies inside the labeled folder data.path "
                         f"{str(labeled_root)!r}; keep the unlabeled images in a folder of their own")
    files = [root / relpath for relpath in scan_images(root, IMAGE_SUFFIXES)]
    if not files:
        raise ValueError(f"data.unlabeled_path {str(root)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    named_like_labels = [f for f in files if _is_label(label_from_name(f.name), charset, min_length, max_length)]
    if len(named_like_labels) > len(files) / 2:
        raise ValueError(
            f"data.unlabeled_path: {len(named_like_labels)} of its {len(files)} files are named like labels of this "
            f"scheme (e.g. {named_like_labels[0].name}); if they are labeled, move them into data.path, else "
            "rename them (any name that is not a label, e.g. a number)")
    theirs = {_digest(labeled_root / relpath): relpath for relpath in labeled}
    shared = [(f, theirs[d]) for f in files if (d := _digest(f)) in theirs]
    if shared:
        listing = ", ".join(f"{f.name} = {relpath}" for f, relpath in shared[:3])
        raise ValueError(
            f"data.unlabeled_path: {len(shared)} of its files are also labeled images in data.path ({listing}"
            f"{', ...' if len(shared) > 3 else ''}); remove them from the unlabeled folder, so that no validation or "
            "test image is trained on")
    return files


def _is_label(text: str, charset: Charset, min_length: int, max_length: int) -> bool:
    return min_length <= len(text) <= max_length and all(c in charset.chars for c in text)


def decode_unlabeled(files: Sequence[Path], input_size: tuple[int, int], channels: int,
                     cache_dir: str) -> tuple[list[Path], np.ndarray]:
    """The readable ``files`` and their images at the input size, (N, H, W, C) uint8 (cached)."""
    entries = []
    for path in files:
        stat = path.stat()
        entries.append([str(path), stat.st_size, stat.st_mtime_ns])
    fields = {"files": entries, "input_size": list(input_size), "channels": channels, "version": UNLABELED_VERSION}

    def build(out: np.ndarray) -> list[str]:
        errors = []
        for i, path in enumerate(files):
            try:
                out[i] = load_input(path, input_size, channels=channels, name=path.name)
                errors.append("")
            except ImageDecodeError as exc:
                out[i] = 0
                errors.append(str(exc))
        return errors

    errors, images = cache.get_or_build(cache_dir, "unlabeled", fields, len(files), build,
                                        (int(input_size[0]), int(input_size[1]), int(channels)))
    keep = [i for i, error in enumerate(errors) if not error]
    return [files[i] for i in keep], np.asarray(images[keep])

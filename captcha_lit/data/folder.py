"""Labeled image folders: the LightningDataModule for real CAPTCHAs.

A label comes from the file name (``LABEL.png``, ``LABEL_anything.jpg``: the text
before the first underscore) or from a CSV with the columns ``filename,label``.
Every file that cannot be used (unreadable or corrupt image, no label, a character
outside the charset, a length outside the limits) is a clear error, or with
``skip_bad=True`` is left out and listed in ``bad_files``.

Images go through ``captcha_lit.preprocess.load_input``, the same decoding and
resizing as inference, and are cached as one uint8 array keyed by the file list
(paths, sizes, modification times) and the input size, so a second run starts
without decoding anything.

The split into train, val and test depends only on the relative paths and
``split_seed``: files are ranked by a hash of (seed, path), so neither the file
system's listing order nor the order the files were created changes it, and adding
a file moves at most a few others across a split boundary.

The values left ``auto`` (input size, grayscale, case, samples per epoch) are settled from the
folder when it is resolved (``captcha_lit.data.survey``); ``recipe`` then holds each choice and
its reason, and the hyperparameters hold the settled values, so a checkpoint's data config
reads the folder exactly as its run did.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np

from captcha_lit.charset import Charset
from captcha_lit.data import cache
from captcha_lit.data.datamodule import ArrayLoaders, CaptchaArrayDataset, check_input_size
from captcha_lit.data.survey import (Choice, ImageSurvey, choose_case, choose_grayscale, choose_input_size,
                                     choose_samples_per_epoch, survey_images)
from captcha_lit.data.files import labeled_entries, read_labels_csv, split_ranks
from captcha_lit.data.unlabeled import decode_unlabeled, unlabeled_files
from captcha_lit.preprocess import IMAGE_SUFFIXES, ImageDecodeError, load_input

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
AUTO = "auto"
# With train_samples_per_epoch=auto, an epoch is at least this many batches (see survey).
MIN_BATCHES_PER_EPOCH = 50
# Bumped when load_input's output for the same file would change, to invalidate cached arrays.
PREPROCESS_VERSION = 1


class _Rows:
    """A lazy view of chosen rows of a (memory-mapped) image array."""

    def __init__(self, images: np.ndarray, rows: np.ndarray):
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[self.rows[index]]


class FolderDataModule(ArrayLoaders, L.LightningDataModule):
    """Train, val and test splits of one folder of labeled CAPTCHA images.

    ``charset``, ``min_length`` and ``max_length`` may be None: they are then read
    from the labels (sorted unique characters; shortest and longest label) when the
    data is first resolved, and recorded in the hyperparameters, so the model and
    its checkpoint get them and a later run reads the same ones.
    """

    def __init__(
        self,
        *,
        path: str,
        labels_csv: str | None = None,
        charset: str | None = None,
        case_insensitive: bool | str = AUTO,
        min_length: int | None = None,
        max_length: int | None = None,
        input_size: Sequence[int] | str = AUTO,
        grayscale: bool | str = AUTO,
        extensions: Sequence[str] = IMAGE_SUFFIXES,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        train_limit: int | None = None,
        unlabeled_path: str | None = None,
        pseudo_labels: str | None = None,
        train_samples_per_epoch: int | str | None = AUTO,
        skip_bad: bool = False,
        cache_dir: str = "~/.cache/captcha_lit",
        batch_size: int = 32,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        augmentation: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        # Recorded so that a checkpoint's data config rebuilds this kind of datamodule.
        self.hparams["source"] = "folder"
        if path in (None, "", "???"):
            raise ValueError("data.path is not set: pass data.path=DIR, a folder of labeled images")
        self.root = Path(os.path.expanduser(str(path))).resolve()
        self.hparams["path"] = str(self.root)  # a checkpoint's data config then works from any directory
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data.path {str(self.root)!r} is not a folder"
                + ("; set CAPTCHA_LIT_DATASETS to the folder that holds the datasets" if "datasets" in str(path) else "")
            )
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"data.{name}={value} must be in [0, 1)")
        if float(val_fraction) + float(test_fraction) >= 1.0:
            raise ValueError(
                f"data.val_fraction + data.test_fraction = {float(val_fraction) + float(test_fraction):g} "
                "leaves no training images; keep their sum below 1"
            )
        if train_limit is not None and int(train_limit) < 1:
            raise ValueError(f"data.train_limit={train_limit} must be null (all) or at least 1")
        _check_auto_or("case_insensitive", case_insensitive, bool, "true or false")
        _check_auto_or("grayscale", grayscale, bool, "true (one gray channel) or false (RGB)")
        if input_size != AUTO:
            if isinstance(input_size, str):
                raise ValueError(f"data.input_size={input_size!r} must be auto or [height, width]")
            check_input_size(input_size)
        if train_samples_per_epoch not in (AUTO, None) and (
                isinstance(train_samples_per_epoch, (bool, str)) or int(train_samples_per_epoch) < 1):
            raise ValueError(f"data.train_samples_per_epoch={train_samples_per_epoch!r} must be auto, null (one pass "
                             "over the training images) or a number of samples >= 1")
        for name, value in (("min_length", min_length), ("max_length", max_length)):
            if value is not None and int(value) < 1:
                raise ValueError(f"data.{name}={value}: CAPTCHA length must be at least 1")
        if min_length is not None and max_length is not None and int(max_length) < int(min_length):
            raise ValueError(f"data.max_length={max_length} is less than data.min_length={min_length}")
        self._charset_arg = Charset(charset).chars if charset else None  # a bad charset fails here, early
        if case_insensitive is True:
            self._fold_charset()
        # Each auto value is settled by resolve(); recipe records every choice it made, with its reason.
        self.recipe: dict[str, Choice] = {}
        self.cache_dir = cache_dir
        self._init_loaders(batch_size, eval_batch_size, num_workers, augmentation)
        self.bad_files: list[dict] = []
        self.files: dict[str, list[str]] = {}
        self._resolved = False

    def _fold_charset(self) -> None:
        if self._charset_arg is not None:
            self._charset_arg = Charset(self._charset_arg.upper()).chars  # a duplicate after folding, e.g. 'aA', fails

    @property
    def _given_charset(self) -> str | None:
        return self._charset_arg

    # ---- resolving the folder: labels, images, charset, split ------------------------------
    def _label_problem(self, label: str) -> str | None:
        if not label:
            return "no label: name the file LABEL.png or LABEL_anything.png, or list it in data.labels_csv"
        if any(c.isspace() for c in label):
            return f"label {label!r} contains whitespace"
        if self._given_charset is not None:
            try:
                Charset(self._given_charset).validate(label)
            except ValueError as exc:
                return str(exc)
        hp = self.hparams
        if hp.min_length is not None and len(label) < int(hp.min_length):
            return f"label {label!r} has {len(label)} characters, fewer than data.min_length={hp.min_length}"
        if hp.max_length is not None and len(label) > int(hp.max_length):
            return f"label {label!r} has {len(label)} characters, more than data.max_length={hp.max_length}"
        return None

    def _decode(self, relpaths: list[str]) -> tuple[list[str], np.ndarray]:
        """Decode and resize every file (cached) -> (each file's error or "", images)."""
        files = []
        for relpath in relpaths:
            stat = (self.root / relpath).stat()
            files.append([relpath, stat.st_size, stat.st_mtime_ns])
        fields = {"root": str(self.root), "files": files, "input_size": list(self.input_size),
                  "preprocess": PREPROCESS_VERSION, "channels": self.channels}
        height, width = self.input_size

        def build(out: np.ndarray) -> list[str]:
            log.info("decoding %d images from %s into the cache", len(relpaths), self.root)
            errors = []
            for i, relpath in enumerate(relpaths):
                try:
                    out[i] = load_input(self.root / relpath, self.input_size, channels=self.channels, name=relpath)
                    errors.append("")
                except ImageDecodeError as exc:
                    out[i] = 0
                    errors.append(str(exc))
            return errors

        # The cache's label list holds each file's decode error: labels come from names, not pixels.
        return cache.get_or_build(self.cache_dir, "folder", fields, len(relpaths), build,
                                  (height, width, self.channels))

    def resolve(self) -> None:
        """Read labels, decode images (or load them from the cache), settle the charset and
        lengths, and split. Idempotent; raises ValueError listing the bad files unless skip_bad."""
        if self._resolved:
            return
        hp = self.hparams
        entries, bad = labeled_entries(self.root, hp.labels_csv, hp.extensions)
        if hp.case_insensitive == AUTO:
            self.recipe["case_insensitive"] = choose_case([label for _, label in entries])
            if self.recipe["case_insensitive"].value:
                self._fold_charset()
        self.case_insensitive = bool(self._settled("case_insensitive"))
        labeled = []
        for relpath, label in entries:
            label = label.upper() if self.case_insensitive else label
            problem = self._label_problem(label)
            if problem:
                bad.append({"file": relpath, "reason": problem})
            else:
                labeled.append((relpath, label))
        if labeled:
            self._settle_input(labeled)
        errors, images = self._decode([p for p, _ in labeled]) if labeled else ([], None)
        good_rows = []
        for row, ((relpath, _), error) in enumerate(zip(labeled, errors)):
            if error:
                bad.append({"file": relpath, "reason": error.removeprefix(f"{relpath}: ")})
            else:
                good_rows.append(row)
        bad.sort(key=lambda b: b["file"])
        self.bad_files = bad
        if bad:
            listing = "\n".join(f"  {b['file']}: {b['reason']}" for b in bad[:10])
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            if not hp.skip_bad:
                raise ValueError(
                    f"{len(bad)} bad file(s) in {self.root}:\n{listing}{more}\n"
                    "fix or remove them, or set data.skip_bad=true to leave them out "
                    "(the run directory's bad_files.json then lists them)"
                )
            log.warning("skipping %d bad file(s) in %s:\n%s%s", len(bad), self.root, listing, more)
        if not good_rows:
            raise ValueError(f"data.path {str(self.root)!r} has no usable images (all {len(bad)} are bad)")

        labels = [labeled[r][1] for r in good_rows]
        self.charset = Charset(self._given_charset or "".join(sorted(set("".join(labels)))))
        self.min_length = int(hp.min_length) if hp.min_length is not None else min(map(len, labels))
        self.max_length = int(hp.max_length) if hp.max_length is not None else max(map(len, labels))
        # Record what was inferred, so the checkpoint's data config reproduces it.
        self.hparams.update(charset=self.charset.chars, min_length=self.min_length, max_length=self.max_length)

        relpaths = [labeled[r][0] for r in good_rows]
        ranked = split_ranks(relpaths, int(hp.split_seed))
        num_test = _split_count(len(ranked), hp.test_fraction)
        num_val = _split_count(len(ranked), hp.val_fraction)
        if len(ranked) - num_test - num_val < 1:
            raise ValueError(
                f"{len(ranked)} usable images are too few for data.val_fraction={hp.val_fraction} and "
                f"data.test_fraction={hp.test_fraction}: no image is left to train on; add labeled images to "
                f"{self.root} (at least {num_test + num_val + 1})"
            )
        train = ranked[num_test + num_val:]
        if hp.get("train_limit") is not None:
            if int(hp.train_limit) > len(train):
                raise ValueError(f"data.train_limit={hp.train_limit} is more than the {len(train)} images of the training "
                                 f"split of {self.root}; pass at most {len(train)}, or data.train_limit=null for all")
            # A prefix of the hash ranking: a random subset, and each smaller limit is a subset of a
            # larger one, so learning curves over train_limit compare nested training sets.
            train = train[:int(hp.train_limit)]
        chosen = {"test": ranked[:num_test], "val": ranked[num_test:num_test + num_val], "train": train}
        pseudo_files, pseudo_texts, pseudo_images = self._pseudo_labeled()
        if hp.train_samples_per_epoch == AUTO:
            self.recipe["train_samples_per_epoch"] = choose_samples_per_epoch(len(train) + len(pseudo_files),
                                                                              self.batch_size,
                                                                              MIN_BATCHES_PER_EPOCH)
        self.samples_per_epoch = self._settled("train_samples_per_epoch")
        self._splits = {}
        for split, members in chosen.items():
            members = sorted(members)  # each split in path order
            rows = np.asarray([good_rows[i] for i in members], dtype=np.int64)
            self.files[split] = [relpaths[i] for i in members]
            self._splits[split] = (_Rows(images, rows), [labels[i] for i in members])
        if pseudo_files:  # self-training's readings of unlabeled images join the training split only
            self.files["train"] += [str(f) for f in pseudo_files]
            self._splits["train"] = (np.concatenate([np.asarray(images[rows]), pseudo_images]),
                                     self._splits["train"][1] + pseudo_texts)
        log.info("%s: %d train, %d val, %d test images; charset %r, length %d..%d", self.root,
                 len(chosen["train"]), len(chosen["val"]), len(chosen["test"]), self.charset.chars,
                 self.min_length, self.max_length)
        for key, choice in self.recipe.items():
            log.info("data.%s=auto -> %s: %s", key, choice.to_dict()["value"], choice.reason)
        self._resolved = True

    def _pseudo_labeled(self) -> tuple[list[Path], list[str], np.ndarray | None]:
        """``data.pseudo_labels``: a CSV of (absolute file, text) that self-training wrote."""
        if not self.hparams.get("pseudo_labels"):
            return [], [], None
        rows = read_labels_csv(Path(self.hparams.pseudo_labels))
        bad = [f"{name}: {problem}" for name, label in rows if (problem := self._label_problem(label))]
        if bad:
            raise ValueError(f"data.pseudo_labels {self.hparams.pseudo_labels}: {len(bad)} bad row(s), e.g. {bad[0]}")
        files, images = decode_unlabeled([Path(name) for name, _ in rows], self.input_size, self.channels,
                                         self.cache_dir)
        texts = dict(rows)
        return files, [texts[str(f)] for f in files], images

    def unlabeled(self) -> list[Path]:
        """The checked files of ``data.unlabeled_path`` (``captcha_lit.data.unlabeled``); none without it."""
        self.resolve()
        if not self.hparams.get("unlabeled_path"):
            return []
        if getattr(self, "_unlabeled", None) is None:
            labeled = [p for split in SPLITS for p in self.files[split] if not os.path.isabs(p)]
            self._unlabeled = unlabeled_files(self.hparams.unlabeled_path, self.root, labeled, self.charset,
                                              self.min_length, self.max_length)
        return self._unlabeled

    def _settled(self, key: str):
        """The value of ``key``: the recipe's choice where it was auto (then recorded in the
        hyperparameters, so a checkpoint reproduces it), else the one given."""
        if key in self.recipe:
            self.hparams[key] = self.recipe[key].to_dict()["value"]
        return self.hparams[key]

    def _settle_input(self, labeled: list[tuple[str, str]]) -> None:
        """The input size and channels: given, or measured on the labeled images."""
        hp = self.hparams
        self._labeled_paths = [p for p, _ in labeled]
        if hp.grayscale == AUTO or hp.input_size == AUTO:
            survey = self.survey()
            if hp.grayscale == AUTO:
                self.recipe["grayscale"] = choose_grayscale(survey)
            if hp.input_size == AUTO:
                longest = int(hp.max_length) if hp.max_length is not None else max(len(t) for _, t in labeled)
                self.recipe["input_size"] = choose_input_size(survey, longest)
        size = self._settled("input_size")
        self.input_size = (int(size[0]), int(size[1]))
        self.channels = 1 if self._settled("grayscale") else 3

    def survey(self) -> ImageSurvey:
        """The median size of the labeled images (sampled), and whether they are gray; measured once."""
        if getattr(self, "_survey", None) is None:
            self._survey = survey_images(self.root, self._labeled_paths)
        return self._survey

    def scheme(self) -> dict:
        """What generated CAPTCHAs must match to stand in for this folder's (``pretrain=auto``): the
        charset, the lengths, the canvas (the images' median height and width), the input size and gray."""
        self.resolve()
        survey = self.survey()
        return {"charset": self.charset.chars, "min_length": self.min_length, "max_length": self.max_length,
                "canvas": (survey.height, survey.width), "input_size": tuple(self.input_size),
                "grayscale": self.channels == 1}

    def label_spec(self) -> dict:
        """What the model must be built for: the charset, the length range and the input."""
        self.resolve()
        return {"charset": self.charset.chars, "min_length": self.min_length, "max_length": self.max_length,
                "input_size": list(self.input_size), "grayscale": self.channels == 1}

    # ---- Lightning hooks ---------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.resolve()

    def setup(self, stage: str | None = None) -> None:
        self.resolve()
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            if split not in self.datasets:
                images, texts = self._splits[split]
                if not texts:
                    raise ValueError(f"the {split} split is empty; raise data.{split}_fraction or add images")
                transform = self.train_transform if split == "train" else None
                self.datasets[split] = CaptchaArrayDataset(images, texts, self.charset, self.max_length, transform)


def _check_auto_or(key: str, value, kind: type, expected: str) -> None:
    if value != AUTO and not isinstance(value, kind):
        raise ValueError(f"data.{key}={value!r} must be auto or {expected}")


def _split_count(total: int, fraction: float) -> int:
    """round(total * fraction), but at least one image for any fraction above 0."""
    fraction = float(fraction)
    return max(1, round(total * fraction)) if fraction > 0 else 0

"""What a folder's images and labels say about the model they need: the data half of the
folder recipe (``data=folder``; its training half is ``conf/recipe/folder.yaml``).

Each ``auto`` value of the folder config is settled here from the folder itself, with the
reason, so the run can log what it chose and why and write it to ``metrics.json``. Nothing here
knows any particular scheme: sizes, colors, alphabets and lengths all come from the files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captcha_lit.preprocess import ImageDecodeError, open_image

# Images opened to measure sizes and color: enough for a stable median, cheap on a big folder.
SURVEY_SAMPLE = 200
# A pixel is colored when its channels differ by more than this (JPEG noise stays below it),
# and an image is gray when under 1% of its pixels are colored.
COLOR_DIFFERENCE = 24
COLORED_PIXEL_FRACTION = 0.01
# The model heights the recipe picks from, by the images' height: crnn_classic pools the height by 16,
# crnn by 32 (its strided stages round up, so 48 leaves it 2 rows).
MODEL_HEIGHTS = ((64, 32), (96, 48))  # (images lower than this, height); taller images get 64
TALLEST_MODEL_HEIGHT = 64
# Inputs wider than this many times their height are cut to it (very long strips).
MAX_ASPECT = 12
# The CRNNs keep one time step per 4 pixels of width, and CTC needs 2 * max_length + 1 steps.
WIDTH_PER_STEP = 4


@dataclass(frozen=True)
class Choice:
    """One settled value of the recipe and why it was chosen."""

    value: object
    reason: str

    def to_dict(self) -> dict:
        return {"value": list(self.value) if isinstance(self.value, tuple) else self.value, "reason": self.reason}


@dataclass(frozen=True)
class ImageSurvey:
    """The median size of a sample of a folder's images, and whether they are all gray."""

    height: int
    width: int
    gray: bool
    sampled: int
    colored: int


def survey_images(root: Path, relpaths: Sequence[str], sample: int = SURVEY_SAMPLE) -> ImageSurvey:
    """Open an evenly spaced sample of ``relpaths`` (the same files on every run) and measure them.

    Unreadable files are passed over here; decoding reports them with the other bad files."""
    if not relpaths:
        raise ValueError(f"no images under {str(root)!r} to measure")
    step = max(1, len(relpaths) / sample)
    chosen = sorted({relpaths[int(i * step)] for i in range(min(sample, len(relpaths)))})
    heights, widths, colored = [], [], 0
    for relpath in chosen:
        try:
            image = open_image(Path(root) / relpath, name=relpath)
        except ImageDecodeError:
            continue
        widths.append(image.width)
        heights.append(image.height)
        colored += not _is_gray(np.asarray(image))
    if not heights:
        raise ValueError(f"none of the {len(chosen)} sampled images under {str(root)!r} could be read")
    return ImageSurvey(height=int(np.median(heights)), width=int(np.median(widths)), gray=colored == 0,
                       sampled=len(heights), colored=colored)


def _is_gray(rgb: np.ndarray) -> bool:
    channels = rgb.astype(np.int16)
    spread = channels.max(axis=2) - channels.min(axis=2)
    return float((spread > COLOR_DIFFERENCE).mean()) < COLORED_PIXEL_FRACTION


def choose_grayscale(survey: ImageSurvey) -> Choice:
    if survey.gray:
        return Choice(True, f"all {survey.sampled} sampled images are gray: one channel holds everything")
    return Choice(False, f"{survey.colored} of {survey.sampled} sampled images have color: read RGB")


def choose_input_size(survey: ImageSurvey, max_length: int) -> Choice:
    """The model's (height, width): a CRNN height by the images' height, and the images' aspect,
    widened where needed so that CTC has time steps for the longest label."""
    height = next((h for limit, h in MODEL_HEIGHTS if survey.height < limit), TALLEST_MODEL_HEIGHT)
    aspect = survey.width / survey.height
    width = _multiple_of_8(height * min(aspect, MAX_ASPECT))
    reason = (f"images are {survey.width}x{survey.height} (median of {survey.sampled}): height {height}, "
              f"width {width} keeps their {aspect:.2f}:1 aspect")
    needed = _multiple_of_8(WIDTH_PER_STEP * (2 * max_length + 1), up=True)
    if width < needed:
        width = needed
        reason += f", widened to {width} for the time steps CTC needs for {max_length} characters"
    return Choice((height, max(width, 8)), reason)


def _multiple_of_8(value: float, up: bool = False) -> int:
    return int(8 * (math.ceil(value / 8) if up else max(1, round(value / 8))))


def choose_case(labels: Sequence[str]) -> Choice:
    """Case-insensitive when both cases occur but never inside one label: a labeler who typed some
    labels in capitals, not a scheme whose text mixes cases."""
    cased = [label for label in labels if any(c.isupper() for c in label) or any(c.islower() for c in label)]
    upper = sum(1 for label in cased if not any(c.islower() for c in label))
    lower = sum(1 for label in cased if not any(c.isupper() for c in label))
    mixed = len(cased) - upper - lower
    if mixed:
        return Choice(False, f"{mixed} labels mix upper and lower case: case is part of the scheme")
    if upper and lower:
        return Choice(True, f"{upper} labels are upper case and {lower} lower case, none mixes them: "
                            "read case-insensitively (upper-cased)")
    which = "upper" if upper else "lower" if lower else "no"
    return Choice(False, f"every label has {which} case letters only: nothing to fold")


def choose_samples_per_epoch(num_train: int, batch_size: int, min_batches: int) -> Choice:
    """Each epoch draws at least ``min_batches`` batches, so that validation, the checkpoints and
    the plateau stop come at a steady pace however few the labels."""
    samples = max(num_train, min_batches * batch_size)
    if samples == num_train:
        return Choice(None, f"{num_train} training images fill {num_train // batch_size} batches: one pass per epoch")
    return Choice(samples, f"{num_train} training images: each epoch draws {samples} samples "
                           f"({min_batches} batches of {batch_size}) from them")

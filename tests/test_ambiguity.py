"""``python -m captcha_lit.ambiguity``: seeded character drawing and a short study."""

from __future__ import annotations

import json

import numpy as np
import pytest

from captcha_lit.ambiguity import SIDE, draw_characters, main


def test_drawing_is_seeded_and_squeeze_narrows_the_characters():
    images, labels = draw_characters("O0", seed=3, count=64, squeeze=False, width=96)
    again, labels_again = draw_characters("O0", seed=3, count=64, squeeze=False, width=96)
    other, _ = draw_characters("O0", seed=4, count=64, squeeze=False, width=96)
    assert images.shape == (64, SIDE, SIDE) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(images, other)
    assert 0 < labels.sum() < 64  # both characters drawn
    squeezed, _ = draw_characters("O0", seed=3, count=64, squeeze=True, width=96)

    def mean_ink_width(batch: np.ndarray) -> float:
        return float(np.mean([np.flatnonzero(image.max(axis=0) > 32).max() + 1 for image in batch]))

    assert mean_ink_width(squeezed) < mean_ink_width(images)


def test_a_short_study_learns_a_distinct_pair(tmp_path):
    out = tmp_path / "study.json"
    result = main(["--pair", "1W", "--train", "4096", "--test", "512", "--epochs", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert [row["epoch"] for row in result["history"]] == [1, 2, 3]
    assert result["history"][-1]["test_acc"] > 0.9  # 1 and W look nothing alike


@pytest.mark.parametrize("argv", [["--pair", "OO"], ["--pair", "O"], ["--train", "10"]])
def test_bad_arguments_are_named(argv):
    with pytest.raises(ValueError, match="--pair|--train"):
        main(argv + ["--epochs", "1"])

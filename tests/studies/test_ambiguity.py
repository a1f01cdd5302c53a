"""``python docs/studies/ambiguity.py``: seeded character drawing and a short study."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

# A research study, not part of the package; its worker processes import it by name too.
sys.path.insert(0, str(REPO_ROOT / "docs" / "studies"))
from ambiguity import CONTEXT_WIDTH, SIDE, draw_characters, draw_in_context, main  # noqa: E402


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


@pytest.mark.slow
def test_a_short_study_learns_a_distinct_pair(tmp_path):
    out = tmp_path / "study.json"
    result = main(["--pair", "1W", "--train", "1024", "--test", "256", "--epochs", "3", "--batch", "32",
                   "--out", str(out)])
    assert json.loads(out.read_text()) == result
    (run,) = result["runs"]
    assert run["train"] == 1024 and [row["epoch"] for row in run["history"]] == [1, 2, 3]
    assert run["history"][-1]["test_acc"] > 0.9  # 1 and W look nothing alike


def test_context_pairs_differ_only_in_the_character_and_are_centred_on_it():
    images, labels, differing = draw_in_context("O0", seed=5, count=16)
    again, _, _ = draw_in_context("O0", seed=5, count=16)
    assert images.shape == (16, 60, CONTEXT_WIDTH) and np.array_equal(images, again)
    assert labels.tolist() == [0, 1] * 8 and differing.shape == (8,)
    for first, second, pixels in zip(images[0::2], images[1::2], differing):
        changed = first != second
        assert 0 < changed.sum() <= pixels  # the window holds the differing pixels, or most of them
        columns = np.flatnonzero(changed.any(axis=0))
        assert abs((columns[0] + columns[-1]) / 2 - CONTEXT_WIDTH / 2) <= 2


@pytest.mark.slow
def test_context_learning_curve_trains_one_classifier_per_size():
    result = main(["--context", "--pair", "1A", "--train", "512,256", "--test", "128", "--epochs", "2", "--batch", "32"])
    assert result["mode"] == "context" and [run["train"] for run in result["runs"]] == [256, 512]
    assert result["test_pairs_differing_pixels"]["median"] > 50  # 1 and A differ in many pixels
    assert all(len(run["history"]) == 2 for run in result["runs"])


@pytest.mark.parametrize("argv", [["--pair", "OO"], ["--pair", "O"], ["--train", "10"], ["--train", "4096,10"],
                                  ["--context", "--pair", "Oo"], ["--context", "--pair", "1W"]])
def test_bad_arguments_are_named(argv):
    with pytest.raises(ValueError, match="--pair|--train"):
        main(argv + ["--epochs", "1"])


def test_train_sizes_that_are_not_numbers_are_named(capsys):
    with pytest.raises(SystemExit):
        main(["--train", "many"])
    assert "'many': give numbers of images" in capsys.readouterr().err

"""The folder recipe's choices, from folders of different image sizes, colors, cases and label counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from captcha_lit.data.folder import FolderDataModule
from captcha_lit.data.survey import choose_case, choose_input_size, survey_images
from captcha_lit.training.budget import settle_training_length, step_budget


def _folder(root: Path, labels: list[str], size: tuple[int, int], color: bool) -> Path:
    """Images of ``size`` (width, height): gray noise, or noise with a colored stripe."""
    root.mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(labels):
        rng = np.random.default_rng(i)
        gray = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
        pixels = np.stack([gray] * 3, axis=2)
        if color:
            pixels[: size[1] // 3, :, 0] = 250
            pixels[: size[1] // 3, :, 1:] = 10
        Image.fromarray(pixels).save(root / f"{label}_{i}.png")
    return root


def _resolved(root: Path, cache_dir: Path, **kwargs) -> FolderDataModule:
    dm = FolderDataModule(path=str(root), cache_dir=str(cache_dir), val_fraction=0.2, test_fraction=0.2, **kwargs)
    dm.resolve()
    return dm


@pytest.mark.parametrize(("size", "color", "expected_size", "gray"), [
    ((200, 50), False, (32, 128), True),   # a 4:1 gray strip
    ((120, 40), True, (32, 96), False),    # 3:1 in color
    ((160, 60), True, (32, 88), False),    # the captcha package's canvas
    ((300, 80), False, (48, 176), True),   # taller images get a taller input
    ((90, 150), True, (64, 40), False),    # portrait: 0.6:1, narrow, yet wide enough for CTC
])
def test_input_size_and_channels_come_from_the_images(tmp_path, cache_dir, size, color, expected_size, gray):
    labels = [f"a{i % 10}b{i % 7}" for i in range(20)]
    dm = _resolved(_folder(tmp_path / "f", labels, size, color), cache_dir)
    assert dm.input_size == expected_size
    assert (dm.channels == 1) is gray
    assert dm.label_spec()["input_size"] == list(expected_size) and dm.label_spec()["grayscale"] is gray
    # The settled values are recorded, so a checkpoint's data config reads the folder the same way.
    assert dm.hparams.input_size == list(expected_size) and dm.hparams.grayscale is gray
    assert set(dm.recipe) == {"input_size", "grayscale", "case_insensitive", "train_samples_per_epoch"}
    assert all(choice.reason for choice in dm.recipe.values())


def test_given_values_are_kept_and_not_surveyed(tmp_path, cache_dir):
    dm = _resolved(_folder(tmp_path / "f", ["ab12"] * 10, (200, 50), True), cache_dir,
                   input_size=[40, 120], grayscale=True, case_insensitive=False, train_samples_per_epoch=None)
    assert dm.input_size == (40, 120) and dm.channels == 1
    assert dm.recipe == {}
    assert dm.samples_per_epoch is None


def test_width_makes_room_for_long_labels():
    from captcha_lit.data.survey import ImageSurvey

    square = ImageSurvey(height=50, width=50, gray=True, sampled=1, colored=0)
    choice = choose_input_size(square, max_length=10)
    assert choice.value == (32, 88)  # 4 px per time step, 2 * 10 + 1 steps
    assert "widened" in choice.reason


@pytest.mark.parametrize(("labels", "folded"), [
    (["abc1", "de2f"], False),                 # one case
    (["ABC1", "DE2F"], False),
    (["abc1", "DEF2", "gh3i"], True),          # each label one case, both cases: a labeler's habit
    (["aBc1", "DEF2", "gh3i"], False),         # a label mixes them: the scheme is case-sensitive
    (["1234", "5678"], False),                 # digits only
])
def test_case_is_inferred_from_the_labels(labels, folded):
    assert choose_case(labels).value is folded


def test_folded_case_upper_cases_the_labels(tmp_path, cache_dir):
    dm = _resolved(_folder(tmp_path / "f", ["abc1", "DEF2"] * 5, (120, 40), False), cache_dir)
    assert dm.case_insensitive and dm.charset.chars == "12ABCDEF"
    assert dm.hparams.case_insensitive is True


def test_small_folders_draw_whole_batches_each_epoch(tmp_path, cache_dir):
    dm = _resolved(_folder(tmp_path / "f", [f"ab{i % 10}" for i in range(30)], (120, 40), False), cache_dir,
                   batch_size=8)
    assert dm.samples_per_epoch == 50 * 8
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 50  # 18 images, 50 batches per epoch


def test_survey_is_a_fixed_sample(tmp_path):
    root = _folder(tmp_path / "f", [f"x{i}" for i in range(30)], (100, 40), False)
    names = sorted(p.name for p in root.iterdir())
    assert survey_images(root, names, sample=10) == survey_images(root, names, sample=10)
    assert survey_images(root, names, sample=10).sampled == 10


@pytest.mark.parametrize(("labels", "steps"), [(25, 1500), (728, 1500), (2000, 4000), (50_000, 20000)])
def test_step_budget_scales_with_the_labels(labels, steps):
    assert step_budget(labels, 2.0, 1500, 20000) == steps


def _trainer_cfg(**trainer):
    return OmegaConf.create({"trainer": {"max_epochs": None, "max_steps": "auto", "min_steps": "auto", **trainer},
                             "step_budget": {"steps_per_label": 2.0, "min_steps": 100, "max_steps": 1000}})


def test_training_length_is_settled_from_the_labels():
    cfg = _trainer_cfg()
    choices = settle_training_length(cfg, num_train=300)
    assert (cfg.trainer.max_steps, cfg.trainer.min_steps) == (600, 300)
    assert "300 training labels" in choices["max_steps"].reason


def test_given_epochs_turn_the_budget_off():
    cfg = _trainer_cfg(max_epochs=50)
    settle_training_length(cfg, num_train=300)
    assert (cfg.trainer.max_steps, cfg.trainer.min_steps) == (-1, None)


def test_step_budget_needs_labels_and_sane_numbers():
    with pytest.raises(ValueError, match="only data=folder"):
        settle_training_length(_trainer_cfg(), num_train=None)
    with pytest.raises(ValueError, match="step_budget.min_steps=0"):
        step_budget(10, 2.0, 0, 10)


@pytest.mark.parametrize(("key", "value", "match"), [
    ("grayscale", "yes", "data.grayscale='yes' must be auto or true"),
    ("case_insensitive", 1, "data.case_insensitive=1 must be auto or true"),
    ("input_size", "big", "data.input_size='big' must be auto"),
    ("train_samples_per_epoch", 0, "data.train_samples_per_epoch=0"),
])
def test_bad_recipe_values_are_named(tmp_path, key, value, match):
    (tmp_path / "f").mkdir()
    with pytest.raises(ValueError, match=match):
        FolderDataModule(path=str(tmp_path / "f"), **{key: value})

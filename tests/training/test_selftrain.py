"""Self-training: unlabeled images of the scheme join training as the model's sure readings; the
unlabeled folder is checked against the labeled one, so no validation or test image is trained on."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import pytest

from captcha_lit.data.synthetic import CaptchaGenerator, GeneratorSpec
from captcha_lit.train import train
from conftest import QUIET_TRAINER, TINY_FOLDER, _compose

SMALL = ["pretrain=none", "model=crnn", "model.channels=[8,16,32,32]", "model.dim=32", "logger=csv",
         "data.batch_size=8", "data.train_samples_per_epoch=null", "trainer.max_epochs=1", "trainer.max_steps=-1",
         "trainer.min_steps=null", "callbacks.plateau_stop=null",
         "callbacks.ema=null"]  # a few steps' average is still near the random start, which reads nothing


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory) -> Path:
    """24 generated CAPTCHAs of the fixture's scheme, named by number (no labels)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("unlabeled")
    generator = CaptchaGenerator(GeneratorSpec(charset="2345678abcdefghkmnprstuvwxyz", min_length=4, max_length=6,
                                               width=120, height=40))
    for i in range(24):
        _, image = generator.sample(7, "unlabeled", i)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def _cfg(tmp_path: Path, cache_dir: Path, name: str, *overrides: str):
    return _compose("train", ["data=folder", f"data.path={TINY_FOLDER}", f"data.cache_dir={cache_dir}", *QUIET_TRAINER,
                              *SMALL, *overrides], tmp_path / name)


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
def test_students_train_on_the_sure_readings_of_unlabeled_images_only(tmp_path, cache_dir, unlabeled):
    metrics = train(_cfg(tmp_path, cache_dir, "run", f"data.unlabeled_path={unlabeled}", "selftrain.rounds=1",
                         "selftrain.min_confidence=0"))  # a one-epoch model is sure of nothing: take every reading
    rounds = metrics["selftrain"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and metrics["selftrain"]["unlabeled"] == 24
    readings = tmp_path / "run" / "selftrain" / "pseudo_labels_round1.csv"
    with open(readings, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rounds[1]["pseudo_labeled"] == len(rows) > 0
    assert all(Path(row["filename"]).parent == unlabeled for row in rows)
    labeled = {_digest(p) for p in TINY_FOLDER.glob("*.png")}
    assert not labeled & {_digest(row["filename"]) for row in rows}
    # The student is the final model; its val and test splits are the teacher's, real labels only.
    assert Path(metrics["best_ckpt"]).is_relative_to(tmp_path / "run" / "selftrain" / "round1")
    assert metrics["test/seq_acc"] == rounds[1]["test/seq_acc"]


def test_an_unlabeled_copy_of_a_labeled_image_is_refused(tmp_path, cache_dir, unlabeled):
    folder = tmp_path / "sneaky"
    shutil.copytree(unlabeled, folder)
    shutil.copyfile(next(TINY_FOLDER.glob("*.png")), folder / "999.png")  # a labeled image, renamed
    with pytest.raises(ValueError, match="1 of its files are also labeled images in data.path"):
        train(_cfg(tmp_path, cache_dir, "sneaky_run", f"data.unlabeled_path={folder}"))


def test_label_named_files_and_the_labeled_folder_itself_are_refused(tmp_path, cache_dir):
    named = tmp_path / "named"
    named.mkdir()
    for source in sorted(TINY_FOLDER.glob("*.png"))[:4]:  # the fixture's scheme, named by their labels
        (named / source.name).write_bytes(source.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="named like labels of this scheme"):
        train(_cfg(tmp_path, cache_dir, "named_run", f"data.unlabeled_path={named}"))
    with pytest.raises(ValueError, match="lies inside the labeled folder"):
        train(_cfg(tmp_path, cache_dir, "inside_run", f"data.unlabeled_path={TINY_FOLDER}"))

"""``python docs/studies/label_loop.py`` on a tiny generated folder: both arms, through the real page."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from captcha_lit.data.files import read_labels_csv
from captcha_lit.data.synthetic import CaptchaGenerator, GeneratorSpec
from captcha_lit.labeling.order import order_images
from captcha_lit.predict import open_model, predict_files
from conftest import QUIET_TRAINER, REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "docs" / "studies"))
from label_loop import main  # noqa: E402

TINY_TRAINING = ["model=crnn", "model.channels=[8,16,32,32]", "model.dim=32", "data.input_size=[32,96]",
                 "data.batch_size=4", "data.train_samples_per_epoch=null", "trainer.max_epochs=1", "trainer.max_steps=-1",
                 "trainer.min_steps=null", "pretrain=none", "logger=csv", "callbacks=none", *QUIET_TRAINER]


@pytest.mark.slow
def test_a_tiny_label_loop_runs_both_arms_through_the_page(tmp_path, cache_dir, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    generator = CaptchaGenerator(GeneratorSpec(min_length=4, max_length=4, input_size=(60, 160)))
    for i in range(30):
        text, array = generator.sample("label-loop", "files", i)
        Image.fromarray(array).save(data / f"{text}_{i}.png")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "study"
    summary = main(["--data", str(data), "--out", str(out), "--round", "4", "--rounds", "2",
                    *[f"--train-arg={a}" for a in TINY_TRAINING + [f"data.cache_dir={cache_dir}"]]])

    assert json.loads((out / "label_loop.json").read_text()) == summary
    assert (summary["pool_images"], summary["test_images"]) == (24, 6)
    runs = [(r["arm"], r["round"], r["labels"], r["new_labels"]) for r in summary["runs"]]
    assert runs == [("doubt", 1, 4, 4), ("doubt", 2, 8, 4), ("file", 1, 8, 8)]
    assert all(0.0 <= r["test_seq_acc"] <= 1.0 for r in summary["runs"])
    assert summary["runs"][1]["readings_kept"].endswith("/4")  # round 2 had the round 1 model's readings

    pool = sorted(p.name for p in (out / "pool").glob("*.png"))
    assert not {p.name for p in (out / "test").glob("*.png")} & set(pool)
    doubt = [path for path, _ in read_labels_csv(out / "doubt" / "labels.csv")]
    assert doubt[:4] == pool[:4]  # round 1: no model, file order
    spec, solve = open_model(summary["runs"][0]["checkpoint"])
    rows = predict_files([out / "pool" / p for p in pool], spec.input_size, spec.channels, solve, 64)
    by_doubt = [pool[i] for i in order_images(pool, [r["confidence"] for r in rows]) if pool[i] not in doubt[:4]]
    assert doubt[4:] == by_doubt[:4]  # round 2: the round 1 model's least sure first
    assert [path for path, _ in read_labels_csv(out / "file" / "labels.csv")] == pool[:8]
    assert all(label == path.split("_")[0] for path, label in read_labels_csv(out / "file" / "labels.csv"))

"""The labeling page's parts without a server: label rules, labels.csv, the page order, a session."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from captcha_lit.data.files import read_labels_csv
from captcha_lit.data.folder import FolderDataModule
from captcha_lit.labeling.order import order_images
from captcha_lit.labeling.rules import LabelRules
from captcha_lit.labeling.session import LabelProblem, LabelSession
from captcha_lit.labeling.store import Conflict, LabelStore
from conftest import FIXTURES, PYTHON, cli_env


def test_rules_fit_the_charsets_case_and_name_the_bad_character():
    rules = LabelRules(charset="0-9A-Z", min_length=4, max_length=5, source="from the model")
    assert rules.fit_case("ab1z") == "AB1Z"
    assert rules.problem("AB1Z") is None
    assert rules.problem("AB#1") == "'#' is not in the charset '0-9A-Z' (from the model)"
    assert "at least 4" in rules.problem("AB1") and "at most 5" in rules.problem("AB1ZZZ")
    assert rules.problem("") and rules.problem("AB 1")
    mixed = LabelRules(charset="abAB")  # both cases in the charset: nothing is changed
    assert mixed.fit_case("aB") == "aB"
    anything = LabelRules()
    assert anything.problem("x#!") is None and anything.problem("a b") == "a label has no spaces"
    with pytest.raises(ValueError, match="duplicate"):
        LabelRules(charset="aab")


def test_the_order_is_least_sure_first_and_file_order_without_a_model():
    paths = ["c.png", "a.png", "b.png", "d.png"]
    assert order_images(paths, None) == [1, 2, 0, 3]
    assert order_images(paths, [0.9, 0.2, None, 0.2]) == [1, 3, 0, 2]  # ties by path, unreadable last


# One writer process: 20 labels, each its own atomic update.
WRITER = """
import sys
from captcha_lit.labeling.store import LabelStore
store, start = LabelStore(sys.argv[1]), int(sys.argv[2])
for i in range(start, start + 20):
    store.update(f"img_{i:03d}.png", expected="pending", label=f"L{i:03d}")
"""


def test_labels_csv_is_shared_by_processes_and_read_by_the_folder_data(tmp_path, cache_dir):
    """Two processes write labels at once: neither loses the other's; data=folder reads the file."""
    csv_path = tmp_path / "labels.csv"
    writers = [subprocess.Popen([PYTHON, "-c", WRITER, str(csv_path), str(start)], env=cli_env(cache_dir))
               for start in (0, 20)]
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    rows = read_labels_csv(csv_path)
    assert sorted(rows) == [(f"img_{i:03d}.png", f"L{i:03d}") for i in range(40)]
    assert not list(tmp_path.glob(".labels.csv.*.tmp"))  # no temporary file is left behind

    store = LabelStore(csv_path)
    assert store.state("img_005.png") == "labeled:L005" and store.state("img_999.png") == "pending"
    with pytest.raises(Conflict, match="labeled 'L005'"):
        store.update("img_005.png", expected="pending", label="X")  # a tab that saw it pending
    store.update("img_005.png", expected="labeled:L005", mark="skipped")
    assert store.state("img_005.png") == "skipped"
    assert ("img_005.png", "L005") not in read_labels_csv(csv_path)
    assert (tmp_path / "labels.marks.csv").read_text().splitlines() == ["filename,mark", "img_005.png,skipped"]


def test_folder_training_data_reads_what_the_page_saved(tmp_path, cache_dir):
    images = sorted(FIXTURES.joinpath("tiny_folder").glob("*.png"))[:12]
    for source in images:
        shutil.copyfile(source, tmp_path / f"unnamed_{images.index(source)}.png")
    store = LabelStore(tmp_path / "labels.csv")
    for i, source in enumerate(images[:10]):
        store.update(f"unnamed_{i}.png", expected="pending", label=source.stem.split("_")[0],
                     model_reading="abcd", model_id="crnn-123")
    datamodule = FolderDataModule(path=str(tmp_path), labels_csv="labels.csv", cache_dir=str(cache_dir),
                                  input_size=[32, 96])
    datamodule.resolve()
    listed = {p: label.lower() for split in ("train", "val", "test")  # case folded: no label mixes cases
              for p, label in zip(datamodule.files[split], datamodule._splits[split][1])}
    assert listed == {f"unnamed_{i}.png": source.stem.split("_")[0] for i, source in enumerate(images[:10])}


def _session(tmp_path, readings=None, rules=None) -> LabelSession:
    paths = [f"img_{i}.png" for i in range(5)]
    for path in paths:
        (tmp_path / path).write_bytes(b"")
    return LabelSession(tmp_path, paths, LabelStore(tmp_path / "labels.csv"), rules or LabelRules(charset="0-9A-Z"),
                        readings=readings, model_id="crnn-1" if readings else None, model_path="m.onnx")


def test_a_session_gives_two_tabs_different_images_and_counts_the_kept_readings(tmp_path):
    readings = [{"text": t, "confidence": c, "char_confidences": [c] * 2, "error": None}
                for t, c in (("AA", 0.9), ("BB", 0.1), ("CC", 0.5), ("DD", 0.3), ("EE", 0.7))]
    session = _session(tmp_path, readings)
    assert session.order == ["img_1.png", "img_3.png", "img_2.png", "img_4.png", "img_0.png"]
    first, second = session.goto("tab1"), session.goto("tab2")
    assert (first["current"], second["current"]) == (0, 1)
    view = session.act("tab1", 0, "save", "bb", "pending")  # the reading, typed in lower case
    assert view["current"] == 2  # 1 is tab2's
    session.act("tab2", 1, "save", "DX", "pending")  # a corrected reading
    counts = session.counts()
    assert (counts["labeled"], counts["remaining"], counts["accepted"], counts["compared"]) == (2, 3, 1, 2)
    with pytest.raises(LabelProblem, match="'#' is not in the charset"):
        session.act("tab1", 2, "save", "C#", "pending")
    with pytest.raises(Conflict):
        session.act("tab2", 0, "save", "ZZ", "pending")  # tab1 labeled it meanwhile
    assert "data.labels_csv=labels.csv" in session.train_command()


def test_only_listed_files_under_the_folder_are_served(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    session = _session(folder)
    (tmp_path / "secret.png").write_bytes(b"x")
    assert session.image_file("img_0.png") == folder / "img_0.png"
    for path in ("../secret.png", "labels.csv", "/etc/passwd", "img_0.png/../../secret.png"):
        assert session.image_file(path) is None
    (folder / "img_0.png").unlink()
    (folder / "img_0.png").symlink_to(tmp_path / "secret.png")  # replaced by a link out of the folder
    assert session.image_file("img_0.png") is None

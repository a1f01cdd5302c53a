"""Folder datasets: labels from names or a CSV, bad files, charset inference, splits, the cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import captcha_lit.data.folder as folder_module
from captcha_lit.training.builders import build_datamodule
from captcha_lit.data.folder import FolderDataModule
from captcha_lit.preprocess import load_input
from conftest import FIXTURES, REPO_ROOT

SHARED = REPO_ROOT.parent / "shared" / "datasets" / "captcha_images_v2"
TINY_FOLDER = FIXTURES / "tiny_folder"
INPUT = (16, 48)


def _write_image(path: Path, seed: int = 0, size: tuple[int, int] = (60, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path)


def _folder(root: Path, names: list[str]) -> Path:
    for i, name in enumerate(names):
        _write_image(root / name, seed=i)
    return root


def _dm(root: Path, cache_dir: Path, **kwargs) -> FolderDataModule:
    # The recipe's auto values are pinned here (tests/data/test_survey.py covers them).
    options = dict(path=str(root), input_size=INPUT, grayscale=False, case_insensitive=False,
                   train_samples_per_epoch=None, cache_dir=str(cache_dir), batch_size=4, eval_batch_size=4,
                   val_fraction=0.2, test_fraction=0.2)
    return FolderDataModule(**{**options, **kwargs})


def _all_labels(dm: FolderDataModule) -> dict[str, str]:
    dm.setup(None)
    return {f: text for split in ("train", "val", "test")
            for f, text in zip(dm.files[split], dm.datasets[split].texts)}


def test_labels_come_from_file_names(tmp_path, cache_dir):
    root = _folder(tmp_path / "imgs", ["AB12.png", "CD34_2.png", "sub/EF56_copy_b.jpg", "GH78.PNG"])
    (root / "notes.txt").write_text("not an image")  # other extensions are ignored
    (root / ".hidden.png").write_bytes(b"hidden files are skipped")
    dm = _dm(root, cache_dir)
    assert _all_labels(dm) == {"AB12.png": "AB12", "CD34_2.png": "CD34", "sub/EF56_copy_b.jpg": "EF56",
                               "GH78.PNG": "GH78"}
    assert dm.charset.chars == "12345678ABCDEFGH"  # sorted unique characters of the labels
    assert (dm.min_length, dm.max_length) == (4, 4)
    assert dm.hparams.charset == "12345678ABCDEFGH"  # recorded for the checkpoint
    assert dm.label_spec() == {"charset": "12345678ABCDEFGH", "min_length": 4, "max_length": 4,
                               "input_size": list(INPUT), "grayscale": False}


def test_images_are_preprocessed_like_inference(tmp_path, cache_dir):
    root = _folder(tmp_path / "imgs", ["AB12.png", "CD34.png", "EF56.png", "GH78.png", "JK90.png"])
    dm = _dm(root, cache_dir)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    for index, relpath in enumerate(dm.files["train"]):
        expected = load_input(root / relpath, INPUT)  # the inference path
        item = dataset[index]
        assert item["image"].shape == (3, *INPUT) and item["image"].dtype == torch.uint8
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), expected)


def test_bad_files_are_each_named(tmp_path, cache_dir):
    root = _folder(tmp_path / "imgs", ["AB12.png", "CD34.png", "EF56.png", "GH78.png", "JK90.png", "_x.png",
                                       "ab12_lower.png"])
    (root / "ZZ99.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (root / "YY88.png").write_bytes(b"")
    with pytest.raises(ValueError) as info:
        _dm(root, cache_dir, charset="0-9A-Z").setup("fit")
    message = str(info.value)
    assert "4 bad file(s)" in message
    assert "_x.png: no label" in message
    assert "ab12_lower.png: label 'ab12' has character(s) 'ab' not in charset '0-9A-Z'" in message
    assert "ZZ99.png: " in message and "YY88.png: is empty" in message
    assert "data.skip_bad=true" in message


def test_skip_bad_leaves_them_out_and_reports_them(tmp_path, cache_dir):
    root = _folder(tmp_path / "imgs", ["AB12.png", "CD34.png", "EF56.png", "GH78.png", "JK90.png", "_x.png"])
    (root / "ZZ99.png").write_bytes(b"garbage")
    dm = _dm(root, cache_dir, skip_bad=True)
    labels = _all_labels(dm)
    assert sorted(labels) == ["AB12.png", "CD34.png", "EF56.png", "GH78.png", "JK90.png"]
    assert [b["file"] for b in dm.bad_files] == ["ZZ99.png", "_x.png"]
    assert "not a recognized image format" in dm.bad_files[0]["reason"]
    assert "Z" not in dm.charset.chars  # a bad file's label does not count


def test_length_limits_make_bad_files(tmp_path, cache_dir):
    root = _folder(tmp_path / "imgs", ["AB1.png", "CD23.png", "EF456.png", "GH7890.png", "JK12.png", "LM34.png"])
    dm = _dm(root, cache_dir, min_length=4, max_length=5, skip_bad=True)
    dm.setup(None)
    assert {b["file"] for b in dm.bad_files} == {"AB1.png", "GH7890.png"}
    assert "fewer than data.min_length=4" in dm.bad_files[0]["reason"]


def test_labels_csv(tmp_path, cache_dir):
    root = _folder(tmp_path / "imgs", ["a.png", "b.png", "c.png", "d.png", "e.png", "unlisted.png"])
    (root / "labels.csv").write_text("filename,label\na.png,x1y\nb.png,ZZ\nc.png,q9\nd.png,r8\ne.png,s7\n"
                                     "missing.png,m1\n")
    dm = _dm(root, cache_dir, labels_csv="labels.csv", skip_bad=True)  # relative to data.path
    assert _all_labels(dm) == {"a.png": "x1y", "b.png": "ZZ", "c.png": "q9", "d.png": "r8", "e.png": "s7"}
    assert dm.bad_files == [{"file": "missing.png", "reason": f"listed in labels.csv but not found under {root}"}]
    assert (dm.min_length, dm.max_length) == (2, 3)


def test_labels_csv_needs_its_columns(tmp_path, cache_dir):
    root = _folder(tmp_path / "imgs", ["a.png"])
    (tmp_path / "labels.csv").write_text("file,text\na.png,x1\n")
    with pytest.raises(ValueError, match="needs a header with the columns filename,label; it has file,text"):
        _dm(root, cache_dir, labels_csv=str(tmp_path / "labels.csv")).setup(None)


def test_a_committed_folder_is_read_in_place_through_a_csv(tmp_path, cache_dir):
    """tiny_folder: a CSV picks 12 of its CAPTCHAs; they are read where they are and nothing is written beside them."""
    before = sorted(TINY_FOLDER.iterdir())
    picked = {p.name: p.stem.split("_")[0] for p in sorted(TINY_FOLDER.glob("*.png"))[:12]}
    (tmp_path / "subset.csv").write_text("filename,label\n" + "".join(f"{n},{t}\n" for n, t in picked.items()))
    dm = _dm(TINY_FOLDER, cache_dir, labels_csv=str(tmp_path / "subset.csv"), input_size=(32, 96))
    assert _all_labels(dm) == picked
    assert sorted(TINY_FOLDER.iterdir()) == before


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"needs the shared captcha_images_v2 at {SHARED}, which a clean "
                                                 "clone lacks (tiny_folder covers folder data there)")
def test_shared_images_read_in_place_through_a_csv(tmp_path, cache_dir):
    names = sorted(os.listdir(SHARED))[:12]
    (tmp_path / "subset.csv").write_text("filename,label\n" + "".join(f"{n},{n[:-4]}\n" for n in names))
    dm = _dm(SHARED, cache_dir, labels_csv=str(tmp_path / "subset.csv"), input_size=(32, 128))
    labels = _all_labels(dm)
    assert sorted(labels) == names
    assert set(dm.charset.chars) <= set("2345678bcdefgmnpwxy")


def test_case_insensitive_upper_cases_labels_and_charset(tmp_path, cache_dir):
    root = _folder(tmp_path / "imgs", ["ab12.png", "CD34.png", "eF56.png", "gh78.png", "ij90.png"])
    dm = _dm(root, cache_dir, case_insensitive=True)
    assert sorted(_all_labels(dm).values()) == ["AB12", "CD34", "EF56", "GH78", "IJ90"]
    given = _dm(root, cache_dir, case_insensitive=True, charset="0-9a-z")
    given.setup(None)
    assert given.charset.chars == "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


NAMES = [f"{i:02d}AB.png" for i in range(20)]


def test_split_ignores_creation_and_listing_order(tmp_path, cache_dir, monkeypatch):
    forward = _folder(tmp_path / "forward", NAMES)
    backward = _folder(tmp_path / "backward", NAMES[::-1])
    a = _dm(forward, cache_dir)
    a.setup(None)
    real_walk = os.walk

    def reversed_walk(top, *args, **kwargs):
        for dirpath, dirnames, filenames in real_walk(top, *args, **kwargs):
            yield dirpath, dirnames, filenames[::-1]

    monkeypatch.setattr(folder_module.os, "walk", reversed_walk)
    b = _dm(backward, cache_dir)
    b.setup(None)
    assert a.files == b.files
    assert [len(a.files[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(sum(a.files.values(), [])) == sorted(NAMES)  # disjoint and complete


def test_split_follows_the_seed(tmp_path, cache_dir):
    root = _folder(tmp_path / "imgs", NAMES)
    seed0, again, seed1 = (_dm(root, cache_dir, split_seed=s) for s in (0, 0, 1))
    for dm in (seed0, again, seed1):
        dm.setup(None)
    assert seed0.files == again.files
    assert seed0.files["test"] != seed1.files["test"]


def test_decoded_images_are_cached(tmp_path, cache_dir, monkeypatch):
    root = _folder(tmp_path / "imgs", ["AB12.png", "CD34.png", "EF56.png", "GH78.png", "JK90.png"])
    _dm(root, cache_dir).setup(None)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(folder_module, "load_input", no_decoding)
    _dm(root, cache_dir).setup(None)  # the same files: served from the cache
    _write_image(root / "CD34.png", seed=99, size=(61, 20))  # a changed file is decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        _dm(root, cache_dir).setup(None)


def test_variable_length_batches_are_padded(tmp_path, cache_dir):
    names = [f"{'123456'[: 3 + i % 4]}_{i}.png" for i in range(16)]
    root = _folder(tmp_path / "imgs", names)
    dm = _dm(root, cache_dir, batch_size=16, val_fraction=0.1, test_fraction=0.1)
    assert (dm.label_spec()["min_length"], dm.label_spec()["max_length"]) == (3, 6)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    texts = [dm.charset.decode(row) for row in batch["target"].tolist()]
    assert batch["target"].shape == (len(texts), 6) and set(texts) <= set(dm.datasets["train"].texts)
    for row, length, text in zip(batch["target"].tolist(), batch["length"].tolist(), texts):
        assert length == len(text)
        assert row[:length] == [dm.charset.chars.index(c) for c in text]
        assert row[length:] == [-1] * (6 - length)
    assert len(set(batch["length"].tolist())) > 1


def test_config_dispatch_and_missing_folder(tmp_path, cache_dir):
    root = _folder(tmp_path / "imgs", ["AB12.png"])
    dm = build_datamodule({"source": "folder", "path": str(root), "cache_dir": str(cache_dir),
                           "mean": [0.5] * 3, "std": [0.5] * 3})
    assert isinstance(dm, FolderDataModule)
    assert dm.hparams.source == "folder"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_datamodule({"source": "folder", "path": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="data.source='ftp' is not supported"):
        build_datamodule({"source": "ftp"})
    with pytest.raises(ValueError, match="data.fonts is not an option of data.source=folder; its options are: path"):
        build_datamodule({"source": "folder", "path": str(root), "fonts": "dejavu"})
    # debug=fast shrinks generated splits; a folder ignores those sizes
    assert isinstance(build_datamodule({"source": "folder", "path": str(root), "num_train": 8}), FolderDataModule)


def test_train_limit_takes_nested_subsets_and_keeps_val_and_test(tmp_path, cache_dir):
    root = _folder(tmp_path / "imgs", NAMES)
    full, four, two = (_dm(root, cache_dir, train_limit=n) for n in (None, 4, 2))
    for dm in (full, four, two):
        dm.setup(None)
    assert len(four.files["train"]) == 4 and len(two.files["train"]) == 2
    assert set(two.files["train"]) <= set(four.files["train"]) <= set(full.files["train"])
    for split in ("val", "test"):
        assert full.files[split] == four.files[split] == two.files[split]
    with pytest.raises(ValueError, match="data.train_limit=0"):
        _dm(root, cache_dir, train_limit=0)
    num_train = len(full.files["train"])
    exact = _dm(root, cache_dir, train_limit=num_train)
    exact.setup(None)
    assert exact.files["train"] == full.files["train"]
    with pytest.raises(ValueError, match=rf"data.train_limit={num_train + 1} is more than the {num_train} images of the "
                                         rf"training split .*pass at most {num_train}, or data.train_limit=null"):
        _dm(root, cache_dir, train_limit=num_train + 1).setup(None)

"""Pictures: training-time images in TensorBoard, errors by character, feature maps, the visualize CLI."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from captcha_lit.viz import analysis, plots
from captcha_lit.training.callbacks import PredictionGallery
from captcha_lit.decoding import ctc_character_steps
from captcha_lit.eval import evaluate
from captcha_lit.train import train
from captcha_lit.viz.visualize import visualize
from conftest import run_entry_points

SMALL_CRNN = ["model=crnn", "model.channels=[8,16,32,32]", "model.dim=32"]
ERROR_FILES = ("confusion.png", "confusion.csv", "confused_pairs.md", "confused_pairs.csv", "position_accuracy.png",
               "position_accuracy.csv")


def assert_picture(path: Path, min_bytes: int = 2000, min_size: tuple[int, int] = (200, 100)) -> np.ndarray:
    """A real picture: a PNG of some size whose pixels vary."""
    assert path.is_file(), f"{path} was not written"
    assert path.stat().st_size > min_bytes, f"{path} has only {path.stat().st_size} bytes"
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[1] >= min_size[0] and pixels.shape[0] >= min_size[1], f"{path} is {pixels.shape}"
    assert pixels.std() > 5, f"{path} is nearly one color"
    return pixels


# ---- the numbers ---------------------------------------------------------------------------
def test_alignment_counts_a_dropped_character_once():
    assert analysis.align("ABCDE", "ABXDE") == [("A", "A"), ("B", "B"), ("C", "X"), ("D", "D"), ("E", "E")]
    # position by position, a drop would make C, D and E wrong as well
    assert analysis.align("ABCDE", "ABDE") == [("A", "A"), ("B", "B"), ("C", "∅"), ("D", "D"), ("E", "E")]
    assert analysis.align("AB", "AXB") == [("A", "A"), ("∅", "X"), ("B", "B")]
    assert analysis.align("", "") == []


def test_error_report():
    truths = ["O0AB", "O0AB", "OOAB", "ABCD", "AB"]
    preds = ["00AB", "00AB", "OOAB", "ABD", "ABC"]
    report = analysis.error_report(truths, preds, "0ABCDO")
    labels = report.labels
    assert labels == list("0ABCDO") + ["∅"]

    def count(true: str, read: str) -> int:
        return int(report.confusion[labels.index(true), labels.index(read)])

    assert count("O", "0") == 2 and count("O", "O") == 2 and count("0", "0") == 2
    assert count("C", "∅") == 1  # ABCD -> ABD dropped C
    assert count("∅", "C") == 1  # AB -> ABC added C
    assert report.num_correct == 1 and report.seq_acc == pytest.approx(1 / 5)
    pairs = report.confused_pairs()
    assert pairs[0] == {"true": "O", "predicted": "0", "count": 2, "rate": pytest.approx(2 / 4)}
    assert {(p["true"], p["predicted"]) for p in pairs} == {("O", "0"), ("C", "∅"), ("∅", "C")}
    assert next(p for p in pairs if p["true"] == "∅")["rate"] is None
    positions = report.position_accuracy()
    assert [p["count"] for p in positions] == [5, 5, 4, 4]
    assert positions[0]["accuracy"] == pytest.approx(3 / 5)  # the two O0AB read 00AB
    assert positions[2]["accuracy"] == pytest.approx(3 / 4)  # C of ABCD dropped


def test_gallery_order_puts_wrong_predictions_first():
    truths = ["AAAA", "BBBB", "CCCC", "DDDD", "EEEE", "FFFF"]
    preds = ["AAAA", "BBBX", "CCCC", "DDD", "EEEE", "FFFF"]
    confidences = [0.9, 0.2, 0.5, 0.8, 0.1, 0.99]
    assert analysis.gallery_order(truths, preds, confidences) == [3, 1, 4, 2, 0, 5]
    assert analysis.gallery_order(truths, preds) == [1, 3, 0, 2, 4, 5]
    assert analysis.gallery_order([], []) == []


def test_ctc_character_steps_follow_the_alignment():
    blank = 3
    best = [0, 0, 3, 1, 3, 3, 1, 2]  # "a a _ b _ _ b c" -> the text "abbc"
    peaks = {0: 1, 3: 1, 6: 1, 7: 1}  # the step where each character is most probable
    logits = np.full((1, len(best), 4), -5.0)
    for t, k in enumerate(best):
        logits[0, t, k] = 5.0 + peaks.get(t, 0)
    assert ctc_character_steps(logits, [[0, 1, 1, 2]], blank) == [[0, 3, 6, 7]]
    assert ctc_character_steps(logits, [[0] * 9], blank) == [[]]  # longer than the steps: no alignment


def test_character_points_by_decoder():
    features = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    positional = analysis.character_points(features, None, ["AB", "CDE"], ["AX", "CD"], decoder="positional",
                                           charset="ABCDEX", first_sample=10)
    assert positional.sample == [10, 10, 11, 11, 11]
    assert positional.position == [0, 1, 0, 1, 2]
    assert positional.true == list("ABCDE") and positional.predicted == ["A", "X", "C", "D", "∅"]
    assert np.array_equal(positional.features[4], features[1, 2].numpy())

    shared = analysis.character_points(features, None, ["AB", "CDE"], ["AX", "CD"], decoder="positional",
                                       charset="ABCDEX", shared=True)
    assert shared.whole_images and shared.true == ["AB", "CDE"] and len(shared.features) == 2

    logits = torch.full((2, 8, 7), -5.0)
    logits[:, :, 6] = 5.0  # blank everywhere: the model reads nothing
    ctc = analysis.character_points(features, logits, ["AB", "CDE"], ["", ""], decoder="ctc", charset="ABCDEX")
    assert ctc.true == list("ABCDE") and set(ctc.predicted) == {"∅"}
    assert len(ctc.features) == 5 and len(set(map(tuple, ctc.features.tolist()))) == 5


def test_tsne_on_a_tiny_set():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (10, 64)), rng.normal(40, 1, (10, 64))])
    coords = analysis.tsne_2d(features, perplexity=30, seed=0, max_iter=500)
    assert coords.shape == (20, 2) and np.isfinite(coords).all()
    spread = max(np.linalg.norm(coords[:10] - coords[:10].mean(0), axis=1).max(),
                 np.linalg.norm(coords[10:] - coords[10:].mean(0), axis=1).max())
    assert np.linalg.norm(coords[:10].mean(0) - coords[10:].mean(0)) > spread  # the two clusters stay apart
    with pytest.raises(ValueError, match="at least 5"):
        analysis.tsne_2d(features[:3])


def test_normalization_is_undone_for_display(make_module):
    module = make_module("crnn", charset="0-9", mean=(0.2, 0.4, 0.6), std=(0.3, 0.2, 0.1), model_kwargs={"dim": 32})
    images = torch.randint(0, 256, (2, 3, 32, 96), dtype=torch.uint8)
    assert torch.equal(module.preprocess.to_uint8(module.preprocess(images)), images)


# ---- the pictures --------------------------------------------------------------------------
def _tile_border_colors(picture: np.ndarray, count: int, columns: int) -> list[tuple[int, ...]]:
    """The color of each tile's top-left border pixel in a ``tile_grid`` picture with a title."""
    rows = -(-count // columns)
    cell_w = (picture.shape[1] - 6) // columns
    cell_h = (picture.shape[0] - 6 - 23) // rows  # title: 13 px font + 4 + 6
    return [tuple(picture[6 + 23 + (k // columns) * cell_h, 6 + (k % columns) * cell_w]) for k in range(count)]


def test_prediction_gallery_frames_wrong_red_and_right_green(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 96, 3), dtype=np.uint8)
    gallery = plots.prediction_gallery(images, ["AB0", "CD", "EF", "GH"], ["AB0", "CX", "E", "GH"], [0.9] * 4,
                                       columns=2, title="gallery")
    pixels = assert_picture(plots.save_image(gallery, tmp_path / "gallery.png"))
    assert _tile_border_colors(pixels, 4, 2) == [plots.GREEN, plots.RED, plots.RED, plots.GREEN]


def test_prediction_gallery_callback_keeps_wrong_ones_first(tmp_path, make_module):
    """Two validation batches through the callback's hooks: at most num_images of each kind are kept,
    and the picture starts with the wrong predictions."""
    module = make_module("crnn", model_kwargs={"dim": 32})
    gallery = PredictionGallery(num_images=4, columns=4, dirpath=str(tmp_path))
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, loggers=[], current_epoch=0, global_step=5)
    gallery.on_validation_epoch_start(trainer, module)
    for texts, preds in ((["AAAAA", "BBBBB", "CCCCC"], ["AAAAA", "BBBBB", "CCCCC"]),
                         (["DDDDD", "EEEEE", "FFFFF"], ["DDDDD", "EXEEE", "FFF"])):
        batch = {"image": module.preprocess(torch.randint(0, 256, (3, 3, 32, 96), dtype=torch.uint8)),
                 "target": torch.tensor([module.charset.encode(text) for text in texts])}
        gallery.on_validation_batch_end(trainer, module, {"preds": preds, "confidences": [0.5] * 3}, batch, 0)
    assert len(gallery._kept[True]) == 4 and len(gallery._kept[False]) == 2
    gallery.on_validation_epoch_end(trainer, module)
    pixels = assert_picture(tmp_path / "val_predictions.png")
    assert _tile_border_colors(pixels, 4, 4) == [plots.RED, plots.RED, plots.GREEN, plots.GREEN]


def test_training_logs_pictures_to_tensorboard(make_cfg):
    """A real one-epoch run with the default callbacks and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, TENSORS, EventAccumulator

    cfg = make_cfg("train", [*SMALL_CRNN, "trainer.max_epochs=1"], name="tb")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={IMAGES: 0, SCALARS: 0, TENSORS: 0})
    events.Reload()
    images = set(events.Tags()[IMAGES])
    assert {"train/samples", "val/predictions", "test/confusion", "test/position_accuracy"} <= images, images
    for tag in ("train/samples", "val/predictions", "test/confusion"):
        encoded = events.Images(tag)[-1]
        assert encoded.width > 200 and encoded.height > 100 and len(encoded.encoded_image_string) > 2000
    assert "test/position_accuracy/1" in events.Tags()[SCALARS]
    assert "test/confused_pairs/text_summary" in events.Tags()[TENSORS]
    plots_dir = out / "plots"
    assert_picture(plots_dir / "train_samples.png")
    assert_picture(plots_dir / "val_predictions.png")
    assert_picture(plots_dir / "confusion.png", min_size=(500, 500))
    assert_picture(plots_dir / "learning_curves.png")
    for name in ERROR_FILES:
        assert str(plots_dir / name) in metrics["plots"], name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert str(plots_dir / "learning_curves.png") in on_disk["plots"]


def test_csv_logger_runs_get_the_pictures_as_files(tiny_checkpoints):
    """The session's tiny runs logged to CSV only (and skipped the test): the pictures are PNG files."""
    run_dir = tiny_checkpoints["crnn"].parent.parent
    assert_picture(run_dir / "plots" / "train_samples.png")
    assert_picture(run_dir / "plots" / "val_predictions.png")
    curves = assert_picture(run_dir / "plots" / "learning_curves.png")
    assert curves.shape[1] > 800  # both panels: loss and accuracy
    assert not (run_dir / "plots" / "confusion.png").exists()  # test=false: no test run to analyse


def test_callbacks_none_still_trains(make_cfg):
    cfg = make_cfg("train", [*SMALL_CRNN, "debug=fast", "callbacks=none"], name="no_callbacks")
    metrics = train(cfg)
    assert metrics["plots"] == []
    assert not (Path(cfg.paths.output_dir) / "plots").exists()


def test_eval_writes_the_error_analysis(tiny_checkpoints, make_cfg):
    ckpt = tiny_checkpoints["cnn"]
    cfg = make_cfg("eval", [f"ckpt_path={ckpt}"], name="eval_errors")
    metrics = evaluate(cfg, [f"ckpt_path={ckpt}"])
    out = Path(cfg.paths.output_dir)
    for name in ERROR_FILES:
        assert (out / name).is_file() and str(out / name) in metrics["plots"], name
    assert_picture(out / "confusion.png", min_size=(500, 500))
    assert_picture(out / "position_accuracy.png")
    with open(out / "confusion.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert sum(int(v) for row in rows[1:] for v in row[1:]) >= 32 * 4  # 32 texts of 4-5 characters, aligned
    with open(out / "position_accuracy.csv", newline="") as handle:
        positions = list(csv.DictReader(handle))
    assert [int(p["count"]) for p in positions][:4] == [32] * 4  # every text has at least 4 characters


# ---- python -m captcha_lit.visualize -----------------------------------------------------------
VISUALIZE_FILES = ("samples.png", "gallery.png", "predictions.csv", *ERROR_FILES, "tsne.png", "learning_curves.png",
                   "index.md", "index.html", "metrics.json")


FAST_TSNE = ["tsne.max_iter=250"]  # scikit-learn's minimum: enough for a test's 160 points


@pytest.fixture(scope="module")
def visualized(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """``visualize`` on both tiny checkpoints: arch -> its run directory."""
    from conftest import _compose

    root = tmp_path_factory.mktemp("visualize")
    for arch, ckpt in tiny_checkpoints.items():
        visualize(_compose("visualize", [f"ckpt_path={ckpt}", *FAST_TSNE], root / arch), [])
    return {arch: root / arch for arch in tiny_checkpoints}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["crnn", "cnn"])
def test_visualize_writes_every_picture(visualized, arch):
    out = visualized[arch]
    for name in VISUALIZE_FILES:
        assert (out / name).is_file(), f"{name} missing"
    for name in ("samples.png", "gallery.png", "position_accuracy.png", "learning_curves.png"):
        assert_picture(out / name)
    assert_picture(out / "confusion.png", min_size=(500, 500))
    assert_picture(out / "tsne.png", min_size=(500, 400))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 32 and metrics["split"] == "test"
    with open(out / "predictions.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 32
    # The index links every file it names, and every picture.
    index = (out / "index.md").read_text()
    links = [part.split(")")[0] for part in index.split("](")[1:]]
    pictures = {name for name in VISUALIZE_FILES if name.endswith(".png")}
    assert pictures | {"confused_pairs.csv", "predictions.csv", "projector/"} <= set(links), links
    assert all((out / link).exists() for link in links), links
    assert '<img src="gallery.png"' in (out / "index.html").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("arch, points", [("crnn", 32 * 5), ("cnn", 32)])
def test_visualize_projector_files(visualized, arch, points):
    """Per-character points for the CTC model (5 characters each); one per image for the cnn, whose
    positions share one feature vector."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    projector = visualized[arch] / "projector"
    config = text_format.Parse((projector / "projector_config.pbtxt").read_text(), ProjectorConfig())
    embedding = config.embeddings[0]
    tensors = np.loadtxt(projector / embedding.tensor_path, delimiter="\t", ndmin=2)
    with open(projector / embedding.metadata_path) as handle:
        metadata = [line.rstrip("\n").split("\t") for line in handle]
    assert len(tensors) == points and len(metadata) == points + 1  # a header row
    assert metadata[0][0] == ("character" if arch == "crnn" else "text")
    assert tensors.std() > 0
    width, height = embedding.sprite.single_image_dim
    sprite = Image.open(projector / embedding.sprite.image_path)
    per_row = int(np.ceil(np.sqrt(points)))
    assert sprite.size == (per_row * width, int(np.ceil(points / per_row)) * height)
    assert np.asarray(sprite).std() > 5
    assert any(projector.glob("events.out.tfevents.*"))  # so that TensorBoard lists the folder as a run


def test_visualize_bad_input_is_a_clear_error(make_cfg, tiny_checkpoints, tmp_path):
    """Each names the bad value; the command line turns them into one error line (utils.entry_point)."""
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match="missing.ckpt.*does not exist"):
        visualize(make_cfg("visualize", [f"ckpt_path={missing}"]), [])
    ckpt = tiny_checkpoints["cnn"]
    for override, message in (("split=train", "split='train': use one of test, val"),
                              ("num_embeddings=-1", "num_embeddings=-1 must be >= 0"),
                              ("gallery.num_images=0", "gallery.num_images=0 must be at least 1"),
                              ("tsne.max_iter=10", "tsne.max_iter=10 must be at least 250")):
        with pytest.raises(ValueError, match=re.escape(message)):
            visualize(make_cfg("visualize", [f"ckpt_path={ckpt}", override]), [override])


@pytest.mark.slow
def test_visualize_command_line(tiny_checkpoints, tmp_path, cache_dir):
    """``python -m captcha_lit.visualize``: a run, and a missing checkpoint (one error line, exit code 2)."""
    runs = {"run": [f"ckpt_path={tiny_checkpoints['crnn']}", *FAST_TSNE, "num_embeddings=8"],
            "missing": [f"ckpt_path={tmp_path / 'missing.ckpt'}"]}
    results = run_entry_points({name: ["captcha_lit.visualize", *args, f"hydra.run.dir={tmp_path / name}"]
                                for name, args in runs.items()}, cache_dir, timeout=300)
    code, stdout, stderr = results["run"]
    assert code == 0 and "Traceback" not in stderr, stderr[-4000:]
    assert str(tmp_path / "run" / "index.html") in stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["feature_points"] == 8 * 5
    assert all(Path(path).exists() for path in metrics["files"].values())
    code, _, stderr = results["missing"]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "missing.ckpt" in errors[0] and "Traceback" not in stderr, stderr[-3000:]

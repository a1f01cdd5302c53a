"""Training on a labeled folder (the committed tiny_folder fixture), eval from its checkpoint,
and fine-tuning with init_from across charsets."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from captcha_lit.eval import evaluate
from captcha_lit.predict import predict
from captcha_lit.train import train
from captcha_lit.training.builders import build_datamodule, build_module, to_plain
from captcha_lit.training.checkpoints import init_from_checkpoint
from conftest import QUIET_TRAINER, REPO_ROOT, TINY_FOLDER, _compose

CHARSET = "2345678abcdefghkmnprstuvwxyz"  # every character of the fixture's labels, sorted
SHARED = REPO_ROOT.parent / "shared" / "datasets" / "captcha_images_v2"
SMALL_CRNN = ["model=crnn", "model.channels=[8,16,32,32]", "model.dim=32"]
TEST_KEYS = ("test/seq_acc", "test/char_acc", "test/cer", "test/pos_acc", "test/len_acc", "test/loss")


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _scores(preds: list[str], truths: list[str]) -> dict[str, float]:
    """The test metrics, computed from the predicted and true texts alone."""
    same_length = [(p, t) for p, t in zip(preds, truths) if len(p) == len(t)]
    positions = sum(len(t) for _, t in same_length)
    chars = sum(len(t) for t in truths)
    return {
        "test/seq_acc": sum(p == t for p, t in zip(preds, truths)) / len(truths),
        "test/char_acc": sum(i < len(p) and p[i] == c for p, t in zip(preds, truths) for i, c in enumerate(t)) / chars,
        "test/cer": sum(_edit_distance(p, t) for p, t in zip(preds, truths)) / chars,
        "test/len_acc": len(same_length) / len(truths),
        "test/pos_acc": sum(a == b for p, t in same_length for a, b in zip(p, t)) / positions if positions else 0.0,
    }


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, cache_dir):
    """One epoch on a copy of tiny_folder (48 images, 4-6 characters) plus one corrupt file, skipped and reported."""
    images = tmp_path_factory.mktemp("captcha_images")
    for source in sorted(TINY_FOLDER.glob("*.png")):
        shutil.copyfile(source, images / source.name)
    (images / "2b3c4.png").write_bytes(b"truncated")
    out = tmp_path_factory.mktemp("folder_run")
    overrides = ["data=folder", f"data.path={images}", "pretrain=none", "data.input_size=[32,96]", "data.skip_bad=true",
                 f"data.cache_dir={cache_dir}", "data.batch_size=8", "data.train_samples_per_epoch=null", *QUIET_TRAINER, *SMALL_CRNN,
                 "trainer.max_epochs=1", "logger=csv"]
    cfg = _compose("train", overrides, out)
    return cfg, train(cfg), out, images


def test_folder_fit_reports_the_metrics_of_its_test_files(folder_run, make_cfg, tmp_path):
    """metrics.json holds what the best checkpoint reads on the test split's files, scored from
    their names: predict on those files gives the same seq_acc, char_acc, CER, len_acc and pos_acc."""
    _, metrics, out, images = folder_run
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in TEST_KEYS:
        assert on_disk[key] == pytest.approx(metrics[key]), key
    assert on_disk["epochs"] == 1
    # 48 good images: 10 test, 5 val, 33 train -> 4 full batches of 8
    assert on_disk["global_step"] == 4

    state = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)
    datamodule = build_datamodule(state["datamodule_hyper_parameters"])
    datamodule.prepare_data()
    test_files = datamodule.files["test"]
    assert len(test_files) == 10
    output = tmp_path / "test_split.json"
    cfg = make_cfg("predict", [f"ckpt_path={metrics['best_ckpt']}", f"output={output}", "batch_size=64"])
    cfg.inputs = [str(images / name) for name in test_files]
    rows = predict(cfg)
    preds = [row["text"] for row in rows]
    truths = [Path(name).stem.split("_")[0] for name in test_files]
    for key, value in _scores(preds, truths).items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), (key, preds, truths)
def test_folder_fit_writes_its_test_predictions(folder_run):
    """test_predictions.csv: one row per test file, its label from the name, and the rows score test/seq_acc."""
    _, metrics, out, _ = folder_run
    with open(out / "test_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    state = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)
    datamodule = build_datamodule(state["datamodule_hyper_parameters"])
    datamodule.prepare_data()
    assert [row["file"] for row in rows] == datamodule.files["test"]
    assert [row["index"] for row in rows] == [str(i) for i in range(len(rows))]
    assert [row["text"] for row in rows] == [Path(f).stem.split("_")[0] for f in datamodule.files["test"]]
    assert all(row["right"] == str(row["text"] == row["prediction"]) for row in rows)
    assert all(0.0 <= float(row["confidence"]) <= 1.0 for row in rows)
    assert sum(row["right"] == "True" for row in rows) / len(rows) == pytest.approx(metrics["test/seq_acc"])


def test_folder_fit_reports_bad_files(folder_run):
    _, _, out, _ = folder_run
    report = json.loads((out / "bad_files.json").read_text())
    assert [b["file"] for b in report] == ["2b3c4.png"]
    assert "corrupt or truncated" in report[0]["reason"] or "not a recognized image" in report[0]["reason"]


def test_folder_checkpoint_records_charset_and_source(folder_run):
    _, metrics, _, images = folder_run
    state = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["spec"]["charset"] == CHARSET
    assert state["hyper_parameters"]["spec"]["input_size"] == [32, 96]
    data = state["datamodule_hyper_parameters"]
    assert data["source"] == "folder"
    assert data["path"] == str(images.resolve())
    assert (data["charset"], data["min_length"], data["max_length"]) == (CHARSET, 4, 6)  # inferred from the names


def test_eval_rebuilds_the_folder_split(folder_run, make_cfg):
    _, metrics, _, _ = folder_run
    overrides = [f"ckpt_path={metrics['best_ckpt']}"]
    result = evaluate(make_cfg("eval", overrides, name="eval_folder"), overrides)
    assert result["num_test"] == 10
    for key in ("test/seq_acc", "test/cer", "test/pos_acc"):
        assert result[key] == pytest.approx(metrics[key], abs=1e-5), key


def test_init_from_maps_output_rows_by_character(folder_run, make_cfg):
    _, metrics, _, _ = folder_run
    old = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    # Digits share 2-8 with the checkpoint's charset; 0, 1 and 9 are new.
    cfg = make_cfg("train", [*SMALL_CRNN, "data.charset=0-9", "data.input_size=[32,96]", "data.grayscale=false"],
                   name="finetune")
    module = build_module(cfg)
    fresh = module.net.classifier.weight.detach().clone()
    summary = init_from_checkpoint(module, metrics["best_ckpt"])
    assert summary["classes_from_checkpoint"] == 8 and summary["new_classes"] == "019"
    weight, bias = module.net.classifier.weight.detach(), module.net.classifier.bias.detach()
    old_weight, old_bias = old["net.classifier.weight"], old["net.classifier.bias"]
    for char in "2345678":
        new_row, old_row = "0123456789".index(char), CHARSET.index(char)
        assert torch.equal(weight[new_row], old_weight[old_row]), char
        assert torch.equal(bias[new_row], old_bias[old_row]), char
    for char in "019":
        assert torch.equal(weight["0123456789".index(char)], fresh["0123456789".index(char)]), char
    assert torch.equal(weight[10], old_weight[len(CHARSET)])  # blank -> blank
    for name, value in module.net.state_dict().items():  # everything but the output layer is copied as is
        if not name.startswith("classifier."):
            assert torch.equal(value, old[f"net.{name}"]), name


def test_init_from_refuses_another_architecture(folder_run, make_cfg):
    _, metrics, _, _ = folder_run
    cfg = make_cfg("train", ["model=cnn", "data.input_size=[32,96]"], name="finetune_cnn")
    with pytest.raises(ValueError, match="holds a 'crnn' model, but this run builds 'cnn'"):
        init_from_checkpoint(build_module(cfg), metrics["best_ckpt"])


def test_train_init_from_names_mismatched_settings(folder_run, make_cfg):
    _, metrics, _, _ = folder_run
    cfg = make_cfg("train", [*SMALL_CRNN, "model.dim=48", "data.input_size=[32,96]", "debug=fast",
                             f"init_from={metrics['best_ckpt']}"], name="finetune_dim")
    with pytest.raises(ValueError, match=r"does not match this run's.*model.dim=32 there, 48 here"):
        train(cfg)


def test_init_from_and_ckpt_path_are_exclusive(folder_run, make_cfg):
    _, metrics, _, _ = folder_run
    cfg = make_cfg("train", [f"init_from={metrics['best_ckpt']}", f"ckpt_path={metrics['best_ckpt']}"],
                   name="finetune_both")
    with pytest.raises(ValueError, match="pass one of them"):
        train(cfg)


def test_datasets_dir_follows_the_environment(monkeypatch, tmp_path):
    cfg = _compose("train", ["data=captcha_images_v2"], tmp_path / "run")
    assert Path(to_plain(cfg.data)["path"]).resolve() == SHARED.resolve()
    monkeypatch.setenv("CAPTCHA_LIT_DATASETS", str(tmp_path / "elsewhere"))
    assert to_plain(cfg.data)["path"] == str(tmp_path / "elsewhere" / "captcha_images_v2")


def test_the_folder_recipe_settles_its_choices_and_records_them(tmp_path, cache_dir):
    """data=folder with nothing else set: the step budget sets the length, and metrics.json says what was chosen."""
    overrides = ["data=folder", f"data.path={TINY_FOLDER}", "pretrain=none", f"data.cache_dir={cache_dir}",
                 *QUIET_TRAINER, *SMALL_CRNN, "step_budget.min_steps=12", "step_budget.max_steps=12", "logger=csv",
                 "data.batch_size=8", "data.train_samples_per_epoch=48"]  # 2 epochs of 6 batches
    cfg = _compose("train", overrides, tmp_path / "run")
    metrics = train(cfg)
    assert metrics["global_step"] == 12  # 33 labels x 2 steps, capped at the 12 of step_budget.max_steps
    assert metrics["epochs"] == 2
    recipe = json.loads((tmp_path / "run" / "metrics.json").read_text())["recipe"]
    assert recipe["trainer.max_steps"]["value"] == 12 and recipe["trainer.min_steps"]["value"] == 6
    assert recipe["data.input_size"]["value"] == [32, 96]  # the fixture's 120x40 images
    assert recipe["data.grayscale"]["value"] is False
    assert all(choice["reason"] for choice in recipe.values())
    ckpt = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=False)
    assert ckpt["datamodule_hyper_parameters"]["input_size"] == [32, 96]  # settled, not auto

"""Training on a real labeled folder (a few captcha_images_v2 images), eval from its checkpoint,
and fine-tuning with init_from across charsets."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from captcha_lit.training.builders import build_module, init_from_checkpoint, to_plain
from captcha_lit.eval import evaluate
from captcha_lit.train import train
from conftest import QUIET_TRAINER, REPO_ROOT, _compose

SHARED = REPO_ROOT.parent / "shared" / "datasets" / "captcha_images_v2"
CHARSET = "2345678bcdefgmnpwxy"
SMALL_CRNN = ["model=crnn", "model.channels=[8,16,32,32]", "model.dim=32"]

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is not available")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, cache_dir):
    """One epoch on 40 copied captcha_images_v2 images plus one corrupt file, skipped and reported."""
    images = tmp_path_factory.mktemp("captcha_images")
    for name in sorted(os.listdir(SHARED))[:40]:
        shutil.copyfile(SHARED / name, images / name)
    (images / "2b3c4.png").write_bytes(b"truncated")
    out = tmp_path_factory.mktemp("folder_run")
    overrides = ["data=captcha_images_v2", f"data.path={images}", "data.skip_bad=true", f"data.cache_dir={cache_dir}",
                 "data.batch_size=8", *QUIET_TRAINER, *SMALL_CRNN, "trainer.max_epochs=1", "logger=csv"]
    cfg = _compose("train", overrides, out)
    return cfg, train(cfg), out, images


def test_folder_fit_writes_sequence_metrics(folder_run):
    _, metrics, out, _ = folder_run
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("test/seq_acc", "test/char_acc", "test/cer", "test/pos_acc", "test/len_acc", "test/loss"):
        assert isinstance(on_disk[key], float), key
        assert on_disk[key] == pytest.approx(metrics[key])
    assert on_disk["test/cer"] >= 0.0
    assert 0.0 <= on_disk["test/len_acc"] <= 1.0 and 0.0 <= on_disk["test/pos_acc"] <= 1.0
    assert on_disk["epochs"] == 1
    # 40 good images: 8 test, 4 val, 28 train -> 3 full batches of 8
    assert on_disk["global_step"] == 3


def test_folder_fit_reports_bad_files(folder_run):
    _, _, out, _ = folder_run
    report = json.loads((out / "bad_files.json").read_text())
    assert [b["file"] for b in report] == ["2b3c4.png"]
    assert "corrupt or truncated" in report[0]["reason"] or "not a recognized image" in report[0]["reason"]


def test_folder_checkpoint_records_charset_and_source(folder_run):
    _, metrics, _, images = folder_run
    state = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["charset"] == CHARSET
    assert state["hyper_parameters"]["input_size"] == [32, 128]
    data = state["datamodule_hyper_parameters"]
    assert data["source"] == "folder"
    assert data["path"] == str(images.resolve())
    assert (data["charset"], data["min_length"], data["max_length"]) == (CHARSET, 5, 5)


def test_eval_rebuilds_the_folder_split(folder_run, make_cfg):
    _, metrics, _, _ = folder_run
    overrides = [f"ckpt_path={metrics['best_ckpt']}"]
    result = evaluate(make_cfg("eval", overrides, name="eval_folder"), overrides)
    assert result["num_test"] == 8
    for key in ("test/seq_acc", "test/cer", "test/pos_acc"):
        assert result[key] == pytest.approx(metrics[key], abs=1e-5), key


def test_init_from_maps_output_rows_by_character(folder_run, make_cfg):
    _, metrics, _, _ = folder_run
    old = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    # Digits share 2-8 with the checkpoint's charset; 0, 1 and 9 are new.
    cfg = make_cfg("train", [*SMALL_CRNN, "data.charset=0-9", "data.input_size=[32,128]", "data.grayscale=false"],
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
    cfg = make_cfg("train", ["model=cnn", "data.input_size=[32,128]"], name="finetune_cnn")
    with pytest.raises(ValueError, match="holds a 'crnn' model, but this run builds 'cnn'"):
        init_from_checkpoint(build_module(cfg), metrics["best_ckpt"])


def test_train_init_from_names_mismatched_settings(folder_run, make_cfg):
    _, metrics, _, _ = folder_run
    cfg = make_cfg("train", [*SMALL_CRNN, "model.dim=48", "data.input_size=[32,128]", "debug=fast",
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

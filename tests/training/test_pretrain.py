"""pretrain=auto: a folder with few labels pre-trains on generated CAPTCHAs of its own scheme,
cached by that scheme, then fine-tunes; pretrain=none and pretrain=PATH; the reasons it skips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from captcha_lit.train import train
from captcha_lit.data import cache
from captcha_lit.training.pretrain import build_lock, pretraining_config, scheme_font_sizes, scheme_fonts
from conftest import FIXTURES, QUIET_TRAINER, _compose

TINY_FOLDER = FIXTURES / "tiny_folder"  # 48 labeled 120x40 RGB CAPTCHAs, 4-6 characters
SMALL = ["model=crnn", "model.channels=[8,16,32,32]", "model.dim=32", "logger=csv", "data.batch_size=8",
         "data.train_samples_per_epoch=null", "trainer.max_epochs=1", "trainer.max_steps=-1", "trainer.min_steps=null"]
TINY_PRETRAINING = ["pretraining.num_train=64", "pretraining.num_val=16", "pretraining.epochs=1",
                    "pretraining.batch_size=16", "pretraining.max_rounds=1"]


def _run(tmp_path: Path, cache_dir: Path, name: str, *overrides: str) -> dict:
    cfg = _compose("train", ["data=folder", f"data.path={TINY_FOLDER}", f"data.cache_dir={cache_dir}", *QUIET_TRAINER,
                             *SMALL, *overrides], tmp_path / name)
    return train(cfg)


@pytest.mark.slow
def test_auto_pretrains_on_the_scheme_once_and_the_next_run_reuses_it(tmp_path, cache_dir):
    first = _run(tmp_path, cache_dir, "first", *TINY_PRETRAINING)
    choice = first["recipe"]["pretrain"]
    checkpoint = Path(choice["value"])
    assert checkpoint.is_file() and checkpoint.parent.parent == cache_dir
    assert "33 training labels < pretraining.max_labels=500" in choice["reason"]
    meta = json.loads((checkpoint.parent / "meta.json").read_text())
    scheme = meta["fields"]["scheme"]
    # The generated CAPTCHAs match the folder: its charset and lengths, its 120x40 canvas, its input and colors.
    assert scheme == {"charset": "2345678abcdefghkmnprstuvwxyz", "min_length": 4, "max_length": 6,
                      "canvas": [40, 120], "input_size": [32, 96], "grayscale": False}
    assert len(meta["fields"]["fonts"]) > 1  # the package's font and the DejaVu faces
    pretrained = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert pretrained["datamodule_hyper_parameters"]["font_sizes"] == scheme_font_sizes(40)

    folders = sorted(cache_dir.glob("pretrained-*"))
    second = _run(tmp_path, cache_dir, "second", *TINY_PRETRAINING)
    assert second["recipe"]["pretrain"]["value"] == str(checkpoint)
    assert second["recipe"]["pretrain"]["reason"].endswith("(cached)")
    assert sorted(cache_dir.glob("pretrained-*")) == folders  # nothing pre-trained again
    # Building the pre-trained model or finding it cached leaves the fine-tuning run the same.
    for key in ("test/loss", "test/seq_acc", "val/seq_acc_best", "global_step"):
        assert second[key] == first[key], key
    # The fine-tuning runs at pretraining.finetune_lr, and the pre-trained model is reused at any other.
    assert first["recipe"]["optimizer.lr"]["value"] == 1.0e-3
    assert "pretraining.finetune_lr" in first["recipe"]["optimizer.lr"]["reason"]
    third = _run(tmp_path, cache_dir, "third", *TINY_PRETRAINING, "pretraining.finetune_lr=1e-4")
    assert third["recipe"]["pretrain"]["value"] == str(checkpoint) and third["recipe"]["optimizer.lr"]["value"] == 1e-4
    assert first["recipe"]["pretraining.finetune_pull"]["value"] == 3.0
    kept = _run(tmp_path, cache_dir, "kept", *TINY_PRETRAINING, "pretraining.finetune_lr=null",
                "pretraining.finetune_pull=0")
    assert "optimizer.lr" not in kept["recipe"] and kept["recipe"]["pretrain"]["value"] == str(checkpoint)
    assert "pretraining.finetune_pull" not in kept["recipe"]
    assert sorted(cache_dir.glob("pretrained-*")) == folders

    scratch = _run(tmp_path, cache_dir, "scratch", "pretrain=none")
    assert scratch["recipe"]["pretrain"]["value"] == "none" and "optimizer.lr" not in scratch["recipe"]
    assert scratch["test/loss"] != first["test/loss"]  # the pre-trained start changed the run


@pytest.mark.slow
def test_enough_labels_train_from_scratch(tmp_path, cache_dir):
    metrics = _run(tmp_path, cache_dir, "many", "pretraining.max_labels=20", *TINY_PRETRAINING)
    assert metrics["recipe"]["pretrain"]["value"] == "none"
    assert "33 training labels >= pretraining.max_labels=20" in metrics["recipe"]["pretrain"]["reason"]
    assert "finetune" not in metrics["recipe"]  # nothing to fine-tune from


def test_generated_training_data_is_never_pretrained(tmp_path, cache_dir):
    cfg = _compose("train", [f"data.cache_dir={cache_dir}", "debug=fast", "data.gen_workers=1", *QUIET_TRAINER],
                   tmp_path / "run")
    assert train(cfg)["recipe"]["pretrain"]["value"] == "none"


def test_fonts_that_cannot_draw_the_charset_are_left_out():
    usable, left_out = scheme_fonts(["default", "dejavu"], "AB7")
    assert usable and not left_out
    usable, left_out = scheme_fonts(["default", "dejavu"], "AB\u4e2d")  # no CJK glyphs in either
    assert usable == [] and all("cannot draw" in note for note in left_out)


def test_pretrain_path_and_init_from_are_exclusive(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="both name a checkpoint"):
        _run(tmp_path, cache_dir, "both", "pretrain=some.ckpt", "init_from=other.ckpt")


def test_a_live_pretraining_build_is_not_removed_as_dead(tmp_path):
    folder = tmp_path / "pretrained-0123456789abcdef"
    building = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    building.mkdir()
    with cache.file_lock(build_lock(folder)):  # as pretrained_checkpoint holds it around the build
        assert cache.remove_dead_builds(tmp_path, held="train-fedcba9876543210") == []
    assert building.is_dir()
    assert cache.remove_dead_builds(tmp_path, held="train-fedcba9876543210") == [building]  # its builder is gone


def test_the_fine_tune_averages_its_weights_and_the_pretraining_run_does_not(tmp_path, cache_dir):
    cfg = _compose("train", ["data=folder", f"data.path={TINY_FOLDER}", f"data.cache_dir={cache_dir}"], tmp_path)
    assert cfg.callbacks.ema.decay == 0.995  # the folder recipe's short average
    scheme = {"charset": "abc", "min_length": 4, "max_length": 6, "canvas": [40, 120], "input_size": [32, 96],
              "grayscale": True}
    pre = pretraining_config(cfg, scheme, ["font.ttf"], str(tmp_path / "pre"))
    assert set(pre.callbacks) == {"model_checkpoint", "last_checkpoint"}
    assert pre.callbacks.model_checkpoint.monitor == "val/seq_acc"


@pytest.mark.slow
@pytest.mark.parametrize(("readings", "kept"), [((0.25, 0.75), True), ((0.75, 0.25), False)])
def test_a_fine_tune_that_reads_validation_worse_than_its_start_keeps_the_start(tmp_path, cache_dir, monkeypatch,
                                                                                 readings, kept):
    from captcha_lit.training import finetune

    accuracies, images_read = iter(readings), []

    def read(module, images, truths):  # the fine-tune's best checkpoint first, then the starting weights
        images_read.append(len(images))
        return next(accuracies)

    monkeypatch.setattr(finetune, "_val_seq_acc", read)
    metrics = _run(tmp_path, cache_dir, "kept" if kept else "tuned", *TINY_PRETRAINING)
    choice = metrics["recipe"]["finetune"]
    assert choice["reason"].startswith(
        f"val seq acc {readings[1]:.4f} before the fine-tune, {readings[0]:.4f} at its best checkpoint")
    assert len(images_read) == 2 and images_read[0] == images_read[1] > 0  # the whole validation split, twice
    best = Path(metrics["best_ckpt"])
    if not kept:
        assert choice["value"] == "fine-tuned" and best.name.startswith("epoch")
        return
    assert choice["value"] == "kept the starting weights" and best.name == "start-seq_acc0.7500.ckpt"
    assert metrics["val/seq_acc_best"] == 0.75 and "test/seq_acc" in metrics  # tested on the starting weights
    state = torch.load(best, map_location="cpu", weights_only=True)
    pretrained = torch.load(metrics["recipe"]["pretrain"]["value"], map_location="cpu", weights_only=True)
    assert state["state_dict"].keys() == pretrained["state_dict"].keys()
    assert all(torch.equal(state["state_dict"][key], pretrained["state_dict"][key]) for key in state["state_dict"])
    # Calibrated like any best checkpoint: the temperature is in its spec.
    assert state["hyper_parameters"]["spec"]["temperature"] == metrics["calibration"]["temperature"]


@pytest.mark.slow
def test_a_pretraining_that_reads_under_its_floor_continues_from_its_best_weights(tmp_path, cache_dir, monkeypatch):
    import captcha_lit.train as train_module

    starts = []
    real_train = train_module.train

    def recording_train(cfg):
        if cfg.data.source == "synthetic":
            starts.append(cfg.get("init_from"))
        return real_train(cfg)

    monkeypatch.setattr(train_module, "train", recording_train)
    # No tiny pre-training reads every generated image, so a floor of 1.0 asks for every round.
    result = _run(tmp_path, cache_dir, "rounds", *TINY_PRETRAINING, "pretraining.max_rounds=2",
                  "pretraining.min_val_seq_acc=1.0")
    meta = json.loads((Path(result["recipe"]["pretrain"]["value"]).parent / "meta.json").read_text())
    assert meta["rounds"] == 2 and meta["val/seq_acc_best"] < 1.0
    assert starts[0] is None and starts[1] is not None and "run1" in starts[1]  # round 2 starts from round 1's best
    assert len(starts) == 2

    starts.clear()
    _run(tmp_path, cache_dir / "other", "one_round", *TINY_PRETRAINING, "pretraining.max_rounds=3",
         "pretraining.min_val_seq_acc=0")
    assert starts == [None]  # every round reads at least 0: one is enough


@pytest.mark.parametrize("override, message", [
    ("pretraining.max_rounds=0", "pretraining.max_rounds=0"),
    ("pretraining.min_val_seq_acc=1.5", "pretraining.min_val_seq_acc=1.5"),
])
def test_bad_pretraining_rounds_are_named(tmp_path, cache_dir, override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        _run(tmp_path, cache_dir, "bad", *TINY_PRETRAINING, override)


@pytest.mark.slow
def test_a_fine_tune_keeps_its_pretrained_start_to_pull_toward_and_a_resumed_one_gets_it_back(tmp_path, cache_dir):
    first = _run(tmp_path, cache_dir, "first", *TINY_PRETRAINING)
    pretrained = torch.load(first["recipe"]["pretrain"]["value"], map_location="cpu", weights_only=True)["state_dict"]

    def pulled_toward(checkpoint: str) -> dict:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)["callbacks"]["PullToStart"]["start"]

    start = pulled_toward(first["last_ckpt"])
    assert start and all(torch.equal(value, pretrained[key]) for key, value in start.items())
    resumed = _run(tmp_path, cache_dir, "resumed", *TINY_PRETRAINING, "trainer.max_epochs=2",
                   f"ckpt_path={first['last_ckpt']}")
    assert resumed["global_step"] > first["global_step"]
    assert all(torch.equal(value, start[key]) for key, value in pulled_toward(resumed["last_ckpt"]).items())


def test_the_pull_moves_each_step_lr_times_strength_of_the_way_back_to_the_start():
    from types import SimpleNamespace

    from captcha_lit.training.finetune import PullToStart, snapshot

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    start = snapshot(net)
    pull = PullToStart(2.0, start)
    trainer = SimpleNamespace(global_step=0)
    optimizer = SimpleNamespace(param_groups=[{"lr": 0.1}])
    pull.on_train_epoch_start(trainer, net)
    with torch.no_grad():
        net.weight.add_(1.0)
    pull.on_before_optimizer_step(trainer, net, optimizer)
    trainer.global_step = 1
    pull.on_train_batch_end(trainer, net, None, None, 0)
    assert torch.allclose(net.weight, start["weight"] + 0.8)  # 0.1 x 2 of the way back
    pull.on_train_batch_end(trainer, net, None, None, 1)  # a batch without an optimizer step: no pull
    assert torch.allclose(net.weight, start["weight"] + 0.8)
    restored = PullToStart(2.0)
    restored.load_state_dict(pull.state_dict())
    assert torch.equal(restored.start["weight"], start["weight"])
    with pytest.raises(ValueError, match="pretraining.finetune_pull=-1"):
        PullToStart(-1)

"""Fault tolerance: a killed run continues from last.ckpt and ends exactly where a run that was
never stopped ends; a finished run is skipped; a different config is never mixed in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captcha_lit.training.module import CaptchaModule
from captcha_lit.training.resume import resume_point
from captcha_lit.train import train

# With the weight average on: a resumed run must continue both the weights and their average.
SMALL = ["model.channels=[8,16,32,32]", "model.dim=32", "logger=csv", "trainer.max_epochs=3", "callbacks=averaged"]
FINAL_KEYS = ("test/seq_acc", "test/char_acc", "test/loss", "test/cer", "val/seq_acc_best", "val/seq_acc", "epochs",
              "global_step")


class _Killed(RuntimeError):
    pass


@pytest.mark.parametrize("data", ["cached", pytest.param("streaming", marks=pytest.mark.slow)])
def test_killed_run_resumes_to_the_same_final_metrics(make_cfg, monkeypatch, data):
    overrides = SMALL + (["data.streaming=true", "data.num_workers=2"] if data == "streaming" else [])
    straight = train(make_cfg("train", overrides, name="straight"))

    def die_in_epoch_2(module, batch, batch_idx):
        if module.current_epoch == 2 and batch_idx == 1:
            raise _Killed("the process dies in the middle of epoch 2")

    monkeypatch.setattr(CaptchaModule, "on_train_batch_start", die_in_epoch_2)
    cfg = make_cfg("train", overrides, name="killed")
    with pytest.raises(_Killed):
        train(cfg)
    monkeypatch.undo()
    run_dir = Path(cfg.paths.output_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1  # epochs 0 and 1 are kept
    assert not (run_dir / "metrics.json").exists()

    with pytest.raises(ValueError, match="already has checkpoints .* pass resume=auto"):
        train(make_cfg("train", overrides, name="killed"))
    resumed = train(make_cfg("train", overrides + ["resume=auto"], name="killed"))
    assert resumed["resumed_from"] == str(last)
    for key in FINAL_KEYS:
        assert resumed[key] == straight[key], key
    assert [p["epoch"] for p in resumed["timeline"]] == [p["epoch"] for p in straight["timeline"]] == [0, 1, 2]
    ours = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    theirs = torch.load(straight["last_ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "the resumed run's weights differ"


def test_finished_run_is_skipped_and_a_different_config_refused(make_cfg):
    overrides = ["debug=fast", "resume=auto", "test=true"]
    cfg = make_cfg("train", overrides, name="done")
    first = train(cfg)
    metrics_file = Path(cfg.paths.output_dir) / "metrics.json"
    stamp = metrics_file.stat().st_mtime_ns

    again = train(make_cfg("train", overrides, name="done"))
    assert metrics_file.stat().st_mtime_ns == stamp  # nothing ran
    assert again == json.loads(metrics_file.read_text())
    assert again["test/loss"] == first["test/loss"]

    with pytest.raises(ValueError, match=r"different config \(optimizer.lr=0.001 there, 0.002 here\)"):
        train(make_cfg("train", overrides + ["optimizer.lr=0.002"], name="done"))


def test_crash_in_the_first_epoch_starts_afresh(make_cfg, tmp_path):
    cfg = make_cfg("train", ["resume=auto"], name="early")
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "interrupted.ckpt").write_bytes(b"mid-epoch")  # OnExceptionCheckpoint's file
    assert resume_point(cfg, cfg.paths.output_dir) == (None, None)
    assert not (ckpt_dir / "interrupted.ckpt").exists()  # Lightning would otherwise resume from it

    (ckpt_dir / "epoch002-seq_acc0.5000.ckpt").write_bytes(b"top-k")
    with pytest.raises(ValueError, match="no last.ckpt"):
        resume_point(cfg, cfg.paths.output_dir)
    with pytest.raises(ValueError, match="resume='sometimes': use resume=auto"):
        resume_point(make_cfg("train", ["resume=sometimes"], name="bad"), tmp_path)


def test_a_job_that_slurm_runs_again_continues_its_own_run(make_cfg, monkeypatch):
    """resume=false refuses a directory with checkpoints, except in a job that SLURM requeued: that
    directory holds the job's own first try (tests/training/test_slurm.py runs it on a real cluster)."""
    cfg = make_cfg("train", [], name="requeued")
    run_dir = Path(cfg.paths.output_dir)
    assert resume_point(cfg, run_dir) == (None, None)  # the first try records its config
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"end of epoch 1")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(ValueError, match="already has checkpoints"):
        resume_point(cfg, run_dir)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume_point(cfg, run_dir) == (str(run_dir / "checkpoints" / "last.ckpt"), None)
    with pytest.raises(ValueError, match="different config"):
        resume_point(make_cfg("train", ["optimizer.lr=0.002"], name="requeued"), run_dir)

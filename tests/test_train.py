"""End-to-end: training through Hydra, checkpoints, eval, resume, sweeps and CLI errors."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch

from captcha_lit.charset import Charset
from captcha_lit.eval import evaluate
from captcha_lit.train import train
from captcha_lit.training.builders import build_datamodule, build_module
from captcha_lit.training.inference import read_images
from captcha_lit.training.module import CaptchaModule
from conftest import PYTHON, QUIET_TRAINER, REPO_ROOT, TINY_DATA, _compose, cli_env, run_entry_points

TEST_KEYS = ("test/seq_acc", "test/char_acc", "test/loss")
# Small models so a CPU epoch takes a second or two.
SMALL_CRNN = ["model=crnn", "model.channels=[8,16,32,32]", "model.dim=32"]


def _read_metrics(folder: Path) -> dict:
    path = Path(folder) / "metrics.json"
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


@pytest.mark.parametrize("model", ["cnn", "crnn", "resnet"])
def test_fast_dev_run(make_cfg, model):
    cfg = make_cfg("train", [f"model={model}", "debug=fast"], name=f"fast_{model}")
    metrics = train(cfg)
    on_disk = _read_metrics(cfg.paths.output_dir)
    for key in TEST_KEYS:
        assert key in on_disk, f"{key} missing from metrics.json"
        assert isinstance(on_disk[key], float)
        assert on_disk[key] == pytest.approx(metrics[key])
    assert on_disk["test/seq_acc"] <= on_disk["test/char_acc"]  # 5 characters each: a whole text right is 5 right
    assert on_disk["test/loss"] > 0
    assert on_disk["global_step"] == 1  # fast_dev_run: exactly one training batch


SHARED = REPO_ROOT.parent / "shared" / "datasets" / "captcha_images_v2"
# The default config and every experiment; the real-data one first decodes all of SHARED (seconds).
RECIPES = [None] + [pytest.param(name, marks=pytest.mark.slow) if name == "captcha_images_v2" else name
                    for name in sorted(p.stem for p in (REPO_ROOT / "conf" / "experiment").glob("*.yaml"))]


@pytest.mark.parametrize("experiment", RECIPES)
def test_each_recipe_builds_a_model_for_its_data_and_trains(tmp_path, cache_dir, experiment):
    """The default config and every experiment build a model for the data they configure (its
    charset, lengths, input size and channels), which reads that data's batches and trains a step."""
    # Small splits, but each recipe's own input size, charset, lengths, canvas and model.
    overrides = ([f"experiment={experiment}"] if experiment else []) + [
        f"data.cache_dir={cache_dir}", "data.num_train=16", "data.num_val=8", "data.num_test=8", "data.batch_size=8",
        "data.eval_batch_size=8", *QUIET_TRAINER, "debug=fast"]
    cfg = _compose("train", overrides, tmp_path / "run")
    if cfg.data.source == "folder" and not SHARED.is_dir():
        pytest.skip(f"experiment={experiment} reads {SHARED}, which a clean clone lacks")
    if cfg.data.source == "synthetic":
        cfg = _compose("train", overrides + ["data.gen_workers=1"], tmp_path / "run")
    datamodule = build_datamodule(cfg.data, cfg.augmentation)
    module = build_module(cfg, datamodule).eval()
    data = datamodule.label_spec()  # what the data holds: given in the config, or inferred from a folder's labels
    for key in ("min_length", "max_length"):
        assert cfg.data[key] is None or data[key] == cfg.data[key], key
        assert getattr(module.spec, key) == data[key], key
    assert cfg.data.charset is None or data["charset"] == Charset(cfg.data.charset).chars
    assert module.charset.chars == data["charset"]
    channels = 1 if cfg.data.grayscale else 3
    assert module.spec.input_size == tuple(cfg.data.input_size) and module.spec.channels == channels

    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape[1:] == (channels, *cfg.data.input_size)
    assert batch["target"].shape[1] == data["max_length"]
    assert all(data["min_length"] <= n <= data["max_length"] for n in batch["length"].tolist())
    with torch.no_grad():
        logits = module(module.on_after_batch_transfer(batch, 0)["image"])
        loss = module.compute_loss(logits, batch["target"], batch["length"])
    assert torch.isfinite(loss)
    # One output class per character, and CTC's blank or, for variable lengths, the positional end symbol.
    extra = module.spec.decoder == "ctc" or data["min_length"] < data["max_length"]
    assert logits.shape[-1] == len(data["charset"]) + extra
    assert module.spec.decoder == "ctc" or logits.shape[1] == data["max_length"]

    metrics = train(cfg)
    assert metrics["global_step"] == 1  # fast_dev_run: one training batch
    assert set(TEST_KEYS) <= set(metrics)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
    """One tiny real training run (1 epoch) shared by the checkpoint, eval and resume tests."""
    out = tmp_path_factory.mktemp("trained")
    overrides = [f"data.cache_dir={cache_dir}", *TINY_DATA, *QUIET_TRAINER, *SMALL_CRNN, "trainer.max_epochs=1",
                 "logger=csv"]
    cfg = _compose("train", overrides, out)
    metrics = train(cfg)
    return cfg, metrics, out, overrides


def test_checkpoints_written(trained_run):
    cfg, metrics, out, _ = trained_run
    on_disk = _read_metrics(out)
    ckpt_dir = out / "checkpoints"
    assert metrics["best_ckpt"] and Path(metrics["best_ckpt"]).is_file()
    assert Path(metrics["best_ckpt"]).parent == ckpt_dir
    assert (ckpt_dir / "last.ckpt").is_file()
    assert Path(metrics["last_ckpt"]) == ckpt_dir / "last.ckpt"
    assert on_disk["best_ckpt"] == metrics["best_ckpt"]
    assert on_disk["epochs"] == 1
    assert on_disk["global_step"] == 64 // 16  # 4 full batches of 16
    for key in TEST_KEYS:
        assert key in on_disk
    assert on_disk["val/seq_acc_best"] == max(point["val/seq_acc"] for point in on_disk["timeline"])
    assert on_disk["timeline"] and on_disk["timeline"][-1]["epoch"] == 0
    assert on_disk["wall_time_s"] >= on_disk["timeline"][-1]["elapsed_s"]  # the run's time covers its epochs
    assert (out / "csv" / "metrics.csv").is_file()


@pytest.mark.parametrize("which", ["best", "last"])
def test_checkpoint_loads_safely(trained_run, which):
    _, metrics, out, _ = trained_run
    path = metrics["best_ckpt"] if which == "best" else out / "checkpoints" / "last.ckpt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["spec"]["arch"] == "crnn"
    assert state["hyper_parameters"]["spec"]["input_size"] == [32, 96]
    assert state["datamodule_hyper_parameters"]["num_test"] == 32

    module = CaptchaModule.load_from_checkpoint(path, map_location="cpu")
    assert module.spec.decoder == "ctc"
    texts = read_images(module, torch.zeros(2, module.spec.channels, 32, 96, dtype=torch.uint8)).texts
    assert len(texts) == 2


def test_eval_reproduces_train_test_metrics(trained_run, make_cfg):
    _, metrics, _, _ = trained_run
    cfg = make_cfg("eval", [f"ckpt_path={metrics['best_ckpt']}"], name="eval")
    result = evaluate(cfg, [f"ckpt_path={metrics['best_ckpt']}"])
    on_disk = _read_metrics(cfg.paths.output_dir)
    assert on_disk["num_test"] == 32  # the checkpoint's data config, not the eval config's default
    assert on_disk["ckpt_path"] == str(Path(metrics["best_ckpt"]).resolve())
    for key in TEST_KEYS:
        assert on_disk[key] == pytest.approx(metrics[key], abs=1e-5), key
        assert result[key] == on_disk[key]


def test_eval_data_override(trained_run, make_cfg):
    _, metrics, _, _ = trained_run
    overrides = [f"ckpt_path={metrics['best_ckpt']}", "data.num_test=16"]
    cfg = make_cfg("eval", overrides, name="eval16")
    result = evaluate(cfg, overrides)
    assert result["num_test"] == 16
    assert "test/seq_acc" in result


def test_resume_from_last_checkpoint(trained_run, make_cfg):
    _, first, out, _ = trained_run
    last = out / "checkpoints" / "last.ckpt"
    cfg = make_cfg("train", [*SMALL_CRNN, f"ckpt_path={last}", "trainer.max_epochs=2", "logger=csv"], name="resumed")
    second = train(cfg)
    assert first["epochs"] == 1
    assert second["epochs"] == 2
    assert second["global_step"] == 2 * first["global_step"]
    assert second["timeline"][-1]["epoch"] == 1  # only the second epoch ran
    resumed_last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert resumed_last.is_file()
    # The (default, one-cycle) LR schedule continues from step 4 and now spans the longer run.
    state = torch.load(resumed_last, map_location="cpu", weights_only=True)
    assert cfg.scheduler.name == "onecycle"
    sched = state["lr_schedulers"][0]
    assert sched["total_steps"] == second["global_step"]
    assert sched["last_epoch"] == second["global_step"]


def test_eval_missing_checkpoint(make_cfg, tmp_path):
    missing = tmp_path / "nowhere" / "model.ckpt"
    cfg = make_cfg("eval", [f"ckpt_path={missing}"], name="eval_missing")
    with pytest.raises(FileNotFoundError) as info:
        evaluate(cfg, [])
    assert str(missing) in str(info.value)


def test_train_missing_resume_checkpoint(make_cfg, tmp_path):
    missing = tmp_path / "gone.ckpt"
    cfg = make_cfg("train", [f"ckpt_path={missing}", "trainer.max_epochs=1"], name="resume_missing")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        train(cfg)


def test_eval_rejects_non_checkpoint(make_cfg, tmp_path):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    cfg = make_cfg("eval", [f"ckpt_path={bogus}"], name="eval_bogus")
    with pytest.raises(ValueError, match="corrupt or not a PyTorch checkpoint") as info:
        evaluate(cfg, [])
    assert str(bogus) in str(info.value)


class _NotPlain:
    """A Python object that a weights_only load must refuse."""


def test_eval_refuses_unsafe_checkpoint(make_cfg, tmp_path):
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"hyper_parameters": {"x": _NotPlain()}, "state_dict": {}}, unsafe)
    cfg = make_cfg("eval", [f"ckpt_path={unsafe}"], name="eval_unsafe")
    with pytest.raises(ValueError, match="needs unsafe unpickling") as info:
        evaluate(cfg, [])
    assert str(unsafe) in str(info.value)


# ---- subprocess: multirun and CLI errors -------------------------------------------------


@pytest.mark.slow
def test_multirun_sweep_summary(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    cmd = [PYTHON, "-m", "captcha_lit.train", "-m", "model=cnn,crnn", "debug=fast", f"hydra.sweep.dir={sweep}",
           f"data.cache_dir={cache_dir}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for job in ("0", "1"):
        metrics = _read_metrics(sweep / job)
        for key in TEST_KEYS:
            assert key in metrics
    # Both jobs ran in one process; the second one's wall time is its own, not the process's.
    done = [(sweep / job / "metrics.json").stat().st_mtime for job in ("0", "1")]
    assert 0 < _read_metrics(sweep / "1")["wall_time_s"] <= done[1] - done[0]
    with open(sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert "model=cnn" in rows[0]["overrides"] and "model=crnn" in rows[1]["overrides"]
    assert all(r["status"] == "done" and r["test/seq_acc"] != "" for r in rows)
    md = (sweep / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| job |"))
    assert "test/seq_acc" in header and header.endswith("| model |")  # the swept override is a column
    assert "| cnn |" in md and "| crnn |" in md


CLI_CASES = {
    "model": (["captcha_lit.train", "model.name=nope"], ["unknown model 'nope'", "cnn", "crnn", "resnet"]),
    "optimizer": (["captcha_lit.train", "optimizer.name=nope"], ["unknown optimizer 'nope'", "adam"]),
    "charset": (["captcha_lit.train", "data.charset=AAB"], ["'AAB'", "duplicate", "'A'"]),
    "length": (["captcha_lit.train", "data.length=0"], ["length", "at least 1"]),
    "input_size": (["captcha_lit.train", "data.input_size=[8,8]"], ["[8, 8]", "too small"]),
    "model_option": (["captcha_lit.train", "+model.downsample=stride"],
                     ["model 'crnn_lite' has no option(s) downsample", "its options are: channels, dim, rnn"]),
    "eval_ckpt": (["captcha_lit.eval", "ckpt_path=/nonexistent.ckpt"], ["/nonexistent.ckpt", "does not exist"]),
    # What Hydra suggests for callbacks.ema.decay= on callbacks that do not average.
    "callback_entry": (["captcha_lit.train", "+callbacks.ema.decay=0.99"],
                       ["callbacks.ema={'decay': 0.99}", "needs a _target_", "callbacks=averaged"]),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, cache_dir):
    """Start every bad-input CLI run at once (each pays a torch import), then collect them."""
    root = tmp_path_factory.mktemp("cli")
    commands = {}
    for name, (args, _) in CLI_CASES.items():
        extra = ["debug=fast"] if args[0] == "captcha_lit.train" else []
        commands[name] = [*args, *extra, f"hydra.run.dir={root / name}", f"data.cache_dir={cache_dir}",
                          "trainer.accelerator=cpu"]
    return run_entry_points(commands, cache_dir, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_a_clear_error(cli_runs, case):
    code, stdout, stderr = cli_runs[case]
    expected = CLI_CASES[case][1]
    assert code == 2, f"exit code {code}\nstdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and "Traceback" not in stdout
    error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, stderr[-3000:]
    for fragment in expected:
        assert fragment in error_lines[0], f"{fragment!r} not in {error_lines[0]!r}"


def test_eval_runs_in_full_precision_under_autocast(trained_run, make_cfg):
    """Val and test read the fp32 model even when training uses bf16 autocast, so the reported
    metrics are those of the model that predict, serve and the ONNX export run."""
    _, metrics, _, _ = trained_run
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        overrides = [f"ckpt_path={metrics['best_ckpt']}", f"trainer.precision={precision}"]
        results[precision] = evaluate(make_cfg("eval", overrides, name=f"eval_{precision}"), overrides)
    for key in TEST_KEYS:
        assert results["bf16-mixed"][key] == pytest.approx(results["32-true"][key], abs=1e-6), key


def test_precision_auto_resolves_per_device():
    from omegaconf import OmegaConf

    from captcha_lit.training.builders import build_trainer, native_bf16, resolve_precision

    expected = "bf16-mixed" if native_bf16("cpu") else "32-true"
    assert resolve_precision(OmegaConf.create({"precision": "auto", "accelerator": "cpu"})) == expected
    assert resolve_precision({"precision": "32-true", "accelerator": "cpu"}) == "32-true"
    assert resolve_precision({"precision": "16-mixed", "accelerator": "auto"}) == "16-mixed"
    cfg = OmegaConf.create({"_target_": "lightning.pytorch.Trainer", "precision": "auto", "accelerator": "cpu",
                            "devices": 1, "logger": False, "enable_checkpointing": False})
    trainer = build_trainer(cfg)
    assert cfg.precision == expected  # written back, so the logged hparams name what ran
    assert trainer.precision == expected


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_says_why(native, monkeypatch, caplog):
    import logging

    from omegaconf import OmegaConf

    from captcha_lit.training import builders

    monkeypatch.setattr(builders, "native_bf16", lambda device_type: native)
    cfg = OmegaConf.create({"_target_": "lightning.pytorch.Trainer", "precision": "auto", "accelerator": "cpu",
                            "devices": 1, "logger": False, "enable_checkpointing": False})
    with caplog.at_level(logging.INFO, logger=builders.__name__):
        builders.build_trainer(cfg)
    expected = ("trainer.precision=auto -> bf16-mixed: this CPU computes bf16 natively" if native else
                "trainer.precision=auto -> 32-true: this CPU has no native bf16 (AMX or AVX512-BF16)")
    assert any(record.getMessage().startswith(expected) for record in caplog.records), caplog.text

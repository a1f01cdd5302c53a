"""Train a CAPTCHA solver.

    python -m captcha_lit.train                                  # the default recipe
    python -m captcha_lit.train model=cnn trainer.max_epochs=50
    python -m captcha_lit.train -m optimizer=adam,adamw,sgd model=cnn,resnet
    python -m captcha_lit.train experiment=captcha_images_v2     # real images, labeled by file name
    python -m captcha_lit.train data=folder data.path=DIR init_from=PATH.ckpt   # fine-tune on a folder
    python -m captcha_lit.train hparams_search=optuna                # Optuna search over lr, batch size, ...
    python -m captcha_lit.train trainer=ddp trainer.accelerator=cpu trainer.devices=2   # DDP, 2 processes
    python -m captcha_lit.train hydra.run.dir=outputs/mine resume=auto   # re-run: continue or skip
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from captcha_lit.training.builders import build_datamodule, build_module, build_trainer, to_plain
from captcha_lit.training.budget import settle_training_length
from captcha_lit.training.checkpoints import check_resume_checkpoint, init_from_checkpoint
from captcha_lit.training.pretrain import finetune_lr, finetune_pull, pretrain_mode, pretrained_checkpoint
from captcha_lit.training.calibration import calibrate_checkpoint
from captcha_lit.training.callbacks import RunTimeline, written_files
from captcha_lit.training.distributed import ddp_job
from captcha_lit.training.finetune import PullToStart, keep_better_start, snapshot
from captcha_lit.training.resume import resume_point
from captcha_lit.training.selftrain import self_train
from captcha_lit.utils import (check_model_path, entry_point, flatten, keep_freed_memory, machine_description,
                               output_dir, run_cores, set_torch_threads, write_json)

log = logging.getLogger(__name__)
_process_start: float | None = time.time()


def _run_start() -> float:
    """When this run's wall time starts: the process start for its first run (the imports are part of
    the wait), now for each later run of a multirun in the same process (the basic and joblib launchers)."""
    global _process_start
    start, _process_start = _process_start or time.time(), None
    return start


def train(cfg: DictConfig) -> dict:
    """Fit, then test the best checkpoint; write and return metrics.json's content.

    With ``resume=auto``, a run directory that holds a finished run returns its recorded
    metrics without training, and one with ``checkpoints/last.ckpt`` continues from it."""
    start = _run_start()
    out_dir = output_dir(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path} and init_from={cfg.init_from} are both set: ckpt_path resumes a run "
            "(weights, optimizer, epoch), init_from starts a new one from weights only; pass one of them"
        )
    if cfg.get("ckpt_path"):
        check_model_path(cfg.ckpt_path, "checkpoint")
    for group in ("callbacks", "logger"):
        _check_buildable(cfg, group)
    ckpt_path, finished = resume_point(cfg, out_dir, is_rank_zero=rank_zero_only.rank == 0)
    if finished is not None:
        print(f"\nskipped: {out_dir} holds a finished run (resume=auto); its metrics stand")
        return finished
    # Jobs that a launcher runs side by side share the machine: each takes its share of the cores.
    cores = run_cores()
    set_torch_threads(cores)
    keep_freed_memory()
    data_cfg = to_plain(cfg.data)
    if "gen_workers" in data_cfg and data_cfg["gen_workers"] is None:  # generated data: its share too
        data_cfg["gen_workers"] = cores

    datamodule = build_datamodule(data_cfg, cfg.get("augmentation"))
    # The datamodule goes first: a folder dataset settles the charset that the model is built for.
    model = build_module(cfg, datamodule)
    # Checked before any training, so that a bad unlabeled folder fails in seconds, not after the fit.
    unlabeled = datamodule.unlabeled() if hasattr(datamodule, "unlabeled") else []
    if ckpt_path:
        _check_resumable(ckpt_path, model, explicit=bool(cfg.get("ckpt_path")))
    if getattr(datamodule, "bad_files", None):
        write_json(Path(out_dir) / "bad_files.json", datamodule.bad_files)
        log.warning("left out %d bad file(s); see %s", len(datamodule.bad_files), Path(out_dir) / "bad_files.json")
    start_weights = None  # the weights a fine-tune starts from
    # A resumed fine-tune gets its pull (and the weights it pulls toward) back from the checkpoint.
    strength = finetune_pull(cfg)
    pull = PullToStart(strength.value) if ckpt_path and strength is not None else None
    if cfg.get("init_from"):
        if pretrain_mode(cfg) not in ("none", "auto"):
            raise ValueError(f"init_from={cfg.init_from} and pretrain={cfg.pretrain} both name a checkpoint to start "
                             "from; pass one of them")
        init_from_checkpoint(model, cfg.init_from)
        start_weights = snapshot(model)
    recipe = {f"data.{key}": choice.to_dict() for key, choice in getattr(datamodule, "recipe", {}).items()}
    if ckpt_path is None:
        pretrained, choice = pretrained_checkpoint(cfg, datamodule)
        recipe["pretrain"] = choice.to_dict()
        log.info("pretrain=%s -> %s: %s", cfg.get("pretrain"), choice.value, choice.reason)
        if pretrained is not None:
            init_from_checkpoint(model, pretrained)
            start_weights = snapshot(model)
            lr = finetune_lr(cfg)
            if lr is not None:
                model.hparams.optimizer["lr"] = lr.value
                recipe["optimizer.lr"] = lr.to_dict()
                log.info("optimizer.lr -> %s: %s", lr.value, lr.reason)
            if strength is not None:
                trained = {name for name, p in model.named_parameters() if p.requires_grad}
                pull = PullToStart(strength.value, {k: v for k, v in start_weights.items() if k in trained})
                recipe["pretraining.finetune_pull"] = strength.to_dict()
                log.info("pretraining.finetune_pull -> %s: %s", strength.value, strength.reason)
            # A run that built the pre-trained model and one that found it cached continue alike.
            if cfg.get("seed") is not None:
                L.seed_everything(int(cfg.seed), workers=True)
    files = getattr(datamodule, "files", None)
    lengths = settle_training_length(cfg, len(files["train"]) if files else None)
    recipe.update({f"trainer.{key}": choice.to_dict() for key, choice in lengths.items()})

    timeline = RunTimeline(start_time=start)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None] + [timeline]
    if pull is not None:  # first: the weight average then takes in the pulled weights
        callbacks.insert(0, pull)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = build_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                       enable_autolog_hparams=False)
    if cfg.trainer.get("sync_batchnorm") and trainer.world_size > 1 and isinstance(trainer.accelerator, CPUAccelerator):
        raise ValueError("trainer.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm does not run on CPU; "
                         "pass trainer.sync_batchnorm=false")
    hparams = flatten(to_plain(cfg))
    hp_metrics = {"hp/val_seq_acc_best": 0.0, "hp/test_seq_acc": 0.0}
    for lg in trainer.loggers:
        lg.log_hyperparams(hparams, metrics=hp_metrics) if _takes_metrics(lg) else lg.log_hyperparams(hparams)

    log.info("training %s on %s", cfg.model.name, trainer.accelerator.__class__.__name__)
    with ddp_job("captcha_lit.train", out_dir):
        fit_metrics, test_metrics = _fit_and_test(cfg, trainer, model, datamodule, ckpt_path, out_dir, start_weights)
    if fit_metrics.get("finetune") is not None:
        recipe["finetune"] = fit_metrics.pop("finetune").to_dict()
    ckpt_cb = trainer.checkpoint_callback
    best_ckpt = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    last = Path(out_dir) / "checkpoints" / "last.ckpt"  # callbacks.last_checkpoint's, every epoch
    last_ckpt = str(last) if last.exists() else None

    metrics = {
        **test_metrics,
        "val/seq_acc_best": fit_metrics.get("val/seq_acc_best"),
        "val/seq_acc": fit_metrics.get("val/seq_acc"),
        "calibration": fit_metrics.get("calibration"),
        "best_ckpt": best_ckpt,
        "last_ckpt": last_ckpt,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "resumed_from": ckpt_path,
        "world_size": trainer.world_size,
        "torch_threads": cores,
        "wall_time_s": round(time.time() - timeline.start_time, 2),
        "train_images_per_s": round(timeline.throughput, 1) if timeline.throughput else None,
        "timeline": timeline.points,
        "plots": written_files(trainer.callbacks),
        "recipe": recipe,
        "machine": _machine(trainer),
    }
    if unlabeled:
        final = self_train(cfg, datamodule, metrics, out_dir, start)
        metrics.update({key: value for key, value in final.items() if key.startswith("test/") or key in (
            "val/seq_acc_best", "best_ckpt", "last_ckpt", "selftrain", "wall_time_s")})
    for lg in trainer.loggers:
        lg.log_metrics({"hp/val_seq_acc_best": metrics["val/seq_acc_best"] or 0.0,
                        "hp/test_seq_acc": metrics.get("test/seq_acc") or 0.0}, step=trainer.global_step)
        lg.finalize("success")
    if trainer.is_global_zero:
        write_json(Path(out_dir) / "metrics.json", metrics)
        summary = {k: v for k, v in metrics.items() if k.startswith("test/") or k in ("wall_time_s", "train_images_per_s")}
        log.info("final metrics: %s", summary)
        print("\n".join(["", "final metrics:"] + [f"  {k:<22} {v}" for k, v in summary.items()]
                        + [f"  best checkpoint        {metrics['best_ckpt']}", f"  run directory          {out_dir}"]
                        + [f"  pictures               {folder}" for folder in sorted({str(Path(p).parent)
                                                                                     for p in metrics["plots"]})]))
    return metrics


def _check_buildable(cfg: DictConfig, group: str) -> None:
    """Each entry of ``callbacks`` or ``logger`` names the class it builds (``_target_``). An entry
    without one (``+callbacks.ema.decay=0.99`` on callbacks that do not average, as Hydra itself
    suggests) would otherwise reach Lightning as a plain dict and fail deep inside it, after the data
    is generated."""
    for name, entry in (cfg.get(group) or {}).items():
        if entry is None or (isinstance(entry, DictConfig) and "_target_" in entry):
            continue
        hint = ""
        if (group, name) == ("callbacks", "ema"):
            hint = "; for weight averaging pass callbacks=averaged (then callbacks.ema.decay=...)"
        raise ValueError(f"{group}.{name}={to_plain(entry)}: an entry needs a _target_, the class it builds, or null "
                         f"to leave it out{hint}")


def _check_resumable(ckpt_path: str, model, explicit: bool) -> None:
    """A checkpoint to resume from that Lightning would fail on (with a traceback) is refused in one line."""
    if explicit:
        check_resume_checkpoint(ckpt_path, model, "ckpt_path=")
        return
    try:
        check_resume_checkpoint(ckpt_path, model, "checkpoint")
    except ValueError as exc:
        raise ValueError(f"resume=auto: {exc}. Delete it to start this run afresh, or pass ckpt_path= to resume from "
                         "another checkpoint") from None


def _fit_and_test(cfg: DictConfig, trainer: L.Trainer, model, datamodule, ckpt_path: str | None,
                  out_dir: str, start_weights: dict | None = None) -> tuple[dict, dict]:
    """Fit, then calibrate and test the best checkpoint. ``start_weights``: the weights a fine-tune started
    from, kept as the best where they read the validation split better than it."""
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.interrupted:
        ckpt = Path(out_dir) / "checkpoints"
        raise KeyboardInterrupt(
            f"training was interrupted; re-run the same command with resume=auto (and the same hydra.run.dir) "
            f"to continue from {ckpt / 'last.ckpt'}, or pass ckpt_path={ckpt / 'interrupted.ckpt'}"
        )
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if "val/seq_acc_best" not in fit_metrics and model.val_seq_acc_best.update_called:
        # Resumed after its last epoch (killed before the test): no epoch ran, so take the checkpoint's.
        fit_metrics["val/seq_acc_best"] = float(model.val_seq_acc_best.compute())
        timeline = next((c for c in trainer.callbacks if isinstance(c, RunTimeline)), None)
        if timeline is not None and timeline.points:
            fit_metrics.setdefault("val/seq_acc", timeline.points[-1].get("val/seq_acc"))
    test_metrics: dict = {}
    if start_weights is not None:
        choice, kept_acc = keep_better_start(trainer, model, datamodule, start_weights)
        fit_metrics["finetune"] = choice
        if kept_acc is not None:
            fit_metrics["val/seq_acc_best"] = kept_acc
    ckpt_cb = trainer.checkpoint_callback
    best_ckpt = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    if cfg.get("calibrate") and best_ckpt:
        # Every rank fits the same temperature (the test reads it on each); rank 0 alone rewrites the file.
        report = calibrate_checkpoint(best_ckpt, datamodule, write=trainer.is_global_zero)
        model.spec = model.spec.replace(temperature=report["temperature"])
        fit_metrics["calibration"] = report
    if cfg.get("test"):
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best_ckpt, weights_only=True)
        test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    return fit_metrics, test_metrics


def _machine(trainer: L.Trainer) -> str:
    """What the run trained on, for the wall time to mean something: the CPU, and any accelerator."""
    if isinstance(trainer.accelerator, CPUAccelerator):
        return machine_description()
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else type(trainer.accelerator).__name__
    return f"{trainer.num_devices} x {device}, {machine_description()}"


def _takes_metrics(logger) -> bool:
    import inspect

    return "metrics" in inspect.signature(logger.log_hyperparams).parameters


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@entry_point
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    value = metrics.get(cfg.get("optimized_metric"))
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()

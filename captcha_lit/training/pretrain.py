"""Scheme-matched synthetic pre-training, for folders with few labels: ``pretrain=auto``.

A folder's scheme is its charset, its length range, its images' canvas (their median size),
the model's input size and whether it reads gray. ``pretrain=auto`` generates CAPTCHAs of that
scheme with the ``captcha`` package, in several fonts (``pretraining.fonts``: the package's own,
DejaVu, any the user adds), trains the run's own network on them, and the run then fine-tunes
it on the real labels (as ``init_from`` does). Folders with ``pretraining.max_labels`` labels or
more train from scratch: they have enough real examples.

The pre-trained model is cached under ``<cache_dir>/pretrained-<key>/`` with the key over
everything that shapes it (the scheme, the network, the optimizer and augmentation, the
pre-training recipe and the seed), built once under a lock: the next run or audit of the same
scheme reuses it. ``pretrain=PATH`` starts from a given checkpoint; ``pretrain=none`` from scratch.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from captcha_lit.data import cache
from captcha_lit.data.survey import Choice
from captcha_lit.utils import check_model_path

log = logging.getLogger(__name__)

NONE, AUTO = "none", "auto"
# Bumped when the pre-training procedure changes in a way its cache key does not see.
PRETRAIN_VERSION = 2
# pretraining settings that shape only the fine-tune or whether to pre-train, not the pre-trained model
FINETUNE_ONLY = ("max_labels", "finetune_lr", "finetune_pull")
# The captcha package draws its default font sizes for a 60-pixel-high canvas.
PACKAGE_CANVAS_HEIGHT = 60
PACKAGE_FONT_SIZES = (42, 50, 56)


def pretrain_mode(cfg: DictConfig) -> str:
    mode = cfg.get("pretrain")
    if mode is None or mode is False or str(mode).lower() == NONE:
        return NONE
    return AUTO if str(mode).lower() == AUTO else str(mode)


def scheme_fonts(fonts, chars: str) -> tuple[list[str], list[str]]:
    """The font files of ``pretraining.fonts`` that draw every character of ``chars``, and a note
    for each one left out."""
    from captcha_lit.data.synthetic import missing_glyphs, resolve_fonts

    usable, left_out = [], []
    for font in resolve_fonts(list(fonts)) or resolve_fonts(["default"]):
        missing = missing_glyphs(font, chars)
        if missing:
            left_out.append(f"{os.path.basename(font)} cannot draw {missing!r}")
        else:
            usable.append(font)
    return usable, left_out


def scheme_font_sizes(canvas_height: int) -> list[int]:
    return [max(8, round(size * canvas_height / PACKAGE_CANVAS_HEIGHT)) for size in PACKAGE_FONT_SIZES]


def pretraining_config(cfg: DictConfig, scheme: dict, fonts: list[str], out_dir: str) -> DictConfig:
    """The train config of the pre-training run: this run's network, optimizer and augmentation on
    generated CAPTCHAs of ``scheme``, checkpoints only, no test, no pictures, no logger."""
    plan = cfg.pretraining
    pre = copy.deepcopy(cfg)
    with open_dict(pre):
        data = OmegaConf.to_container(cfg.data, resolve=True)
        pre.data = {
            "source": "synthetic", "charset": scheme["charset"], "min_length": scheme["min_length"],
            "max_length": scheme["max_length"], "width": scheme["canvas"][1], "height": scheme["canvas"][0],
            "input_size": list(scheme["input_size"]), "grayscale": scheme["grayscale"], "fonts": fonts,
            "font_sizes": scheme_font_sizes(scheme["canvas"][0]), "train_char_weights": None,
            "num_train": int(plan.num_train), "num_val": int(plan.num_val), "num_test": 1, "seed": 0,
            "test_seed": 1, "streaming": False, "cache_dir": data["cache_dir"], "gen_workers": None,
            "batch_size": int(plan.batch_size), "eval_batch_size": data.get("eval_batch_size", 256),
            "num_workers": 0, "mean": data.get("mean", 0.5), "std": data.get("std", 0.5),
        }
        pre.optimizer.lr = float(plan.lr)
        pre.trainer.max_epochs = int(plan.epochs)
        pre.trainer.max_steps = -1
        pre.trainer.min_steps = None
        # Checkpoints only: the weight average is the fine-tune's, sized to few real labels.
        keep = ("model_checkpoint", "last_checkpoint")
        pre.callbacks = {k: v for k, v in (cfg.get("callbacks") or {}).items() if k in keep and v is not None}
        if "model_checkpoint" in pre.callbacks:
            pre.callbacks.model_checkpoint.monitor = "val/seq_acc"
            pre.callbacks.model_checkpoint.mode = "max"
        pre.logger = {}
        pre.paths.output_dir = out_dir
        pre.test = False
        pre.resume = False
        pre.ckpt_path = None
        pre.init_from = None
        pre.pretrain = NONE
    return pre


def _cache_fields(cfg: DictConfig, scheme: dict, fonts: list[str]) -> dict:
    from captcha_lit.data.synthetic import _font_identity

    plain = lambda node: OmegaConf.to_container(node, resolve=True) if node is not None else None  # noqa: E731
    return {
        "version": PRETRAIN_VERSION, "scheme": {**scheme, "canvas": list(scheme["canvas"]),
                                                "input_size": list(scheme["input_size"])},
        "fonts": [_font_identity(f) for f in fonts], "model": plain(cfg.model),
        # The pre-training run's own learning rate: fine-tuning at another one reuses the model.
        "optimizer": {**plain(cfg.optimizer), "lr": float(cfg.pretraining.lr)},
        "scheduler": plain(cfg.scheduler), "augmentation": plain(cfg.get("augmentation")),
        "pretraining": {k: v for k, v in plain(cfg.pretraining).items() if k not in FINETUNE_ONLY},
        "seed": cfg.get("seed"),
        "precision": str(cfg.trainer.get("precision")),
    }


def pretrained_checkpoint(cfg: DictConfig, datamodule) -> tuple[str | None, Choice]:
    """The checkpoint this run starts from (None: from scratch), and why."""
    mode = pretrain_mode(cfg)
    if mode == NONE:
        return None, Choice(NONE, "pretrain=none: the network starts from scratch")
    if mode != AUTO:
        return str(check_model_path(mode, "checkpoint")), Choice(mode, "pretrain=PATH: fine-tune that checkpoint")
    scheme = datamodule.scheme() if hasattr(datamodule, "scheme") else None
    if scheme is None:
        return None, Choice(NONE, "generated training data: there is no real scheme to pre-train for")
    if cfg.trainer.get("fast_dev_run"):
        return None, Choice(NONE, "trainer.fast_dev_run: a wiring check, no pre-training")
    if cfg.get("init_from") or cfg.get("ckpt_path"):
        return None, Choice(NONE, "the run starts from a checkpoint already (init_from or ckpt_path)")
    plan = cfg.get("pretraining")
    if plan is None:
        raise ValueError("pretrain=auto needs the pretraining settings of the folder recipe (data=folder), "
                         "or pass pretrain=none")
    rounds = pretraining_rounds(plan)  # checked before the cache answers, so a bad value never goes unseen
    labels = len(datamodule.files["train"])
    if labels >= int(plan.max_labels):
        return None, Choice(NONE, f"{labels} training labels >= pretraining.max_labels={plan.max_labels}: "
                                  "enough real examples to train from scratch")
    fonts, left_out = scheme_fonts(plan.fonts, scheme["charset"])
    if left_out:
        log.info("pre-training fonts left out: %s", "; ".join(left_out))
    if not fonts:
        return None, Choice(NONE, "no font of pretraining.fonts draws the whole charset "
                                  f"{scheme['charset']!r} ({'; '.join(left_out)}): training from scratch")
    fields = _cache_fields(cfg, scheme, fonts)
    root = Path(os.path.expanduser(str(cfg.data.cache_dir)))
    folder = root / f"pretrained-{cache.cache_key(fields)}"
    reason = (f"{labels} training labels < pretraining.max_labels={plan.max_labels}: pre-trained on "
              f"{plan.num_train} generated {scheme['canvas'][1]}x{scheme['canvas'][0]} CAPTCHAs of the charset "
              f"{scheme['charset']!r}, length {scheme['min_length']}..{scheme['max_length']}, in {len(fonts)} fonts")
    checkpoint = folder / "model.ckpt"
    if checkpoint.is_file():
        return str(checkpoint), Choice(str(checkpoint), reason + " (cached)")
    with cache.file_lock(build_lock(folder)):
        if not checkpoint.is_file():
            _build(cfg, scheme, fonts, fields, folder, rounds)
    return str(checkpoint), Choice(str(checkpoint), reason)


def build_lock(folder: Path) -> Path:
    """The lock held while ``folder`` is built: the one ``cache.remove_dead_builds`` tries, so that
    a live build's temporary folder is never taken for a dead one."""
    return folder.with_name(f".{folder.name}.lock")


def finetune_lr(cfg: DictConfig) -> Choice | None:
    """The learning rate that fine-tunes a pre-trained model (None: keep optimizer.lr)."""
    lr = (cfg.get("pretraining") or {}).get("finetune_lr")
    if lr is None:
        return None
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"pretraining.finetune_lr={lr!r}: a positive learning rate, or null to keep optimizer.lr")
    return Choice(float(lr), f"pretraining.finetune_lr: the rate that fine-tunes a pre-trained model (optimizer.lr "
                             f"is {cfg.optimizer.lr})")


def finetune_pull(cfg: DictConfig) -> Choice | None:
    """How hard a fine-tune of a pre-trained model is pulled back to its start (None: not at all)."""
    from captcha_lit.training.finetune import pull_strength

    value = (cfg.get("pretraining") or {}).get("finetune_pull")
    strength = None if value is None else pull_strength(value)
    if not strength:
        return None
    return Choice(strength, f"pretraining.finetune_pull: each step moves the weights lr x {strength:g} of the "
                            "way back to the pre-trained ones, so that few labels keep what pre-training taught")


def _build(cfg: DictConfig, scheme: dict, fonts: list[str], fields: dict, folder: Path,
           rounds: tuple[int, float]) -> None:
    from captcha_lit.train import train

    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.time()
    log.info("pre-training on generated CAPTCHAs of the scheme into %s", folder)
    max_rounds, floor = rounds
    try:
        best, accuracy = None, 0.0
        for round_number in range(1, max_rounds + 1):
            pre = pretraining_config(cfg, scheme, fonts, str(tmp / f"run{round_number}"))
            if best is not None:
                with open_dict(pre):
                    pre.init_from = best
            metrics = train(pre)
            best = metrics.get("best_ckpt") or metrics.get("last_ckpt")
            accuracy = metrics.get("val/seq_acc_best") or 0.0
            if accuracy >= floor or round_number == max_rounds:
                break
            # A hard scheme (many classes, long texts, small glyphs) can spend a whole round in CTC's
            # blank-only phase; fine-tuning from that is fine-tuning from nothing.
            log.info("pre-training round %d read %.4f of its generated validation images, under "
                     "pretraining.min_val_seq_acc=%g: another round of %d epochs continues from it",
                     round_number, accuracy, floor, int(cfg.pretraining.epochs))
        if accuracy < floor:
            log.warning("pre-training read only %.4f of its generated validation images after %d round(s) "
                        "(pretraining.min_val_seq_acc=%g); the fine-tune starts from it anyway. Raise "
                        "pretraining.max_rounds or pretraining.epochs for this scheme", accuracy, max_rounds, floor)
        shutil.copyfile(best, tmp / "model.ckpt")
        meta = {"fields": fields, "val/seq_acc_best": accuracy, "rounds": round_number,
                "wall_time_s": round(time.time() - start, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for run in tmp.glob("run*"):
            shutil.rmtree(run)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("pre-trained in %.0f s (%d round(s)): val seq acc %.4f on generated CAPTCHAs", time.time() - start,
             round_number, accuracy)


def pretraining_rounds(plan) -> tuple[int, float]:
    """``(pretraining.max_rounds, pretraining.min_val_seq_acc)``: the pre-training repeats its epochs, each
    round from the last one's best weights, while it reads less than that of its validation images."""
    rounds = plan.get("max_rounds", 1)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"pretraining.max_rounds={rounds!r}: a whole number of rounds, at least 1")
    floor = plan.get("min_val_seq_acc", 0.0)
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
        raise ValueError(f"pretraining.min_val_seq_acc={floor!r}: a sequence accuracy in [0, 1] (0: one round)")
    return rounds, float(floor)

"""A fine-tune never ends worse than it started: the starting weights are one more candidate of
the checkpoint selection.

A run that starts from trained weights (``pretrain=auto`` or ``PATH``, ``init_from``) fine-tunes
them on its labels. Where the pre-training already matches the scheme well, a few dozen labels
can pull the model away from what it read: its validation accuracy falls from the first epoch
on, and every checkpoint the fine-tune saves reads worse than the weights it started from. The
best checkpoint and the starting weights are read on the validation split in the same way (by
whole-text accuracy, what the run is for, whatever metric chose the checkpoint); the
starting weights are kept, as the run's best checkpoint, only when they read strictly better.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from captcha_lit.data.survey import Choice

log = logging.getLogger(__name__)


def snapshot(module) -> dict[str, torch.Tensor]:
    """The module's weights and buffers as they are now, detached from training."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _val_seq_acc(module, images: np.ndarray, truths: list[str]) -> float:
    from captcha_lit.training.inference import read_images

    texts = read_images(module, images, beam_width=1).texts
    return float(np.mean([text == truth for text, truth in zip(texts, truths)])) if truths else 0.0


def keep_better_start(trainer, module, datamodule,
                      start: dict[str, torch.Tensor]) -> tuple[Choice | None, float | None]:
    """After the fit: make the starting weights the run's best checkpoint where they read the
    validation split better than the fine-tune's best -> (the choice and its reason, the starting
    weights' val seq acc where they were kept); ``(None, None)`` where there is nothing to
    compare: no best checkpoint, or several processes."""
    from captcha_lit.training.checkpoints import load_module

    callback = trainer.checkpoint_callback
    best = callback.best_model_path if callback is not None else ""
    if not best or trainer.world_size > 1:
        return None, None
    dataset = datamodule.datasets.get("val")
    if dataset is None or len(dataset) == 0:
        return None, None
    images, truths = np.asarray(dataset.images[np.arange(len(dataset))]), list(dataset.texts)
    tuned, state = load_module(best)
    tuned_acc = _val_seq_acc(tuned, images, truths)
    # The module's own weights are not needed after the fit: the test reads the best checkpoint's file.
    module.load_state_dict(start)
    start_acc = _val_seq_acc(module, images, truths)
    compared = f"val seq acc {start_acc:.4f} before the fine-tune, {tuned_acc:.4f} at its best checkpoint"
    if start_acc <= tuned_acc:
        return Choice("fine-tuned", compared), None
    path = Path(best).with_name(f"start-seq_acc{start_acc:.4f}.ckpt")
    state["state_dict"] = start
    state.pop("current_model_state", None)  # the weight average's raw weights belong to the fine-tune
    for callback_state in (state.get("callbacks") or {}).values():
        # Testing restores the checkpoint callback's state from the file: it must name this file.
        if isinstance(callback_state, dict) and callback_state.get("best_model_path") == best:
            callback_state["best_model_path"] = str(path)
    partial = path.with_name(f".{path.name}.partial")
    torch.save(state, partial)
    os.replace(partial, path)
    # The monitored score stays the fine-tune's: the starting weights were never scored on it.
    callback.best_model_path = str(path)
    choice = Choice("kept the starting weights", f"{compared}: the fine-tune read worse, so {path.name} is the best")
    log.info("fine-tune -> %s: %s", choice.value, choice.reason)
    return choice, start_acc


def pull_strength(value) -> float:
    """``pretraining.finetune_pull`` as a number, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"pretraining.finetune_pull={value!r}: a number >= 0 (0 or null: no pull)")
    return float(value)


class PullToStart(Callback):
    """Keeps a fine-tune near the weights it started from (L2-SP, decoupled as AdamW decouples its
    decay): after each optimizer step, every trained weight moves ``lr * strength`` of the way
    back to its starting value.

    A few dozen real labels are memorized within a few hundred steps; after that, a free fine-tune
    drifts away from what the pre-training taught (the generated scheme's thousands of shapes),
    and its validation accuracy falls while the training loss keeps falling. The pull keeps what
    the labels need and gives back the rest. The starting weights are saved in the checkpoints'
    callback state, so a resumed fine-tune keeps pulling toward them."""

    def __init__(self, strength: float, start: dict[str, torch.Tensor] | None = None):
        self.strength = pull_strength(strength)
        self.start = start  # parameter name -> its starting value; None: nothing to pull toward
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._lr = 0.0
        self._step = -1

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._pairs = None
        if self.start is not None and self.strength > 0:
            trained = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
            missing = [name for name, _ in trained if name not in self.start]
            if missing:
                raise ValueError(f"the fine-tune's starting weights lack {missing[0]}: they belong to another network")
            self._pairs = ([p for _, p in trained],
                           [self.start[name].to(device=p.device, dtype=p.dtype) for name, p in trained])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # The rate this step uses: the scheduler moves it on right after the step.
        self._lr = float(optimizer.param_groups[0]["lr"])
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._pairs is None or trainer.global_step == self._step:  # no step this batch (accumulation)
            return
        params, start = self._pairs
        with torch.no_grad():
            torch._foreach_lerp_(params, start, min(1.0, self._lr * self.strength))
        self._step = trainer.global_step

    def state_dict(self) -> dict:
        # The strength comes from the config on resume, like every other setting; the start cannot.
        return {"start": self.start}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("start") is not None:
            self.start = state_dict["start"]

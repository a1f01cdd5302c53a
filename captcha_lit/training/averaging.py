"""Weight averaging: an exponential moving average (EMA) of the weights, read instead of them.

An average of the last few thousand steps' weights reads about as well as weights annealed to
a low learning rate, and it does so at every point of the run, so a short schedule can stop
early without giving up its final annealing. Validation, the saved checkpoints (their
``state_dict``), the test and therefore predict, export and serve all read the average;
``last.ckpt`` also holds the raw weights (``current_model_state``) so that a resumed run
continues both exactly.
"""

from __future__ import annotations

import itertools

import torch
from lightning.pytorch.callbacks import WeightAveraging


def ema_multi_avg_fn(decay: float, warmup: bool):
    """``AveragedModel``'s update for a group of tensors. ``warmup`` uses ``min(decay, (1 + n) / (10 + n))``
    after ``n`` updates, so that the average of a young run is not dominated by its random start."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        step_decay = min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - step_decay)
        else:  # integer buffers (batch norm's step count): the current value
            for avg, cur in zip(averaged, current):
                avg.copy_(cur)

    return update


class EMA(WeightAveraging):
    """The EMA of the weights and batch-norm statistics, updated after every optimizer step.

    ``decay``: the average's memory, about ``1 / (1 - decay)`` steps. ``warmup``: shorter memory
    while the run is young (see ``ema_multi_avg_fn``)."""

    def __init__(self, decay: float = 0.999, warmup: bool = True):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise ValueError(f"callbacks.ema.decay={decay!r}: use a number in (0, 1), e.g. 0.999 "
                             "(or callbacks.ema=null for no averaging)")
        self._update = ema_multi_avg_fn(float(decay), bool(warmup))
        super().__init__(use_buffers=True, multi_avg_fn=self._update)
        self.decay = float(decay)
        self._pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._pairs = None  # paired again below: a resume or a new fit may have built new modules

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # AveragedModel.update_parameters walks both modules, detaches and regroups their tensors
        # on every step: about 2% of a small model's CPU step. The tensors stay the same objects
        # (validation's swaps and checkpoint loads copy values into them), so they are paired
        # once an epoch and averaged with the same update function. The average is a deep copy of the
        # module on its device, so the two lists pair one to one.
        average = self._average_model
        step = trainer.global_step
        if average is None or step <= self._latest_update_step or not self.should_update(step_idx=step - 1):
            return
        if int(average.n_averaged) == 0:  # the first update copies the weights: AveragedModel's own path
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if self._pairs is None:
            averaged = [t.detach() for t in itertools.chain(average.module.parameters(), average.module.buffers())]
            current = [t.detach() for t in itertools.chain(pl_module.parameters(), pl_module.buffers())]
            floats = [i for i, a in enumerate(averaged) if torch.is_floating_point(a)]
            others = [i for i, a in enumerate(averaged) if not torch.is_floating_point(a)]
            self._pairs = [([averaged[i] for i in group], [current[i] for i in group])
                           for group in (floats, others) if group]
        for averaged, current in self._pairs:
            self._update(averaged, current, average.n_averaged)
        average.n_averaged += 1
        self._latest_update_step = step

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Only a resumed fit restores the raw weights beside the average. Testing or validating a
        # checkpoint must read its state_dict, which is the average.
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

"""Weight averaging: an exponential moving average (EMA) of the weights, read instead of them.

An average of the last few thousand steps' weights reads about as well as weights annealed to
a low learning rate, and it does so at every point of the run, so a short schedule can stop
early without giving up its final annealing. Validation, the saved checkpoints (their
``state_dict``), the test and therefore predict, export and serve all read the average;
``last.ckpt`` also holds the raw weights (``current_model_state``) so that a resumed run
continues both exactly.
"""

from __future__ import annotations

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
        super().__init__(use_buffers=True, multi_avg_fn=ema_multi_avg_fn(float(decay), bool(warmup)))
        self.decay = float(decay)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Only a resumed fit restores the raw weights beside the average. Testing or validating a
        # checkpoint must read its state_dict, which is the average.
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

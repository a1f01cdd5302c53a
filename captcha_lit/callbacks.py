"""Callbacks that record how fast and how far a run got."""

from __future__ import annotations

import time

import lightning as L


class RunTimeline(L.Callback):
    """Records training throughput and, after each validation, the elapsed wall time and metrics.

    ``start_time`` is the process start (set by the entry point), so the timeline
    includes data generation: it answers "what accuracy after 5 minutes?".
    """

    def __init__(self, start_time: float | None = None):
        self.start_time = start_time if start_time is not None else time.time()
        self.points: list[dict] = []
        self.train_samples = 0
        self.train_seconds = 0.0
        self._epoch_start: float | None = None
        self._epoch_samples = 0
        self._resumed: dict | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._epoch_samples += int(batch["image"].shape[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_start is None:
            return
        seconds = time.perf_counter() - self._epoch_start
        # The epoch-end hook runs after validation; subtract the validation time spent inside the epoch.
        seconds -= getattr(self, "_val_seconds", 0.0)
        self._val_seconds = 0.0
        self.train_samples += self._epoch_samples * trainer.world_size
        self.train_seconds += max(seconds, 1e-9)
        pl_module.log("perf/train_images_per_s", self._epoch_samples * trainer.world_size / max(seconds, 1e-9),
                      sync_dist=True)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if trainer.training or trainer.state.fn == "fit":
            self._val_seconds = getattr(self, "_val_seconds", 0.0) + time.perf_counter() - self._val_start
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.points.append({"epoch": trainer.current_epoch, "step": trainer.global_step,
                            "elapsed_s": round(time.time() - self.start_time, 2), **metrics})

    def state_dict(self) -> dict:
        # In the checkpoint, so a resumed run's timeline and throughput include the epochs before it.
        return {"points": self.points, "train_samples": self.train_samples, "train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        # Testing a checkpoint loads it too; only a resumed fit takes it over (in on_train_start).
        self._resumed = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        state, self._resumed = self._resumed, None
        if state:
            self.points = list(state.get("points", []))
            self.train_samples = state.get("train_samples", 0)
            self.train_seconds = state.get("train_seconds", 0.0)
            if self.points:  # elapsed time goes on from where the interrupted run stopped, downtime left out
                self.start_time -= self.points[-1]["elapsed_s"]

    @property
    def throughput(self) -> float | None:
        return self.train_samples / self.train_seconds if self.train_seconds else None

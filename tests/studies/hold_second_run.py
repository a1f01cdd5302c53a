"""A callback for the interrupted-audit test: it holds the audit's second training run still, after
its first epoch (last.ckpt written), until the test interrupts the audit.

Waiting for that file from outside races the run: a tiny point can finish between two polls of a
loaded machine. Held here, the interrupt always lands mid-run, the way a user's Ctrl-C would.
Runs share ``marker_dir``: the first run to reach its second epoch passes, the second one holds
(and writes ``holding``), and every later one passes, so the continued audit runs freely."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L


class HoldTheSecondRun(L.Callback):
    def __init__(self, marker_dir: str, timeout_s: float = 300.0):
        self.marker_dir = Path(marker_dir)
        self.timeout_s = timeout_s

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != 1:
            return
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        passed, holding = self.marker_dir / "passed", self.marker_dir / "holding"
        if not passed.exists():
            passed.touch()
            return
        if holding.exists():
            return
        holding.touch()
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:  # the test's interrupt ends this with KeyboardInterrupt
            time.sleep(0.05)
        raise RuntimeError(f"held for {self.timeout_s} s and no interrupt came")

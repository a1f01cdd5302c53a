"""Callbacks that keep the best weights, record how fast and how far a run got, and show what the
model sees and gets wrong.

The picture callbacks log to every TensorBoard logger of the run and, when their ``dirpath``
is set, also write PNG files there, so a run with ``logger=csv`` or no logger gets them too.
They reuse what training already computed (the augmented batch, the texts that validation
and test decoded), so they add no model work.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from captcha_lit.viz import analysis, plots, writers

log = logging.getLogger(__name__)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``save_top_k=1``, where an epoch that ties the best
    score of ``monitor`` replaces it when its ``tie_break`` metric is lower.

    Validation accuracy moves in steps of one image (0.001 on 1,000 images), so the last epochs
    of a run often read the same, and ``ModelCheckpoint`` keeps the first of equal scores. The
    validation loss, continuous, still tells them apart. ``tie_break=None``: the first one stays."""

    def __init__(self, *args, tie_break: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if tie_break is not None and self.save_top_k != 1:
            raise ValueError(f"tie_break={tie_break!r} needs save_top_k=1, not {self.save_top_k}")
        self.tie_break = tie_break if tie_break != self.monitor else None
        self.best_tie_value: float | None = None  # tie_break's value at the kept checkpoint

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so that a last.ckpt written by it restores its best score here too.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if super().check_monitor_top_k(trainer, current):
            return True
        if self.tie_break is None or current is None or self.best_tie_value is None:
            return False
        value = trainer.callback_metrics.get(self.tie_break)
        tied = bool(current == self.best_k_models[self.kth_best_model_path])
        wins = tied and value is not None and float(value) < self.best_tie_value
        return trainer.strategy.reduce_boolean_decision(wins)

    def _update_best_and_save(self, current: torch.Tensor, trainer: L.Trainer, monitor_candidates: dict) -> None:
        value = monitor_candidates.get(self.tie_break) if self.tie_break is not None else None
        self.best_tie_value = float(value) if value is not None else None
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_tie_value": self.best_tie_value}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:  # as ModelCheckpoint restores its best
            self.best_tie_value = state_dict.get("best_tie_value")


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

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._resumed:  # resumed after its last epoch: no epoch ran, on_train_start neither
            self.on_train_start(trainer, pl_module)

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


def written_files(callbacks) -> list[str]:
    """The files that the picture callbacks among ``callbacks`` wrote, for metrics.json."""
    return sorted({str(path) for cb in callbacks for path in getattr(cb, "files", {}).values()})


def _has_matplotlib(what: str) -> bool:
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    log.warning("%s needs matplotlib, which is not installed; skipping it (pip install -e '.[viz]')", what)
    return False


def _texts(pl_module, batch: dict) -> list[str]:
    """The batch's labels, decoded from its targets."""
    return [pl_module.charset.decode(row) for row in batch["target"].tolist()]


def _check_count(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a whole number >= 1 (remove the callback to turn it off)")
    return value


class _Pictures(L.Callback):
    """Publishes images to the run's TensorBoard loggers and, with a ``dirpath``, as PNG files."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = Path(dirpath) if dirpath else None
        self.files: dict[str, Path] = {}  # what this callback wrote, for metrics.json

    @staticmethod
    def _tensorboards(trainer: L.Trainer) -> list:
        from lightning.pytorch.loggers import TensorBoardLogger

        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def _wanted(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and (self.dirpath is not None or bool(self._tensorboards(trainer)))

    def _publish(self, trainer: L.Trainer, tag: str, image, filename: str) -> None:
        array = np.asarray(image)
        for writer in self._tensorboards(trainer):
            writer.add_image(tag, array, trainer.global_step, dataformats="HWC")
        if self.dirpath is not None:
            self.files[filename] = plots.save_image(array, self.dirpath / filename)


class SampleGrid(_Pictures):
    """At the start of fit, a grid of training images as the model receives them (after augmentation,
    undone normalization) with their labels: TensorBoard image ``train/samples``, ``train_samples.png``."""

    def __init__(self, num_images: int = 32, columns: int = 8, dirpath: str | None = None):
        super().__init__(dirpath)
        self.num_images = _check_count("num_images", num_images)
        self.columns = _check_count("columns", columns)
        self._pending = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self._pending = self._wanted(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The hook sees the batch after on_after_batch_transfer, i.e. augmented and normalized.
        if not self._pending:
            return
        self._pending = False
        count = min(self.num_images, int(batch["image"].shape[0]))
        images = pl_module.preprocess.to_uint8(batch["image"][:count])
        grid = plots.sample_grid(images, _texts(pl_module, batch)[:count], columns=self.columns,
                                 title=f"training images after augmentation, epoch {trainer.current_epoch}")
        self._publish(trainer, "train/samples", grid, "train_samples.png")


class PredictionGallery(_Pictures):
    """After each validation epoch, a gallery of val predictions: wrong ones first (most confident
    first), then right ones; framed red or green, each with its true and its read text, aligned.
    TensorBoard image ``val/predictions`` (one per epoch) and ``val_predictions.png`` (the latest).

    It keeps at most ``num_images`` wrong and ``num_images`` right images per epoch and reads the
    texts that ``validation_step`` decoded, so it costs a few milliseconds an epoch.
    """

    def __init__(self, num_images: int = 32, columns: int = 8, dirpath: str | None = None):
        super().__init__(dirpath)
        self.num_images = _check_count("num_images", num_images)
        self.columns = _check_count("columns", columns)
        self._reset()

    def _reset(self) -> None:
        self._kept: dict[bool, list[tuple]] = {True: [], False: []}  # right? -> (image, truth, pred, confidence)
        self._seen = self._wrong = 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict) or outputs.get("preds") is None:
            return
        truths, preds = _texts(pl_module, batch), outputs["preds"]
        confidences = outputs.get("confidences") or [float("nan")] * len(preds)
        self._seen += len(preds)
        room = {right: self.num_images - len(kept) for right, kept in self._kept.items()}
        take = []
        for i, (truth, pred) in enumerate(zip(truths, preds)):
            right = truth == pred
            self._wrong += not right
            if room[right] > 0:
                room[right] -= 1
                take.append((right, i))
        if take:
            images = pl_module.preprocess.to_uint8(batch["image"][[i for _, i in take]]).cpu()
            for (right, i), image in zip(take, images):
                self._kept[right].append((image, truths[i], preds[i], float(confidences[i])))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        kept = self._kept[False] + self._kept[True]
        if trainer.sanity_checking or not kept or not self._wanted(trainer):
            return
        images, truths, preds, confidences = zip(*kept)
        order = analysis.gallery_order(truths, preds, confidences)[:self.num_images]
        gallery = plots.prediction_gallery(
            torch.stack([images[i] for i in order]), [truths[i] for i in order], [preds[i] for i in order],
            [confidences[i] for i in order], columns=self.columns,
            title=f"val after epoch {trainer.current_epoch}: {self._wrong} of {self._seen} read wrong; wrong first",
        )
        self._publish(trainer, "val/predictions", gallery, "val_predictions.png")


class ErrorAnalysis(_Pictures):
    """At the end of a test run, the errors by character (definitions in ``captcha_lit.viz.analysis``):

    - the confusion matrix: TensorBoard image ``test/confusion``, confusion.png and confusion.csv;
    - accuracy per character position: ``test/position_accuracy`` (image and one scalar per position),
      position_accuracy.png and position_accuracy.csv;
    - the most confused pairs: TensorBoard text ``test/confused_pairs``, confused_pairs.md (the
      ``top_pairs`` most frequent) and confused_pairs.csv (all).
    """

    def __init__(self, dirpath: str | None = None, top_pairs: int = 20):
        super().__init__(dirpath)
        self.top_pairs = _check_count("top_pairs", top_pairs)
        self.report: analysis.ErrorReport | None = None
        self._truths: list[str] = []
        self._preds: list[str] = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._truths, self._preds = [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(outputs, dict) and outputs.get("preds") is not None:
            self._truths += _texts(pl_module, batch)
            self._preds += outputs["preds"]

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        truths, preds = self._truths, self._preds
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (truths, preds))
            truths = [t for part in gathered for t in part[0]]
            preds = [p for part in gathered for p in part[1]]
        if not truths or not self._wanted(trainer):
            return
        self.report = analysis.error_report(truths, preds, pl_module.charset.chars)
        figures = plots.error_figures(self.report) if _has_matplotlib("the confusion matrix plot") else {}
        for name, image in figures.items():
            for writer in self._tensorboards(trainer):
                writer.add_image(f"test/{name}", image, trainer.global_step, dataformats="HWC")
        for writer in self._tensorboards(trainer):
            table = writers.markdown_table(self.report.confused_pairs(self.top_pairs), writers.PAIR_COLUMNS)
            writer.add_text("test/confused_pairs", table, trainer.global_step)
            for row in self.report.position_accuracy():
                writer.add_scalar(f"test/position_accuracy/{row['position']}", row["accuracy"], trainer.global_step)
        if self.dirpath is not None:
            self.files.update(writers.write_error_analysis(self.report, self.dirpath, self.top_pairs, figures))
            log.info("error analysis of %d test texts written to %s", len(truths), self.dirpath)


class TestPredictions(L.Callback):
    """At the end of a test run, every test image's true text, prediction and confidence in ``path``
    (columns ``index``, ``file``, ``text``, ``prediction``, ``confidence``, ``right``): what
    coverage, calibration and an audit's sample errors are computed from. ``file`` is the image's
    path under a folder's root (empty for generated data, and under DDP, whose ranks interleave
    the split); ``index`` is its place in the test split (empty under DDP)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.files: dict[str, Path] = {}
        self._rows: list[tuple[str, str, float]] = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._rows = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(outputs, dict) and outputs.get("preds") is not None:
            confidences = outputs.get("confidences") or [float("nan")] * len(outputs["preds"])
            self._rows += [(t, p, float(c)) for t, p, c in zip(_texts(pl_module, batch), outputs["preds"], confidences)]

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        rows, ordered = self._rows, trainer.world_size == 1
        if not ordered and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if not rows or not trainer.is_global_zero:
            return
        files = (getattr(trainer.datamodule, "files", None) or {}).get("test") if ordered else None
        files = files if files is not None and len(files) == len(rows) else None
        self.files["test_predictions"] = writers.write_csv(self.path, [
            {"index": i if ordered else "", "file": files[i] if files else "", "text": text, "prediction": pred,
             "confidence": round(confidence, 6), "right": text == pred}
            for i, (text, pred, confidence) in enumerate(rows)], PREDICTION_COLUMNS)


PREDICTION_COLUMNS = ("index", "file", "text", "prediction", "confidence", "right")


class LearningCurves(L.Callback):
    """At the end of fit, train and val loss and accuracy against the step, read back from what the
    run's loggers recorded (TensorBoard event files or a CSVLogger's metrics.csv): ``learning_curves.png``."""

    def __init__(self, dirpath: str | None = None, filename: str = "learning_curves.png"):
        self.path = Path(dirpath) / filename if dirpath else None
        self.files: dict[str, Path] = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        if not trainer.is_global_zero or self.path is None:
            return
        log_dirs = []
        for lg in trainer.loggers:
            if isinstance(lg, (TensorBoardLogger, CSVLogger)):
                lg.save()  # flush what is buffered, so the files hold every epoch
                log_dirs.append(lg.log_dir)
        if not log_dirs or not _has_matplotlib("the learning-curve plot"):
            return
        fig = plots.learning_curves_figure(analysis.read_logged_scalars(log_dirs))
        if fig is None:
            log.info("the run logged no loss or accuracy; no learning curves drawn")
            return
        self.files["learning_curves"] = plots.save_figure(fig, self.path)
        log.info("learning curves: %s", self.path)

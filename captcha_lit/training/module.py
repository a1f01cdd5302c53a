"""The LightningModule: builds the network from plain hyperparameters, computes
losses, decodes, and tracks per-character and whole-sequence metrics."""

from __future__ import annotations

import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric

from captcha_lit.charset import Charset
from captcha_lit.data.transforms import AUGMENTATION_BACKENDS, BatchAugment, EvalPreset
from captcha_lit.decoding import Decoded, Solution, read_logits
from captcha_lit.models import get_model, model_decoder
from captcha_lit.spec import ModelSpec
from captcha_lit.training.metrics import match_greedy, match_texts, stage_metrics
from captcha_lit.training.optim import check_optim, make_optimizer

# The module, not the datamodule, turns uint8 batches into normalized floats on purpose
# (checkpoints carry the normalization); Lightning warns about that choice on every fit.
warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`")


def check_tta_shifts(shifts, width: int) -> tuple[int, ...]:
    """``model.tta_shifts``: whole numbers of pixels, not 0, each under a quarter of the input width."""
    values = [] if shifts is None else list(shifts) if isinstance(shifts, (list, tuple)) else shifts
    valid = isinstance(values, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < abs(v) < width / 4 for v in values
    ) and len(set(values)) == len(values)
    if not valid:
        raise ValueError(f"model.tta_shifts={values!r}: use distinct whole numbers of pixels, not 0 and each under a "
                         f"quarter of the input width {width}, e.g. [-1,1] ([]: no test-time views)")
    return tuple(values)


def shifted_views_average(net: torch.nn.Module, images: torch.Tensor, shifts: tuple[int, ...]) -> torch.Tensor:
    """Log of the class probabilities of ``net`` averaged over ``images`` and copies of them moved
    sideways by each of ``shifts`` pixels (the edge columns repeated into the gap), in one batch."""
    width, margin = images.shape[-1], max(abs(shift) for shift in shifts)
    padded = F.pad(images, (margin, margin, 0, 0), mode="replicate")
    views = [images] + [padded[..., margin - shift:margin - shift + width] for shift in shifts]
    logits = net(torch.cat(views))
    probs = logits.float().softmax(-1).reshape(len(views), images.shape[0], *logits.shape[1:]).mean(0)
    return probs.clamp_min(1e-30).log()


class CaptchaModule(L.LightningModule):
    """A CAPTCHA solver. Every argument is a plain value, so checkpoints are self-contained:
    ``CaptchaModule.load_from_checkpoint(path)`` rebuilds the network, and the
    checkpoint loads with ``torch.load(..., weights_only=True)``.
    """

    def __init__(
        self,
        *,
        spec: ModelSpec | dict,
        model_kwargs: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        augmentation: dict | None = None,
        channels_last: bool = True,
        label_smoothing: float = 0.0,
        tta_shifts: tuple[int, ...] | list[int] = (),
    ):
        super().__init__()
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(dict(spec))
        if model_decoder(spec.arch) != spec.decoder:
            raise ValueError(f"spec decoder={spec.decoder!r} does not fit model {spec.arch!r}, which decodes "
                             f"{model_decoder(spec.arch)!r}")
        tta_shifts = check_tta_shifts(tta_shifts, spec.input_size[1])
        optimizer = dict(optimizer or {"name": "adam", "lr": 1e-3})
        scheduler = dict(scheduler or {"name": "none"})
        self.save_hyperparameters(
            {
                "spec": spec.to_dict(), "model_kwargs": dict(model_kwargs or {}), "optimizer": optimizer,
                "scheduler": scheduler, "augmentation": dict(augmentation or {}),
                "channels_last": bool(channels_last), "label_smoothing": float(label_smoothing),
                "tta_shifts": list(tta_shifts),
            }
        )
        check_optim(optimizer, scheduler)
        self.spec = spec
        self.charset = Charset(spec.charset)
        arch = spec.arch
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
                or not 0 <= label_smoothing < 1:
            raise ValueError(f"model.label_smoothing={label_smoothing!r}: use a number in [0, 1), e.g. 0.1 (0: none)")
        if label_smoothing and self.spec.decoder == "ctc":
            raise ValueError(
                f"model.label_smoothing={label_smoothing} applies to per-position CrossEntropy; model {arch!r} "
                "trains with CTC, so leave it at 0"
            )
        self.label_smoothing = float(label_smoothing)
        # Inference (val, test, predict and the exported graph) averages the image with copies of it
        # moved a pixel or two sideways: a character's reading then depends less on where its strokes
        # fall between two of the network's columns.
        self.tta_shifts = tta_shifts
        if "in_channels" in (model_kwargs or {}):
            raise ValueError("model.in_channels is set by the data: data.grayscale=true reads 1 channel, false 3")
        # The network's classes beyond the charset: CTC's blank is the network's own; the end symbol is not.
        self.net = get_model(arch, num_classes=len(self.charset) + (spec.end_class is not None),
                             max_length=spec.max_length, input_size=spec.input_size, in_channels=spec.channels,
                             **(model_kwargs or {}))
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.preprocess = EvalPreset(mean=spec.mean, std=spec.std)
        augmentation = dict(augmentation or {})
        backend = augmentation.pop("backend", "batch")
        if backend not in AUGMENTATION_BACKENDS:
            raise ValueError(f"augmentation.backend={backend!r}: use one of {', '.join(AUGMENTATION_BACKENDS)}")
        self.batch_augment = BatchAugment(**augmentation) if backend == "batch" and augmentation else None
        self.train_metrics = stage_metrics(evaluation=False)
        self.val_metrics = stage_metrics(evaluation=True)
        self.test_metrics = stage_metrics(evaluation=True)
        self.val_seq_acc_best = MaxMetric()
        # Set by on_load_checkpoint when resuming, applied once training restarts.
        self._resume_best: float | None = None

    # ---- inference -------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """uint8 batches -> augmented (when training) and normalized float batches."""
        images = batch["image"]
        if images.dtype == torch.uint8:
            if self._trainer is not None and self._trainer.training and self.batch_augment is not None:
                images = self.preprocess.normalize(self.batch_augment(self.preprocess.to_float(images)))
            else:
                images = self.preprocess(images)
            batch = {**batch, "image": images}
        return batch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized float images (B, C, H, W) -> logits; with ``tta_shifts``, outside training,
        the log of the probabilities averaged over the shifted views."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.tta_shifts and not self.training:
            return shifted_views_average(self.net, images, self.tta_shifts)
        return self.net(images)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net.forward_features(images)

    def read(self, logits: torch.Tensor, beam_width: int | None = None) -> tuple[list[Solution], Decoded]:
        """Logits -> texts and confidences (``captcha_lit.decoding.read_logits`` with this model's spec)."""
        return read_logits(self.spec, logits, beam_width)

    # ---- training --------------------------------------------------------------------
    def compute_loss(self, logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor,
                     label_smoothing: float = 0.0) -> torch.Tensor:
        if self.spec.decoder == "ctc":
            log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, C+1)
            input_lengths = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long, device=logits.device)
            flat_targets = targets[targets >= 0]
            return F.ctc_loss(log_probs, flat_targets, input_lengths, lengths, blank=self.spec.blank,
                              zero_infinity=True)
        if self.spec.end_class is not None:
            targets = targets.masked_fill(targets < 0, self.spec.end_class)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1,
                               label_smoothing=label_smoothing)

    def _shared_step(self, batch: dict, stage: str) -> tuple[torch.Tensor, list[str] | None, Decoded]:
        """Loss, metrics and logging of one batch -> (loss, the decoded texts (val and test only), the decoding)."""
        images, targets, lengths = batch["image"], batch["target"], batch["length"]
        if stage == "train":
            logits = self(images)
        else:
            # Val and test run in full precision even under bf16/fp16 autocast (trainer.precision), so
            # the metrics are those of the fp32 model that predict, serve and the ONNX export run.
            with torch.autocast(images.device.type, enabled=False):
                logits = self(images.float())
        # Label smoothing shapes only the training loss: val and test report plain CrossEntropy, so
        # their losses compare across runs with and without it.
        loss = self.compute_loss(logits, targets, lengths, self.label_smoothing if stage == "train" else 0.0)
        metrics = getattr(self, f"{stage}_metrics")
        with torch.no_grad():
            if stage == "train":
                # Training metrics only follow progress: greedy readings as tensors, no texts.
                solutions, decoded = None, None
                match = match_greedy(self.spec, logits.detach(), targets)
            else:
                solutions, decoded = self.read(logits.detach())
                match = match_texts(decoded.indices, targets)
        metrics["loss"].update(loss.detach(), weight=images.shape[0])
        metrics["seq_acc"].update(match.seq)
        metrics["char_acc"].update(match.chars)
        if "pos_acc" in metrics:
            metrics["len_acc"].update(match.same_length)
            metrics["pos_acc"].update(match.positions)
        preds = None
        if "ece" in metrics:
            metrics["ece"].update(torch.tensor(decoded.seq_conf, device=loss.device).clamp(0, 1), match.seq.long())
        if "cer" in metrics:
            preds = [solution.text for solution in solutions]
            truths = [self.charset.decode(row) for row in targets.tolist()]
            metrics["cer"].update(preds, truths)
        on_step = stage == "train"
        for name, metric in metrics.items():
            if on_step and name != "loss":
                continue  # once an epoch (on_train_epoch_end): each self.log costs more than its metric's update
            self.log(f"{stage}/{name}", metric, on_step=on_step, on_epoch=True,
                     prog_bar=name in ("loss", "seq_acc"), batch_size=images.shape[0])
        return loss, preds, decoded

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")[0]

    # Val and test return their texts and confidences, so callbacks (the prediction gallery, the
    # error analysis) reuse this decoding instead of running the model again.
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        _, preds, decoded = self._shared_step(batch, "val")
        return {"preds": preds, "confidences": decoded.seq_conf}

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        _, preds, decoded = self._shared_step(batch, "test")
        return {"preds": preds, "confidences": decoded.seq_conf}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A resumed run continues exactly like one that never stopped (same shuffling, augmentation,
        # dropout, same best score) only with these, which Lightning does not keep.
        checkpoint["rng_states"] = _rng_states()
        # What the weights were trained for: loading refuses a checkpoint whose spec was edited since.
        checkpoint["spec_digest"] = self.spec.digest()
        if self.val_seq_acc_best.update_called:
            checkpoint["val_seq_acc_best"] = float(self.val_seq_acc_best.compute())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming with a new trainer.max_epochs changes the run's length: keep the scheduler's
        # progress but let its length follow this run (OneCycleLR raises past its old total).
        for state in checkpoint.get("lr_schedulers") or []:
            for key in ("total_steps", "_schedule_phases", "T_max"):
                state.pop(key, None)
        if self._trainer is not None and self._trainer.state.fn == "fit":  # resuming, not testing or loading
            # Restored now: Lightning creates the first resumed epoch's DataLoader iterator (which draws its
            # shuffling seed) soon after, before any epoch hook; the sanity check in between keeps the RNGs.
            if checkpoint.get("rng_states") is not None:
                _set_rng_states(checkpoint["rng_states"])
            self._resume_best = checkpoint.get("val_seq_acc_best")

    def on_train_start(self) -> None:
        # Sanity-check validation must not count toward the best score; a resumed run's earlier epochs do.
        self.val_seq_acc_best.reset()
        if self._resume_best is not None:
            self.val_seq_acc_best.update(torch.tensor(self._resume_best, device=self.device))
            self._resume_best = None

    def on_fit_end(self) -> None:
        # A run resumed after its last epoch trains no further: on_train_start never ran, so its best
        # score (for metrics.json and the sweeper) comes straight from the checkpoint.
        if self._resume_best is not None:
            self.on_train_start()

    def on_train_epoch_start(self) -> None:
        # Streaming data draws new images every epoch: it needs to know which epoch this is before the
        # epoch's iterator starts the workers (the first epoch of a fit gets it from the datamodule).
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        for name, metric in self.train_metrics.items():
            if name != "loss" and metric.update_called:
                self.log(f"train/{name}", metric.compute(), prog_bar=name == "seq_acc")
                metric.reset()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_seq_acc_best(self.val_metrics["seq_acc"].compute())
        self.log("val/seq_acc_best", self.val_seq_acc_best.compute(), prog_bar=False, sync_dist=True)

    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.optimizer)
        name = opt_cfg.pop("name")
        optimizer = make_optimizer(name, self.parameters(), opt_cfg)
        sched_cfg = dict(self.hparams.scheduler)
        kind = sched_cfg.pop("name")
        if kind == "none":
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        if kind == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=opt_cfg["lr"] * sched_cfg.get("peak_factor", 1.0), total_steps=max(total_steps, 1),
                pct_start=sched_cfg.get("pct_start", 0.15), div_factor=sched_cfg.get("div_factor", 25.0),
                final_div_factor=sched_cfg.get("final_div_factor", 1e3),
                cycle_momentum=name == "sgd",
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(total_steps, 1), eta_min=sched_cfg.get("eta_min", 0.0)
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _rng_states() -> dict:
    """The global RNG states as tensors and plain values, so checkpoints still load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss_next],
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])

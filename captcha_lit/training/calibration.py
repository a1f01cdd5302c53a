"""Confidence calibration: one temperature for the logits, fitted on the validation split.

A network trained to be right is not trained to know how right it is: on images unlike its
training data it answers wrongly with confidences near 1. Dividing its logits by a temperature
before the softmax (Guo et al., 2017) changes no reading, only how sure each one claims to be.
The temperature that best predicts which validation readings are right (the lowest log loss of
"right or wrong" given the whole text's confidence) goes into the model's spec, so the
checkpoint, the test, predict, export and serve all report calibrated confidences.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from captcha_lit.decoding import decode

log = logging.getLogger(__name__)

# Candidate temperatures, log-spaced: below 1 sharpens an underconfident model, above 1 softens.
# Down to 0.05: a model read as the average of several views (``model.tta_shifts``) is
# underconfident, since a character that peaks one step apart in two views peaks lower in their
# average, and it needs more sharpening than 0.5 gives.
TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(16.0), 101))


def log_loss(confidences: np.ndarray, right: np.ndarray) -> float:
    c = np.clip(confidences, 1e-6, 1 - 1e-6)
    return float(-np.mean(right * np.log(c) + (1 - right) * np.log(1 - c)))


def fit_temperature(spec, logits: np.ndarray, truths: list[str]) -> tuple[float, dict]:
    """The temperature whose greedy confidences best predict which readings of ``logits`` equal
    ``truths`` -> (temperature, a report with the log loss before and after)."""
    from captcha_lit.charset import Charset

    charset = Charset(spec.charset)
    raw = spec.replace(temperature=1.0)
    decoded = decode(raw, logits, beam_width=1)
    right = np.asarray([charset.decode(indices) == truth for indices, truth in zip(decoded.indices, truths)], float)
    losses = [log_loss(np.asarray(decode(spec.replace(temperature=float(t)), logits, beam_width=1).seq_conf), right)
              for t in TEMPERATURES]
    best = int(np.argmin(losses))
    before = log_loss(np.asarray(decoded.seq_conf), right)
    if right.all() or not right.any():
        # All right (or all wrong): the log loss only falls as the temperature goes to an end of the
        # range, which says nothing about how often a confident reading is wrong. Keep the softmax.
        return 1.0, {"temperature": 1.0, "val_log_loss_before": round(before, 5), "val_log_loss_after": round(before, 5),
                     "val_images": len(truths), "val_right": int(right.sum()),
                     "note": "every validation reading is right (or every one wrong): nothing to fit"}
    temperature = round(float(TEMPERATURES[best]), 4)
    report = {"temperature": temperature, "val_log_loss_before": round(before, 5),
              "val_log_loss_after": round(losses[best], 5), "val_images": len(truths),
              "val_right": int(right.sum())}
    return temperature, report


def calibrate_checkpoint(checkpoint: str, datamodule, write: bool = True) -> dict:
    """Fit the temperature of the model in ``checkpoint`` on the validation split and (``write``)
    put it into the checkpoint's spec, atomically -> the report."""
    from captcha_lit.training.checkpoints import load_module
    from captcha_lit.training.inference import read_images

    module, state = load_module(checkpoint)
    dataset = datamodule.datasets.get("val")
    if dataset is None:
        datamodule.setup("validate")
        dataset = datamodule.datasets["val"]
    reading = read_images(module, np.asarray(dataset.images[np.arange(len(dataset))]), beam_width=1,
                          keep_logits=True)
    temperature, report = fit_temperature(module.spec, reading.logits, list(dataset.texts))
    if write:
        spec = dict(state["hyper_parameters"]["spec"])
        spec["temperature"] = temperature
        state["hyper_parameters"]["spec"] = spec
        tmp = Path(checkpoint).with_name(f".{Path(checkpoint).name}.calibrating")
        torch.save(state, tmp)
        os.replace(tmp, checkpoint)
    log.info("calibrated on %d validation images: temperature %.3f (log loss %.4f -> %.4f)", report["val_images"],
             temperature, report["val_log_loss_before"], report["val_log_loss_after"])
    return report
